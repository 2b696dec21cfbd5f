"""ONNX export of the check relations, checked against torch before anything is compiled.

Why so defensive: torch 2.13 defaults to the dynamo exporter (external weight files and opset 20,
which ezkl's tract cannot read), and ezkl turns an op it does not know into a silent ``Unknown`` node.
So we pin the legacy exporter and opset 18, refuse any op outside a list checked with ezkl, and
compare onnxruntime's output with the torch relation on random inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

from zkunlearn.errors import ZkUnlearnError

OPSET = 18

SUPPORTED_OPS = frozenset(
    {
        "Abs",
        "Add",
        "Concat",
        "Constant",
        "Gather",
        "Identity",
        "MatMul",
        "Mul",
        "ReduceMax",
        "ReduceSum",
        "Reshape",
        "Slice",
        "Squeeze",
        "Sub",
        "Transpose",
        "Unsqueeze",
    }
)
"""Ops the relations export to and that ezkl 23 compiles (checked with ``mock`` and real proofs)."""


class ExportError(ZkUnlearnError, RuntimeError):
    """The relation did not export to a model ezkl can prove faithfully."""


def export_relation(
    module: nn.Module,
    example: Sequence[torch.Tensor],
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    *,
    check_trials: int = 3,
    atol: float = 1e-4,
    rtol: float = 0.0,
    seed: int = 0,
) -> Path:
    """Export ``module`` to ``path`` (single file, opset 18) and check it with onnxruntime."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    with torch.no_grad():
        torch.onnx.export(
            module,
            tuple(example),
            str(path),
            input_names=list(input_names),
            output_names=list(output_names),
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    ops = {node.op_type for node in model.graph.node}
    unknown = sorted(ops - SUPPORTED_OPS)
    if unknown:
        raise ExportError(f"{path.name}: ops {unknown} are not in the checked ezkl op list")
    check_against_torch(
        module, example, path, input_names, trials=check_trials, atol=atol, rtol=rtol, seed=seed
    )
    return path


def check_against_torch(
    module: nn.Module,
    example: Sequence[torch.Tensor],
    path: Path,
    input_names: Sequence[str],
    *,
    trials: int = 3,
    atol: float = 1e-4,
    rtol: float = 0.0,
    seed: int = 0,
) -> float:
    """Largest |onnxruntime - torch| over random inputs; raises ExportError above
    ``atol + rtol * max|torch|`` (``rtol`` for relations whose outputs are large integers)."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    worst, limit = 0.0, atol
    for _ in range(trials):
        inputs = [torch.randn(t.shape, generator=gen) for t in example]
        with torch.no_grad():
            expected = module(*inputs).numpy()
        feeds = {name: t.numpy().astype(np.float32) for name, t in zip(input_names, inputs, strict=True)}
        got = np.asarray(session.run(None, feeds)[0])
        if got.shape != expected.shape:
            raise ExportError(f"{path.name}: onnx output shape {got.shape} != torch {expected.shape}")
        worst = max(worst, float(np.max(np.abs(got - expected))))
        limit = max(limit, atol + rtol * float(np.max(np.abs(expected))))
    if worst > limit:
        raise ExportError(f"{path.name}: onnxruntime differs from torch by {worst:.3g} > {limit:.3g}")
    return worst
