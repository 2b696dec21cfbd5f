"""Real ezkl/Halo2 proofs of the output refit, bound to a real Group-OBS proof of the masked layer.

What this shows, for ReLU and for GELU (computed in the circuit by the certified polynomial of
``circuits.activations``; range checks only, ``make_settings`` refuses lookups):

* the refit circuit takes ``W1`` and ``W1'`` in Group-OBS's commitment layout, so the provider's
  :class:`RefitVerifier` swaps in the commitments of a real Group-OBS proof (enrolled ``theta``, proven
  ``theta'``), which requires both circuits to share logrows and SRS (``CircuitConfig.min_logrows``);
* an honest refit verifies, with a residual of a few fixed-point units, far below the tolerance derived
  from the declared magnitudes (``proofs.fixedpoint.output_refit_tolerance``);
* a refit computed over other weights than the proven ``theta'`` (here: as if nothing had been masked)
  is refused for its binding, and a following layer moved off the ridge solution is refused for its
  residual.

The protocol does not carry refit proofs yet (requests, enrollment and the provider's service).
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from zkunlearn.circuits import group_obs as go
from zkunlearn.circuits import output_refit as orf
from zkunlearn.circuits.activations import ACTIVATIONS, Activation
from zkunlearn.circuits.export import export_relation
from zkunlearn.client.group_obs import solve_block
from zkunlearn.client.refit import refit_following_layer
from zkunlearn.proofs.artifacts import CircuitArtifacts, build_provider_artifacts
from zkunlearn.proofs.backend import CircuitConfig, Proof
from zkunlearn.proofs.fixedpoint import (
    dequantise,
    felts,
    normalise_factor,
    output_refit_tolerance,
    quantise,
    theta_exponent,
)
from zkunlearn.proofs.prover import GroupObsBatch, ProveJob, group_obs_tensors, new_group_obs_batch, run_job
from zkunlearn.proofs.srs import dev_srs
from zkunlearn.proofs.verifier import InMemoryReplayGuard, Reason, RefitVerifier, Verdict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.refit_cases import declared_bounds

pytestmark = pytest.mark.ezkl

# One Group-OBS block holds the whole masked layer (4 x 3 weights), so one batch of one block.
N, D_IN, HIDDEN, D_OUT, REL_LAM = 8, 3, 4, 2, 0.05
BLOCK, M, LAM, SCALE = D_IN * HIDDEN, 8, 0.05, 13
# The ReLU refit circuit fits logrows 13 (~6 k rows), the GELU one needs 15 (~31 k rows); each
# activation's Group-OBS circuit is built at its refit circuit's logrows, which the two must share.
REFIT_LOGROWS = {"relu": 13, "gelu": 15}
REQUEST = hashlib.sha256(b"refit-request").digest()


def _grid(x: np.ndarray) -> np.ndarray:
    return dequantise(quantise(x, SCALE), SCALE)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return tmp_path_factory.mktemp("refit-ezkl")


def _build(
    module: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    names: tuple[str, ...],
    outputs: tuple[str, ...],
    work: Path,
    tag: str,
    config: CircuitConfig,
) -> CircuitArtifacts:
    onnx = export_relation(module, inputs, work / f"{tag}.onnx", names, outputs, atol=1e-3)
    return build_provider_artifacts(onnx, work / "cache", lambda k: dev_srs(work / "srs", k), config)


@pytest.fixture(scope="module", params=ACTIVATIONS)
def activation(request: pytest.FixtureRequest) -> Activation:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def refit_arts(work: Path, activation: Activation) -> CircuitArtifacts:
    check = orf.OutputRefitCheck(N, D_IN, HIDDEN, D_OUT, REL_LAM, activation, block=BLOCK)
    names = check.input_names()
    arts = _build(
        check, check.example_inputs(), names, orf.OUTPUT_NAMES, work, f"refit-{activation}", CircuitConfig()
    )
    assert arts.logrows == REFIT_LOGROWS[activation]
    return arts


@pytest.fixture(scope="module")
def go_arts(work: Path, refit_arts: CircuitArtifacts) -> CircuitArtifacts:
    """Group-OBS at the refit circuit's logrows (its own rows need fewer)."""
    check = go.GroupObsCheck(BLOCK, M, LAM)
    config = CircuitConfig(min_logrows=refit_arts.logrows)
    arts = _build(check, go.example_inputs(1, BLOCK, M), go.INPUT_NAMES, go.OUTPUT_NAMES, work, "go", config)
    assert arts.logrows == refit_arts.logrows
    return arts


