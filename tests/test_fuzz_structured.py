"""Structure-aware fuzzing of every RPC: well-formed messages with hostile field values.

Byte-level fuzzing (test_fuzz_rpc.py) mostly stops in the protobuf parser. Here every request message
is generated from its protobuf descriptor (so a new RPC or field is covered without editing this
file): strings empty, huge, unicode, control characters and known ids; bytes of odd lengths;
integers at 0, -1, 2^31, 2^63-1 and the type's maximum; unknown enum values; repeated fields with
0..N entries; nested messages and oneofs. A second, "near-valid" mode starts from a correctly signed
and authenticated call of an enrolled client and changes one field: either after signing (the
signature or the field cross-checks must refuse it) or before re-signing, so the hostile value is
covered by a valid signature and reaches the service's own validation and the database.

Every answer must be OK or a clean client-error status (never INTERNAL or UNKNOWN), every call must
finish within its deadline (a unary call that runs into the deadline is a hang), the server must
answer a genuine deletion round afterwards, and the state must stay consistent: nothing left
pending, and an export of the whole log passes the offline audit. Counts are printed (``-s``) and
asserted; ``ZKU_FUZZ_SCALE`` multiplies them and ``ZKU_FUZZ_REPORT`` collects them.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zkunlearn.bench.fuzz_report import FuzzTally, examples
from zkunlearn.circuits.mask import Mask
from zkunlearn.client.sdk import Commitment, EdgeClient
from zkunlearn.client.store import ClientStore
from zkunlearn.client.transport import ChannelConfig
from zkunlearn.proofs.audit import audit_bundle
from zkunlearn.proofs.backend import point_from_tag
from zkunlearn.proofs.statements import DOMAIN_ENROLLMENT, DOMAIN_RPC_AUTH, StatementError, StatementSigner
from zkunlearn.provider.export import export_bundle
from zkunlearn.provider.server import ProviderConfig, ProviderServer, build_server
from zkunlearn.v1 import provider_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.fakes import ALL_KINDS_POLICY, FakeProver, FakeVerifier, loopback_settings  # noqa: E402
from tests.test_audit import fake_checker  # noqa: E402

pytestmark = pytest.mark.grpc
SERVICE = pb.DESCRIPTOR.services_by_name["Provider"]
CLEAN = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
}
CALL_DEADLINE_S = 10.0
STREAM_DEADLINE_S = 0.5  # a server stream with nothing (more) to send ends here: that is not a hang
CLIENT_ID = "dev-1"
BEFORE = [
    Commitment("theta", 0, point_from_tag(b"theta")),
    Commitment("gradient_factor", 0, point_from_tag(b"g")),
]
FUZZ = settings(
    deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck), print_blob=True
)
TALLY = FuzzTally()

# -- a hypothesis strategy for any message, from its descriptor ----------------------------------

# Ids that exist on the server, so generated messages also get past "unknown client/request".
KNOWN_IDS: list[str] = [CLIENT_ID, "m1", "fc1", "m/group_obs", "compiled"]
HOSTILE_STRINGS = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "",
            " ",
            "\x00",
            "a\x00b",
            "\n\r\t",
            "\u202e\u200b",
            "é" * 64,
            "😀" * 33,
            "../../etc/passwd",
            "x" * 129,
            "x" * 5000,
            "y" * 100_000,
            "%s%n{0}",
            "'; DROP TABLE clients; --",
            "ab" * 32,
            "AB" * 32,
            "0" * 64,
        ]
    ),
    st.deferred(lambda: st.sampled_from(KNOWN_IDS)),
)
HOSTILE_BYTES = st.one_of(
    st.binary(max_size=80),
    st.sampled_from(
        [b"", b"\x00" * 31, b"\x00" * 32, b"\xff" * 33, b"\x01" * 64, b"\x00" * 65, b"z" * 100_000]
    ),
)


def _int_strategy(field: FieldDescriptor) -> st.SearchStrategy[int]:
    signed = field.type in (
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_SFIXED32,
        FieldDescriptor.TYPE_SFIXED64,
    )
    bits = 64 if field.cpp_type in (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64) else 32
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    # 2**53 - 1 is the largest integer a signed canonical statement carries; one more is refused there.
    edges = (0, 1, -1, 2, 2**31 - 1, 2**31, 2**32 - 1, 2**53 - 1, 2**53 + 1, 2**63 - 1, 2**64 - 1, lo, hi)
    return st.one_of(st.sampled_from([v for v in edges if lo <= v <= hi]), st.integers(lo, hi))


def _enum_strategy(field: FieldDescriptor) -> st.SearchStrategy[int]:
    known = [v.number for v in field.enum_type.values]
    # proto3 enums are open: unknown numbers arrive as plain ints and must be refused cleanly.
    return st.one_of(st.sampled_from(known), st.sampled_from([-1, 3, 99, 2**31 - 1, -(2**31)]))


def _scalar(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_strategy(field.message_type, depth + 1)
    if field.type == FieldDescriptor.TYPE_STRING:
        return HOSTILE_STRINGS
    if field.type == FieldDescriptor.TYPE_BYTES:
        return HOSTILE_BYTES
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_ENUM:
        return _enum_strategy(field)
    if field.cpp_type in (FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE):
        return st.floats(
            allow_nan=True, allow_infinity=True, width=32 if field.type == field.TYPE_FLOAT else 64
        )
    return _int_strategy(field)


def field_strategy(field: FieldDescriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    """Values for one field: a list for a repeated field (0..4 entries, or 300 small ones), else one value."""
    one = _scalar(field, depth)
    if not field.is_repeated:
        return one
    if field.type == FieldDescriptor.TYPE_STRING:
        small: st.SearchStrategy[Any] = st.text(max_size=8)
    elif field.type == FieldDescriptor.TYPE_BYTES:
        small = st.binary(max_size=8)
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        small = st.just(getattr(pb, field.message_type.name)())
    else:
        small = one
    return st.one_of(st.lists(one, max_size=4), st.lists(small, min_size=300, max_size=300))


def _set(msg: Message, field: FieldDescriptor, value: Any) -> None:
    if field.is_repeated:
        target = getattr(msg, field.name)
        del target[:]
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            for item in value:
                target.add().CopyFrom(item)
        else:
            target.extend(value)
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        getattr(msg, field.name).CopyFrom(value)
    else:
        setattr(msg, field.name, value)


def message_strategy(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Any message of this type: each field set or left unset, at most one member of each oneof."""
    cls = getattr(pb, descriptor.name)
    if depth > 3:
        return st.just(cls())
    oneof_members = {f.name for o in descriptor.oneofs for f in o.fields}
    plain = [f for f in descriptor.fields if f.name not in oneof_members]
    parts: list[st.SearchStrategy[tuple[FieldDescriptor, Any] | None]] = [
        st.one_of(st.none(), field_strategy(f, depth).map(lambda v, f=f: (f, v))) for f in plain
    ]
    for oneof in descriptor.oneofs:
        choices = [field_strategy(f, depth).map(lambda v, f=f: (f, v)) for f in oneof.fields]
        parts.append(st.one_of(st.none(), *choices))

    def build(values: tuple[tuple[FieldDescriptor, Any] | None, ...]) -> Message:
        msg = cls()
        for item in values:
            if item is not None:
                _set(msg, *item)
        return msg

    return st.tuples(*parts).map(build)


