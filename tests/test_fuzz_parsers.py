"""Bounded fuzzing of the parsers that turn untrusted bytes into objects on the provider and auditor side.

Targets: the proof parsers (``layout.parse_proof`` on uploaded proof bytes, ``Proof.from_json`` and
``verifier.parse_submission`` on proof objects), the signed-statement parsers the provider runs on
every client's canonical bytes (``parse_canonical_json``, ``StatementVerifier.verify``), the mask
decoder, and the offline auditor on a real export bundle with one file mutated. Inputs are random
bytes, random JSON (hypothesis recursive strategies, huge and non-finite numbers, wrong types), deep
nesting, and mutations of a valid instance. Each parser may only raise its documented error class,
with a message; the auditor may never raise at all. Counts are printed (``-s``) and asserted;
``ZKU_FUZZ_SCALE`` multiplies the bounds and ``ZKU_FUZZ_REPORT`` collects them (bench/fuzz_report.py).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zkunlearn.bench.fuzz_report import FuzzTally, examples
from zkunlearn.circuits.mask import Mask, MaskError
from zkunlearn.proofs.audit import audit_bundle
from zkunlearn.proofs.backend import PROOF_MAGIC, Proof, ProofFormatError
from zkunlearn.proofs.fixedpoint import FIELD_MODULUS, int_to_felt
from zkunlearn.proofs.layout import DeletionError, encode_proof, parse_proof
from zkunlearn.proofs.statements import (
    DOMAIN_RPC_AUTH,
    StatementError,
    StatementSigner,
    StatementVerifier,
    parse_canonical_json,
)
from zkunlearn.proofs.verifier import parse_submission

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.test_audit import Provider, fake_checker  # noqa: E402
from tests.test_audit import provider as provider  # noqa: E402  (the module-scoped export fixture)

TALLY = FuzzTally()
# The same examples on every run (CI reproducibility); the database would replay old failures only.
FUZZ = settings(
    deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck), print_blob=True
)

# A structurally valid proof as the client sends it: transcript bytes and one column of felts.
VALID_PROOF = Proof(
    transcript=bytes(range(256)) * 2, instances=(tuple(int_to_felt(v) for v in (0, 17534, -3, 2**200)),)
)
VALID_PROOF_BYTES = encode_proof(VALID_PROOF)

# -- strategies ------------------------------------------------------------------------------------

EDGE_INTS = st.sampled_from([0, -1, 1, 2**31, -(2**31), 2**63 - 1, 2**64, -(2**64), 10**300, -(10**300)])
TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "\x00", "\ufffd", "\u202e", "00", "x" * 10_000]),
    st.text(alphabet="0123456789abcdefABCDEF", min_size=0, max_size=70),
)
JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), EDGE_INTS, st.floats(allow_nan=True, allow_infinity=True), TEXT
)
JSON_VALUES: st.SearchStrategy[Any] = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(TEXT, inner, max_size=5)),
    max_leaves=25,
)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


def _deep(depth: int, opener: str) -> bytes:
    closer = {"[": "]", '{"a":': "}", '{"transcript":"00","instances":': "}"}[opener]
    return (opener * depth + "0" + closer * depth).encode()


DEEP = st.builds(
    _deep,
    st.one_of(st.integers(1, 50), st.integers(900, 1100), st.integers(10_000, 200_000)),
    st.sampled_from(["[", '{"a":', '{"transcript":"00","instances":']),
)
HUGE_NUMBERS = st.builds(
    lambda digits, where: (
        b'{"transcript":"00","instances":[["' + b"1" * digits + b'"]]}'
        if where
        else b'{"transcript":"00","instances":[[' + b"9" * digits + b"]]}"
    ),
    st.sampled_from([20, 64, 65, 4300, 4301, 100_000]),
    st.booleans(),
)


def _mutations(seed: bytes) -> st.SearchStrategy[bytes]:
    flip = st.tuples(st.integers(0, len(seed) - 1), st.integers(1, 255)).map(
        lambda m: seed[: m[0]] + bytes([seed[m[0]] ^ m[1]]) + seed[m[0] + 1 :]
    )
    truncate = st.integers(0, len(seed) - 1).map(lambda n: seed[:n])
    insert = st.tuples(st.integers(0, len(seed)), st.binary(min_size=1, max_size=8)).map(
        lambda m: seed[: m[0]] + m[1] + seed[m[0] :]
    )
    splice = st.tuples(st.integers(0, len(seed)), JSON_VALUES).map(
        lambda m: seed[: m[0]] + _dumps(m[1]) + seed[m[0] :]
    )
    return st.one_of(flip, truncate, insert, splice)


def _replace_field(obj: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Structure-aware: one field replaced by any JSON value, dropped, or joined by another key."""
    keys = sorted(obj)
    replaced = st.tuples(st.sampled_from(keys), JSON_VALUES).map(lambda m: {**obj, m[0]: m[1]})
    dropped = st.sampled_from(keys).map(lambda k: {key: v for key, v in obj.items() if key != k})
    added = st.tuples(st.one_of(TEXT, st.sampled_from(["vk", "settings", "pk"])), JSON_VALUES).map(
        lambda m: {**obj, m[0]: m[1]}
    )
    return st.one_of(replaced, dropped, added)


