"""RFC 9162 (Certificate Transparency v2) Merkle trees: hashing, proof generation and verification.

The provider's receipt ledger, the edge client and the offline auditor all agree on log contents
through these functions, so the verifiers follow RFC 9162 §2.1.3.2 and §2.1.4.2 step by step (the
bit-twiddling algorithms), rather than rebuilding a tree from the proof: a verifier that recomputes
"something plausible" is where second-preimage and proof-length confusions creep in. Every refusal is
a :class:`MerkleProofError` whose message names what was wrong, so an auditor can report *why* a
receipt failed instead of a bare ``False``.

Hashing is SHA-256 with the RFC's domain separation: a leaf is ``H(0x00 || data)`` and an interior
node ``H(0x01 || left || right)``, so no leaf can be passed off as an interior node. The empty tree's
root is ``H("")``.

Proof generation is exposed twice: the stable module functions, which take the list of leaf hashes
(O(n) per call, fine for one-off use and tests), and :class:`MerkleTree`, which a long-lived ledger
keeps so that appends are amortised O(1) and proofs O(log n) from memoised complete subtrees.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence

from zkunlearn.errors import RefusedError

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "MerkleProofError",
    "MerkleTree",
    "consistency_proof",
    "consistency_proof_length",
    "inclusion_proof",
    "inclusion_proof_length",
    "leaf_hash",
    "node_hash",
    "root_hash",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"
EMPTY_ROOT = hashlib.sha256(b"").digest()


class MerkleProofError(RefusedError, ValueError):
    """A Merkle proof, tree size, index or hash was refused; the message says which and why."""


# --------------------------------------------------------------------------------------------------
# Input checks


def _check_hash(value: object, what: str) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise MerkleProofError(f"{what} must be bytes, got {type(value).__name__}")
    raw = bytes(value)
    if len(raw) != HASH_SIZE:
        raise MerkleProofError(f"{what} must be {HASH_SIZE} bytes, got {len(raw)}")
    return raw


def _check_count(value: object, what: str) -> int:
    # bool is an int subclass; True as a tree size is always a caller bug.
    if not isinstance(value, int) or isinstance(value, bool):
        raise MerkleProofError(f"{what} must be an int, got {type(value).__name__}")
    if value < 0:
        raise MerkleProofError(f"{what} must not be negative, got {value}")
    return value


def _check_proof(proof: Sequence[bytes] | None) -> list[bytes]:
    if proof is None:
        return []
    if isinstance(proof, bytes | bytearray | str):
        # A bare bytes object is a Sequence of ints; refusing it avoids a confusing per-node error.
        raise MerkleProofError("proof must be a sequence of hashes, not a single bytes/str value")
    return [_check_hash(node, f"proof node {i}") for i, node in enumerate(proof)]


def _check_leaves(leaf_hashes: Iterable[bytes]) -> list[bytes]:
    leaves = list(leaf_hashes)
    # Fast path for the common case; the slow path exists to name the offending index.
    if all(type(h) is bytes and len(h) == HASH_SIZE for h in leaves):
        return leaves
    return [_check_hash(h, f"leaf hash {i}") for i, h in enumerate(leaves)]


# --------------------------------------------------------------------------------------------------
# Hashing


def leaf_hash(data: bytes) -> bytes:
    """Hash log entry bytes as a leaf (0x00 prefix keeps leaves and interior nodes apart)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MerkleProofError(f"leaf data must be bytes, got {type(data).__name__}")
    return hashlib.sha256(_LEAF_PREFIX + bytes(data)).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Hash two child hashes into their parent (0x01 prefix)."""
    return _node(_check_hash(left, "left child"), _check_hash(right, "right child"))


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two strictly smaller than n (n >= 2): RFC 9162's k."""
    return 1 << ((n - 1).bit_length() - 1)


