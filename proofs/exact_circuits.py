"""The exact Group-OBS circuits: building them, and verifying their proofs on the provider's side.

Both circuits (deletion and enrollment, :mod:`zkunlearn.circuits.group_obs_exact`) run at scale 0 with
ezkl's input range checks off (each relation checks what it reads itself) and share one logrows and
SRS: a commitment depends on the domain size, and both read the same ``G`` commitment. The enrollment
circuit decomposes each entry of ``G`` into one limb of base ``2**g_range_bits`` and takes the fewest
columns (2, 4 or 8) that fit the deletion circuit's domain; neither changes a commitment.

Enrollment proofs are checked once per (layer, batch) over the enrolled ``G`` commitment; they yield
each block's proven ``||G_q||_F^2``, which the provider keeps and every later deletion proof of that
batch is judged with. Deletion proofs are bound to the provider's own commitments exactly as in
:mod:`zkunlearn.proofs.verifier`, then their exact public outputs are held to ``sum mask |Theta'| == 0``,
``Theta`` in range and the per-block thresholds of :meth:`ExactGroupObsSpec.thresholds`.

Padding blocks (the zero blocks that complete a layer's last batch, :mod:`zkunlearn.proofs.layout`)
must show ``||G_q||_F^2 = 0`` at enrollment and all four deletion outputs exactly 0: their ``G`` is
zero, their ``theta`` never changes and their witness ``w`` is zero (``docs/decisions/padded-batches.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy.typing as npt
from zkunlearn.circuits import group_obs_exact as relation
from zkunlearn.circuits.export import export_relation
from zkunlearn.proofs.artifacts import CircuitArtifacts, build_provider_artifacts, required_logrows
from zkunlearn.proofs.backend import CircuitConfig, EzklBackend, Proof, ProvingBackend
from zkunlearn.proofs.exact import ExactGroupObsSpec, ExactThresholds, mask_tensor, signed_outputs
from zkunlearn.proofs.layout import LayerLayout
from zkunlearn.proofs.srs import SrsInfo
from zkunlearn.proofs.verifier import InMemoryReplayGuard, Reason, ReplayGuard, Verdict, _BaseVerifier

EXACT_CONFIG = CircuitConfig(
    input_scale=0,
    scale_rebase_multiplier=1,
    decomp_base=1024,
    decomp_legs=3,
    num_inner_cols=2,
    ignore_range_check_io=True,
    max_logrows=20,
)
"""ezkl run arguments of the exact deletion circuit (the enrollment circuit's: :func:`enrollment_config`)."""

ENROLLMENT_INNER_COLS = (2, 4, 8)
"""Column counts the enrollment circuit may take, fewest first."""

DELETION_OUTPUTS = 4
"""Public outputs per block of a deletion proof (``GroupObsExactCheck``)."""


def enrollment_config(spec: ExactGroupObsSpec, config: CircuitConfig, inner_cols: int) -> CircuitConfig:
    """The enrollment circuit's run arguments: one limb of base ``2**g_range_bits`` bounds each entry."""
    return replace(config, decomp_base=1 << spec.g_range_bits, decomp_legs=1, num_inner_cols=inner_cols)


def export_exact(spec: ExactGroupObsSpec, directory: Path) -> tuple[Path, Path]:
    """The ONNX of both relations a published spec defines (deletion, enrollment)."""
    deletion, enrollment = spec.relation(), spec.enrollment_relation()
    return (
        export_relation(
            deletion,
            deletion.example_inputs(spec.batch),
            directory / "group_obs_exact.onnx",
            relation.INPUT_NAMES,
            relation.OUTPUT_NAMES,
            rtol=1e-5,
        ),
        export_relation(
            enrollment,
            enrollment.example_inputs(spec.batch),
            directory / "group_obs_enrollment.onnx",
            relation.ENROLLMENT_INPUT_NAMES,
            relation.OUTPUT_NAMES,
            rtol=1e-5,
        ),
    )


def build_exact_circuits(
    spec: ExactGroupObsSpec,
    directory: Path,
    srs_for: Callable[[int], SrsInfo],
    config: CircuitConfig = EXACT_CONFIG,
) -> tuple[CircuitArtifacts, CircuitArtifacts]:
    """Compile and set up the deletion and enrollment circuits with one common logrows.

    The deletion circuit fixes the domain; the enrollment circuit takes the fewest columns that fit it
    (with 8 columns it may raise the common logrows instead)."""
    staging = Path(directory) / "staging-exact"
    deletion_onnx, enrollment_onnx = export_exact(spec, staging)
    common = max(required_logrows(deletion_onnx, config, staging), config.min_logrows)
    for cols in ENROLLMENT_INNER_COLS:
        enroll_config = enrollment_config(spec, config, cols)
        needed = required_logrows(enrollment_onnx, enroll_config, staging)
        if needed <= common:
            break
    common = max(common, needed)
    deletion = build_provider_artifacts(
        deletion_onnx, directory, srs_for, replace(config, min_logrows=common)
    )
    enrollment = build_provider_artifacts(
        enrollment_onnx, directory, srs_for, replace(enroll_config, min_logrows=common)
    )
    return deletion, enrollment


@dataclass(frozen=True)
class EnrollmentVerdict:
    """An enrollment proof's verdict and, when accepted, each block's proven ``||G_q||_F^2``."""

    ok: bool
    reason: Reason
    detail: str = ""
    g_fro_sq: tuple[int, ...] = ()


class ExactGroupObsVerifier:
    """Verifies exact Group-OBS enrollment and deletion proofs of one spec with the provider's own keys.

    ``deletion`` and ``enrollment`` must share logrows and SRS: both read the same ``G`` commitment, and
    a commitment depends on the circuit's domain size.
    """

    def __init__(
        self,
        spec: ExactGroupObsSpec,
        deletion: CircuitArtifacts,
        enrollment: CircuitArtifacts,
        backend: ProvingBackend | None = None,
    ) -> None:
        if deletion.logrows != enrollment.logrows:
            raise ValueError(
                f"deletion logrows {deletion.logrows} != enrollment logrows {enrollment.logrows}: "
                "their commitments to G would differ"
            )
        self.spec = spec
        self.circuit_keys = (deletion.key, enrollment.key)
        self._deletion = _BaseVerifier(deletion, backend)
        self._enrollment = _BaseVerifier(enrollment, backend)
        self.concurrency = (backend or EzklBackend()).concurrency
        """How many proofs this verifier can check at once (its backend's)."""

    def commit(self, felts: list[str]) -> str:
        return self._deletion.commit(felts)

    def mask_commitment(self, mask: npt.ArrayLike, request_digest: bytes) -> str:
        """The provider's own commitment to the mask it issued, bound to the request digest."""
        return self.commit(mask_tensor(mask, request_digest, self.spec.n_blind))

    def verify_enrollment(self, submission: Proof | dict[str, Any], *, g_commit: str) -> EnrollmentVerdict:
        """Check one batch's enrollment proof over the enrolled ``G`` commitment. A block may show
        ``||G_q||_F^2 = 0`` only as padding, which the layer's check decides (:meth:`check_layer`)."""
        n = self.spec.batch
        # Enrollment proofs carry no request: the replay guard is the identity of the commitment.
        early, proof, _ = self._enrollment._check_proof(
            submission, "enrollment", [g_commit], n, InMemoryReplayGuard()
        )
        if early is not None:
            return EnrollmentVerdict(False, early.reason, early.detail)
        g_fro = signed_outputs(proof.instances[0])
        for i, g in enumerate(g_fro):
            if g < 0:
                return EnrollmentVerdict(False, Reason.OUTPUT_OUT_OF_RANGE, f"block {i}: ||G||_F^2 = {g}")
        return EnrollmentVerdict(True, Reason.OK, "", tuple(g_fro))

    def check_layer(self, layer: LayerLayout, g_fro_sq: Sequence[Sequence[int]]) -> EnrollmentVerdict:
        """A whole layer's proven norms, batch by batch, against its layout: every block that holds
        weights has ``||G_q||_F^2 > 0``, every padding block exactly 0 (its ``G`` is zero), and the
        weight-carrying blocks give ``G`` unit mean diagonal (:meth:`check_normalisation`)."""
        if len(g_fro_sq) != layer.batches:
            return EnrollmentVerdict(
                False, Reason.MALFORMED, f"{len(g_fro_sq)} batches enrolled, the layout has {layer.batches}"
            )
        flat = [int(v) for batch in g_fro_sq for v in batch]
        for i, value in enumerate(flat):
            padding = i >= layer.blocks
            if (value != 0) if padding else (value <= 0):
                what = "padding block, must be 0" if padding else "a block of weights, must be > 0"
                return EnrollmentVerdict(
                    False,
                    Reason.PADDING_NOT_ZERO if padding else Reason.OUTPUT_OUT_OF_RANGE,
                    f"batch {i // layer.batch} block {i % layer.batch}: ||G||_F^2 = {value} ({what})",
                )
        return self.check_normalisation(flat[: layer.blocks])

    def check_normalisation(self, g_fro_sq: Sequence[int]) -> EnrollmentVerdict:
        """A whole layer's blocks: ``sum ||G_q||_F^2`` must give ``G`` unit mean diagonal."""
        lo, hi = self.spec.normalisation_range(len(g_fro_sq))
        total = sum(int(v) for v in g_fro_sq)
        if not lo <= total <= hi:
            return EnrollmentVerdict(
                False,
                Reason.ENROLLMENT_G_NOT_NORMALISED,
                f"sum ||G||_F^2 = {total} outside [{lo}, {hi}] (unit mean diagonal)",
            )
        return EnrollmentVerdict(True, Reason.OK, "", tuple(int(v) for v in g_fro_sq))

    def verify(
        self,
        submission: Proof | dict[str, Any],
        *,
        request_id: str,
        enrolled_theta: str,
        enrolled_g: str,
        mask_commitment: str,
        claimed_theta_after: str,
        g_fro_sq: Sequence[int],
        replay: ReplayGuard,
        padding: int = 0,
    ) -> Verdict:
        """One batch's deletion proof; ``g_fro_sq`` are its blocks' values from the enrollment proof and
        its last ``padding`` blocks are padding: enrolled with ``||G_q||_F^2 = 0`` and held to outputs of
        exactly 0 (``theta`` unchanged, ``w`` zero), where a block of weights gets its rounding thresholds."""
        n = self.spec.batch
        if len(g_fro_sq) != n:
            return Verdict(
                False, Reason.MALFORMED, f"expected {n} enrolled ||G||_F^2 values, got {len(g_fro_sq)}"
            )
        if not 0 <= padding < n:
            return Verdict(False, Reason.MALFORMED, f"padding {padding} must lie in [0, {n})")
        for i, g in enumerate(g_fro_sq):
            if (int(g) != 0) if i >= n - padding else (int(g) <= 0):
                return Verdict(
                    False,
                    Reason.PADDING_NOT_ZERO if i >= n - padding else Reason.OUTPUT_OUT_OF_RANGE,
                    f"block {i}: enrolled ||G||_F^2 = {g} does not fit {padding} padding blocks",
                )
        expected = [enrolled_theta, claimed_theta_after, enrolled_g, mask_commitment]
        k = DELETION_OUTPUTS
        early, proof, _ = self._deletion._check_proof(submission, request_id, expected, k * n, replay)
        if early is not None:
            return early
        digest = proof.digest()
        values = signed_outputs(proof.instances[0])
        rows = tuple(tuple(float(v) for v in values[k * i : k * i + k]) for i in range(n))
        for i in range(n):
            kept, s_w, s_row, below = values[k * i : k * i + k]
            limit = ExactThresholds(0, 0) if i >= n - padding else self.spec.thresholds(int(g_fro_sq[i]))
            if min(kept, s_w, s_row, below) < 0:
                return Verdict(False, Reason.OUTPUT_OUT_OF_RANGE, f"block {i}: negative output", digest, rows)
            if below != 0:
                return Verdict(
                    False,
                    Reason.THETA_OUT_OF_RANGE,
                    f"block {i}: a committed weight lies below -{self.spec.theta_bound} (normalised)",
                    digest,
                    rows,
                )
            if kept != 0:
                return Verdict(
                    False, Reason.MASK_NOT_ZERO, f"block {i}: sum mask |theta'| = {kept}", digest, rows
                )
            if i >= n - padding and (s_w or s_row):
                return Verdict(
                    False,
                    Reason.PADDING_NOT_ZERO,
                    f"block {i} (padding): sum R_w^2 = {s_w}, sum R_row^2 = {s_row}; theta' must equal theta "
                    "and w be 0",
                    digest,
                    rows,
                )
            if s_w > limit.w:
                return Verdict(False, Reason.KKT_VIOLATED, f"block {i}: {s_w} > {limit.w}", digest, rows)
            if s_row > limit.row:
                return Verdict(
                    False, Reason.ROW_SPACE_VIOLATED, f"block {i}: {s_row} > {limit.row}", digest, rows
                )
        return Verdict(True, Reason.OK, "", digest, rows)