# -- the server and an enrolled client -----------------------------------------------------------


@dataclass
class Setup:
    server: ProviderServer
    client: EdgeClient
    signer: StatementSigner  # the client's key, to sign near-valid calls
    channel: grpc.Channel
    pending_request: str  # a request issued to the client and not yet answered
    tmp: Path


def _mask() -> Mask:
    dense = np.zeros((4, 8), dtype=bool)
    dense[0, 1] = dense[2, 5] = True
    return Mask.from_dense({"fc1": dense}, block_size=16)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("fuzz-structured")
    artifact = tmp / "model.compiled"
    artifact.write_bytes(b"compiled circuit")
    config = ProviderConfig.load(
        None,
        loopback_settings(
            tmp,
            submit_wait_s=2.0,
            **ALL_KINDS_POLICY,
            **{
                "limits.max_message_bytes": 2 * 1024 * 1024,
                "limits.max_proof_bytes": 1024 * 1024,
                # One client hammered by the fuzzer: the challenge limits have their own test.
                "limits.challenge_rate_per_subject": 0.0,
                "limits.challenge_rate_per_peer": 0.0,
                "artifacts": {"m/group_obs": {"compiled": str(artifact)}},
            },
        ),
    )
    server = build_server(config, verifier=FakeVerifier())
    client = EdgeClient(
        ChannelConfig(f"127.0.0.1:{server.port}", call_timeout_s=15.0, retry_attempts=5, retry_max_s=0.5),
        ClientStore(tmp / "client.db"),
        FakeProver(),
    )
    client.enroll(CLIENT_ID, "m1", ["fc1"], 1, BEFORE)
    # One genuine round first, so the log holds a receipt the fuzzing must not disturb.
    server.service.create_request(CLIENT_ID, _mask(), request_id="genuine-1")
    assert [o.status for o in client.poll()] == ["accepted"]
    pending = server.service.create_request(CLIENT_ID, _mask(), request_id="pending-1").request_id
    KNOWN_IDS.extend(["genuine-1", pending])
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield Setup(server, client, client._signer(), channel, pending, tmp)
    print("\n" + TALLY.summary())
    TALLY.flush()
    channel.close()
    client.close()
    server.stop(0)


