"""Activations a circuit can compute from committed inputs with additions, products and ``|x|`` only.

Why: the proving backend is range-check-only (no lookup tables; ``proofs.backend`` refuses a circuit
that needs one), and a relation that takes hidden activations as *witnesses* must then bind them to
their pre-activations some other way. Computing them inside the circuit removes the witnesses
altogether: the activation is a fixed arithmetic function of committed values.

* ``relu(p) = (p + |p|) / 2``: exact, also in fixed point (``p + |p|`` is even).
* ``gelu(p) = p Phi(p) = relu(p) - a Phi(-a)`` with ``a = |p|``. The correction ``e(a) = a Phi(-a)`` is
  smooth and decays fast, so it is replaced by a degree-10 Chebyshev interpolant on ``[0, T]``, ``T = 5``,
  evaluated at ``min(|p|, T) = (|p| + T - ||p| - T|) / 2`` by Clenshaw's recurrence (ten products, all
  intermediate values bounded by the coefficients' absolute sum, 0.21: benign in fixed point).

**Certified error** of :func:`gelu_certified` against the exact erf GELU, for every real ``p``:
at most the interpolant's error on ``[0, T]`` (6.05e-5, on a grid of 5 M points) plus the grid's
blind spot (the error's derivative is at most ``1.2 + 10^2 * 0.213 * 2 / T`` by Markov's inequality,
times half the 1e-6 spacing: 5e-6) plus the clamp's tail ``sup_{a > T} |e(a) - e(T)| <= T Phi(-T)``
(1.4e-6): below :data:`GELU_ERROR_BOUND` = 7e-5, about half a fixed-point unit at scale 13.
``tests/test_output_refit_relation.py`` re-checks the bound on a dense grid out to ``|p| = 60``.

The client's refit computes its hidden activations with these same functions (one definition of the
update); the models themselves keep torch's exact GELU for inference. The difference is within the
bound above, far below anything the benchmark resolves.
"""

from __future__ import annotations

from typing import Literal

import torch

Activation = Literal["gelu", "relu"]
ACTIVATIONS: tuple[Activation, ...] = ("gelu", "relu")

GELU_CLAMP = 5.0
# Chebyshev coefficients (first kind, on t = 2 a / T - 1) of e(a) = a Phi(-a), interpolated at the 11
# Chebyshev points of [0, T] (numpy.polynomial.chebyshev.chebinterpolate). Literals, not computed at
# import: the circuit's constants, and so its verifying key, must not depend on a numpy version.
GELU_CORRECTION_COEFFS: tuple[float, ...] = (
    4.5240245132542087e-02,
    -5.7656333554145407e-02,
    -6.5122068243319928e-03,
    4.3963118142014736e-02,
    -3.8604785606738821e-02,
    1.6045186064178939e-02,
    -1.1121147497337373e-03,
    -2.3405053367679873e-03,
    1.1225312453368073e-03,
    -4.6823025843990490e-05,
    -1.4185096923452774e-04,
)
GELU_ERROR_BOUND = 7e-5


def relu(p: torch.Tensor) -> torch.Tensor:
    """ReLU without a comparison: ``(p + |p|) / 2``."""
    return (p + torch.abs(p)) * 0.5


def gelu_correction(a: torch.Tensor) -> torch.Tensor:
    """``a Phi(-a)`` for ``a >= 0`` (clamped at ``GELU_CLAMP``), by Clenshaw's recurrence."""
    clamped = (a + GELU_CLAMP - torch.abs(a - GELU_CLAMP)) * 0.5
    t = clamped * (2.0 / GELU_CLAMP) - 1.0
    two_t = t * 2.0
    coeffs = GELU_CORRECTION_COEFFS
    # b_k = c_k + 2 t b_{k+1} - b_{k+2}, from b_N = c_N; the result is c_0 + t b_1 - b_2. The first
    # two terms stay Python scalars so the exported graph has no zero-filled tensors.
    b_next: torch.Tensor = two_t * coeffs[-1] + coeffs[-2]
    b_after: torch.Tensor | float = coeffs[-1]
    for c in coeffs[-3:0:-1]:
        b_next, b_after = two_t * b_next - b_after + c, b_next
    return t * b_next - b_after + coeffs[0]


def gelu_certified(p: torch.Tensor) -> torch.Tensor:
    """GELU within ``GELU_ERROR_BOUND`` of the exact erf form, from ``+``, ``*`` and ``|x|`` only."""
    return relu(p) - gelu_correction(torch.abs(p))


def activate(p: torch.Tensor, activation: Activation) -> torch.Tensor:
    """The activation as the circuit computes it (and, in float64, as the client's refit does)."""
    if activation == "relu":
        return relu(p)
    if activation == "gelu":
        return gelu_certified(p)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
