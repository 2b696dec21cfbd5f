"""Real ezkl proofs: the provider refuses every attack with a specific reason; honest updates verify.

Keys and SRS are built once per session (k=14 circuits, ~5 s setup each). Honest data comes from
the client's Group-OBS solver and analytic head; every binding test runs the honest control first.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from zkunlearn.circuits import analytic as an
from zkunlearn.circuits import group_obs as go
from zkunlearn.circuits.export import export_relation
from zkunlearn.client.analytic import AnalyticHead
from zkunlearn.client.group_obs import solve_block
from zkunlearn.proofs.artifacts import CircuitArtifacts, build_provider_artifacts, client_artifacts
from zkunlearn.proofs.backend import EzklBackend, Proof, ProofFormatError, ProvingError
from zkunlearn.proofs.fixedpoint import (
    FIELD_MODULUS,
    analytic_tolerance,
    felts,
    group_obs_tolerance,
    int_to_felt,
    normalise_factor,
    random_blinding,
    request_binding,
)
from zkunlearn.proofs.prover import (
    GroupObsBatch,
    ProveJob,
    group_obs_tensors,
    new_group_obs_batch,
    prove_parallel,
    run_job,
)
from zkunlearn.proofs.srs import SrsError, SrsInfo, dev_srs, load_srs
from zkunlearn.proofs.verifier import (
    AnalyticVerifier,
    GroupObsVerifier,
    InMemoryReplayGuard,
    Reason,
    parse_submission,
)

pytestmark = pytest.mark.ezkl

B, M, NB, LAM, SCALE = 16, 8, 2, 0.05, 13
D, K, NU = 8, 3, 4
BACKEND = EzklBackend()


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ezkl")


@pytest.fixture(scope="session")
def srs_factory(workdir: Path) -> Any:
    cache: dict[int, SrsInfo] = {}

    def get(logrows: int) -> SrsInfo:
        if logrows not in cache:
            cache[logrows] = dev_srs(workdir / "srs", logrows)
        return cache[logrows]

    return get


@pytest.fixture(scope="session")
def go_arts(workdir: Path, srs_factory: Any) -> CircuitArtifacts:
    torch.set_num_threads(1)
    onnx = export_relation(
        go.GroupObsCheck(B, M, LAM),
        go.example_inputs(NB, B, M),
        workdir / "go.onnx",
        go.INPUT_NAMES,
        go.OUTPUT_NAMES,
    )
    arts = build_provider_artifacts(onnx, workdir / "cache", srs_factory)
    assert arts.logrows <= 17
    return arts


TOL = group_obs_tolerance(B, M, LAM, SCALE, theta_bound=4.0, g_bound=4.0, w_bound=4.0)


@pytest.fixture(scope="session")
def go_verifier(go_arts: CircuitArtifacts) -> GroupObsVerifier:
    return GroupObsVerifier(go_arts, n_blocks=NB, n_blind=go.N_BLIND, tolerance=TOL)


@dataclass
class Scenario:
    batch: GroupObsBatch
    request: bytes
    request_id: str
    theta_commit: str
    g_commit: str


def _honest(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    th, ta, gs, ms, ws = [], [], [], [], []
    for _ in range(NB):
        theta = np.clip(rng.normal(size=B), -3, 3)
        g, _ = normalise_factor(rng.normal(size=(M, B)))
        mask = np.zeros(B, bool)
        mask[rng.choice(B, 2, replace=False)] = True
        upd = solve_block(theta, g, mask, LAM)
        th.append(theta)
        ta.append(upd.theta_after)
        gs.append(g)
        ms.append(mask)
        ws.append(upd.w)
    return np.array(th), np.array(ta), np.array(gs), np.array(ms), np.array(ws)


@pytest.fixture(scope="session")
def scenario(go_verifier: GroupObsVerifier) -> Scenario:
    th, ta, gs, ms, ws = _honest(1)
    batch = new_group_obs_batch(th, ta, gs, ms, ws, scale=SCALE, n_blind=go.N_BLIND)
    assert np.abs(batch.w).max() < 4
    assert np.abs(batch.g).max() < 4
    request = hashlib.sha256(b"request-A").digest()
    tensors = group_obs_tensors(batch, request, SCALE, go.N_BLIND)
    # Enrollment: the client committed theta and G (with their blinding) before any request.
    return Scenario(batch, request, "req-A", go_verifier.commit(tensors[0]), go_verifier.commit(tensors[2]))


def _prove(arts: CircuitArtifacts, batch: GroupObsBatch, request: bytes) -> tuple[Proof, list[str]]:
    tensors = group_obs_tensors(batch, request, SCALE, go.N_BLIND)
    res = run_job(ProveJob(tensors, arts.compiled, arts.vk, arts.pk, arts.srs.path))
    return res.proof, res.commitments


@pytest.fixture(scope="session")
def honest_proof(go_arts: CircuitArtifacts, scenario: Scenario) -> tuple[Proof, list[str]]:
    return _prove(go_arts, scenario.batch, scenario.request)


def _verify(
    v: GroupObsVerifier,
    sc: Scenario,
    proof: Proof | dict[str, Any],
    claimed_after: str,
    *,
    mask: np.ndarray | None = None,
    request: bytes | None = None,
    theta_commit: str | None = None,
    replay: InMemoryReplayGuard | None = None,
    request_id: str | None = None,
) -> Any:
    mk = v.mask_commitment(
        sc.batch.mask if mask is None else mask, sc.request if request is None else request
    )
    return v.verify(
        proof,
        request_id=request_id or sc.request_id,
        enrolled_theta=theta_commit or sc.theta_commit,
        enrolled_g=sc.g_commit,
        mask_commitment=mk,
        claimed_theta_after=claimed_after,
        replay=replay or InMemoryReplayGuard(),
    )


def test_honest_group_obs_verifies(
    go_verifier: GroupObsVerifier, scenario: Scenario, honest_proof: Any
) -> None:
    proof, commits = honest_proof
    verdict = _verify(go_verifier, scenario, proof, commits[1])
    assert verdict.ok, verdict
    # Derived tolerance vs observed honest residuals: the margin is reported by the bench/report.
    assert max(r[1] for r in verdict.residuals) < TOL.kkt / 4
    assert max(r[2] for r in verdict.residuals) < TOL.row / 4
    assert all(r[0] == 0.0 for r in verdict.residuals)


def test_commitments_match_enrollment(scenario: Scenario, honest_proof: Any) -> None:
    _, commits = honest_proof
    assert commits[0] == scenario.theta_commit
    assert commits[2] == scenario.g_commit


def test_attack1_theta_not_enrolled(
    go_verifier: GroupObsVerifier, scenario: Scenario, honest_proof: Any
) -> None:
    proof, commits = honest_proof
    assert _verify(go_verifier, scenario, proof, commits[1]).ok
    other = np.concatenate([scenario.batch.theta + 0.25, scenario.batch.theta_blind], axis=1)
    verdict = _verify(go_verifier, scenario, proof, commits[1], theta_commit=go_verifier.commit(other))
    assert not verdict.ok
    assert verdict.reason is Reason.BINDING_OR_INVALID
    # A proof honestly made from another starting point is refused the same way.
    fake = scenario.batch
    fake_batch = GroupObsBatch(
        fake.theta + 0.25,
        fake.theta_after,
        fake.g,
        fake.mask,
        fake.w,
        fake.theta_blind,
        fake.theta_after_blind,
        fake.g_blind,
        fake.w_blind,
    )
    p2, c2 = _prove(go_verifier._arts, fake_batch, scenario.request)
    assert _verify(go_verifier, scenario, p2, c2[1]).reason is Reason.BINDING_OR_INVALID


def test_attack2_masked_not_zero(go_verifier: GroupObsVerifier, scenario: Scenario) -> None:
    ta = scenario.batch.theta_after.copy()
    ta[scenario.batch.mask] = 0.01
    proof, commits = _prove(go_verifier._arts, scenario.batch.with_theta_after(ta), scenario.request)
    verdict = _verify(go_verifier, scenario, proof, commits[1])
    assert verdict.reason is Reason.MASK_NOT_ZERO, verdict


def test_attack3_kkt_violations(go_verifier: GroupObsVerifier, scenario: Scenario) -> None:
    b = scenario.batch
    # (a) no compensation: masked weights zeroed, nothing else moves; w = 0.
    ta = np.where(b.mask, 0.0, b.theta)
    proof, commits = _prove(go_verifier._arts, b.with_theta_after(ta, np.zeros_like(b.w)), scenario.request)
    va = _verify(go_verifier, scenario, proof, commits[1])
    assert va.reason in (Reason.KKT_VIOLATED, Reason.ROW_SPACE_VIOLATED), va
    assert max(r[1] for r in va.residuals) > 2 * TOL.kkt
    # (b) compensation computed from a different G (the client's own, not the enrolled one).
    rng = np.random.default_rng(7)
    ups = [
        solve_block(b.theta[i], normalise_factor(rng.normal(size=(M, B)))[0], b.mask[i], LAM)
        for i in range(NB)
    ]
    tb = np.array([u.theta_after for u in ups])
    wb = np.array([u.w for u in ups])
    proof, commits = _prove(go_verifier._arts, b.with_theta_after(tb, wb), scenario.request)
    vb = _verify(go_verifier, scenario, proof, commits[1])
    assert vb.reason in (Reason.KKT_VIOLATED, Reason.ROW_SPACE_VIOLATED), vb


def test_attack4_other_mask_or_request(
    go_verifier: GroupObsVerifier, scenario: Scenario, honest_proof: Any
) -> None:
    proof, commits = honest_proof
    assert _verify(go_verifier, scenario, proof, commits[1]).ok
    other_mask = scenario.batch.mask.copy()
    other_mask[0] = ~other_mask[0]
    assert (
        _verify(go_verifier, scenario, proof, commits[1], mask=other_mask).reason is Reason.BINDING_OR_INVALID
    )
    other_req = hashlib.sha256(b"request-B").digest()
    verdict = _verify(go_verifier, scenario, proof, commits[1], request=other_req, request_id="req-B")
    assert verdict.reason is Reason.BINDING_OR_INVALID


def test_attack5_replay(go_verifier: GroupObsVerifier, scenario: Scenario, honest_proof: Any) -> None:
    proof, commits = honest_proof
    guard = InMemoryReplayGuard()
    first = _verify(go_verifier, scenario, proof, commits[1], replay=guard)
    assert first.ok
    guard.record(first.proof_digest, scenario.request_id)
    again = _verify(go_verifier, scenario, proof, commits[1], replay=guard)
    assert not again.ok
    assert again.reason is Reason.REPLAYED_PROOF
    # The same proof for a fresh request id: the digest is already used.
    assert (
        _verify(go_verifier, scenario, proof, commits[1], replay=guard, request_id="x").reason
        is Reason.REPLAYED_PROOF
    )


def test_attack6_any_byte_changed(
    go_verifier: GroupObsVerifier, scenario: Scenario, honest_proof: Any
) -> None:
    proof, commits = honest_proof
    assert _verify(go_verifier, scenario, proof, commits[1]).ok
    n = len(proof.transcript)
    rng = np.random.default_rng(3)
    positions = sorted({0, 1, 31, 32, 64, n // 2, n - 33, n - 1, *rng.integers(0, n, 12).tolist()})
    for pos in positions:
        raw = bytearray(proof.transcript)
        raw[pos] ^= 0x01
        v = _verify(go_verifier, scenario, Proof(bytes(raw), proof.instances), commits[1])
        assert not v.ok, f"flip at transcript byte {pos} accepted"
    for j in range(len(proof.instances[0])):
        for byte in (0, 31):
            inst = [list(r) for r in proof.instances]
            b = bytearray(bytes.fromhex(inst[0][j]))
            b[byte] ^= 0x01
            inst[0][j] = b.hex()
            v = _verify(
                go_verifier, scenario, Proof(proof.transcript, tuple(tuple(r) for r in inst)), commits[1]
            )
            assert not v.ok, f"flip in instance {j} byte {byte} accepted"


def test_attack7_client_keys_refused(
    go_verifier: GroupObsVerifier, scenario: Scenario, honest_proof: Any, workdir: Path, srs_factory: Any
) -> None:
    proof, commits = honest_proof
    sub = proof.to_json()
    assert _verify(go_verifier, scenario, parse_submission(sub), commits[1]).ok
    for key in ("vk", "settings"):
        with pytest.raises(ProofFormatError, match="own keys"):
            parse_submission({**sub, key: "00"})
        assert _verify(go_verifier, scenario, {**sub, key: "00"}, commits[1]).reason is Reason.MALFORMED

    # A client compiles a lenient circuit of its own (residuals multiplied by zero) and proves a
    # no-compensation update with it: the provider's own vk refuses the proof.
    class Lenient(go.GroupObsCheck):
        def forward(self, *a: torch.Tensor) -> torch.Tensor:
            return super().forward(*a) * 0.0

    onnx = export_relation(
        Lenient(B, M, LAM),
        go.example_inputs(NB, B, M),
        workdir / "lenient.onnx",
        go.INPUT_NAMES,
        go.OUTPUT_NAMES,
    )
    lenient = build_provider_artifacts(onnx, workdir / "client-cache", srs_factory)
    b = scenario.batch
    bad = b.with_theta_after(np.where(b.mask, 0.0, b.theta), np.zeros_like(b.w))
    p, c = _prove(lenient, bad, scenario.request)
    assert BACKEND.verify(
        p, lenient.settings, lenient.vk, lenient.srs.path, None
    )  # valid under the client's vk
    v = _verify(go_verifier, scenario, p, c[1])
    assert not v.ok
    assert v.reason is Reason.BINDING_OR_INVALID


def test_attack9_null_space_edit(go_verifier: GroupObsVerifier, scenario: Scenario) -> None:
    b = scenario.batch
    ta = b.theta_after.copy()
    for i in range(NB):
        u = ~b.mask[i]
        assert int(u.sum()) > M
        gu = b.g[i][:, u]
        _, _, vt = np.linalg.svd(gu)
        p = vt[-1]  # G_U p = 0
        ta[i, u] += 0.5 * p / np.abs(p).max()
        assert np.abs(b.g[i][:, u] @ p).max() < 1e-9
    proof, commits = _prove(go_verifier._arts, b.with_theta_after(ta), scenario.request)
    v = _verify(go_verifier, scenario, proof, commits[1])
    assert v.reason is Reason.ROW_SPACE_VIOLATED, v
    # r_kkt alone would have let it through: it moves only by lam * p.
    assert max(r[1] for r in v.residuals) <= TOL.kkt


def test_attack10_out_of_range_field_element(go_verifier: GroupObsVerifier, scenario: Scenario) -> None:
    arts = go_verifier._arts
    tensors = group_obs_tensors(scenario.batch, scenario.request, SCALE, go.N_BLIND)
    huge = int_to_felt(FIELD_MODULUS // 3)
    bad = [list(t) for t in tensors]
    bad[4][0] = huge  # w: free, committed, only range checks bound it
    with pytest.raises(ProvingError):
        BACKEND.witness(bad, arts.compiled, arts.vk, arts.srs.path)
    # A modified prover that skips witness generation: edit an honest witness and prove.
    wit = BACKEND.witness(tensors, arts.compiled, arts.vk, arts.srs.path)
    wit["inputs"][4][0] = huge
    try:
        proof = BACKEND.prove(wit, arts.compiled, arts.pk, arts.srs.path)
    except ProvingError:
        return
    v = _verify(go_verifier, scenario, proof, go_verifier.commit(tensors[1]))
    assert not v.ok


def test_client_vk_equals_provider_vk(go_arts: CircuitArtifacts, workdir: Path) -> None:
    cc = client_artifacts(
        go_arts.compiled.read_bytes(), go_arts.settings.read_bytes(), go_arts.srs, workdir / "client"
    )
    assert cc.vk.read_bytes() == go_arts.vk.read_bytes()


def test_dev_srs_is_labelled_insecure(workdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        info = dev_srs(workdir / "srs", 14)
    assert info.insecure
    assert json.loads(info.path.with_suffix(".json").read_text())["insecure"] is True
    assert "INSECURE" in caplog.text


def test_production_srs_refuses_mismatched_digest(workdir: Path) -> None:
    info = dev_srs(workdir / "srs", 14)
    assert not load_srs(info.path, info.sha256, 14).insecure
    with pytest.raises(SrsError, match="expected pinned"):
        load_srs(info.path, "00" * 32, 14)


# ---- analytic head -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def an_setup(workdir: Path, srs_factory: Any) -> tuple[AnalyticVerifier, dict[str, np.ndarray]]:
    onnx = export_relation(
        an.AnalyticCheck(D, K, NU),
        an.example_inputs(D, K, NU),
        workdir / "an.onnx",
        an.INPUT_NAMES,
        an.OUTPUT_NAMES,
    )
    arts = build_provider_artifacts(onnx, workdir / "cache", srs_factory)
    assert arts.logrows <= 17
    rng = np.random.default_rng(5)
    x = rng.normal(size=(12, D)) * 0.5
    y = rng.normal(size=(12, K))
    head = AnalyticHead(D, K, gamma=1.0)
    head.learn(x, y)
    r, w = head.R.copy(), head.W.copy()
    head.unlearn(x[:NU], y[:NU])
    data = {"r": r, "r_after": head.R.copy(), "w": w, "w_after": head.W.copy(), "x_u": x[:NU], "y_u": y[:NU]}
    assert max(float(np.abs(data[n]).max()) for n in ("r", "r_after")) <= 1.0
    assert max(float(np.abs(data[n]).max()) for n in ("w", "w_after")) <= 2.0
    assert max(float(np.abs(data[n]).max()) for n in ("x_u", "y_u")) <= 3.0
    tol = analytic_tolerance(D, K, NU, SCALE, r_bound=1.0, x_bound=3.0, w_bound=2.0, inner_bound=4.0)
    return AnalyticVerifier(arts, d=D, tolerance=tol), data


def _analytic_tensors(
    data: dict[str, np.ndarray], blind: dict[str, np.ndarray], request: bytes
) -> list[list[str]]:
    out = []
    for name in an.INPUT_NAMES:
        v = data[name]
        extra = (
            request_binding(request + name.encode(), v.shape[1], SCALE)
            if name in ("x_u", "y_u")
            else blind[name]
        )
        out.append(felts(np.vstack([v, extra[None, :]]), SCALE))
    return out


def test_analytic_honest_and_wrong_head(an_setup: Any) -> None:
    verifier, data = an_setup
    arts = verifier._arts
    request = hashlib.sha256(b"analytic-request").digest()
    blind = {n: random_blinding(data[n].shape[1], SCALE) for n in ("r", "r_after", "w", "w_after")}
    honest = _analytic_tensors(data, blind, request)
    enrolled_r, enrolled_w = verifier.commit(honest[0]), verifier.commit(honest[2])
    fx, fy = verifier.commit(honest[4]), verifier.commit(honest[5])

    def check(tensors: list[list[str]]) -> Any:
        res = run_job(ProveJob(tensors, arts.compiled, arts.vk, arts.pk, arts.srs.path))
        return verifier.verify(
            res.proof,
            request_id="a1",
            enrolled_r=enrolled_r,
            claimed_r_after=res.commitments[1],
            enrolled_w=enrolled_w,
            claimed_w_after=res.commitments[3],
            forget_x=fx,
            forget_y=fy,
            replay=InMemoryReplayGuard(),
        )

    ok = check(honest)
    assert ok.ok, ok
    # Attack 8: W' is not the retrained solution (a plain gradient-free edit of one entry).
    wrong = dict(data)
    wrong["w_after"] = data["w_after"] + np.eye(D, K) * 0.25
    v = check(_analytic_tensors(wrong, blind, request))
    assert v.reason is Reason.ANALYTIC_W_WRONG, v


def test_prover_memory_cap_fails_cleanly(go_arts: CircuitArtifacts, scenario: Scenario) -> None:
    """A worker over its resident-memory cap is stopped and reported as a ProvingError naming the job
    and the cap, not a hang; the same job under a cap above its measured peak is proven."""
    tensors = group_obs_tensors(scenario.batch, scenario.request, SCALE, go.N_BLIND)
    job = ProveJob(tensors, go_arts.compiled, go_arts.vk, go_arts.pk, go_arts.srs.path, label="capped")
    with pytest.raises(ProvingError, match=r"capped: stopped at \d+ MB resident memory, over the 64 MB cap"):
        prove_parallel([job], workers=1, memory_limit_mb=64, progress=False)
    (ok,) = prove_parallel([job], workers=1, memory_limit_mb=2048, progress=False)
    assert 64 < ok.peak_rss_mb < 2048


USER_SCRIPT_WITHOUT_MAIN_GUARD = """
import json, sys
from pathlib import Path
from zkunlearn.proofs.prover import ProveJob, prove_parallel

