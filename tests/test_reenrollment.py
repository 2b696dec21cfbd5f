"""Signed re-enrollment: a client that lost its committed state rotates to fresh commitments.

Each attack (another key, a replay, a proof against the old commitments, a re-enrollment while a
request is open) is tried next to the honest call that is accepted. The provider runs the real
service with the fake (hash-transcript) verifier on both state backends; the auditor checks the
exported log with its rotation.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from zkunlearn.client.sdk import Commitment
from zkunlearn.client.store import StoreError
from zkunlearn.proofs.audit import audit_bundle
from zkunlearn.proofs.backend import point_from_tag
from zkunlearn.proofs.statements import DOMAIN_REENROLLMENT, DOMAIN_RPC_AUTH, StatementSigner
from zkunlearn.provider.export import export_bundle
from zkunlearn.provider.ledger import Ledger
from zkunlearn.provider.service import (
    AlreadyExistsError,
    AuthInput,
    CommitmentRef,
    EnrollmentInput,
    FailedPreconditionError,
    InvalidInputError,
    PermissionDeniedError,
    ProviderService,
    ServiceConfig,
    UnauthenticatedError,
)
from zkunlearn.provider.state import (
    VERDICT_ACCEPTED,
    VERDICT_REJECTED,
    InMemoryState,
    ProviderState,
    SqlState,
)
from zkunlearn.provider.state._schema import replaced_t

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.fakes import ALL_KINDS, BLOCKS, FakeVerifier, _transcript, after_for
from tests.test_audit import fake_checker
from tests.test_grpc import edge, start
from tests.test_service import Device, mask


@pytest.fixture(params=["memory", "sqlite"])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProviderState]:
    st: ProviderState = InMemoryState() if request.param == "memory" else SqlState.sqlite(tmp_path / "p.db")
    yield st
    st.close()


@pytest.fixture
def service(state: ProviderState) -> Iterator[ProviderService]:
    svc = ProviderService(
        state,
        StatementSigner.generate(),
        FakeVerifier(),
        ServiceConfig(
            update_kinds=ALL_KINDS,
            model_ids=("m1",),
            max_proof_bytes=4096,
            challenge_rate_per_subject=0.0,
        ),
    )
    yield svc
    svc.close()


FRESH = [
    CommitmentRef("theta", 0, point_from_tag(b"theta-fresh")),
    CommitmentRef("gradient_factor", 0, point_from_tag(b"g-fresh")),
]


def enrollment_with(dev: Device, commitments: list[CommitmentRef]) -> EnrollmentInput:
    """The device's enrollment statement over other commitments (what a re-enrollment sends)."""
    fields: dict[str, Any] = {
        "client_id": dev.client_id,
        "public_key": dev.signer.public_bytes().hex(),
        "model_id": "m1",
        "layers": ["fc1"],
        "update_kind": dev.kind,
        "commitments": [c.to_json() for c in commitments],
    }
    st = dev.signer.sign("zkunlearn/v1/enrollment", fields)
    return dev.enrollment(commitments=tuple(commitments), canonical=st.canonical, signature=st.signature)


def rotation(
    service: ProviderService, dev: Device, new: EnrollmentInput, signer: StatementSigner | None = None
) -> AuthInput:
    """The RPC-auth statement authorizing ``new`` to replace the stored enrollment."""
    stored = service.state.get_client(dev.client_id)
    assert stored is not None
    fields = {
        "previous_enrollment_sha256": hashlib.sha256(stored.enrollment_canonical).hexdigest(),
        "enrollment_sha256": hashlib.sha256(new.canonical).hexdigest(),
    }
    return dev.auth("Reenroll", fields, signer=signer)


def submit_against(dev: Device, request_id: str, before: list[dict[str, Any]]) -> Any:
    """An honest-looking answer built on ``before`` (not necessarily what the provider holds)."""
    req = dev.service.state.get_request(request_id)
    assert req is not None
    after = after_for(before, request_id)
    proofs = [_transcript(req.canonical, req.mask, before, after, i) for i in range(BLOCKS)]
    header = dev.header(request_id, [CommitmentRef(**c) for c in after], proofs)
    sub = dev.service.submit(header, iter([b"".join(proofs)]))
    return dev.service.wait(sub.submission_id, 10)


def current(service: ProviderService, client_id: str) -> list[dict[str, Any]]:
    client = service.state.get_client(client_id)
    assert client is not None
    value: list[dict[str, Any]] = json.loads(client.current_commitments)
    return value