@dataclass
class Deletion:
    """A masked layer after a real Group-OBS proof, and the client's refit of the layer after it."""

    batch: GroupObsBatch
    go_commitments: list[str]  # theta, theta', G, mask, w as the Group-OBS proof committed them
    z_scaled: np.ndarray  # the enrolled layer inputs, pre-scaled by 2**-e
    b1: np.ndarray
    v_before: np.ndarray
    v_after: np.ndarray
    exponent: int
    values: dict[str, np.ndarray]  # real-unit values (for declared bounds)


@dataclass(frozen=True)
class ProvenGroupObs:
    """The masked layer's Group-OBS update (the same for every activation) and its real proof."""

    batch: GroupObsBatch
    commitments: list[str]
    theta: np.ndarray
    theta_after: np.ndarray
    exponent: int
    rng_state: dict[str, Any]  # the refit's draws continue the same random sequence from here


@pytest.fixture(scope="module")
def proven_group_obs(go_arts: CircuitArtifacts) -> ProvenGroupObs:
    rng = np.random.default_rng(5)
    w1 = rng.normal(size=(HIDDEN, D_IN)) / 2
    exponent = theta_exponent(w1)
    theta = _grid(w1.reshape(1, -1) * 2.0**exponent)
    g, _ = normalise_factor(rng.normal(size=(M, BLOCK)))
    mask = np.zeros(BLOCK, bool)
    mask[rng.choice(BLOCK, 5, replace=False)] = True
    upd = solve_block(theta[0], g, mask, LAM)
    theta_after = _grid(upd.theta_after[None])
    batch = new_group_obs_batch(
        theta, theta_after, g[None], mask[None], upd.w[None], scale=SCALE, n_blind=go.N_BLIND
    )
    res = run_job(
        ProveJob(
            group_obs_tensors(batch, REQUEST, SCALE, go.N_BLIND),
            go_arts.compiled,
            go_arts.vk,
            go_arts.pk,
            go_arts.srs.path,
        )
    )
    return ProvenGroupObs(batch, res.commitments, theta, theta_after, exponent, rng.bit_generator.state)


@pytest.fixture(scope="module")
def deletion(proven_group_obs: ProvenGroupObs, activation: Activation) -> Deletion:
    proven = proven_group_obs
    batch, theta, theta_after, exponent = proven.batch, proven.theta, proven.theta_after, proven.exponent
    rng = np.random.default_rng()
    rng.bit_generator.state = proven.rng_state
    # What the client refits from is exactly what it committed: grid values, rescaled.
    z_scaled = _grid(rng.normal(size=(N, D_IN)) * 2.0**-exponent)
    b1 = _grid(0.1 * rng.normal(size=HIDDEN))
    w2, b2 = _grid(rng.normal(size=(D_OUT, HIDDEN)) / 2), _grid(0.1 * rng.normal(size=D_OUT))
    values = {
        "z": z_scaled * 2.0**exponent,
        "w1_before": theta.reshape(HIDDEN, D_IN) * 2.0**-exponent,
        "b1": b1,
        "w1_after": theta_after.reshape(HIDDEN, D_IN) * 2.0**-exponent,
        "v_before": np.hstack([w2, b2[:, None]]),
    }
    fit = refit_following_layer(
        values["z"], values["w1_before"], b1, values["w1_after"], w2, b2, activation, REL_LAM
    )
    values["v_after"] = np.hstack([fit.weight, fit.bias[:, None]])
    return Deletion(
        batch, proven.commitments, z_scaled, b1, values["v_before"], values["v_after"], exponent, values
    )


def _with_row(x: np.ndarray, seed: int) -> np.ndarray:
    x = x[None] if x.ndim == 1 else x
    return np.vstack(
        [x, dequantise(quantise(np.random.default_rng(seed).normal(size=(1, x.shape[1])), SCALE), SCALE)]
    )


def _refit_inputs(
    d: Deletion, *, theta_after: np.ndarray | None = None, v_after: np.ndarray | None = None
) -> list[list[str]]:
    b = d.batch
    after = np.concatenate(
        [b.theta_after if theta_after is None else theta_after, b.theta_after_blind], axis=1
    )
    tensors = [
        _with_row(d.z_scaled, 1),
        np.concatenate([b.theta, b.theta_blind], axis=1),  # byte-identical to the Group-OBS input
        _with_row(d.b1, 2),
        after,
        _with_row(d.v_before, 3),
        _with_row(d.v_after if v_after is None else v_after, 4),
    ]
    return [felts(t, SCALE) for t in tensors]


