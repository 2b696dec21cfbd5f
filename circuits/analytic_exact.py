"""Exact ridge-head unlearning as an integer check relation over a committed Gram matrix.

State: the augmented Gram ``M = sum z z^T`` of every row the head learned, ``z = [x_q, y_q]`` with
features and targets quantised to ``2**-f`` (``N = d + k``; integers, scale ``2**2f``). The ridge head
is ``W* = A^-1 B`` with ``A = M_xx + gamma_q I`` and ``B = M_xy``. The circuit runs at scale 0, so every
product is exact in the field. For forget rows ``Z_u`` (public: the provider sent them) it checks:

* ``M_after = M - Z_u^T Z_u`` exactly: the ``N * N`` outputs ``eq`` must all be 0;
* ``R = (M'_xx + gamma_q I) W_q - 2**w M'_xy`` (``d x k``): ``W_q`` is ``2**w`` times the ridge solution
  on what remains, up to rounding; public output ``sum R**2``;
* ``E = 2**(2l) (M' + eta_q I) - L L^T`` for the client's factor ``L``: ``M'`` is positive
  semidefinite up to ``eta_q + |E| / 2**(2l)``; public output ``sum E**2``.

So ``A' >= gamma_q / 2`` (the thresholds make ``eta_q + |E| / 2**(2l) <= gamma_q / 2``), which turns the
bound on ``R`` into a bound on ``W_q`` itself, and forgetting rows the Gram never held (``M'``
indefinite) cannot be proven. The error analysis is in ``docs/protocol.md`` ("Exact analytic head").

Range: ``M``, ``W`` and ``L`` enter only as ``|X + K| - K``, whose decomposition bounds every entry, so
no product or sum of squares can wrap modulo the field. ``M_after`` needs no range check (it equals a
bounded expression), nor does ``Z_u`` (the verifier commits it itself). Every committed tensor carries
one trailing row the relation ignores: blinding, or the request binding for ``Z_u``. Enrollment is the
same relation with ``Z_u = 0``: it proves the enrolled Gram in range and positive semidefinite, and the
enrolled head its ridge solution.
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_NAMES = ("m", "m_after", "w", "z", "factor")
OUTPUT_NAMES = ("outputs",)


def _float32_exact(name: str, value: int, limit: int) -> None:
    if not 0 <= value <= limit or int(torch.tensor(float(value), dtype=torch.float32).item()) != value:
        raise ValueError(f"constant {name} = {value} must be a float32-exact integer in [0, {limit}]")


class AnalyticExactCheck(nn.Module):
    """Public outputs ``(N * N + 2,)``: ``eq`` (row-major), ``sum R**2``, ``sum E**2``.

    Inputs (integers carried as floats for tracing; each has one trailing ignored row): ``m``,
    ``m_after`` and ``factor`` (``L``) ``(N + 1, N)``; ``w`` ``(d + 1, k)``; ``z`` ``(n_u + 1, N)``.
    """

    def __init__(
        self,
        d: int,
        k: int,
        n_u: int,
        *,
        gamma_q: int,
        eta_q: int,
        w_bits: int,
        l_bits: int,
        m_offset: int,
        w_offset: int,
        l_offset: int,
        max_constant: int,
    ) -> None:
        super().__init__()
        if min(d, k, n_u) < 1:
            raise ValueError(f"d, k, n_u must be >= 1 (got {d}, {k}, {n_u})")
        self.d, self.k, self.n_u, self.n = d, k, n_u, d + k
        self.w_scale = 1 << w_bits
        self.l_scale = 1 << (2 * l_bits)
        self.m_offset, self.w_offset, self.l_offset = m_offset, w_offset, l_offset
        for name, value in (
            ("gamma_q", gamma_q),
            ("2**w", self.w_scale),
            ("2**(2l)", self.l_scale),
            ("2**(2l) eta_q", self.l_scale * eta_q),
            ("m_offset", m_offset),
            ("w_offset", w_offset),
            ("l_offset", l_offset),
        ):
            _float32_exact(name, value, max_constant)
        self.gamma_eye: torch.Tensor
        self.eta_eye: torch.Tensor
        self.register_buffer("gamma_eye", float(gamma_q) * torch.eye(d))
        self.register_buffer("eta_eye", float(self.l_scale * eta_q) * torch.eye(self.n))

    def residuals(
        self,
        m: torch.Tensor,
        m_after: torch.Tensor,
        w: torch.Tensor,
        z: torch.Tensor,
        factor: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``eq``, ``R`` and ``E`` (for tests; never a circuit output)."""
        d, n = self.d, self.n
        m_in = torch.abs(m[:n] + self.m_offset) - self.m_offset
        zu = z[: self.n_u]
        m_new = m_in - torch.matmul(zu.transpose(0, 1), zu)
        eq = m_after[:n] - m_new
        w_in = torch.abs(w[:d] + self.w_offset) - self.w_offset
        a = m_new[:d, :d] + self.gamma_eye
        r = torch.matmul(a, w_in) - self.w_scale * m_new[:d, d:]
        f_in = torch.abs(factor[:n] + self.l_offset) - self.l_offset
        e = self.l_scale * m_new + self.eta_eye - torch.matmul(f_in, f_in.transpose(0, 1))
        return eq, r, e

    def forward(
        self,
        m: torch.Tensor,
        m_after: torch.Tensor,
        w: torch.Tensor,
        z: torch.Tensor,
        factor: torch.Tensor,
    ) -> torch.Tensor:
        eq, r, e = self.residuals(m, m_after, w, z, factor)
        sums = torch.stack([(r * r).sum(), (e * e).sum()])
        return torch.cat([eq.reshape(-1), sums])

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        n = self.n
        return (
            torch.zeros(n + 1, n),
            torch.zeros(n + 1, n),
            torch.zeros(self.d + 1, self.k),
            torch.zeros(self.n_u + 1, n),
            torch.zeros(n + 1, n),
        )
