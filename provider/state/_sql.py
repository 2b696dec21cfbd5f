"""The SQLAlchemy backend: portable Core tables and statements, SQLite and PostgreSQL alike."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import tenacity
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, OperationalError
from zkunlearn.provider.state._base import (
    _CONSUMED,
    VERDICT_ACCEPTED,
    VERDICT_PENDING,
    VERDICT_REJECTED,
    AlreadyAcceptedError,
    ClientRecord,
    ConflictError,
    LeafRecord,
    NonceError,
    NotFoundError,
    PendingRequestsError,
    ProviderState,
    ReplacedEnrollment,
    RequestRecord,
    StaleCommitmentsError,
    StateSummary,
    SubmissionRecord,
    TreeHeadRecord,
    _check_nonce,
    _check_rotation,
    _check_verdict,
    _client_same,
    _pending_message,
    _stale_message,
)
from zkunlearn.provider.state._schema import (
    _WRITE,
    _client_row,
    _head_row,
    _leaf_row,
    _request_row,
    _sqlite_pragmas,
    _submission_row,
    clients_t,
    heads_t,
    leaves_t,
    nonces_t,
    replaced_t,
    requests_t,
    submissions_t,
    tip_t,
    upgrade_schema,
)


class SqlState(ProviderState):
    """SQLAlchemy Core over any SQL database; ``SqlState.sqlite(path)`` is the default deployment."""

    def __init__(self, url: str, *, create: bool = True, **engine_options: Any) -> None:
        self.url = url
        self._engine = sa.create_engine(url, **engine_options)
        self._is_sqlite = self._engine.dialect.name == "sqlite"
        self._writer = self._engine.execution_options(**{_WRITE: True})
        if self._is_sqlite:
            _sqlite_pragmas(self._engine)
        if create:
            upgrade_schema(self._engine)

    @classmethod
    def sqlite(cls, path: str | Path) -> SqlState:
        return cls(f"sqlite+pysqlite:///{Path(path)}")

    def close(self) -> None:
        self._engine.dispose()

    @contextlib.contextmanager
    def _txn(self) -> Iterator[Connection]:
        with self._writer.begin() as conn:
            yield conn

    reconnect_budget_s = 60.0
    """How long a write keeps retrying a lost connection: long enough for the database server to restart."""

    def _retrying(self, fn: Callable[[Connection], Any], attempts: int = 8) -> Any:
        """Retry a transaction that lost a race on a unique key or a lock (``attempts`` times), or its
        connection (for :attr:`reconnect_budget_s`: a database restart loses no write).

        Each attempt is a fresh transaction on a fresh pooled connection (a dropped one is
        invalidated by SQLAlchemy), so the loser re-reads what the winner wrote and decides again;
        jittered backoff keeps replicas that collided from colliding again in lockstep.
        """
        budget = self.reconnect_budget_s

        def stop(state: tenacity.RetryCallState) -> bool:
            error = state.outcome.exception() if state.outcome is not None else None
            if isinstance(error, OperationalError) and not isinstance(error, IntegrityError):
                return state.seconds_since_start is not None and state.seconds_since_start > budget
            return state.attempt_number >= attempts

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type((IntegrityError, OperationalError)),
            stop=stop,
            wait=tenacity.wait_random_exponential(multiplier=0.005, max=1.0),
            reraise=True,
        )
        for attempt in retrying:
            with attempt, self._txn() as conn:
                return fn(conn)
        raise AssertionError("unreachable")  # pragma: no cover - reraise=True raises the last error

    def _read(self, fn: Callable[[Connection], Any]) -> Any:
        """A read on a fresh connection, retried like a write while the connection is lost."""
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(OperationalError),
            stop=tenacity.stop_after_delay(self.reconnect_budget_s),
            wait=tenacity.wait_random_exponential(multiplier=0.005, max=1.0),
            reraise=True,
        )
        for attempt in retrying:
            with attempt, self._engine.connect() as conn:
                return fn(conn)
        raise AssertionError("unreachable")  # pragma: no cover - reraise=True raises the last error

    def add_client(self, record: ClientRecord) -> tuple[ClientRecord, bool]:
        def run(conn: Connection) -> tuple[ClientRecord, bool]:
            row = conn.execute(sa.select(clients_t).where(clients_t.c.client_id == record.client_id)).first()
            if row is not None:
                old = _client_row(row)
                if _client_same(old, record):
                    return old, False
                raise ConflictError(
                    f"client id {record.client_id!r} is already enrolled with another key or model"
                )
            conn.execute(sa.insert(clients_t).values(**_client_values(record)))
            return record, True

        result: tuple[ClientRecord, bool] = self._retrying(run)
        return result

    def rotate_client(
        self,
        record: ClientRecord,
        previous_enrollment_sha256: str,
        leaf: LeafRecord,
        *,
        now_ms: int,
        refuse_pending: bool,
    ) -> tuple[ClientRecord, LeafRecord]:
        def run(conn: Connection) -> tuple[ClientRecord, LeafRecord]:
            # Row lock: two re-enrollments of one client are decided one after the other.
            row = conn.execute(
                sa.select(clients_t).where(clients_t.c.client_id == record.client_id).with_for_update()
            ).first()
            old = _check_rotation(
                None if row is None else _client_row(row), record, previous_enrollment_sha256
            )
            if refuse_pending:
                open_ids = list(
                    conn.execute(
                        sa.select(requests_t.c.request_id)
                        .where(
                            requests_t.c.client_id == record.client_id,
                            requests_t.c.accepted_submission_id.is_(None),
                            requests_t.c.expires_ms >= now_ms,
                        )
                        .order_by(requests_t.c.cursor)
                    ).scalars()
                )
                if open_ids:
                    raise PendingRequestsError(_pending_message(record.client_id, open_ids))
            stored_leaf = _append_leaf(conn, leaf)
            self._fault("leaf-appended")
            conn.execute(sa.insert(replaced_t).values(replaced_at=stored_leaf.index, **_client_values(old)))
            values = _client_values(record)
            del values["client_id"]
            conn.execute(
                sa.update(clients_t).where(clients_t.c.client_id == record.client_id).values(**values)
            )
            return record, stored_leaf

        result: tuple[ClientRecord, LeafRecord] = self._retrying(run)
        return result

    def replaced_enrollments(self, client_id: str) -> list[ReplacedEnrollment]:
        rows = self._read(
            lambda conn: conn.execute(
                sa.select(replaced_t)
                .where(replaced_t.c.client_id == client_id)
                .order_by(replaced_t.c.replaced_at)
            ).all()
        )
        return [ReplacedEnrollment(row.replaced_at, _client_row(row)) for row in rows]

    def get_client(self, client_id: str) -> ClientRecord | None:
        row = self._read(
            lambda conn: conn.execute(sa.select(clients_t).where(clients_t.c.client_id == client_id)).first()
        )
        return None if row is None else _client_row(row)

    def list_clients(
        self, model_id: str | None = None, after: str = "", limit: int = 1000
    ) -> list[ClientRecord]:
        query = sa.select(clients_t).where(clients_t.c.client_id > after)
        if model_id is not None:
            query = query.where(clients_t.c.model_id == model_id)
        query = query.order_by(clients_t.c.client_id).limit(max(0, limit))
        rows = self._read(lambda conn: conn.execute(query).all())
        return [_client_row(row) for row in rows]

    def summary(self) -> StateSummary:
        def run(conn: Connection) -> StateSummary:
            count = sa.func.count()
            verdicts: dict[int, int] = dict(
                conn.execute(
                    sa.select(submissions_t.c.verdict, count).group_by(submissions_t.c.verdict)
                ).all()
            )
            answered = sa.select(count).where(requests_t.c.accepted_submission_id.is_not(None))
            tip = sa.select(tip_t.c.size).where(tip_t.c.tip_id == 1)
            return StateSummary(
                clients=int(conn.execute(sa.select(count).select_from(clients_t)).scalar_one()),
                requests=int(conn.execute(sa.select(count).select_from(requests_t)).scalar_one()),
                answered_requests=int(conn.execute(answered).scalar_one()),
                pending_submissions=int(verdicts.get(VERDICT_PENDING, 0)),
                accepted_submissions=int(verdicts.get(VERDICT_ACCEPTED, 0)),
                rejected_submissions=int(verdicts.get(VERDICT_REJECTED, 0)),
                ledger_size=int(conn.execute(tip).scalar_one()),
            )

        result: StateSummary = self._read(run)
        return result

    def add_nonce(self, client_id: str, nonce: bytes, expires_ms: int) -> None:
        try:
            with self._txn() as conn:
                conn.execute(
                    sa.insert(nonces_t).values(
                        nonce=nonce, client_id=client_id, expires_ms=expires_ms, used=False
                    )
                )
        except IntegrityError as exc:
            raise ConflictError("nonce collision") from exc

    def consume_nonce(self, client_id: str, nonce: bytes, now_ms: int) -> None:
        def run(conn: Connection) -> Any:
            # Retried as a whole on a lock timeout: the failed attempt rolled back, so the nonce is
            # still unused and a retry cannot consume it twice.
            done = conn.execute(
                sa.update(nonces_t)
                .where(
                    nonces_t.c.nonce == nonce,
                    nonces_t.c.client_id == client_id,
                    nonces_t.c.used.is_(False),
                    nonces_t.c.expires_ms >= now_ms,
                )
                .values(used=True)
            )
            if done.rowcount == 1:
                return _CONSUMED
            return conn.execute(sa.select(nonces_t).where(nonces_t.c.nonce == nonce)).first()

        row = self._retrying(run)
        if row is _CONSUMED:
            return
        _check_nonce(
            None if row is None else (row.client_id, row.expires_ms, bool(row.used)), client_id, now_ms
        )
        raise NonceError("nonce refused")  # pragma: no cover - _check_nonce raised already

    def purge_nonces(self, now_ms: int) -> int:
        with self._txn() as conn:
            return int(conn.execute(sa.delete(nonces_t).where(nonces_t.c.expires_ms < now_ms)).rowcount)

    def add_requests(self, records: Sequence[RequestRecord]) -> list[RequestRecord]:
        def run(conn: Connection) -> list[RequestRecord]:
            stored: list[RequestRecord] = []
            for record in records:
                if conn.execute(
                    sa.select(requests_t.c.request_id).where(requests_t.c.request_id == record.request_id)
                ).first():
                    raise ConflictError(f"request id {record.request_id!r} already exists")
                known = conn.execute(
                    sa.select(clients_t.c.client_id).where(clients_t.c.client_id == record.client_id)
                ).first()
                if known is None:
                    raise NotFoundError(f"unknown client {record.client_id!r}")
                top = conn.execute(
                    sa.select(sa.func.max(requests_t.c.cursor)).where(
                        requests_t.c.client_id == record.client_id
                    )
                ).scalar()
                item = dataclasses.replace(record, cursor=int(top or 0) + 1, accepted_submission_id=None)
                conn.execute(sa.insert(requests_t).values(**dataclasses.asdict(item)))
                stored.append(item)
            return stored

        result: list[RequestRecord] = self._retrying(run)
        return result

    def get_request(self, request_id: str) -> RequestRecord | None:
        row = self._read(
            lambda conn: conn.execute(
                sa.select(requests_t).where(requests_t.c.request_id == request_id)
            ).first()
        )
        return None if row is None else _request_row(row)

    def requests_after(self, client_id: str, cursor: int, limit: int) -> list[RequestRecord]:
        rows = self._read(
            lambda conn: conn.execute(
                sa.select(requests_t)
                .where(requests_t.c.client_id == client_id, requests_t.c.cursor > cursor)
                .order_by(requests_t.c.cursor)
                .limit(limit)
            ).all()
        )
        return [_request_row(r) for r in rows]

    def add_submission(self, record: SubmissionRecord) -> tuple[SubmissionRecord, bool]:
        def run(conn: Connection) -> tuple[SubmissionRecord, bool]:
            req = conn.execute(
                sa.select(requests_t).where(requests_t.c.request_id == record.request_id)
            ).first()
            if req is None:
                raise NotFoundError(f"unknown request {record.request_id!r}")
            old = conn.execute(
                sa.select(submissions_t).where(
                    submissions_t.c.request_id == record.request_id,
                    submissions_t.c.content_digest == record.content_digest,
                )
            ).first()
            if old is not None:
                return _submission_row(old), False
            if req.accepted_submission_id is not None:
                raise AlreadyAcceptedError(
                    f"request {record.request_id!r} was already answered by submission "
                    f"{req.accepted_submission_id!r}; a different submission is refused"
                )
            conn.execute(sa.insert(submissions_t).values(**dataclasses.asdict(record)))
            return record, True

        result: tuple[SubmissionRecord, bool] = self._retrying(run)
        return result

    def get_submission(self, submission_id: str) -> SubmissionRecord | None:
        row = self._read(
            lambda conn: conn.execute(
                sa.select(submissions_t).where(submissions_t.c.submission_id == submission_id)
            ).first()
        )
        return None if row is None else _submission_row(row)

    def submissions_for(self, request_id: str) -> list[SubmissionRecord]:
        rows = self._read(
            lambda conn: conn.execute(
                sa.select(submissions_t)
                .where(submissions_t.c.request_id == request_id)
                .order_by(submissions_t.c.created_ms)
            ).all()
        )
        return [_submission_row(r) for r in rows]

    def pending_submissions(self) -> list[SubmissionRecord]:
        rows = self._read(
            lambda conn: conn.execute(
                sa.select(submissions_t)
                .where(submissions_t.c.verdict == VERDICT_PENDING)
                .order_by(submissions_t.c.created_ms)
            ).all()
        )
        return [_submission_row(r) for r in rows]

    def claim_submissions(
        self, worker_id: str, now_ms: int, lease_ms: int, limit: int = 1
    ) -> list[SubmissionRecord]:
        def run(conn: Connection) -> list[SubmissionRecord]:
            ids = list(
                conn.execute(
                    sa.select(submissions_t.c.submission_id)
                    .where(
                        submissions_t.c.verdict == VERDICT_PENDING,
                        sa.or_(
                            submissions_t.c.lease_expires_ms.is_(None),
                            submissions_t.c.lease_expires_ms < now_ms,
                        ),
                    )
                    .order_by(submissions_t.c.created_ms)
                    .limit(max(0, limit))
                    .with_for_update(skip_locked=True)
                ).scalars()
            )
            if not ids:
                return []
            conn.execute(
                sa.update(submissions_t)
                .where(submissions_t.c.submission_id.in_(ids))
                .values(
                    claimed_by=worker_id,
                    lease_expires_ms=now_ms + lease_ms,
                    attempts=submissions_t.c.attempts + 1,
                )
            )
            rows = conn.execute(
                sa.select(submissions_t)
                .where(submissions_t.c.submission_id.in_(ids))
                .order_by(submissions_t.c.created_ms)
            ).all()
            return [_submission_row(r) for r in rows]

        result: list[SubmissionRecord] = self._retrying(run)
        return result

    def extend_lease(self, submission_id: str, worker_id: str, until_ms: int) -> bool:
        with self._txn() as conn:
            done = conn.execute(
                sa.update(submissions_t)
                .where(
                    submissions_t.c.submission_id == submission_id,
                    submissions_t.c.claimed_by == worker_id,
                    submissions_t.c.verdict == VERDICT_PENDING,
                )
                .values(lease_expires_ms=until_ms)
            )
            return bool(done.rowcount == 1)

    def release_claims(self, worker_prefix: str) -> int:
        with self._txn() as conn:
            done = conn.execute(
                sa.update(submissions_t)
                .where(
                    submissions_t.c.verdict == VERDICT_PENDING,
                    sa.func.substr(submissions_t.c.claimed_by, 1, len(worker_prefix)) == worker_prefix,
                )
                .values(lease_expires_ms=None)
            )
            return int(done.rowcount)

    def finish_submission(
        self,
        submission_id: str,
        verdict: int,
        reason: str,
        leaf: LeafRecord,
        *,
        verified_against: str | None = None,
    ) -> tuple[SubmissionRecord, LeafRecord]:
        _check_verdict(verdict)

        def run(conn: Connection) -> tuple[SubmissionRecord, LeafRecord]:
            # Row lock: a second worker finishing the same job waits here and then sees it finished.
            row = conn.execute(
                sa.select(submissions_t)
                .where(submissions_t.c.submission_id == submission_id)
                .with_for_update()
            ).first()
            if row is None:
                raise NotFoundError(f"unknown submission {submission_id!r}")
            sub = _submission_row(row)
            if sub.verdict != VERDICT_PENDING:
                stored = conn.execute(
                    sa.select(leaves_t).where(leaves_t.c.leaf_index == sub.leaf_index)
                ).one()
                return sub, _leaf_row(stored)
            stored_leaf = _append_leaf(conn, dataclasses.replace(leaf, submission_id=submission_id))
            self._fault("leaf-appended")
            conn.execute(
                sa.update(submissions_t)
                .where(submissions_t.c.submission_id == submission_id)
                .values(verdict=verdict, reason=reason, leaf_index=stored_leaf.index, lease_expires_ms=None)
            )
            self._fault("submission-updated")
            if verdict == VERDICT_ACCEPTED:
                done = conn.execute(
                    sa.update(requests_t)
                    .where(
                        requests_t.c.request_id == sub.request_id,
                        requests_t.c.accepted_submission_id.is_(None),
                    )
                    .values(accepted_submission_id=submission_id)
                )
                if done.rowcount != 1:
                    raise AlreadyAcceptedError(
                        f"request {sub.request_id!r} already has an accepted submission"
                    )
                moved = conn.execute(
                    sa.update(clients_t)
                    .where(
                        clients_t.c.client_id == sub.client_id,
                        *(
                            ()
                            if verified_against is None
                            else (clients_t.c.current_commitments == verified_against,)
                        ),
                    )
                    .values(current_commitments=sub.after_commitments)
                )
                if moved.rowcount != 1:
                    raise StaleCommitmentsError(_stale_message(sub.client_id))
                self._fault("request-updated")
            return dataclasses.replace(
                sub, verdict=verdict, reason=reason, leaf_index=stored_leaf.index, lease_expires_ms=None
            ), stored_leaf

        result: tuple[SubmissionRecord, LeafRecord] = self._retrying(run)
        return result

    def ledger_size(self) -> int:
        return int(
            self._read(
                lambda conn: conn.execute(sa.select(tip_t.c.size).where(tip_t.c.tip_id == 1)).scalar_one()
            )
        )

    def leaf_hashes(self, size: int | None = None, start: int = 0) -> list[bytes]:
        query = (
            sa.select(leaves_t.c.leaf_hash)
            .where(leaves_t.c.leaf_index >= start)
            .order_by(leaves_t.c.leaf_index)
        )
        if size is not None:
            query = query.where(leaves_t.c.leaf_index < size)
        hashes: list[bytes] = self._read(lambda conn: [bytes(h) for h in conn.execute(query).scalars()])
        return hashes

    def get_leaf(self, index: int) -> LeafRecord | None:
        row = self._read(
            lambda conn: conn.execute(sa.select(leaves_t).where(leaves_t.c.leaf_index == index)).first()
        )
        return None if row is None else _leaf_row(row)

    def add_tree_head(self, record: TreeHeadRecord) -> TreeHeadRecord:
        def run(conn: Connection) -> TreeHeadRecord:
            row = conn.execute(sa.select(heads_t).where(heads_t.c.tree_size == record.size)).first()
            if row is not None:
                return _head_row(row)
            conn.execute(
                sa.insert(heads_t).values(
                    tree_size=record.size,
                    root_hash=record.root_hash,
                    canonical=record.canonical,
                    signature=record.signature,
                )
            )
            return record

        result: TreeHeadRecord = self._retrying(run)
        return result

    def get_tree_head(self, size: int) -> TreeHeadRecord | None:
        row = self._read(
            lambda conn: conn.execute(sa.select(heads_t).where(heads_t.c.tree_size == size)).first()
        )
        return None if row is None else _head_row(row)


def _client_values(record: ClientRecord) -> dict[str, Any]:
    """A client record as column values (``clients`` and ``replaced_enrollments`` rows alike)."""
    values = dataclasses.asdict(record)
    values["layers"] = "\n".join(record.layers)
    return values


def _append_leaf(conn: Connection, leaf: LeafRecord) -> LeafRecord:
    """Append ``leaf`` at the log's tip (its ``index`` assigned) within the caller's transaction."""
    # Locking the tip row serialises appenders across replicas: one writer order, no forks.
    tip = sa.select(tip_t.c.size).where(tip_t.c.tip_id == 1).with_for_update()
    size = int(conn.execute(tip).scalar_one())
    conn.execute(sa.update(tip_t).where(tip_t.c.tip_id == 1).values(size=size + 1))
    stored = dataclasses.replace(leaf, index=size)
    conn.execute(
        sa.insert(leaves_t).values(
            leaf_index=stored.index,
            leaf_hash=stored.leaf_hash,
            canonical=stored.canonical,
            signature=stored.signature,
            submission_id=stored.submission_id,
            request_id=stored.request_id,
        )
    )
    return stored
