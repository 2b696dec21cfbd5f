"""Honest inputs of the output-refit relation, shared by its torch and its ezkl tests."""

from __future__ import annotations

import numpy as np
from zkunlearn.circuits.activations import Activation
from zkunlearn.client.refit import refit_following_layer
from zkunlearn.proofs.fixedpoint import theta_exponent


def honest_pair(
    seed: int, n: int, d_in: int, hidden: int, d_out: int, rel_lam: float, activation: Activation
) -> dict[str, np.ndarray]:
    """An MLP pair with 40 % of W1 zeroed (as Group-OBS leaves it) and the client's refit of W2,
    in real units (``relation_inputs`` turns them into the circuit's committed layout)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, d_in))
    w1 = rng.normal(size=(hidden, d_in)) / 2
    b1 = 0.1 * rng.normal(size=hidden)
    w1_after = w1 * (rng.random(w1.shape) > 0.4)
    w2, b2 = rng.normal(size=(d_out, hidden)) / 2, 0.1 * rng.normal(size=d_out)
    res = refit_following_layer(z, w1, b1, w1_after, w2, b2, activation, rel_lam)
    return {
        "z": z,
        "w1_before": w1,
        "b1": b1,
        "w1_after": w1_after,
        "v_before": np.hstack([w2, b2[:, None]]),
        "v_after": np.hstack([res.weight, res.bias[:, None]]),
    }


def declared_bounds(values: dict[str, np.ndarray], activation: Activation) -> dict[str, float]:
    """The magnitude bounds the refit's tolerance is derived from, as a client would declare them for
    its values (their maxima: tight)."""
    import torch
    from zkunlearn.circuits.activations import activate

    def act(w: np.ndarray) -> np.ndarray:
        p = torch.from_numpy(values["z"] @ w.T + values["b1"])
        return activate(p, activation).numpy()

    h_before, h_after = act(values["w1_before"]), act(values["w1_after"])
    ones = np.ones((h_before.shape[0], 1))
    target = np.hstack([h_before, ones]) @ values["v_before"].T
    return {
        "v_bound": float(max(np.abs(values[k]).max() for k in ("v_before", "v_after"))),
        "h_bound": float(max(np.abs(h_before).max(), np.abs(h_after).max())),
        "y_bound": float(np.abs(target).max()),
    }


def relation_inputs(
    values: dict[str, np.ndarray],
    *,
    block: int,
    batch: int,
    n_blind: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """The relation's inputs in its committed layout (``circuits.output_refit.input_names``): ``z``
    pre-scaled by the layer's ``2**-e``, ``W1`` / ``W1'`` as Group-OBS ``theta`` batches scaled by
    ``2**e`` with blinding after each row, and a random blinding row under ``z``, ``b1`` and ``V``."""
    exponent = theta_exponent(values["w1_before"])

    def with_row(x: np.ndarray) -> np.ndarray:
        x = x[None] if x.ndim == 1 else x
        return np.vstack([x, rng.normal(size=(1, x.shape[1]))])

    def batches(w: np.ndarray) -> list[np.ndarray]:
        rows = (w.reshape(-1) * 2.0**exponent).reshape(-1, batch, block)
        return [np.hstack([r, rng.normal(size=(batch, n_blind))]) for r in rows]

    return [
        with_row(values["z"] * 2.0**-exponent),
        *batches(values["w1_before"]),
        with_row(values["b1"]),
        *batches(values["w1_after"]),
        with_row(values["v_before"]),
        with_row(values["v_after"]),
    ]
