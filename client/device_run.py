"""What :meth:`zkunlearn.client.device.EdgeDevice.run` reports: callbacks' records and progress lines.

Progress is one plain line per event on the console (stderr by default), readable in a log file as on
a terminal; the proving workers add a line per finished proof (:class:`~zkunlearn.client.unlearning.
ProveOptions` ``progress``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rich.console import Console

from .records import Outcome, UpdateProver, UpdateResult, VerifiedRequest

__all__ = ["AppliedInfo", "RequestInfo", "RunReporter"]


@dataclass(frozen=True)
class RequestInfo:
    """A checked deletion request, before anything is applied: the live model still has its weights."""

    request_id: str
    layers: tuple[str, ...]
    masked_weights: int  # weights the mask deletes (Group-OBS)
    forget_rows: int  # rows of forget data it carries (analytic head)
    expires_ms: int
    request: VerifiedRequest


@dataclass(frozen=True)
class AppliedInfo:
    """A request's outcome, once its receipt is checked: after an accepted one the live model holds the
    proven weights. ``status``: accepted, rejected, refused (not acted on) or skipped (already done)."""

    request_id: str
    status: str
    reason: str
    leaf_index: int | None
    prove_s: float | None  # None when nothing was proved in this run (refused, skipped, resubmitted)
    proofs: int
    log_size: int | None  # the provider's log size the receipts were verified under, None if not checked
    outcome: Outcome


@dataclass
class RunReporter:
    """Wraps the device's prover to report each request before it is proved, and each outcome after."""

    prover: UpdateProver
    label: str
    console: Console
    on_request: Callable[[RequestInfo], None] | None = None
    on_applied: Callable[[AppliedInfo], None] | None = None
    verify_log: Callable[[], int] | None = None
    _proved: dict[str, tuple[float, int]] = field(default_factory=dict)

    def say(self, message: str) -> None:
        self.console.print(f"[{self.label}] {message}", markup=False, highlight=False, soft_wrap=True)

    def prove(self, request: VerifiedRequest) -> UpdateResult:
        info = RequestInfo(
            request.request_id,
            request.layers,
            int(sum(layer.dense().sum() for layer in request.mask.layers)),
            0 if request.forget_features is None else int(request.forget_features.shape[0]),
            request.expires_ms,
            request,
        )
        what = (
            f"{info.masked_weights} weights of {', '.join(info.layers)}"
            if info.layers
            else f"{info.forget_rows} forget rows"
        )
        self.say(f"request {info.request_id}: deleting {what}; proving")
        if self.on_request is not None:
            self.on_request(info)
        started = time.monotonic()
        result = self.prover.prove(request)
        self._proved[request.request_id] = (time.monotonic() - started, len(result.proofs))
        return result

    def outcome(self, outcome: Outcome) -> None:
        prove_s, proofs = self._proved.pop(outcome.request_id, (None, 0))
        log_size = None
        if self.verify_log is not None and outcome.status in ("accepted", "rejected"):
            log_size = self.verify_log()
        info = AppliedInfo(
            outcome.request_id,
            outcome.status,
            outcome.reason,
            outcome.leaf_index,
            prove_s,
            proofs,
            log_size,
            outcome,
        )
        timing = "" if prove_s is None else f" after {proofs} proof(s) in {prove_s:.1f} s"
        leaf = outcome.leaf_index
        ledger = "" if log_size is None else f"; receipt at leaf {leaf} of a verified log of {log_size}"
        reason = f": {outcome.reason}" if outcome.reason and outcome.status != "accepted" else ""
        self.say(f"request {outcome.request_id} {outcome.status}{timing}{reason}{ledger}")
        if self.on_applied is not None:
            self.on_applied(info)
