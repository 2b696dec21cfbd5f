"""Write the provider's audit bundle: everything an offline auditor needs to re-check the receipt log.

The bundle is a plain directory (format described in :mod:`zkunlearn.proofs.audit_format`;
:mod:`zkunlearn.proofs.audit` reads it).
Three choices matter for what an audit can prove:

- **One snapshot size.** The log may grow while we export; every inclusion proof, the latest head
  and the consistency chain are taken against the size read once at the start, so the bundle is
  internally consistent instead of mixing two log states.
- **Raw signed bytes.** Statements are exported as the exact bytes that were signed, never
  re-serialised, so the auditor checks the provider's signatures rather than ours.
- **Atomic.** The bundle is written into a temporary sibling directory and renamed into place, so a
  crash or a full disk never leaves a half bundle that an auditor would report as tampering.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from zkunlearn.proofs.audit_format import BUNDLE_FORMAT
from zkunlearn.proofs.statements import SignedStatement, StatementError, StatementSigner, key_id_for

from zkunlearn.errors import ZkUnlearnError

from .ledger import Ledger, TreeHead
from .models import TensorData, decode_forget
from .server import ProviderConfig
from .state import ClientRecord, ProviderState, open_state

__all__ = ["BUNDLE_FORMAT", "BundleExportError", "export_bundle", "export_from_config"]

# Proving keys are large and verification never needs them; an auditor gets verifying keys only.
_LEFT_OUT = ("pk.key",)


class BundleExportError(ZkUnlearnError, RuntimeError):
    """The bundle cannot be written: the target exists, the state is inconsistent, or a file is missing."""


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")


def _tensor_json(tensor: TensorData | None) -> dict[str, Any] | None:
    if tensor is None:
        return None
    return {"shape": list(tensor.shape), "float64_le": tensor.float64_le.hex()}


def _head_json(head: TreeHead) -> dict[str, Any]:
    return SignedStatement.from_wire(head.canonical, head.signature).to_dict()


def _stored_heads(state: ProviderState, ledger: Ledger, size: int) -> list[TreeHead]:
    """Every head the provider ever signed up to ``size``, plus the one for ``size`` itself.

    Size 0 is left out when the log is non-empty: consistency with the empty tree proves nothing.
    """
    heads: list[TreeHead] = []
    for n in range(1, size):
        rec = state.get_tree_head(n)
        if rec is not None:
            heads.append(TreeHead(rec.size, rec.root_hash, rec.canonical, rec.signature))
    heads.append(ledger.tree_head(size))
    return heads


def _write_bundle(
    root: Path,
    state: ProviderState,
    ledger: Ledger,
    signer_public_key: bytes,
    circuits: Mapping[str, Path],
    srs_sha256: str,
    srs_insecure: bool,
) -> None:
    size = ledger.size
    heads = _stored_heads(state, ledger, size)
    _write_json(
        root / "manifest.json",
        {
            "format": BUNDLE_FORMAT,
            "provider_public_key": signer_public_key.hex(),
            "key_id": key_id_for(signer_public_key),
            "srs": {"sha256": srs_sha256, "insecure": srs_insecure},
            "created_ms": time.time_ns() // 1_000_000,
            "tree_size": size,
        },
    )
    _write_json(root / "tree_heads.json", [_head_json(h) for h in heads])
    _write_json(
        root / "consistency.json",
        [
            {
                "first_size": a.size,
                "second_size": b.size,
                "proof": [node.hex() for node in ledger.consistency_proof(a.size, b.size)],
            }
            for a, b in itertools.pairwise(heads)
        ],
    )
    log: list[dict[str, Any]] = []
    client_ids: dict[str, None] = {}
    request_ids: dict[str, None] = {}
    submission_ids: dict[str, None] = {}
    rotations: dict[str, dict[int, dict[str, Any]]] = {}  # client -> its re-enrollment leaves' payloads
    for index in range(size):
        leaf = ledger.leaf(index)
        log.append(
            {
                "index": index,
                "canonical": leaf.canonical.hex(),
                "signature": leaf.signature.hex(),
                "inclusion_proof": [node.hex() for node in ledger.inclusion_proof(index, size)],
            }
        )
        if leaf.request_id:
            request_ids[leaf.request_id] = None
            submission_ids[leaf.submission_id] = None
        else:  # a re-enrollment: the client's enrollments are exported, it has no request or submission
            payload = SignedStatement.from_wire(leaf.canonical, leaf.signature).payload
            client_ids[str(payload.get("client_id"))] = None
            rotations.setdefault(str(payload.get("client_id")), {})[index] = payload
    _write_json(root / "log.json", log)

    (root / "requests").mkdir()
    for request_id in request_ids:
        request = state.get_request(request_id)
        if request is None:
            raise BundleExportError(f"log leaf names request {request_id!r}, which the state does not hold")
        features, labels = decode_forget(request.forget)
        _write_json(
            root / "requests" / f"{request_id}.json",
            {
                "canonical": request.canonical.hex(),
                "signature": request.signature.hex(),
                "mask": request.mask.hex(),
                "forget_features": _tensor_json(features),
                "forget_labels": _tensor_json(labels),
            },
        )
        client_ids[request.client_id] = None

    (root / "enrollments").mkdir()
    for client_id in client_ids:
        _write_json(
            root / "enrollments" / f"{client_id}.json",
            _enrollment_versions(state, client_id, rotations.get(client_id, {}), size),
        )

    (root / "submissions").mkdir()
    for submission_id in submission_ids:
        sub = state.get_submission(submission_id)
        if sub is None:
            raise BundleExportError(
                f"log leaf names submission {submission_id!r}, which the state does not hold"
            )
        _write_json(
            root / "submissions" / f"{submission_id}.json",
            {
                "request_id": sub.request_id,
                "client_id": sub.client_id,
                "proof_sha256": sub.proof_sha256,
                "proof_sizes": json.loads(sub.proof_sizes),
                "after_commitments": json.loads(sub.after_commitments),
            },
        )
        (root / "submissions" / f"{submission_id}.bin").write_bytes(sub.proof)

    if circuits:
        target = root / "circuits"
        target.mkdir()
        for name, source in circuits.items():
            if source.name in _LEFT_OUT:
                continue
            if source.is_dir():
                shutil.copytree(source, target / name, ignore=shutil.ignore_patterns(*_LEFT_OUT))
            elif source.is_file():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target / name)
            else:
                raise BundleExportError(f"circuit artifact {source} does not exist")


def _enrollment_json(client: ClientRecord) -> dict[str, Any]:
    return {
        "canonical": client.enrollment_canonical.hex(),
        "signature": client.enrollment_signature.hex(),
        "public_key": client.public_key.hex(),
        "commitments": json.loads(client.enrolled_commitments),
        # The exact kinds: the enrollment proofs the client's deletions are judged with.
        "enrollment_proofs": json.loads(client.enrollment_proofs) if client.enrollment_proofs else [],
    }


def _enrollment_from_leaf(rotation: Mapping[str, Any]) -> dict[str, Any]:
    """The enrollment a re-enrollment leaf replaced, from the leaf alone: a rotation the state recorded
    before it kept replaced enrollments. The leaf has no enrollment proofs (the statement names their
    digest), so an exact-kind client's deletions before it cannot be judged and fail the audit."""
    try:
        previous = rotation["previous_enrollment"]
        payload = SignedStatement.from_wire(
            bytes.fromhex(previous["canonical"]), bytes.fromhex(previous["signature"])
        ).payload
        return {
            "canonical": previous["canonical"],
            "signature": previous["signature"],
            "public_key": payload["public_key"],
            "commitments": payload["commitments"],
            "enrollment_proofs": [],
        }
    except (KeyError, TypeError, ValueError, StatementError) as exc:
        raise BundleExportError(f"a re-enrollment leaf of the log is unreadable: {exc}") from exc


