"""Real ezkl proofs of the exact Group-OBS relation and its enrollment relation.

Every attack runs beside an honest control that verifies: the provider's verdict names the reason, and
forgeries that rely on out-of-range field elements cannot even be proven.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest
from zkunlearn.client.group_obs import solve_blocks
from zkunlearn.proofs.artifacts import CircuitArtifacts
from zkunlearn.proofs.backend import ProvingError
from zkunlearn.proofs.deletion import DeletionCircuits
from zkunlearn.proofs.exact import (
    ExactGroupObsSpec,
    IntArray,
    field_blinding,
    g_tensor,
    mask_tensor,
    quantise_exact,
    theta_tensor,
)
from zkunlearn.proofs.exact_circuits import ExactGroupObsVerifier
from zkunlearn.proofs.fixedpoint import FIELD_MODULUS
from zkunlearn.proofs.prover import ProveJob, run_job
from zkunlearn.proofs.verifier import InMemoryReplayGuard, Reason

from tests.exact_cases import Batch, edited, make_batch, worst_direction

pytestmark = pytest.mark.ezkl

SPEC = ExactGroupObsSpec.from_lam(16, 8, 2, 2.0**-10)
REQUEST = hashlib.sha256(b"exact-request").digest()


@dataclass(frozen=True)
class Enrolled:
    """A client's committed batch: integers, blinding, and the provider's record of its enrollment."""

    batch: Batch
    theta_blind: list[list[int]]
    g_blind: list[list[int]]
    theta_commit: str
    g_commit: str

    def theta_felts(self) -> list[str]:
        return theta_tensor(self.batch.theta, self.theta_blind)

    def g_felts(self) -> list[str]:
        return g_tensor(self.batch.g, self.g_blind)


@pytest.fixture(scope="module")
def circuits(exact_published: DeletionCircuits) -> tuple[CircuitArtifacts, CircuitArtifacts]:
    assert exact_published.exact is not None
    spec, deletion, enrollment = exact_published.exact
    assert spec == SPEC
    return deletion, enrollment


@pytest.fixture(scope="module")
def verifier(circuits: tuple[CircuitArtifacts, CircuitArtifacts]) -> ExactGroupObsVerifier:
    return ExactGroupObsVerifier(SPEC, *circuits)


def _blind(rows: int, width: int) -> list[list[int]]:
    return [field_blinding(width) for _ in range(rows)]


@pytest.fixture(scope="module")
def enrolled(verifier: ExactGroupObsVerifier) -> Enrolled:
    batch = make_batch(SPEC, 21)
    theta_blind, g_blind = _blind(SPEC.batch, SPEC.n_blind), _blind(SPEC.batch, SPEC.block)
    theta_commit = verifier.commit(theta_tensor(batch.theta, theta_blind))
    g_commit = verifier.commit(g_tensor(batch.g, g_blind))
    return Enrolled(batch, theta_blind, g_blind, theta_commit, g_commit)


def _prove(arts: CircuitArtifacts, inputs: list[list[str]]) -> Any:
    return run_job(ProveJob(inputs, arts.compiled, arts.vk, arts.pk, arts.srs.path))


def _enroll(circuits: tuple[CircuitArtifacts, CircuitArtifacts], g: list[str]) -> Any:
    return _prove(circuits[1], [g])


def _delete(
    circuits: tuple[CircuitArtifacts, CircuitArtifacts],
    enrolled: Enrolled,
    theta_after: IntArray,
    w: IntArray,
    *,
    request: bytes = REQUEST,
    theta: list[str] | None = None,
) -> Any:
    inputs = [
        theta or enrolled.theta_felts(),
        theta_tensor(theta_after, _blind(SPEC.batch, SPEC.n_blind)),
        enrolled.g_felts(),
        mask_tensor(enrolled.batch.mask, request, SPEC.n_blind),
        theta_tensor(w, _blind(SPEC.batch, SPEC.n_blind)),
    ]
    return _prove(circuits[0], inputs)


def _unchecked_update(theta: IntArray, g: IntArray, mask: np.ndarray) -> tuple[IntArray, IntArray]:
    """The Group-OBS solution of these integers, rounded, without the SDK's refusals."""
    th = np.asarray(theta, dtype=np.float64) / 2.0**SPEC.theta_bits
    gm = np.asarray(g, dtype=np.float64) / 2.0**SPEC.g_bits
    after, _delta, w = solve_blocks(th, gm, mask, SPEC.lam)
    return quantise_exact(np.where(mask, 0.0, after), SPEC.theta_bits), quantise_exact(w, SPEC.w_bits)


def _verdict(verifier: ExactGroupObsVerifier, enrolled: Enrolled, result: Any, request_id: str = "r") -> Any:
    return verifier.verify(
        result.proof,
        request_id=request_id,
        enrolled_theta=enrolled.theta_commit,
        enrolled_g=enrolled.g_commit,
        mask_commitment=verifier.mask_commitment(enrolled.batch.mask, REQUEST),
        claimed_theta_after=result.commitments[1],
        g_fro_sq=enrolled.batch.g_fro_sq,
        replay=InMemoryReplayGuard(),
    )


