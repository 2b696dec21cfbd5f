"""The forgetting metrics (probe, relearn, calibrated MIA) and sample-level deletion requests, on the quick
MLP task: the metrics must be able to fail an output-only deletion that output accuracy cannot tell apart."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from zkunlearn.bench.forgetting import (
    RELEARN_CAP,
    ForgettingError,
    MiaReference,
    auc,
    bootstrap_auc,
    forgetting_metrics,
    mia_auc,
    probe_accuracy,
    relearn_steps,
)
from zkunlearn.bench.unlearning_data import SAMPLE_FRACTION, Prepared, prepare, sample_request
from zkunlearn.bench.unlearning_masks import make_mask, mask_spec_for
from zkunlearn.bench.unlearning_metrics import split_accuracy
from zkunlearn.bench.unlearning_settings import SETTINGS, MaskSpec

from zkunlearn.tasks.data import make_image_task


@pytest.fixture(scope="module")
def class_prep() -> Prepared:
    return prepare("mlp", 0, quick=True, variants=("disjoint",))


def head_row_only(prep: Prepared) -> nn.Module:
    """The personalized model with the forget class's head row zeroed and nothing else changed."""
    model = copy.deepcopy(prep.variants["disjoint"]["personalized"])
    with torch.no_grad():
        model.get_parameter("head.weight")[int(prep.provider_forget[1][0])] = 0.0
    return model


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(-5, 5), min_size=1, max_size=30),
    st.lists(st.floats(-5, 5), min_size=1, max_size=30),
)
def test_auc_is_the_share_of_ordered_pairs(members: list[float], nonmembers: list[float]) -> None:
    m, n = np.asarray(members), np.asarray(nonmembers)
    pairs = [(a > b) + 0.5 * (a == b) for a in members for b in nonmembers]
    assert auc(m, n) == pytest.approx(float(np.mean(pairs)))
    assert auc(m, n) + auc(n, m) == pytest.approx(1.0)


def test_auc_refuses_an_empty_side() -> None:
    with pytest.raises(ForgettingError, match="non-empty"):
        auc(np.ones(3), np.ones(0))


def test_head_row_only_hides_the_class_at_the_output_but_not_from_the_probe_or_relearning(
    class_prep: Prepared,
) -> None:
    """Zeroing the head row takes the forget accuracy to retrain's (0), yet the features are untouched
    (the probe sees exactly what it saw before) and the class comes back in far fewer SGD steps than in
    the retrained model."""
    v = class_prep.variants["disjoint"]
    views = v["views"]
    hidden, gold = head_row_only(class_prep), v["gold"]
    assert split_accuracy(v["personalized"], views.forget_test) > 0.0
    assert split_accuracy(hidden, views.forget_test) == 0.0
    assert split_accuracy(gold, views.forget_test) <= 0.02
    ref = MiaReference.of(gold, views.forgetting, 0)
    ours = forgetting_metrics(hidden, views.forgetting, ref, 0)
    before = forgetting_metrics(v["personalized"], views.forgetting, ref, 0)
    retrain = forgetting_metrics(gold, views.forgetting, ref, 0)
    assert ours["probe_acc"] == before["probe_acc"]
    assert ours["probe_acc_provider"] == before["probe_acc_provider"]
    assert isinstance(ours["relearn_steps"], int)
    assert isinstance(retrain["relearn_steps"], int)
    assert ours["relearn_steps"] > 0
    assert ours["relearn_steps"] * 2 <= retrain["relearn_steps"] < RELEARN_CAP
    # The retrained model is its own reference: no gap, and an interval of exactly 0.
    assert retrain["mia_auc_gap"] == 0.0
    assert retrain["mia_auc_gap_low"] == retrain["mia_auc_gap_high"] == 0.0


