"""Provider-side verification of unlearning proofs.

The verifier is built from the provider's OWN circuit artifacts (settings, vk, SRS it generated); no
method accepts a verifying key or settings from the caller, and :meth:`Proof.from_json`-style
submissions that carry key material are refused (:func:`parse_submission`). For each proof it:

1. refuses a replay (the proof digest or the request id is already used; the provider state answers
   through the small :class:`ReplayGuard` protocol);
2. replaces the proof's input commitments by the ones the PROVIDER expects -- enrolled ``theta`` and
   ``G`` (or ``R``, ``W``), the mask commitment it computes itself from the request (the mask tensor
   carries request-bound elements), and the ``theta'`` the client claims -- then verifies;
3. reads the public residual maxima and refuses any above the derived tolerance (``r_mask`` must be
   exactly zero).

Every refusal names a specific :class:`Reason`.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from zkunlearn.proofs.artifacts import CircuitArtifacts
from zkunlearn.proofs.backend import EzklBackend, Proof, ProofFormatError, ProvingBackend
from zkunlearn.proofs.fixedpoint import (
    FixedPointError,
    GroupObsTolerance,
    felt_to_int,
    felts,
    group_obs_mask_rows,
)


class Reason(enum.StrEnum):
    OK = "ok"
    REPLAYED_PROOF = "replayed_proof"
    REPLAYED_REQUEST = "replayed_request"
    MALFORMED = "malformed_proof"
    BINDING_OR_INVALID = "proof_invalid_for_expected_commitments"
    MASK_NOT_ZERO = "masked_weights_not_zero"
    KKT_VIOLATED = "kkt_residual_above_tolerance"
    ROW_SPACE_VIOLATED = "edit_outside_row_space"
    ANALYTIC_W_WRONG = "analytic_head_not_retrained_solution"
    ANALYTIC_R_WRONG = "analytic_inverse_not_downdated"
    ANALYTIC_GRAM_WRONG = "analytic_gram_not_downdated"
    ANALYTIC_GRAM_NOT_PSD = "analytic_gram_not_positive_semidefinite"
    REFIT_NOT_SOLUTION = "refit_not_ridge_solution"
    THETA_OUT_OF_RANGE = "weights_out_of_range"
    ENROLLMENT_G_NOT_NORMALISED = "enrolled_factor_not_normalised"
    PADDING_NOT_ZERO = "padding_block_not_zero"
    OUTPUT_OUT_OF_RANGE = "public_output_out_of_range"


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: Reason
    detail: str = ""
    proof_digest: str = ""
    residuals: tuple[tuple[float, ...], ...] = field(default_factory=tuple)


class ReplayGuard(Protocol):
    """What the provider state answers: has this proof digest / request id been accepted before?"""

    def proof_used(self, digest: str) -> bool: ...

    def request_used(self, request_id: str) -> bool: ...


class InMemoryReplayGuard:
    """A ReplayGuard for tests and single-process use; the provider state keeps the durable one."""

    def __init__(self) -> None:
        self.proofs: set[str] = set()
        self.requests: set[str] = set()

    def proof_used(self, digest: str) -> bool:
        return digest in self.proofs

    def request_used(self, request_id: str) -> bool:
        return request_id in self.requests

    def record(self, digest: str, request_id: str) -> None:
        self.proofs.add(digest)
        self.requests.add(request_id)


_KEY_MATERIAL = {"vk", "vk_path", "settings", "settings_path", "srs", "pk", "verifying_key"}


def parse_submission(obj: dict[str, Any]) -> Proof:
    """Parse a client's proof object, refusing any that carries key material or settings."""
    extra = set(obj) & _KEY_MATERIAL
    if extra:
        raise ProofFormatError(
            f"submission carries {sorted(extra)}: the provider verifies only with its own keys and settings"
        )
    unknown = set(obj) - {"transcript", "instances"}
    if unknown:
        raise ProofFormatError(f"submission has unknown fields {sorted(unknown)}")
    return Proof.from_json(obj)


def _instances_to_floats(proof: Proof, expected: int, scale: int) -> list[float]:
    if len(proof.instances) != 1 or len(proof.instances[0]) != expected:
        shape = [len(r) for r in proof.instances]
        raise ProofFormatError(f"expected one instance column of {expected} values, got {shape}")
    return [felt_to_int(f) / float(2**scale) for f in proof.instances[0]]