def test_a_client_rotates_to_fresh_commitments_and_the_log_records_it(service: ProviderService) -> None:
    dev = Device(service)
    dev.enroll()
    r1 = service.create_request(dev.client_id, mask())
    assert dev.submit(r1.request_id).verdict == VERDICT_ACCEPTED
    given_up = current(service, dev.client_id)
    new = enrollment_with(dev, FRESH)
    auth = rotation(service, dev, new)
    record = service.reenroll(new, auth)
    assert current(service, dev.client_id) == [c.to_json() for c in FRESH]
    assert record.enrollment_canonical == new.canonical
    # The rotation is the log's second leaf, signed by the provider, naming both enrollments.
    assert service.ledger.size == 2
    leaf = service.ledger.leaf(1)
    payload = service.signer.verifier().verify((leaf.canonical, leaf.signature), DOMAIN_REENROLLMENT)
    assert payload["client_id"] == dev.client_id
    assert payload["previous_commitments"] == given_up
    assert bytes.fromhex(payload["enrollment"]["canonical"]) == new.canonical
    signed = dev.signer.verifier().verify(
        (
            bytes.fromhex(payload["authorization"]["canonical"]),
            bytes.fromhex(payload["authorization"]["signature"]),
        ),
        DOMAIN_RPC_AUTH,
    )
    assert signed["rpc"] == "Reenroll"
    # Deletions continue from the fresh commitments; the request stream is the same.
    r2 = service.create_request(dev.client_id, mask())
    assert r2.cursor == 2
    assert dev.submit(r2.request_id).verdict == VERDICT_ACCEPTED


def test_a_reenrollment_signed_by_another_key_is_refused(service: ProviderService) -> None:
    dev = Device(service)
    dev.enroll()
    mallory = StatementSigner.generate()
    new = enrollment_with(dev, FRESH)
    with pytest.raises(UnauthenticatedError, match="checked with the key enrolled"):
        service.reenroll(new, rotation(service, dev, new, signer=mallory))
    # Mallory's own key in the new enrollment too: the authorization still needs the enrolled key.
    thief = Device(service, dev.client_id)
    thief.signer = mallory
    stolen = enrollment_with(thief, FRESH)
    with pytest.raises(UnauthenticatedError):
        service.reenroll(stolen, rotation(service, thief, stolen))
    # An authorization by the enrolled key cannot carry another key's enrollment.
    with pytest.raises(PermissionDeniedError):
        service.reenroll(stolen, rotation(service, dev, new))
    assert current(service, dev.client_id) != [c.to_json() for c in FRESH]
    assert service.ledger.size == 0
    service.reenroll(new, rotation(service, dev, new))  # the honest control
    assert current(service, dev.client_id) == [c.to_json() for c in FRESH]


def test_a_replayed_reenrollment_is_refused(service: ProviderService) -> None:
    dev = Device(service)
    dev.enroll()
    first = enrollment_with(dev, FRESH)
    first_auth = rotation(service, dev, first)
    service.reenroll(first, first_auth)
    # The same call again: nothing changes, the provider says it holds exactly that enrollment.
    with pytest.raises(AlreadyExistsError, match="already enrolled with exactly this enrollment"):
        service.reenroll(first, first_auth)
    later = [CommitmentRef("theta", 0, point_from_tag(b"t3")), CommitmentRef("gradient_factor", 0, POINT3)]
    second = enrollment_with(dev, later)
    service.reenroll(second, rotation(service, dev, second))
    # Replaying the first rotation after the second: its nonce is spent and its enrollment is gone.
    with pytest.raises((UnauthenticatedError, PermissionDeniedError)):
        service.reenroll(first, first_auth)
    # Even with a fresh nonce, an authorization naming the replaced enrollment is refused.
    stale = {
        "previous_enrollment_sha256": hashlib.sha256(dev.enrollment().canonical).hexdigest(),
        "enrollment_sha256": hashlib.sha256(first.canonical).hexdigest(),
    }
    with pytest.raises(PermissionDeniedError, match="previous_enrollment_sha256"):
        service.reenroll(first, dev.auth("Reenroll", stale))
    assert current(service, dev.client_id) == [c.to_json() for c in later]
    assert service.ledger.size == 2


POINT3 = point_from_tag(b"g3")


def test_a_proof_against_the_old_commitments_is_refused_after_the_rotation(service: ProviderService) -> None:
    dev = Device(service)
    dev.enroll()
    old = current(service, dev.client_id)
    new = enrollment_with(dev, FRESH)
    service.reenroll(new, rotation(service, dev, new))
    r = service.create_request(dev.client_id, mask())
    refused = submit_against(dev, r.request_id, old)
    assert refused.verdict == VERDICT_REJECTED
    assert current(service, dev.client_id) == [c.to_json() for c in FRESH]
    accepted = submit_against(dev, r.request_id, [c.to_json() for c in FRESH])  # the honest control
    assert accepted.verdict == VERDICT_ACCEPTED


