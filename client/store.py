"""Durable client state in one SQLite file: identity, pinned provider key, cursor, commitments, receipts.

The file is what lets a device crash or restart at any point without applying a deletion twice:

- the prover's output (after-commitments and proofs) is saved *before* submitting, so a restart
  resubmits the same bytes (the provider answers an identical submission idempotently) instead of
  re-running the update;
- recording the receipt, dropping the pending entry, advancing the cursor and replacing the current
  commitments happen in one transaction, so the state is always "before" or "after", never between.

The file is created with mode 0600 because it holds the client's private signing key.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from zkunlearn.errors import ZkUnlearnError

__all__ = ["AppliedRecord", "ClientStore", "PendingUpdate", "StoreError"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS pending (
    request_id TEXT PRIMARY KEY,
    cursor INTEGER NOT NULL,
    after_commitments TEXT NOT NULL,
    proofs TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS applied (
    request_id TEXT PRIMARY KEY,
    cursor INTEGER NOT NULL,
    verdict TEXT NOT NULL,
    reason TEXT NOT NULL,
    submission_id TEXT NOT NULL,
    receipt_canonical BLOB NOT NULL,
    receipt_signature BLOB NOT NULL,
    leaf_index INTEGER NOT NULL,
    finished_ms INTEGER NOT NULL
);
"""

_APPLIED_COLUMNS = (
    "request_id, cursor, verdict, reason, submission_id, receipt_canonical, receipt_signature, leaf_index"
)


class StoreError(ZkUnlearnError, RuntimeError):
    """The client store is missing something it needs (identity, pinned key) or is inconsistent."""


@dataclass(frozen=True)
class PendingUpdate:
    request_id: str
    cursor: int
    after_commitments: list[dict[str, object]]
    proofs: list[bytes]


@dataclass(frozen=True)
class AppliedRecord:
    request_id: str
    cursor: int
    verdict: str
    reason: str
    submission_id: str
    receipt_canonical: bytes
    receipt_signature: bytes
    leaf_index: int