# A user's top-level side effect (personalising, enrolling, ...): it must run exactly once.
with open(sys.argv[1], "a") as marker:
    marker.write("ran\\n")
job = ProveJob.from_json(json.loads(Path(sys.argv[2]).read_text()))
results = prove_parallel([job, job], workers=2, memory_limit_mb=2048, progress=True)
Path(sys.argv[3]).write_text(json.dumps([r.to_json() for r in results]))
"""


def test_provers_never_rerun_the_callers_script(
    go_arts: CircuitArtifacts, go_verifier: GroupObsVerifier, scenario: Scenario, tmp_path: Path
) -> None:
    """A user program without an ``if __name__ == "__main__"`` guard proves in parallel workers: its
    body runs once (spawned workers re-imported it and re-ran it, enrollment included), both proofs
    verify, and a non-TTY log shows one progress line per finished job."""
    import subprocess
    import sys

    from zkunlearn.proofs.prover import ProveResult

    tensors = group_obs_tensors(scenario.batch, scenario.request, SCALE, go.N_BLIND)
    job = ProveJob(tensors, go_arts.compiled, go_arts.vk, go_arts.pk, go_arts.srs.path, label="user")
    script, marker = tmp_path / "user_program.py", tmp_path / "marker.txt"
    job_file, out = tmp_path / "job.json", tmp_path / "results.json"
    script.write_text(USER_SCRIPT_WITHOUT_MAIN_GUARD)
    job_file.write_text(json.dumps(job.to_json()))
    done = subprocess.run(
        [sys.executable, str(script), str(marker), str(job_file), str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert marker.read_text().splitlines() == ["ran"]
    assert "proved 2/2 (user)" in done.stderr
    results = [ProveResult.from_json(r) for r in json.loads(out.read_text())]
    for result in results:
        assert _verify(go_verifier, scenario, result.proof, result.commitments[1]).ok
        # A worker holds the interpreter, numpy and ezkl before its job, never torch.
        assert 0 < result.extra["baseline_rss_mb"] < result.peak_rss_mb
        assert result.extra["overhead_s"] >= 0


def test_dual_form_proofs(workdir: Path, srs_factory: Any, scenario: Scenario) -> None:
    """The cheaper dual relation: fewer rows, honest verifies, no-compensation is refused."""
    onnx = export_relation(
        go.GroupObsCheck(B, M, LAM, form="dual"),
        go.example_inputs(NB, B, M),
        workdir / "dual.onnx",
        go.INPUT_NAMES,
        go.OUTPUT_NAMES,
    )
    arts = build_provider_artifacts(onnx, workdir / "cache", srs_factory)
    assert arts.settings_dict["num_rows"] < 0.8 * 9675
    tol = group_obs_tolerance(B, M, LAM, SCALE, theta_bound=4.0, g_bound=4.0, w_bound=4.0, form="dual")
    v = GroupObsVerifier(arts, n_blocks=NB, n_blind=go.N_BLIND, tolerance=tol)
    tensors = group_obs_tensors(scenario.batch, scenario.request, SCALE, go.N_BLIND)
    sc = Scenario(scenario.batch, scenario.request, "req-dual", v.commit(tensors[0]), v.commit(tensors[2]))
    proof, commits = _prove(arts, sc.batch, sc.request)
    honest = _verify(v, sc, proof, commits[1])
    assert honest.ok, honest
    b = sc.batch
    bad = b.with_theta_after(np.where(b.mask, 0.0, b.theta), np.zeros_like(b.w))
    proof, commits = _prove(arts, bad, sc.request)
    assert _verify(v, sc, proof, commits[1]).reason is Reason.KKT_VIOLATED
