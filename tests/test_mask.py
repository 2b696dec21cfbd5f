"""The deletion mask's canonical bytes: round trips, stable digests and refusal of every malformed input."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zkunlearn.circuits.mask import MAGIC, LayerMask, Mask, MaskError


def _uv(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _layer_bytes(
    name: bytes, shape: tuple[int, ...], B: int, blocks: list[tuple[int, list[int]]], count: int | None = None
) -> bytes:
    out = _uv(len(name)) + name + _uv(len(shape)) + b"".join(_uv(d) for d in shape) + _uv(B)
    out += _uv(len(blocks) if count is None else count)
    for k, offs in blocks:
        out += _uv(k) + _uv(len(offs)) + b"".join(_uv(o) for o in offs)
    return out


def _mask_bytes(*layers: bytes, version: int = 1) -> bytes:
    return MAGIC + _uv(version) + _uv(len(layers)) + b"".join(layers)


GOOD_LAYER = _layer_bytes(b"fc1.weight", (4, 10), 16, [(0, [1, 5]), (2, [0, 7])])


def _sample() -> Mask:
    rng = np.random.default_rng(0)
    return Mask.from_dense(
        {
            "fc1.weight": rng.random((6, 10)) < 0.3,
            "fc2.weight": rng.random((3, 6)) < 0.5,
            "b": np.ones(5, bool),
        },
        8,
    )


def test_hand_encoded_bytes_match_and_round_trip() -> None:
    data = _mask_bytes(GOOD_LAYER)
    mask = Mask.from_bytes(data)
    assert mask.to_bytes() == data
    lm = mask.layer("fc1.weight")
    assert lm.blocks == {0: (1, 5), 2: (0, 7)}
    assert mask.touched_blocks("fc1.weight") == [0, 2]
    assert mask.masked_count() == 4
    dense = mask.dense("fc1.weight")
    assert dense.shape == (4, 10)
    assert sorted(np.flatnonzero(dense)) == [1, 5, 32, 39]


def test_round_trip_and_digest_are_canonical() -> None:
    a = _sample()
    b = Mask.from_bytes(a.to_bytes())
    assert a == b
    assert a.to_bytes() == b.to_bytes()
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    assert a.digest() == hashlib.sha256(a.to_bytes()).hexdigest()
    # Layer order given by the caller does not matter: equal masks, equal bytes.
    c = Mask(layers=tuple(reversed(a.layers)))
    assert c.to_bytes() == a.to_bytes()
    # Pinned digest: a change of encoding must be a deliberate, versioned decision.
    simple = Mask((LayerMask("fc1.weight", (4, 10), 16, {0: (1, 5), 2: (0, 7)}),))
    assert simple.digest() == hashlib.sha256(_mask_bytes(GOOD_LAYER)).hexdigest()
    assert simple.digest() == "5284f61c76ab824d1fee0bef0e5555ca7cdd94c7fcb39b7f71d46b58781ca4ce"
    # Any change in the mask changes the digest.
    other = Mask((LayerMask("fc1.weight", (4, 10), 16, {0: (1, 6), 2: (0, 7)}),))
    assert other.digest() != simple.digest()


def test_dense_round_trip_and_short_last_block() -> None:
    dense = np.zeros((3, 7), dtype=bool)
    dense.flat[[0, 19, 20]] = True  # block 2 of B=8 covers flat 16..20 (length 5)
    mask = Mask.from_dense({"w": dense}, 8)
    assert mask.layer("w").blocks == {0: (0,), 2: (3, 4)}
    assert mask.layer("w").block_length(2) == 5
    assert np.array_equal(mask.dense("w"), dense)
    with pytest.raises(MaskError, match="out of range"):
        LayerMask("w", (3, 7), 8, {2: (5,)})


def test_validate_against_model_shapes() -> None:
    mask = _sample()
    shapes = {"fc1.weight": (6, 10), "fc2.weight": (3, 6), "b": (5,), "extra": (2,)}
    mask.validate_against(shapes, 8)
    mask.validate_against(shapes)
    with pytest.raises(MaskError, match=r"unknown layer 'fc2\.weight'"):
        mask.validate_against({"fc1.weight": (6, 10), "b": (5,)})
    with pytest.raises(MaskError, match="shape"):
        mask.validate_against({**shapes, "fc1.weight": (10, 6)})
    with pytest.raises(MaskError, match="block size"):
        mask.validate_against(shapes, 16)


MALFORMED = {
    "bad magic": (b"ZKUX" + _mask_bytes(GOOD_LAYER)[4:], "magic"),
    "unknown version": (_mask_bytes(GOOD_LAYER, version=2), "version 2"),
    "version zero": (_mask_bytes(GOOD_LAYER, version=0), "version 0"),
    "empty": (b"", "truncated"),
    "truncated mid-layer": (_mask_bytes(GOOD_LAYER)[:-3], "truncated"),
    "truncated name": (MAGIC + _uv(1) + _uv(1) + _uv(20) + b"fc", "truncated"),
    "trailing bytes": (_mask_bytes(GOOD_LAYER) + b"\x00", "trailing"),
    "unsorted offsets": (_mask_bytes(_layer_bytes(b"w", (40,), 16, [(0, [5, 1])])), "unsorted offset"),
    "duplicate offsets": (_mask_bytes(_layer_bytes(b"w", (40,), 16, [(0, [3, 3])])), "duplicate offset"),
    "offset out of range": (_mask_bytes(_layer_bytes(b"w", (40,), 16, [(0, [16])])), "out of range"),
    "offset past short last block": (_mask_bytes(_layer_bytes(b"w", (40,), 16, [(2, [8])])), "out of range"),
    "block out of range": (_mask_bytes(_layer_bytes(b"w", (40,), 16, [(3, [0])])), "out of range"),
    "unsorted blocks": (_mask_bytes(_layer_bytes(b"w", (40,), 16, [(1, [0]), (0, [0])])), "unsorted block"),
    "duplicate blocks": (_mask_bytes(_layer_bytes(b"w", (40,), 16, [(1, [0]), (1, [2])])), "duplicate block"),
    "empty block": (_mask_bytes(_layer_bytes(b"w", (40,), 16, [(1, [])])), "no offsets"),
    "too many offsets": (_mask_bytes(_layer_bytes(b"w", (40,), 16, [(2, list(range(9)))])), "offsets"),
    "too many blocks": (_mask_bytes(_layer_bytes(b"w", (40,), 16, [], count=4)), "touched blocks"),
    "block size zero": (_mask_bytes(_layer_bytes(b"w", (40,), 0, [])), "block size must be positive"),
    "empty layer name": (_mask_bytes(_layer_bytes(b"", (40,), 16, [])), "name length"),
    "name not utf-8": (_mask_bytes(_layer_bytes(b"\xff\xfe", (40,), 16, [])), "UTF-8"),
    "zero dimension": (_mask_bytes(_layer_bytes(b"w", (4, 0), 16, [])), "dimension"),
    "rank zero": (_mask_bytes(_layer_bytes(b"w", (), 16, [])), "rank"),
    "duplicate layers": (
        _mask_bytes(_layer_bytes(b"w", (40,), 16, []), _layer_bytes(b"w", (40,), 16, [])),
        "duplicate layer",
    ),
    "unsorted layers": (
        _mask_bytes(_layer_bytes(b"z", (40,), 16, []), _layer_bytes(b"a", (40,), 16, [])),
        "unsorted layer",
    ),
    "non-minimal varint": (MAGIC + b"\x81\x00" + _uv(0), "non-canonical varint"),
    "overlong varint": (MAGIC + b"\xff" * 11, "longer than 10 bytes"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_from_bytes_refuses_malformed(case: str) -> None:
    data, message = MALFORMED[case]
    with pytest.raises(MaskError, match=message):
        Mask.from_bytes(data)


def test_non_minimal_varint_in_offsets_is_refused() -> None:
    """Two encodings of one mask would give two digests for the same deletion."""
    good = _mask_bytes(_layer_bytes(b"w", (40,), 16, [(0, [3])]))
    assert good.endswith(b"\x00\x01\x03")
    bad = good[:-1] + b"\x83\x00"
    with pytest.raises(MaskError, match="non-canonical"):
        Mask.from_bytes(bad)


def test_constructor_refuses_malformed_objects() -> None:
    with pytest.raises(MaskError, match="non-empty"):
        LayerMask("", (4,), 2, {})
    with pytest.raises(MaskError, match="block size"):
        LayerMask("w", (4,), 0, {})
    with pytest.raises(MaskError, match="unsorted"):
        LayerMask("w", (4,), 4, {0: (2, 1)})
    with pytest.raises(MaskError, match="duplicate"):
        LayerMask("w", (4,), 4, {0: (1, 1)})
    with pytest.raises(MaskError, match="out of range"):
        LayerMask("w", (4,), 2, {2: (0,)})
    with pytest.raises(MaskError, match="no offsets"):
        LayerMask("w", (4,), 2, {1: ()})
    with pytest.raises(MaskError, match="integer"):
        LayerMask("w", (4,), 2, {0: (0.5,)})  # type: ignore[dict-item]
    with pytest.raises(MaskError, match="duplicate layer"):
        Mask((LayerMask("w", (4,), 2, {}), LayerMask("w", (4,), 2, {})))
    with pytest.raises(MaskError, match="version"):
        Mask((), version=2)
    with pytest.raises(MaskError, match="no layer"):
        _sample().dense("nope")
    with pytest.raises(MaskError, match="boolean"):
        LayerMask.from_dense("w", np.zeros(4), 2)


@st.composite
def masks(draw: st.DrawFn) -> Mask:
    n_layers = draw(st.integers(0, 4))
    names = draw(
        st.lists(st.text(min_size=1, max_size=12), min_size=n_layers, max_size=n_layers, unique=True)
    )
    layers = []
    for name in names:
        shape = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
        B = draw(st.integers(1, 40))
        numel = int(np.prod(shape))
        flat = draw(st.lists(st.booleans(), min_size=numel, max_size=numel))
        layers.append(LayerMask.from_dense(name, np.array(flat, dtype=bool).reshape(shape), B))
    return Mask(tuple(layers))


@settings(max_examples=200, deadline=None)
@given(masks())
def test_hypothesis_round_trip(mask: Mask) -> None:
    data = mask.to_bytes()
    back = Mask.from_bytes(data)
    assert back == mask
    assert back.to_bytes() == data
    for lm in mask.layers:
        assert np.array_equal(back.dense(lm.layer), lm.dense())
        assert Mask.from_dense({lm.layer: lm.dense()}, lm.block_size).layer(lm.layer) == lm


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes_only_raise_mask_error(data: bytes) -> None:
    try:
        mask = Mask.from_bytes(MAGIC + data)
    except MaskError:
        return
    assert mask.to_bytes() == MAGIC + data  # anything accepted is canonical


@settings(max_examples=500, deadline=None)
@given(masks(), st.data())
def test_fuzz_mutated_valid_bytes(mask: Mask, data: st.DataObject) -> None:
    raw = bytearray(mask.to_bytes())
    if not raw:
        return
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = data.draw(st.integers(0, 255))
    try:
        back = Mask.from_bytes(bytes(raw))
    except MaskError:
        return
    assert back.to_bytes() == bytes(raw)