def test_an_open_request_blocks_the_reenrollment_until_answered_or_expired(state: ProviderState) -> None:
    now = [1_000_000]
    service = ProviderService(
        state,
        StatementSigner.generate(),
        FakeVerifier(),
        ServiceConfig(
            update_kinds=ALL_KINDS,
            model_ids=("m1",),
            challenge_rate_per_subject=0.0,
            request_ttl_s=60.0,
        ),
        clock_ms=lambda: now[0],
    )
    try:
        dev = Device(service)
        dev.enroll()
        r = service.create_request(dev.client_id, mask())
        new = enrollment_with(dev, FRESH)
        with pytest.raises(FailedPreconditionError, match=f"open deletion request.*{r.request_id}"):
            service.reenroll(new, rotation(service, dev, new))
        assert service.ledger.size == 0
        now[0] += 61_000  # the request expired unanswered: it no longer blocks
        service.reenroll(new, rotation(service, dev, new))
        assert current(service, dev.client_id) == [c.to_json() for c in FRESH]
    finally:
        service.close()


def test_the_policy_can_let_a_client_reenroll_with_requests_open(state: ProviderState) -> None:
    service = ProviderService(
        state,
        StatementSigner.generate(),
        FakeVerifier(),
        ServiceConfig(
            update_kinds=ALL_KINDS,
            model_ids=("m1",),
            challenge_rate_per_subject=0.0,
            reenroll_with_open_requests=True,
        ),
    )
    try:
        dev = Device(service)
        dev.enroll()
        r = service.create_request(dev.client_id, mask())
        new = enrollment_with(dev, FRESH)
        service.reenroll(new, rotation(service, dev, new))
        assert dev.submit(r.request_id).verdict == VERDICT_ACCEPTED  # answered on the fresh state
    finally:
        service.close()


def test_a_reenrollment_keeps_the_key_and_kind(service: ProviderService) -> None:
    dev = Device(service)
    dev.enroll()
    other_kind = Device(service, dev.client_id, kind=2)
    other_kind.signer = dev.signer
    new = enrollment_with(other_kind, FRESH)
    with pytest.raises(InvalidInputError, match="update kind"):
        service.reenroll(new, rotation(service, dev, new))
    # Another key in the enrollment, authorized by the enrolled key: the recovery keeps the key.
    other_key = Device(service, dev.client_id)
    new = enrollment_with(other_key, FRESH)
    with pytest.raises(InvalidInputError, match="keeps the enrolled key"):
        service.reenroll(new, rotation(service, dev, new))
    new = enrollment_with(dev, FRESH)  # the honest control
    service.reenroll(new, rotation(service, dev, new))


def test_the_auditor_sees_the_rotation_and_checks_each_side_against_its_commitments(
    service: ProviderService, tmp_path: Path
) -> None:
    dev = rotated_history(service)
    (tmp_path / "circuits").mkdir()
    (tmp_path / "circuits" / "settings.json").write_text("{}")
    bundle = export_bundle(
        service.state,
        service.ledger,
        service.signer.public_bytes(),
        tmp_path / "bundle",
        circuits_dir=tmp_path / "circuits",
    )
    key = service.signer.public_bytes()
    report = audit_bundle(bundle, provider_public_key=key, proof_checker=fake_checker)
    assert report.ok, report.failures
    notes = {item.item: item.reason for item in report.items}
    assert "re-enrollment of client dev-1" in notes["log.json[1]"]
    assert "1 re-enrollment(s) (log.json[1]); 1 since the last one" in notes["chain dev-1"]

    # A provider that logs a rotation the client never authorized (re-signed with its own key, so
    # every signature and Merkle proof holds) is caught by the chain: the authorization is not the
    # client's.
    log = json.loads((bundle / "log.json").read_text())
    payload = json.loads(bytes.fromhex(log[1]["canonical"]).split(b"\x00", 2)[2])
    forged = service.signer.sign(DOMAIN_RPC_AUTH, {"client_id": dev.client_id, "rpc": "Reenroll"})
    payload["authorization"] = {"canonical": forged.canonical.hex(), "signature": forged.signature.hex()}
    resigned = service.signer.sign(DOMAIN_REENROLLMENT, payload)
    log[1]["canonical"], log[1]["signature"] = resigned.canonical.hex(), resigned.signature.hex()
    (bundle / "log.json").write_text(json.dumps(log))
    failed = audit_bundle(bundle, provider_public_key=key, proof_checker=fake_checker)
    chain = next(f for f in failed.failures if f["item"] == "chain dev-1")
    assert "authorization" in chain["reason"]


