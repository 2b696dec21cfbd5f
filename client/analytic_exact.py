"""An analytic (ridge) head under the exact relation on the device: enrollment with its proof, then
proven deletions (:mod:`zkunlearn.proofs.analytic_exact`).

State (``state_dir``, saved atomically as :mod:`zkunlearn.client.unlearning` saves it): the augmented
Gram ``M = sum z z^T`` of every learned row (``z = [x, y]`` on the spec's ``2**-f`` grid) and the head
``W_q`` (on ``2**-w``), both integers held exactly in float64 (the spec keeps them below ``2**53``); and
a secret seed from which every blinding element is derived (full field elements, so the commitments
hide the Gram and the head). ``meta["labels"]`` names the blinding of the current ``m`` and ``w``.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from zkunlearn.client.committed_state import (
    F64,
    CommittedStateProver,
    UnlearningError,
    already_answered,
    load_state,
    refuse_overwrite,
    save_state,
)
from zkunlearn.client.sdk import Commitment, UpdateResult, VerifiedRequest
from zkunlearn.client.unlearning import ProveOptions
from zkunlearn.client.unlearning_exact import ExactEnrollment, _blinding
from zkunlearn.proofs.analytic_exact import (
    ExactAnalyticSpec,
    IntArray,
    enrollment_binding,
    factor_of,
    gram,
    quantise_rows,
    reference_outputs,
    ridge_weights,
    row_tensor,
    z_tensor,
)
from zkunlearn.proofs.artifacts import ClientCircuit
from zkunlearn.proofs.deletion import ANALYTIC_LAYER, commitment_name, encode_proof, request_digest
from zkunlearn.proofs.fixedpoint import FixedPointError
from zkunlearn.proofs.prover import ProveJob, ProveResult, prove_parallel

__all__ = ["ExactAnalyticUnlearner"]

_M, _W = commitment_name("m", ANALYTIC_LAYER), commitment_name("w", ANALYTIC_LAYER)


def _exact(values: npt.ArrayLike) -> IntArray:
    exact: IntArray = np.vectorize(int, otypes=[object])(np.rint(np.asarray(values, dtype=np.float64)))
    return exact


def _stored(values: IntArray) -> F64:
    arr = np.asarray(values, dtype=object)
    if arr.size and max(abs(int(v)) for v in arr.ravel()) >= 2**53:
        raise UnlearningError("a committed integer reaches 2**53: it cannot be stored exactly")
    return arr.astype(np.float64)


class ExactAnalyticUnlearner(CommittedStateProver):
    """Exact unlearning of a ridge head from its committed Gram, with proofs (an ``UpdateProver``)."""

    def __init__(
        self,
        spec: ExactAnalyticSpec,
        circuit: ClientCircuit,
        state_dir: Path,
        options: ProveOptions | None = None,
    ) -> None:
        self.spec = spec
        self.circuit = circuit
        self.state_dir = Path(state_dir)
        self.options = options or ProveOptions()

    # -- the head ---------------------------------------------------------------------------------

    def weights(self) -> F64:
        """The committed head ``W`` (``d x k``, float64)."""
        arrays, _meta = load_state(self.state_dir)
        return arrays["w"] / 2.0**self.spec.w_bits

    def predict(self, features: npt.ArrayLike) -> F64:
        """Scores ``x W`` of the committed head."""
        return np.asarray(features, dtype=np.float64) @ self.weights()

    # -- enrollment -------------------------------------------------------------------------------

    def enroll(
        self, features: npt.ArrayLike, targets: npt.ArrayLike, *, replace: bool = False
    ) -> ExactEnrollment:
        """Learn the head from ``features`` (``n x d``) and ``targets`` (class indices or ``n x k``),
        commit its Gram and weights, and prove the enrollment relation over them."""
        spec = self.spec
        refuse_overwrite(self.state_dir, replace)
        try:
            rows = quantise_rows(spec, features, targets)
        except FixedPointError as exc:
            raise UnlearningError(f"enrolling the head: {exc}") from exc
        if rows.shape[0] > spec.n_max:
            raise UnlearningError(f"{rows.shape[0]} rows exceed the spec's n_max = {spec.n_max}")
        m = gram(rows)
        try:
            w = ridge_weights(spec, m)
            factor = factor_of(spec, m)
        except FixedPointError as exc:
            raise UnlearningError(f"enrolling the head: {exc}") from exc
        seed = secrets.token_bytes(32)
        labels = {"m": "m/enroll", "w": "w/enroll"}
        m_felts = self._tensor(seed, labels["m"], m)
        w_felts = self._tensor(seed, labels["w"], w)
        inputs = [
            m_felts,
            m_felts,
            w_felts,
            z_tensor(spec, None, enrollment_binding()),
            self._tensor(seed, "factor/enroll", factor),
        ]
        (result,) = self._prove(inputs, "head enrollment")
        commitments = [Commitment(_M, 0, result.commitments[0]), Commitment(_W, 0, result.commitments[2])]
        if result.commitments[1] != result.commitments[0]:
            raise UnlearningError("the enrollment proof commits to two different Grams")
        proof = encode_proof(result.proof)
        meta: dict[str, Any] = {
            "seed": seed.hex(),
            "labels": labels,
            "commitments": [c.to_json() for c in commitments],
            "enrollment_proofs": [proof.hex()],
            "n_rows": int(rows.shape[0]),
            "last_request": None,
        }
        save_state(self.state_dir, {"m": _stored(m), "w": _stored(w)}, meta)
        return ExactEnrollment(commitments, [proof])

    def saved_enrollment(self) -> ExactEnrollment:
        """The saved enrollment (e.g. to send it again after a restart)."""
        _arrays, meta = load_state(self.state_dir)
        return ExactEnrollment(
            [Commitment.from_json(c) for c in meta["commitments"]],
            [bytes.fromhex(p) for p in meta["enrollment_proofs"]],
        )

    # -- deletion ---------------------------------------------------------------------------------

    def prove(self, request: VerifiedRequest) -> UpdateResult:
        arrays, meta = load_state(self.state_dir)
        done = already_answered(meta, request.request_id)
        if done is not None:
            return done
        mine = {(c["name"], c["block"]): c["point_hex"] for c in meta["commitments"]}
        theirs = {(c.name, c.block): c.point_hex for c in request.before_commitments}
        if theirs and theirs != mine:
            raise UnlearningError("the provider's record of our commitments differs from our committed state")
        spec, seed = self.spec, bytes.fromhex(meta["seed"])
        if request.forget_features is None or request.forget_labels is None:
            raise UnlearningError("an analytic deletion request must carry the forget features and labels")
        try:
            z_u = quantise_rows(spec, request.forget_features, request.forget_labels)
        except FixedPointError as exc:
            raise UnlearningError(f"forget rows: {exc}") from exc
        if z_u.shape[0] > spec.n_u:
            raise UnlearningError(f"{z_u.shape[0]} forget rows exceed the circuit's n_u = {spec.n_u}")
        m = _exact(arrays["m"])
        m_after = self._downdate(m, z_u)
        w_after, factor = self._solve(m_after, _exact(arrays["w"]))
        self._check(m, m_after, w_after, z_u, factor)
        rid = request.request_id
        labels = {"m": f"m/{rid}", "w": f"w/{rid}"}
        inputs = [
            self._tensor(seed, meta["labels"]["m"], m),
            self._tensor(seed, labels["m"], m_after),
            self._tensor(seed, labels["w"], w_after),
            z_tensor(spec, z_u, request_digest(request.canonical)),
            self._tensor(seed, f"factor/{rid}", factor),
        ]
        results = self._prove(inputs, "head deletion")
        if results[0].commitments[0] != mine[(_M, 0)]:
            raise UnlearningError("the proof's Gram is not our committed Gram")
        after = {(_M, 0): results[0].commitments[1], (_W, 0): results[0].commitments[2]}
        meta["labels"] = labels
        meta["n_rows"] = int(meta["n_rows"]) - int(z_u.shape[0])
        return self._save_answer(rid, after, results, {"m": _stored(m_after), "w": _stored(w_after)}, meta)

    def load_model(self) -> None:
        """The head lives in the state folder (:meth:`weights`): nothing to load, but the state must be
        readable (a lost or corrupted one raises :class:`UnlearningError` here, not at the next request)."""
        load_state(self.state_dir)

    # -- helpers ----------------------------------------------------------------------------------

    def _downdate(self, m: IntArray, z_u: IntArray) -> IntArray:
        """The Gram without the forget rows."""
        remaining: IntArray = m - gram(z_u)
        return remaining

    def _solve(self, m_after: IntArray, w_before: IntArray) -> tuple[IntArray, IntArray]:
        """The new head (ridge on the downdated Gram) and the certificate of that Gram."""
        try:
            return ridge_weights(self.spec, m_after), factor_of(self.spec, m_after)
        except FixedPointError as exc:
            raise UnlearningError(f"cannot forget these rows: {exc}") from exc

    def _check(self, m: IntArray, m_after: IntArray, w: IntArray, z_u: IntArray, factor: IntArray) -> None:
        """The relation's outputs, computed here before minutes of proving are spent on a refusal."""
        out = reference_outputs(self.spec, m, m_after, w, z_u, factor)
        if any(out.eq) or out.r_sq > self.spec.r_threshold or out.e_sq > self.spec.e_threshold:
            raise UnlearningError("the update does not meet the published thresholds; nothing was proven")

    def _tensor(self, seed: bytes, label: str, values: IntArray) -> list[str]:
        width = np.asarray(values).shape[1]
        return row_tensor(values, _blinding(seed, label, 1, width)[0])

    def _prove(self, inputs: list[list[str]], label: str) -> list[ProveResult]:
        c = self.circuit
        return prove_parallel(
            [ProveJob(inputs, c.compiled, c.vk, c.pk, c.srs.path, label=label)],
            workers=1,
            memory_limit_mb=self.options.memory_limit_mb,
            progress=self.options.progress,
        )