# -- calling -------------------------------------------------------------------------------------


def _invoke(channel: grpc.Channel, method_name: str, request: Message | list[Message]) -> None:
    method = SERVICE.methods_by_name[method_name]
    path = f"/{SERVICE.full_name}/{method.name}"
    out = getattr(pb, method.output_type.name)
    ser, de = (lambda m: m.SerializeToString()), out.FromString
    if method.client_streaming:
        items = request if isinstance(request, list) else [request]
        channel.stream_unary(path, request_serializer=ser, response_deserializer=de)(
            iter(items), timeout=CALL_DEADLINE_S
        )
    elif method.server_streaming:
        for _ in channel.unary_stream(path, request_serializer=ser, response_deserializer=de)(
            request, timeout=STREAM_DEADLINE_S
        ):
            pass
    else:
        channel.unary_unary(path, request_serializer=ser, response_deserializer=de)(
            request, timeout=CALL_DEADLINE_S
        )


def _check_call(
    target: str, channel: grpc.Channel, method_name: str, request: Message | list[Message]
) -> None:
    """One call: a clean status within the deadline, counted under ``target``."""
    start = time.monotonic()
    try:
        _invoke(channel, method_name, request)
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as error:
        code, details = error.code(), str(error.details())
    elapsed = time.monotonic() - start
    # A status the servicer did not write (its messages start with the RPC name) came from grpc itself,
    # e.g. an oversized message or trailer: still clean, but counted apart so it stays visible.
    own = code is grpc.StatusCode.OK or details.startswith(f"{method_name}:")
    TALLY.hit(target, code.name if own else f"{code.name}:grpc", elapsed)
    method = SERVICE.methods_by_name[method_name]
    if code is grpc.StatusCode.DEADLINE_EXCEEDED and method.server_streaming:
        return  # the stream stayed open for new requests until our deadline: by design
    shown = str(request)[:600]
    assert code in CLEAN, f"{method_name}: {code.name} {details!r} for\n{shown}"
    assert elapsed < CALL_DEADLINE_S, f"{method_name}: took {elapsed:.1f} s"
    if code is not grpc.StatusCode.OK:
        assert details.strip(), f"{method_name}: {code.name} without a message"


def _fuzz(
    target: str,
    strategy: st.SearchStrategy[Any],
    check: Callable[[Any], None],
    base: int,
    scaled: bool = True,
) -> None:
    bound = examples(base) if scaled else base
    start = time.monotonic()

    @settings(FUZZ, max_examples=bound)
    @given(strategy)
    def run(value: Any) -> None:
        check(value)

    try:
        run()
    finally:
        TALLY.timed(target, time.monotonic() - start)
    assert TALLY.inputs[target] >= bound, f"{target}: {TALLY.inputs[target]} < {bound} inputs"