def _enrollment_versions(
    state: ProviderState, client_id: str, rotations: Mapping[int, Mapping[str, Any]], size: int
) -> dict[str, Any]:
    """``enrollments/<client>.json``: the enrollment in force at the end of the exported log, and in
    ``replaced`` every one a re-enrollment of the log replaced, oldest first, each with the index of
    that re-enrollment's leaf (``rotations``: the client's re-enrollment leaves' payloads by index)."""
    client = state.get_client(client_id)
    if client is None:
        raise BundleExportError(f"the log names client {client_id!r}, which the state does not hold")
    kept = {r.replaced_at: r.record for r in state.replaced_enrollments(client_id)}
    # The log may have grown since the snapshot: a rotation past it replaced the one in force at its end.
    later = sorted(i for i in kept if i >= size)
    in_force = kept[later[0]] if later else client
    replaced = [
        {
            "replaced_at": index,
            **(_enrollment_json(kept[index]) if index in kept else _enrollment_from_leaf(rotations[index])),
        }
        for index in sorted(rotations)
    ]
    return {**_enrollment_json(in_force), "replaced": replaced}


def _refuse_existing(out_dir: Path) -> None:
    if Path(out_dir).exists():
        raise BundleExportError(f"{out_dir} already exists; export writes a fresh bundle folder")


