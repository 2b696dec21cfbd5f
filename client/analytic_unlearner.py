"""Exact unlearning of an analytic (ridge/RLS) head under the fixed-point relation, and its proof.

The head's committed state is its inverse Gram ``R`` and weights ``W`` on the circuit's grid; a deletion
downdates both (:mod:`zkunlearn.client.analytic`) and one proof shows ``W'`` and ``R'`` are the
downdated ridge solution. New heads enroll under the exact relation
(:mod:`zkunlearn.client.analytic_exact`); this one serves existing ``ANALYTIC`` enrollments.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from zkunlearn.client.analytic import AnalyticError, AnalyticHead
from zkunlearn.client.committed_state import (
    F64,
    CommittedStateProver,
    UnlearningError,
    already_answered,
    commit_tensor,
    input_scale,
    load_state,
    on_grid,
    refuse_overwrite,
    save_state,
)
from zkunlearn.client.sdk import Commitment, UpdateResult, VerifiedRequest
from zkunlearn.client.unlearning import ProveOptions
from zkunlearn.proofs.artifacts import ClientCircuit
from zkunlearn.proofs.deletion import (
    ANALYTIC_LAYER,
    AnalyticSpec,
    analytic_forget_tensors,
    commitment_name,
    encode_proof,
    request_digest,
)
from zkunlearn.proofs.fixedpoint import felts, random_blinding
from zkunlearn.proofs.prover import ProveJob, prove_parallel

__all__ = ["AnalyticUnlearner"]


def _refuse_non_finite(what: str, array: F64) -> None:
    bad = np.argwhere(~np.isfinite(array))
    if bad.size:
        at = tuple(int(i) for i in bad[0])
        raise UnlearningError(f"{what} {at} is {float(array[at])}")


class AnalyticUnlearner(CommittedStateProver):
    """Exact unlearning of an analytic (ridge/RLS) head + its proof (an ``UpdateProver``)."""

    def __init__(
        self,
        head: AnalyticHead,
        spec: AnalyticSpec,
        circuit: ClientCircuit,
        state_dir: Path,
        options: ProveOptions | None = None,
    ) -> None:
        if (head.d, head.c) != (spec.d, spec.k):
            raise UnlearningError(f"head is {head.d}x{head.c}, the circuit expects {spec.d}x{spec.k}")
        self.head = head
        self.spec = spec
        self.circuit = circuit
        self.state_dir = Path(state_dir)
        self.options = options or ProveOptions()
        self.scale = input_scale(circuit)

    def _tensor(self, value: F64, blind: F64) -> F64:
        return np.vstack([value, blind[None, :]])

    def enroll(self, *, replace: bool = False) -> list[Commitment]:
        """Commit to the head's state; a ``state_dir`` already enrolled is refused unless ``replace``."""
        refuse_overwrite(self.state_dir, replace)
        scale = self.scale
        r, w = on_grid(self.head.R, scale), on_grid(self.head.W, scale)
        blind_r, blind_w = random_blinding(self.spec.d, scale), random_blinding(self.spec.k, scale)
        commitments = [
            Commitment(
                commitment_name("r", ANALYTIC_LAYER),
                0,
                commit_tensor(self.circuit, self._tensor(r, blind_r), scale),
            ),
            Commitment(
                commitment_name("w", ANALYTIC_LAYER),
                0,
                commit_tensor(self.circuit, self._tensor(w, blind_w), scale),
            ),
        ]
        meta = {
            "commitments": [c.to_json() for c in commitments],
            "last_request": None,
            "n_learned": self.head.n_learned,
        }
        save_state(self.state_dir, {"r": r, "w": w, "blind_r": blind_r, "blind_w": blind_w}, meta)
        self.head.R, self.head.W = r.copy(), w.copy()
        return commitments

    def _forget_rows(self, request: VerifiedRequest) -> tuple[F64, F64, F64]:
        """The request's forget features, labels and regression targets, refused with the reason before
        anything is computed from them: a label cast to an index first would turn -1 into the last
        class and 1.7 into class 1, i.e. forget rows the provider never named."""
        spec = self.spec
        if request.forget_features is None or request.forget_labels is None:
            raise UnlearningError("an analytic deletion request must carry the forget features and labels")
        x_u = np.asarray(request.forget_features, dtype=np.float64)
        y_u = np.asarray(request.forget_labels, dtype=np.float64)
        if x_u.ndim != 2 or x_u.shape[1] != spec.d:
            raise UnlearningError(f"forget features must be (n, {spec.d}), got shape {x_u.shape}")
        n = x_u.shape[0]
        if n > spec.n_u:
            raise UnlearningError(f"{n} forget samples exceed the circuit's n_u = {spec.n_u}")
        _refuse_non_finite("forget feature", x_u)
        if y_u.ndim == 1:
            if y_u.shape != (n,):
                raise UnlearningError(f"{y_u.shape[0]} forget labels for {n} forget samples")
            valid = np.isfinite(y_u) & (y_u == np.round(y_u)) & (y_u >= 0) & (y_u < spec.k)
            if not valid.all():
                i = int(np.flatnonzero(~valid)[0])
                raise UnlearningError(
                    f"forget label {i} is {float(y_u[i])}: 1-D labels must be class indices in [0, {spec.k})"
                )
            return x_u, y_u, np.eye(spec.k)[y_u.astype(np.int64)]
        if y_u.shape != (n, spec.k):
            raise UnlearningError(
                f"forget labels must be {n} class indices or ({n}, {spec.k}) targets, got shape {y_u.shape}"
            )
        _refuse_non_finite("forget target", y_u)
        return x_u, y_u, y_u

    def prove(self, request: VerifiedRequest) -> UpdateResult:
        arrays, meta = load_state(self.state_dir)
        done = already_answered(meta, request.request_id)
        if done is not None:
            # The answer's head, if a failure cut the first attempt short of writing it.
            self.head.R, self.head.W, self.head.n_learned = arrays["r"], arrays["w"], int(meta["n_learned"])
            return done
        x_u, y_u, targets = self._forget_rows(request)
        scale, spec = self.scale, self.spec
        head = AnalyticHead(spec.d, spec.k, self.head.gamma)
        try:
            # Set, not learned: the downdate must start from the committed R the circuit checks against.
            head.R, head.W, head.n_learned = arrays["r"].copy(), arrays["w"].copy(), int(meta["n_learned"])
            head.unlearn(x_u, targets)
        except AnalyticError as exc:
            raise UnlearningError(f"cannot unlearn the forget samples: {exc}") from exc
        r_after, w_after = on_grid(head.R, scale), on_grid(head.W, scale)
        blind_r2, blind_w2 = random_blinding(spec.d, scale), random_blinding(spec.k, scale)
        digest = request_digest(request.canonical)
        fx, fy = analytic_forget_tensors(spec, x_u, y_u, digest, scale)
        tensors = [
            felts(self._tensor(arrays["r"], arrays["blind_r"]), scale),
            felts(self._tensor(r_after, blind_r2), scale),
            felts(self._tensor(arrays["w"], arrays["blind_w"]), scale),
            felts(self._tensor(w_after, blind_w2), scale),
            fx,
            fy,
        ]
        c = self.circuit
        (result,) = prove_parallel(
            [ProveJob(tensors, c.compiled, c.vk, c.pk, c.srs.path, label="analytic head")],
            workers=1,
            memory_limit_mb=self.options.memory_limit_mb,
            progress=self.options.progress,
        )
        after = [
            Commitment(commitment_name("r", ANALYTIC_LAYER), 0, result.commitments[1]),
            Commitment(commitment_name("w", ANALYTIC_LAYER), 0, result.commitments[3]),
        ]
        proofs = [encode_proof(result.proof)]
        meta.update(
            commitments=[x.to_json() for x in after],
            n_learned=head.n_learned,
            last_request={
                "request_id": request.request_id,
                "after": [x.to_json() for x in after],
                "proofs": [p.hex() for p in proofs],
                "prove_s": [result.prove_s],
                "peak_rss_mb": [result.peak_rss_mb],
            },
        )
        save_state(
            self.state_dir, {"r": r_after, "w": w_after, "blind_r": blind_r2, "blind_w": blind_w2}, meta
        )
        self.head.R, self.head.W, self.head.n_learned = r_after.copy(), w_after.copy(), head.n_learned
        return UpdateResult(after, proofs)
