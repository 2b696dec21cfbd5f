"""The deletion mask: which weights a request zeroes, in a canonical byte form that can be signed and hashed.

The provider signs ``digest()`` of a mask and the client proves its update against the same bytes, so
the encoding must be *canonical*: one mask has exactly one byte string, and ``from_bytes`` refuses any
other string (non-minimal varints, unsorted or duplicate indices, empty blocks, trailing bytes) instead of
normalising it. Otherwise two different byte strings could name the same mask under two digests, or a
lenient decoder could accept bytes a strict one refuses.

Weights are flattened row-major (C order). Layer ``L`` with ``numel`` weights and block size ``B`` has
``ceil(numel / B)`` blocks; block ``k`` covers flat indices ``[k*B, min((k+1)*B, numel))``. A layer mask
maps each *touched* block index to the sorted offsets (inside the block) of the weights to zero.

Byte format, version 1 (all integers are unsigned LEB128 varints, minimal length, < 2**63)::

    magic        4 bytes  b"ZKUM"
    version      varint   1
    n_layers     varint
    n_layers times, layers in strictly increasing order of their UTF-8 name bytes:
        name_len     varint (1..256)
        name         name_len bytes of UTF-8
        ndim         varint (1..8)
        dims         ndim varints, each >= 1
        block_size   varint (>= 1)
        n_blocks     varint (number of touched blocks)
        n_blocks times, in strictly increasing block index:
            block        varint (< ceil(numel / block_size))
            count        varint (1..length of that block)
            offsets      count varints, strictly increasing, each < length of that block

The format needs nothing beyond the standard library so a verifier in another language can re-implement
it in an afternoon.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from zkunlearn.errors import MalformedError

__all__ = ["FORMAT_VERSION", "MAGIC", "LayerMask", "Mask", "MaskError"]

MAGIC = b"ZKUM"
FORMAT_VERSION = 1
_MAX_NAME = 256
_MAX_NDIM = 8
_MAX_VARINT = 2**63 - 1


class MaskError(MalformedError):
    """A mask (object or bytes) is malformed or does not fit the model it is applied to."""


def _as_int(value: object, what: str) -> int:
    """Accept Python and numpy integers but not bools/floats: a float offset is a bug, not a rounding."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise MaskError(f"{what} must be an integer, got {type(value).__name__}")
    return int(value)


def _name_bytes(name: str) -> bytes:
    """A name with a lone surrogate (a str from a mis-decoded path or ``surrogateescape``) has no UTF-8
    form, so it can never be written into the canonical bytes: refuse it when the layer is built rather
    than when the mask is first serialised or sorted."""
    try:
        return name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise MaskError(f"layer name {name!r} is not encodable as UTF-8 ({exc.reason})") from exc


