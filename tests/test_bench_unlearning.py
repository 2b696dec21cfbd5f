"""The unlearning benchmark end to end on the quick MLP task: every method, the tables, the plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from zkunlearn.bench.unlearning_data import prepare
from zkunlearn.bench.unlearning_masks import make_mask
from zkunlearn.bench.unlearning_methods import (
    client_fisher_data,
    group_obs,
    group_obs_certified,
    output_refit,
)
from zkunlearn.bench.unlearning_metrics import split_accuracy
from zkunlearn.bench.unlearning_records import finalize, render_tuning_markdown
from zkunlearn.bench.unlearning_runner import run_job
from zkunlearn.bench.unlearning_settings import METHODS, RECOVERING, SETTINGS, CertifiedSpec, task_methods
from zkunlearn.bench.unlearning_tuning import tuning_sweep


@pytest.fixture(scope="module")
def quick_rows() -> list[dict[str, object]]:
    rows, sweep = run_job("mlp", 0, quick=True, sweep=False)
    assert sweep == []
    return rows


def test_every_method_on_both_variants(quick_rows: list[dict[str, object]]) -> None:
    got = {(r["variant"], r["method"]) for r in quick_rows}
    assert got == {(v, m) for v in ("disjoint", "overlap") for m in task_methods("mlp")}
    # The MLP's masked fc2 feeds its masked head: nothing to refit there; the transformers have one.
    assert "group-obs-refit" not in task_methods("mlp")
    assert {"group-obs-refit", "analytic"} <= set(task_methods("vit"))
    assert "group-obs-refit" in task_methods("code-lm")
    assert set(task_methods("vit")) == set(METHODS)
    assert "group-obs-certified" not in task_methods("mlp")  # no certified configuration measured there
    for r in quick_rows:
        assert r["curvature"] == SETTINGS["mlp"].curvature
        # recovery is reported for the recovering methods only (and null where the mask cost < 5 points)
        if r["method"] not in RECOVERING:
            assert r["recovery"] is None


def test_group_obs_agrees_with_the_naive_solver(quick_rows: list[dict[str, object]]) -> None:
    obs = [r for r in quick_rows if r["method"] == "group-obs"]
    assert len(obs) == 2
    for r in obs:
        assert isinstance(r["naive_max_diff"], float)
        assert r["naive_max_diff"] < 1e-6
        assert r["forget_acc"] <= 0.1  # type: ignore[operator]


def test_support_finetune_trains(quick_rows: list[dict[str, object]]) -> None:
    """Both confined fine-tunes must have moved away from the plain mask."""
    by = {(r["variant"], r["method"]): r for r in quick_rows}
    for variant in ("disjoint", "overlap"):
        masked = by[(variant, "mask-only")]
        for method in ("support-finetune", "layers-finetune"):
            assert by[(variant, method)]["personal_acc"] != masked["personal_acc"]


def test_support_is_what_group_obs_may_move_and_the_fine_tune_stays_in_it() -> None:
    """Group-OBS changes only unmasked weights of touched blocks; `support-finetune` may move no others."""
    from zkunlearn.bench.unlearning_masks import dense_masks
    from zkunlearn.bench.unlearning_methods import group_obs_support
    from zkunlearn.client.fisher import BlockFactors
    from zkunlearn.client.group_obs import apply_group_obs

    from zkunlearn.tasks.train import finetune_masked

    prep = prepare("mlp", 0, quick=True)
    s = SETTINGS["mlp"]
    mask = make_mask(prep, s.mask, s.block_size, s.mask_samples)
    dense = dense_masks(mask, prep.layers)
    support = group_obs_support(mask, prep.layers)
    personalized = prep.variants["disjoint"]["personalized"]
    x, y = prep.variants["disjoint"]["after"]
    named = dict(personalized.named_parameters())
    for name in prep.layers:
        theta = named[name].detach().double().numpy()
        lm = mask.layer(name)
        n_blocks = lm.n_blocks
        rng = np.random.default_rng(0)
        factors = np.zeros((n_blocks, 4, lm.block_size))
        factors[:] = rng.normal(size=factors.shape)
        tail = theta.size - (n_blocks - 1) * lm.block_size
        factors[-1][:, tail:] = 0.0
        factor = BlockFactors(name, lm.block_size, factors, 1.0, theta.shape)
        moved, _updates = apply_group_obs(theta, factor, lm, 0.1)
        changed = torch.as_tensor(moved != theta)
        assert not bool((changed & ~support[name] & ~dense[name]).any())  # nothing outside the support
        assert bool((changed & support[name]).any())
        assert not bool((support[name] & dense[name]).any())
    tuned = finetune_masked(
        personalized, dense, x, y, epochs=1, lr=1e-3, seed=0, trainable=prep.layers, movable=support
    )
    for name in prep.layers:
        delta = (tuned.get_parameter(name) - personalized.get_parameter(name)).detach()
        assert torch.all(delta[~support[name] & ~dense[name]] == 0)
        assert bool((delta[support[name]] != 0).any())


def test_finalize_writes_json_tables_and_plot(quick_rows: list[dict[str, object]], tmp_path: Path) -> None:
    out = tmp_path / "unlearning.json"
    records = finalize(quick_rows, [], out)
    assert json.loads(out.read_text()) == records
    assert {r["method"] for r in records} == set(task_methods("mlp"))
    table = out.with_suffix(".md").read_text()
    for method in RECOVERING:
        assert f"recovery {method}" in table
    assert out.with_suffix(".png").stat().st_size > 0


def test_recovery_interval_over_seeds(quick_rows: list[dict[str, object]], tmp_path: Path) -> None:
    """The mean recovery carries its 95 % interval once two seeds have one; one seed has none."""

    def with_recovery(seed: int, value: float) -> list[dict[str, object]]:
        return [
            {**r, "seed": seed, "recovery": value if r["method"] in RECOVERING else None} for r in quick_rows
        ]

    one_seed = finalize(with_recovery(0, 0.9), [], tmp_path / "one.json")
    assert all(r["recovery_ci95"] is None for r in one_seed)
    records = finalize([*with_recovery(0, 0.9), *with_recovery(1, 0.7)], [], tmp_path / "two.json")
    obs = next(r for r in records if r["method"] == "group-obs" and r["variant"] == "disjoint")
    # mean 0.8, sample std 0.1414, t(0.975, 1) = 12.706: half-width 12.706 * 0.1414 / sqrt(2) = 1.2706
    assert obs["recovery"]["mean"] == pytest.approx(0.8)
    assert obs["recovery_ci95"]["low"] == pytest.approx(0.8 - 1.2706, abs=1e-3)
    assert obs["recovery_ci95"]["high"] == pytest.approx(0.8 + 1.2706, abs=1e-3)
    assert "-47.1 – 207.1" in (tmp_path / "two.md").read_text()
    assert all(r["recovery_ci95"] is None for r in records if r["method"] not in RECOVERING)


def test_tuning_sweep_grid_and_table() -> None:
    """One row per grid point (curvature x reconstruction weight x rank x damping), each in the table."""
    rows = tuning_sweep(
        "mlp", [0], [0.32], [128], [0.02, 0.1], curvatures=["ggn"], ranks=[0, 4], quick=True,
        reconstruction_weights=[0.0, 0.3],
    )  # fmt: skip
    assert len(rows) == 8
    assert {(r["reconstruction_weight"], r["rank"], r["lam"]) for r in rows} == {
        (w, rank, lam) for w in (0.0, 0.3) for rank in (None, 4) for lam in (0.02, 0.1)
    }
    for r in rows:
        assert r["curvature"] == "ggn"
        assert r["mask_only"] < r["personalized"]
    # The term changes the update (the same mask, so only the compensation differs).
    by_weight = {w: [r["group_obs"] for r in rows if r["reconstruction_weight"] == w] for w in (0.0, 0.3)}
    assert by_weight[0.0] != by_weight[0.3]
    table = render_tuning_markdown(rows)
    for w in ("0", "0.3"):
        assert f"| mlp | ggn | {w} | full |" in table
        assert f"| mlp | ggn | {w} | 4 |" in table


def test_tune_cli_takes_explicit_seeds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``unlearning-tune --tune-seeds`` splits a grid over processes (two halves of the tuning seeds at
    once); without it the task's tuning seeds are used, so a grid never silently runs on held-out seeds."""
    from zkunlearn.bench import unlearning

    seen: list[list[int]] = []

    def fake_sweep(task: str, seeds: list[int], *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        seen.append(list(seeds))
        return []

    from typer.testing import CliRunner

    from zkunlearn.cli import app

    monkeypatch.setattr(unlearning, "tuning_sweep", fake_sweep)
    out = str(tmp_path / "grid.json")
    tune = ["bench", "unlearning-tune", "--tasks", "vit", "--out", out]
    for args in ([*tune, "--tune-seeds", "6,7"], tune):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    assert seen == [[6, 7], list(unlearning.TUNING_SEEDS["vit"])]
    assert json.loads((tmp_path / "grid_tuning.json").read_text()) == []


@pytest.mark.slow
def test_diagnosis_rows_and_tables(tmp_path: Path) -> None:
    """Each masked layer alone, each curvature variant; one round of re-linearising is plain Group-OBS."""
    from zkunlearn.bench.unlearning_diagnosis import (
        ALTERNATIVE_CURVATURES,
        CURVATURE_VARIANTS,
        diagnose,
        render_diagnosis_markdown,
        render_diagnosis_plot,
    )

    rows = diagnose("mlp", 0, quick=True, rounds=1)
    layers = {r["layer"] for r in rows if r["kind"] == "layer"}
    assert layers == {"all", "fc2.weight", "head.weight"}
    curves = {r["curvature_variant"]: r for r in rows if r["kind"] == "curvature"}
    assert set(curves) == {*CURVATURE_VARIANTS, *ALTERNATIVE_CURVATURES}
    # With one round the re-linearised update is the plain one.
    assert curves["ggn-relinearised"]["group_obs"] == curves["ggn"]["group_obs"]
    # The diagnosis's whole-mask update is the benchmark's Group-OBS, reached through the benchmark's path.
    s = SETTINGS["mlp"]
    prep = prepare("mlp", 0, quick=True)
    v = prep.variants["disjoint"]
    mask = make_mask(prep, s.mask, s.block_size, s.mask_samples)
    bench_model, _ = group_obs(
        v["personalized"], mask, prep.layers, v["client_train"], v["client_forget_mask"], s.lam,
        s.block_size, n_samples=s.fisher_draws(quick=True), compare_naive=False, curvature=s.curvature,
    )  # fmt: skip
    whole = next(r for r in rows if r["kind"] == "layer" and r["layer"] == "all")
    assert whole["group_obs"] == curves["ggn"]["group_obs"]
    assert whole["group_obs"] == split_accuracy(bench_model, v["views"].personal_test)
    for r in rows:
        assert r["mask_only"] < r["personalized"] or r["layer"] != "all"
        if r["kind"] == "layer":
            assert 0.0 < r["masked_share"] <= 1.0
    table = render_diagnosis_markdown(rows)
    for name in (*CURVATURE_VARIANTS, *ALTERNATIVE_CURVATURES, "fc2.weight", "head.weight"):
        assert name in table
    render_diagnosis_plot(rows, tmp_path / "diagnosis.png")
    assert (tmp_path / "diagnosis.png").stat().st_size > 0


class _TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


def _neuron_block_reference(
    model: _TwoLayer, x: torch.Tensor, dense: np.ndarray, lam: float, damping: float
) -> tuple[np.ndarray, np.ndarray]:
    """Neuron-block OBS from first principles: the GGN ``mean J^T (diag p - p p^T) J`` of each unit's
    (fc1 row, fc2 column) from full Jacobians of the logits, and the OBS update by explicit inverses."""
    w1 = model.fc1.weight.detach().double().numpy().copy()
    w2 = model.fc2.weight.detach().double().numpy().copy()
    n_in = w1.shape[1]
    jacobians = []
    for sample in x:
        j1, j2 = torch.autograd.functional.jacobian(
            lambda a, b, s=sample: torch.func.functional_call(
                model, {"fc1.weight": a, "fc2.weight": b}, (s.unsqueeze(0),)
            ).squeeze(0),
            (model.fc1.weight.detach(), model.fc2.weight.detach()),
        )
        p = torch.softmax(model(sample.unsqueeze(0)), -1).squeeze(0).detach().double()
        jacobians.append((j1.double(), j2.double(), torch.diag(p) - torch.outer(p, p)))
    blocks = []
    for unit in range(w1.shape[0]):
        j = [torch.cat([j1[:, unit, :], j2[:, :, unit]], dim=1) for j1, j2, _h in jacobians]
        ggn = sum(jj.T @ h @ jj for jj, (_a, _b, h) in zip(j, jacobians, strict=True))
        blocks.append(ggn.numpy() / len(j))
    # Normalised over the whole layer, as the SDK's factors are: lam is relative to the layer's curvature.
    diagonals = np.array([np.diag(f) for f in blocks])
    in_diag, out_diag = diagonals[:, :n_in].mean(), diagonals[:, n_in:].mean() / diagonals[:, :n_in].mean()
    for unit in np.flatnonzero(dense.any(axis=1)):
        f = blocks[unit] / in_diag
        f += np.diag(np.r_[np.full(n_in, lam), np.full(w2.shape[0], lam + damping * out_diag)])
        theta = np.r_[w1[unit], w2[:, unit]]
        sel = np.flatnonzero(dense[unit])
        inv = np.linalg.inv(f)
        delta = -inv[:, sel] @ np.linalg.inv(inv[np.ix_(sel, sel)]) @ theta[sel]
        after = theta + delta
        w1[unit], w2[:, unit] = after[:n_in], after[n_in:]
    return w1, w2


def test_neuron_blocks_match_a_first_principles_reference_and_reduce_to_row_blocks() -> None:
    """The diagnosis's neuron-block relation against the GGN built from Jacobians and OBS by explicit
    inverses; with its fc2 part damped out of reach it is Group-OBS in row blocks."""
    from zkunlearn.bench.unlearning_diagnosis import neuron_block_copy
    from zkunlearn.circuits.mask import LayerMask
    from zkunlearn.client.fisher import layer_factors
    from zkunlearn.client.group_obs import apply_group_obs

    model = _TwoLayer()
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(4))
    y = torch.zeros(40, dtype=torch.long)
    dense = np.zeros((8, 6), dtype=bool)
    dense[1, [0, 3]] = dense[5, 2] = dense[6, [1, 2, 4]] = True
    masks = {"fc1.weight": torch.as_tensor(dense)}
    pairs = [("fc1.weight", "fc2.weight")]
    lam = 0.01
    for damping in (0.5, 10.0):
        got = neuron_block_copy(
            model, model, pairs, masks, x, y, curvature="ggn", lam=lam, damping=damping, chunk=16
        )
        w1, w2 = _neuron_block_reference(model, x, dense, lam, damping)
        assert np.allclose(got.fc1.weight.detach().double().numpy(), w1, atol=1e-5)
        assert np.allclose(got.fc2.weight.detach().double().numpy(), w2, atol=1e-5)
        assert not got.fc1.weight.detach().numpy()[dense].any()
        untouched = [1 - int(dense[u].any()) for u in range(8)]
        assert np.array_equal(
            got.fc2.weight.detach().numpy()[:, np.flatnonzero(untouched)],
            model.fc2.weight.detach().numpy()[:, np.flatnonzero(untouched)],
        )
    # fc2 frozen in effect: the fc1 part is the SDK's row-block Group-OBS with the same curvature.
    frozen = neuron_block_copy(model, model, pairs, masks, x, y, curvature="ggn", lam=lam, damping=1e9)
    factors = layer_factors(model, ["fc1.weight"], x, y, nn.functional.cross_entropy, 6, curvature="ggn")
    rows, _ = apply_group_obs(
        model.fc1.weight.detach(), factors["fc1.weight"], LayerMask.from_dense("fc1.weight", dense, 6), lam
    )
    assert np.allclose(frozen.fc1.weight.detach().double().numpy(), rows, atol=1e-5)
    assert np.allclose(frozen.fc2.weight.detach().numpy(), model.fc2.weight.detach().numpy(), atol=1e-6)