class _BaseVerifier:
    def __init__(self, artifacts: CircuitArtifacts, backend: ProvingBackend | None = None) -> None:
        self._arts = artifacts
        self._backend = backend or EzklBackend()
        self._scale = int(artifacts.settings_dict["run_args"]["input_scale"])
        self._out_scale = artifacts.output_scale

    def commit(self, values: Any) -> str:
        """Commitment (with this circuit's vk/settings/SRS) of a tensor of floats or felts."""
        if isinstance(values, list) and values and isinstance(values[0], str):
            fs = values
        else:
            fs = felts(values, self._scale)
        return self._backend.commit(fs, self._arts.vk, self._arts.settings, self._arts.srs.path)

    def _check_proof(
        self,
        submission: Proof | dict[str, Any],
        request_id: str,
        expected: Sequence[str],
        n_outputs: int,
        replay: ReplayGuard,
    ) -> tuple[Verdict | None, Proof, list[float]]:
        try:
            proof = submission if isinstance(submission, Proof) else parse_submission(submission)
        except ProofFormatError as exc:
            return Verdict(False, Reason.MALFORMED, str(exc)), Proof(b"", ()), []
        digest = proof.digest()
        if replay.proof_used(digest):
            return Verdict(False, Reason.REPLAYED_PROOF, "proof already accepted", digest), proof, []
        if replay.request_used(request_id):
            return (
                Verdict(False, Reason.REPLAYED_REQUEST, f"request {request_id} already settled", digest),
                proof,
                [],
            )
        try:
            values = _instances_to_floats(proof, n_outputs, self._out_scale)
        except (ProofFormatError, FixedPointError, ValueError) as exc:
            return Verdict(False, Reason.MALFORMED, str(exc), digest), proof, []
        ok = self._backend.verify(proof, self._arts.settings, self._arts.vk, self._arts.srs.path, expected)
        if not ok:
            return (
                Verdict(
                    False,
                    Reason.BINDING_OR_INVALID,
                    "proof does not verify against expected commitments",
                    digest,
                ),
                proof,
                values,
            )
        return None, proof, values


class GroupObsVerifier(_BaseVerifier):
    """Verifies Group-OBS batch proofs for one circuit shape (n_blocks, B, m)."""

    def __init__(
        self,
        artifacts: CircuitArtifacts,
        *,
        n_blocks: int,
        n_blind: int,
        tolerance: GroupObsTolerance,
        backend: ProvingBackend | None = None,
    ) -> None:
        super().__init__(artifacts, backend)
        self.n_blocks = n_blocks
        self.n_blind = n_blind
        self.tolerance = tolerance

    def mask_commitment(self, mask: Any, request_digest: bytes) -> str:
        """The provider's own commitment to the mask it issued, bound to the request digest."""
        return self.commit(group_obs_mask_rows(mask, request_digest, self.n_blind, self._scale))

    def verify(
        self,
        submission: Proof | dict[str, Any],
        *,
        request_id: str,
        enrolled_theta: str,
        enrolled_g: str,
        mask_commitment: str,
        claimed_theta_after: str,
        replay: ReplayGuard,
    ) -> Verdict:
        expected = [enrolled_theta, claimed_theta_after, enrolled_g, mask_commitment]
        early, proof, values = self._check_proof(submission, request_id, expected, 3 * self.n_blocks, replay)
        if early is not None:
            return early
        digest = proof.digest()
        rows = tuple(tuple(values[3 * i : 3 * i + 3]) for i in range(self.n_blocks))
        tol = self.tolerance
        for i, (r_mask, r_kkt, r_row) in enumerate(rows):
            if r_mask != 0.0:
                return Verdict(
                    False, Reason.MASK_NOT_ZERO, f"block {i}: max|r_mask| = {r_mask:.3g}", digest, rows
                )
            if r_kkt > tol.kkt:
                return Verdict(
                    False, Reason.KKT_VIOLATED, f"block {i}: {r_kkt:.3g} > {tol.kkt:.3g}", digest, rows
                )
            if r_row > tol.row:
                return Verdict(
                    False, Reason.ROW_SPACE_VIOLATED, f"block {i}: {r_row:.3g} > {tol.row:.3g}", digest, rows
                )
        return Verdict(True, Reason.OK, "", digest, rows)