class ClientStore:
    """Thread-safe; every write is one ``BEGIN IMMEDIATE`` transaction."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
        self._lock = threading.RLock()
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        with self._txn() as cur:
            for stmt in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                cur.execute(stmt)

    @contextlib.contextmanager
    def _txn(self) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- key/value ----------------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def put(self, key: str, value: bytes) -> None:
        with self._txn() as cur:
            cur.execute(
                "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = ?",
                (key, value, value),
            )

    def put_if_absent(self, key: str, value: bytes) -> bytes:
        """Store ``value`` unless the key exists; return what is stored (first writer wins)."""
        with self._txn() as cur:
            row = cur.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            if row is not None:
                return bytes(row[0])
            cur.execute("INSERT INTO meta(key, value) VALUES(?, ?)", (key, value))
            return value

    def get_json(self, key: str) -> object:
        raw = self.get(key)
        return None if raw is None else json.loads(raw)

    def put_json(self, key: str, value: object) -> None:
        self.put(key, json.dumps(value, sort_keys=True, separators=(",", ":")).encode())

    @property
    def cursor(self) -> int:
        raw = self.get("cursor")
        return 0 if raw is None else int(raw)

    def advance_cursor(self, cursor: int) -> None:
        """Move the cursor forward only; a late, smaller value never rewinds it."""
        with self._txn() as cur:
            row = cur.execute("SELECT value FROM meta WHERE key = 'cursor'").fetchone()
            if row is None or int(row[0]) < cursor:
                value = str(cursor).encode()
                cur.execute(
                    "INSERT INTO meta(key, value) VALUES('cursor', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = ?",
                    (value, value),
                )

    # -- pending and applied updates ----------------------------------------------------------------

    def save_pending(self, update: PendingUpdate, created_ms: int) -> PendingUpdate:
        """Save the prover's output; if one is already saved for the request, keep and return that one."""
        with self._txn() as cur:
            row = cur.execute(
                "SELECT request_id FROM pending WHERE request_id = ?", (update.request_id,)
            ).fetchone()
            if row is None:
                cur.execute(
                    "INSERT INTO pending(request_id, cursor, after_commitments, proofs, created_ms) "
                    "VALUES(?,?,?,?,?)",
                    (
                        update.request_id,
                        update.cursor,
                        json.dumps(update.after_commitments, sort_keys=True),
                        json.dumps([p.hex() for p in update.proofs]),
                        created_ms,
                    ),
                )
                return update
        found = self.pending(update.request_id)
        assert found is not None
        return found

    def pending(self, request_id: str) -> PendingUpdate | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT request_id, cursor, after_commitments, proofs FROM pending WHERE request_id = ?",
                (request_id,),
            ).fetchone()
        if row is None:
            return None
        return PendingUpdate(
            row[0], int(row[1]), json.loads(row[2]), [bytes.fromhex(p) for p in json.loads(row[3])]
        )

    def pending_ids(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._conn.execute("SELECT request_id FROM pending ORDER BY cursor")]

    def finish(
        self, record: AppliedRecord, finished_ms: int, new_commitments: list[dict[str, object]] | None
    ) -> AppliedRecord:
        """Atomically: receipt stored, pending dropped, cursor advanced, commitments replaced if accepted.

        Idempotent per request id: if a receipt is already stored for it (another thread or process
        finished it first), nothing is changed and the stored record is returned; otherwise ``record``.
        """
        with self._txn() as cur:
            inserted = cur.execute(
                "INSERT OR IGNORE INTO applied(request_id, cursor, verdict, reason, submission_id, "
                "receipt_canonical, receipt_signature, leaf_index, finished_ms) VALUES(?,?,?,?,?,?,?,?,?)",
                (
                    record.request_id,
                    record.cursor,
                    record.verdict,
                    record.reason,
                    record.submission_id,
                    record.receipt_canonical,
                    record.receipt_signature,
                    record.leaf_index,
                    finished_ms,
                ),
            ).rowcount
            if inserted != 1:
                row = cur.execute(
                    f"SELECT {_APPLIED_COLUMNS} FROM applied WHERE request_id = ?", (record.request_id,)
                ).fetchone()
                return _applied(row)
            cur.execute("DELETE FROM pending WHERE request_id = ?", (record.request_id,))
            row = cur.execute("SELECT value FROM meta WHERE key = 'cursor'").fetchone()
            if row is None or int(row[0]) < record.cursor:
                value = str(record.cursor).encode()
                cur.execute(
                    "INSERT INTO meta(key, value) VALUES('cursor', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = ?",
                    (value, value),
                )
            if new_commitments is not None:
                value = json.dumps(new_commitments, sort_keys=True, separators=(",", ":")).encode()
                cur.execute(
                    "INSERT INTO meta(key, value) VALUES('commitments', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = ?",
                    (value, value),
                )
        return record

    def applied(self, request_id: str) -> AppliedRecord | None:
        with self._lock:
            row = self._conn.execute(
                f"SELECT {_APPLIED_COLUMNS} FROM applied WHERE request_id = ?", (request_id,)
            ).fetchone()
        return None if row is None else _applied(row)

    def receipts(self) -> list[AppliedRecord]:
        with self._lock:
            rows = self._conn.execute(f"SELECT {_APPLIED_COLUMNS} FROM applied ORDER BY cursor").fetchall()
        return [_applied(r) for r in rows]


def _applied(row: tuple[object, ...]) -> AppliedRecord:
    return AppliedRecord(
        request_id=str(row[0]),
        cursor=int(str(row[1])),
        verdict=str(row[2]),
        reason=str(row[3]),
        submission_id=str(row[4]),
        receipt_canonical=bytes(row[5]),  # type: ignore[call-overload]
        receipt_signature=bytes(row[6]),  # type: ignore[call-overload]
        leaf_index=int(str(row[7])),
    )
