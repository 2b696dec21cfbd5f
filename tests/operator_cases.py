"""A tiny classifier and its deletion planner for operator tests (importable by a provider process).

Its first layer's weight is the parameter ``fc1`` (4 x 8, two blocks of 16), the layer the fake
clients of ``tests.test_grpc`` enroll, so the planner's masks fit them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from zkunlearn.provider.planning import MaskOptions, TorchPlanner

N_CLASSES = 3
N_SAMPLES = 60
INPUTS = 8


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Parameter(torch.randn(4, INPUTS) / INPUTS**0.5)
        self.fc2 = nn.Parameter(torch.randn(N_CLASSES, 4) / 2.0)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x @ self.fc1.T) @ self.fc2.T


def data(seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(N_SAMPLES) % N_CLASSES
    x = torch.randn(N_SAMPLES, INPUTS, generator=generator) + y[:, None].float()
    return x, y


def planner(seed: int = 0) -> TorchPlanner:
    torch.manual_seed(seed)
    x, y = data(seed)
    return TorchPlanner(
        TinyNet(),
        x,
        y,
        ["fc1"],
        defaults=MaskOptions("fisher-ratio", 250_000, "unstructured"),
        block_size=16,
        head_features=lambda inputs: inputs[:, :4].double().numpy(),
    )
