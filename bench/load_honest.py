"""The ``real-honest`` load mode: every simulated client proves its own deletions for real.

Each client is the edge SDK with an exact analytic head (:class:`ExactAnalyticUnlearner`, the smallest
shape the product ships a relation for: d 4, k 3, two forget rows per proof): it learns its own rows,
enrolls with a real enrollment proof, and answers **two successive deletions** with real ezkl proofs,
so the provider's accept path runs at load: verification, the compare-and-set of the client's
commitments, the signed receipt and the next deletion checked against the new state. A share of the
clients forge their second answer, each with an attack the tests refuse (the head kept, the Gram not
downdated, a head 1 % off): their expected verdicts are accepted then rejected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from zkunlearn.client.analytic_exact import ExactAnalyticUnlearner
from zkunlearn.client.unlearning import ProveOptions
from zkunlearn.proofs.analytic_exact import ExactAnalyticSpec, IntArray
from zkunlearn.proofs.artifacts import ClientCircuit, derive_analytic_exact_client_circuit
from zkunlearn.proofs.deletion import DeletionCircuits
from zkunlearn.proofs.statements import StatementSigner

from .load_world import policy_table

MODEL = "load-head"
SPEC = ExactAnalyticSpec(4, 3, 2)
FORGERIES = ("kept-head", "gram-not-downdated", "head-nudged")
ROWS_PER_CLIENT = 40


@dataclass(frozen=True)
class HonestWorld:
    """The provider's published circuit, its key and config lines, and what every device derives."""

    key_file: Path
    config_top: tuple[str, ...]
    config_tables: tuple[str, ...]
    circuit: ClientCircuit
    features: np.ndarray
    labels: np.ndarray
    mode: str = "real-honest"
    templates: tuple[Any, ...] = field(default=())


def honest_world(work: Path) -> HonestWorld:
    """Publish the exact analytic circuit, and derive the device circuit from the served settings once
    (every device would derive the same one; sharing it only saves the compile)."""
    from sklearn.datasets import load_digits

    circuits = DeletionCircuits.build(work / "circuits", group_obs=None, analytic=None, analytic_exact=SPEC)
    assert circuits.analytic_exact is not None
    _spec, published = circuits.analytic_exact
    circuit = derive_analytic_exact_client_circuit(
        SPEC, published.settings.read_bytes(), published.srs, work / "device-circuit"
    )
    key = work / "provider.key"
    StatementSigner.generate().save(key)
    digits = load_digits()
    rng = np.random.default_rng(7)
    projected = digits.data / 16.0 @ (rng.normal(size=(64, SPEC.d)) / 8.0)
    projected = projected / np.quantile(np.abs(projected), 0.99) * SPEC.x_bound / 4
    return HonestWorld(
        key,
        ('verifier = "zkunlearn.provider.verification:from_config"', "srs_insecure = true"),
        (
            *policy_table(("analytic_exact",)),
            f"[artifacts.{json.dumps(MODEL)}]",
            f"circuits_dir = {json.dumps(str(circuits.directory))}",
        ),
        circuit,
        np.clip(projected, -SPEC.x_bound / 2, SPEC.x_bound / 2),
        digits.target % SPEC.k,
    )


