"""The edge client's provers under failures and bad input: a crash while saving, a mask or forget labels
that do not fit, a refused enrollment, and an analytic head at small ridge penalties.

ezkl is stubbed: a commitment is SHA-256 over a tensor's felts, and the stub prover hands back the
commitments of its job's inputs, as ezkl does. That is enough for the SDK's own self-check (the proof's
input commitment must be the committed one), which is what a mixed-up state on disk trips.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from zkunlearn.circuits.mask import LayerMask, Mask
from zkunlearn.client import analytic_unlearner as A
from zkunlearn.client import unlearning as U
from zkunlearn.client.analytic import AnalyticHead
from zkunlearn.client.analytic_unlearner import AnalyticUnlearner
from zkunlearn.client.committed_state import load_state, on_grid
from zkunlearn.client.reference import reference_ridge
from zkunlearn.client.refit import capture_inputs, committed_rows
from zkunlearn.client.sdk import VerifiedRequest
from zkunlearn.client.unlearning import GroupObsUnlearner, UnlearningError
from zkunlearn.proofs.artifacts import ClientCircuit
from zkunlearn.proofs.backend import Proof
from zkunlearn.proofs.deletion import AnalyticSpec, GroupObsSpec, RefitSpec
from zkunlearn.proofs.fixedpoint import felts
from zkunlearn.proofs.prover import ProveJob, ProveResult
from zkunlearn.proofs.srs import SrsInfo

SCALE = 13
GO_SPEC = GroupObsSpec(block=16, m=8, batch=1, lam=0.1)
AN_SPEC = AnalyticSpec(d=8, k=3, n_u=4)
LAYER = "fc1.weight"


class Crash(BaseException):
    """A power cut: nothing in the SDK may catch it."""


def _digest(values: list[str]) -> str:
    return hashlib.sha256("|".join(values).encode()).hexdigest()


@pytest.fixture
def stub_ezkl(monkeypatch: pytest.MonkeyPatch) -> list[list[ProveJob]]:
    """Commitments and proofs without ezkl; returns the list of proving calls made."""
    calls: list[list[ProveJob]] = []

    def prove_parallel(jobs: list[ProveJob], **_kwargs: Any) -> list[ProveResult]:
        calls.append(jobs)
        return [
            ProveResult(j.label, Proof(b"stub", ()), [_digest(t) for t in j.inputs], 0.0, 0.0) for j in jobs
        ]

    for module in (U, A):  # the fixed-point Group-OBS and analytic provers
        monkeypatch.setattr(
            module, "commit_tensor", lambda _circuit, tensor, scale: _digest(felts(tensor, scale))
        )
        monkeypatch.setattr(module, "prove_parallel", prove_parallel)
    return calls


def _circuit(tmp: Path) -> ClientCircuit:
    tmp.mkdir(parents=True, exist_ok=True)
    settings = tmp / "settings.json"
    settings.write_text(json.dumps({"run_args": {"input_scale": SCALE}}))
    missing = tmp / "unused"  # never read: commitments and proofs are stubbed
    return ClientCircuit(missing, settings, missing, missing, SrsInfo(missing, 1, "", True, "test"))


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))
        return out


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(32, 8, generator=gen), torch.randint(0, 3, (32,), generator=gen)


def _request(
    mask: Mask,
    request_id: str = "r1",
    features: np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> VerifiedRequest:
    kind = 1 if features is None else 2
    return VerifiedRequest(
        request_id, "c", "m", kind, tuple(mask.layer_names), mask, mask.to_bytes(), features, labels,
        0, 2**62, 1, (), {}, request_id.encode(), b"sig",
    )  # fmt: skip


def _mask(*offsets: int) -> Mask:
    return Mask((LayerMask(LAYER, (8, 8), GO_SPEC.block, {0: offsets}),))


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture
def enrolled(tmp_path: Path, stub_ezkl: list[list[ProveJob]]) -> GroupObsUnlearner:
    x, y = _data()
    unlearner = GroupObsUnlearner(Tiny(), GO_SPEC, _circuit(tmp_path / "circuit"), tmp_path / "state")
    unlearner.enroll([LAYER], x, y, nn.functional.cross_entropy)
    return unlearner


def _consistent(state_dir: Path) -> dict[str, Any]:
    """Load the committed state and check every stored theta batch is the one its commitment names."""
    arrays, meta = load_state(state_dir)
    mine = {(c["name"], c["block"]): c["point_hex"] for c in meta["commitments"]}
    theta, blind = arrays[f"{LAYER}/theta"], arrays[f"{LAYER}/theta_blind"]
    for b in range(theta.shape[0]):
        tensor = np.concatenate([theta[b], blind[b]], axis=1)
        assert _digest(felts(tensor, SCALE)) == mine[(f"theta:{LAYER}", b)], (
            "weights beside other commitments"
        )
    return meta


# -- 1. the committed state is saved atomically and durably -------------------------------------------


@pytest.mark.parametrize("failing_call", [1, 2])
def test_crash_while_saving_leaves_one_whole_state_and_the_retry_succeeds(
    enrolled: GroupObsUnlearner, monkeypatch: pytest.MonkeyPatch, failing_call: int
) -> None:
    state_dir = enrolled.state_dir
    before = _consistent(state_dir)
    real_replace, calls = os.replace, []

    def crashing_replace(src: Any, dst: Any) -> None:
        calls.append(dst)
        if len(calls) == failing_call:
            raise Crash(f"power cut at rename {failing_call} ({Path(dst).name})")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(Crash):
        enrolled.prove(_request(_mask(1, 2), "req-1"))
    monkeypatch.setattr(os, "replace", real_replace)

    # A restart: a new prover on the same folder finds one whole state, the old or the new one.
    after_crash = _consistent(state_dir)
    if after_crash["last_request"] is None:
        assert after_crash["commitments"] == before["commitments"]
    else:
        assert after_crash["last_request"]["request_id"] == "req-1"
    restarted = GroupObsUnlearner(Tiny(), GO_SPEC, enrolled.circuit, state_dir)
    first = restarted.prove(_request(_mask(1, 2), "req-1"))  # the provider re-delivers the request
    assert _consistent(state_dir)["last_request"]["request_id"] == "req-1"
    assert [c.to_json() for c in first.after_commitments] == _consistent(state_dir)["commitments"]
    # ... the live model holds the answer's weights, and the client is not stuck on later requests.
    weight = restarted.model.get_parameter(LAYER).detach().reshape(-1)
    assert weight[1] == 0
    assert weight[2] == 0
    restarted.prove(_request(_mask(5), "req-2"))
    assert _consistent(state_dir)["last_request"]["request_id"] == "req-2"
    assert sorted(p.name for p in state_dir.iterdir()) == ["state.json", "state.npz"]  # no orphans left


def test_a_torn_state_on_disk_is_refused_not_proved_from(enrolled: GroupObsUnlearner, tmp_path: Path) -> None:
    """Arrays of one save beside the meta of another (e.g. restored from two backups): refused by name."""
    old_arrays = (enrolled.state_dir / "state.npz").read_bytes()
    enrolled.prove(_request(_mask(1, 2), "req-1"))
    (enrolled.state_dir / "state.npz").write_bytes(old_arrays)
    with pytest.raises(UnlearningError, match="torn") as refused:
        enrolled.prove(_request(_mask(5), "req-2"))
    # A storage fault, not a verdict on the request: chained like any other read failure.
    assert isinstance(refused.value.__cause__, ValueError)
    with pytest.raises(UnlearningError, match="torn"):
        enrolled.load_model()


def test_save_flushes_both_files_before_the_switch_and_the_folder_after_each_rename(
    enrolled: GroupObsUnlearner, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(f"replace {Path(dst).name}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    enrolled.prove(_request(_mask(1, 2), "req-1"))
    assert events == [
        "fsync file",
        "fsync file",
        "replace state.json",
        "fsync dir",
        "replace state.npz",
        "fsync dir",
    ]


# -- 2. a mask must fit the enrolled layer ------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "block", "message"),
    [
        ((4, 8), 16, r"'fc1.weight' has shape \(4, 8\); the enrolled layer is \(8, 8\)"),
        ((16, 8), 16, r"'fc1.weight' has shape \(16, 8\); the enrolled layer is \(8, 8\)"),
        ((2, 32), 16, r"'fc1.weight' has shape \(2, 32\); the enrolled layer is \(8, 8\)"),  # same size
        ((8, 8), 32, r"'fc1.weight' has block size 32, the circuit's block is 16"),
    ],
)
def test_mask_that_does_not_fit_the_enrolled_layer_is_refused_before_anything_changes(
    enrolled: GroupObsUnlearner,
    stub_ezkl: list[list[ProveJob]],
    shape: tuple[int, int],
    block: int,
    message: str,
) -> None:
    files, params = _files(enrolled.state_dir), _params(enrolled.model)
    mask = Mask((LayerMask(LAYER, shape, block, {0: (1,)}),))
    with pytest.raises(UnlearningError, match=message):
        enrolled.prove(_request(mask))
    assert stub_ezkl == []  # nothing was proved
    assert _files(enrolled.state_dir) == files
    assert all(torch.equal(v, params[k]) for k, v in _params(enrolled.model).items())


# -- 3. analytic forget labels are validated before they are used -------------------------------------


@pytest.fixture
def analytic(tmp_path: Path, stub_ezkl: list[list[ProveJob]]) -> tuple[AnalyticUnlearner, np.ndarray]:
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, size=(40, AN_SPEC.d))
    head = AnalyticHead(AN_SPEC.d, AN_SPEC.k, 1.0)
    head.learn(x, np.eye(AN_SPEC.k)[rng.integers(0, AN_SPEC.k, size=40)])
    unlearner = AnalyticUnlearner(head, AN_SPEC, _circuit(tmp_path / "circuit"), tmp_path / "state")
    unlearner.enroll()
    return unlearner, x


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([0.0, 3.0], r"forget label 1 is 3.0: 1-D labels must be class indices in \[0, 3\)"),
        ([np.nan, 0.0], r"forget label 0 is nan"),
        ([0.0, np.inf], r"forget label 1 is inf"),
        ([-1.0, 0.0], r"forget label 0 is -1.0"),  # would have been the last class
        ([1.7, 0.0], r"forget label 0 is 1.7"),  # would have been class 1
        ([1e30, 0.0], r"forget label 0 is 1e\+30"),
        ([0.0], r"1 forget labels for 2 forget samples"),
        ([[0.0, 1.0, np.nan], [1.0, 0.0, 0.0]], r"forget target \(0, 2\) is nan"),
        ([[0.0, 1.0], [1.0, 0.0]], r"\(2, 3\) targets, got shape \(2, 2\)"),
    ],
)
def test_bad_forget_labels_are_refused_before_the_head_is_touched(
    analytic: tuple[AnalyticUnlearner, np.ndarray],
    stub_ezkl: list[list[ProveJob]],
    monkeypatch: pytest.MonkeyPatch,
    labels: list[Any],
    message: str,
) -> None:
    unlearner, x = analytic
    files, w = _files(unlearner.state_dir), unlearner.head.W.copy()
    unlearned: list[np.ndarray] = []
    real_unlearn = AnalyticHead.unlearn

    def spy(head: AnalyticHead, X_u: Any, Y_u: Any) -> None:
        unlearned.append(np.asarray(Y_u))
        real_unlearn(head, X_u, Y_u)

    monkeypatch.setattr(AnalyticHead, "unlearn", spy)
    with pytest.raises(UnlearningError, match=message):
        unlearner.prove(_request(Mask(()), "bad", x[:2], np.array(labels, dtype=np.float64)))
    assert unlearned == []
    assert stub_ezkl == []
    assert _files(unlearner.state_dir) == files
    assert np.array_equal(unlearner.head.W, w)
    # Integer labels in range (as floats, as they travel) still go through.
    unlearner.prove(_request(Mask(()), "good", x[:2], np.array([2.0, 0.0])))
    assert np.array_equal(unlearned[0], np.eye(3)[[2, 0]])


def test_bad_forget_features_and_rows_never_learned_are_unlearning_errors(
    analytic: tuple[AnalyticUnlearner, np.ndarray],
) -> None:
    unlearner, x = analytic
    bad = x[:2].copy()
    bad[1, 3] = np.nan
    with pytest.raises(UnlearningError, match=r"forget feature \(1, 3\) is nan"):
        unlearner.prove(_request(Mask(()), "nan", bad, np.array([0.0, 1.0])))
    with pytest.raises(UnlearningError, match=r"forget features must be \(n, 8\)"):
        unlearner.prove(_request(Mask(()), "wide", np.zeros((2, 9)), np.array([0.0, 1.0])))
    with pytest.raises(UnlearningError, match="exceed the circuit's n_u = 4"):
        unlearner.prove(_request(Mask(()), "many", x[:5], np.zeros(5)))
    with pytest.raises(UnlearningError, match="never learned"):
        unlearner.prove(_request(Mask(()), "never", 1e3 * x[:1], np.array([0.0])))


# -- 4. a refused enrollment leaves the live model alone ----------------------------------------------


def _refit(masked: str, following: str, n: int = 16, d_out: int = 8) -> RefitSpec:
    return RefitSpec(
        masked=f"{masked}.weight", masked_bias=f"{masked}.bias", following=following, n=n, d_in=8,
        hidden=8, d_out=d_out, rel_lam=0.05, activation="relu",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("refits", "message"),
    [
        ([_refit("fc1", "fc2", n=10_000)], "needs 10000 rows"),
        ([_refit("fc1", "fc2"), _refit("fc2", "fc3", d_out=4)], r"fc3 is \(3, 8\), the circuit expects"),
    ],
)
def test_refused_enrollment_leaves_every_parameter_bit_identical(
    tmp_path: Path, stub_ezkl: list[list[ProveJob]], refits: list[RefitSpec], message: str
) -> None:
    x, y = _data()
    model = Tiny()
    before = _params(model)
    circuit = _circuit(tmp_path / "circuit")
    layers = sorted({r.masked for r in refits})
    refused = GroupObsUnlearner(
        model, GO_SPEC, circuit, tmp_path / "refused", refits=[(r, circuit) for r in refits]
    )
    with pytest.raises(UnlearningError, match=message):
        refused.enroll(layers, x, y, nn.functional.cross_entropy)
    assert not (tmp_path / "refused").exists()
    assert all(torch.equal(v, before[k]) for k, v in _params(model).items())

    # An enrollment that is accepted writes the committed state into the model; the second refit's rows
    # are the masked layer's inputs with the layers before it already on their committed values.
    good = [_refit("fc1", "fc2"), _refit("fc2", "fc3", d_out=3)]
    unlearner = GroupObsUnlearner(
        model, GO_SPEC, circuit, tmp_path / "state", refits=[(r, circuit) for r in good]
    )
    unlearner.enroll(["fc1.weight", "fc2.weight"], x, y, nn.functional.cross_entropy)
    reloaded = Tiny()
    GroupObsUnlearner(
        reloaded, GO_SPEC, circuit, tmp_path / "state", refits=[(r, circuit) for r in good]
    ).load_model()
    assert all(torch.equal(v, _params(reloaded)[k]) for k, v in _params(model).items())
    assert not all(torch.equal(v, before[k]) for k, v in _params(model).items())
    arrays, meta = load_state(tmp_path / "state")
    z = capture_inputs(model, ["fc2"], x)["fc2"].numpy()[committed_rows(32, 16)]
    exponent = meta["layers"]["fc2.weight"]["exponent"]
    assert np.array_equal(arrays["refit/fc3/z"], on_grid(z * 2.0**-exponent, SCALE))


# -- 5. analytic head: exact at small ridge penalties -------------------------------------------------


def _relations(
    r: np.ndarray, r2: np.ndarray, w: np.ndarray, w2: np.ndarray, x: np.ndarray, y: np.ndarray
) -> float:
    """The circuit's residuals (circuits/analytic.py), relative to the size of the terms."""
    r_w = w2 - w - r @ x.T @ (x @ w2 - y)
    r_r = r2 - r - r2 @ x.T @ (x @ r)
    return float(max(np.abs(r_w).max() / np.abs(w2).max(), np.abs(r_r).max() / np.abs(r2).max()))


