"""docs/wire.md cannot drift from the code: its worked examples are recomputed here, byte for byte.

Each ``example:`` block of the document is parsed and checked against the code that produces or
checks those bytes (statement signing, canonical JSON, the mask encoding, the RFC 9162 tree). The
provider's own servicer is then driven with the documented statements: it must sign exactly the
documented deletion request, delivery and receipt, and accept exactly the documented signed fields.
The document must also name every signing domain and every RPC of both services in its error codes.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import zkunlearn.provider.requests as requests_module
import zkunlearn.provider.service as service_module
from zkunlearn.circuits.mask import LayerMask, Mask
from zkunlearn.proofs import statements, transparency
from zkunlearn.proofs.backend import PROOF_MAGIC, Proof, is_commitment_point
from zkunlearn.proofs.layout import encode_proof, parse_proof
from zkunlearn.proofs.statements import (
    STATEMENT_PREFIX,
    StatementError,
    StatementSigner,
    StatementVerifier,
    canonical_json,
    check_tree_head,
    enrollment_proofs_digest,
    key_id_for,
    parse_canonical_json,
)
from zkunlearn.provider.models import UPDATE_KINDS
from zkunlearn.provider.operator import DeletionOrder, OperatorService
from zkunlearn.provider.operator_servicer import OperatorServicer
from zkunlearn.provider.planning import ForgetSelection, MaskOptions
from zkunlearn.provider.service import ProviderService, ServiceConfig, VerificationJob, VerificationResult
from zkunlearn.provider.servicer import ProviderServicer
from zkunlearn.provider.state import InMemoryState
from zkunlearn.v1 import operator_pb2 as opb
from zkunlearn.v1 import provider_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DOC = ROOT / "docs" / "wire.md"
TEXT = DOC.read_text(encoding="utf-8")


@dataclass(frozen=True)
class Example:
    kind: str
    name: str
    fields: dict[str, list[str]]

    def one(self, key: str) -> str:
        values = self.fields[key]
        assert len(values) == 1, f"{self.kind} {self.name}: {key} appears {len(values)} times"
        return values[0]

    def hex(self, key: str) -> bytes:
        return bytes.fromhex(self.one(key))

    def hashes(self, key: str) -> list[bytes]:
        return [bytes.fromhex(h) for h in self.one(key).split(",")]


def _parse(text: str) -> list[Example]:
    """Fenced blocks whose first line is ``example: <kind> [<name>]``; ``key: value`` lines, indented
    lines continuing the value above them (joined without separators)."""
    found: list[Example] = []
    for block in re.findall(r"^```text\n(.*?)^```", text, flags=re.M | re.S):
        lines = block.splitlines()
        if not lines or not lines[0].startswith("example:"):
            continue
        words = lines[0].split()[1:]
        fields: dict[str, list[str]] = {}
        last: list[str] | None = None
        for line in lines[1:]:
            if line.startswith((" ", "\t")):
                assert last is not None, f"continuation line without a field: {line!r}"
                last[-1] += line.strip()
                continue
            key, sep, value = line.partition(":")
            assert sep, f"not a 'field: value' line: {line!r}"
            last = fields.setdefault(key.strip(), [])
            last.append(value.strip())
        found.append(Example(words[0], words[1] if len(words) > 1 else "", fields))
    return found


EXAMPLES = _parse(TEXT)


def _example(kind: str, name: str = "") -> Example:
    matches = [e for e in EXAMPLES if e.kind == kind and e.name == name]
    assert len(matches) == 1, f"docs/wire.md needs exactly one 'example: {kind} {name}' block"
    return matches[0]


def _statements() -> list[Example]:
    return [e for e in EXAMPLES if e.kind == "statement"]


def _payload(example: Example) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(example.one("payload"))
    return parsed


# ---------------------------------------------------------------------------------------------------
# The examples against the code that makes them


def test_the_document_has_the_required_examples() -> None:
    names = {e.name for e in _statements()}
    assert {
        "enrollment",
        "rpc-auth-poll",
        "rpc-auth-submit",
        "operator-auth-create",
        "deletion-request",
        "delivery",
        "receipt",
        "tree-head",
    } <= names
    for kind, name in [("canonical-json", ""), ("merkle", "three-leaves"), ("mask", "two-layers")]:
        _example(kind, name)


@pytest.mark.parametrize("example", _statements(), ids=lambda e: e.name)
def test_a_statement_example_is_what_the_signer_signs(example: Example) -> None:
    signer = StatementSigner.from_private_bytes(example.hex("private_key"))
    assert signer.public_bytes() == example.hex("public_key")
    assert signer.key_id == key_id_for(signer.public_bytes()) == example.one("key_id")
    domain, payload = example.one("domain"), _payload(example)
    canonical = example.hex("canonical")
    assert canonical == STATEMENT_PREFIX + domain.encode() + b"\x00" + example.one("payload").encode()
    signed = signer.sign(domain, payload)
    assert signed.canonical.hex() == canonical.hex()
    assert signed.signature.hex() == example.one("signature")
    checked = StatementVerifier.from_public_bytes(signer.public_bytes()).verify(
        (canonical, example.hex("signature")), domain
    )
    assert checked == payload
    for key in ("commitments", "after_commitments", "before_commitments"):
        for commitment in payload.get(key, []):
            assert is_commitment_point(commitment["point_hex"]), commitment


def test_the_key_table_matches_the_examples() -> None:
    for example in _statements():
        row = (
            f"| `{example.one('private_key')}` | `{example.one('public_key')}` | `{example.one('key_id')}` |"
        )
        assert row in TEXT, f"the key table lacks the key of example {example.name}"


def test_canonical_json_example_and_refusals() -> None:
    example = _example("canonical-json")
    canonical = example.one("canonical").encode()
    assert canonical_json(parse_canonical_json(canonical)) == canonical
    refused = example.fields["refused"]
    assert len(refused) >= 10
    for text in refused:
        with pytest.raises(StatementError):
            parse_canonical_json(text.encode())


def test_mask_examples_encode_and_hash_as_documented() -> None:
    masks = [e for e in EXAMPLES if e.kind == "mask"]
    assert {e.name for e in masks} >= {"two-layers", "empty"}
    for example in masks:
        layers = [
            LayerMask(
                item["layer"],
                tuple(item["shape"]),
                item["block_size"],
                {int(k): tuple(v) for k, v in item["blocks"].items()},
            )
            for item in json.loads(example.one("layers"))
        ]
        mask = Mask(tuple(layers))
        assert mask.to_bytes().hex() == example.one("bytes")
        assert mask.digest() == example.one("sha256") == hashlib.sha256(example.hex("bytes")).hexdigest()
        assert mask.masked_count() == int(example.one("masked_count"))
        assert Mask.from_bytes(example.hex("bytes")) == mask


def test_merkle_examples_hash_and_verify_as_rfc_9162() -> None:
    trees = [e for e in EXAMPLES if e.kind == "merkle"]
    assert len(trees) >= 2
    for example in trees:
        leaves = example.hashes("leaves")
        hashes = [transparency.leaf_hash(d) for d in leaves]
        assert hashes == example.hashes("leaf_hashes")
        tree = transparency.MerkleTree(hashes)
        for key in example.fields:
            what, *sizes = key.split("_")
            if what == "root":
                assert tree.root(int(sizes[0])) == example.hex(key), key
            elif what == "inclusion":
                index, size = map(int, sizes)
                proof = example.hashes(key)
                assert tree.inclusion_proof(index, size) == proof, key
                transparency.verify_inclusion(hashes[index], index, size, proof, tree.root(size))
                bad = [bytes([proof[0][0] ^ 1]) + proof[0][1:], *proof[1:]]
                with pytest.raises(transparency.MerkleProofError):
                    transparency.verify_inclusion(hashes[index], index, size, bad, tree.root(size))
            elif what == "consistency":
                first, second = map(int, sizes)
                proof = example.hashes(key)
                assert tree.consistency_proof(first, second) == proof, key
                transparency.verify_consistency(first, second, tree.root(first), tree.root(second), proof)
                with pytest.raises(transparency.MerkleProofError):
                    transparency.verify_consistency(first, second, tree.root(first), tree.root(first), proof)
    three = _example("merkle", "three-leaves")
    assert transparency.root_hash([]) == transparency.EMPTY_ROOT
    assert transparency.node_hash(
        three.hashes("leaf_hashes")[0], three.hashes("leaf_hashes")[1]
    ) == three.hex("root_2")


def test_enrollment_proofs_digest_example() -> None:
    example = _example("enrollment-proofs-digest")
    proofs = [bytes.fromhex(p) for p in example.one("proofs").split(",")]
    assert enrollment_proofs_digest(proofs) == example.one("sha256")


def test_the_proof_layout_is_what_the_parser_reads() -> None:
    """The documented magic and field widths: a proof assembled from the table parses, and the
    encoder writes exactly those bytes."""
    section = TEXT[TEXT.index("### Proofs") :]
    magic = bytes.fromhex(section.split("`")[section.split("`").index("zkp") - 2].replace(" ", ""))
    assert magic == PROOF_MAGIC
    felt = (5).to_bytes(32, "little")
    raw = magic + (3).to_bytes(4, "big") + b"abc" + (1).to_bytes(2, "big") + (1).to_bytes(4, "big") + felt
    proof = parse_proof(raw, 0)
    assert proof == Proof(b"abc", ((felt.hex(),),))
    assert encode_proof(proof) == raw


def test_the_examples_refer_to_each_other_consistently() -> None:
    by_name = {e.name: e for e in _statements()}
    request, delivery = by_name["deletion-request"], by_name["delivery"]
    receipt, head = by_name["receipt"], by_name["tree-head"]
    submit, enrollment = by_name["rpc-auth-submit"], by_name["enrollment"]
    request_payload = _payload(request)
    mask = request.hex("mask")
    assert request_payload["mask_sha256"] == hashlib.sha256(mask).hexdigest()
    assert request_payload["mask_bytes"] == len(mask)
    assert request_payload["layers"] == Mask.from_bytes(mask).layer_names
    request_sha256 = hashlib.sha256(request.hex("canonical")).hexdigest()
    assert _payload(delivery)["request_sha256"] == request_sha256
    receipt_payload = _payload(receipt)
    assert receipt_payload["request_sha256"] == request_sha256
    assert receipt_payload["mask_sha256"] == request_payload["mask_sha256"]
    assert receipt_payload["before_commitments"] == _payload(enrollment)["commitments"]
    proofs = b"".join(bytes.fromhex(p) for p in submit.one("proofs").split(","))
    submit_payload = _payload(submit)
    assert submit_payload["sha256"] == receipt_payload["proof_sha256"] == hashlib.sha256(proofs).hexdigest()
    assert submit_payload["after_commitments"] == receipt_payload["after_commitments"]
    assert transparency.leaf_hash(receipt.hex("canonical")) == receipt.hex("leaf_hash")
    provider = StatementVerifier.from_public_bytes(head.hex("public_key"))
    tree_head = check_tree_head(provider, (head.hex("canonical"), head.hex("signature")))
    assert (tree_head.size, tree_head.root) == (3, _example("merkle", "three-leaves").hex("root_3"))
    operator = _payload(by_name["operator-auth-create"])
    order = DeletionOrder(
        operator["model_id"],
        tuple(operator["client_ids"]),
        ForgetSelection(forget_class=operator["forget"]["class"]),
        MaskOptions(
            operator["mask"]["score"], operator["mask"]["fraction_ppm"], operator["mask"]["structure"]
        ),
        operator["ttl_s"],
    )
    rest = {k: v for k, v in operator.items() if k not in {"version", "key_id", "rpc", "nonce"}}
    assert rest == order.signed_fields()


# ---------------------------------------------------------------------------------------------------
# The provider produces and accepts exactly the documented bytes


class _AbortedError(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code


class _Context:
    """The few ServicerContext methods the servicers use."""

    def is_active(self) -> bool:
        return True

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _AbortedError(code, details)

    def add_callback(self, callback: Any) -> bool:
        return True

    def time_remaining(self) -> None:
        return None

    def cancel(self) -> None:
        pass


class _AcceptAll:
    def verify(self, job: VerificationJob) -> VerificationResult:
        return VerificationResult(True, "")


def _auth(example: Example, nonce: bytes) -> tuple[bytes, bytes]:
    """The documented statement again, over a nonce this provider issued."""
    signer = StatementSigner.from_private_bytes(example.hex("private_key"))
    signed = signer.sign(example.one("domain"), {**_payload(example), "nonce": nonce.hex()})
    return signed.canonical, signed.signature


def _commitments(items: list[dict[str, Any]]) -> list[pb.Commitment]:
    return [pb.Commitment(name=c["name"], block=c["block"], point_hex=c["point_hex"]) for c in items]


class _Clock:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


@pytest.fixture
def clock() -> _Clock:
    return _Clock(_payload(_example("statement", "deletion-request"))["issued_ms"])


@pytest.fixture
def service(clock: _Clock) -> Iterator[ProviderService]:
    """A provider holding the documented provider key, on the documented clock."""
    svc = ProviderService(
        InMemoryState(),
        StatementSigner.from_private_bytes(_example("statement", "tree-head").hex("private_key")),
        _AcceptAll(),
        # The documented examples enroll a fixed-point kind: opted into, as a benchmarking operator would.
        ServiceConfig(verify_workers=1, verify_poll_s=0.01, update_kinds=frozenset(UPDATE_KINDS)),
        clock_ms=clock,
    )
    yield svc
    svc.close()


def test_the_provider_signs_and_accepts_exactly_the_documented_bytes(
    service: ProviderService, clock: _Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    by_name = {e.name: e for e in _statements()}
    ctx: Any = _Context()
    servicer = ProviderServicer(service, submit_wait_s=10.0)
    enrollment = by_name["enrollment"]
    fields = _payload(enrollment)
    servicer.Enroll(
        pb.EnrollRequest(
            version=1,
            client_id=fields["client_id"],
            public_key=bytes.fromhex(fields["public_key"]),
            model_id=fields["model_id"],
            layers=fields["layers"],
            update_kind=fields["update_kind"],
            commitments=_commitments(fields["commitments"]),
            proof_of_possession=enrollment.hex("signature"),
            canonical=enrollment.hex("canonical"),
        ),
        ctx,
    )
    # The request's random nonce and the submission's random id are the documented ones.
    request, delivery, receipt = by_name["deletion-request"], by_name["delivery"], by_name["receipt"]
    request_payload, receipt_payload = _payload(request), _payload(receipt)
    monkeypatch.setattr(requests_module.secrets, "token_hex", lambda n=None: request_payload["nonce"])
    monkeypatch.setattr(
        service_module.uuid, "uuid4", lambda: SimpleNamespace(hex=receipt_payload["submission_id"])
    )
    record = service.create_request(
        "dev-1", Mask.from_bytes(request.hex("mask")), request_id=request_payload["request_id"]
    )
    assert (record.canonical, record.signature) == (request.hex("canonical"), request.hex("signature"))

    poll = by_name["rpc-auth-poll"]
    nonce, _ = service.challenge("dev-1")
    canonical, signature = _auth(poll, nonce)
    auth = pb.ClientAuth(client_id="dev-1", nonce=nonce, canonical=canonical, signature=signature)
    fields = _payload(poll)
    polled = servicer.PollRequests(
        pb.PollRequest(auth=auth, after_cursor=fields["after_cursor"], max_items=fields["max_items"]), ctx
    )
    [item] = polled.requests
    assert (item.canonical, item.mask, item.cursor) == (request.hex("canonical"), request.hex("mask"), 1)
    assert (item.delivery, item.delivery_signature) == (delivery.hex("canonical"), delivery.hex("signature"))
    with pytest.raises(_AbortedError) as replay:
        servicer.PollRequests(pb.PollRequest(auth=auth, after_cursor=0, max_items=10), ctx)
    assert replay.value.code == grpc.StatusCode.UNAUTHENTICATED

    submit = by_name["rpc-auth-submit"]
    fields = _payload(submit)
    proofs = [bytes.fromhex(p) for p in submit.one("proofs").split(",")]
    clock.ms = receipt_payload["verified_ms"]
    nonce, _ = service.challenge("dev-1")
    canonical, signature = _auth(submit, nonce)
    header = pb.ProofHeader(
        version=1,
        request_id=fields["request_id"],
        client_id="dev-1",
        update_kind=fields["update_kind"],
        after_commitments=_commitments(fields["after_commitments"]),
        proof_count=len(proofs),
        total_bytes=fields["total_bytes"],
        sha256=fields["sha256"],
        auth=pb.ClientAuth(client_id="dev-1", nonce=nonce, canonical=canonical, signature=signature),
        proof_sizes=fields["proof_sizes"],
    )
    chunks = [pb.ProofChunk(header=header), *(pb.ProofChunk(data=p) for p in proofs)]
    answer = servicer.SubmitProof(iter(chunks), ctx)
    assert answer.verdict == pb.VERDICT_ACCEPTED
    assert (answer.receipt.canonical, answer.receipt.signature) == (
        receipt.hex("canonical"),
        receipt.hex("signature"),
    )
    assert answer.receipt.leaf_index == 0
    stored = service.state.get_submission(answer.submission_id)
    assert stored is not None
    documented = re.search(r"content digest is `([0-9a-f]{64})`", TEXT)
    assert documented
    assert stored.content_digest == documented.group(1)
    assert service.tree_head().root_hash == receipt.hex("leaf_hash")  # a one-leaf tree's root is its leaf


def test_the_operator_service_accepts_exactly_the_documented_fields(service: ProviderService) -> None:
    example = _example("statement", "operator-auth-create")
    key = StatementSigner.from_private_bytes(example.hex("private_key"))
    operator = OperatorService(service, [key.public_bytes()], planners={})
    servicer = OperatorServicer(operator)
    fields = _payload(example)

    def call(**change: Any) -> grpc.StatusCode:
        nonce, _ = operator.challenge(key.key_id)
        canonical, signature = _auth(example, nonce)
        request = opb.CreateRequestsRequest(
            auth=opb.OperatorAuth(key_id=key.key_id, nonce=nonce, canonical=canonical, signature=signature),
            model_id=fields["model_id"],
            client_ids=fields["client_ids"],
            forget_class=fields["forget"]["class"],
            mask=opb.MaskOptions(**fields["mask"]),
            ttl_s=fields["ttl_s"],
        )
        for name, value in change.items():
            setattr(request, name, value)
        ctx: Any = _Context()
        with pytest.raises(_AbortedError) as refused:
            servicer.CreateRequests(request, ctx)
        return refused.value.code

    # Authenticated: refused only afterwards, because this provider has no planner for the model.
    assert call() == grpc.StatusCode.NOT_FOUND
    assert call(ttl_s=fields["ttl_s"] + 1) == grpc.StatusCode.PERMISSION_DENIED
    assert call(forget_class=fields["forget"]["class"] + 1) == grpc.StatusCode.PERMISSION_DENIED


# ---------------------------------------------------------------------------------------------------
# Coverage of the document


def test_every_signing_domain_is_documented() -> None:
    domains = {name: getattr(statements, name) for name in dir(statements) if name.startswith("DOMAIN_")}
    assert len(domains) >= 7
    for name, domain in domains.items():
        assert f"`{domain}`" in TEXT, f"{name} = {domain!r} is not in docs/wire.md"


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", TEXT, flags=re.M | re.S)
    assert match, f"docs/wire.md has no '## {title}' section"
    return match.group(1)


def test_every_rpc_has_its_error_codes_documented() -> None:
    section = _section("Error codes")
    services = [
        pb.DESCRIPTOR.services_by_name["Provider"],
        opb.DESCRIPTOR.services_by_name["Operator"],
    ]
    for service in services:
        assert service.methods
        for method in service.methods:
            assert f"`{service.name}.{method.name}`" in section, f"{service.name}.{method.name}"
