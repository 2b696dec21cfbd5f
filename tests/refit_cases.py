"""Honest inputs of the output-refit relation, shared by its torch and its ezkl tests."""

from __future__ import annotations

import numpy as np
from zkunlearn.circuits.activations import Activation
from zkunlearn.client.refit import refit_following_layer


def honest_pair(
    seed: int, n: int, d_in: int, hidden: int, d_out: int, rel_lam: float, activation: Activation
) -> dict[str, np.ndarray]:
    """An MLP pair with 40 % of W1 zeroed (as Group-OBS leaves it) and the client's refit of W2,
    keyed by ``circuits.output_refit.INPUT_NAMES``."""
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
    """The magnitude bounds a client would declare for these inputs (their maxima: tight, honest)."""
    import torch
    from zkunlearn.circuits.activations import activate

    def act(w: np.ndarray) -> np.ndarray:
        p = torch.from_numpy(values["z"] @ w.T + values["b1"])
        return activate(p, activation).numpy()

    h_before, h_after = act(values["w1_before"]), act(values["w1_after"])
    ones = np.ones((h_before.shape[0], 1))
    target = np.hstack([h_before, ones]) @ values["v_before"].T
    return {
        "z_bound": float(np.abs(values["z"]).max()),
        "w_bound": float(max(np.abs(values[k]).max() for k in ("w1_before", "w1_after", "b1"))),
        "v_bound": float(max(np.abs(values[k]).max() for k in ("v_before", "v_after"))),
        "h_bound": float(max(np.abs(h_before).max(), np.abs(h_after).max())),
        "y_bound": float(np.abs(target).max()),
    }