def test_both_circuits_share_logrows_and_commitments(
    circuits: tuple[CircuitArtifacts, CircuitArtifacts], enrolled: Enrolled
) -> None:
    deletion, enrollment = circuits
    assert deletion.logrows == enrollment.logrows
    rows = int(deletion.settings_dict["num_rows"])
    per_weight = rows / (SPEC.batch * SPEC.block)
    print(f"deletion rows {rows} ({per_weight:.1f} per weight), logrows {deletion.logrows}")
    assert per_weight <= 60
    proof = _enroll(circuits, enrolled.g_felts())
    assert proof.commitments == [enrolled.g_commit]


def test_honest_enrollment_is_accepted_and_proves_the_factors_norm(
    circuits: tuple[CircuitArtifacts, CircuitArtifacts], verifier: ExactGroupObsVerifier, enrolled: Enrolled
) -> None:
    result = _enroll(circuits, enrolled.g_felts())
    verdict = verifier.verify_enrollment(result.proof, g_commit=enrolled.g_commit)
    assert verdict.ok, verdict
    assert list(verdict.g_fro_sq) == enrolled.batch.g_fro_sq
    assert verifier.check_normalisation(verdict.g_fro_sq).ok
    # Bound to the commitments: the same proof against another G commitment does not verify.
    other = verifier.commit(g_tensor(enrolled.batch.g, _blind(SPEC.batch, SPEC.block)))
    swapped = verifier.verify_enrollment(result.proof, g_commit=other)
    assert swapped.reason is Reason.BINDING_OR_INVALID


