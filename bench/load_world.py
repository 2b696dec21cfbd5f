"""What the load benchmark's simulated clients replay: one enrollment and answer per update kind (genuine
proofs from a cached quick demo run, or digest "proofs"), and the provider config lines that go with them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zkunlearn.proofs.backend import point_from_tag

KINDS = {"group_obs": 1, "analytic": 2}


@dataclass(frozen=True)
class Template:
    """What every simulated client of one update kind replays: its enrollment and its answer."""

    kind: str
    model_id: str
    layers: tuple[str, ...]
    commitments: tuple[dict[str, Any], ...]
    mask: bytes
    forget: bytes  # the provider's encoding of forget features and labels (analytic requests)
    after: tuple[dict[str, Any], ...]
    proofs: tuple[bytes, ...]


@dataclass(frozen=True)
class World:
    templates: tuple[Template, ...]
    key_file: Path
    config_top: tuple[str, ...]  # top-level TOML lines of the provider config (verifier, SRS flag)
    config_tables: tuple[str, ...]  # TOML tables (artifacts published over GetArtifact)
    mode: str


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
        "group_obs", "synthetic", ("fc1",), before, mask, b"", after, (_digest_proof(before, after, mask),)
    )
    return World(
        (template,), key, ('verifier = "zkunlearn.bench.load_world:digest_verifier"',), (), "synthetic"
    )


def real_world(work: Path, cache: Path | None = None) -> World:
    """Genuine proofs and keys from one quick demo run (made once, then cached)."""
    from rich.console import Console
    from zkunlearn.provider.state import VERDICT_ACCEPTED, SqlState

    from zkunlearn.tasks.data import cache_root

    cache = cache or cache_root() / "load-template"
    source = cache / "work"
    if not (source / "provider.db").exists():
        from zkunlearn.demo import run_demo

        run_demo(clients=2, quick=True, report_dir=cache, console=Console(stderr=True))
    state = SqlState.sqlite(source / "provider.db")
    templates: dict[str, Template] = {}
    try:
        for sub in _finished(state):
            client, request = state.get_client(sub.client_id), state.get_request(sub.request_id)
            if sub.verdict != VERDICT_ACCEPTED or client is None or request is None:
                continue
            kind = {v: k for k, v in KINDS.items()}[client.update_kind]
            sizes = json.loads(sub.proof_sizes)
            proofs, offset = [], 0
            for size in sizes:
                proofs.append(sub.proof[offset : offset + size])
                offset += size
            templates.setdefault(
                kind,
                Template(
                    kind,
                    client.model_id,
                    client.layers,
                    tuple(json.loads(client.enrolled_commitments)),
                    request.mask,
                    request.forget,
                    tuple(json.loads(sub.after_commitments)),
                    tuple(proofs),
                ),
            )
    finally:
        state.close()
    if set(templates) != set(KINDS):
        raise RuntimeError(
            f"the cached demo run in {cache} lacks accepted {sorted(set(KINDS) - set(templates))}"
        )
    import tomllib

    demo_config = tomllib.loads((source / "provider.toml").read_text())
    top = (f"verifier = {json.dumps(demo_config['verifier'])}", "srs_insecure = true")
    tables: list[str] = []
    for circuit, files in demo_config.get("artifacts", {}).items():
        tables.append(f"[artifacts.{json.dumps(circuit)}]")
        tables += [f"{name} = {json.dumps(path)}" for name, path in files.items()]
    return World(tuple(templates[k] for k in KINDS), source / "provider.key", top, tuple(tables), "real")


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
