"""What the load benchmark's simulated clients replay: one enrollment and answer per update kind (genuine
proofs from a quick demo run, or digest "proofs"), and the provider config lines that go with them.

``real``: the demo's honest exact clients, one per kind: exact Group-OBS (kind 3) and the exact analytic
head (kind 4). Each template carries the client's enrolled commitments *and its enrollment proofs*, so a
simulated client enrolls exactly as the demo's did (its own key signs a statement naming the proofs'
digest). An enrollment proof is a statement about the committed tensors alone (G bounded and
normalised, the Gram in range and PSD, the head its ridge solution), bound to no client, request or
key: the provider accepts it from every simulated client, as it would from any client that holds those
commitments. What a copier cannot do is answer a deletion: each deletion proof is bound to the request
it answered (the request digest is a public input), so every replayed answer is refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zkunlearn.proofs.backend import point_from_tag
from zkunlearn.proofs.deletion import (
    UPDATE_KIND_ANALYTIC_EXACT,
    UPDATE_KIND_GROUP_OBS,
    UPDATE_KIND_GROUP_OBS_EXACT,
)
from zkunlearn.provider.models import UPDATE_KINDS
from zkunlearn.provider.update_policy import kind_label

#: The update kinds ``real`` mode replays, one template each: what ``zkunlearn demo`` proves.
REAL_KINDS = (UPDATE_KIND_GROUP_OBS_EXACT, UPDATE_KIND_ANALYTIC_EXACT)
#: How the provider refuses a replayed deletion proof: the ezkl check against the commitments it expects
#: (its own request's digest among them) fails.
REPLAY_REASON = "proof_invalid_for_expected_commitments"
#: How it refuses an answer claiming a new value for a commitment the request does not touch: the
#: pre-check before any proof is read (``commitment <name>#<batch> changed but the request does not ...``).
UNTOUCHED_CHANGED_REASON = "commitment"


class TemplateError(ValueError):
    """The folder given to replay holds no finished demo run with an accepted deletion of each kind."""


@dataclass(frozen=True)
class Template:
    """What every simulated client of one update kind replays: its enrollment and its answer."""

    update_kind: int
    model_id: str
    layers: tuple[str, ...]
    commitments: tuple[dict[str, Any], ...]
    enrollment_proofs: tuple[bytes, ...]  # exact kinds: sent at Enroll, over ``commitments``
    mask: bytes
    forget: bytes  # the provider's encoding of forget features and labels (analytic requests)
    after: tuple[dict[str, Any], ...]
    proofs: tuple[bytes, ...]


@dataclass(frozen=True)
class World:
    templates: tuple[Template, ...]
    key_file: Path
    config_top: tuple[str, ...]  # top-level TOML lines of the provider config (verifier, SRS flag)
    config_tables: tuple[str, ...]  # TOML tables (the update-kind policy, artifacts over GetArtifact)
    mode: str


def policy_table(kind_names: tuple[str, ...]) -> tuple[str, ...]:
    """The provider config's ``[policy]`` table accepting exactly ``kind_names``."""
    return ("[policy]", f"update_kinds = {json.dumps(list(kind_names))}")


