"""The SDK's plain records and errors: commitments, checked requests, a prover's result, outcomes.

:mod:`zkunlearn.client.sdk` re-exports every name; provers and callers import them from either.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
from zkunlearn.circuits.mask import Mask
from zkunlearn.v1 import provider_pb2 as pb

from zkunlearn.errors import RefusedError

__all__ = [
    "Commitment",
    "ExpiredRequestError",
    "ForgedRequestError",
    "Outcome",
    "ReceiptError",
    "RequestRefusedError",
    "UpdateProver",
    "UpdateResult",
    "VerifiedRequest",
]


class RequestRefusedError(RefusedError):
    """The client refuses to act on a delivered request; the message says why."""


class ForgedRequestError(RequestRefusedError):
    """Bad provider signature, or delivered fields that the signature does not cover."""


class ExpiredRequestError(RequestRefusedError):
    """The request's signed expiry time has passed."""


class ReceiptError(RefusedError):
    """A receipt or a log proof from the provider does not check out."""


@dataclass(frozen=True)
class Commitment:
    name: str
    block: int
    point_hex: str

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "block": self.block, "point_hex": self.point_hex}

    @staticmethod
    def from_json(value: Mapping[str, Any]) -> Commitment:
        return Commitment(str(value["name"]), int(value["block"]), str(value["point_hex"]))

    def to_pb(self) -> pb.Commitment:
        return pb.Commitment(name=self.name, block=self.block, point_hex=self.point_hex)


@dataclass(frozen=True)
class VerifiedRequest:
    """A deletion request whose signature, addressee, expiry and attached data have all been checked."""

    request_id: str
    client_id: str
    model_id: str
    update_kind: int  # 1 group_obs, 2 analytic, 3 group_obs_exact, 4 analytic_exact
    layers: tuple[str, ...]
    mask: Mask
    mask_bytes: bytes
    forget_features: npt.NDArray[np.float64] | None
    forget_labels: npt.NDArray[np.float64] | None
    issued_ms: int
    expires_ms: int
    cursor: int
    before_commitments: tuple[Commitment, ...]
    payload: Mapping[str, Any]
    canonical: bytes
    signature: bytes


@dataclass(frozen=True)
class UpdateResult:
    after_commitments: Sequence[Commitment]
    proofs: Sequence[bytes]


@runtime_checkable
class UpdateProver(Protocol):
    """Applies the unlearning update on the device and proves it (Group-OBS or analytic + ezkl).

    Called at most once per request id by a client that finishes normally; after a crash *between*
    the update and the durable save of its result it can be called again for the same request, so it
    must derive the update from the state it committed to (``before_commitments``), not re-apply it
    on top of an already updated model.

    A request the prover can never process (its mask names a layer it did not enroll, its forget data
    does not fit the circuit) must be refused with :class:`RequestRefusedError` -- or one of the bundled
    provers' validation errors, see :meth:`zkunlearn.client.sdk.EdgeClient.process` -- and must leave
    the state unchanged.
    Anything else is taken as a failure of the moment and the request is tried again.
    """

    def prove(self, request: VerifiedRequest) -> UpdateResult: ...


@dataclass(frozen=True)
class Outcome:
    request_id: str
    status: str  # "accepted", "rejected", "skipped" (already done), "refused" (not acted on)
    reason: str = ""
    leaf_index: int | None = None