def _prove(arts: CircuitArtifacts, inputs: list[list[str]]) -> tuple[Proof, list[str]]:
    res = run_job(ProveJob(inputs, arts.compiled, arts.vk, arts.pk, arts.srs.path))
    return res.proof, res.commitments


def _verify(
    arts: CircuitArtifacts, d: Deletion, activation: Activation, proof: Proof, claimed_v: str
) -> Verdict:
    """The provider's check: Group-OBS's theta / theta', and its own commitments of enrolled values."""
    bounds = declared_bounds(d.values, activation)
    tol = output_refit_tolerance(N, HIDDEN, REL_LAM, SCALE, activation, **bounds)
    verifier = RefitVerifier(arts, n_batches=1, tolerance=tol)
    enrolled = _refit_inputs(d)
    return verifier.verify(
        proof,
        request_id="req-refit",
        enrolled_z=verifier.commit(enrolled[0]),
        enrolled_theta=[d.go_commitments[0]],
        enrolled_b1=verifier.commit(enrolled[2]),
        theta_after=[d.go_commitments[1]],
        enrolled_v=verifier.commit(enrolled[4]),
        claimed_v_after=claimed_v,
        replay=InMemoryReplayGuard(),
    )


def test_honest_refit_verifies_against_the_group_obs_commitments(
    refit_arts: CircuitArtifacts, deletion: Deletion, activation: Activation
) -> None:
    proof, commitments = _prove(refit_arts, _refit_inputs(deletion))
    # The same theta / theta' tensors commit to the same points in both circuits.
    assert commitments[1] == deletion.go_commitments[0]
    assert commitments[3] == deletion.go_commitments[1]
    verdict = _verify(refit_arts, deletion, activation, proof, commitments[-1])
    assert verdict.ok, verdict
    ulp = 2.0**-SCALE
    assert verdict.residuals[0][0] < 8 * ulp  # what ezkl leaves: a few units, far below the tolerance


def test_refit_over_weights_other_than_the_proven_theta_after_is_refused(
    refit_arts: CircuitArtifacts, deletion: Deletion, activation: Activation
) -> None:
    """A client that refits as if Group-OBS had changed nothing (theta' := theta): the refit is
    internally consistent and its proof valid, but not over the weights the Group-OBS proof fixed."""
    d = deletion
    v = d.values
    w2, b2 = v["v_before"][:, :-1], v["v_before"][:, -1]
    fit = refit_following_layer(v["z"], v["w1_before"], v["b1"], v["w1_before"], w2, b2, activation, REL_LAM)
    v_after = np.hstack([fit.weight, fit.bias[:, None]])
    proof, commitments = _prove(refit_arts, _refit_inputs(d, theta_after=d.batch.theta, v_after=v_after))
    verdict = _verify(refit_arts, d, activation, proof, commitments[-1])
    assert not verdict.ok
    assert verdict.reason is Reason.BINDING_OR_INVALID


def test_refit_off_the_ridge_solution_is_refused(
    refit_arts: CircuitArtifacts, deletion: Deletion, activation: Activation
) -> None:
    proof, commitments = _prove(refit_arts, _refit_inputs(deletion, v_after=deletion.v_after + 0.5))
    verdict = _verify(refit_arts, deletion, activation, proof, commitments[-1])
    assert not verdict.ok
    assert verdict.reason is Reason.REFIT_NOT_SOLUTION, verdict


def test_wrong_number_of_theta_commitments_is_malformed(refit_arts: CircuitArtifacts) -> None:
    verifier = RefitVerifier(refit_arts, n_batches=1, tolerance=0.1)
    verdict = verifier.verify(
        {"transcript": "00", "instances": [["00"]]},
        request_id="r",
        enrolled_z="",
        enrolled_theta=[],
        enrolled_b1="",
        theta_after=[],
        enrolled_v="",
        claimed_v_after="",
        replay=InMemoryReplayGuard(),
    )
    assert verdict.reason is Reason.MALFORMED
    with pytest.raises(ValueError, match="tolerance"):
        RefitVerifier(refit_arts, n_batches=1, tolerance=0.0)
