"""The provider's durable state behind one interface, with an in-memory and a SQLAlchemy backend.

Every guarantee the protocol makes against replay and duplication is enforced *here*, by the store,
rather than by checks in the service that a second thread could race past:

- a nonce is consumed by one conditional update (``used`` false, not expired, right client), so two
  concurrent calls presenting the same nonce cannot both succeed;
- a submission is unique per ``(request_id, content_digest)``, so an identical resubmission finds the
  first one (idempotent) instead of creating a second;
- ledger leaves are keyed by their index, so two appends can never claim the same position;
- finishing a submission (verdict, ledger leaf, the request's accepted submission and the client's
  new commitments) is one transaction, so a crash leaves either all of it or none of it.

The SQL backend uses only portable SQLAlchemy Core types and statements, so the same code runs on
PostgreSQL; SQLite-specific settings (WAL, busy timeout, ``BEGIN IMMEDIATE``) are applied only when
the URL is SQLite, at connection time.
"""

from __future__ import annotations

from zkunlearn.provider.state._base import (
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
    StateError,
    StateSummary,
    SubmissionRecord,
    TreeHeadRecord,
)
from zkunlearn.provider.state._memory import InMemoryState
from zkunlearn.provider.state._schema import upgrade_schema
from zkunlearn.provider.state._sql import SqlState

__all__ = [
    "VERDICT_ACCEPTED",
    "VERDICT_PENDING",
    "VERDICT_REJECTED",
    "AlreadyAcceptedError",
    "ClientRecord",
    "ConflictError",
    "InMemoryState",
    "LeafRecord",
    "NonceError",
    "NotFoundError",
    "PendingRequestsError",
    "ProviderState",
    "ReplacedEnrollment",
    "RequestRecord",
    "SqlState",
    "StaleCommitmentsError",
    "StateError",
    "StateSummary",
    "SubmissionRecord",
    "TreeHeadRecord",
    "open_state",
    "upgrade_schema",
]


def open_state(url: str | None) -> ProviderState:
    """``None`` or ``"memory"`` gives the in-memory backend; a path gives SQLite; anything else is a URL."""
    if url is None or url == "memory":
        return InMemoryState()
    if "://" not in url:
        return SqlState.sqlite(url)
    return SqlState(url)