def test_an_interrupted_rotation_leaves_the_old_enrollment_and_no_leaf(service: ProviderService) -> None:
    dev = Device(service)
    dev.enroll()
    before = current(service, dev.client_id)

    def crash(step: str) -> None:
        raise RuntimeError(f"power cut at {step}")

    new = enrollment_with(dev, FRESH)
    service.state.fault_hook = crash
    with pytest.raises(RuntimeError, match="leaf-appended"):
        service.reenroll(new, rotation(service, dev, new))
    service.state.fault_hook = None
    assert current(service, dev.client_id) == before
    assert service.ledger.size == 0
    service.reenroll(new, rotation(service, dev, new))  # the retry goes through
    assert service.ledger.size == 1


@pytest.mark.grpc
def test_the_sdk_reenrolls_over_grpc_and_takes_a_repeat_after_a_lost_response_as_done(tmp_path: Path) -> None:
    provider = start(tmp_path)
    try:
        client = edge(tmp_path, provider.port)
        before = [Commitment("theta", 0, point_from_tag(b"theta")), Commitment("gradient_factor", 0, POINT3)]
        with pytest.raises(StoreError, match="not enrolled"):
            client.reenroll(before)
        client.enroll("dev-1", "m1", ["fc1"], 1, before)
        r1 = provider.service.create_request("dev-1", mask())
        assert [o.status for o in client.poll()] == ["accepted"]
        fresh = [Commitment(c.name, c.block, c.point_hex) for c in FRESH]
        previous = client.store.get("enrollment_canonical")
        client.reenroll(fresh)
        assert client.commitments == fresh
        assert current(provider.service, "dev-1") == [c.to_json() for c in FRESH]
        # The response was lost: the client sends the same re-enrollment again, naming the old one.
        assert previous is not None
        client.store.put("enrollment_canonical", previous)
        client.reenroll(fresh)
        assert provider.service.ledger.size == 2  # one receipt, one rotation: nothing appended twice
        # Another device's key cannot rotate this client (a store holding this client id, another key).
        thief = edge(tmp_path, provider.port, name="thief")
        thief.store.put("client_id", b"dev-1")
        thief.store.put("private_key", StatementSigner.generate().private_bytes())
        thief.store.put_json("enrollment", {"model_id": "m1", "layers": ["fc1"], "update_kind": 1})
        thief.store.put("enrollment_canonical", client.store.get("enrollment_canonical") or b"")
        with pytest.raises(grpc.RpcError) as refused:
            thief.reenroll(before)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # The device answers its next deletion from the fresh commitments.
        r2 = provider.service.create_request("dev-1", mask())
        assert [(o.request_id, o.status) for o in client.poll()] == [(r2.request_id, "accepted")]
        assert r1.request_id != r2.request_id
    finally:
        provider.stop(0)


def rotated_history(service: ProviderService) -> Device:
    """enroll -> accepted deletion -> re-enrollment -> accepted deletion (leaves 0, 1, 2)."""
    dev = Device(service)
    dev.enroll()
    r1 = service.create_request(dev.client_id, mask(), request_id="before-rotation")
    assert dev.submit(r1.request_id).verdict == VERDICT_ACCEPTED
    new = enrollment_with(dev, FRESH)
    service.reenroll(new, rotation(service, dev, new))
    r2 = service.create_request(dev.client_id, mask(), request_id="after-rotation")
    assert dev.submit(r2.request_id).verdict == VERDICT_ACCEPTED
    return dev


def exported(service: ProviderService, out: Path, ledger: Ledger | None = None) -> Path:
    circuits = out.parent / f"{out.name}-circuits"
    circuits.mkdir()
    (circuits / "settings.json").write_text("{}")
    return export_bundle(
        service.state, ledger or service.ledger, service.signer.public_bytes(), out, circuits_dir=circuits
    )