class ForgingUnlearner(ExactAnalyticUnlearner):
    """Honest on its first deletion; on its second it answers with one of :data:`FORGERIES`, skipping
    its own pre-proving check (which would stop it)."""

    def __init__(self, *args: Any, forgery: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.forgery = forgery
        self.answered = 0

    @property
    def forging(self) -> bool:
        return self.answered >= 2

    def prove(self, request: Any) -> Any:
        self.answered += 1
        return super().prove(request)

    def _downdate(self, m: IntArray, z_u: IntArray) -> IntArray:
        if self.forging and self.forgery == "gram-not-downdated":
            return m
        return super()._downdate(m, z_u)

    def _solve(self, m_after: IntArray, w_before: IntArray) -> tuple[IntArray, IntArray]:
        w, factor = super()._solve(m_after, w_before)
        if self.forging and self.forgery == "kept-head":
            return w_before, factor
        if self.forging and self.forgery == "head-nudged":
            nudge = np.zeros(np.asarray(w).shape, dtype=object)
            nudge[0, 0] = int(0.01 * float(np.std(np.asarray(w, dtype=np.float64)))) + 1
            return w + nudge, factor
        return w, factor

    def _check(self, *args: IntArray) -> None:
        if not self.forging:
            super()._check(*args)


@dataclass
class ClientPlan:
    """One simulated client: its rows, the two deletions it will get, and whether it forges."""

    rows: np.ndarray
    deletions: tuple[np.ndarray, np.ndarray]
    forgery: str | None


def plan_client(world: HonestWorld, rng: np.random.Generator, forge: bool) -> ClientPlan:
    rows = rng.choice(len(world.labels), size=ROWS_PER_CLIENT, replace=False)
    first, second = rows[: SPEC.n_u], rows[SPEC.n_u : 2 * SPEC.n_u]
    return ClientPlan(rows, (first, second), str(rng.choice(FORGERIES)) if forge else None)


def make_unlearner(world: HonestWorld, plan: ClientPlan, state_dir: Path) -> ExactAnalyticUnlearner:
    options = ProveOptions(workers=1, memory_limit_mb=None, progress=False)
    if plan.forgery is None:
        return ExactAnalyticUnlearner(SPEC, world.circuit, state_dir, options)
    return ForgingUnlearner(SPEC, world.circuit, state_dir, options, forgery=plan.forgery)


def expected_verdicts(plan: ClientPlan) -> tuple[str, str]:
    return ("accepted", "rejected") if plan.forgery else ("accepted", "accepted")


def machine_load_sampler(stop: Any, samples: list[float], every_s: float = 5.0) -> None:
    """Sample the 1-minute load average until ``stop`` is set (reported beside the results)."""
    import os

    while not stop.wait(every_s):
        samples.append(round(os.getloadavg()[0], 2))
    samples.append(round(os.getloadavg()[0], 2))


@dataclass
class Deletion:
    """One deletion of a session: what was expected and what the client saw."""

    request_id: str = ""
    expected: str = ""
    verdict: str = ""
    leaf_index: int = -1
    receipt: bytes = b""


@dataclass
class HonestSession:
    client_id: str
    deletions: list[Deletion]
    known_head: dict[str, Any] | None = None
    enrolled: bool = False
    chain_intact: bool = False
    log_size_checked: int = 0
    error: str = ""
    seconds: float = 0.0
    prove_s: float = 0.0


def honest_session(
    index: int,
    world: HonestWorld,
    plan: ClientPlan,
    target: str,
    operator: Any,
    provider_key: bytes,
    interceptors: list[Any],
    work: Path,
) -> HonestSession:
    """Enroll with a real enrollment proof, then get and answer two deletions, one after the other."""
    import time

    from zkunlearn.circuits.mask import Mask
    from zkunlearn.client.sdk import EdgeClient
    from zkunlearn.client.store import ClientStore
    from zkunlearn.client.transport import ChannelConfig, Transport
    from zkunlearn.proofs.deletion import UPDATE_KIND_ANALYTIC_EXACT
    from zkunlearn.provider.service import TensorData

    cid = f"honest-{index:05d}"
    session = HonestSession(cid, [Deletion(expected=v) for v in expected_verdicts(plan)])
    t0 = time.perf_counter()
    unlearner = make_unlearner(world, plan, work / "clients" / cid / "head")
    # Devices retry for minutes (budget, not attempt count): a replica restarts in seconds under load.
    channel = ChannelConfig(target, call_timeout_s=120, retry_attempts=10_000, retry_budget_s=300)
    client = EdgeClient(
        Transport(channel, interceptors),
        ClientStore(work / "clients" / f"{cid}.db"),
        unlearner,
        provider_public_key=provider_key,
        receipt_wait_s=600,
    )
    try:
        x, y = world.features[plan.rows], world.labels[plan.rows]
        enrollment = unlearner.enroll(x, y)
        client.enroll(
            cid, MODEL, ["head"], UPDATE_KIND_ANALYTIC_EXACT, enrollment.commitments, enrollment.proofs
        )
        session.enrolled = True
        for deletion, rows in zip(session.deletions, plan.deletions, strict=True):
            features = world.features[rows]
            labels = world.labels[rows].astype(np.float64)
            request = operator.create_request(
                cid,
                Mask(()),
                forget_features=TensorData(features.shape, features.astype("<f8").tobytes()),
                forget_labels=TensorData(labels.shape, labels.astype("<f8").tobytes()),
            )
            deletion.request_id = request.request_id
            outcomes = [o for o in client.watch(max_requests=1, reconnect_budget_s=300)]
            if outcomes:
                deletion.verdict = outcomes[0].status
                deletion.leaf_index = -1 if outcomes[0].leaf_index is None else outcomes[0].leaf_index
                applied = client.store.applied(request.request_id)
                deletion.receipt = applied.receipt_canonical if applied else b""
        session.log_size_checked = client.verify_log()
        session.known_head = client.known_head()
        record = operator.state.get_client(cid)
        mine = sorted(json.dumps(c.to_json(), sort_keys=True) for c in client.commitments)
        theirs = sorted(json.dumps(c, sort_keys=True) for c in json.loads(record.current_commitments))
        session.chain_intact = mine == theirs
        session.prove_s = float(sum(unlearner.last_proof_stats().get("prove_s") or [0.0]))
    except Exception as exc:  # counted and reported: a failed session is a finding, not a crash
        session.error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        client.close()
        client.store.close()
        session.seconds = time.perf_counter() - t0
    return session