@pytest.mark.parametrize("gamma", [1e-4, 1e-6])
def test_small_gamma_unlearning_equals_ridge_retrained_from_scratch(gamma: float) -> None:
    rng = np.random.default_rng(7)
    n, d, c = 120, 16, 4
    X = 10 * rng.normal(size=(n, d))
    Y = np.eye(c)[rng.integers(0, c, n)] + 0.1 * rng.normal(size=(n, c))
    head = AnalyticHead(d, c, gamma)
    for lo in range(0, n, 17):
        head.learn(X[lo : lo + 17], Y[lo : lo + 17])
    alive = np.ones(n, dtype=bool)
    for size in (1, 5, 30, 40, 30):  # down to 14 rows for 16 features: A's smallest eigenvalue is gamma
        idx = rng.choice(np.flatnonzero(alive), size=size, replace=False)
        r, w = head.R.copy(), head.W.copy()
        head.unlearn(X[idx], Y[idx])
        alive[idx] = False
        A = X[alive].T @ X[alive] + gamma * np.eye(d)
        ref, R_ref = reference_ridge(X[alive], Y[alive], gamma), np.linalg.inv(A)
        # As exact as retraining itself: float64 rounding times the retained problem's condition number,
        # i.e. ~1e-12 while the retained rows pin W down (cond ~10 here), 5e-8 once they do not (5e7).
        bound = 1e-15 * np.linalg.cond(A) + 1e-12
        assert np.abs(head.W - ref).max() <= bound * np.abs(ref).max()
        assert np.abs(head.R - R_ref).max() <= bound * np.abs(R_ref).max()
        # What the circuit checks holds for the new state against the old one.
        assert _relations(r, head.R, w, head.W, X[idx], Y[idx]) < 1e-12
    assert head.n_learned == alive.sum()

    # A head set from a committed (rounded) state downdates that very R: the circuit's relations hold
    # exactly for it, not for the Gram it no longer matches.
    committed = AnalyticHead(d, c, 1.0)
    full = AnalyticHead(d, c, 1.0)
    full.learn(X / 10, Y)
    committed.R, committed.W = np.round(full.R * 2**13) / 2**13, np.round(full.W * 2**13) / 2**13
    committed.n_learned = n
    r, w = committed.R.copy(), committed.W.copy()
    committed.unlearn(X[:3] / 10, Y[:3])
    assert _relations(r, committed.R, w, committed.W, X[:3] / 10, Y[:3]) < 1e-12


def test_enrolling_over_a_committed_state_is_refused_unless_asked(enrolled: GroupObsUnlearner) -> None:
    """A second enrollment (e.g. a user script run twice) must not destroy the blinding behind the
    commitments the provider holds: the device could never prove again."""
    before = _files(enrolled.state_dir)
    x, y = _data()
    with pytest.raises(UnlearningError, match=r"already holds a committed enrollment.*replace=True"):
        enrolled.enroll([LAYER], x, y, nn.functional.cross_entropy)
    assert _files(enrolled.state_dir) == before
    enrolled.enroll([LAYER], x, y, nn.functional.cross_entropy, replace=True)
    assert _files(enrolled.state_dir) != before
    _consistent(enrolled.state_dir)


def test_analytic_enrollment_over_a_committed_state_is_refused_unless_asked(
    analytic: tuple[AnalyticUnlearner, np.ndarray],
) -> None:
    unlearner, _x = analytic
    before = _files(unlearner.state_dir)
    with pytest.raises(UnlearningError, match="already holds a committed enrollment"):
        unlearner.enroll()
    assert _files(unlearner.state_dir) == before
    unlearner.enroll(replace=True)
    assert _files(unlearner.state_dir) != before
