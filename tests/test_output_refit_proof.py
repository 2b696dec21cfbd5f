"""Real ezkl/Halo2 proofs of the output-refit relation at a small shape, for both activations.

What this shows: the relation, GELU included (computed in the circuit by the certified polynomial of
``circuits.activations``), compiles with range checks only (``make_settings`` refuses lookups); an
honest refit proves and verifies against the commitments the verifier computes itself, its public
residual stays within a few fixed-point units; and a refit that is not the ridge solution shows an
unmistakable residual in a proof that still verifies (so the verifier's threshold is what refuses it).
The threshold is ``proofs.fixedpoint.output_refit_tolerance`` from the values' declared magnitudes: an
honest proof lands far below it (about one fixed-point unit against a worst-case bound of 0.01-0.25 here),
and a refit moved by 0.5 lands above it. The protocol does not carry refit proofs yet.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from zkunlearn.circuits import output_refit as orf
from zkunlearn.circuits.export import export_relation
from zkunlearn.proofs.artifacts import CircuitArtifacts, build_provider_artifacts
from zkunlearn.proofs.backend import EzklBackend, Proof, witness_commitments
from zkunlearn.proofs.fixedpoint import felt_to_int, output_refit_tolerance
from zkunlearn.proofs.srs import dev_srs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zkunlearn.circuits.activations import ACTIVATIONS, Activation

from tests.refit_cases import declared_bounds, honest_pair

pytestmark = pytest.mark.ezkl

# A small shape with a hidden layer wider than its input. The GELU polynomial dominates its circuit
# (~400 rows per activation, two activations per hidden unit and row: ~31 k rows, logrows 15; the
# ReLU circuit is ~7 k rows).
N, D_IN, HIDDEN, D_OUT, REL_LAM = 8, 3, 4, 2, 0.05
BACKEND = EzklBackend()


@pytest.fixture(scope="module", params=ACTIVATIONS)
def activation(request: pytest.FixtureRequest) -> Activation:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def arts(tmp_path_factory: pytest.TempPathFactory, activation: Activation) -> CircuitArtifacts:
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp(f"refit-ezkl-{activation}")
    onnx = export_relation(
        orf.OutputRefitCheck(N, D_IN, HIDDEN, D_OUT, REL_LAM, activation),
        orf.example_inputs(N, D_IN, HIDDEN, D_OUT),
        work / "refit.onnx",
        orf.INPUT_NAMES,
        orf.OUTPUT_NAMES,
        atol=1e-3,
    )
    built = build_provider_artifacts(onnx, work / "cache", lambda k: dev_srs(work / "srs", k))
    assert built.logrows <= 15
    return built


def _values(seed: int, activation: Activation) -> dict[str, np.ndarray]:
    return honest_pair(seed, N, D_IN, HIDDEN, D_OUT, REL_LAM, activation)


def _flat_inputs(values: dict[str, np.ndarray], seed: int) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    out = []
    for name in orf.INPUT_NAMES:
        v = values[name][None] if values[name].ndim == 1 else values[name]
        blinded = np.vstack([v, rng.normal(size=(1, v.shape[1]))])  # the blinding row
        out.append(blinded.reshape(-1).tolist())
    return out


def _prove(arts: CircuitArtifacts, values: dict[str, np.ndarray]) -> tuple[Proof, list[str], dict[str, Any]]:
    witness = BACKEND.witness(_flat_inputs(values, seed=1), arts.compiled, arts.vk, arts.srs.path)
    proof = BACKEND.prove(witness, arts.compiled, arts.pk, arts.srs.path)
    return proof, witness_commitments(witness), witness


def _residuals(arts: CircuitArtifacts, proof: Proof) -> np.ndarray:
    assert len(proof.instances) == 1
    assert len(proof.instances[0]) == len(orf.RESIDUALS)
    return np.array([felt_to_int(f) / 2**arts.output_scale for f in proof.instances[0]])


def _wrong_refit(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A following layer moved off the ridge solution by 0.5 everywhere (e.g. a smuggled fine-tune)."""
    return dict(values, v_after=values["v_after"] + 0.5)


def _tolerance(arts: CircuitArtifacts, activation: Activation) -> float:
    scale = int(arts.settings_dict["run_args"]["input_scale"])
    bounds = declared_bounds(_values(0, activation), activation)
    return output_refit_tolerance(N, D_IN, HIDDEN, REL_LAM, scale, activation, **bounds)


@pytest.fixture(scope="module")
def honest(arts: CircuitArtifacts, activation: Activation) -> tuple[Proof, list[str]]:
    proof, commitments, _ = _prove(arts, _values(0, activation))
    return proof, commitments


@pytest.fixture(scope="module")
def lie(arts: CircuitArtifacts, activation: Activation) -> tuple[Proof, list[str]]:
    proof, commitments, _ = _prove(arts, _wrong_refit(_values(0, activation)))
    return proof, commitments


def test_honest_refit_proves_and_verifies(
    arts: CircuitArtifacts, activation: Activation, honest: tuple[Proof, list[str]]
) -> None:
    proof, commitments = honest
    assert BACKEND.verify(proof, arts.settings, arts.vk, arts.srs.path, commitments)
    residual = float(_residuals(arts, proof)[0])
    ulp = 2.0 ** -int(arts.settings_dict["run_args"]["input_scale"])
    assert residual <= _tolerance(arts, activation)
    assert residual < 8 * ulp  # what ezkl actually leaves: a few units (exact sums, one rounding each)


def test_wrong_refit_shows_above_the_derived_tolerance(
    arts: CircuitArtifacts, activation: Activation, lie: tuple[Proof, list[str]]
) -> None:
    proof, commitments = lie
    assert BACKEND.verify(proof, arts.settings, arts.vk, arts.srs.path, commitments)
    assert float(_residuals(arts, proof)[0]) > _tolerance(arts, activation)


def test_wrong_refit_cannot_borrow_the_honest_residual_or_commitments(
    arts: CircuitArtifacts, honest: tuple[Proof, list[str]], lie: tuple[Proof, list[str]]
) -> None:
    honest_proof, honest_commitments = honest
    lie_proof, lie_commitments = lie
    assert honest_proof.instances[0][0] != lie_proof.instances[0][0]
    forged = Proof(lie_proof.transcript, ((honest_proof.instances[0][0],),))
    assert not BACKEND.verify(forged, arts.settings, arts.vk, arts.srs.path, lie_commitments)
    assert not BACKEND.verify(lie_proof, arts.settings, arts.vk, arts.srs.path, honest_commitments)