def _instance_mutations(obj: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Deeper: one felt of the instances replaced by any JSON value, or a row by a non-list."""
    rows: list[list[Any]] = obj["instances"]
    felt = st.tuples(st.integers(0, len(rows[0]) - 1), JSON_VALUES).map(
        lambda m: {**obj, "instances": [[*rows[0][: m[0]], m[1], *rows[0][m[0] + 1 :]]]}
    )
    row = JSON_VALUES.map(lambda v: {**obj, "instances": [v]})
    return st.one_of(felt, row)


PROOF_OBJECTS: st.SearchStrategy[Any] = st.one_of(
    JSON_VALUES,
    st.fixed_dictionaries({"transcript": JSON_VALUES, "instances": JSON_VALUES}),
    _replace_field(VALID_PROOF.to_json()),
    _instance_mutations(VALID_PROOF.to_json()),
)
PROOF_BYTES = st.one_of(
    st.binary(max_size=600),
    JSON_VALUES.map(_dumps),
    PROOF_OBJECTS.map(_dumps),
    DEEP,
    HUGE_NUMBERS,
    _mutations(VALID_PROOF_BYTES),
)

# -- harness ---------------------------------------------------------------------------------------


def _fuzz(
    target: str,
    strategy: st.SearchStrategy[Any],
    check: Callable[[Any], str],
    base_examples: int,
) -> None:
    """Run ``check`` on ``base_examples * ZKU_FUZZ_SCALE`` inputs; it returns the outcome's label."""
    bound = examples(base_examples)
    start = time.monotonic()

    @settings(FUZZ, max_examples=bound)
    @given(strategy)
    def run(value: Any) -> None:
        TALLY.hit(target, check(value))

    try:
        run()
    finally:
        TALLY.timed(target, time.monotonic() - start)
    # Hypothesis may stop early only when the strategy is exhausted; ours never are.
    assert TALLY.inputs[target] >= bound, f"{target}: {TALLY.inputs[target]} < {bound} inputs"


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    print("\n" + TALLY.summary())
    TALLY.flush()


def _refused(exc: BaseException, cls: type[BaseException]) -> str:
    assert isinstance(exc, cls), f"{type(exc).__name__} escaped: {exc}"
    assert str(exc).strip(), f"{cls.__name__} without a message"
    return f"refused:{cls.__name__}"


def _accepted_proof(proof: Proof) -> str:
    assert isinstance(proof.transcript, bytes)
    for row in proof.instances:
        for felt in row:
            assert isinstance(felt, str)
            assert len(felt) == 64
            int(felt, 16)
    assert Proof.from_json(proof.to_json()) == proof
    return "accepted"


# -- proofs ----------------------------------------------------------------------------------------


def test_fuzz_parse_proof_bytes() -> None:
    """Uploaded proof bytes: only DeletionError (the verifier turns it into a MALFORMED rejection)."""

    def check(raw: bytes) -> str:
        try:
            proof = parse_proof(raw, 3)
        except DeletionError as exc:
            assert str(exc).startswith("proof 3 is malformed"), str(exc)  # noqa: PT017
            return _refused(exc, DeletionError)
        assert encode_proof(proof) == raw  # an accepted proof has exactly one encoding
        return _accepted_proof(proof)

    _fuzz("proofs.layout.parse_proof", PROOF_BYTES, check, 400)
    assert TALLY.statuses["proofs.layout.parse_proof"]["accepted"] > 0  # the mutations reach a pass


def test_fuzz_proof_from_json_and_parse_submission() -> None:
    def check(obj: Any) -> str:
        try:
            proof = Proof.from_json(obj)
        except ProofFormatError as exc:
            outcome = _refused(exc, ProofFormatError)
        else:
            outcome = _accepted_proof(proof)
        if isinstance(obj, dict):  # parse_submission's input is an already-decoded JSON object
            try:
                parse_submission(obj)
            except ProofFormatError as exc:
                _refused(exc, ProofFormatError)
        return outcome

    _fuzz("proofs.backend.Proof.from_json", PROOF_OBJECTS, check, 300)


def _binary(transcript: bytes, *columns: list[bytes], tail: bytes = b"") -> bytes:
    out = PROOF_MAGIC + len(transcript).to_bytes(4, "big") + transcript + len(columns).to_bytes(2, "big")
    for column in columns:
        out += len(column).to_bytes(4, "big") + b"".join(column)
    return out + tail


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b'{"transcript":"00","instances":[]}', "wrong magic"),  # the JSON form is not a wire proof
        (b"", "wrong magic"),
        (PROOF_MAGIC, "truncated"),
        (_binary(b""), "transcript length 0"),
        (PROOF_MAGIC + (2**32 - 1).to_bytes(4, "big"), "outside"),  # refused before any allocation
        (PROOF_MAGIC + (8).to_bytes(4, "big") + b"abc", "truncated"),
        (_binary(b"t")[:-1] + b"\xff", "truncated"),  # claims 65535 columns of nothing
        (_binary(b"t", [])[:-4] + (2**32 - 1).to_bytes(4, "big"), "truncated"),  # 2**32-1 felts claimed
        (_binary(b"t", [FIELD_MODULUS.to_bytes(32, "little")]), "not reduced"),  # p itself, i.e. 0 again
        (_binary(b"t", [b"\xff" * 32]), "not reduced"),
        (_binary(b"t", [bytes(32)], tail=b"\x00"), "trailing"),
    ],
)
def test_proof_parser_regressions(raw: bytes, needle: str) -> None:
    """Malformed wire proofs: each is refused with one error naming what is wrong."""
    with pytest.raises(DeletionError, match="proof 0 is malformed") as err:
        parse_proof(raw, 0)
    assert needle in str(err.value)


