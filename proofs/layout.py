"""How a deletion maps onto proofs: blocks, batches, commitment names, proof bytes, verdicts.

Shared by every Group-OBS relation (fixed point and exact) and by the provider, the client and the
auditor, so that they cannot disagree on which batch a proof covers or which commitment it replaces.
A targeted layer of ``numel`` weights is cut into blocks of ``block`` (row-major) and the blocks into
fixed *batches* of ``batch`` consecutive blocks; one proof per touched batch. ``numel`` must be a
multiple of ``block`` (no block is padded inside); when the block count is not a multiple of ``batch``,
the last batch is completed with whole *padding* blocks that map to no weight (:class:`LayerLayout`;
what a verifier demands of them: ``docs/decisions/padded-batches.md``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from zkunlearn.circuits.mask import LayerMask, Mask
from zkunlearn.proofs.backend import Proof, ProofFormatError
from zkunlearn.proofs.verifier import Verdict

from zkunlearn.errors import MalformedError


class DeletionError(MalformedError):
    """A deletion's inputs do not fit the published circuits (wrong shapes, missing commitments)."""


class CommitmentLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def block(self) -> int: ...
    @property
    def point_hex(self) -> str: ...


def commitment_name(kind: str, layer: str) -> str:
    return f"{kind}:{layer}"


ANALYTIC_LAYER = "head"
"""The layer name an analytic head's commitments carry (``r:head``, ``m:head``, ``w:head``)."""


def request_digest(request_canonical: bytes) -> bytes:
    """What binds the mask (and forget data) commitments to one signed request."""
    return hashlib.sha256(b"zkunlearn/request/v1" + request_canonical).digest()


class BlockLayout(Protocol):
    """What a Group-OBS spec fixes about the layout: block size and blocks per proof."""

    @property
    def block(self) -> int: ...
    @property
    def batch(self) -> int: ...
    @property
    def batch_weights(self) -> int: ...


