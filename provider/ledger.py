"""The append-only receipt log: RFC 9162 leaves over the provider state, signed tree heads, proofs.

Leaves live in the state (so they are written in the same transaction as the verdict they record);
this class keeps an in-memory :class:`MerkleTree` mirror that it extends from the state on demand, so
heads and proofs are O(log n) and a second process appending to the same database is picked up.
A tree head is signed once per size and stored, so every client asking about size ``n`` gets the same
signed statement (a provider cannot show different roots to different clients without the
conflicting signed heads proving it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from zkunlearn.proofs.statements import (
    DOMAIN_TREE_HEAD,
    SignedStatement,
    StatementSigner,
    now_ms,
    tree_head_payload,
)
from zkunlearn.proofs.transparency import MerkleProofError, MerkleTree, leaf_hash

from zkunlearn.errors import MalformedError

from .state import LeafRecord, ProviderState, SubmissionRecord, TreeHeadRecord

__all__ = ["Ledger", "LedgerError", "TreeHead"]


class LedgerError(MalformedError):
    """A ledger query named a size or index the log does not have."""


@dataclass(frozen=True)
class TreeHead:
    size: int
    root_hash: bytes
    canonical: bytes
    signature: bytes


class Ledger:
    """Receipts in order, with signed heads and inclusion/consistency proofs."""

    def __init__(
        self, state: ProviderState, signer: StatementSigner, clock_ms: Callable[[], int] = now_ms
    ) -> None:
        self._state = state
        self._signer = signer
        self._clock_ms = clock_ms
        self._tree = MerkleTree()
        self._lock = threading.Lock()

    def _sync(self) -> MerkleTree:
        """Extend the mirror with leaves other writers appended; leaves never change once written."""
        with self._lock:
            size = self._state.ledger_size()
            if size != self._tree.size:
                for h in self._state.leaf_hashes(size, start=self._tree.size):
                    self._tree.append(h)
            return self._tree

    def append(
        self,
        submission_id: str,
        verdict: int,
        reason: str,
        receipt: SignedStatement,
        *,
        verified_against: str | None = None,
    ) -> tuple[SubmissionRecord, LeafRecord]:
        """Record a verdict and its signed receipt as the next leaf, atomically with the verdict.

        ``verified_against``: see :meth:`ProviderState.finish_submission`.
        """
        leaf = LeafRecord(
            index=-1,
            leaf_hash=leaf_hash(receipt.canonical),
            canonical=receipt.canonical,
            signature=receipt.signature,
            submission_id=submission_id,
            request_id=str(receipt.payload.get("request_id", "")),
        )
        return self._state.finish_submission(
            submission_id, verdict, reason, leaf, verified_against=verified_against
        )

    @property
    def size(self) -> int:
        return self._sync().size

    def leaf(self, index: int) -> LeafRecord:
        found = self._state.get_leaf(index)
        if found is None:
            raise LedgerError(f"no leaf {index}: the log has {self.size} leaves")
        return found

    def tree_head(self, size: int | None = None) -> TreeHead:
        """The signed head for ``size`` (default: now), signing and storing it the first time it is asked."""
        tree = self._sync()
        size = tree.size if size is None else size
        if not 0 <= size <= tree.size:
            raise LedgerError(f"tree size {size} out of range: the log has {tree.size} leaves")
        stored = self._state.get_tree_head(size)
        if stored is None:
            root = tree.root(size)
            statement = self._signer.sign(DOMAIN_TREE_HEAD, tree_head_payload(size, root, self._clock_ms()))
            stored = self._state.add_tree_head(
                TreeHeadRecord(
                    size=size, root_hash=root, canonical=statement.canonical, signature=statement.signature
                )
            )
        return TreeHead(stored.size, stored.root_hash, stored.canonical, stored.signature)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        tree = self._sync()
        try:
            return tree.inclusion_proof(index, tree.size if size is None else size)
        except MerkleProofError as exc:
            raise LedgerError(f"cannot prove inclusion of leaf {index}: {exc}") from exc

    def consistency_proof(self, first: int, second: int | None = None) -> list[bytes]:
        tree = self._sync()
        try:
            return tree.consistency_proof(first, tree.size if second is None else second)
        except MerkleProofError as exc:
            raise LedgerError(f"cannot prove consistency of sizes {first} and {second}: {exc}") from exc
