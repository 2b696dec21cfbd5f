"""The exact analytic circuit: building it, and verifying its proofs on the provider's side.

One circuit serves enrollment and deletion (:mod:`zkunlearn.circuits.analytic_exact`): an enrollment
proof is the relation with no forget rows, so it reads the same commitments at the same logrows. It
runs at scale 0 with ezkl's input range checks off; the relation range-checks ``M``, ``W`` and ``L``
itself, with ``decomp_legs`` limbs, which also bounds the constants ezkl range-checks.

Verification binds a proof to commitments the provider holds or computes: the client's current Gram
``m``, its claimed new ``m_after`` and ``w``, and the forget rows ``z``, which the provider commits itself
from the rows it sent (bound to the signed request). The factor ``L`` is a fresh witness: its
commitment is read from the proof. The public outputs are then held to ``eq == 0`` and the spec's
thresholds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy.typing as npt
from zkunlearn.circuits import analytic_exact as relation
from zkunlearn.circuits.export import export_relation
from zkunlearn.proofs.analytic_exact import (
    AnalyticOutputs,
    ExactAnalyticSpec,
    enrollment_binding,
    quantise_rows,
    z_tensor,
)
from zkunlearn.proofs.artifacts import CircuitArtifacts, build_provider_artifacts
from zkunlearn.proofs.backend import CircuitConfig, Proof, ProofFormatError, ProvingBackend, compress_point
from zkunlearn.proofs.fixedpoint import FixedPointError
from zkunlearn.proofs.srs import SrsInfo
from zkunlearn.proofs.verifier import (
    InMemoryReplayGuard,
    Reason,
    ReplayGuard,
    Verdict,
    _BaseVerifier,
    parse_submission,
)

__all__ = [
    "ANALYTIC_EXACT_CONFIG",
    "ExactAnalyticVerifier",
    "build_analytic_exact",
    "export_analytic_exact",
    "transcript_commitment",
]

ANALYTIC_EXACT_CONFIG = CircuitConfig(
    input_scale=0,
    scale_rebase_multiplier=1,
    decomp_base=1024,
    decomp_legs=5,
    num_inner_cols=2,
    ignore_range_check_io=True,
    max_logrows=20,
)
"""ezkl run arguments of the exact analytic circuit (legs and base must match the spec's)."""

FACTOR_INDEX = relation.INPUT_NAMES.index("factor")


def export_analytic_exact(spec: ExactAnalyticSpec, directory: Path) -> Path:
    module = spec.relation()
    return export_relation(
        module,
        module.example_inputs(),
        Path(directory) / "analytic_exact.onnx",
        relation.INPUT_NAMES,
        relation.OUTPUT_NAMES,
        rtol=1e-5,
    )


def build_analytic_exact(
    spec: ExactAnalyticSpec,
    directory: Path,
    srs_for: Callable[[int], SrsInfo],
    config: CircuitConfig = ANALYTIC_EXACT_CONFIG,
) -> CircuitArtifacts:
    """Compile and set up the circuit a published spec defines."""
    if (config.decomp_base, config.decomp_legs) != (spec.decomp_base, spec.decomp_legs):
        raise ValueError(
            f"run arguments decompose with {config.decomp_legs} x {config.decomp_base}, the spec with "
            f"{spec.decomp_legs} x {spec.decomp_base}: its offsets and constants assume the spec's"
        )
    onnx = export_analytic_exact(spec, Path(directory) / "staging-analytic-exact")
    return build_provider_artifacts(onnx, directory, srs_for, replace(config, input_scale=0))


def transcript_commitment(proof: Proof, index: int) -> str:
    """The compressed commitment of the proof's ``index``-th committed input, read from its transcript."""
    raw = proof.transcript[64 * index : 64 * index + 64]
    if len(raw) != 64:
        raise ProofFormatError(f"transcript too short for committed input {index}")
    return compress_point(raw[:32][::-1].hex(), raw[32:][::-1].hex())


@dataclass(frozen=True)
class AnalyticVerdict:
    """A verdict with the outputs it was judged on (absent when the proof did not verify)."""

    verdict: Verdict
    outputs: AnalyticOutputs | None = None


class ExactAnalyticVerifier:
    """Verifies exact analytic enrollment and deletion proofs of one spec with the provider's keys."""

    def __init__(
        self, spec: ExactAnalyticSpec, artifacts: CircuitArtifacts, backend: ProvingBackend | None = None
    ) -> None:
        self.spec = spec
        self.circuit_key = artifacts.key
        self._base = _BaseVerifier(artifacts, backend)

    def commit(self, felts: list[str]) -> str:
        return self._base.commit(felts)

    def forget_commitment(
        self, features: npt.ArrayLike, targets: npt.ArrayLike, request_digest: bytes
    ) -> str:
        """The provider's own commitment to the forget rows it sent, bound to the request digest."""
        return self.commit(z_tensor(self.spec, quantise_rows(self.spec, features, targets), request_digest))

    def _judge(
        self,
        submission: Proof | dict[str, Any],
        request_id: str,
        expected: list[str],
        replay: ReplayGuard,
    ) -> AnalyticVerdict:
        try:
            proof = submission if isinstance(submission, Proof) else parse_submission(submission)
            factor = transcript_commitment(proof, FACTOR_INDEX)
        except ProofFormatError as exc:
            return AnalyticVerdict(Verdict(False, Reason.MALFORMED, str(exc)))
        early, proof, _ = self._base._check_proof(
            proof, request_id, [*expected, factor], self.spec.n_outputs, replay
        )
        if early is not None:
            return AnalyticVerdict(early)
        digest = proof.digest()
        try:
            out = self.spec.decode(proof.instances[0])
        except FixedPointError as exc:
            return AnalyticVerdict(Verdict(False, Reason.MALFORMED, str(exc), digest))
        rows = ((float(out.r_sq), float(out.e_sq)),)
        nonzero = sum(1 for v in out.eq if v != 0)
        if nonzero:
            return AnalyticVerdict(
                Verdict(
                    False,
                    Reason.ANALYTIC_GRAM_WRONG,
                    f"{nonzero} entries of M_after differ from M - Z_u^T Z_u",
                    digest,
                    rows,
                ),
                out,
            )
        if out.r_sq < 0 or out.e_sq < 0:
            return AnalyticVerdict(
                Verdict(False, Reason.OUTPUT_OUT_OF_RANGE, "negative sum of squares", digest, rows), out
            )
        if out.e_sq > self.spec.e_threshold:
            return AnalyticVerdict(
                Verdict(
                    False,
                    Reason.ANALYTIC_GRAM_NOT_PSD,
                    f"sum E^2 = {out.e_sq} > {self.spec.e_threshold}: the Gram is not certified positive "
                    "semidefinite (rows never learned, or a state that is no Gram)",
                    digest,
                    rows,
                ),
                out,
            )
        if out.r_sq > self.spec.r_threshold:
            return AnalyticVerdict(
                Verdict(
                    False,
                    Reason.ANALYTIC_W_WRONG,
                    f"sum R^2 = {out.r_sq} > {self.spec.r_threshold}: W is not the ridge solution",
                    digest,
                    rows,
                ),
                out,
            )
        return AnalyticVerdict(Verdict(True, Reason.OK, "", digest, rows), out)

    def verify_enrollment(
        self, submission: Proof | dict[str, Any], *, m_commit: str, w_commit: str
    ) -> Verdict:
        """The enrolled Gram is in range and positive semidefinite, the enrolled head its ridge solution."""
        z = self.commit(z_tensor(self.spec, None, enrollment_binding()))
        # Enrollment proofs carry no request: the replay guard is the identity of the commitments.
        return self._judge(
            submission, "enrollment", [m_commit, m_commit, w_commit, z], InMemoryReplayGuard()
        ).verdict

    def verify(
        self,
        submission: Proof | dict[str, Any],
        *,
        request_id: str,
        enrolled_m: str,
        claimed_m_after: str,
        claimed_w: str,
        forget_commitment: str,
        replay: ReplayGuard,
    ) -> Verdict:
        """One deletion proof against the client's current Gram and the forget rows the provider sent."""
        expected = [enrolled_m, claimed_m_after, claimed_w, forget_commitment]
        return self._judge(submission, request_id, expected, replay).verdict