@dataclass(frozen=True)
class LayerLayout:
    """How one layer of ``blocks`` whole blocks is cut into ``batches`` proof batches of ``batch`` blocks.

    Blocks ``blocks .. batches * batch - 1`` are padding: they exist only in the last batch's tensors,
    map to no weight and carry no mask."""

    layer: str
    block: int
    batch: int
    blocks: int

    @property
    def weights(self) -> int:
        return self.blocks * self.block

    @property
    def batches(self) -> int:
        return -(-self.blocks // self.batch)

    @property
    def padded_blocks(self) -> int:
        """Blocks including padding: ``batches * batch``."""
        return self.batches * self.batch

    @property
    def padding_blocks(self) -> int:
        """Padding blocks completing the last batch (0 when ``batch`` divides ``blocks``)."""
        return self.padded_blocks - self.blocks

    def real_blocks(self, batch: int) -> int:
        """How many of batch ``batch``'s blocks hold weights (the rest, at its end, are padding)."""
        if not 0 <= batch < self.batches:
            raise DeletionError(f"{self.layer}: batch {batch} out of range ({self.batches} batches)")
        return min(self.batch, self.blocks - batch * self.batch)

    def pad(self, per_block: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """``(blocks, ...)`` per-block values as ``(batches, batch, ...)``, padding blocks all zero."""
        if per_block.shape[0] != self.blocks:
            raise DeletionError(
                f"{self.layer}: {per_block.shape[0]} blocks given, the layer has {self.blocks}"
            )
        padded = np.zeros((self.padded_blocks, *per_block.shape[1:]), dtype=per_block.dtype)
        padded[: self.blocks] = per_block
        return padded.reshape(self.batches, self.batch, *per_block.shape[1:])

    def unpad(self, per_batch: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """``(batches, batch, ...)`` back to the layer's ``(blocks, ...)``, padding dropped."""
        if per_batch.shape[:2] != (self.batches, self.batch):
            raise DeletionError(
                f"{self.layer}: batches shaped {per_batch.shape[:2]}, "
                f"the layout is {(self.batches, self.batch)}"
            )
        return per_batch.reshape(self.padded_blocks, *per_batch.shape[2:])[: self.blocks]


def layer_layout(layer: str, numel: int, spec: BlockLayout) -> LayerLayout:
    """The one rule every party cuts a layer of ``numel`` weights by: whole blocks of ``spec.block``,
    ``ceil(blocks / spec.batch)`` batches, the last padded with whole zero blocks. A ``numel`` that is
    not a multiple of the block is refused: a block is never padded inside."""
    if numel < 1 or numel % spec.block:
        raise DeletionError(
            f"layer {layer} has {numel} weights, not a multiple of the block size {spec.block}: layers are "
            "cut into whole blocks (only whole padding blocks complete a batch, never padding inside a block)"
        )
    return LayerLayout(layer, spec.block, spec.batch, numel // spec.block)


def mask_layout(layer: LayerMask, spec: BlockLayout) -> LayerLayout:
    """The layout of a mask's layer; refuses a mask cut into other blocks than the circuit's."""
    if layer.block_size != spec.block:
        raise DeletionError(
            f"mask block size {layer.block_size} != circuit block {spec.block} ({layer.layer})"
        )
    return layer_layout(layer.layer, int(np.prod(layer.shape)), spec)


def layer_batches(layer: LayerMask, spec: BlockLayout) -> int:
    """How many proof batches a mask's layer is enrolled in (:func:`layer_layout`)."""
    return mask_layout(layer, spec).batches


def covered_weights(mask: Mask, spec: BlockLayout) -> int:
    """Weights (padding excluded) in the batches the mask touches: what its proofs cover."""
    layouts = {layer.layer: mask_layout(layer, spec) for layer in mask.layers}
    return sum(layouts[name].real_blocks(b) * spec.block for name, b in touched_batches(mask, spec))


def touched_batches(mask: Mask, spec: BlockLayout) -> list[tuple[str, int]]:
    """(layer, batch) pairs with at least one masked weight, in the order proofs must come in."""
    out: list[tuple[str, int]] = []
    for layer in mask.layers:
        layer_batches(layer, spec)
        out.extend(
            (layer.layer, b) for b in sorted({blk // spec.batch for blk in mask.touched_blocks(layer.layer)})
        )
    return out


def batch_mask_rows(layer: LayerMask, batch: int, spec: BlockLayout) -> npt.NDArray[np.bool_]:
    """The (batch, B) 0/1 mask of one batch."""
    rows = np.zeros((spec.batch, spec.block), dtype=bool)
    for i in range(spec.batch):
        offsets = layer.blocks.get(batch * spec.batch + i, ())
        rows[i, list(offsets)] = True
    return rows


class MaskCommitter(Protocol):
    """A Group-OBS verifier: commits to a batch's mask rows, bound to a request digest."""

    def mask_commitment(self, mask: npt.NDArray[np.bool_], request_digest: bytes) -> str: ...


def batch_mask_commitment(
    verifier: MaskCommitter, layer: LayerMask, batch: int, spec: BlockLayout, digest: bytes
) -> str:
    """The provider's commitment to one batch's mask rows: the one value both verification and the
    preparation at issue compute, so that a prepared commitment is the one verification looks up."""
    return verifier.mask_commitment(batch_mask_rows(layer, batch, spec), digest)


def by_key(items: Sequence[CommitmentLike], what: str) -> dict[tuple[str, int], str]:
    out: dict[tuple[str, int], str] = {}
    for c in items:
        key = (c.name, int(c.block))
        if key in out:
            raise DeletionError(f"{what}: duplicate commitment {c.name}#{c.block}")
        out[key] = c.point_hex
    return out


def enrolled_batches(names: Mapping[tuple[str, int], str], layer: str) -> list[int]:
    """A Group-OBS layer's enrolled batches, ``0..n-1``, each with a ``theta`` and a ``g`` commitment;
    refuses a layer enrolled in part or with batches that do not pair up."""
    thetas = sorted(b for (name, b) in names if name == commitment_name("theta", layer))
    gs = sorted(b for (name, b) in names if name == commitment_name("g", layer))
    if not thetas or thetas != list(range(len(thetas))) or gs != thetas:
        raise DeletionError(
            f"{layer}: enrolled theta batches {thetas[:4]} and g batches {gs[:4]} must both be 0..n-1"
        )
    return thetas


def parse_proof(raw: bytes, index: int) -> Proof:
    """Proof ``index`` of a submission from its wire bytes (:meth:`Proof.from_bytes`); a malformed one
    is a :class:`DeletionError` naming it."""
    try:
        return Proof.from_bytes(raw)
    except ProofFormatError as exc:
        raise DeletionError(f"proof {index} is malformed: {exc}") from exc


def encode_proof(proof: Proof) -> bytes:
    """A proof's wire bytes (:meth:`Proof.to_bytes`)."""
    return proof.to_bytes()


class NoReplay:
    """The provider state refuses replays (one accepted submission per request); the auditor re-checks
    decided receipts, so here a proof is judged on its own."""

    def proof_used(self, digest: str) -> bool:
        return False

    def request_used(self, request_id: str) -> bool:
        return False


@dataclass(frozen=True)
class DeletionVerdict:
    ok: bool
    reason: str
    verdicts: tuple[Verdict, ...] = ()


def changed_outside(
    old: dict[tuple[str, int], str], new: dict[tuple[str, int], str], may_change: set[tuple[str, int]]
) -> str | None:
    """Why the after-commitments are not the before-commitments with only ``may_change`` replaced,
    or ``None`` when they are."""
    if set(new) != set(old):
        return "after-commitments must name exactly the enrolled tensors"
    for key, point in old.items():
        if key not in may_change and new[key] != point:
            return f"commitment {key[0]}#{key[1]} changed but the request does not touch it"
    return None