def test_the_probe_fails_a_model_whose_features_lost_the_class(class_prep: Prepared) -> None:
    """Control: with the penultimate layer's weights zeroed the features are constant, so the probe
    falls to at most chance on the forget class, far below what it reads off the personalized model."""
    v = class_prep.variants["disjoint"]
    fv = v["views"].forgetting
    assert fv.probe_client is not None
    assert fv.probe_kind is not None
    blank = copy.deepcopy(v["personalized"])
    with torch.no_grad():
        blank.get_parameter("fc2.weight").zero_()
    known = probe_accuracy(v["personalized"], fv.probe_client, fv.probe_kind)
    lost = probe_accuracy(blank, fv.probe_client, fv.probe_kind)
    assert known is not None
    assert lost is not None
    assert known >= 0.5
    assert lost <= 0.2


def test_the_attack_tells_a_model_that_memorised_the_named_samples_from_retrain(class_prep: Prepared) -> None:
    """The retrained model fit further on 20 deleted samples (with retained ones, so it memorises them
    rather than collapsing to the class): its AUC on those 20 against held-out images of their class
    sits above chance (its interval excludes 0.5) and above retrain's; retrain itself sits near chance."""
    v = class_prep.variants["disjoint"]
    fv = dataclasses.replace(
        v["views"].forgetting,
        mia_forget=(v["views"].forgetting.mia_forget[0][:20], v["views"].forgetting.mia_forget[1][:20]),
    )
    ref = MiaReference.of(v["gold"], fv, 0)
    memoriser = copy.deepcopy(v["gold"])
    x = torch.cat([fv.mia_forget[0], class_prep.provider_retain[0][:200]])
    y = torch.cat([fv.mia_forget[1], class_prep.provider_retain[1][:200]])
    opt = torch.optim.Adam(memoriser.parameters(), lr=1e-3)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(memoriser(x), y).backward()
        opt.step()
    seen = mia_auc(memoriser, fv, ref)
    unseen = mia_auc(v["gold"], fv, ref)
    assert seen["mia_auc_low"] <= seen["mia_auc"] <= seen["mia_auc_high"]
    assert seen["mia_auc"] >= 0.7
    assert seen["mia_auc_low"] > 0.5
    assert seen["mia_auc_gap"] > 0.0
    assert abs(unseen["mia_auc"] - 0.5) < 0.15


def test_bootstrap_auc_matches_resampling_by_hand() -> None:
    rng = np.random.default_rng(0)
    members, nonmembers = rng.normal(1, 1, 12), rng.normal(0, 1, 9)
    counts = (np.zeros((1, 12)), np.zeros((1, 9)))
    pick_m, pick_n = rng.integers(0, 12, 12), rng.integers(0, 9, 9)
    np.add.at(counts[0][0], pick_m, 1.0)
    np.add.at(counts[1][0], pick_n, 1.0)
    assert bootstrap_auc(members, nonmembers, counts)[0] == pytest.approx(
        auc(members[pick_m], nonmembers[pick_n])
    )


def test_relearn_counts_zero_when_already_there_and_reports_the_cap(class_prep: Prepared) -> None:
    v = class_prep.variants["disjoint"]
    fv = v["views"].forgetting
    assert relearn_steps(class_prep.global_model, fv.relearn_train, fv.relearn_check) == 0
    # A learning rate of 0 never relearns anything: the cap comes back.
    assert relearn_steps(v["gold"], fv.relearn_train, fv.relearn_check, lr=0.0, cap=5) == 5
    assert RELEARN_CAP > 5


def test_probe_needs_features_two_classes_and_the_kind(class_prep: Prepared) -> None:
    fv = class_prep.variants["disjoint"]["views"].forgetting
    assert fv.probe_client is not None
    assert probe_accuracy(nn.Linear(784, 10), fv.probe_client, 3) is None
    one_class = (fv.probe_client[0][:5], torch.zeros(5, dtype=torch.long))
    with pytest.raises(ForgettingError, match="two or more classes"):
        probe_accuracy(class_prep.global_model, one_class, 0)
    with pytest.raises(ForgettingError, match="no sample of class 11"):
        probe_accuracy(class_prep.global_model, fv.probe_client, 11)


