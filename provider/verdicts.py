"""Verdicts: verifying a claimed submission and recording its signed receipt in the ledger.

A verification worker (:mod:`.jobs`) hands each claimed job to :meth:`VerdictRecorder.finish`, which
rebuilds the :class:`~.models.VerificationJob` from the provider's own records only (the request it
signed, the client's enrolled and current commitments, the stored proof bytes), runs the verifier,
signs the receipt and appends it to the ledger in the transaction that finishes the job. A verifier
crash is a rejection with its reason, never a lost submission.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from zkunlearn.proofs.exact_deletion import decode_proof_list
from zkunlearn.proofs.statements import DOMAIN_RECEIPT, SignedStatement, StatementError, StatementSigner
from zkunlearn.proofs.verify_pool import VerifierCrashedError

from .ledger import Ledger
from .models import (
    MAX_REASON_CHARS,
    PROTOCOL_VERSION,
    ProofVerifier,
    VerificationJob,
    VerificationResult,
    commitments_from_json,
    decode_forget,
)
from .state import (
    VERDICT_ACCEPTED,
    VERDICT_PENDING,
    VERDICT_REJECTED,
    AlreadyAcceptedError,
    NotFoundError,
    ProviderState,
    StaleCommitmentsError,
    SubmissionRecord,
)

__all__ = ["VERDICT_NAMES", "VerdictRecorder"]

VERDICT_NAMES = {VERDICT_ACCEPTED: "accepted", VERDICT_REJECTED: "rejected", VERDICT_PENDING: "pending"}
"""A stored verdict's name in receipts and on the wire."""


class VerdictRecorder:
    """Judges claimed submissions with ``verifier`` and records each verdict as a signed ledger leaf."""

    def __init__(
        self,
        state: ProviderState,
        signer: StatementSigner,
        verifier: ProofVerifier,
        ledger: Ledger,
        clock_ms: Callable[[], int],
    ) -> None:
        self.state, self.signer, self.verifier, self.ledger, self.clock_ms = (
            state,
            signer,
            verifier,
            ledger,
            clock_ms,
        )

    def give_up(self, sub: SubmissionRecord, reason: str) -> SubmissionRecord:
        """Finish a job that cannot be verified (out of attempts) as a signed rejection."""
        return self.finish(sub, forced=VerificationResult(False, reason))

    def finish(self, claimed: SubmissionRecord, forced: VerificationResult | None = None) -> SubmissionRecord:
        """Verify one claimed job and finish it: verdict, receipt and ledger leaf in one transaction."""
        sub = self.state.get_submission(claimed.submission_id)
        if sub is None:
            raise NotFoundError(f"unknown submission {claimed.submission_id!r}")
        if sub.verdict != VERDICT_PENDING:
            return sub
        submission_id = sub.submission_id
        request = self.state.get_request(sub.request_id)
        client = self.state.get_client(sub.client_id)
        if request is None or client is None:  # foreign keys make this unreachable
            raise NotFoundError(f"submission {submission_id!r} names a missing request or client")
        before = tuple(commitments_from_json(client.current_commitments))
        after = tuple(commitments_from_json(sub.after_commitments))
        payload = SignedStatement.from_wire(request.canonical, request.signature).payload
        features, labels = decode_forget(request.forget)
        if forced is not None:
            result = forced
        elif request.accepted_submission_id is not None:
            result = VerificationResult(
                False, f"request already answered by {request.accepted_submission_id}"
            )
        else:
            sizes = [int(s) for s in json.loads(sub.proof_sizes)]
            proofs, offset = [], 0
            for s in sizes:
                proofs.append(sub.proof[offset : offset + s])
                offset += s
            job = VerificationJob(
                request_id=request.request_id,
                client_id=client.client_id,
                model_id=client.model_id,
                update_kind=client.update_kind,
                layers=tuple(payload.get("layers", ())),
                request_payload=payload,
                request_canonical=request.canonical,
                mask=request.mask,
                forget_features=features,
                forget_labels=labels,
                before_commitments=before,
                after_commitments=after,
                proofs=tuple(proofs),
                enrolled_layers=client.layers,
                enrolled_commitments=tuple(commitments_from_json(client.enrolled_commitments)),
                enrollment_proofs=tuple(decode_proof_list(client.enrollment_proofs)),
            )
            try:
                result = self.verifier.verify(job)
            except VerifierCrashedError:
                raise  # the verifier, not the proof, failed: the job is retried (jobs.VerificationWorkers)
            except BaseException as exc:  # a crash is a rejection with a reason, never a lost submission
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                # pyo3 panics (ezkl's) derive from BaseException: they must not kill the worker either.
                result = VerificationResult(False, f"verifier error: {type(exc).__name__}: {exc}")
        if len(result.reason) > MAX_REASON_CHARS:
            result = VerificationResult(result.accepted, result.reason[: MAX_REASON_CHARS - 3] + "...")
        verdict = VERDICT_ACCEPTED if result.accepted else VERDICT_REJECTED
        receipt = self.sign_receipt(
            {
                "version": PROTOCOL_VERSION,
                "request_id": request.request_id,
                "request_sha256": hashlib.sha256(request.canonical).hexdigest(),
                "client_id": client.client_id,
                "model_id": client.model_id,
                "submission_id": sub.submission_id,
                "update_kind": client.update_kind,
                "verdict": VERDICT_NAMES[verdict],
                "reason": result.reason,
                "mask_sha256": payload.get("mask_sha256"),
                "proof_sha256": sub.proof_sha256,
                "before_commitments": [c.to_json() for c in before],
                "after_commitments": [c.to_json() for c in after],
                "verified_ms": self.clock_ms(),
            },
        )
        # The stored verdict is the signed one (the backstop in sign_receipt may have made it a rejection).
        verdict = VERDICT_ACCEPTED if receipt.payload["verdict"] == "accepted" else VERDICT_REJECTED
        try:
            done, _leaf = self.ledger.append(
                sub.submission_id,
                verdict,
                str(receipt.payload["reason"]),
                receipt,
                verified_against=client.current_commitments,
            )
        except (AlreadyAcceptedError, StaleCommitmentsError) as lost:
            # Another submission won the race: for the same request, or for another request of this
            # client, which moved the state this one was verified against. Recorded as rejected.
            reason = "request already answered" if isinstance(lost, AlreadyAcceptedError) else str(lost)
            loser = self.sign_receipt({**receipt.payload, "verdict": "rejected", "reason": reason})
            done, _leaf = self.ledger.append(
                sub.submission_id, VERDICT_REJECTED, str(loser.payload["reason"]), loser
            )
        return done

    def sign_receipt(self, payload: dict[str, Any]) -> SignedStatement:
        """Sign a receipt; one that cannot be signed becomes a signed rejection, never a stuck job.

        The input limits keep every receipt signable; this is the backstop if they ever do not, since
        a job whose receipt fails to sign would be released and retried for ever, first in the queue.
        """
        try:
            return self.signer.sign(DOMAIN_RECEIPT, payload)
        except StatementError as exc:
            reason = f"receipt could not be signed: {exc}"[:MAX_REASON_CHARS]
            return self.signer.sign(
                DOMAIN_RECEIPT,
                {
                    **payload,
                    "verdict": VERDICT_NAMES[VERDICT_REJECTED],
                    "reason": reason,
                    "before_commitments": [],
                    "after_commitments": [],
                },
            )