def test_diagnosis_refuses_zero_rounds() -> None:
    from zkunlearn.bench.unlearning_diagnosis import diagnose

    with pytest.raises(ValueError, match="rounds"):
        diagnose("mlp", 0, quick=True, rounds=0)


def test_output_refit_leaves_out_the_excluded_samples() -> None:
    """The bench's refit sees the client's retained samples only, the same draw as its curvature."""
    import torch
    from zkunlearn.client.refit import RefitPair, apply_output_refit

    from zkunlearn.tasks.models import ViT, ViTConfig

    torch.manual_seed(0)
    model = ViT(ViTConfig(width=16, depth=2, heads=2, mlp_ratio=4))
    compensated = ViT(ViTConfig(width=16, depth=2, heads=2, mlp_ratio=4))
    compensated.load_state_dict(model.state_dict())
    with torch.no_grad():
        for i in range(2):
            compensated.get_submodule(f"blocks.{i}.fc1").weight[:, ::3] = 0.0
    x, y = torch.rand(30, 1, 28, 28), torch.randint(0, 10, (30,))
    exclude = y == 3
    layers = ["blocks.0.fc1.weight", "blocks.1.fc1.weight", "head.weight"]
    refit, info = output_refit(model, compensated, layers, (x, y), exclude, 0.03, n_samples=12)
    assert info["refit_error_ratio"] < 1.0
    (sx, _), sex = client_fisher_data((x, y), exclude, 12)
    pairs = [RefitPair(*p) for p in model.refit_pairs]
    expected, _ = apply_output_refit(model, compensated, pairs, sx[~sex], 0.03, layers)
    for name, param in refit.named_parameters():
        assert torch.equal(param, expected.get_parameter(name)), name
    with_excluded, _ = apply_output_refit(model, compensated, pairs, sx, 0.03, layers)
    assert not torch.equal(refit.blocks[0].fc2.weight, with_excluded.blocks[0].fc2.weight)


