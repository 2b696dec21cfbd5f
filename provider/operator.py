"""The operator's side of the provider: issue deletion requests, read status and receipts.

Operators authenticate with their own Ed25519 keys (``[operator] public_keys``), never with a
client's: an operator call carries a statement in the ``zkunlearn/v1/operator-auth`` domain that
names the RPC, a single-use nonce issued to that operator key, and every field the call acts on
(docs/wire.md lists them), so a signature cannot be lifted onto another call. Nonces come from the
same stateless scheme as the clients', in the ``operator/<key id>`` namespace, so every replica
accepts them and an unauthenticated caller writes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from zkunlearn.circuits.mask import Mask
from zkunlearn.proofs.statements import (
    DOMAIN_OPERATOR_AUTH,
    KEY_ID_HEX_LENGTH,
    StatementError,
    StatementVerifier,
    key_id_for,
)

from .errors import (
    FailedPreconditionError,
    InvalidInputError,
    NotFoundServiceError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from .models import ANALYTIC_KINDS, PROTOCOL_VERSION, RequestDraft, TensorData, require_payload
from .planning import DeletionPlan, DeletionPlanner, ForgetSelection, MaskOptions, PlanError
from .service import ProviderService
from .state import ClientRecord, LeafRecord, StateSummary

__all__ = [
    "CreatedRequest",
    "DeletionOrder",
    "LoggedReceipt",
    "OperatorAuthInput",
    "OperatorService",
    "OperatorStatus",
    "forget_fields",
]

MAX_CLIENTS_PER_ORDER = 10_000
MAX_RECEIPTS_PER_PAGE = 1000


@dataclass(frozen=True)
class OperatorAuthInput:
    key_id: str
    nonce: bytes
    canonical: bytes
    signature: bytes


@dataclass(frozen=True)
class DeletionOrder:
    """What an operator asks: forget ``selection`` on ``model_id``'s clients (all when none named)."""

    model_id: str
    client_ids: tuple[str, ...]
    selection: ForgetSelection
    options: MaskOptions
    ttl_s: int = 0  # 0: the provider's default

    def signed_fields(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "client_ids": list(self.client_ids),
            "forget": forget_fields(self.selection),
            "mask": self.options.signed_fields(),
            "ttl_s": self.ttl_s,
        }


def forget_fields(selection: ForgetSelection) -> dict[str, Any]:
    """How an order's forget selection appears in the operator's signed statement."""
    if selection.forget_class is not None:
        return {"class": selection.forget_class}
    if selection.sample_ids is not None:
        return {"sample_ids": list(selection.sample_ids)}
    features, labels = selection.features, selection.labels
    if features is None or labels is None:  # excluded by ForgetSelection
        raise InvalidInputError("no forget samples given")
    return {
        "samples": {
            "features": TensorData.from_array(features).digest_json(),
            "labels": TensorData.from_array(labels.astype(np.float64)).digest_json(),
        }
    }


@dataclass(frozen=True)
class CreatedRequest:
    request_id: str
    client_id: str
    mask_sha256: str
    masked_weights: int
    forget_samples: int


@dataclass(frozen=True)
class OperatorStatus:
    summary: StateSummary
    tree_head_canonical: bytes
    tree_head_signature: bytes
    model_ids: tuple[str, ...]


@dataclass(frozen=True)
class LoggedReceipt:
    leaf: LeafRecord
    client_id: str
    verdict: int


