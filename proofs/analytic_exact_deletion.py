"""Whole enrollments and deletions of an analytic head under the exact relation.

An exact analytic client enrolls the commitments ``m:head#0`` (its augmented Gram, with one blinding
row) and ``w:head#0`` (its ridge head) and one enrollment proof over them: the relation with no forget
rows (:mod:`zkunlearn.circuits.analytic_exact`). A deletion is one proof over the current ``m:head``,
the claimed new ``m:head`` and ``w:head``, and the forget rows the provider sent, which the provider
commits itself (bound to the signed request); nothing else may change.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy.typing as npt
from zkunlearn.proofs.analytic_exact_circuits import ExactAnalyticVerifier
from zkunlearn.proofs.fixedpoint import FixedPointError
from zkunlearn.proofs.layout import (
    ANALYTIC_LAYER,
    CommitmentLike,
    DeletionError,
    DeletionVerdict,
    NoReplay,
    by_key,
    changed_outside,
    commitment_name,
    parse_proof,
    request_digest,
)
from zkunlearn.proofs.verifier import Verdict

__all__ = ["ANALYTIC_EXACT_KEYS", "verify_analytic_exact", "verify_analytic_exact_enrollment"]

ANALYTIC_EXACT_KEYS = ((commitment_name("m", ANALYTIC_LAYER), 0), (commitment_name("w", ANALYTIC_LAYER), 0))
"""The commitments an exact analytic head enrolls and replaces: its Gram and its head."""


def verify_analytic_exact_enrollment(
    verifier: ExactAnalyticVerifier, names: dict[tuple[str, int], str], raw_proof: bytes, index: int
) -> Verdict:
    """The head's enrollment proof over its enrolled ``m:head#0`` and ``w:head#0``."""
    m_key, w_key = ANALYTIC_EXACT_KEYS
    if m_key not in names or w_key not in names:
        raise DeletionError("an exact analytic enrollment commits exactly m:head#0 and w:head#0")
    return verifier.verify_enrollment(
        parse_proof(raw_proof, index), m_commit=names[m_key], w_commit=names[w_key]
    )


def verify_analytic_exact(
    verifier: ExactAnalyticVerifier,
    *,
    request_id: str,
    request_canonical: bytes,
    forget_features: npt.ArrayLike | None,
    forget_labels: npt.ArrayLike | None,
    before: Sequence[CommitmentLike],
    after: Sequence[CommitmentLike],
    proofs: Sequence[bytes],
) -> DeletionVerdict:
    """Judge one exact analytic submission: one proof, only ``m:head`` and ``w:head`` replaced."""
    if forget_features is None or forget_labels is None:
        return DeletionVerdict(False, "an analytic deletion needs the forget features and labels")
    if len(proofs) != 1:
        return DeletionVerdict(False, f"an analytic deletion has exactly one proof, got {len(proofs)}")
    try:
        old, new = by_key(before, "before"), by_key(after, "after")
        forget = verifier.forget_commitment(forget_features, forget_labels, request_digest(request_canonical))
        proof = parse_proof(proofs[0], 0)
    except (DeletionError, FixedPointError) as exc:
        return DeletionVerdict(False, str(exc))
    m_key, w_key = ANALYTIC_EXACT_KEYS
    if set(old) != set(ANALYTIC_EXACT_KEYS) or set(new) != set(ANALYTIC_EXACT_KEYS):
        return DeletionVerdict(False, "exact analytic commitments must be exactly m:head#0 and w:head#0")
    refused = changed_outside(old, new, set(ANALYTIC_EXACT_KEYS))
    if refused:
        return DeletionVerdict(False, refused)
    verdict = verifier.verify(
        proof,
        request_id=request_id,
        enrolled_m=old[m_key],
        claimed_m_after=new[m_key],
        claimed_w=new[w_key],
        forget_commitment=forget,
        replay=NoReplay(),
    )
    reason = "ok" if verdict.ok else f"{verdict.reason.value} {verdict.detail}".strip()
    return DeletionVerdict(verdict.ok, reason, (verdict,))