def _export(
    out_dir: Path,
    state: ProviderState,
    ledger: Ledger,
    signer_public_key: bytes,
    circuits: Mapping[str, Path],
    srs_sha256: str,
    srs_insecure: bool,
) -> Path:
    out_dir = Path(out_dir)
    _refuse_existing(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        _write_bundle(tmp, state, ledger, signer_public_key, circuits, srs_sha256, srs_insecure)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a bundle is meant to be handed to auditors
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def export_bundle(
    state: ProviderState,
    ledger: Ledger,
    signer_public_key: bytes,
    out_dir: Path,
    *,
    circuits_dir: Path | None = None,
    srs_sha256: str = "",
    srs_insecure: bool = True,
) -> Path:
    """Write the bundle for the log as it is now into ``out_dir`` (which must not exist); returns it.

    ``circuits_dir`` (the provider's settings, verifying keys and circuit specs) is copied verbatim to
    ``circuits/`` so an auditor verifies against the same keys the provider used.
    """
    return _export(
        Path(out_dir),
        state,
        ledger,
        signer_public_key,
        _dir_entries(circuits_dir),
        srs_sha256,
        srs_insecure,
    )


def _dir_entries(circuits_dir: Path | None) -> dict[str, Path]:
    if circuits_dir is None:
        return {}
    if not Path(circuits_dir).is_dir():
        raise BundleExportError(f"circuits dir {circuits_dir} is not a directory")
    return {entry.name: entry for entry in sorted(Path(circuits_dir).iterdir())}


def _existing_state(url: str | None) -> str:
    """The config's state, refused unless it already holds a provider log.

    Opening a mistyped path or an empty database would create a fresh one, and the export would
    then sign a size-0 tree head under the real key: a bundle that audits OK, and a published head
    that makes the log look rolled back to nothing.
    """
    if url is None or url == "memory":
        raise BundleExportError("the config's state is in memory: there is no stored log to export")
    try:
        parsed = sa.engine.make_url(url if "://" in url else f"sqlite+pysqlite:///{Path(url)}")
    except sa.exc.ArgumentError as exc:
        raise BundleExportError(f"state {url!r} is neither a file path nor a database URL: {exc}") from exc
    if parsed.get_backend_name() == "sqlite":
        path = Path(parsed.database or "")
        if not parsed.database or not path.is_file():
            raise BundleExportError(f"state database {path} does not exist (check the config's state path)")
    engine = sa.create_engine(parsed)
    try:
        with engine.connect() as conn:
            held = sa.inspect(conn).has_table("ledger_tip")
    except sa.exc.SQLAlchemyError as exc:
        raise BundleExportError(f"cannot open state {parsed.render_as_string()}: {exc}") from exc
    finally:
        engine.dispose()
    if not held:
        raise BundleExportError(f"state {parsed.render_as_string()} holds no provider log (wrong database?)")
    return url


def _configured_circuits(cfg: ProviderConfig) -> Path:
    """The one circuits directory the config's verifier uses; refused when there is none or several."""
    dirs = {
        model: Path(entry["circuits_dir"])
        for model, entry in cfg.artifacts.items()
        if "circuits_dir" in entry
    }
    if len(dirs) != 1:
        named = ", ".join(sorted(dirs)) or "none"
        raise BundleExportError(
            f"the config names circuits directories for {len(dirs)} models ({named}); pass --circuits-dir "
            "with the directory the exported log's proofs are verified with"
        )
    return next(iter(dirs.values()))


def export_from_config(
    config: str | Path | ProviderConfig,
    out_dir: Path,
    *,
    circuits_dir: Path | None = None,
    without_circuits: bool = False,
) -> Path:
    """Export from a provider's config (TOML path or loaded config): its state, key, SRS and artifacts.

    The key file must already exist: unlike the server, export never creates a key, because a fresh
    key could not have signed anything in the log. Without ``circuits_dir``, the circuits directory the
    config's verifier uses (``[artifacts.<model>] circuits_dir``) is exported: a bundle must carry the
    circuits its proofs are verified with, or it cannot pass its own audit. ``without_circuits``
    exports none, for a log whose proofs an auditor checks with a checker of its own.
    """
    cfg = config if isinstance(config, ProviderConfig) else ProviderConfig.load(config)
    key_path = Path(cfg.key_file)
    if not key_path.exists():
        raise BundleExportError(f"provider key file {key_path} does not exist")
    try:
        signer = StatementSigner.load(key_path)
    except StatementError as exc:
        raise BundleExportError(str(exc)) from exc
    url = _existing_state(cfg.state)
    _refuse_existing(Path(out_dir))
    if circuits_dir is None and without_circuits:
        circuits: dict[str, Path] = {}  # a log whose proofs no ezkl circuit checks (e.g. a load test's)
    else:
        circuits = _dir_entries(circuits_dir if circuits_dir is not None else _configured_circuits(cfg))
    state = open_state(url)
    try:
        ledger = Ledger(state, signer)
        return _export(
            Path(out_dir), state, ledger, signer.public_bytes(), circuits, cfg.srs_digest, cfg.srs_insecure
        )
    finally:
        state.close()
