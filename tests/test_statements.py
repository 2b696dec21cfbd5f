"""Signed statements: round trips, and every way of bending a signature into meaning something else."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from zkunlearn.proofs.statements import (
    DOMAIN_DELETION_REQUEST,
    DOMAIN_ENROLLMENT,
    DOMAIN_RECEIPT,
    DOMAIN_RPC_AUTH,
    DOMAIN_TREE_HEAD,
    MAX_INT,
    STATEMENT_PREFIX,
    SignedStatement,
    StatementError,
    StatementSigner,
    StatementVerifier,
    canonical_json,
    check_tree_head,
    key_id_for,
    parse_canonical_json,
    require_hex,
    tree_head_payload,
)
from zkunlearn.proofs.transparency import EMPTY_ROOT, MerkleTree, leaf_hash

ALL_DOMAINS = [DOMAIN_DELETION_REQUEST, DOMAIN_RECEIPT, DOMAIN_TREE_HEAD, DOMAIN_ENROLLMENT, DOMAIN_RPC_AUTH]
PAYLOAD: dict[str, object] = {
    "request_id": "req-1",
    "mask_sha256": "ab" * 32,
    "indices": [3, 1, 2],
    "nested": {"z": None, "a": True, "ü": "ẞ"},
}


@pytest.fixture(scope="module")
def signer() -> StatementSigner:
    return StatementSigner.from_private_bytes(bytes(range(32)))


@pytest.fixture(scope="module")
def verifier(signer: StatementSigner) -> StatementVerifier:
    return StatementVerifier.from_public_bytes(signer.public_bytes())


def _raw_sign(signer: StatementSigner, data: bytes) -> bytes:
    """Sign arbitrary bytes with the signer's key: what an attacker holding a *valid* key could produce."""
    return Ed25519PrivateKey.from_private_bytes(signer.private_bytes()).sign(data)


def _wire(domain: str, body: bytes) -> bytes:
    return STATEMENT_PREFIX + domain.encode() + b"\x00" + body


def _flip(data: bytes, index: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[index] ^= 1 << bit
    return bytes(out)


# --------------------------------------------------------------------------------------------------
# Canonical JSON


def test_canonical_json_is_sorted_compact_utf8() -> None:
    assert canonical_json({"b": 1, "a": [True, None, "x"], "c": {"y": 2, "x": 1}}) == (
        b'{"a":[true,null,"x"],"b":1,"c":{"x":1,"y":2}}'
    )
    assert canonical_json({"k": 'ü\n"\\'}) == '{"k":"ü\\n\\"\\\\"}'.encode()
    assert canonical_json({"t": (1, 2)}) == b'{"t":[1,2]}'


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"x": 1.0}, "floats are not canonical"),
        ({"x": [1, 2.5]}, "floats are not canonical"),
        ({"x": float("nan")}, "floats are not canonical"),
        ({"x": b"\x00"}, "hex string"),
        ({"x": MAX_INT + 1}, "outside"),
        ({"x": -MAX_INT - 1}, "outside"),
        ({"x": {1: "a"}}, "not a string"),
        ({"x": {1, 2}}, "not a JSON type"),
        ({"x": "\ud800"}, "lone surrogate"),
    ],
)
def test_canonical_json_refuses_non_canonical_values(payload: dict[str, Any], message: str) -> None:
    with pytest.raises(StatementError, match=message):
        canonical_json(payload)


def test_canonical_json_refuses_deep_nesting_and_non_objects() -> None:
    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    with pytest.raises(StatementError, match="nested deeper"):
        canonical_json({"x": deep})
    with pytest.raises(StatementError, match="JSON object"):
        canonical_json([1, 2])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"b":1,"a":2}', "canonical"),
        (b'{"a": 2}', "canonical"),
        (b'{"a":2} ', "canonical"),
        (b'{"a":"\\u00fc"}', "canonical"),
        (b'{"a":-0}', "canonical"),
        (b'{"a":1.0}', "floats"),
        (b'{"a":1e3}', "floats"),
        (b'{"a":NaN}', "non-standard"),
        (b'{"a":1,"a":1}', "duplicate"),
        (b"[1]", "JSON object"),
        (b'{"a":', "not valid JSON"),
        (b'{"a":"\xff"}', "UTF-8"),
    ],
)
def test_parse_canonical_json_refuses(raw: bytes, message: str) -> None:
    with pytest.raises(StatementError, match=message):
        parse_canonical_json(raw)