def test_sample_requests_name_provider_samples_of_the_right_kind() -> None:
    task = make_image_task(0, "overlap", overlap_keep=1.0)
    samples = sample_request(task, "samples", 0)
    assert int(samples.forget.sum()) == round(SAMPLE_FRACTION * len(task.provider_train))
    assert bool(samples.heldout.all())
    assert not torch.equal(samples.forget, sample_request(task, "samples", 1).forget)
    person = sample_request(task, "person", 0)
    labels = task.provider_train.y[person.forget]
    assert bool((labels == task.forget_class).all())
    assert 10 <= len(labels) < int((task.provider_train.y == 3).sum())
    assert bool((task.provider_test.y[person.heldout] == task.forget_class).all())
    with pytest.raises(ValueError, match="not a sample-level deletion"):
        sample_request(task, "class", 0)


def test_a_sample_deletion_keeps_the_clients_data_and_every_head_row() -> None:
    prep = prepare("mlp", 0, quick=True, deletion="samples")
    assert set(prep.variants) == {"disjoint"}
    v = prep.variants["disjoint"]
    assert torch.equal(v["after"][1], v["client_train"][1])
    assert not bool(v["client_forget_mask"].any())
    assert len(prep.provider_forget[1]) + len(prep.provider_retain[1]) == 2800
    spec = mask_spec_for(MaskSpec("fisher-ratio", 0.4, "block", density=0.625, head_rows=1), "samples")
    assert spec.head_rows == 0
    mask = make_mask(prep, SETTINGS["mlp"].mask, SETTINGS["mlp"].block_size, 128)
    head = np.asarray(mask.dense("head.weight"), dtype=bool)
    assert not head.all(axis=1).any()  # no class's row is removed whole


def test_prepare_refuses_a_deletion_the_task_does_not_have() -> None:
    with pytest.raises(ValueError, match="no 'slice' deletion"):
        prepare("mlp", 0, quick=True, deletion="slice")
    with pytest.raises(ValueError, match="has no variant"):
        prepare("mlp", 0, quick=True, deletion="samples", variants=("overlap",))


def _row(method: str, seed: int, gap_low: float, gap_high: float, probe: float) -> dict[str, object]:
    return {
        "task": "vit", "deletion": "class", "variant": "disjoint", "method": method, "seed": seed,
        "mask_score": "fisher-ratio", "mask_fraction": 0.4, "mask_structure": "block", "block_size": 64,
        "lam": 0.001, "mask_efficacy": {"global_forget_acc": 1.0}, "personal_acc": 0.8, "forget_acc": 0.0,
        "probe_acc": probe, "probe_acc_provider": probe, "relearn_steps": 10 + seed, "relearn_capped": False,
        "mia_auc": 0.5 + gap_low, "mia_auc_gap": (gap_low + gap_high) / 2, "mia_auc_gap_low": gap_low,
        "mia_auc_gap_high": gap_high,
    }  # fmt: skip


def test_the_forgetting_table_counts_seeds_at_retrains_level_and_gives_intervals() -> None:
    from zkunlearn.bench.unlearning_records import aggregate, render_forgetting_markdown

    rows = [
        _row("group-obs", 0, -0.02, 0.05, 0.70),
        _row("group-obs", 1, 0.01, 0.09, 0.74),  # the paired interval excludes 0: not at retrain's level
        _row("retrain", 0, 0.0, 0.0, 0.50),
        _row("retrain", 1, 0.0, 0.0, 0.54),
    ]
    records = {r["method"]: r for r in aggregate(rows)}
    assert records["group-obs"]["mia_at_retrain_seeds"] == 1
    assert records["retrain"]["mia_at_retrain_seeds"] == 2
    ci = records["group-obs"]["probe_acc_ci95"]
    assert ci["low"] < 0.72 < ci["high"]
    table = render_forgetting_markdown(list(records.values()))
    assert "| vit | class | disjoint | group-obs | 2 |" in table
    assert "| 1/2 |" in table
    assert "| 2/2 |" in table


def test_the_methods_others_depend_on_cannot_be_skipped() -> None:
    from zkunlearn.bench.unlearning_runner import run_job

    with pytest.raises(ValueError, match="not skippable"):
        run_job("mlp", 0, True, skip=frozenset({"retrain"}))
