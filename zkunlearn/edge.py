"""One edge client as its own process: personalize, enroll, wait for a deletion, apply, prove, submit.

``zkunlearn client run --profile profile.json`` runs this. The profile names the scenario (so the
process rebuilds the same models as the provider from the cache), the provider's address and pinned
key, the update method, and, for the demo's dishonest clients, how it cheats. Results are written as
JSON for the demo's report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from rich.console import Console
from torch import nn

from zkunlearn.client.device import EdgeDevice
from zkunlearn.client.group_obs_exact import ExactUpdate
from zkunlearn.client.sdk import Outcome, UpdateResult, VerifiedRequest
from zkunlearn.client.transport import ChannelConfig
from zkunlearn.client.unlearning import ProveOptions
from zkunlearn.client.unlearning_exact import ExactGroupObsUnlearner
from zkunlearn.proofs.exact import IntArray
from zkunlearn.scenario import Scenario
from zkunlearn.tasks.forgetting import auc
from zkunlearn.tasks.train import cross_entropy

BEHAVIOURS = ("honest", "other-model", "extra-edit")


@dataclass(frozen=True)
class Profile:
    client_id: str
    method: str  # "group-obs" or "analytic"
    behaviour: str  # one of BEHAVIOURS
    client_seed: int
    provider: str
    provider_public_key: str  # hex; pinned, never learned on first use in the demo
    state_dir: str
    result_file: str
    quick: bool = False
    timeout_s: float = 900.0

    @classmethod
    def load(cls, path: Path) -> Profile:
        return cls(**json.loads(Path(path).read_text()))

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))


class ExtraEdit(ExactGroupObsUnlearner):
    """Dishonest: applies the honest update plus a small edit of its own to one unmasked weight of each
    touched block (e.g. slipping in a backdoor while "unlearning"), and proves that.

    The edit is no Group-OBS solution for the committed ``G``: the exact relation's ``Σ R_w²`` (and,
    off ``G``'s row space, ``Σ R_row²``) exceeds its threshold, so the provider rejects the proof. The
    relation's slack is about 10⁻³ of a weight's standard deviation (docs/protocol.md); this edit is
    0.05 on the normalised weights' scale (they lie within ±4 there).
    """

    self_check = False
    edit = 0.05

    def batch_update(self, theta: IntArray, g: IntArray, mask: npt.NDArray[np.bool_]) -> ExactUpdate:
        update = super().batch_update(theta, g, mask)
        after = update.theta_after.copy()
        step = round(self.edit * 2.0**self.spec.theta_bits)
        for q in range(after.shape[0]):
            free = np.flatnonzero(~mask[q])
            if mask[q].any() and free.size:
                after[q, free[0]] += step
        return replace(update, theta_after=after)


class ProvesAnotherModel(ExactGroupObsUnlearner):
    """Dishonest: proves the update on other weights (the global model's) than the ones it enrolled."""

    self_check = False

    def __init__(self, *args: Any, other: nn.Module, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.other = dict(other.named_parameters())

    def prove(self, request: VerifiedRequest) -> UpdateResult:
        path = self.state_dir / "state.npz"
        with np.load(path) as stored:
            arrays = {k: np.asarray(stored[k]) for k in stored.files}
        meta = json.loads((self.state_dir / "state.json").read_text())
        step = 2.0**self.spec.theta_bits
        for layer, info in meta["layers"].items():
            theta = self.other[layer].detach().double().numpy().reshape(arrays[f"{layer}/theta"].shape)
            arrays[f"{layer}/theta"] = np.rint(theta * 2.0 ** int(info["exponent"]) * step) / step
        np.savez(path, **arrays)  # type: ignore[arg-type]
        return super().prove(request)


def run_client(profile: Profile, console: Console | None = None) -> dict[str, Any]:
    console = console or Console(stderr=True)
    scenario = Scenario(quick=profile.quick)
    result: dict[str, Any] = {
        "client_id": profile.client_id,
        "method": profile.method,
        "honest": profile.behaviour == "honest",
    }
    with console.status(f"[{profile.client_id}] personalizing and enrolling"):
        # The device downloads the published circuit (never a proving key) and derives it itself; the
        # demo's circuits are built on a development SRS.
        device = EdgeDevice.connect(
            ChannelConfig(profile.provider, call_timeout_s=300.0, retry_attempts=20, retry_budget_s=120.0),
            scenario.model_id,
            provider_key=profile.provider_public_key,
            state_dir=profile.state_dir,
            client_id=profile.client_id,
            kind="group_obs_exact" if profile.method == "group-obs" else "analytic_exact",
            allow_insecure_srs=True,
            prove_options=ProveOptions(workers=1, memory_limit_mb=None, progress=False),
            console=console,
            receipt_wait_s=600.0,
        )
        if profile.method == "group-obs":
            model = scenario.personalized(profile.client_seed)
            before = scenario.client_metrics(model)
            prover: Callable[..., ExactGroupObsUnlearner] = ExactGroupObsUnlearner
            if profile.behaviour == "extra-edit":
                prover = ExtraEdit
            elif profile.behaviour == "other-model":
                prover = partial(ProvesAnotherModel, other=scenario.global_model())
            data = scenario.task.client_after_request
            device.enroll_model(
                model,
                list(scenario.layers),
                data.x,
                data.y,
                cross_entropy,
                fisher_shift=scenario.fisher_shift,
                prover_class=prover,
            )
        else:
            learned = scenario.analytic_learned()
            contributed = scenario.contributed_forget_samples()
            x = np.vstack([scenario.features(learned.x), scenario.features(contributed.x)])
            y = np.concatenate([learned.y.numpy(), contributed.y.numpy()])
            device.enroll_head(x, y)
            before = _head_metrics(scenario, device)
    (Path(profile.state_dir) / "enrolled").write_text("ok")
    console.print(f"[{profile.client_id}] enrolled; waiting for a deletion request", markup=False)
    outcome = _wait_for_decision(device, profile.timeout_s)
    if profile.method == "group-obs":
        after = scenario.client_metrics(model)
    else:
        after = _head_metrics(scenario, device)
    stats = device.unlearner.last_proof_stats() if device.unlearner is not None else {}
    result.update(
        verdict=outcome.status,
        reason=outcome.reason,
        request_id=outcome.request_id,
        forget_acc_before=before["forget_acc"],
        forget_acc_after=after["forget_acc"],
        personal_acc_before=before["personal_acc"],
        personal_acc_after=after["personal_acc"],
        retain_acc_before=before["retain_acc"],
        retain_acc_after=after["retain_acc"],
        probe_acc_before=before["probe_acc"],
        probe_acc_after=after["probe_acc"],
        mia_auc_before=before["mia_auc"],
        mia_auc_after=after["mia_auc"],
        prove_s=float(sum(stats.get("prove_s") or [0.0])),
        proofs=len(stats.get("prove_s") or []),
        peak_rss_mb=float(max(stats.get("peak_rss_mb") or [0.0])),
        proof_bytes=int(stats.get("proof_bytes") or 0),
        log_size_verified=device.verify_log(),
    )
    device.close()
    Path(profile.result_file).write_text(json.dumps(result, indent=2))
    console.print(f"[{profile.client_id}] {outcome.status}: {outcome.reason or 'ok'}", markup=False)
    return result


def _head_metrics(scenario: Scenario, head: EdgeDevice) -> dict[str, float | None]:
    task = scenario.task

    def acc(split: Any) -> float:
        if len(split) == 0:
            return float("nan")
        return float(np.mean(head.predict(scenario.features(split.x)).argmax(1) == split.y.numpy()))

    def true_class_score(split: Any) -> npt.NDArray[np.float64]:
        scores = np.asarray(head.predict(scenario.features(split.x)), dtype=np.float64)
        picked: npt.NDArray[np.float64] = scores[np.arange(len(split)), split.y.numpy()]
        return picked

    # The head learned the forget class from the provider's samples (the contributed ones), so its
    # forgetting is read where it learned the class, as the Group-OBS clients' is
    # (Scenario.client_metrics): held-out forget-class images of the provider's domain. Its membership
    # attack scores the contributed samples (members) against those held-out images by the head's score
    # for the true class; the probe is not defined for it (the backbone is frozen: its features never
    # change).
    forget = task.provider_test.of_class(task.forget_class)
    return {
        "forget_acc": acc(forget),
        "personal_acc": acc(task.client_test.without_class(task.forget_class)),
        "retain_acc": acc(task.provider_test.without_class(task.forget_class)),
        "probe_acc": None,
        "mia_auc": auc(true_class_score(scenario.contributed_forget_samples()), true_class_score(forget)),
    }


def _wait_for_decision(device: EdgeDevice, timeout_s: float) -> Outcome:
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        for outcome in device.run(max_requests=1, timeout_s=left, verify_log=False):
            if outcome.status in ("accepted", "rejected", "refused"):
                return outcome
    raise TimeoutError(f"no deletion request was decided within {timeout_s:.0f} s")


def main(profile_path: Path) -> int:
    run_client(Profile.load(profile_path))
    return 0