def _items(value: object, what: str) -> Iterable[object]:
    """The elements of a shape or an offset list: a bare int or ``None`` is a caller's slip that would
    otherwise surface as Python's "object is not iterable", and a string would iterate as characters."""
    if isinstance(value, str | bytes | bytearray) or not isinstance(value, Iterable):
        raise MaskError(f"{what} must be a sequence of integers, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class LayerMask:
    """Masked weights of one layer, grouped by Group-OBS block."""

    layer: str
    shape: tuple[int, ...]
    block_size: int
    blocks: Mapping[int, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.layer, str) or not self.layer:
            raise MaskError("layer name must be a non-empty string")
        if len(_name_bytes(self.layer)) > _MAX_NAME:
            raise MaskError(f"layer name {self.layer!r} is longer than {_MAX_NAME} bytes")
        dims = _items(self.shape, f"shape of layer {self.layer!r}")
        shape = tuple(_as_int(d, f"dimension of layer {self.layer!r}") for d in dims)
        if not 1 <= len(shape) <= _MAX_NDIM:
            raise MaskError(f"layer {self.layer!r}: rank must be 1..{_MAX_NDIM}, got {len(shape)}")
        if any(d < 1 or d > _MAX_VARINT for d in shape):
            raise MaskError(f"layer {self.layer!r}: every dimension must be >= 1, got {shape}")
        block_size = _as_int(self.block_size, f"block size of layer {self.layer!r}")
        if block_size <= 0 or block_size > _MAX_VARINT:
            raise MaskError(f"layer {self.layer!r}: block size must be positive, got {block_size}")
        if not isinstance(self.blocks, Mapping):
            kind = type(self.blocks).__name__
            raise MaskError(f"layer {self.layer!r}: blocks must map block index -> offsets, got {kind}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "block_size", block_size)
        n_blocks = self.n_blocks
        blocks: dict[int, tuple[int, ...]] = {}
        for key in sorted(_as_int(k, f"block index of layer {self.layer!r}") for k in self.blocks):
            if not 0 <= key < n_blocks:
                raise MaskError(f"layer {self.layer!r}: block {key} out of range ({n_blocks} blocks)")
            where = f"block {key} of layer {self.layer!r}"
            items = _items(self.blocks[key], f"offsets of {where}")
            offsets = tuple(_as_int(o, f"offset in {where}") for o in items)
            _check_offsets(self.layer, key, offsets, self.block_length(key))
            blocks[key] = offsets
        object.__setattr__(self, "blocks", blocks)

    def __hash__(self) -> int:
        return hash((self.layer, self.shape, self.block_size, tuple(self.blocks.items())))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.block_size)

    def block_length(self, block: int) -> int:
        """Blocks are full except possibly the last one, which ends at ``numel``."""
        return min(self.block_size, self.numel - block * self.block_size)

    def touched_blocks(self) -> list[int]:
        return list(self.blocks)

    def masked_count(self) -> int:
        return sum(len(v) for v in self.blocks.values())

    def flat_indices(self) -> npt.NDArray[np.int64]:
        """Sorted flat (row-major) indices of the masked weights."""
        parts = [k * self.block_size + np.asarray(v, dtype=np.int64) for k, v in self.blocks.items()]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def dense(self) -> npt.NDArray[np.bool_]:
        out = np.zeros(self.numel, dtype=bool)
        out[self.flat_indices()] = True
        return out.reshape(self.shape)

    @classmethod
    def from_dense(cls, layer: str, dense: npt.ArrayLike, block_size: int) -> LayerMask:
        try:
            arr = np.asarray(dense)
        except (TypeError, ValueError) as exc:  # ragged nesting: numpy's message names no layer
            raise MaskError(f"dense mask of layer {layer!r} is not an array: {exc}") from exc
        if arr.dtype != np.bool_:
            raise MaskError(f"dense mask of layer {layer!r} must be boolean, got {arr.dtype}")
        flat = np.flatnonzero(arr.reshape(-1))
        block_size = _as_int(block_size, f"block size of layer {layer!r}")
        if block_size <= 0:
            raise MaskError(f"layer {layer!r}: block size must be positive, got {block_size}")
        blocks: dict[int, tuple[int, ...]] = {}
        if flat.size:
            keys = flat // block_size
            bounds = np.flatnonzero(np.diff(keys)) + 1
            for chunk in np.split(flat, bounds):
                key = int(chunk[0] // block_size)
                blocks[key] = tuple(int(i) for i in chunk - key * block_size)
        return cls(layer=layer, shape=tuple(int(d) for d in arr.shape), block_size=block_size, blocks=blocks)


def _check_offsets(layer: str, block: int, offsets: tuple[int, ...], length: int) -> None:
    if not offsets:
        raise MaskError(f"layer {layer!r}: block {block} is listed with no offsets (omit untouched blocks)")
    # Negatives first: the order check below would call -1 a "duplicate" (of its start value) or -3
    # "unsorted", and send the reader looking for the wrong mistake.
    negative = [o for o in offsets if o < 0]
    if negative:
        raise MaskError(
            f"layer {layer!r}: offset {negative[0]} out of range for block {block} (offsets start at 0)"
        )
    prev = -1
    for o in offsets:
        if o <= prev:
            kind = "duplicate" if o == prev else "unsorted"
            raise MaskError(f"layer {layer!r}: block {block} has {kind} offset {o} (must strictly increase)")
        if o >= length:
            raise MaskError(f"layer {layer!r}: offset {o} out of range for block {block} of length {length}")
        prev = o


@dataclass(frozen=True)
class Mask:
    """A deletion mask over several layers. Layers are kept sorted by name so equal masks compare equal."""

    layers: tuple[LayerMask, ...]
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        # ``1.0 == 1`` and ``True == 1``: without the type check such a mask compares equal to a valid one
        # yet cannot be encoded, so its digest would fail far from where it was built.
        version = _as_int(self.version, "mask version")
        if version != FORMAT_VERSION:
            raise MaskError(f"unsupported mask version {version} (this build knows {FORMAT_VERSION})")
        if isinstance(self.layers, str | bytes | bytearray | Mapping) or not isinstance(
            self.layers, Iterable
        ):
            raise MaskError(f"mask layers must be a sequence of LayerMask, got {type(self.layers).__name__}")
        layers = tuple(self.layers)
        for lm in layers:
            if not isinstance(lm, LayerMask):
                raise MaskError(f"mask layers must be LayerMask, got {type(lm).__name__}")
        ordered = tuple(sorted(layers, key=lambda lm: _name_bytes(lm.layer)))
        for a, b in itertools.pairwise(ordered):
            if a.layer == b.layer:
                raise MaskError(f"duplicate layer {a.layer!r} in mask")
        object.__setattr__(self, "layers", ordered)
        object.__setattr__(self, "version", version)

    def __hash__(self) -> int:
        return hash((self.layers, self.version))

    # -- queries -------------------------------------------------------------------------------------------
    def layer(self, name: str) -> LayerMask:
        for lm in self.layers:
            if lm.layer == name:
                return lm
        raise MaskError(f"mask has no layer {name!r} (layers: {[lm.layer for lm in self.layers]})")

    @property
    def layer_names(self) -> list[str]:
        return [lm.layer for lm in self.layers]

    def dense(self, layer: str) -> npt.NDArray[np.bool_]:
        return self.layer(layer).dense()

    def touched_blocks(self, layer: str) -> list[int]:
        return self.layer(layer).touched_blocks()

    def masked_count(self) -> int:
        return sum(lm.masked_count() for lm in self.layers)

    def validate_against(self, shapes: Mapping[str, tuple[int, ...]], block_size: int | None = None) -> None:
        """Refuse a mask that names a layer the model lacks, or disagrees on its shape or block size."""
        if not isinstance(shapes, Mapping):
            raise MaskError(f"model shapes must map layer name -> shape, got {type(shapes).__name__}")
        if block_size is not None:
            block_size = _as_int(block_size, "expected block size")
        for lm in self.layers:
            if lm.layer not in shapes:
                raise MaskError(f"mask names unknown layer {lm.layer!r} (model has {sorted(shapes)})")
            dims = _items(shapes[lm.layer], f"model shape of layer {lm.layer!r}")
            want = tuple(_as_int(d, f"model dimension of layer {lm.layer!r}") for d in dims)
            if want != lm.shape:
                raise MaskError(f"layer {lm.layer!r}: mask shape {lm.shape} != model shape {want}")
            if block_size is not None and lm.block_size != block_size:
                raise MaskError(f"layer {lm.layer!r}: block size {lm.block_size} != expected {block_size}")

    @classmethod
    def from_dense(cls, dense: Mapping[str, npt.ArrayLike], block_size: int) -> Mask:
        if not isinstance(dense, Mapping):
            raise MaskError(f"dense masks must map layer name -> boolean array, got {type(dense).__name__}")
        return cls(layers=tuple(LayerMask.from_dense(name, d, block_size) for name, d in dense.items()))

    # -- canonical bytes ----------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        out = bytearray(MAGIC)
        _put(out, self.version)
        _put(out, len(self.layers))
        for lm in self.layers:
            name = lm.layer.encode("utf-8")
            _put(out, len(name))
            out += name
            _put(out, len(lm.shape))
            for d in lm.shape:
                _put(out, d)
            _put(out, lm.block_size)
            _put(out, len(lm.blocks))
            for key, offsets in lm.blocks.items():
                _put(out, key)
                _put(out, len(offsets))
                for o in offsets:
                    _put(out, o)
        return bytes(out)

    def digest(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @classmethod
    def from_bytes(cls, data: bytes) -> Mask:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise MaskError(f"mask bytes must be bytes, got {type(data).__name__}")
        r = _Reader(bytes(data))
        if r.take(len(MAGIC), "magic") != MAGIC:
            raise MaskError("not a zkunlearn mask: bad magic (expected b'ZKUM')")
        version = r.varint("version")
        if version != FORMAT_VERSION:
            raise MaskError(f"unsupported mask version {version} (this build knows {FORMAT_VERSION})")
        n_layers = r.varint("layer count")
        layers: list[LayerMask] = []
        prev_name: bytes | None = None
        for li in range(n_layers):
            name_len = r.varint(f"name length of layer #{li}")
            if not 1 <= name_len <= _MAX_NAME:
                raise MaskError(f"layer #{li}: name length must be 1..{_MAX_NAME}, got {name_len}")
            raw = r.take(name_len, f"name of layer #{li}")
            try:
                name = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise MaskError(f"layer #{li}: name is not UTF-8") from exc
            if prev_name is not None and raw <= prev_name:
                kind = "duplicate" if raw == prev_name else "unsorted"
                raise MaskError(f"{kind} layer {name!r} (layers must be in strictly increasing name order)")
            prev_name = raw
            ndim = r.varint(f"rank of layer {name!r}")
            if not 1 <= ndim <= _MAX_NDIM:
                raise MaskError(f"layer {name!r}: rank must be 1..{_MAX_NDIM}, got {ndim}")
            shape = tuple(r.varint(f"dimension of layer {name!r}") for _ in range(ndim))
            if any(d < 1 for d in shape):
                raise MaskError(f"layer {name!r}: every dimension must be >= 1, got {shape}")
            block_size = r.varint(f"block size of layer {name!r}")
            if block_size <= 0:
                raise MaskError(f"layer {name!r}: block size must be positive, got {block_size}")
            numel = math.prod(shape)
            n_total = -(-numel // block_size)
            n_touched = r.varint(f"block count of layer {name!r}")
            if n_touched > n_total:
                raise MaskError(f"layer {name!r}: {n_touched} touched blocks but the layer has {n_total}")
            blocks: dict[int, tuple[int, ...]] = {}
            prev_block = -1
            for _ in range(n_touched):
                key = r.varint(f"block index of layer {name!r}")
                if key <= prev_block:
                    kind = "duplicate" if key == prev_block else "unsorted"
                    raise MaskError(f"layer {name!r}: {kind} block index {key} (must strictly increase)")
                if key >= n_total:
                    raise MaskError(f"layer {name!r}: block {key} out of range (layer has {n_total} blocks)")
                prev_block = key
                length = min(block_size, numel - key * block_size)
                count = r.varint(f"offset count of block {key} of layer {name!r}")
                if count > length:
                    raise MaskError(f"layer {name!r}: block {key} lists {count} offsets > {length} weights")
                offsets = tuple(r.varint(f"offset in block {key} of layer {name!r}") for _ in range(count))
                _check_offsets(name, key, offsets, length)
                blocks[key] = offsets
            layers.append(LayerMask(layer=name, shape=shape, block_size=block_size, blocks=blocks))
        if r.pos != len(r.data):
            raise MaskError(f"{len(r.data) - r.pos} trailing bytes after the mask")
        return cls(layers=tuple(layers), version=version)


def _put(out: bytearray, value: int) -> None:
    if value < 0 or value > _MAX_VARINT:
        raise MaskError(f"value {value} cannot be encoded (must be 0..2**63-1)")
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise MaskError(f"truncated mask: ran out of bytes reading {what}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def varint(self, what: str) -> int:
        value = 0
        for i in range(10):
            if self.pos >= len(self.data):
                raise MaskError(f"truncated mask: ran out of bytes reading {what}")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                if byte == 0 and i > 0:
                    raise MaskError(f"non-canonical varint for {what} (redundant trailing zero byte)")
                if value > _MAX_VARINT:
                    raise MaskError(f"varint for {what} exceeds 2**63-1")
                return value
        raise MaskError(f"varint for {what} is longer than 10 bytes")
