"""The exact Group-OBS path end to end with real proofs: the SDK enrolls (with enrollment proofs) and
answers two successive deletions; the provider's functions judge each step with its own keys, and the
auditor's rebuild of the published circuits agrees."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from zkunlearn.circuits.mask import LayerMask, Mask
from zkunlearn.client.sdk import VerifiedRequest
from zkunlearn.client.unlearning import ProveOptions, UnlearningError, enrollment_factors
from zkunlearn.client.unlearning_exact import ExactGroupObsUnlearner, certified_weights
from zkunlearn.proofs.deletion import (
    UPDATE_KIND_GROUP_OBS_EXACT,
    DeletionCircuits,
    verify_deletion,
)
from zkunlearn.proofs.exact_deletion import verify_exact_enrollment
from zkunlearn.proofs.published import check_published_circuits
from zkunlearn.proofs.verify_pool import PooledEzklBackend, VerifierPool

pytestmark = pytest.mark.ezkl

LAYER = "fc1.weight"
OPTIONS = ProveOptions(workers=2, memory_limit_mb=2048, progress=False)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(torch.relu(self.fc1(x)))
        return out


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(48, 8, generator=gen), torch.randint(0, 3, (48,), generator=gen)


def _unlearner(
    published: DeletionCircuits, state: Path, model: nn.Module | None = None
) -> ExactGroupObsUnlearner:
    assert published.exact is not None
    spec, deletion, enrollment = published.exact
    return ExactGroupObsUnlearner(
        model or Tiny(), spec, deletion.as_client(), enrollment.as_client(), state, OPTIONS
    )


def _request(request_id: str, blocks: dict[int, tuple[int, ...]], before: Any) -> VerifiedRequest:
    mask = Mask((LayerMask(LAYER, (8, 8), 16, blocks),))
    return VerifiedRequest(
        request_id, "c", "m", UPDATE_KIND_GROUP_OBS_EXACT, (LAYER,), mask, mask.to_bytes(), None, None,
        0, 2**62, 1, tuple(before), {}, request_id.encode(), b"sig",
    )  # fmt: skip


def _judge(published: DeletionCircuits, request: VerifiedRequest, after: Any, proofs: Any, norms: Any) -> Any:
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


def test_enroll_then_two_deletions_are_accepted_and_cheats_refused(
    exact_published: DeletionCircuits, tmp_path: Path
) -> None:
    _spec, verifier = exact_published.exact_verifier()
    x, y = _data()
    model = Tiny()
    before = model.fc1.weight.detach().double().numpy().reshape(-1).copy()
    unlearner = _unlearner(exact_published, tmp_path / "state", model)
    enrollment = unlearner.enroll([LAYER], x, y, nn.functional.cross_entropy)
    assert len(enrollment.proofs) == 2  # 64 weights = 2 batches of 2 blocks of 16

    enrolled = verify_exact_enrollment(
        verifier,
        layers=[LAYER],
        commitments=enrollment.commitments,
        proofs=enrollment.proofs,
        layer_blocks={LAYER: 4},
    )
    assert enrolled.ok, enrolled.reason
    # The provider's own check of the layer's size, and of proofs matching commitments.
    short = verify_exact_enrollment(
        verifier, layers=[LAYER], commitments=enrollment.commitments, proofs=enrollment.proofs[:1]
    )
    assert not short.ok
    assert not verify_exact_enrollment(
        verifier,
        layers=[LAYER],
        commitments=enrollment.commitments,
        proofs=enrollment.proofs,
        layer_blocks={LAYER: 6},
    ).ok

    first = _request("r1", {0: (1, 2, 3), 3: (0,)}, enrollment.commitments)
    update = unlearner.prove(first)
    verdict = _judge(exact_published, first, update.after_commitments, update.proofs, enrolled.norms)
    assert verdict.ok, verdict.reason
    weights = model.fc1.weight.detach().numpy().reshape(-1)
    assert np.all(weights[[1, 2, 3, 48]] == 0.0)
    # What the benchmark evaluates as "certified" is exactly what was proven (float32 in the model).
    spec = unlearner.spec
    factors = enrollment_factors(
        Tiny(), spec, [LAYER], x, y, nn.functional.cross_entropy, None, "ggn", 0.0, 0
    )
    expected = certified_weights(spec, before, factors[LAYER].factors, first.mask.layer(LAYER))
    np.testing.assert_array_equal(weights, expected.astype(np.float32))

    # The same proofs cannot stand for a deletion of other weights.
    other = _request("r1", {0: (4, 5)}, enrollment.commitments)
    assert not _judge(exact_published, other, update.after_commitments, update.proofs[:1], enrolled.norms).ok

    # The second deletion is checked against the state the first one left.
    second = _request("r2", {1: (7,)}, update.after_commitments)
    update2 = unlearner.prove(second)
    verdict2 = _judge(exact_published, second, update2.after_commitments, update2.proofs, enrolled.norms)
    assert verdict2.ok, verdict2.reason
    # A replay of the first answer against the current state is refused: its proofs bind the old theta.
    stale = replace(second, before_commitments=tuple(update2.after_commitments))
    assert not _judge(exact_published, stale, update.after_commitments, update.proofs, enrolled.norms).ok


def test_a_client_that_proves_from_another_model_is_refused(
    exact_published: DeletionCircuits, tmp_path: Path
) -> None:
    """It enrolled one model and deletes from another: the provider swaps in the enrolled theta."""
    _spec, verifier = exact_published.exact_verifier()
    x, y = _data()
    honest = _unlearner(exact_published, tmp_path / "honest")
    enrollment = honest.enroll([LAYER], x, y, nn.functional.cross_entropy)
    enrolled = verify_exact_enrollment(
        verifier, layers=[LAYER], commitments=enrollment.commitments, proofs=enrollment.proofs
    )
    assert enrolled.ok
    other_model = Tiny()
    with torch.no_grad():
        other_model.fc1.weight.mul_(1.5)
    cheat = _unlearner(exact_published, tmp_path / "cheat", other_model)
    cheat.enroll([LAYER], x, y, nn.functional.cross_entropy)
    request = _request("r1", {0: (1,)}, ())
    update = cheat.prove(request)
    judged = replace(request, before_commitments=tuple(enrollment.commitments))
    verdict = _judge(exact_published, judged, update.after_commitments, update.proofs, enrolled.norms)
    assert not verdict.ok


def test_no_enrollment_record_means_no_acceptance(exact_published: DeletionCircuits, tmp_path: Path) -> None:
    request = _request("r1", {0: (1,)}, ())
    assert "no accepted enrollment" in _judge(exact_published, request, (), [], None).reason


def test_enrolling_twice_is_refused(exact_published: DeletionCircuits, tmp_path: Path) -> None:
    x, y = _data()
    unlearner = _unlearner(exact_published, tmp_path / "state")
    unlearner.enroll([LAYER], x, y, nn.functional.cross_entropy)
    with pytest.raises(UnlearningError, match="already holds a committed enrollment"):
        unlearner.enroll([LAYER], x, y, nn.functional.cross_entropy)


def test_the_auditor_rebuilds_the_published_exact_circuits(exact_published: DeletionCircuits) -> None:
    note = check_published_circuits(exact_published.directory)
    assert "group_obs_exact" in note
    assert "group_obs_exact enrollment" in note
    reloaded = DeletionCircuits.load(exact_published.directory)
    assert reloaded.exact is not None
    assert exact_published.exact is not None
    assert reloaded.exact[0] == exact_published.exact[0]


def test_verification_on_a_process_pool_judges_as_in_process(
    exact_published: DeletionCircuits, tmp_path: Path
) -> None:
    """The provider's pooled verifier (ezkl in worker processes, batches checked concurrently) accepts
    the honest enrollment and deletion and refuses a tampered proof with the same reason as in-process."""
    x, y = _data()
    unlearner = _unlearner(exact_published, tmp_path / "state")
    enrollment = unlearner.enroll([LAYER], x, y, nn.functional.cross_entropy)
    request = _request("r1", {0: (1, 2), 2: (5,)}, enrollment.commitments)  # both batches: 2 proofs
    update = unlearner.prove(request)
    assert len(update.proofs) == 2
    flipped = bytearray(update.proofs[1])
    flipped[200] ^= 0x01
    tampered = [update.proofs[0], bytes(flipped)]
    with VerifierPool(2) as pool:
        pooled = exact_published.with_backend(PooledEzklBackend(pool))
        for circuits in (exact_published, pooled):
            _spec, verifier = circuits.exact_verifier()
            enrolled = verify_exact_enrollment(
                verifier, layers=[LAYER], commitments=enrollment.commitments, proofs=enrollment.proofs
            )
            assert enrolled.ok, enrolled.reason
            honest = _judge(circuits, request, update.after_commitments, update.proofs, enrolled.norms)
            assert honest.ok, honest.reason
            refused = _judge(circuits, request, update.after_commitments, tampered, enrolled.norms)
            assert not refused.ok
            assert refused.reason.startswith(f"{LAYER} batch 1: proof_invalid_for_expected"), refused.reason
        assert pooled.exact_verifier()[1].concurrency == 2
        assert len({w.proc.pid for w in pool._started}) == 2  # both processes did work