# -- mode 1: messages from the descriptor --------------------------------------------------------


def _request_strategy(method_name: str) -> st.SearchStrategy[Any]:
    method = SERVICE.methods_by_name[method_name]
    one = message_strategy(method.input_type)
    return st.lists(one, min_size=1, max_size=3) if method.client_streaming else one


@pytest.mark.parametrize("method_name", [m.name for m in SERVICE.methods])
def test_generated_messages_get_clean_statuses(setup: Setup, method_name: str) -> None:
    target = f"rpc.generated.{method_name}"
    has_fields = bool(SERVICE.methods_by_name[method_name].input_type.fields)
    _fuzz(
        target,
        _request_strategy(method_name),
        lambda request: _check_call(target, setup.channel, method_name, request),
        # A request without fields has exactly one value: hypothesis stops after it.
        40 if has_fields else 1,
        scaled=has_fields,
    )


# -- mode 2: near-valid calls, one field changed -------------------------------------------------


def _fields_of(descriptor: Descriptor, prefix: str = "") -> list[tuple[str, FieldDescriptor]]:
    """Every field path one level into nested messages (``header.auth.nonce`` included)."""
    out: list[tuple[str, FieldDescriptor]] = []
    for field in descriptor.fields:
        path = prefix + field.name
        out.append((path, field))
        nested = field.type == FieldDescriptor.TYPE_MESSAGE and not field.is_repeated
        if nested and prefix.count(".") < 2:
            out.extend(_fields_of(field.message_type, path + "."))
    return out


def _assign(msg: Message, path: str, field: FieldDescriptor, value: Any) -> None:
    *parents, _ = path.split(".")
    for name in parents:
        msg = getattr(msg, name)
    _set(msg, field, value)


def _auth(setup: Setup, rpc: str, fields: dict[str, Any]) -> pb.ClientAuth:
    return setup.client.auth(rpc, fields)


ENROLL_SIGNERS: dict[int, StatementSigner] = {}


def _enroll(setup: Setup, msg: pb.EnrollRequest | None, n: int) -> pb.EnrollRequest:
    """A fresh client's correctly signed enrollment (``msg`` given: re-sign its current values)."""
    signer = ENROLL_SIGNERS.setdefault(n, StatementSigner.generate())
    if msg is None:
        msg = pb.EnrollRequest(
            version=1,
            client_id=f"fuzz-{n}",
            public_key=signer.public_bytes(),
            model_id="m1",
            layers=["fc1"],
            update_kind=pb.UPDATE_KIND_GROUP_OBS,
            commitments=[c.to_pb() for c in BEFORE],
        )
    payload = {
        "client_id": msg.client_id,
        "public_key": bytes(msg.public_key).hex(),
        "model_id": msg.model_id,
        "layers": list(msg.layers),
        "update_kind": int(msg.update_kind),
        "commitments": [
            {"name": c.name, "block": c.block, "point_hex": c.point_hex} for c in msg.commitments
        ],
    }
    statement = signer.sign(DOMAIN_ENROLLMENT, payload)
    msg.proof_of_possession, msg.canonical = statement.signature, statement.canonical
    return msg