def test_client_fisher_data_draws_first_then_adds_shifted_copies_of_the_draw() -> None:
    """The setting's shift multiplies the curvature's inputs, not the draw: the same ``n_samples``
    images (and excluded ones) as without it, then their moved copies with the same exclusions."""
    from zkunlearn.client.fisher import shifted_copies

    x, y = torch.rand(40, 1, 8, 8), torch.randint(0, 4, (40,))
    exclude = y == 1
    (plain_x, plain_y), plain_ex = client_fisher_data((x, y), exclude, 12)
    (sx, sy), sex = client_fisher_data((x, y), exclude, 12, shift=1)
    assert plain_x.shape[0] == 12 + int(exclude.sum())
    assert torch.equal(sx, shifted_copies(plain_x, 1))
    assert torch.equal(sy, plain_y.repeat(5))
    assert torch.equal(sex, plain_ex.repeat(5))
    assert SETTINGS["vit"].fisher_shift == 1
    assert SETTINGS["mlp"].fisher_shift == 0
    assert SETTINGS["code-lm"].fisher_shift == 0


def test_structure_sweep_rows_and_table() -> None:
    """Every structure at both fractions on the quick MLP: whole blocks leave Group-OBS nothing to do,
    capped blocks touch fewer blocks than an unstructured mask, and the head's class row goes whole."""
    from zkunlearn.bench.unlearning_structures import (
        STRUCTURES,
        fractions_for,
        measure_structures,
        render_structures_markdown,
    )

    rows = measure_structures("mlp", 0, quick=True)
    assert len(rows) == len(STRUCTURES) * len(fractions_for("mlp"))
    by = {(r["fraction"], r["structure"], r["density"], r["head_rows"]): r for r in rows}
    fraction = SETTINGS["mlp"].mask.fraction
    whole = by[(fraction, "block", 1.0, 1)]
    assert abs(whole["group_obs"] - whole["mask_only"]) < 1e-12  # a whole block has nothing to compensate
    assert by[(fraction, "neuron", 1.0, 0)]["group_obs"] == pytest.approx(
        by[(fraction, "neuron", 1.0, 0)]["mask_only"]
    )
    capped = by[(fraction, "block", 0.75, 1)]
    loose = by[(fraction, "unstructured", 1.0, 0)]
    assert capped["touched_blocks"] < loose["touched_blocks"]
    assert capped["masked_weights"] > 0
    assert capped["total_blocks"] == loose["total_blocks"]
    table = render_structures_markdown(rows)
    assert "| mlp | 32% | block | 0.75 | forget-class row whole |" in table
    assert "| mlp | 32% | unstructured | – | in the budget |" in table