_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-MAX_INT, max_value=MAX_INT)
    | st.text(alphabet=st.characters(codec="utf-8"), max_size=12)
)
_json_values = st.recursive(
    _json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=8), _json_values, max_size=6))
def test_canonical_json_is_a_fixed_point(payload: dict[str, Any]) -> None:
    encoded = canonical_json(payload)
    assert canonical_json(json.loads(encoded)) == encoded
    assert parse_canonical_json(encoded) == json.loads(encoded)


# --------------------------------------------------------------------------------------------------
# Keys


def test_key_id_is_truncated_sha256_of_raw_public_key(signer: StatementSigner) -> None:
    import hashlib

    assert signer.key_id == hashlib.sha256(signer.public_bytes()).digest()[:16].hex()
    assert signer.key_id == key_id_for(signer.public_bytes())
    assert len(signer.key_id) == 32
    assert StatementSigner.from_private_bytes(signer.private_bytes()).key_id == signer.key_id
    assert StatementSigner.generate().key_id != signer.key_id


def test_bad_key_material_refused() -> None:
    with pytest.raises(StatementError, match="32 raw bytes"):
        StatementSigner.from_private_bytes(b"\x00" * 31)
    with pytest.raises(StatementError, match="32 raw bytes"):
        StatementVerifier.from_public_bytes(b"\x00" * 33)


SMALL_ORDER = [
    "00" * 32,
    "01" + "00" * 31,
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "ec" + "ff" * 30 + "7f",
    "ed" + "ff" * 30 + "7f",
    "ee" + "ff" * 30 + "7f",
]