@FUZZ
@given(
    transcript=st.binary(min_size=1, max_size=300),
    columns=st.lists(st.lists(st.integers(0, FIELD_MODULUS - 1), max_size=6), max_size=3),
)
def test_binary_proofs_round_trip_with_one_encoding(transcript: bytes, columns: list[list[int]]) -> None:
    proof = Proof(transcript, tuple(tuple(int_to_felt(v) for v in col) for col in columns))
    raw = encode_proof(proof)
    assert parse_proof(raw, 0) == proof
    assert encode_proof(parse_proof(raw, 0)) == raw
    assert len(raw) == 4 + 4 + len(transcript) + 2 + sum(4 + 32 * len(col) for col in columns)


def test_valid_proof_still_parses() -> None:
    assert parse_proof(VALID_PROOF_BYTES, 0) == VALID_PROOF
    upper = VALID_PROOF.to_json()
    upper["transcript"] = upper["transcript"].upper()
    assert Proof.from_json(upper).transcript == VALID_PROOF.transcript


# -- signed statements (every RPC's canonical bytes go through these) -----------------------------

SIGNER = StatementSigner.generate()
STATEMENT = SIGNER.sign(DOMAIN_RPC_AUTH, {"client_id": "dev-1", "rpc": "PollRequests", "nonce": "ab" * 16})
VERIFIER = StatementVerifier.from_public_bytes(SIGNER.public_bytes())


def test_fuzz_signed_statement_parsers() -> None:
    canonical_inputs = st.one_of(
        st.binary(max_size=300),
        JSON_VALUES.map(_dumps),
        DEEP,
        _mutations(STATEMENT.canonical),
    )
    pairs = st.one_of(
        st.tuples(canonical_inputs, st.just(STATEMENT.signature)),
        st.tuples(
            st.just(STATEMENT.canonical), st.one_of(st.binary(max_size=80), _mutations(STATEMENT.signature))
        ),
    )

    def check(pair: tuple[bytes, bytes]) -> str:
        canonical, signature = pair
        body = canonical.split(b"\x00", 2)[-1]
        try:
            parse_canonical_json(body)
        except StatementError as exc:
            _refused(exc, StatementError)
        try:
            payload = VERIFIER.verify((canonical, signature), DOMAIN_RPC_AUTH)
        except StatementError as exc:
            return _refused(exc, StatementError)
        assert (canonical, signature) == (STATEMENT.canonical, STATEMENT.signature), "forgery verified"
        assert payload["client_id"] == "dev-1"
        return "accepted"

    _fuzz("proofs.statements.verify", pairs, check, 300)


# -- mask ------------------------------------------------------------------------------------------


def _mask_seed() -> bytes:
    dense = np.zeros((6, 10), dtype=bool)
    dense[0, 1] = dense[3, 7] = dense[5, 9] = True
    return Mask.from_dense({"fc1": dense, "fc2": ~dense}, block_size=16).to_bytes()


