"""A bounded, thread-safe memo of KZG commitments.

A verifier commits to what it issued itself (a deletion request's mask, bound to the request digest)
before it can check a proof against it. That commitment depends only on the request, so the provider
can compute it when it issues the request and find it here when the proofs arrive
(``docs/decisions/mask-commitments-at-issue.md``). A commitment is a pure function of its key files
and its field elements, so a hit is always the value a fresh computation would return; a miss just
computes it. Concurrent callers of one key wait for the one computation in flight.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path

__all__ = ["CommitmentMemo", "commitment_key"]

DEFAULT_CAPACITY = 65_536
"""Entries kept (about 250 bytes each): the mask batches of a few hundred outstanding ViT deletions."""


def commitment_key(felts: Sequence[str], vk_path: Path, settings_path: Path, srs_path: Path) -> bytes:
    """SHA-256 over the key files' paths and the field elements, each length-prefixed."""
    h = hashlib.sha256()
    for part in (str(vk_path), str(settings_path), str(srs_path), *felts):
        data = part.encode()
        h.update(len(data).to_bytes(4, "big") + data)
    return h.digest()


class CommitmentMemo:
    """The last ``capacity`` commitments computed, by :func:`commitment_key`.

    Key files are identified by path: a provider loads its circuits directory once and never rewrites
    its keys in place (a new circuit gets a new directory).
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[bytes, Future[str]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get(self, key: bytes, compute: Callable[[], str]) -> str:
        """The memoised value of ``key``, computing it with ``compute`` (once) when absent. A failed
        computation is not kept: its error reaches every caller that waited for it, and the next call
        computes again."""
        with self._lock:
            future = self._entries.get(key)
            if future is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                owner = False
            else:
                future = Future()
                self._entries[key] = future
                self.misses += 1
                owner = True
                while len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
        if not owner:
            return future.result()
        try:
            value = compute()
        except BaseException as exc:
            with self._lock:
                if self._entries.get(key) is future:
                    del self._entries[key]
            future.set_exception(exc)
            raise
        future.set_result(value)
        return value
