"""The gRPC face of :class:`OperatorService`: decode, call, encode; refusals map as in the servicer."""

from __future__ import annotations

import grpc
import numpy as np
from zkunlearn.v1 import operator_pb2 as opb
from zkunlearn.v1 import provider_pb2 as pb

from .errors import InvalidInputError
from .models import TensorData
from .operator import DeletionOrder, OperatorAuthInput, OperatorService
from .planning import ForgetSelection, MaskOptions, PlanError
from .servicer import peer_host, register_service, unary_handler

__all__ = ["OperatorServicer", "add_operator_to_server"]

MAX_FORGET_BYTES = 64 * 1024 * 1024


def _auth(msg: opb.OperatorAuth) -> OperatorAuthInput:
    return OperatorAuthInput(msg.key_id, bytes(msg.nonce), bytes(msg.canonical), bytes(msg.signature))


def _array(tensor: pb.Tensor, what: str) -> np.ndarray:
    data = TensorData(tuple(int(d) for d in tensor.shape), bytes(tensor.float64_le))
    data.validate(what, MAX_FORGET_BYTES)
    return data.array()


def _selection(request: opb.CreateRequestsRequest) -> ForgetSelection:
    which = request.WhichOneof("forget")
    try:
        if which == "forget_class":
            return ForgetSelection(forget_class=int(request.forget_class))
        if which == "sample_ids":
            return ForgetSelection(sample_ids=tuple(int(i) for i in request.sample_ids.ids))
        if which == "samples":
            labels = _array(request.samples.labels, "forget labels")
            if not np.array_equal(labels, np.round(labels)):
                raise InvalidInputError("forget labels must be whole class numbers")
            return ForgetSelection(
                features=_array(request.samples.features, "forget samples"), labels=labels.astype(np.int64)
            )
    except PlanError as exc:
        raise InvalidInputError(str(exc)) from exc
    raise InvalidInputError("name what to forget: forget_class, sample_ids or samples")


class OperatorServicer:
    """Implements ``zkunlearn.v1.Operator``; every decision is :class:`OperatorService`'s."""

    def __init__(self, operator: OperatorService) -> None:
        self.operator = operator

    @unary_handler
    def Challenge(  # noqa: N802
        self, request: opb.OperatorChallengeRequest, context: grpc.ServicerContext
    ) -> opb.OperatorChallengeResponse:
        nonce, expires = self.operator.challenge(request.key_id, peer=peer_host(context))
        return opb.OperatorChallengeResponse(nonce=nonce, expires_unix_ms=expires)

    @unary_handler
    def CreateRequests(  # noqa: N802
        self, request: opb.CreateRequestsRequest, context: grpc.ServicerContext
    ) -> opb.CreateRequestsResponse:
        options = MaskOptions(request.mask.score, int(request.mask.fraction_ppm), request.mask.structure)
        order = DeletionOrder(
            request.model_id, tuple(request.client_ids), _selection(request), options, int(request.ttl_s)
        )
        created = self.operator.create_requests(_auth(request.auth), order)
        return opb.CreateRequestsResponse(
            requests=[
                opb.CreatedRequest(
                    request_id=c.request_id,
                    client_id=c.client_id,
                    mask_sha256=c.mask_sha256,
                    masked_weights=c.masked_weights,
                    forget_samples=c.forget_samples,
                )
                for c in created
            ]
        )

    @unary_handler
    def GetStatus(  # noqa: N802
        self, request: opb.GetStatusRequest, context: grpc.ServicerContext
    ) -> opb.GetStatusResponse:
        status = self.operator.status(_auth(request.auth))
        s = status.summary
        return opb.GetStatusResponse(
            clients=s.clients,
            requests=s.requests,
            answered_requests=s.answered_requests,
            pending_submissions=s.pending_submissions,
            accepted_submissions=s.accepted_submissions,
            rejected_submissions=s.rejected_submissions,
            tree_head=pb.SignedTreeHead(
                version=1, canonical=status.tree_head_canonical, signature=status.tree_head_signature
            ),
            model_ids=list(status.model_ids),
        )

    @unary_handler
    def ListReceipts(  # noqa: N802
        self, request: opb.ListReceiptsRequest, context: grpc.ServicerContext
    ) -> opb.ListReceiptsResponse:
        items, size = self.operator.receipts(_auth(request.auth), int(request.start), int(request.max_items))
        return opb.ListReceiptsResponse(
            receipts=[
                opb.LoggedReceipt(
                    receipt=pb.SignedReceipt(
                        version=1,
                        canonical=item.leaf.canonical,
                        signature=item.leaf.signature,
                        leaf_index=item.leaf.index,
                    ),
                    request_id=item.leaf.request_id,
                    client_id=item.client_id,
                    verdict=pb.Verdict.ValueType(item.verdict),
                )
                for item in items
            ],
            log_size=size,
        )


def add_operator_to_server(servicer: OperatorServicer, server: grpc.Server) -> None:
    register_service(servicer, server, opb, "Operator")