def test_the_bundle_carries_each_replaced_enrollment_and_the_auditor_holds_it_to_the_log(
    service: ProviderService, tmp_path: Path
) -> None:
    """Dropping, swapping or moving a replaced enrollment fails the chain; the honest bundle passes."""
    dev = rotated_history(service)
    bundle = exported(service, tmp_path / "bundle")
    key = service.signer.public_bytes()
    record = json.loads((bundle / "enrollments" / "dev-1.json").read_text())
    assert bytes.fromhex(record["canonical"]) == enrollment_with(dev, FRESH).canonical
    (replaced,) = record["replaced"]
    assert replaced["replaced_at"] == 1
    assert bytes.fromhex(replaced["canonical"]) == dev.enrollment().canonical
    assert audit_bundle(bundle, provider_public_key=key, proof_checker=fake_checker).ok  # the control

    def edited(name: str, change: Any) -> list[dict[str, str]]:
        copy = Path(shutil.copytree(bundle, tmp_path / name))
        path = copy / "enrollments" / "dev-1.json"
        value = json.loads(path.read_text())
        change(value)
        path.write_text(json.dumps(value))
        return audit_bundle(copy, provider_public_key=key, proof_checker=fake_checker).failures

    def swap(value: dict[str, Any]) -> None:
        first = value["replaced"][0]
        for field in ("canonical", "signature", "commitments", "enrollment_proofs"):
            first[field], value[field] = value[field], first[field]

    dropped = edited("dropped", lambda value: value["replaced"].clear())
    assert dropped == [
        {
            "item": "chain dev-1",
            "reason": "enrollments/dev-1.json replaced: 0 replaced enrollment(s), the log has 1 "
            "re-enrollment(s) of the client",
        }
    ]
    swapped = edited("swapped", swap)
    assert [f["item"] for f in swapped] == ["chain dev-1"]
    assert "replaced[0]: not the enrollment log.json[1] replaced" in swapped[0]["reason"]
    missing = edited("missing", lambda value: value.pop("replaced"))
    assert missing == [
        {"item": "chain dev-1", "reason": "enrollments/dev-1.json: field 'replaced' is missing"}
    ]
    moved = edited("moved", lambda value: value["replaced"][0].update(replaced_at=2))
    assert "replaced[0] replaced_at: 2, the re-enrollment replacing it is log.json[1]" in moved[0]["reason"]


def test_a_rotation_recorded_before_replaced_enrollments_were_kept_exports_from_its_leaf(
    tmp_path: Path,
) -> None:
    """A state whose replaced enrollment is missing (a rotation stored before they were kept): the
    export takes it from the re-enrollment leaf, and the bundle audits (this kind has no proofs)."""
    state = SqlState.sqlite(tmp_path / "p.db")
    service = ProviderService(
        state,
        StatementSigner.generate(),
        FakeVerifier(),
        ServiceConfig(update_kinds=ALL_KINDS, model_ids=("m1",), challenge_rate_per_subject=0.0),
    )
    try:
        dev = rotated_history(service)
        engine = sa.create_engine(f"sqlite+pysqlite:///{tmp_path / 'p.db'}")
        with engine.begin() as conn:
            conn.execute(sa.delete(replaced_t))
        engine.dispose()
        assert state.replaced_enrollments(dev.client_id) == []
        bundle = exported(service, tmp_path / "bundle")
        record = json.loads((bundle / "enrollments" / "dev-1.json").read_text())
        assert bytes.fromhex(record["replaced"][0]["canonical"]) == dev.enrollment().canonical
        report = audit_bundle(
            bundle, provider_public_key=service.signer.public_bytes(), proof_checker=fake_checker
        )
        assert report.ok, report.failures
    finally:
        service.close()


def test_an_export_behind_a_later_rotation_holds_the_enrollment_in_force_at_its_end(
    service: ProviderService, tmp_path: Path
) -> None:
    """The log grows while a bundle is written: a rotation past its size is not in the bundle, and
    neither is its enrollment; the one it replaced is the bundle's enrollment in force."""
    dev = Device(service)
    dev.enroll()
    r1 = service.create_request(dev.client_id, mask())
    assert dev.submit(r1.request_id).verdict == VERDICT_ACCEPTED
    new = enrollment_with(dev, FRESH)
    service.reenroll(new, rotation(service, dev, new))  # leaf 1, after the export's snapshot

    class Behind(Ledger):
        @property
        def size(self) -> int:
            return 1

    behind = Behind(service.state, service.signer)
    bundle = exported(service, tmp_path / "bundle", behind)
    record = json.loads((bundle / "enrollments" / "dev-1.json").read_text())
    assert bytes.fromhex(record["canonical"]) == dev.enrollment().canonical
    assert record["replaced"] == []
    report = audit_bundle(
        bundle, provider_public_key=service.signer.public_bytes(), proof_checker=fake_checker
    )
    assert report.ok, report.failures
    assert (
        exported(service, tmp_path / "now").joinpath("enrollments", "dev-1.json").read_text()
        != (bundle / "enrollments" / "dev-1.json").read_text()
    )
