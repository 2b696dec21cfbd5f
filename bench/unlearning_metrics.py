"""What the unlearning benchmark measures: a model's output accuracies and forgetting (probe, relearn,
calibrated MIA: bench/forgetting.py) on one (task, deletion, seed)'s views, and the wall time and peak
memory of an update."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from torch import Tensor, nn
from zkunlearn.bench.forgetting import ForgettingViews, MiaReference, forgetting_metrics


@contextmanager
def measured() -> Iterator[dict[str, float]]:
    """Wall time and peak process RSS (sampled every 5 ms) of the enclosed block."""
    import psutil

    proc = psutil.Process()
    out = {"seconds": 0.0, "peak_rss_mb": proc.memory_info().rss / 2**20}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            out["peak_rss_mb"] = max(out["peak_rss_mb"], proc.memory_info().rss / 2**20)
            stop.wait(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - start
        stop.set()
        thread.join()
        out["peak_rss_mb"] = max(out["peak_rss_mb"], proc.memory_info().rss / 2**20)


@dataclass
class Views:
    """What the metrics look at, in one shape for image and code tasks."""

    forget_test: tuple[Tensor, Tensor]  # forget class/slice, held out, provider domain (the deleted data's)
    forget_client: tuple[Tensor, Tensor]  # forget class, held out, client domain (the prose slice for code)
    retain_test: tuple[Tensor, Tensor]  # provider domain, other classes / code
    personal_test: tuple[Tensor, Tensor]  # client domain, other classes / tkinter
    forgetting: ForgettingViews  # the probe, relearn and MIA data (bench/forgetting.py)


def logits(model: nn.Module, x: Tensor) -> Tensor:
    """The model's outputs on ``x`` (eval mode, in batches of 256)."""
    from zkunlearn.tasks.train import predict

    return predict(model, x, batch_size=256)


def evaluate(
    model: nn.Module, views: Views, seed: int, reference: MiaReference | None = None
) -> dict[str, float | int | bool | None]:
    """Output accuracies, and with the retrained model's ``reference`` the forgetting metrics."""
    from zkunlearn.tasks.metrics import accuracy

    out: dict[str, float | int | bool | None] = {
        "forget_acc": accuracy(logits(model, views.forget_test[0]), views.forget_test[1]),
        "forget_acc_client": accuracy(logits(model, views.forget_client[0]), views.forget_client[1]),
        "retain_acc": accuracy(logits(model, views.retain_test[0]), views.retain_test[1]),
        "personal_acc": accuracy(logits(model, views.personal_test[0]), views.personal_test[1]),
    }
    if reference is not None:
        out.update(forgetting_metrics(model, views.forgetting, reference, seed))
    return out


def masked_forget_acc(model: nn.Module, dense: Mapping[str, Tensor], views: Views) -> float:
    from zkunlearn.tasks.metrics import accuracy
    from zkunlearn.tasks.train import masked_copy

    return accuracy(logits(masked_copy(model, dense), views.forget_test[0]), views.forget_test[1])


def split_accuracy(model: nn.Module, split: tuple[Tensor, Tensor]) -> float:
    from zkunlearn.tasks.metrics import accuracy

    return accuracy(logits(model, split[0]), split[1])
