"""Real ezkl proofs of the exact analytic relation: enrollment and deletion, each attack beside an
honest control that verifies; the provider's verdict names the reason."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from zkunlearn.proofs.analytic_exact import (
    ExactAnalyticSpec,
    IntArray,
    blinding_row,
    enrollment_binding,
    factor_of,
    gram,
    quantise_rows,
    ridge_weights,
    row_tensor,
    z_tensor,
)
from zkunlearn.proofs.analytic_exact_circuits import ExactAnalyticVerifier
from zkunlearn.proofs.artifacts import CircuitArtifacts
from zkunlearn.proofs.backend import ProvingError
from zkunlearn.proofs.fixedpoint import FIELD_MODULUS
from zkunlearn.proofs.prover import ProveJob, run_job
from zkunlearn.proofs.verifier import InMemoryReplayGuard, Reason, Verdict

from tests.analytic_exact_cases import digits_features, head_scale, worst_directions

if TYPE_CHECKING:
    from tests.conftest import SharedCircuits

pytestmark = pytest.mark.ezkl

SPEC = ExactAnalyticSpec(4, 3, 2)
REQUEST = hashlib.sha256(b"analytic-exact-request").digest()


@pytest.fixture(scope="module")
def artifacts(shared_circuits: SharedCircuits) -> CircuitArtifacts:
    published = shared_circuits.build(analytic_exact=SPEC).analytic_exact
    assert published is not None
    return published[1]


@pytest.fixture(scope="module")
def verifier(artifacts: CircuitArtifacts) -> ExactAnalyticVerifier:
    return ExactAnalyticVerifier(SPEC, artifacts)


@dataclass(frozen=True)
class Client:
    """An enrolled client: its rows, its committed Gram (with blinding) and the provider's record."""

    x: np.ndarray
    y: np.ndarray
    m: IntArray
    m_felts: list[str]
    m_commit: str
    forget: np.ndarray

    @property
    def z_u(self) -> IntArray:
        return quantise_rows(SPEC, self.x[self.forget], self.y[self.forget])

    @property
    def m_after(self) -> IntArray:
        return self.m - gram(self.z_u)


def _prove(arts: CircuitArtifacts, inputs: list[list[str]]) -> Any:
    return run_job(ProveJob(inputs, arts.compiled, arts.vk, arts.pk, arts.srs.path))


def _tensor(values: IntArray) -> list[str]:
    return row_tensor(values, blinding_row(np.asarray(values).shape[1]))


@pytest.fixture(scope="module")
def client(verifier: ExactAnalyticVerifier) -> Client:
    x, y = digits_features(SPEC, 200)
    m = gram(quantise_rows(SPEC, x, y))
    felts = _tensor(m)
    return Client(x, y, m, felts, verifier.commit(felts), np.where(y == 1)[0][: SPEC.n_u])


def _delete(
    arts: CircuitArtifacts,
    verifier: ExactAnalyticVerifier,
    client: Client,
    *,
    m_after: IntArray | None = None,
    w: IntArray | None = None,
    factor: IntArray | None = None,
    z_u: IntArray | None = None,
    request: bytes = REQUEST,
    m_felts: list[str] | None = None,
) -> tuple[Verdict, Any]:
    m_after = client.m_after if m_after is None else m_after
    w = ridge_weights(SPEC, m_after) if w is None else w
    factor = factor_of(SPEC, m_after) if factor is None else factor
    m_after_felts, w_felts = _tensor(m_after), _tensor(w)
    result = _prove(
        arts,
        [
            m_felts or client.m_felts,
            m_after_felts,
            w_felts,
            z_tensor(SPEC, client.z_u if z_u is None else z_u, request),
            _tensor(factor),
        ],
    )
    verdict = verifier.verify(
        result.proof,
        request_id="req-1",
        enrolled_m=client.m_commit,
        claimed_m_after=verifier.commit(m_after_felts),
        claimed_w=verifier.commit(w_felts),
        forget_commitment=verifier.forget_commitment(
            client.x[client.forget], client.y[client.forget], REQUEST
        ),
        replay=InMemoryReplayGuard(),
    )
    return verdict, result


def test_honest_enrollment_verifies_and_binds_the_enrolled_state(
    artifacts: CircuitArtifacts, verifier: ExactAnalyticVerifier, client: Client
) -> None:
    w = ridge_weights(SPEC, client.m)
    w_felts = _tensor(w)
    z = z_tensor(SPEC, None, enrollment_binding())
    result = _prove(
        artifacts, [client.m_felts, client.m_felts, w_felts, z, _tensor(factor_of(SPEC, client.m))]
    )
    w_commit = verifier.commit(w_felts)
    assert verifier.verify_enrollment(result.proof, m_commit=client.m_commit, w_commit=w_commit).ok
    # The same proof does not enroll another Gram or another head.
    other = verifier.commit(_tensor(client.m))
    refused = verifier.verify_enrollment(result.proof, m_commit=other, w_commit=w_commit)
    assert refused.reason is Reason.BINDING_OR_INVALID
    # A head that is not the Gram's ridge solution is refused at enrollment.
    wrong = _tensor(np.zeros_like(w))
    bad = _prove(artifacts, [client.m_felts, client.m_felts, wrong, z, _tensor(factor_of(SPEC, client.m))])
    verdict = verifier.verify_enrollment(bad.proof, m_commit=client.m_commit, w_commit=verifier.commit(wrong))
    assert verdict.reason is Reason.ANALYTIC_W_WRONG


