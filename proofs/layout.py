"""How a deletion maps onto proofs: blocks, batches, commitment names, proof bytes, verdicts.

Shared by every Group-OBS relation (fixed point and exact) and by the provider, the client and the
auditor, so that they cannot disagree on which batch a proof covers or which commitment it replaces.
A targeted layer of ``numel`` weights is cut into blocks of ``block`` (row-major) and the blocks into
fixed *batches* of ``batch`` consecutive blocks; one proof per touched batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

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


def layer_batches(layer: LayerMask, spec: BlockLayout) -> int:
    numel = int(np.prod(layer.shape))
    if layer.block_size != spec.block:
        raise DeletionError(
            f"mask block size {layer.block_size} != circuit block {spec.block} ({layer.layer})"
        )
    if numel % spec.batch_weights:
        raise DeletionError(
            f"layer {layer.layer} has {numel} weights, not a multiple of batch x block = {spec.batch_weights}"
        )
    return numel // spec.batch_weights


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
