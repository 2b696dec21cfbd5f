"""Real proofs over padded batches (B 16, m 8, 2 blocks per proof): a layer of 3 blocks enrolls in 2
batches, the second ending in one padding block that maps to no weight.

The verifier demands of a padding block ``||G||_F^2 = 0`` at enrollment and deletion outputs of exactly 0
(``theta'`` = ``theta``, ``w`` = 0); the provider's mask is 0 there. Each attack -- a padding ``G`` that
carries the factor's norm, a one-step ``theta'`` or ``w`` on padding that a block of weights' rounding
thresholds would let through, a mask that marks padding -- runs beside the honest control.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from zkunlearn.circuits.mask import LayerMask, Mask
from zkunlearn.client.group_obs_exact import exact_update
from zkunlearn.client.sdk import VerifiedRequest
from zkunlearn.client.unlearning import ProveOptions
from zkunlearn.client.unlearning_exact import ExactGroupObsUnlearner
from zkunlearn.proofs.artifacts import CircuitArtifacts, ClientCircuit
from zkunlearn.proofs.deletion import UPDATE_KIND_GROUP_OBS_EXACT, DeletionCircuits, verify_deletion
from zkunlearn.proofs.exact import (
    IntArray,
    field_blinding,
    g_fro_sq,
    g_tensor,
    mask_tensor,
    quantise_exact,
    theta_tensor,
)
from zkunlearn.proofs.exact_circuits import ExactGroupObsVerifier
from zkunlearn.proofs.exact_deletion import verify_exact_enrollment
from zkunlearn.proofs.layout import LayerLayout
from zkunlearn.proofs.prover import ProveJob, run_job
from zkunlearn.proofs.verifier import InMemoryReplayGuard, Reason

from tests.exact_cases import make_batch

pytestmark = pytest.mark.ezkl

LAYER = "fc1.weight"
REQUEST = hashlib.sha256(b"padding-request").digest()


class Tiny3(nn.Module):
    """fc1: 48 weights = 3 blocks of 16, so 2 batches of 2 blocks with one padding block."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(8, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(torch.relu(self.fc1(x)))
        return out


def _client(arts: CircuitArtifacts) -> ClientCircuit:
    return ClientCircuit(arts.compiled, arts.settings, arts.vk, arts.pk, arts.srs)


def _request(request_id: str, shape: tuple[int, int], blocks: dict[int, tuple[int, ...]], before: Any) -> Any:
    mask = Mask((LayerMask(LAYER, shape, 16, blocks),))
    return VerifiedRequest(
        request_id, "c", "m", UPDATE_KIND_GROUP_OBS_EXACT, (LAYER,), mask, mask.to_bytes(), None, None,
        0, 2**62, 1, tuple(before), {}, request_id.encode(), b"sig",
    )  # fmt: skip


def _judge(published: DeletionCircuits, request: Any, after: Any, proofs: Any, norms: Any) -> Any:
    return verify_deletion(
        published,
        update_kind=UPDATE_KIND_GROUP_OBS_EXACT,
        request_id=request.request_id,
        request_canonical=request.canonical,
        mask_bytes=request.mask_bytes,
        forget_features=None,
        forget_labels=None,
        before=request.before_commitments,
        after=after,
        proofs=proofs,
        enrolled_norms=norms,
    )