class AnalyticVerifier(_BaseVerifier):
    """Verifies analytic-head unlearning proofs for one shape (d, k, n_u)."""

    def __init__(
        self,
        artifacts: CircuitArtifacts,
        *,
        d: int,
        tolerance: tuple[float, float],
        backend: ProvingBackend | None = None,
    ) -> None:
        super().__init__(artifacts, backend)
        self.d = d
        self.tolerance = tolerance

    def verify(
        self,
        submission: Proof | dict[str, Any],
        *,
        request_id: str,
        enrolled_r: str,
        claimed_r_after: str,
        enrolled_w: str,
        claimed_w_after: str,
        forget_x: str,
        forget_y: str,
        replay: ReplayGuard,
    ) -> Verdict:
        expected = [enrolled_r, claimed_r_after, enrolled_w, claimed_w_after, forget_x, forget_y]
        early, proof, values = self._check_proof(submission, request_id, expected, 2 * self.d, replay)
        if early is not None:
            return early
        digest = proof.digest()
        rows = tuple(tuple(values[2 * i : 2 * i + 2]) for i in range(self.d))
        tol_w, tol_r = self.tolerance
        for i, (r_w, r_r) in enumerate(rows):
            if r_w > tol_w:
                return Verdict(
                    False, Reason.ANALYTIC_W_WRONG, f"row {i}: {r_w:.3g} > {tol_w:.3g}", digest, rows
                )
            if r_r > tol_r:
                return Verdict(
                    False, Reason.ANALYTIC_R_WRONG, f"row {i}: {r_r:.3g} > {tol_r:.3g}", digest, rows
                )
        return Verdict(True, Reason.OK, "", digest, rows)


class RefitVerifier(_BaseVerifier):
    """Verifies output-refit proofs (``circuits.output_refit``) for one layer pair's shape.

    The proof's ``theta`` / ``theta'`` inputs are swapped for the *Group-OBS* commitments of the
    masked layer (the enrolled ``theta`` batches and the ``theta'`` batches the Group-OBS proofs were
    accepted with; untouched batches keep their ``theta``), so the refit is bound to the proven
    Group-OBS output, not to weights of the client's choosing. That works because the refit circuit
    is built with the same logrows and SRS as the Group-OBS circuit (``CircuitConfig.min_logrows``).
    """

    def __init__(
        self,
        artifacts: CircuitArtifacts,
        *,
        n_batches: int,
        tolerance: float,
        backend: ProvingBackend | None = None,
    ) -> None:
        super().__init__(artifacts, backend)
        if n_batches < 1 or not tolerance > 0:
            raise ValueError(f"n_batches must be >= 1 and tolerance positive (got {n_batches}, {tolerance})")
        self.n_batches = n_batches
        self.tolerance = tolerance

    def verify(
        self,
        submission: Proof | dict[str, Any],
        *,
        request_id: str,
        enrolled_z: str,
        enrolled_theta: Sequence[str],
        enrolled_b1: str,
        theta_after: Sequence[str],
        enrolled_v: str,
        claimed_v_after: str,
        replay: ReplayGuard,
    ) -> Verdict:
        if len(enrolled_theta) != self.n_batches or len(theta_after) != self.n_batches:
            return Verdict(
                False,
                Reason.MALFORMED,
                f"expected {self.n_batches} theta and theta' commitments, got "
                f"{len(enrolled_theta)} and {len(theta_after)}",
            )
        expected = [enrolled_z, *enrolled_theta, enrolled_b1, *theta_after, enrolled_v, claimed_v_after]
        early, proof, values = self._check_proof(submission, request_id, expected, 1, replay)
        if early is not None:
            return early
        digest = proof.digest()
        rows = (tuple(values),)
        if values[0] > self.tolerance:
            return Verdict(
                False,
                Reason.REFIT_NOT_SOLUTION,
                f"max|normal-equation residual| = {values[0]:.3g} > {self.tolerance:.3g}",
                digest,
                rows,
            )
        return Verdict(True, Reason.OK, "", digest, rows)