def _measure_or_fail(task: str, seed: int) -> list[dict[str, Any]]:
    if seed == 1:
        raise ValueError("boom")
    return [{"task": task, "seed": seed}]


def test_run_per_seed_keeps_finished_jobs_and_reports_failures() -> None:
    """Each job in its own process: a failing one is reported and skipped when tolerated, raised otherwise."""
    from zkunlearn.bench.unlearning_runner import run_per_seed

    rows: list[dict[str, Any]] = []
    failures = run_per_seed(
        _measure_or_fail, ["t"], [0, 1, 2], "jobs", rows.extend, workers=2, tolerate_failures=True
    )
    assert sorted(r["seed"] for r in rows) == [0, 2]
    assert len(failures) == 1
    assert "boom" in failures[0]
    with pytest.raises(ValueError, match="boom"):
        run_per_seed(_measure_or_fail, ["t"], [0, 1, 2], "jobs", [].extend, workers=2)
    serial: list[dict[str, Any]] = []
    assert run_per_seed(_measure_or_fail, ["t", "u"], [0, 2], "jobs", serial.extend, workers=1) == []
    assert [(r["task"], r["seed"]) for r in serial] == [("t", 0), ("t", 2), ("u", 0), ("u", 2)]


def test_tuning_tables_apply_the_five_point_rule() -> None:
    """A seed (or a grid point's mean) whose mask costs < 5 points shows no recovery: it would be noise."""

    def row(seed: int, personalized: float, mask_only: float, obs: float) -> dict[str, Any]:
        cost = personalized - mask_only
        return {
            "task": "vit", "curvature": "ggn", "reconstruction_weight": 0.0, "rank": None,
            "fisher_samples": 64, "block_size": 64, "fraction": 0.4, "lam": 0.001, "seed": seed,
            "personalized": personalized, "mask_only": mask_only, "group_obs": obs, "mask_cost": cost,
            "recovery": (obs - mask_only) / cost,
        }  # fmt: skip

    cheap = render_tuning_markdown([row(0, 0.80, 0.78, 0.79), row(1, 0.80, 0.77, 0.79)])
    cells = cheap.splitlines()[-1].split("|")
    assert cells[11].strip() == "– –"  # per seed
    assert cells[12].strip() == "–"  # mean over seeds costing >= 5 points
    assert cells[13].strip() == "–"  # pooled: mean cost 2.5 points
    costly = render_tuning_markdown([row(0, 0.80, 0.70, 0.79), row(1, 0.80, 0.78, 0.79)])
    cells = costly.splitlines()[-1].split("|")
    assert cells[11].strip() == "90.0 –"
    assert cells[12].strip() == "90.0 (1)"
    assert cells[13].strip() == "83.3"  # pooled over the mean cost of 6 points


