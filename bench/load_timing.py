"""The load benchmark's RPC timing: every call's latency (server streams: until the first message) and
status on the simulated clients' channels, and the percentiles they are reported as."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import numpy as np


class RpcTimer(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]  # grpc ships no stubs for these bases
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
):
    """Times every RPC on a channel (server streams: until the first message) and counts statuses."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ms: dict[str, list[float]] = defaultdict(list)
        self.codes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def record(self, method: str, started: float, code: grpc.StatusCode | None) -> None:
        name = method.rsplit("/", 1)[-1]
        with self.lock:
            if code is None or code == grpc.StatusCode.OK:
                self.ms[name].append((time.perf_counter() - started) * 1000)
            self.codes[name]["OK" if code is None else code.name] += 1

    def _unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        started = time.perf_counter()
        call = continuation(details, request)
        try:
            call.result()
            self.record(details.method, started, None)
        except grpc.RpcError as exc:
            self.record(details.method, started, exc.code())
        return call

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return self._unary(continuation, client_call_details, request)

    def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return self._unary(continuation, client_call_details, request_iterator)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return _FirstMessageTimer(
            continuation(client_call_details, request), self, client_call_details.method
        )


class _FirstMessageTimer:
    """Wraps a server-stream call: records the time to its first message, delegates everything else."""

    def __init__(self, call: Any, timer: RpcTimer, method: str) -> None:
        self._call, self._timer, self._method = call, timer, method
        self._started: float | None = time.perf_counter()

    def __iter__(self) -> _FirstMessageTimer:
        return self

    def __next__(self) -> Any:
        try:
            item = next(self._call)
        except grpc.RpcError as exc:
            if self._started is not None:
                self._timer.record(self._method, self._started, exc.code())
                self._started = None
            raise
        if self._started is not None:
            self._timer.record(self._method, self._started, None)
            self._started = None
        return item

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


def percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"n": 0, "p50": float("nan"), "p99": float("nan")}
    arr = np.asarray(values)
    return {
        "n": len(values),
        "p50": round(float(np.percentile(arr, 50)), 2),
        "p99": round(float(np.percentile(arr, 99)), 2),
    }