def _submission(setup: Setup, header: pb.ProofHeader | None, blob: bytes) -> pb.ProofHeader:
    after = [Commitment("theta_after", i, hashlib.sha256(bytes([i])).hexdigest()) for i in range(2)]
    if header is None:
        header = pb.ProofHeader(
            version=1,
            request_id=setup.pending_request,
            client_id=CLIENT_ID,
            update_kind=pb.UPDATE_KIND_GROUP_OBS,
            after_commitments=[c.to_pb() for c in after],
            proof_count=2,
            total_bytes=len(blob),
            sha256=hashlib.sha256(blob).hexdigest(),
            proof_sizes=[len(blob) // 2, len(blob) - len(blob) // 2],
        )
    fields = {
        "request_id": header.request_id,
        "update_kind": int(header.update_kind),
        "sha256": header.sha256,
        "total_bytes": int(header.total_bytes),
        "proof_sizes": [int(s) for s in header.proof_sizes],
        "after_commitments": [
            {"name": c.name, "block": c.block, "point_hex": c.point_hex} for c in header.after_commitments
        ],
    }
    header.auth.CopyFrom(_auth(setup, "SubmitProof", fields))
    return header


def _reenroll(setup: Setup, msg: pb.ReenrollRequest | None, n: int) -> pb.ReenrollRequest:
    """A re-enrollment of a fresh client ``fuzz-re-<n>`` (enrolled here first) to other commitments,
    authorized by its key (``msg`` given: re-sign its current values)."""
    first = _enroll(setup, None, -1 - n)
    first.client_id = f"fuzz-re-{n}"
    first = _enroll(setup, first, -1 - n)
    if msg is None:
        _invoke(setup.channel, "Enroll", first)
        msg = pb.ReenrollRequest(enrollment=first)
        msg.enrollment.commitments[0].point_hex = point_from_tag(f"fresh-{n}".encode())
    _enroll(setup, msg.enrollment, -1 - n)
    challenge = pb.ChallengeResponse.FromString(
        setup.channel.unary_unary(f"/{SERVICE.full_name}/Challenge")(
            pb.ChallengeRequest(client_id=first.client_id).SerializeToString(), timeout=CALL_DEADLINE_S
        )
    )
    fields = {
        "client_id": first.client_id,
        "rpc": "Reenroll",
        "nonce": bytes(challenge.nonce).hex(),
        "previous_enrollment_sha256": hashlib.sha256(first.canonical).hexdigest(),
        "enrollment_sha256": hashlib.sha256(msg.enrollment.canonical).hexdigest(),
    }
    statement = ENROLL_SIGNERS[-1 - n].sign(DOMAIN_RPC_AUTH, fields)
    msg.auth.CopyFrom(
        pb.ClientAuth(
            client_id=first.client_id,
            nonce=challenge.nonce,
            signature=statement.signature,
            canonical=statement.canonical,
        )
    )
    return msg


BLOB = bytes(range(256)) * 2


def _valid(setup: Setup, method_name: str, n: int, resign_from: Any = None) -> Any:
    """The correctly signed request for ``method_name``, or ``resign_from`` signed as it now stands."""
    r = resign_from
    if method_name == "Enroll":
        return _enroll(setup, r, n)
    if method_name == "Reenroll":
        return _reenroll(setup, r, n)
    if method_name in ("PollRequests", "WatchRequests"):
        r = r or getattr(pb, SERVICE.methods_by_name[method_name].input_type.name)(after_cursor=0)
        fields = {"after_cursor": int(r.after_cursor)}
        if method_name == "PollRequests":
            r.max_items = r.max_items if resign_from is not None else 10
            fields["max_items"] = int(r.max_items)
        r.auth.CopyFrom(_auth(setup, method_name, fields))
        return r
    if method_name == "SubmitProof":
        chunk = r or pb.ProofChunk(header=_submission(setup, None, BLOB))
        if chunk.WhichOneof("part") == "header":
            _submission(setup, chunk.header, BLOB)
        return chunk
    defaults: dict[str, Message] = {
        "GetInfo": pb.GetInfoRequest(),
        "Challenge": pb.ChallengeRequest(client_id=CLIENT_ID),
        "GetArtifact": pb.GetArtifactRequest(circuit_id="m/group_obs", artifact="compiled"),
        "GetReceipt": pb.GetReceiptRequest(request_id="genuine-1", client_id=CLIENT_ID),
        "GetTreeHead": pb.GetTreeHeadRequest(),
        "GetInclusionProof": pb.InclusionProofRequest(leaf_index=0, tree_size=1),
        "GetConsistencyProof": pb.ConsistencyProofRequest(first_size=1, second_size=1),
    }
    return r or defaults[method_name]


SIGNATURE_FIELDS = {"auth", "canonical", "proof_of_possession", "signature", "nonce"}
NEAR_VALID_METHODS = [m.name for m in SERVICE.methods if m.input_type.fields]


def _near_valid_strategy(method_name: str) -> st.SearchStrategy[tuple[str, FieldDescriptor, Any, bool]]:
    method = SERVICE.methods_by_name[method_name]
    paths = _fields_of(method.input_type)
    return st.sampled_from(paths).flatmap(
        lambda pf: st.tuples(st.just(pf[0]), st.just(pf[1]), field_strategy(pf[1]), st.booleans())
    )


def test_valid_calls_are_accepted(setup: Setup) -> None:
    """The baseline the near-valid mode perturbs: every built call really is accepted unchanged."""
    for n, method_name in enumerate(NEAR_VALID_METHODS):
        if method_name == "SubmitProof":
            continue  # a valid upload would settle the pending request the fuzzing targets
        request = _valid(setup, method_name, 10_000 + n)
        code: grpc.StatusCode
        try:
            _invoke(setup.channel, method_name, request)
            code = grpc.StatusCode.OK
        except grpc.RpcError as error:
            code = error.code()
        expected = grpc.StatusCode.DEADLINE_EXCEEDED if method_name == "WatchRequests" else grpc.StatusCode.OK
        assert code is expected, (method_name, code)


@pytest.mark.parametrize("method_name", NEAR_VALID_METHODS)
def test_near_valid_calls_with_one_field_changed(setup: Setup, method_name: str) -> None:
    target = f"rpc.near_valid.{method_name}"
    counter = iter(range(10**9))

    def check(change: tuple[str, FieldDescriptor, Any, bool]) -> None:
        path, field, value, resign = change
        n = next(counter)
        request = _valid(setup, method_name, n)
        if method_name == "SubmitProof" and path == "data":
            # A valid header, then hostile payload bytes (size and digest checks must refuse them).
            _check_call(target, setup.channel, method_name, [request, pb.ProofChunk(data=value)])
            return
        _assign(request, path, field, value)
        if resign and path.rsplit(".", 1)[-1] not in SIGNATURE_FIELDS and "auth." not in f".{path}":
            # Not signable as canonical JSON (e.g. an int above 2**53): then it goes out as tampered.
            with contextlib.suppress(StatementError):
                request = _valid(setup, method_name, n, resign_from=request)
        if method_name == "SubmitProof":
            _check_call(target, setup.channel, method_name, [request, pb.ProofChunk(data=BLOB)])
        else:
            _check_call(target, setup.channel, method_name, request)

    _fuzz(target, _near_valid_strategy(method_name), check, 40)


# -- afterwards: still serving, state consistent -------------------------------------------------


def test_zz_server_healthy_and_state_consistent_after_fuzzing(setup: Setup) -> None:
    """Runs last in this module: a genuine round still works and the whole log audits OK."""
    assert sum(TALLY.inputs.values()) > 0, "run with the fuzz tests of this module"
    service = setup.server.service
    rid = service.create_request(CLIENT_ID, _mask(), request_id="genuine-after").request_id
    outcomes = setup.client.poll_all(from_cursor=0)
    assert (rid, "accepted") in [(o.request_id, o.status) for o in outcomes]
    assert setup.client.verify_log() >= 2
    deadline = time.monotonic() + 30
    while setup.server.state.pending_submissions() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert setup.server.state.pending_submissions() == [], "submissions left half-processed"
    circuits = setup.tmp / "circuits"
    circuits.mkdir(exist_ok=True)
    (circuits / "settings.json").write_text('{"run_args": {}}')
    bundle = export_bundle(
        setup.server.state,
        service.ledger,
        service.signer.public_bytes(),
        setup.tmp / "bundle",
        circuits_dir=circuits,
    )
    report = audit_bundle(
        bundle, provider_public_key=service.signer.public_bytes(), proof_checker=fake_checker
    )
    assert report.ok, report.failures
    assert service.ledger.size >= 2
    print(f"\naudited log after fuzzing: {service.ledger.size} leaves, {report.items_checked} checks OK")