def test_fuzz_mask_from_bytes() -> None:
    seed = _mask_seed()

    def check(raw: bytes) -> str:
        try:
            mask = Mask.from_bytes(raw)
        except MaskError as exc:
            return _refused(exc, MaskError)
        assert mask.to_bytes() == raw, "accepted a non-canonical encoding"
        return "accepted"

    _fuzz("circuits.mask.Mask.from_bytes", st.one_of(st.binary(max_size=300), _mutations(seed)), check, 300)


# -- the auditor on a real export bundle -----------------------------------------------------------


def _bundle_files(bundle: Path) -> list[str]:
    return sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*.json"))


def _ignorable_edit(rel: str, old: Any, content: bytes) -> str:
    """Why an audit may pass after this edit ('' if it may not): the circuit files are only read by
    the proof checker (a stand-in here), and keys the auditor does not know are not evidence."""
    if rel.startswith("circuits/"):
        return "circuit-file"
    try:
        new = json.loads(content)
    except (ValueError, RecursionError):
        return ""
    if new == old:
        return "same-json"
    if rel == "manifest.json" and isinstance(new, dict):
        # With a pinned key the manifest is unsigned metadata: only its key fields are checked. Its
        # srs description and creation time are reported as notes, not verified (see the report).
        pinned = {k: old[k] for k in ("format", "key_id", "provider_public_key")}
        if {k: new.get(k) for k in pinned} == pinned:
            return "unsigned-manifest-field"

    if rel == "tree_heads.json" and isinstance(new, list) and len(new) == len(old):
        # Each head carries readable copies (domain, key_id, payload) of its signed bytes; the audit
        # reads only the signed bytes, so editing a copy changes nothing it relies on.
        signed = [{k: h.get(k) for k in ("canonical", "signature")} for h in old]
        if [
            {k: h.get(k) for k in ("canonical", "signature")} if isinstance(h, dict) else h for h in new
        ] == signed:
            return "readable-copy-of-signed-head"

    def known(value: Any, like: Any) -> Any:
        if isinstance(value, dict) and isinstance(like, dict):
            return {k: known(v, like.get(k)) for k, v in value.items() if k in like}
        if isinstance(value, list) and isinstance(like, list) and len(value) == len(like):
            return [known(v, w) for v, w in zip(value, like, strict=True)]
        return value

    return "unknown-key-added" if known(new, old) == old else ""


def test_fuzz_audit_bundle(provider: Provider, tmp_path: Path) -> None:
    """One JSON file of a genuine bundle replaced by noise, random JSON, a mutation or a field swap:
    the audit never raises, and a change it cannot explain never audits OK."""
    files = _bundle_files(provider.bundle)
    assert {"log.json", "manifest.json", "tree_heads.json"} <= set(files)
    originals = {rel: (provider.bundle / rel).read_bytes() for rel in files}
    parsed = {rel: json.loads(raw) for rel, raw in originals.items()}

    def field_swap(rel: str) -> st.SearchStrategy[bytes]:
        value = parsed[rel]
        if isinstance(value, list) and value and isinstance(value[0], dict):
            return st.integers(0, len(value) - 1).flatmap(
                lambda i: _replace_field(value[i]).map(lambda new: _dumps([*value[:i], new, *value[i + 1 :]]))
            )
        if isinstance(value, dict) and value:
            return _replace_field(value).map(_dumps)
        return JSON_VALUES.map(_dumps)

    edits = st.sampled_from(files).flatmap(
        lambda rel: st.tuples(
            st.just(rel),
            st.one_of(
                st.binary(max_size=200),
                JSON_VALUES.map(_dumps),
                DEEP,
                _mutations(originals[rel]),
                field_swap(rel),
            ),
        )
    )
    work = tmp_path / "bundle"
    shutil.copytree(provider.bundle, work)

    def check(edit: tuple[str, bytes]) -> str:
        rel, content = edit
        (work / rel).write_bytes(content)
        try:
            report = audit_bundle(
                work, provider_public_key=provider.signer.public_bytes(), proof_checker=fake_checker
            )
        finally:
            (work / rel).write_bytes(originals[rel])
        assert all(f["reason"].strip() for f in report.failures)
        if not report.ok:
            return "fail"
        explained = _ignorable_edit(rel, parsed[rel], content)
        assert explained, f"audit OK after an unexplained edit of {rel}: {content[:300]!r}"
        return f"ok:{explained}"

    _fuzz("proofs.audit.audit_bundle", edits, check, 100)
    statuses = TALLY.statuses["proofs.audit.audit_bundle"]
    assert statuses["fail"] > TALLY.inputs["proofs.audit.audit_bundle"] // 2, statuses  # most are caught