def test_a_layer_with_a_padded_batch_enrolls_deletes_and_verifies(
    exact_published: DeletionCircuits, tmp_path: Path
) -> None:
    assert exact_published.exact is not None
    spec, deletion, enrollment_arts = exact_published.exact
    _spec, verifier = exact_published.exact_verifier()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(48, 8, generator=gen), torch.randint(0, 3, (48,), generator=gen)
    model = Tiny3()
    options = ProveOptions(workers=2, memory_limit_mb=2048, progress=False)
    unlearner = ExactGroupObsUnlearner(
        model, spec, _client(deletion), _client(enrollment_arts), tmp_path / "state", options
    )
    enrollment = unlearner.enroll([LAYER], x, y, nn.functional.cross_entropy)
    assert len(enrollment.proofs) == 2
    enrolled = verify_exact_enrollment(
        verifier, layers=[LAYER], commitments=enrollment.commitments, proofs=enrollment.proofs,
        layer_blocks={LAYER: 3},
    )  # fmt: skip
    assert enrolled.ok, enrolled.reason
    assert enrolled.norms[(LAYER, 1)][1] == 0  # the padding block's proven G is zero
    assert min(enrolled.norms[(LAYER, 0)] + enrolled.norms[(LAYER, 1)][:1]) > 0
    wrong_size = verify_exact_enrollment(
        verifier, layers=[LAYER], commitments=enrollment.commitments, proofs=enrollment.proofs,
        layer_blocks={LAYER: 4},
    )  # fmt: skip
    assert "3 blocks of weights enrolled, the model's layer has 4" in wrong_size.reason

    request = _request("r1", (6, 8), {0: (1, 2), 2: (0, 7)}, enrollment.commitments)  # both batches
    update = unlearner.prove(request)
    assert len(update.proofs) == 2
    verdict = _judge(exact_published, request, update.after_commitments, update.proofs, enrolled.norms)
    assert verdict.ok, verdict.reason
    weights = model.fc1.weight.detach().numpy().reshape(-1)
    assert model.fc1.weight.shape == (6, 8)
    assert np.all(weights[[1, 2, 32, 39]] == 0.0)
    # The same proofs judged for a mask over a 4-block layer of the same name: the enrolled layout
    # (3 blocks, one of padding) is not that layer's.
    other = _request("r1", (8, 8), {0: (1, 2), 2: (0, 7)}, enrollment.commitments)
    refused = _judge(exact_published, other, update.after_commitments, update.proofs, enrolled.norms)
    assert "enrolled with 3 blocks of weights, the mask's layer has 4" in refused.reason


# -- attacks on one padded batch: block 0 holds weights, block 1 is padding -----------------------


def _blind(rows: int, width: int) -> list[list[int]]:
    return [field_blinding(width) for _ in range(rows)]


def _prove(arts: CircuitArtifacts, inputs: list[list[str]]) -> Any:
    return run_job(ProveJob(inputs, arts.compiled, arts.vk, arts.pk, arts.srs.path))


@pytest.fixture(scope="module")
def padded(exact_published: DeletionCircuits) -> dict[str, Any]:
    """One committed batch of a 1-block layer: block 0 with unit-mean-diagonal G, block 1 padding."""
    assert exact_published.exact is not None
    spec, deletion, enrollment = exact_published.exact
    base = make_batch(spec, 5)
    g0 = np.asarray(base.g[0], dtype=np.float64) / 2.0**spec.g_bits
    g0 *= np.sqrt(spec.m * spec.block / float(np.sum(g0 * g0)))
    g = np.zeros((2, spec.m, spec.block), dtype=object)
    g[0] = quantise_exact(g0, spec.g_bits)
    theta = np.zeros((2, spec.block), dtype=object)
    theta[0] = base.theta[0]
    mask = np.zeros((2, spec.block), dtype=bool)
    mask[0] = base.mask[0]
    verifier = ExactGroupObsVerifier(spec, deletion, enrollment)
    theta_blind, g_blind = _blind(2, spec.n_blind), _blind(2, spec.block)
    return {
        "spec": spec,
        "arts": (deletion, enrollment),
        "verifier": verifier,
        "theta": theta,
        "g": g,
        "mask": mask,
        "update": exact_update(spec, theta, g, mask),
        "theta_felts": theta_tensor(theta, theta_blind),
        "theta_commit": verifier.commit(theta_tensor(theta, theta_blind)),
        "g_blind": g_blind,
        "layout": LayerLayout("l", spec.block, spec.batch, 1),
    }


def _enroll_verdict(padded: dict[str, Any], g: IntArray) -> tuple[Any, Any]:
    verifier: ExactGroupObsVerifier = padded["verifier"]
    felts = g_tensor(g, padded["g_blind"])
    proof = _prove(padded["arts"][1], [felts]).proof
    verdict = verifier.verify_enrollment(proof, g_commit=verifier.commit(felts))
    return verdict, verifier.check_layer(padded["layout"], [verdict.g_fro_sq])