def test_a_degenerate_enrolled_state_is_refused(
    artifacts: CircuitArtifacts, verifier: ExactAnalyticVerifier
) -> None:
    """A Gram with a negative direction (here: a learned row subtracted from nothing) is no Gram of any
    data: whatever factor the client brings, the certificate fails."""
    row = quantise_rows(SPEC, np.full((1, SPEC.d), 0.5), np.array([0]))
    m = -gram(row)
    m_felts = _tensor(m)
    shifted = m + 4 * SPEC.gamma_q * np.eye(SPEC.n, dtype=np.int64).astype(object) + gram(row)
    factor = factor_of(SPEC, shifted)  # the best a client can do: factor a nearby PSD matrix
    result = _prove(
        artifacts,
        [
            m_felts,
            m_felts,
            _tensor(np.zeros((SPEC.d, SPEC.k), dtype=object)),
            z_tensor(SPEC, None, enrollment_binding()),
            _tensor(factor),
        ],
    )
    verdict = verifier.verify_enrollment(
        result.proof, m_commit=verifier.commit(m_felts), w_commit=result.commitments[2]
    )
    assert verdict.reason is Reason.ANALYTIC_GRAM_NOT_PSD, verdict


def test_honest_deletion_verifies(
    artifacts: CircuitArtifacts, verifier: ExactAnalyticVerifier, client: Client
) -> None:
    verdict, _ = _delete(artifacts, verifier, client)
    assert verdict.ok, verdict


def test_doing_nothing_is_refused(
    artifacts: CircuitArtifacts, verifier: ExactAnalyticVerifier, client: Client
) -> None:
    """W' = W (the refit kept the forgotten rows) and a Gram never downdated (with its own consistent
    head): both refused, each with its reason."""
    kept_w, _ = _delete(artifacts, verifier, client, w=ridge_weights(SPEC, client.m))
    assert kept_w.reason is Reason.ANALYTIC_W_WRONG
    kept_m, _ = _delete(artifacts, verifier, client, m_after=client.m)
    assert kept_m.reason is Reason.ANALYTIC_GRAM_WRONG


def test_a_head_one_percent_off_is_refused(
    artifacts: CircuitArtifacts, verifier: ExactAnalyticVerifier, client: Client
) -> None:
    w = ridge_weights(SPEC, client.m_after)
    from tests.analytic_exact_cases import Deletion

    case = Deletion(
        client.m,
        client.z_u,
        client.m_after,
        w,
        factor_of(SPEC, client.m_after),
        client.y,
        client.x,
        client.forget,
    )
    entry = worst_directions(SPEC, case)["single entry"]
    step = np.rint(entry * 0.01 * head_scale(SPEC, w) * 2.0**SPEC.w_bits).astype(np.int64).astype(object)
    verdict, _ = _delete(artifacts, verifier, client, w=w + step)
    assert verdict.reason is Reason.ANALYTIC_W_WRONG


def test_forgetting_other_rows_or_another_requests_rows_is_refused(
    artifacts: CircuitArtifacts, verifier: ExactAnalyticVerifier, client: Client
) -> None:
    others = quantise_rows(SPEC, client.x[100:102], client.y[100:102])
    m_after = client.m - gram(others)
    verdict, _ = _delete(artifacts, verifier, client, m_after=m_after, z_u=others)
    assert verdict.reason is Reason.BINDING_OR_INVALID
    verdict, _ = _delete(artifacts, verifier, client, request=hashlib.sha256(b"another").digest())
    assert verdict.reason is Reason.BINDING_OR_INVALID


def test_forgetting_rows_never_learned_is_refused(
    artifacts: CircuitArtifacts, verifier: ExactAnalyticVerifier
) -> None:
    x, y = digits_features(SPEC, 200)
    learned = np.where(y != 2)[0]
    m = gram(quantise_rows(SPEC, x[learned], y[learned]))
    felts = _tensor(m)
    stranger = Client(x, y, m, felts, verifier.commit(felts), np.where(y == 2)[0][: SPEC.n_u])
    m_after = stranger.m_after
    shifted = m_after + 8 * SPEC.gamma_q * np.eye(SPEC.n, dtype=np.int64).astype(object)
    for i in range(SPEC.d, SPEC.n):  # push the forgotten class's diagonal back up to a PSD neighbour
        shifted[i, i] = max(int(shifted[i, i]), 0) + 4 * SPEC.gamma_q
    verdict, _ = _delete(
        artifacts,
        verifier,
        stranger,
        m_after=m_after,
        w=ridge_weights(SPEC, m_after),
        factor=factor_of(SPEC, shifted),
    )
    assert verdict.reason is Reason.ANALYTIC_GRAM_NOT_PSD


def test_a_gram_outside_its_range_cannot_be_proven(artifacts: CircuitArtifacts, client: Client) -> None:
    """A committed entry the decomposition cannot hold (a large positive number, or a 'negative' one near
    the field modulus, as a wrap-around forgery needs) has no witness: the range check on M is real."""
    for entry in (1 << 100, FIELD_MODULUS - (1 << 60)):
        m = client.m.copy()
        m[0, 0] = entry
        _refused_to_prove(artifacts, client, m)


def _refused_to_prove(artifacts: CircuitArtifacts, client: Client, m: IntArray) -> None:
    with pytest.raises(ProvingError):
        _prove(
            artifacts,
            [
                _tensor(m),
                _tensor(client.m_after),
                _tensor(ridge_weights(SPEC, client.m_after)),
                z_tensor(SPEC, client.z_u, REQUEST),
                _tensor(factor_of(SPEC, client.m_after)),
            ],
        )
