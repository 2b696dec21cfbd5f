"""Offline tasks: splits, rotation, models, training, metrics, and one small unlearning run end to end."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from zkunlearn.tasks import metrics
from zkunlearn.tasks.data import DataError, load_images, make_image_task, rotate
from zkunlearn.tasks.models import (
    MLP,
    CodeLM,
    CodeLMConfig,
    MLPConfig,
    ModelError,
    ViT,
    ViTConfig,
    get_linear,
)
from zkunlearn.tasks.train import TrainError, cross_entropy, fit, masked_copy

torch.set_num_threads(1)


def _ids(t: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in t.reshape(t.shape[0], -1)}


def test_image_splits_are_disjoint_deterministic_and_respect_variant() -> None:
    a = make_image_task(0, "disjoint")
    b = make_image_task(0, "disjoint")
    c = make_image_task(1, "disjoint")
    assert torch.equal(a.provider_train.x, b.provider_train.x)
    assert torch.equal(a.client_train.y, b.client_train.y)
    assert not torch.equal(a.provider_train.y, c.provider_train.y)
    provider = _ids(a.provider_train.x)
    assert not provider & _ids(a.provider_test.x)
    # Client images are rotated copies: rotating the provider's images the same way must hit none of them.
    turned = _ids(rotate(torch.cat([a.provider_train.x, a.provider_test.x]), 45.0))
    assert not turned & (_ids(a.client_test.x) | _ids(a.client_train.x))
    assert not _ids(a.client_test.x) & _ids(a.client_train.x)
    assert len(a.provider_train) + len(a.provider_test) + len(a.client_test) + len(a.client_train) <= 5000
    # The forget class is present on the provider side, absent from the disjoint client's training data.
    assert (a.provider_train.y == a.forget_class).sum() > 200
    assert (a.client_train.y == a.forget_class).sum() == 0
    assert (a.client_test.y == a.forget_class).sum() > 50
    overlap = make_image_task(0, "overlap")
    held = int((overlap.client_train.y == overlap.forget_class).sum())
    assert held > 10
    assert len(overlap.client_after_request) == len(overlap.client_train) - held
    # Same provider data across variants: the global model is shared by both.
    assert torch.equal(overlap.provider_train.x, a.provider_train.x)
    assert len(a.forget) + len(a.retain) == len(a.provider_train)


def test_bad_split_requests_are_refused() -> None:
    with pytest.raises(DataError, match="variant"):
        make_image_task(0, "sideways")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="forget_class"):
        make_image_task(0, forget_class=12)
    with pytest.raises(DataError, match="no client test"):
        make_image_task(0, n_provider_train=4900)


def test_rotation_turns_a_bar_and_round_trips() -> None:
    img = torch.zeros(1, 1, 28, 28)
    img[0, 0, 13:15, 4:24] = 1.0  # horizontal bar
    turned = rotate(img, 90.0)
    cols = turned[0, 0].sum(0)
    rows = turned[0, 0].sum(1)
    # A vertical bar now: mass concentrated in a couple of columns, spread over many rows.
    assert int((cols > 0.5).sum()) <= 4
    assert int((rows > 0.1).sum()) >= 15
    back = rotate(turned, -90.0)
    assert torch.allclose(back[0, 0, 6:22, 6:22], img[0, 0, 6:22, 6:22], atol=0.1)
    with pytest.raises(DataError, match="batch"):
        rotate(img[0], 45.0)


def test_client_images_are_rotated_versions_of_the_data() -> None:
    data = load_images("mnist")
    task = make_image_task(3)
    first = task.client_test.x[0]
    matches = [i for i in range(len(data)) if torch.allclose(rotate(data.x[i : i + 1], 45.0)[0], first)]
    assert len(matches) == 1
    assert int(data.y[matches[0]]) == int(task.client_test.y[0])


def test_models_forward_backward_and_masked_layer_sizes() -> None:
    x = torch.rand(5, 1, 28, 28)
    vit = ViT()
    assert sum(get_linear(vit, n).weight.numel() for n in vit.masked_layers) >= 64 * 1024
    assert ViTConfig().width >= 64
    assert ViTConfig().depth >= 4
    assert ViTConfig().mlp_ratio >= 4
    out = vit(x)
    assert out.shape == (5, 10)
    out.sum().backward()
    assert get_linear(vit, "blocks.0.fc1").weight.grad is not None
    mlp = MLP(MLPConfig())
    assert mlp(x).shape == (5, 10)
    assert mlp.features(x).shape == (5, 256)
    lm = CodeLM(CodeLMConfig(hidden=32, layers=2, heads=2, ffn=64, context=16))
    ids = torch.randint(0, 256, (3, 16))
    logits = lm(ids)
    assert logits.shape == (3, 16, 260)
    cross_entropy(logits, ids).backward()
    assert get_linear(lm, lm.masked_layers[0]).weight.grad is not None
    with pytest.raises(ModelError, match="multiple of patch"):
        ViT(ViTConfig(patch=5))
    with pytest.raises(ModelError, match=r"not nn\.Linear"):
        get_linear(vit, "blocks.0.norm1")


def test_training_reduces_loss_and_mask_stays_zero() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 1, 28, 28)
    y = (x.flatten(1)[:, :10].argmax(1)).long()
    model = MLP(MLPConfig(hidden=32))
    history = fit(model, x, y, epochs=8, lr=3e-3, batch_size=32)
    assert history[-1] < 0.7 * history[0]
    keep = torch.zeros_like(model.fc2.weight, dtype=torch.bool)
    keep[:, :5] = True
    masked = masked_copy(model, {"fc2.weight": keep})
    fit(masked, x, y, epochs=2, lr=3e-3, frozen_zero={"fc2.weight": keep})
    assert torch.all(masked.fc2.weight[keep] == 0)
    assert not torch.all(masked.fc2.weight[~keep] == model.fc2.weight[~keep])
    with pytest.raises(TrainError, match="unknown parameter"):
        fit(masked, x, y, epochs=1, frozen_zero={"nope.weight": keep})


def test_accuracy_and_recovery_rules() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    assert metrics.accuracy(logits, torch.tensor([0, 1, 1, 1])) == 0.75
    with pytest.raises(metrics.MetricError):
        metrics.accuracy(logits, torch.tensor([0, 1]))
    assert metrics.recovery(0.9, 0.5, 0.86) == pytest.approx(0.9)
    assert metrics.recovery(0.9, 0.5, 0.4) == pytest.approx(-0.25)
    assert metrics.recovery(0.9, 0.87, 0.9) is None  # the mask cost < 5 points: nothing to recover
    stat = metrics.mean_std([0.5, None, 0.7])
    assert stat["n"] == 2
    assert stat["mean"] == pytest.approx(0.6)
    assert stat["std"] == pytest.approx(0.1)
    assert metrics.mean_std([None])["mean"] is None


def test_mean_interval_is_the_student_t_interval_and_needs_two_seeds() -> None:
    # Half-width t(0.975, n - 1) * s / sqrt(n), t(0.975, 3) = 3.182446 (tables); None seeds are skipped.
    vals = [0.8, 0.9, 1.0, 0.95]
    ci = metrics.mean_interval([*vals, None])
    assert ci is not None
    mean, sd = float(np.mean(vals)), float(np.std(vals, ddof=1))
    half = 3.182446305284263 * sd / 2.0
    assert ci["low"] == pytest.approx(mean - half)
    assert ci["high"] == pytest.approx(mean + half)
    wider = metrics.mean_interval(vals, level=0.99)
    assert wider is not None
    assert wider["low"] < ci["low"]
    assert wider["high"] > ci["high"]
    assert metrics.mean_interval([0.9, None]) is None
    with pytest.raises(metrics.MetricError, match="confidence level"):
        metrics.mean_interval(vals, level=1.0)


def _logits_for(conf: np.ndarray, labels: np.ndarray) -> torch.Tensor:
    """Two-class logits whose true-class probability is ``conf``."""
    logit = np.log(conf / (1 - conf))
    out = np.zeros((conf.shape[0], 2))
    out[np.arange(conf.shape[0]), labels] = logit
    return torch.tensor(out)


def test_mia_calls_low_loss_members_and_high_loss_non_members() -> None:
    rng = np.random.default_rng(0)
    y = torch.zeros(200, dtype=torch.long)
    members = _logits_for(rng.uniform(0.97, 0.999, 200), y.numpy())
    non = _logits_for(rng.uniform(0.3, 0.8, 200), y.numpy())
    seen = metrics.mia_efficacy(
        (members, y), (non, y), (_logits_for(rng.uniform(0.97, 0.999, 200), y.numpy()), y)
    )
    unseen = metrics.mia_efficacy(
        (members, y), (non, y), (_logits_for(rng.uniform(0.3, 0.8, 200), y.numpy()), y)
    )
    assert seen.loss_lr < 0.1
    assert seen.conf_svc < 0.1
    assert unseen.loss_lr > 0.9
    assert unseen.conf_svc > 0.9
    with pytest.raises(metrics.MetricError, match="non-empty"):
        metrics.mia_efficacy((members, y), (non, y), (members[:0], y[:0]))


def test_group_obs_beats_mask_only_on_a_small_mlp() -> None:
    """Personalize -> provider mask -> client compensation: utility comes back, the class stays gone."""
    from zkunlearn.circuits.mask import Mask
    from zkunlearn.client.fisher import block_factors
    from zkunlearn.client.group_obs import apply_group_obs

    task = make_image_task(0, "disjoint", n_provider_train=1500, n_provider_test=500, n_client_train=600)
    torch.manual_seed(0)
    model = MLP(MLPConfig(hidden=64))
    fit(model, task.provider_train.x, task.provider_train.y, epochs=8, lr=3e-3, batch_size=64)
    personal = copy.deepcopy(model)
    fit(personal, task.client_train.x, task.client_train.y, epochs=8, lr=1e-3, batch_size=64)
    test = task.client_test.without_class(task.forget_class)

    def acc(m: torch.nn.Module) -> float:
        with torch.no_grad():
            return metrics.accuracy(m(test.x), test.y)

    # The largest 30 % of the weights: a mask that costs the personalized model real accuracy.
    w = personal.fc2.weight.detach().abs().numpy()
    dense = w > np.quantile(w, 0.7)
    mask = Mask.from_dense({"fc2.weight": dense}, block_size=64)
    masked = masked_copy(personal, {"fc2.weight": torch.as_tensor(dense)})
    factors = block_factors(
        personal, "fc2.weight", task.client_train.x, task.client_train.y, cross_entropy, block_size=64
    )
    new, _ = apply_group_obs(personal.fc2.weight.detach(), factors, mask.layer("fc2.weight"), lam=0.05)
    compensated = copy.deepcopy(personal)
    with torch.no_grad():
        compensated.fc2.weight.copy_(torch.from_numpy(new).float())
    assert torch.all(compensated.fc2.weight[torch.as_tensor(dense)] == 0)
    base, mask_only, comp = acc(personal), acc(masked), acc(compensated)
    rec = metrics.recovery(base, mask_only, comp)
    assert base - mask_only > 0.05, (base, mask_only)
    assert rec is not None, (base, mask_only, comp)
    assert rec > 0.5, (base, mask_only, comp)
    assert not math.isnan(comp)


def test_model_cache_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from zkunlearn.tasks.train import cache_dir, train_cached

    monkeypatch.setenv("ZKUNLEARN_CACHE", str(tmp_path))
    x = torch.randn(64, 1, 28, 28)
    y = torch.randint(0, 10, (64,))
    spec = {"test": "cache", "where": str(tmp_path)}
    first = train_cached(lambda: MLP(MLPConfig(hidden=16)), spec, x, y, epochs=1, lr=1e-3, seed=0)
    files = set(cache_dir().glob("*.pt"))
    second = train_cached(lambda: MLP(MLPConfig(hidden=16)), spec, x, y, epochs=1, lr=1e-3, seed=0)
    assert set(cache_dir().glob("*.pt")) == files
    assert all(
        torch.equal(a, b)
        for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    )


def test_code_task_slices_and_overlap_flags() -> None:
    from zkunlearn.tasks.code import make_code_task

    kw = {"n_retain": 200, "n_forget": 100, "n_client": 100, "n_test": 50, "n_client_forget": 30}
    disjoint = make_code_task(0, "disjoint", context=32, **kw)
    again = make_code_task(0, "disjoint", context=32, **kw)
    assert torch.equal(disjoint.retain.tokens, again.retain.tokens)
    assert disjoint.retain.x.shape == (200, 32)
    assert torch.equal(disjoint.retain.x[:, 1:], disjoint.retain.y[:, :-1])  # next-byte targets
    assert int(disjoint.client_is_forget.sum()) == 0
    overlap = make_code_task(0, "overlap", context=32, **kw)
    assert int(overlap.client_is_forget.sum()) == 30
    assert len(overlap.client_after_request) == 100

    # The forget slice is English prose, the rest is code (whose comments hold some English too).
    def the_rate(seq: torch.Tensor) -> float:
        return bytes(seq.flatten().tolist()).count(b" the ") / seq.numel()

    assert the_rate(disjoint.forget.tokens) > 2 * the_rate(disjoint.retain.tokens)
    assert the_rate(disjoint.forget.tokens) > 2 * the_rate(disjoint.client_train.tokens)
    with pytest.raises(DataError, match="variant"):
        make_code_task(0, "both", **kw)  # type: ignore[arg-type]


def test_finetune_restricted_to_trainable_layers_keeps_the_rest_and_the_mask() -> None:
    from zkunlearn.tasks.models import MLP, MLPConfig
    from zkunlearn.tasks.train import TrainError, finetune_masked

    torch.manual_seed(0)
    model = MLP(MLPConfig(in_dim=8, hidden=16, n_classes=3))
    x, y = torch.randn(40, 8), torch.randint(0, 3, (40,))
    dense = {"fc2.weight": torch.rand(16, 16) < 0.3}
    out = finetune_masked(model, dense, x, y, epochs=3, lr=1e-2, seed=0, trainable=["fc2.weight"])
    before, after = dict(model.named_parameters()), dict(out.named_parameters())
    for name in before:
        moved = not torch.equal(before[name], after[name])
        assert moved == (name == "fc2.weight"), name
    assert bool((after["fc2.weight"][dense["fc2.weight"]] == 0).all())
    with pytest.raises(TrainError, match="unknown parameters"):
        finetune_masked(model, dense, x, y, epochs=1, lr=1e-2, seed=0, trainable=["nope"])