def _digest_proof(
    before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]], mask: bytes
) -> bytes:
    blob = json.dumps({"before": list(before), "after": list(after), "mask": mask.hex()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).digest()


class DigestVerifier:
    """Synthetic verifier for harness tests: the proof must be the digest of before, after and mask.

    Not a proof system: it only lets the harness tell valid from invalid submissions without ezkl.
    """

    def verify(self, job: Any) -> Any:
        from zkunlearn.provider.service import VerificationResult

        before = [c.to_json() for c in job.before_commitments]
        after = [c.to_json() for c in job.after_commitments]
        ok = list(job.proofs) == [_digest_proof(before, after, job.mask)]
        return VerificationResult(ok, "" if ok else "digest proof does not match")


def digest_verifier(_config: object) -> DigestVerifier:
    """Verifier factory for the provider config
    (``verifier = "zkunlearn.bench.load_world:digest_verifier"``)."""
    return DigestVerifier()


def synthetic_world(work: Path) -> World:
    from zkunlearn.circuits.mask import LayerMask, Mask
    from zkunlearn.proofs.statements import StatementSigner

    key = work / "provider.key"
    StatementSigner.generate().save(key)
    mask = Mask((LayerMask("fc1", (4, 4), 4, {0: (1, 2)}),)).to_bytes()
    before = ({"name": "theta:fc1", "block": 0, "point_hex": point_from_tag(b"load-before")},)
    after = ({"name": "theta:fc1", "block": 0, "point_hex": point_from_tag(b"load-after")},)
    template = Template(
        UPDATE_KIND_GROUP_OBS,
        "synthetic",
        ("fc1",),
        before,
        (),
        mask,
        b"",
        after,
        (_digest_proof(before, after, mask),),
    )
    # The digest verifier verifies no enrollment proof, so the exact kinds cannot enroll: synthetic
    # clients enroll the fixed-point Group-OBS kind, opted into for this benchmark of the service's
    # throughput (the digest proves nothing about a relation anyway).
    return World(
        (template,),
        key,
        ('verifier = "zkunlearn.bench.load_world:digest_verifier"',),
        policy_table(("group_obs",)),
        "synthetic",
    )


def real_world(work: Path, template_dir: Path | None = None) -> World:
    """Genuine enrollments and proofs of the exact kinds from a quick demo run in ``template_dir``
    (default: one made under the cache, ``<cache>/load-template``, and reused while it serves).

    ``template_dir`` is a ``zkunlearn demo --report`` folder: a finished run (its ``report.json``) whose
    provider accepted an honest client of each of :data:`REAL_KINDS`. A given folder without one is
    refused (:class:`TemplateError`); the default one is then made again by running the quick demo."""
    if template_dir is None:
        from zkunlearn.tasks.data import cache_root

        template_dir = cache_root() / "load-template"
        try:
            templates = _demo_templates(template_dir)
        except TemplateError:  # absent, unfinished, or a run of other update kinds
            from rich.console import Console

            from zkunlearn.demo import run_demo

            run_demo(clients=2, quick=True, report_dir=template_dir, console=Console(stderr=True))
            templates = _demo_templates(template_dir)
    else:
        templates = _demo_templates(template_dir)
    import tomllib

    source = template_dir / "work"
    demo_config = tomllib.loads((source / "provider.toml").read_text())
    top = (f"verifier = {json.dumps(demo_config['verifier'])}", "srs_insecure = true")
    # The exact kinds are the provider's default policy; named here so the config says what it serves.
    tables = list(policy_table(tuple(UPDATE_KINDS[k] for k in REAL_KINDS)))
    for circuit, files in demo_config.get("artifacts", {}).items():
        tables.append(f"[artifacts.{json.dumps(circuit)}]")
        tables += [f"{name} = {json.dumps(path)}" for name, path in files.items()]
    return World(tuple(templates[k] for k in REAL_KINDS), source / "provider.key", top, tuple(tables), "real")


def _demo_templates(template_dir: Path) -> dict[int, Template]:
    """One template per :data:`REAL_KINDS` from the demo run in ``template_dir``, or :class:`TemplateError`
    naming what the folder lacks."""
    source = template_dir / "work"
    needed = [template_dir / "report.json", *(source / name for name in ("provider.db", "provider.toml"))]
    absent = [str(path.relative_to(template_dir)) for path in needed if not path.exists()]
    if absent:
        raise TemplateError(
            f"{template_dir} holds no finished demo run (no {', '.join(absent)}); "
            f"make one with: zkunlearn demo --quick --report {template_dir}"
        )
    templates = _accepted_templates(source / "provider.db")
    missing = [kind_label(k) for k in REAL_KINDS if k not in templates]
    if missing:
        raise TemplateError(
            f"the demo run in {template_dir} has no accepted deletion of {', '.join(missing)}"
        )
    return templates


def _accepted_templates(db: Path) -> dict[int, Template]:
    """The first accepted deletion of each update kind in a provider database, as a template."""
    from zkunlearn.proofs.exact_deletion import decode_proof_list
    from zkunlearn.provider.state import VERDICT_ACCEPTED, SqlState

    state = SqlState.sqlite(db)
    templates: dict[int, Template] = {}
    try:
        for sub in _finished(state):
            client, request = state.get_client(sub.client_id), state.get_request(sub.request_id)
            if sub.verdict != VERDICT_ACCEPTED or client is None or request is None:
                continue
            proofs, offset = [], 0
            for size in json.loads(sub.proof_sizes):
                proofs.append(sub.proof[offset : offset + size])
                offset += size
            templates.setdefault(
                client.update_kind,
                Template(
                    client.update_kind,
                    client.model_id,
                    client.layers,
                    tuple(json.loads(client.enrolled_commitments)),
                    tuple(decode_proof_list(client.enrollment_proofs)),
                    request.mask,
                    request.forget,
                    tuple(json.loads(sub.after_commitments)),
                    tuple(proofs),
                ),
            )
    finally:
        state.close()
    return templates


def _finished(state: Any) -> list[Any]:
    """Every finished submission, found through the log (the state has no 'all submissions' query)."""
    out = []
    for index in range(state.ledger_size()):
        leaf = state.get_leaf(index)
        sub = state.get_submission(leaf.submission_id) if leaf else None
        if sub is not None:
            out.append(sub)
    return out


def digest_checker(
    payload: Mapping[str, Any],
    canonical: bytes,
    mask_bytes: bytes,
    features: Any,
    labels: Any,
    before: list[dict[str, Any]],
    after: list[dict[str, Any]],
    proofs: list[bytes],
    circuits_dir: Path,
) -> tuple[bool, str]:
    """The auditor's side of :class:`DigestVerifier` (synthetic mode only)."""
    ok = list(proofs) == [_digest_proof(before, after, mask_bytes)]
    return ok, "ok" if ok else "digest proof does not match"