def test_a_padding_g_that_carries_the_factor_s_norm_is_refused_at_enrollment(padded: dict[str, Any]) -> None:
    """The attacker shrinks the real block's G (a loose relation there) and puts the missing norm on
    the padding block, so that the batch's total still looks normalised."""
    honest_proof, honest = _enroll_verdict(padded, padded["g"])
    assert honest_proof.ok, honest_proof
    assert honest.ok, honest
    assert honest_proof.g_fro_sq[1] == 0
    spec = padded["spec"]
    g = np.array(padded["g"], dtype=object)
    g[0] = np.vectorize(lambda v: int(v) // 8, otypes=[object])(g[0])
    g[1] = padded["g"][0]
    cheat_proof, cheat = _enroll_verdict(padded, g)
    assert cheat_proof.ok  # the proof is sound: it shows the padding's G is not zero
    assert cheat.reason is Reason.PADDING_NOT_ZERO, cheat
    # Judged as a whole 2-block layer instead, the shrunken block fails the normalisation.
    two_blocks = padded["verifier"].check_layer(
        LayerLayout("l", spec.block, spec.batch, 2), [cheat_proof.g_fro_sq]
    )
    assert two_blocks.reason is Reason.ENROLLMENT_G_NOT_NORMALISED
    # And a deletion proof of the batch is not judged against such norms at all.
    judged = padded["verifier"].verify(
        {}, request_id="r", enrolled_theta="", enrolled_g="", mask_commitment="", claimed_theta_after="",
        g_fro_sq=cheat_proof.g_fro_sq, replay=InMemoryReplayGuard(), padding=1,
    )  # fmt: skip
    assert judged.reason is Reason.PADDING_NOT_ZERO


def _delete_verdict(
    padded: dict[str, Any], theta_after: IntArray, w: IntArray, mask: np.ndarray | None = None
) -> Any:
    spec, verifier = padded["spec"], padded["verifier"]
    g_felts = g_tensor(padded["g"], padded["g_blind"])
    inputs = [
        padded["theta_felts"],
        theta_tensor(theta_after, _blind(2, spec.n_blind)),
        g_felts,
        mask_tensor(padded["mask"] if mask is None else mask, REQUEST, spec.n_blind),
        theta_tensor(w, _blind(2, spec.n_blind)),
    ]
    result = _prove(padded["arts"][0], inputs)
    return verifier.verify(
        result.proof,
        request_id="r",
        enrolled_theta=padded["theta_commit"],
        enrolled_g=verifier.commit(g_felts),
        mask_commitment=verifier.mask_commitment(padded["mask"], REQUEST),  # the provider's: 0 on padding
        claimed_theta_after=result.commitments[1],
        g_fro_sq=g_fro_sq(padded["g"]),
        replay=InMemoryReplayGuard(),
        padding=1,
    )


@pytest.mark.parametrize("cheat", ["honest", "theta_after", "w", "mask"])
def test_padding_stays_exactly_zero_in_deletion_proofs(padded: dict[str, Any], cheat: str) -> None:
    update = padded["update"]
    theta_after = np.array(update.theta_after, dtype=object)
    w = np.array(update.w, dtype=object)
    mask = None
    if cheat == "theta_after":  # one grid step: within a block of weights' thresholds at ||G|| = 0
        theta_after[1, 3] = 1
    elif cheat == "w":
        w[1, 0] = 1
    elif cheat == "mask":  # proven against a mask that also marks padding
        mask = np.array(padded["mask"])
        mask[1, :] = True
    verdict = _delete_verdict(padded, theta_after, w, mask)
    expected = {
        "honest": Reason.OK,
        "theta_after": Reason.PADDING_NOT_ZERO,
        "w": Reason.PADDING_NOT_ZERO,
        "mask": Reason.BINDING_OR_INVALID,
    }[cheat]
    assert verdict.reason is expected, verdict