def test_small_order_public_keys_are_refused(signer: StatementSigner) -> None:
    """Attack: enroll the identity point as a key; then ``R = identity, S = 0`` signs everything."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    identity = bytes.fromhex(SMALL_ORDER[1])
    forged = identity + bytes(32)
    Ed25519PublicKey.from_public_bytes(identity).verify(forged, b"any message at all")  # the library's view
    for encoding in SMALL_ORDER:
        for sign in (0, 0x80):
            raw = bytearray(bytes.fromhex(encoding))
            raw[31] |= sign
            with pytest.raises(StatementError, match=r"small order|not an Ed25519 public key"):
                StatementVerifier.from_public_bytes(bytes(raw))
    assert StatementVerifier.from_public_bytes(signer.public_bytes()).key_id == signer.key_id


def test_save_and_load_key_owner_only(tmp_path: Path, signer: StatementSigner) -> None:
    path = tmp_path / "provider.pem"
    signer.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert StatementSigner.load(path).public_bytes() == signer.public_bytes()
    with pytest.raises(StatementError, match="exists"):
        signer.save(path)
    other = StatementSigner.generate()
    os.chmod(path, 0o644)
    other.save(path, overwrite=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert StatementSigner.load(path).key_id == other.key_id


def test_load_refuses_world_readable_or_foreign_keys(tmp_path: Path, signer: StatementSigner) -> None:
    path = tmp_path / "k.pem"
    signer.save(path)
    os.chmod(path, 0o640)
    with pytest.raises(StatementError, match="group/others"):
        StatementSigner.load(path)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ec_path = tmp_path / "ec.pem"
    ec_path.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    ec_path.chmod(0o600)
    with pytest.raises(StatementError, match="not Ed25519"):
        StatementSigner.load(ec_path)
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"not a key")
    junk.chmod(0o600)
    with pytest.raises(StatementError, match="cannot read private key"):
        StatementSigner.load(junk)


def test_password_protected_key(tmp_path: Path, signer: StatementSigner) -> None:
    path = tmp_path / "enc.pem"
    signer.save(path, password=b"correct horse")
    assert b"ENCRYPTED" in path.read_bytes()
    assert StatementSigner.load(path, password=b"correct horse").key_id == signer.key_id
    with pytest.raises(StatementError, match="cannot read"):
        StatementSigner.load(path, password=b"wrong")


# --------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("domain", ALL_DOMAINS)
def test_sign_verify_round_trip(signer: StatementSigner, verifier: StatementVerifier, domain: str) -> None:
    statement = signer.sign(domain, PAYLOAD)
    assert statement.domain == domain
    assert statement.key_id == signer.key_id
    assert statement.canonical == _wire(
        domain, canonical_json({**PAYLOAD, "version": 1, "key_id": signer.key_id})
    )
    payload = verifier.verify(statement, domain)
    assert payload == {**PAYLOAD, "indices": [3, 1, 2], "version": 1, "key_id": signer.key_id}
    assert verifier.verify((statement.canonical, statement.signature), domain) == payload
    wire = SignedStatement.from_wire(statement.canonical, statement.signature)
    assert wire == statement
    bundle = json.loads(json.dumps(statement.to_dict()))
    assert SignedStatement.from_dict(bundle) == statement
    assert verifier.verify(SignedStatement.from_dict(bundle), domain) == payload


def test_returned_payload_is_a_private_copy(signer: StatementSigner, verifier: StatementVerifier) -> None:
    source: dict[str, object] = {"items": [1, 2]}
    statement = signer.sign(DOMAIN_RECEIPT, source)
    source["items"] = [9]
    got = verifier.verify(statement, DOMAIN_RECEIPT)
    got["items"].append(3)
    assert statement.payload["items"] == [1, 2]
    assert verifier.verify(statement, DOMAIN_RECEIPT)["items"] == [1, 2]


def test_sign_refuses_conflicting_version_key_or_domain(signer: StatementSigner) -> None:
    with pytest.raises(StatementError, match="version must be 1"):
        signer.sign(DOMAIN_RECEIPT, {"version": 2})
    with pytest.raises(StatementError, match="version must be 1"):
        signer.sign(DOMAIN_RECEIPT, {"version": True})
    with pytest.raises(StatementError, match="names key"):
        signer.sign(DOMAIN_RECEIPT, {"key_id": "00" * 16})
    for bad in ("receipt", "zkunlearn/v1/", "zkunlearn/v1/Receipt", "zkunlearn/v1/a\x00b"):
        with pytest.raises(StatementError, match="domain"):
            signer.sign(bad, {})
    with pytest.raises(StatementError, match="floats"):
        signer.sign(DOMAIN_RECEIPT, {"score": 0.5})


# --------------------------------------------------------------------------------------------------
# Attacks: each must be refused with StatementError


def test_flipped_signature_bits_refused(signer: StatementSigner, verifier: StatementVerifier) -> None:
    statement = signer.sign(DOMAIN_RECEIPT, PAYLOAD)
    for index in range(64):
        for bit in (0, 7):
            forged = _flip(statement.signature, index, bit)
            with pytest.raises(StatementError, match="signature does not verify"):
                verifier.verify((statement.canonical, forged), DOMAIN_RECEIPT)


def test_flipped_payload_bytes_refused(signer: StatementSigner, verifier: StatementVerifier) -> None:
    statement = signer.sign(DOMAIN_RECEIPT, PAYLOAD)
    for index in range(len(statement.canonical)):
        forged = _flip(statement.canonical, index)
        with pytest.raises(StatementError):
            verifier.verify((forged, statement.signature), DOMAIN_RECEIPT)


@pytest.mark.parametrize("signed_as", ALL_DOMAINS)
def test_statement_never_verifies_under_another_domain(
    signer: StatementSigner, verifier: StatementVerifier, signed_as: str
) -> None:
    statement = signer.sign(signed_as, PAYLOAD)
    for expected in ALL_DOMAINS:
        if expected != signed_as:
            with pytest.raises(StatementError, match="expected"):
                verifier.verify(statement, expected)


def test_domain_relabelled_in_wire_bytes_refused(
    signer: StatementSigner, verifier: StatementVerifier
) -> None:
    """Rewriting the domain tag keeps the payload but breaks the signature: a receipt is not a request."""
    receipt = signer.sign(DOMAIN_RECEIPT, PAYLOAD)
    body = receipt.canonical.split(b"\x00", 2)[2]
    relabelled = _wire(DOMAIN_DELETION_REQUEST, body)
    with pytest.raises(StatementError, match="signature does not verify"):
        verifier.verify((relabelled, receipt.signature), DOMAIN_DELETION_REQUEST)


def test_wrong_key_refused(signer: StatementSigner) -> None:
    statement = signer.sign(DOMAIN_DELETION_REQUEST, PAYLOAD)
    other = StatementSigner.generate()
    with pytest.raises(StatementError, match="this verifier holds"):
        other.verifier().verify(statement, DOMAIN_DELETION_REQUEST)
    # An attacker who rewrites key_id to match their own verifier still lacks the signature.
    body = parse_canonical_json(statement.canonical.split(b"\x00", 2)[2])
    body["key_id"] = other.key_id
    forged = _wire(DOMAIN_DELETION_REQUEST, canonical_json(body))
    with pytest.raises(StatementError, match="signature does not verify"):
        other.verifier().verify((forged, statement.signature), DOMAIN_DELETION_REQUEST)


@pytest.mark.parametrize(
    "body",
    [
        '{"a": 1, "key_id": "%s", "version": 1}',  # whitespace
        '{"version":1,"key_id":"%s","a":1}',  # key order
        '{"a":1,"key_id":"%s","version":1}\n',  # trailing newline
        '{"a":"\\u0031","key_id":"%s","version":1}',  # needless escape
        '{"a":1,"a":1,"key_id":"%s","version":1}',  # duplicate key
    ],
)
def test_validly_signed_non_canonical_json_refused(
    signer: StatementSigner, verifier: StatementVerifier, body: str
) -> None:
    raw = _wire(DOMAIN_RECEIPT, (body % signer.key_id).encode())
    with pytest.raises(StatementError, match=r"canonical|duplicate"):
        verifier.verify((raw, _raw_sign(signer, raw)), DOMAIN_RECEIPT)


def test_validly_signed_float_refused(signer: StatementSigner, verifier: StatementVerifier) -> None:
    raw = _wire(DOMAIN_RECEIPT, b'{"a":1.5,"key_id":"%s","version":1}' % signer.key_id.encode())
    with pytest.raises(StatementError, match="floats"):
        verifier.verify((raw, _raw_sign(signer, raw)), DOMAIN_RECEIPT)


@pytest.mark.parametrize("version", [None, 2, 0, True, "1"])
def test_validly_signed_without_version_1_refused(
    signer: StatementSigner, verifier: StatementVerifier, version: object
) -> None:
    payload: dict[str, object] = {"a": 1, "key_id": signer.key_id}
    if version is not None:
        payload["version"] = version
    raw = _wire(DOMAIN_RECEIPT, canonical_json(payload))
    with pytest.raises(StatementError, match="version must be 1"):
        verifier.verify((raw, _raw_sign(signer, raw)), DOMAIN_RECEIPT)


def test_truncated_bytes_refused(signer: StatementSigner, verifier: StatementVerifier) -> None:
    statement = signer.sign(DOMAIN_RECEIPT, PAYLOAD)
    for cut in range(len(statement.canonical)):
        with pytest.raises(StatementError):
            verifier.verify((statement.canonical[:cut], statement.signature), DOMAIN_RECEIPT)
    for cut in (0, 32, 63):
        with pytest.raises(StatementError, match="64 bytes"):
            verifier.verify((statement.canonical, statement.signature[:cut]), DOMAIN_RECEIPT)
    with pytest.raises(StatementError, match="64 bytes"):
        verifier.verify((statement.canonical, statement.signature + b"\x00"), DOMAIN_RECEIPT)


def test_validly_signed_but_malformed_envelope_refused(
    signer: StatementSigner, verifier: StatementVerifier
) -> None:
    body = canonical_json({"key_id": signer.key_id, "version": 1})
    for raw, message in [
        (b"other-tag\x00" + DOMAIN_RECEIPT.encode() + b"\x00" + body, "tag"),
        (STATEMENT_PREFIX + DOMAIN_RECEIPT.encode(), "terminator"),
        (_wire("zkunlearn/v1/RECEIPT", body), "domain"),
        (_wire(DOMAIN_RECEIPT, canonical_json({"version": 1})), "key_id"),
        (_wire(DOMAIN_RECEIPT, canonical_json({"version": 1, "key_id": signer.key_id.upper()})), "key_id"),
    ]:
        with pytest.raises(StatementError, match=message):
            verifier.verify((raw, _raw_sign(signer, raw)), DOMAIN_RECEIPT)


def test_statement_object_with_edited_fields_refused(
    signer: StatementSigner, verifier: StatementVerifier
) -> None:
    """The readable fields of a SignedStatement are never trusted over its signed bytes."""
    statement = signer.sign(DOMAIN_RECEIPT, {"verdict": "rejected"})
    doctored = SignedStatement(
        domain=statement.domain,
        payload={**statement.payload, "verdict": "accepted"},
        canonical=statement.canonical,
        signature=statement.signature,
        key_id=statement.key_id,
    )
    with pytest.raises(StatementError, match="disagree"):
        verifier.verify(doctored, DOMAIN_RECEIPT)
    bundle = statement.to_dict()
    bundle["payload"] = {**bundle["payload"], "verdict": "accepted"}
    with pytest.raises(StatementError, match="disagrees"):
        SignedStatement.from_dict(bundle)
    with pytest.raises(StatementError, match="hex"):
        SignedStatement.from_dict({"canonical": "zz", "signature": "00"})
    # Python calls True == 1 == 1.0; as JSON they are three different statements.
    typed = signer.sign(DOMAIN_RECEIPT, {"accepted": True, "size": 1})
    for shown in ({"accepted": 1}, {"size": True}, {"size": 1.0}):
        relabelled = SignedStatement(
            domain=typed.domain,
            payload={**typed.payload, **shown},
            canonical=typed.canonical,
            signature=typed.signature,
            key_id=typed.key_id,
        )
        with pytest.raises(StatementError, match="disagree"):
            verifier.verify(relabelled, DOMAIN_RECEIPT)
        with pytest.raises(StatementError, match="disagrees"):
            SignedStatement.from_dict({**typed.to_dict(), "payload": {**typed.payload, **shown}})
    assert verifier.verify(typed, DOMAIN_RECEIPT)["accepted"] is True


def test_verify_refuses_unknown_shapes(verifier: StatementVerifier) -> None:
    with pytest.raises(StatementError, match="pair"):
        verifier.verify(b"raw", DOMAIN_RECEIPT)  # type: ignore[arg-type]
    with pytest.raises(StatementError, match="domain"):
        verifier.verify((b"", b""), "not-a-domain")


# --------------------------------------------------------------------------------------------------
# Tree heads and hex fields


def test_tree_head_round_trip(signer: StatementSigner, verifier: StatementVerifier) -> None:
    tree = MerkleTree([leaf_hash(bytes([i])) for i in range(5)])
    statement = signer.sign(DOMAIN_TREE_HEAD, tree_head_payload(5, tree.root(), 1_700_000_000_000))
    head = check_tree_head(verifier, statement)
    assert (head.size, head.root, head.timestamp_ms, head.key_id) == (
        5,
        tree.root(),
        1_700_000_000_000,
        signer.key_id,
    )
    empty = signer.sign(DOMAIN_TREE_HEAD, tree_head_payload(0, EMPTY_ROOT, 1))
    assert check_tree_head(verifier, empty).root == EMPTY_ROOT


def test_tree_head_refusals(signer: StatementSigner, verifier: StatementVerifier) -> None:
    root = leaf_hash(b"x")
    with pytest.raises(StatementError, match="32 bytes"):
        tree_head_payload(1, root[:31], 0)
    with pytest.raises(StatementError, match="empty tree"):
        tree_head_payload(0, root, 0)
    with pytest.raises(StatementError, match="tree size"):
        tree_head_payload(-1, root, 0)
    with pytest.raises(StatementError, match="timestamp"):
        tree_head_payload(1, root, True)
    # A receipt is not a tree head, even with tree-head-shaped fields.
    receipt = signer.sign(DOMAIN_RECEIPT, tree_head_payload(1, root, 0))
    with pytest.raises(StatementError, match="expected"):
        check_tree_head(verifier, receipt)
    extra = signer.sign(DOMAIN_TREE_HEAD, {**tree_head_payload(1, root, 0), "note": "x"})
    with pytest.raises(StatementError, match="fields"):
        check_tree_head(verifier, extra)
    upper = signer.sign(DOMAIN_TREE_HEAD, {**tree_head_payload(1, root, 0), "root_hash": root.hex().upper()})
    with pytest.raises(StatementError, match="lowercase hex"):
        check_tree_head(verifier, upper)
    sneaky = signer.sign(DOMAIN_TREE_HEAD, {**tree_head_payload(1, root, 0), "tree_size": 0})
    with pytest.raises(StatementError, match="non-empty root"):
        check_tree_head(verifier, sneaky)
    negative = signer.sign(DOMAIN_TREE_HEAD, {**tree_head_payload(1, root, 0), "tree_size": -1})
    with pytest.raises(StatementError, match="tree_size"):
        check_tree_head(verifier, negative)


def test_require_hex() -> None:
    assert require_hex({"h": "00ff"}, "h", 2) == b"\x00\xff"
    for value, message in [
        ("0", "whole bytes"),
        ("GG", "lowercase hex"),
        ("AB", "lowercase hex"),
        (5, "hex string"),
    ]:
        with pytest.raises(StatementError, match=message):
            require_hex({"h": value}, "h")
    with pytest.raises(StatementError, match="must be 3 bytes"):
        require_hex({"h": "0000"}, "h", 3)
    with pytest.raises(StatementError, match="hex string"):
        require_hex({}, "h")