def root_hash(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH over the given leaf hashes (already leaf-hashed with :func:`leaf_hash`)."""
    return MerkleTree(leaf_hashes).root()


# --------------------------------------------------------------------------------------------------
# The tree


class MerkleTree:
    """An append-only RFC 9162 tree that memoises every complete (power-of-two, aligned) subtree.

    ``_levels[k][i]`` is the hash of leaves ``[i * 2**k, (i + 1) * 2**k)``. Every subtree the RFC's
    MTH/PATH/SUBPROOF recursion visits from the root is either such a complete subtree or splits into
    one plus a smaller right part, so any subtree hash costs O(log n) and a proof O(log² n) at worst,
    while an append costs amortised one hash. Memory is about 2n hashes.
    """

    def __init__(self, leaf_hashes: Iterable[bytes] = ()) -> None:
        # Built level by level rather than by repeated append: same result, a third of the time.
        level = _check_leaves(leaf_hashes)
        self._levels: list[list[bytes]] = [level]
        while len(level) >= 2:
            sha = hashlib.sha256
            level = [
                sha(_NODE_PREFIX + a + b).digest() for a, b in zip(level[0::2], level[1::2], strict=False)
            ]
            self._levels.append(level)

    def __len__(self) -> int:
        return len(self._levels[0])

    @property
    def size(self) -> int:
        return len(self._levels[0])

    def append(self, leaf: bytes) -> int:
        """Append an already-hashed leaf; returns its index."""
        self._append_checked(_check_hash(leaf, "leaf hash"))
        return self.size - 1

    def append_data(self, data: bytes) -> int:
        """Leaf-hash entry bytes and append them; returns the index."""
        self._append_checked(leaf_hash(data))
        return self.size - 1

    def _append_checked(self, leaf: bytes) -> None:
        self._levels[0].append(leaf)
        level = 0
        # A level gaining its even-numbered-count entry completes a parent one level up.
        while len(self._levels[level]) % 2 == 0:
            if len(self._levels) == level + 1:
                self._levels.append([])
            pair = self._levels[level][-2:]
            self._levels[level + 1].append(_node(pair[0], pair[1]))
            level += 1

    def leaf(self, index: int) -> bytes:
        index = _check_count(index, "leaf index")
        if index >= self.size:
            raise MerkleProofError(f"leaf index {index} is out of range for tree size {self.size}")
        return self._levels[0][index]

    def leaves(self) -> list[bytes]:
        return list(self._levels[0])

    def _subtree(self, lo: int, hi: int) -> bytes:
        """MTH(D[lo:hi]) for 0 <= lo < hi <= size."""
        n = hi - lo
        if n & (n - 1) == 0 and lo % n == 0:
            return self._levels[n.bit_length() - 1][lo // n]
        k = _split(n)
        return _node(self._subtree(lo, lo + k), self._subtree(lo + k, hi))

    def _check_size(self, size: int | None, what: str = "tree size") -> int:
        if size is None:
            return self.size
        size = _check_count(size, what)
        if size > self.size:
            raise MerkleProofError(f"{what} {size} exceeds the {self.size} leaves held")
        return size

    def root(self, size: int | None = None) -> bytes:
        """Root of the tree made of the first ``size`` leaves (default: all)."""
        size = self._check_size(size)
        return EMPTY_ROOT if size == 0 else self._subtree(0, size)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """RFC 9162 §2.1.3.1 PATH(index, D[0:size])."""
        size = self._check_size(size)
        index = _check_count(index, "leaf index")
        if size == 0:
            raise MerkleProofError("no inclusion proof exists in an empty tree")
        if index >= size:
            raise MerkleProofError(f"leaf index {index} must be smaller than tree size {size}")
        proof: list[bytes] = []
        lo, hi = 0, size
        # Walk root-to-leaf, collecting siblings; the RFC lists them leaf-to-root, hence the reverse.
        while hi - lo > 1:
            k = _split(hi - lo)
            if index < lo + k:
                proof.append(self._subtree(lo + k, hi))
                hi = lo + k
            else:
                proof.append(self._subtree(lo, lo + k))
                lo = lo + k
        proof.reverse()
        return proof

    def consistency_proof(self, first_size: int, second_size: int | None = None) -> list[bytes]:
        """RFC 9162 §2.1.4.1 PROOF(first_size, D[0:second_size]); empty when the sizes are equal."""
        second = self._check_size(second_size, "second size")
        first = _check_count(first_size, "first size")
        if first > second:
            raise MerkleProofError(f"first size {first} exceeds second size {second}")
        if first == 0:
            raise MerkleProofError("no consistency proof from an empty tree (first size must be > 0)")
        proof: list[bytes] = []
        if first == second:
            return proof
        # SUBPROOF(m, D[lo:hi], b), unrolled: each step keeps only the branch that holds the old tree.
        lo, hi, m, complete = 0, second, first, True
        while m != hi - lo:
            k = _split(hi - lo)
            if m <= k:
                proof.append(self._subtree(lo + k, hi))
                hi = lo + k
            else:
                proof.append(self._subtree(lo, lo + k))
                lo, m, complete = lo + k, m - k, False
        if not complete:
            proof.append(self._subtree(lo, hi))
        proof.reverse()
        return proof


def inclusion_proof(leaf_hashes: Sequence[bytes], index: int, size: int) -> list[bytes]:
    """Audit path for leaf ``index`` in the tree of the first ``size`` leaf hashes (O(n))."""
    size = _check_count(size, "tree size")
    if size > len(leaf_hashes):
        raise MerkleProofError(f"tree size {size} exceeds the {len(leaf_hashes)} leaf hashes given")
    return MerkleTree(leaf_hashes[:size]).inclusion_proof(index, size)


def consistency_proof(leaf_hashes: Sequence[bytes], first_size: int, second_size: int) -> list[bytes]:
    """Consistency proof between the trees of the first ``first_size`` and ``second_size`` leaves."""
    second_size = _check_count(second_size, "second size")
    if second_size > len(leaf_hashes):
        raise MerkleProofError(f"second size {second_size} exceeds the {len(leaf_hashes)} leaf hashes given")
    return MerkleTree(leaf_hashes[:second_size]).consistency_proof(first_size, second_size)


# --------------------------------------------------------------------------------------------------
# Verification (RFC 9162 §2.1.3.2 and §2.1.4.2)


def inclusion_proof_length(index: int, size: int) -> int:
    """Number of nodes an honest inclusion proof has: levels below the fork plus left-hand borders."""
    inner = (index ^ (size - 1)).bit_length()
    return inner + (index >> inner).bit_count()


def consistency_proof_length(first_size: int, second_size: int) -> int:
    """Number of nodes an honest consistency proof has for 0 < first_size < second_size."""
    inner = ((first_size - 1) ^ (second_size - 1)).bit_length()
    shift = (first_size & -first_size).bit_length() - 1  # trailing zeros of first_size
    border = ((first_size - 1) >> inner).bit_count()
    # The proof carries the root of the 2**shift subtree the old tree ends in, unless the old tree is
    # exactly that subtree (first_size a power of two): then the verifier seeds with the old root.
    return inner - shift + border + (0 if first_size == 1 << shift else 1)


def _equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def verify_inclusion(leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> None:
    """Raise :class:`MerkleProofError` unless ``proof`` puts leaf ``index`` of tree ``size`` under ``root``.

    The leaf hash is taken as given (already :func:`leaf_hash`-ed), so callers hash entries exactly once.
    """
    leaf = _check_hash(leaf_hash, "leaf hash")
    root = _check_hash(root, "root hash")
    index = _check_count(index, "leaf index")
    size = _check_count(size, "tree size")
    path = _check_proof(proof)
    # Step 1.
    if index >= size:
        raise MerkleProofError(f"leaf index {index} must be smaller than tree size {size}")
    expected = inclusion_proof_length(index, size)
    if len(path) != expected:
        kind = "too short" if len(path) < expected else "too long"
        raise MerkleProofError(
            f"inclusion proof is {kind}: {len(path)} nodes for index {index} in tree size {size}, "
            f"expected {expected}"
        )
    # Steps 2-4.
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            raise MerkleProofError("inclusion proof is too long: nodes left after reaching the root")
        if fn & 1 or fn == sn:
            r = _node(p, r)
            while fn and not fn & 1:  # "if LSB(fn) is not set, right-shift until it is or fn is 0"
                fn >>= 1
                sn >>= 1
        else:
            r = _node(r, p)
        fn >>= 1
        sn >>= 1
    # Step 5.
    if sn != 0:
        raise MerkleProofError("inclusion proof is too short: the path ends below the root")
    if not _equal(r, root):
        raise MerkleProofError(f"inclusion proof does not lead to the root for index {index} in size {size}")


def verify_consistency(
    first_size: int, second_size: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]
) -> None:
    """Raise :class:`MerkleProofError` unless ``proof`` shows tree ``first_size`` is a prefix of the second.

    Beyond the RFC's 0 < first < second, equal sizes are accepted only with an empty proof and equal
    roots (a monitor re-checking an unchanged head), and a first size of 0 is refused: every tree
    extends the empty one, so such a "proof" would vouch for nothing.
    """
    first_root = _check_hash(first_root, "first root")
    second_root = _check_hash(second_root, "second root")
    first = _check_count(first_size, "first size")
    second = _check_count(second_size, "second size")
    path = _check_proof(proof)
    if first > second:
        raise MerkleProofError(f"first size {first} exceeds second size {second}")
    if first == 0:
        raise MerkleProofError("consistency with an empty tree proves nothing (first size must be > 0)")
    if first == second:
        if path:
            raise MerkleProofError(f"consistency proof is too long: {len(path)} nodes for equal sizes")
        if not _equal(first_root, second_root):
            raise MerkleProofError(f"roots differ for the same tree size {first}")
        return
    expected = consistency_proof_length(first, second)
    if len(path) != expected:
        kind = "too short" if len(path) < expected else "too long"
        raise MerkleProofError(
            f"consistency proof is {kind}: {len(path)} nodes for sizes {first} -> {second}, "
            f"expected {expected}"
        )
    # Step 1.
    if not path:
        raise MerkleProofError("consistency proof is empty")
    # Step 2.
    if first & (first - 1) == 0:
        path = [first_root, *path]
    # Steps 3-4.
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # Step 5.
    fr = sr = path[0]
    # Step 6.
    for c in path[1:]:
        if sn == 0:
            raise MerkleProofError("consistency proof is too long: nodes left after reaching the root")
        if fn & 1 or fn == sn:
            fr = _node(c, fr)
            sr = _node(c, sr)
            while fn and not fn & 1:  # "if LSB(fn) is not set, right-shift until it is or fn is 0"
                fn >>= 1
                sn >>= 1
        else:
            sr = _node(sr, c)
        fn >>= 1
        sn >>= 1
    # Step 7.
    if sn != 0:
        raise MerkleProofError("consistency proof is too short: the path ends below the new root")
    if not _equal(fr, first_root):
        raise MerkleProofError(f"consistency proof does not reproduce the first root (size {first})")
    if not _equal(sr, second_root):
        raise MerkleProofError(f"consistency proof does not reproduce the second root (size {second})")