def test_the_certified_method_is_the_proven_update(quick_rows: list[dict[str, object]]) -> None:
    """Rank-m, quantised Group-OBS (``certified_weights``) on the quick MLP: masked weights exactly zero,
    the touched blocks' other weights compensated, the rest untouched, and close to full rank at a
    large rank (the certified update is the same solve with a fitted factor)."""
    s = SETTINGS["mlp"]
    prep = prepare("mlp", 0, quick=True)
    v = prep.variants["disjoint"]
    mask = make_mask(prep, s.mask, s.block_size, s.mask_samples)
    args = (v["personalized"], mask, prep.layers, v["client_train"], v["client_forget_mask"])
    certified, info = group_obs_certified(*args, CertifiedSpec(m=8, lam=s.lam), s.block_size, curvature="ggn")
    assert info["update_s"] > 0
    for name in prep.layers:
        before = v["personalized"].get_parameter(name).detach().numpy().reshape(-1)
        after = certified.get_parameter(name).detach().numpy().reshape(-1)
        masked = np.asarray(mask.dense(name), dtype=bool).reshape(-1)
        assert np.all(after[masked] == 0.0)
        touched = np.zeros(before.size, dtype=bool)
        for block in mask.layer(name).blocks:
            touched[int(block) * s.block_size : (int(block) + 1) * s.block_size] = True
        assert np.abs(after[touched & ~masked] - before[touched & ~masked]).max() > 1e-4
        # Outside the touched blocks only the grid rounding of the committed weights remains.
        assert np.abs(after[~touched] - before[~touched]).max() < 1e-5 * max(1.0, np.abs(before).max())