def test_a_shrunken_factor_is_refused_at_enrollment(
    circuits: tuple[CircuitArtifacts, CircuitArtifacts], verifier: ExactGroupObsVerifier, enrolled: Enrolled
) -> None:
    """A tiny G would change what lam means (and, with a loose relation, free the weights)."""
    tiny = np.vectorize(lambda v: int(v) // 64, otypes=[object])(enrolled.batch.g)
    g_felts = g_tensor(tiny, enrolled.g_blind)
    result = _enroll(circuits, g_felts)
    verdict = verifier.verify_enrollment(result.proof, g_commit=verifier.commit(g_felts))
    assert verdict.ok  # the proof is sound; the factor it proves is not normalised
    refused = verifier.check_normalisation(verdict.g_fro_sq)
    assert refused.reason is Reason.ENROLLMENT_G_NOT_NORMALISED


def test_weights_below_the_published_bound_are_refused_in_the_deletion_proof(
    circuits: tuple[CircuitArtifacts, CircuitArtifacts], verifier: ExactGroupObsVerifier, enrolled: Enrolled
) -> None:
    """Every deletion proof bounds the theta it reads: an enrolled weight below -theta_bound is caught
    the first time its block is proven (the honest update of that theta otherwise satisfies the KKT)."""
    theta = np.array(enrolled.batch.theta, dtype=object)
    theta[0, 0] = -SPEC.theta_offset - 1
    low = replace(enrolled, batch=replace(enrolled.batch, theta=theta))
    low = replace(low, theta_commit=verifier.commit(low.theta_felts()))
    theta_after, w = _unchecked_update(theta, enrolled.batch.g, enrolled.batch.mask)
    verdict = _verdict(verifier, low, _delete(circuits, low, theta_after, w))
    assert verdict.reason is Reason.THETA_OUT_OF_RANGE, verdict
    honest = enrolled.batch.update
    assert _verdict(verifier, enrolled, _delete(circuits, enrolled, honest.theta_after, honest.w)).ok


@pytest.mark.parametrize("over", [0, 1])
def test_factor_entries_are_bounded_by_one_limb_at_enrollment(
    circuits: tuple[CircuitArtifacts, CircuitArtifacts],
    verifier: ExactGroupObsVerifier,
    enrolled: Enrolled,
    over: int,
) -> None:
    """``|G_q| <= 2**g_range_bits - 1`` is provable; one more cannot be proven at all."""
    g = np.array(enrolled.batch.g, dtype=object)
    g[0, 0, 0] = -((1 << SPEC.g_range_bits) - 1 + over)
    felts = g_tensor(g, enrolled.g_blind)
    if over:
        with pytest.raises(ProvingError, match="witness generation failed"):
            _enroll(circuits, felts)
    else:
        verdict = verifier.verify_enrollment(_enroll(circuits, felts).proof, g_commit=verifier.commit(felts))
        assert verdict.ok, verdict


def test_honest_deletion_is_accepted(
    circuits: tuple[CircuitArtifacts, CircuitArtifacts], verifier: ExactGroupObsVerifier, enrolled: Enrolled
) -> None:
    update = enrolled.batch.update
    verdict = _verdict(verifier, enrolled, _delete(circuits, enrolled, update.theta_after, update.w))
    assert verdict.ok, verdict
    assert [tuple(int(v) for v in row) for row in verdict.residuals] == update.outputs


def test_deletions_that_do_not_unlearn_are_refused(
    circuits: tuple[CircuitArtifacts, CircuitArtifacts], verifier: ExactGroupObsVerifier, enrolled: Enrolled
) -> None:
    batch = enrolled.batch
    nothing = _delete(circuits, enrolled, np.array(batch.theta, dtype=object), batch.update.w)
    assert _verdict(verifier, enrolled, nothing).reason is Reason.MASK_NOT_ZERO
    mask_only = np.where(batch.mask, 0, np.array(batch.theta, dtype=object))
    no_comp = _delete(circuits, enrolled, mask_only, np.zeros_like(batch.update.w))
    assert not _verdict(verifier, enrolled, no_comp).ok


@pytest.mark.parametrize("edit", ["one-weight", "worst-direction", "null-space"])
def test_small_edits_of_kept_weights_are_refused(
    circuits: tuple[CircuitArtifacts, CircuitArtifacts],
    verifier: ExactGroupObsVerifier,
    enrolled: Enrolled,
    edit: str,
) -> None:
    """Edits of 2 % of the weights' spread, with w re-fitted to hide them where it can."""
    batch = enrolled.batch
    keep = np.flatnonzero(~batch.mask[0])
    if edit == "null-space":
        g = np.asarray(batch.g[0], dtype=np.float64)[:, keep]
        direction = np.zeros(SPEC.block)
        direction[keep] = np.linalg.svd(g)[2][-1]  # G_U direction = 0: invisible to r_w
        theta_after = np.array(batch.update.theta_after, dtype=object)
        theta_after[0] += np.vectorize(int, otypes=[object])(
            np.rint(0.02 * batch.sigma * direction * 2**SPEC.theta_bits)
        )
        w = batch.update.w
    else:
        direction = worst_direction(batch, 0) if edit == "worst-direction" else np.eye(SPEC.block)[keep[0]]
        theta_after, w = edited(batch, 0, direction, 0.02 * batch.sigma)
    verdict = _verdict(verifier, enrolled, _delete(circuits, enrolled, theta_after, w))
    assert verdict.reason in (Reason.KKT_VIOLATED, Reason.ROW_SPACE_VIOLATED), verdict


def test_field_tricks_cannot_be_proven(
    circuits: tuple[CircuitArtifacts, CircuitArtifacts], enrolled: Enrolled
) -> None:
    """A masked weight kept as i (i**2 = -1 mod p) beside a masked 1 would zero a sum of squares; a
    witness w near the modulus would wrap R_w. Both fail the circuit's range checks."""
    i = pow(5, (FIELD_MODULUS - 1) // 4, FIELD_MODULUS)
    assert i * i % FIELD_MODULUS == FIELD_MODULUS - 1
    batch = enrolled.batch
    theta_after = np.array(batch.update.theta_after, dtype=object)
    masked = np.flatnonzero(batch.mask[0])
    theta_after[0, masked[0]] = i
    with pytest.raises(ProvingError):
        _delete(circuits, enrolled, theta_after, batch.update.w)
    w = np.array(batch.update.w, dtype=object)
    w[0, 0] = FIELD_MODULUS - 2**40
    with pytest.raises(ProvingError):
        _delete(circuits, enrolled, batch.update.theta_after, w)


def test_a_proof_is_bound_to_the_enrolled_weights_and_the_request(
    circuits: tuple[CircuitArtifacts, CircuitArtifacts], verifier: ExactGroupObsVerifier, enrolled: Enrolled
) -> None:
    """Proving from other weights than the enrolled ones, or for another request's mask binding."""
    update = enrolled.batch.update
    other_theta = theta_tensor(enrolled.batch.theta, _blind(SPEC.batch, SPEC.n_blind))
    from_other = _delete(circuits, enrolled, update.theta_after, update.w, theta=other_theta)
    assert _verdict(verifier, enrolled, from_other).reason is Reason.BINDING_OR_INVALID
    other_request = hashlib.sha256(b"another request").digest()
    replayed = _delete(circuits, enrolled, update.theta_after, update.w, request=other_request)
    assert _verdict(verifier, enrolled, replayed).reason is Reason.BINDING_OR_INVALID


def test_verifier_refuses_mismatched_circuits(circuits: tuple[CircuitArtifacts, CircuitArtifacts]) -> None:
    deletion, enrollment = circuits
    with pytest.raises(ValueError, match="logrows"):
        ExactGroupObsVerifier(SPEC, deletion, _with_logrows(enrollment, deletion.logrows + 1))


def _with_logrows(arts: CircuitArtifacts, logrows: int) -> CircuitArtifacts:
    class Shifted(CircuitArtifacts):
        @property
        def logrows(self) -> int:
            return logrows

    return Shifted(
        arts.key, arts.directory, arts.onnx, arts.settings, arts.compiled, arts.vk, arts.pk, arts.srs
    )
