"""Canonical, domain-separated Ed25519 statements: deletion requests, receipts, tree heads, enrollments.

Everything the provider, the edge client and the auditor hold each other to is one of these. Three
rules keep a signature from meaning more than its signer intended:

* **Domain separation.** The signed bytes are ``b"zkunlearn-statement\\x00" + domain + b"\\x00" + JSON``,
  and a verifier states which domain it expects, so a receipt signature can never be replayed as a
  deletion request or an RPC authentication (same key, different meaning).
* **One encoding per payload.** The JSON is canonical (sorted keys, no whitespace, UTF-8, integers
  only) and a verifier re-encodes what it parsed and refuses the statement unless the bytes match
  exactly. Otherwise two parties could sign "the same" payload as different bytes, or a signed blob
  could carry duplicate keys or float spellings that different parsers read differently. Floats are
  refused outright: their text form is not unique, and nothing we sign needs them (bytes travel as
  hex, quantities as integers).
* **Key binding.** The payload names the signing key (``key_id``) and carries ``"version": 1``, so a
  statement is tied to one key and one schema, and a verifier holding another key says so plainly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from zkunlearn.proofs.transparency import EMPTY_ROOT

from zkunlearn.errors import MalformedError

__all__ = [
    "DOMAIN_DELETION_REQUEST",
    "DOMAIN_DELIVERY",
    "DOMAIN_ENROLLMENT",
    "DOMAIN_OPERATOR_AUTH",
    "DOMAIN_RECEIPT",
    "DOMAIN_REENROLLMENT",
    "DOMAIN_RPC_AUTH",
    "DOMAIN_TREE_HEAD",
    "KEY_ID_HEX_LENGTH",
    "MAX_INT",
    "MAX_STATEMENT_BYTES",
    "STATEMENT_PREFIX",
    "STATEMENT_VERSION",
    "SignedStatement",
    "StatementError",
    "StatementSigner",
    "StatementVerifier",
    "TreeHead",
    "canonical_json",
    "check_tree_head",
    "key_id_for",
    "now_ms",
    "parse_canonical_json",
    "require_hex",
    "same_json",
    "tree_head_payload",
]

DOMAIN_DELETION_REQUEST = "zkunlearn/v1/deletion-request"
DOMAIN_DELIVERY = "zkunlearn/v1/delivery"
"""A request's position in its client's delivery stream (the cursor), signed when it is delivered."""
DOMAIN_RECEIPT = "zkunlearn/v1/receipt"
DOMAIN_TREE_HEAD = "zkunlearn/v1/tree-head"
DOMAIN_ENROLLMENT = "zkunlearn/v1/enrollment"
DOMAIN_RPC_AUTH = "zkunlearn/v1/rpc-auth"
# A log leaf recording a client's re-enrollment (its commitments rotated), signed by the provider.
DOMAIN_REENROLLMENT = "zkunlearn/v1/re-enrollment"
DOMAIN_OPERATOR_AUTH = "zkunlearn/v1/operator-auth"

STATEMENT_PREFIX = b"zkunlearn-statement\x00"
STATEMENT_VERSION = 1
# I-JSON (RFC 7493) safe integers: every JSON parser, JavaScript's included, reads these exactly.
MAX_INT = 2**53 - 1
# A bound on what a verifier parses before it knows who signed; masks travel by hash, not inline.
MAX_STATEMENT_BYTES = 8 * 1024 * 1024
MAX_DEPTH = 32
KEY_ID_HEX_LENGTH = 32
SIGNATURE_SIZE = 64
KEY_SIZE = 32

_DOMAIN_RE = re.compile(r"zkunlearn/v[0-9]+/[a-z0-9][a-z0-9-]*")
_HEX_RE = re.compile(r"[0-9a-f]*")


class StatementError(MalformedError):
    """A statement, payload, key or signature was refused; the message says which and why."""


# --------------------------------------------------------------------------------------------------
# Canonical JSON


def _normalize(value: object, where: str, depth: int) -> object:
    """Validate one JSON value and return it as plain dict/list/scalars (what json.dumps understands)."""
    if depth > MAX_DEPTH:
        raise StatementError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not -MAX_INT <= value <= MAX_INT:
            raise StatementError(f"{where}: integer {value} is outside ±(2**53 - 1); encode it as a string")
        return int(value)  # an int subclass (IntEnum) could print differently
    if isinstance(value, float):
        raise StatementError(f"{where}: floats are not canonical; use integers or strings")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise StatementError(f"{where}: string is not valid Unicode (lone surrogate)") from exc
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        raise StatementError(f"{where}: bytes must be passed as a hex string")
    if isinstance(value, list | tuple):
        return [_normalize(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)]
    if isinstance(value, Mapping):
        out: dict[str, object] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise StatementError(f"{where}: object key {key!r} is not a string")
            _normalize(key, f"{where} key {key!r}", depth + 1)
            out[str(key)] = _normalize(item, f"{where}.{key}", depth + 1)
        return out
    raise StatementError(f"{where}: {type(value).__name__} is not a JSON type (str/int/bool/None/list/dict)")


def now_ms() -> int:
    """Wall-clock Unix time in milliseconds: the unit of every timestamp a statement carries."""
    return time.time_ns() // 1_000_000


def canonical_json(payload: Mapping[str, object]) -> bytes:
    """The one byte string a payload signs as: sorted keys, no whitespace, UTF-8, no floats.

    Keys sort by Unicode code point. Non-ASCII text is written as UTF-8, not ``\\u`` escapes, so the
    encoding is unique; control characters, quotes and backslashes use JSON's mandatory escapes.
    """
    if not isinstance(payload, Mapping):
        raise StatementError(f"payload must be a JSON object (mapping), got {type(payload).__name__}")
    plain = _normalize(payload, "payload", 0)
    text = json.dumps(plain, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8")


def _refuse_float(text: str) -> object:
    raise StatementError(f"floats are not canonical: {text}")


def _refuse_constant(text: str) -> object:
    raise StatementError(f"non-standard JSON constant {text}")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise StatementError(f"duplicate JSON key {key!r}")
        out[key] = value
    return out


def parse_canonical_json(data: bytes) -> dict[str, Any]:
    """Parse bytes that must be exactly :func:`canonical_json` of a JSON object; anything else is refused."""
    if len(data) > MAX_STATEMENT_BYTES:
        raise StatementError(f"payload is {len(data)} bytes, above the {MAX_STATEMENT_BYTES}-byte limit")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StatementError(f"payload is not valid UTF-8: {exc}") from exc
    try:
        parsed = json.loads(
            text, parse_float=_refuse_float, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys
        )
    except StatementError:
        raise
    except (ValueError, RecursionError) as exc:
        raise StatementError(f"payload is not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise StatementError(f"payload must be a JSON object, got {type(parsed).__name__}")
    if canonical_json(parsed) != data:
        raise StatementError("payload JSON is not in canonical form (key order, whitespace or escapes)")
    return parsed


def require_hex(payload: Mapping[str, Any], field: str, length: int | None = None) -> bytes:
    """Read a bytes field sent as lowercase hex; uppercase is refused (it would give two spellings)."""
    value = payload.get(field)
    if not isinstance(value, str):
        raise StatementError(f"field {field!r} must be a hex string, got {type(value).__name__}")
    if len(value) % 2 or not _HEX_RE.fullmatch(value):
        raise StatementError(f"field {field!r} is not lowercase hex of whole bytes")
    raw = bytes.fromhex(value)
    if length is not None and len(raw) != length:
        raise StatementError(f"field {field!r} must be {length} bytes, got {len(raw)}")
    return raw


# --------------------------------------------------------------------------------------------------
# Statements


def _check_domain(domain: object) -> bytes:
    if not isinstance(domain, str) or not _DOMAIN_RE.fullmatch(domain):
        raise StatementError(f"domain {domain!r} is not of the form 'zkunlearn/v<N>/<lowercase-name>'")
    return domain.encode("ascii")


def enrollment_proofs_digest(proofs: Sequence[bytes]) -> str:
    """What the client's signed enrollment statement names (``enrollment_proofs_sha256``): SHA-256 over
    a domain tag and each proof prefixed by its 8-byte big-endian length."""
    h = hashlib.sha256(b"zkunlearn/enrollment-proofs/v1")
    for proof in proofs:
        h.update(len(proof).to_bytes(8, "big") + proof)
    return h.hexdigest()


def key_id_for(public_key: bytes) -> str:
    """Hex of the first 16 bytes of SHA-256 over the raw 32-byte Ed25519 public key."""
    return hashlib.sha256(public_key).digest()[: KEY_ID_HEX_LENGTH // 2].hex()


def _split_wire(canonical: bytes) -> tuple[str, bytes]:
    if not isinstance(canonical, bytes):
        raise StatementError(f"statement bytes must be bytes, got {type(canonical).__name__}")
    if len(canonical) > MAX_STATEMENT_BYTES:
        raise StatementError(
            f"statement is {len(canonical)} bytes, above the {MAX_STATEMENT_BYTES}-byte limit"
        )
    if not canonical.startswith(STATEMENT_PREFIX):
        raise StatementError("statement does not start with the zkunlearn-statement tag")
    rest = canonical[len(STATEMENT_PREFIX) :]
    cut = rest.find(b"\x00")
    if cut < 0:
        raise StatementError("statement has no terminator after its domain (truncated?)")
    try:
        domain = rest[:cut].decode("ascii")
    except UnicodeDecodeError as exc:
        raise StatementError("statement domain is not ASCII") from exc
    _check_domain(domain)
    return domain, rest[cut + 1 :]


@dataclass(frozen=True)
class SignedStatement:
    """A payload with the exact bytes that were signed; ``canonical`` is the authority, not ``payload``."""

    domain: str
    payload: dict[str, Any]
    canonical: bytes
    signature: bytes
    key_id: str

    @classmethod
    def from_wire(cls, canonical: bytes, signature: bytes) -> SignedStatement:
        """Rebuild from the signed bytes and signature; parses strictly but does NOT check the signature."""
        if not isinstance(signature, bytes) or len(signature) != SIGNATURE_SIZE:
            got = len(signature) if isinstance(signature, bytes) else type(signature).__name__
            raise StatementError(f"signature must be {SIGNATURE_SIZE} bytes, got {got}")
        domain, body = _split_wire(canonical)
        payload = parse_canonical_json(body)
        key_id = payload.get("key_id")
        if not isinstance(key_id, str) or len(key_id) != KEY_ID_HEX_LENGTH or not _HEX_RE.fullmatch(key_id):
            raise StatementError(f"payload key_id must be {KEY_ID_HEX_LENGTH} lowercase hex characters")
        return cls(domain=domain, payload=payload, canonical=canonical, signature=signature, key_id=key_id)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for bundles and audit files (bytes as hex)."""
        return {
            "domain": self.domain,
            "payload": self.payload,
            "canonical": self.canonical.hex(),
            "signature": self.signature.hex(),
            "key_id": self.key_id,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SignedStatement:
        """Inverse of :meth:`to_dict`; the readable fields must agree with the signed bytes."""
        try:
            canonical = bytes.fromhex(data["canonical"])
            signature = bytes.fromhex(data["signature"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StatementError(f"statement dict needs hex 'canonical' and 'signature': {exc}") from exc
        statement = cls.from_wire(canonical, signature)
        for field in ("domain", "payload", "key_id"):
            if field in data and not same_json(data[field], getattr(statement, field)):
                raise StatementError(f"statement dict field {field!r} disagrees with the signed bytes")
        return statement


class StatementSigner:
    """An Ed25519 signing key that only ever signs domain-tagged canonical statements."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self._public = private_key.public_key().public_bytes_raw()
        self.key_id = key_id_for(self._public)

    @classmethod
    def generate(cls) -> StatementSigner:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> StatementSigner:
        if not isinstance(raw, bytes) or len(raw) != KEY_SIZE:
            raise StatementError(f"Ed25519 private key must be {KEY_SIZE} raw bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    def private_bytes(self) -> bytes:
        return self._key.private_bytes_raw()

    def public_bytes(self) -> bytes:
        return self._public

    def verifier(self) -> StatementVerifier:
        return StatementVerifier.from_public_bytes(self._public)

    def sign(self, domain: str, payload: Mapping[str, object]) -> SignedStatement:
        """Sign ``payload`` under ``domain``; adds ``version`` and this key's ``key_id`` to the payload."""
        tag = _check_domain(domain)
        if not isinstance(payload, Mapping):
            raise StatementError(f"payload must be a mapping, got {type(payload).__name__}")
        full: dict[str, object] = dict(payload)
        version = full.setdefault("version", STATEMENT_VERSION)
        if type(version) is not int or version != STATEMENT_VERSION:
            raise StatementError(f"payload version must be {STATEMENT_VERSION}, got {full['version']!r}")
        if full.setdefault("key_id", self.key_id) != self.key_id:
            raise StatementError(f"payload names key {full['key_id']!r} but this signer is {self.key_id}")
        body = canonical_json(full)
        canonical = STATEMENT_PREFIX + tag + b"\x00" + body
        if len(canonical) > MAX_STATEMENT_BYTES:
            raise StatementError(f"statement would be {len(canonical)} bytes, above {MAX_STATEMENT_BYTES}")
        return SignedStatement(
            domain=domain,
            payload=json.loads(body),  # a private copy, so later edits to `payload` cannot drift from it
            canonical=canonical,
            signature=self._key.sign(canonical),
            key_id=self.key_id,
        )

    def save(
        self, path: str | os.PathLike[str], *, password: bytes | None = None, overwrite: bool = False
    ) -> None:
        """Write PKCS#8 PEM readable by the owner only (0600); refuses to clobber a key unless told to."""
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
        )
        pem = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError as exc:
            raise StatementError(
                f"key file {os.fspath(path)} exists; pass overwrite=True to replace it"
            ) from exc
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)  # O_CREAT's mode does not apply to an existing file
            handle.write(pem)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, password: bytes | None = None) -> StatementSigner:
        """Read a key written by :meth:`save`; refuses files others can read, as ssh does."""
        file = Path(path)
        mode = file.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise StatementError(
                f"key file {file} is accessible by group/others (mode {mode & 0o777:o}); chmod 600"
            )
        try:
            key = serialization.load_pem_private_key(file.read_bytes(), password=password)
        except (ValueError, TypeError) as exc:
            raise StatementError(f"cannot read private key from {file}: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise StatementError(f"key in {file} is {type(key).__name__}, not Ed25519")
        return cls(key)


#: The Ed25519 points of small order (1, 2, 4, 8) as libsodium lists them, with the sign bit cleared.
#: A public key among them verifies the signature ``R = identity, S = 0`` for *every* message in every
#: domain (RFC 8032 verification does not exclude them, and neither does OpenSSL), so anyone could
#: sign as such a key: it is refused, also in its non-canonical spellings ``p``, ``p + 1``.
_SMALL_ORDER_KEYS = tuple(
    bytes.fromhex(h)
    for h in (
        "00" * 32,  # 0: order 4
        "01" + "00" * 31,  # 1: the identity
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
        "ec" + "ff" * 30 + "7f",  # p - 1: order 2
        "ed" + "ff" * 30 + "7f",  # p (= 0)
        "ee" + "ff" * 30 + "7f",  # p + 1 (= 1)
    )
)


def _has_small_order(raw: bytes) -> bool:
    unsigned = raw[:31] + bytes([raw[31] & 0x7F])
    return unsigned in _SMALL_ORDER_KEYS


def same_json(shown: Any, signed: Any) -> bool:
    """Equal as JSON, not as Python values: ``True == 1 == 1.0`` in Python, but ``true``, ``1`` and
    ``1.0`` are different statements, and a readable field must show exactly what was signed."""
    try:
        return bool(canonical_json({"v": shown}) == canonical_json({"v": signed}))
    except StatementError:  # not even canonical JSON (a float, NaN, ...): cannot be what was signed
        return False


class StatementVerifier:
    """Checks statements against one Ed25519 public key and one expected domain per call."""

    def __init__(self, public_key: Ed25519PublicKey) -> None:
        raw = public_key.public_bytes_raw()
        if _has_small_order(raw):
            raise StatementError(
                "Ed25519 public key is a point of small order: one signature would verify any statement"
            )
        self._key = public_key
        self._public = raw
        self.key_id = key_id_for(self._public)

    @classmethod
    def from_public_bytes(cls, raw: bytes) -> StatementVerifier:
        if not isinstance(raw, bytes) or len(raw) != KEY_SIZE:
            raise StatementError(f"Ed25519 public key must be {KEY_SIZE} raw bytes")
        try:
            return cls(Ed25519PublicKey.from_public_bytes(raw))
        except ValueError as exc:
            raise StatementError(f"not an Ed25519 public key: {exc}") from exc

    def public_bytes(self) -> bytes:
        return self._public

    def verify(
        self, statement: SignedStatement | tuple[bytes, bytes], expected_domain: str
    ) -> dict[str, Any]:
        """Return the payload if ``statement`` is a valid ``expected_domain`` statement by this key.

        Only the signed bytes count: a :class:`SignedStatement` whose readable fields disagree with
        its ``canonical`` bytes is refused rather than trusted.
        """
        expected_tag = _check_domain(expected_domain)
        if isinstance(statement, SignedStatement):
            canonical, signature = statement.canonical, statement.signature
        elif isinstance(statement, tuple) and len(statement) == 2:
            canonical, signature = statement
        else:
            raise StatementError("statement must be a SignedStatement or a (canonical, signature) pair")
        parsed = SignedStatement.from_wire(canonical, signature)
        if parsed.domain.encode("ascii") != expected_tag:
            raise StatementError(f"statement is a {parsed.domain!r}, expected {expected_domain!r}")
        if parsed.key_id != self.key_id:
            raise StatementError(f"statement names key {parsed.key_id}, this verifier holds {self.key_id}")
        try:
            self._key.verify(signature, canonical)
        except InvalidSignature as exc:
            raise StatementError(f"signature does not verify under key {self.key_id}") from exc
        version = parsed.payload.get("version")
        if type(version) is not int or version != STATEMENT_VERSION:
            raise StatementError(f"payload version must be {STATEMENT_VERSION}, got {version!r}")
        if isinstance(statement, SignedStatement) and (
            statement.domain != parsed.domain
            or not same_json(statement.payload, parsed.payload)
            or statement.key_id != parsed.key_id
        ):
            raise StatementError("statement fields disagree with its signed bytes")
        payload: dict[str, Any] = json.loads(canonical_json(parsed.payload))
        return payload


# --------------------------------------------------------------------------------------------------
# Signed tree heads


@dataclass(frozen=True)
class TreeHead:
    """A verified log head: the size is signed with the root because a root alone does not fix a size."""

    size: int
    root: bytes
    timestamp_ms: int
    key_id: str


_TREE_HEAD_FIELDS = frozenset({"version", "key_id", "tree_size", "root_hash", "timestamp_ms"})


def _check_nonnegative(value: object, what: str) -> int:
    if type(value) is not int or value < 0 or value > MAX_INT:
        raise StatementError(f"{what} must be an integer in [0, 2**53 - 1], got {value!r}")
    return value


def tree_head_payload(size: int, root: bytes, timestamp_ms: int) -> dict[str, object]:
    """Payload for a ``DOMAIN_TREE_HEAD`` statement."""
    size = _check_nonnegative(size, "tree size")
    timestamp_ms = _check_nonnegative(timestamp_ms, "timestamp_ms")
    if not isinstance(root, bytes) or len(root) != 32:
        raise StatementError("tree head root must be 32 bytes")
    if size == 0 and root != EMPTY_ROOT:
        raise StatementError("an empty tree's root must be SHA-256 of the empty string")
    return {
        "version": STATEMENT_VERSION,
        "tree_size": size,
        "root_hash": root.hex(),
        "timestamp_ms": timestamp_ms,
    }


def check_tree_head(
    verifier: StatementVerifier, statement: SignedStatement | tuple[bytes, bytes]
) -> TreeHead:
    """Verify a signed tree head and return its typed fields; extra or missing fields are refused."""
    payload = verifier.verify(statement, DOMAIN_TREE_HEAD)
    if set(payload) != _TREE_HEAD_FIELDS:
        raise StatementError(f"tree head fields are {sorted(payload)}, expected {sorted(_TREE_HEAD_FIELDS)}")
    size = _check_nonnegative(payload["tree_size"], "tree_size")
    root = require_hex(payload, "root_hash", 32)
    if size == 0 and root != EMPTY_ROOT:
        raise StatementError("signed empty tree head has a non-empty root")
    timestamp_ms = _check_nonnegative(payload["timestamp_ms"], "timestamp_ms")
    return TreeHead(size=size, root=root, timestamp_ms=timestamp_ms, key_id=verifier.key_id)
