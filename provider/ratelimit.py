"""Token buckets by key, for the calls anyone may make before authenticating (``Challenge``)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["RateLimiter"]


class RateLimiter:
    """``rate`` calls per second per key, bursts up to ``burst``; ``rate`` 0 lets everything through.

    At most ``max_keys`` buckets are kept (the least recently used go first), so a caller cycling
    through keys costs bounded memory; a dropped bucket comes back full, which only loosens the limit.
    """

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = max(1.0, 2.0 * rate if burst is None else burst)
        self.max_keys, self.clock = max_keys, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        """Take one token from ``key``'s bucket; ``False`` when it is empty."""
        if self.rate <= 0:
            return True
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            allowed = tokens >= 1.0
            self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return allowed
