"""The offline auditor: re-check a provider's exported bundle without trusting the provider.

The auditor runs alone (it imports only ``zkunlearn.circuits`` and its own package) and reports every
check as an item that is OK or FAIL with a reason naming the file and field, so a failed audit says
*what* was wrong rather than only *that* something was. A malformed bundle (missing file, bad JSON,
bad hex) is a FAIL item, never a traceback.

The bundle's format is described in :mod:`zkunlearn.proofs.audit_format`.

Checks: (1) every head is signed by the provider key (pinned by the caller, or else taken from the
manifest, which the report says), sizes increase, consecutive heads are consistent, and the latest
root is recomputed from all leaves; (2) every leaf is a valid provider receipt included under the
latest head; (3) cross-checks, because a valid proof *of something else* must fail (cosign
GHSA-8gw7-4j42-w388): the receipt binds the request's exact bytes, client, mask digest, the
submission's proof digest and after-commitments; (4) per client, accepted receipts chain
enrollment -> after -> before -> ... through its re-enrollments, and the bundle's enrollments of the
client are exactly the ones its re-enrollment leaves name; (5) every exact-kind enrollment's proofs
and each accepted receipt's proofs verify, with verifying keys the auditor first rebuilt from the
published specs (``circuits/``: same ONNX, sound settings, same vk), an exact-kind deletion judged
with the norms of the enrollment in force at its place in the log; (6) every tree head the caller
already holds (``known_heads``: one a client kept after checking its receipt, or a monitor's) is a
prefix of this log.

Only (6) catches a provider that exports a *truncated* log: a prefix of its log together with its own
older signed heads is self-consistent, so nothing inside the bundle can reveal what was cut off.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from zkunlearn.proofs.audit_checks import Auditor, default_proof_checker
from zkunlearn.proofs.audit_format import BUNDLE_FORMAT, CircuitChecker, Forget, ProofChecker
from zkunlearn.proofs.audit_report import AuditItem, AuditReport, render_table, report_json

if TYPE_CHECKING:
    from zkunlearn.proofs.backend import ProvingBackend

__all__ = [
    "BUNDLE_FORMAT",
    "AuditItem",
    "AuditReport",
    "Forget",
    "ProofChecker",
    "audit_bundle",
    "default_proof_checker",
    "main",
    "render_table",
    "report_json",
]


def audit_bundle(
    bundle_dir: Path,
    *,
    provider_public_key: bytes | None = None,
    proof_checker: ProofChecker | None = None,
    known_heads: Sequence[tuple[str, Any]] = (),
    circuit_checker: CircuitChecker | None = None,
    backend: ProvingBackend | None = None,
) -> AuditReport:
    """Check everything in the bundle; never raises on a malformed bundle (it becomes FAIL items).

    ``provider_public_key`` pins the key the provider is known by; without it the manifest's key is
    used and the report says so, since a forger could then sign a whole fake bundle consistently.
    ``known_heads``: ``(name, parsed JSON)`` of tree heads the caller holds (see ``Auditor.known``).
    ``circuit_checker`` rebuilds the bundle's verifying keys from the published specs before any proof
    is trusted to them; by default it runs with the default proof checker (a custom proof checker
    brings its own notion of circuits, so it runs only if given). ``backend`` (e.g. a
    :class:`~zkunlearn.proofs.verify_pool.PooledEzklBackend`) makes the default checkers' ezkl calls.
    """
    report = AuditReport(bundle=str(bundle_dir))
    if provider_public_key is not None and len(provider_public_key) != 32:
        report.items.append(
            AuditItem("provider key", False, f"pinned key must be 32 bytes, got {len(provider_public_key)}")
        )
        return report
    Auditor(
        Path(bundle_dir), report, provider_public_key, proof_checker, known_heads, circuit_checker, backend
    ).run()
    return report


def main(
    bundle: Path,
    json_output: bool = False,
    provider_key_hex: str | None = None,
    known_head_files: Sequence[Path] = (),
    workers: int = 1,
) -> int:
    """CLI body: print the table (or JSON) and return 0 only if every check passed (2: bad arguments).
    ``workers`` > 1 verifies each submission's proofs on that many ezkl processes."""
    console = Console()
    known: list[tuple[str, Any]] = []
    for path in known_head_files:
        try:
            known.append((str(path), json.loads(Path(path).read_text())))
        except (OSError, ValueError) as exc:
            console.print(
                f"[red]--known-head {escape(str(path))}: not a readable JSON file: {escape(str(exc))}[/red]"
            )
            return 2
    key: bytes | None = None
    if provider_key_hex:
        try:
            key = bytes.fromhex(provider_key_hex.strip())
        except ValueError:
            console.print(
                "[red]--provider-key must be the provider's 32-byte Ed25519 public key in hex[/red]"
            )
            return 2
        if len(key) != 32:
            console.print(f"[red]--provider-key is {len(key)} bytes; an Ed25519 public key is 32[/red]")
            return 2
    if workers < 1:
        console.print(f"[red]--workers must be at least 1, got {workers}[/red]")
        return 2
    if workers == 1:
        report = audit_bundle(Path(bundle), provider_public_key=key, known_heads=known)
    else:
        from zkunlearn.proofs.verify_pool import PooledEzklBackend, VerifierPool

        with VerifierPool(workers) as pool:
            report = audit_bundle(
                Path(bundle), provider_public_key=key, known_heads=known, backend=PooledEzklBackend(pool)
            )
    if json_output:
        print(json.dumps(report_json(report), indent=1, sort_keys=True))
    else:
        console.print(render_table(report))
    return 0 if report.ok else 1