class OperatorService:
    """Operator actions over a :class:`ProviderService`; transport-free (the gRPC servicer is thin)."""

    def __init__(
        self,
        service: ProviderService,
        operator_keys: Sequence[bytes],
        planners: Mapping[str, DeletionPlanner],
    ) -> None:
        self.service = service
        self._keys = {key_id_for(key): StatementVerifier.from_public_bytes(key) for key in operator_keys}
        self.planners = dict(planners)

    # -- authentication ---------------------------------------------------------------------------

    def challenge(self, key_id: str, peer: str = "") -> tuple[bytes, int]:
        """A nonce for the operator key ``key_id``; any well-formed id gets one (no key enumeration)."""
        subject = _subject(_check_key_id(key_id))
        self.service.throttle_challenge(subject, peer)
        return self.service.issue_nonce(subject)

    def authenticate(self, auth: OperatorAuthInput, rpc: str, fields: Mapping[str, Any]) -> str:
        """Check the statement against the named operator key and consume its nonce; the key id."""
        key_id = _check_key_id(auth.key_id)
        verifier = self._keys.get(key_id)
        if verifier is None:
            raise UnauthenticatedError(f"{key_id} is not an operator key of this provider")
        try:
            payload = verifier.verify((auth.canonical, auth.signature), DOMAIN_OPERATOR_AUTH)
        except StatementError as exc:
            raise UnauthenticatedError(f"operator auth: {exc}") from exc
        expected = {
            "version": PROTOCOL_VERSION,
            "key_id": key_id,
            "rpc": rpc,
            "nonce": auth.nonce.hex(),
            **fields,
        }
        require_payload(payload, expected, "operator auth", PermissionDeniedError)
        self.service.use_nonce(_subject(key_id), auth.nonce)
        return key_id

    # -- deletion orders --------------------------------------------------------------------------

    def create_requests(self, auth: OperatorAuthInput, order: DeletionOrder) -> list[CreatedRequest]:
        """Plan the order and queue one signed request per client, all or none."""
        self.authenticate(auth, "CreateRequests", order.signed_fields())
        planner = self.planners.get(order.model_id)
        if planner is None:
            raise NotFoundServiceError(
                f"model {order.model_id!r} has no deletion planner (configured: {sorted(self.planners)})"
            )
        clients = self._clients(order)
        try:
            analytic = [client.update_kind in ANALYTIC_KINDS for client in clients]
            plan = planner.plan(
                order.selection, order.options, want_mask=not all(analytic), want_head=any(analytic)
            )
        except PlanError as exc:
            raise InvalidInputError(str(exc)) from exc
        drafts = [self._draft(client, plan, order.ttl_s) for client in clients]
        stored = self.service.create_requests(drafts)
        created = []
        for record, draft in zip(stored, drafts, strict=True):
            mask = Mask.from_bytes(record.mask)
            samples = plan.samples if draft.forget_features is not None else 0
            created.append(
                CreatedRequest(
                    record.request_id, record.client_id, mask.digest(), mask.masked_count(), samples
                )
            )
        return created

    def _clients(self, order: DeletionOrder) -> list[ClientRecord]:
        state = self.service.state
        if len(order.client_ids) > MAX_CLIENTS_PER_ORDER:
            raise InvalidInputError(f"an order names at most {MAX_CLIENTS_PER_ORDER} clients")
        if len(set(order.client_ids)) != len(order.client_ids):
            raise InvalidInputError("the order names a client twice")
        if not order.client_ids:
            clients = state.list_clients(order.model_id, limit=MAX_CLIENTS_PER_ORDER + 1)
            if not clients:
                raise FailedPreconditionError(f"no client is enrolled for model {order.model_id!r}")
            if len(clients) > MAX_CLIENTS_PER_ORDER:
                raise InvalidInputError(
                    f"more than {MAX_CLIENTS_PER_ORDER} clients of {order.model_id!r}: name them in batches"
                )
            return clients
        found = []
        for cid in order.client_ids:
            client = state.get_client(cid)
            if client is None:
                raise NotFoundServiceError(f"unknown client {cid!r}")
            if client.model_id != order.model_id:
                raise InvalidInputError(
                    f"client {cid!r} enrolled model {client.model_id!r}, not {order.model_id!r}"
                )
            found.append(client)
        return found

    @staticmethod
    def _draft(client: ClientRecord, plan: DeletionPlan, ttl_s: int) -> RequestDraft:
        ttl = float(ttl_s) if ttl_s else None
        if client.update_kind in ANALYTIC_KINDS:
            if plan.head_features is None or plan.head_labels is None:
                raise InvalidInputError(
                    f"client {client.client_id!r} has an analytic head, and this model's planner "
                    "has no feature map for it"
                )
            return RequestDraft(
                client.client_id,
                Mask(()),
                TensorData.from_array(plan.head_features),
                TensorData.from_array(plan.head_labels),
                ttl_s=ttl,
            )
        if plan.mask is None:
            raise InvalidInputError(f"the model's planner made no mask for client {client.client_id!r}")
        mask = Mask(tuple(layer for layer in plan.mask.layers if layer.layer in client.layers))
        if not mask.layers:
            raise InvalidInputError(
                f"the mask touches none of client {client.client_id!r}'s layers {list(client.layers)}"
            )
        return RequestDraft(client.client_id, mask, ttl_s=ttl)

    # -- reading ----------------------------------------------------------------------------------

    def status(self, auth: OperatorAuthInput) -> OperatorStatus:
        self.authenticate(auth, "GetStatus", {})
        head = self.service.tree_head()
        return OperatorStatus(
            self.service.state.summary(), head.canonical, head.signature, tuple(sorted(self.planners))
        )

    def receipts(
        self, auth: OperatorAuthInput, start: int, max_items: int
    ) -> tuple[list[LoggedReceipt], int]:
        """Log entries from index ``start``, at most ``max_items`` (0: 100), and the log's size."""
        self.authenticate(auth, "ListReceipts", {"start": start, "max_items": max_items})
        if start < 0 or max_items < 0:
            raise InvalidInputError("start and max_items must be >= 0")
        limit = min(max_items or 100, MAX_RECEIPTS_PER_PAGE)
        state = self.service.state
        size = state.ledger_size()
        out: list[LoggedReceipt] = []
        for index in range(start, min(size, start + limit)):
            leaf = state.get_leaf(index)
            if leaf is None:  # pragma: no cover - the log is dense below its size
                raise FailedPreconditionError(f"log entry {index} is missing")
            sub = state.get_submission(leaf.submission_id)
            if sub is None:  # pragma: no cover - a leaf is written with its submission
                raise FailedPreconditionError(f"log entry {index} names a missing submission")
            out.append(LoggedReceipt(leaf, sub.client_id, sub.verdict))
        return out, size


def _subject(key_id: str) -> str:
    return f"operator/{key_id}"


def _check_key_id(key_id: str) -> str:
    if (
        not isinstance(key_id, str)
        or len(key_id) != KEY_ID_HEX_LENGTH
        or any(c not in "0123456789abcdef" for c in key_id)
    ):
        raise InvalidInputError(f"operator key id must be {KEY_ID_HEX_LENGTH} lowercase hex characters")
    return key_id
