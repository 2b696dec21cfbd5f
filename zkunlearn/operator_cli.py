"""``zkunlearn provider request | status | receipts | operator-key``: the operator's commands.

They talk to a running provider through its Operator service (never to its database), so they work
the same against one SQLite provider or PostgreSQL replicas. Every refusal is one line on stderr and
a non-zero exit; ``--json`` prints machine-readable results on stdout.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)
ConfigOption = Annotated[Path, typer.Option(help="the provider's TOML config (its operator section)")]
TargetOption = Annotated[str | None, typer.Option(help="host:port of the provider (default: from config)")]
KeyOption = Annotated[Path | None, typer.Option(help="operator key file (default: operator.key_file)")]
JsonOption = Annotated[bool, typer.Option("--json", help="machine-readable output on stdout")]


def _fail(message: str, code: int = 2) -> typer.Exit:
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)  # one line, however long
    return typer.Exit(code=code)


@contextmanager
def _operator(config: Path, target: str | None, key: Path | None) -> Iterator[Any]:
    from zkunlearn.provider.config import ConfigError, ProviderConfig
    from zkunlearn.provider.operator_client import OperatorCallError, OperatorClient, OperatorSetupError

    try:
        loaded = ProviderConfig.load(config)
        client = OperatorClient.from_config(loaded, target=target, key_file=str(key) if key else None)
    except (ConfigError, OperatorSetupError) as exc:
        raise _fail(str(exc)) from exc
    try:
        yield loaded, client
    except (OperatorCallError, OperatorSetupError) as exc:
        raise _fail(str(exc), code=1) from exc
    finally:
        client.close()


def register(provider_app: typer.Typer) -> None:
    """Add the operator's commands to ``zkunlearn provider``."""
    receipts_app = typer.Typer(help="The provider's receipts: the signed verdicts in its log.")
    provider_app.add_typer(receipts_app, name="receipts")
    commands = (
        ("request", request),
        ("status", status),
        ("operator-key", operator_key),
        ("key", provider_key),
    )
    for name, command in commands:
        provider_app.command(name)(command)
    receipts_app.command("list")(receipts_list)
    receipts_app.command("show")(receipts_show)


def _ids(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise _fail(f"--ids must be comma-separated sample ids, got {text[:80]!r}") from exc


def request(
    config: ConfigOption = Path("provider.toml"),
    forget_class: Annotated[
        int | None, typer.Option("--class", help="forget this class of the model's data")
    ] = None,
    ids: Annotated[
        str | None, typer.Option(help="forget these sample ids of the model's data: 3,17,42")
    ] = None,
    samples: Annotated[
        Path | None, typer.Option(help=".npz with x (inputs) and y (labels) to forget")
    ] = None,
    model: Annotated[str | None, typer.Option(help="model id (default: the config's only planner)")] = None,
    client: Annotated[
        list[str] | None, typer.Option(help="a client to ask (repeatable; default: all)")
    ] = None,
    score: Annotated[str, typer.Option(help="mask score (default: the model's)")] = "",
    fraction: Annotated[float, typer.Option(help="mask fraction in (0, 1) (default: the model's)")] = 0.0,
    structure: Annotated[str, typer.Option(help="unstructured, block, neuron or budget")] = "",
    ttl_s: Annotated[int, typer.Option(help="request lifetime in seconds (0: the provider's)")] = 0,
    target: TargetOption = None,
    key: KeyOption = None,
    json_output: JsonOption = False,
) -> None:
    """Issue a deletion request to a model's clients through the running provider."""
    from zkunlearn.provider.operator import DeletionOrder
    from zkunlearn.provider.operator_client import OperatorSetupError, load_forget_file
    from zkunlearn.provider.planning import ForgetSelection, MaskOptions

    if sum(x is not None for x in (forget_class, ids, samples)) != 1:
        raise _fail("name what to forget with exactly one of --class, --ids or --samples")
    if fraction and not 0.0 < fraction < 1.0:
        raise _fail(f"--fraction must be in (0, 1), got {fraction}")
    if forget_class is not None and forget_class < 0:
        raise _fail(f"--class must be >= 0, got {forget_class}")
    if ttl_s < 0:
        raise _fail(f"--ttl-s must be >= 0, got {ttl_s}")
    try:
        if samples is not None:
            selection = load_forget_file(samples)
        else:
            selection = ForgetSelection(forget_class=forget_class, sample_ids=_ids(ids))
    except OperatorSetupError as exc:
        raise _fail(str(exc)) from exc
    options = MaskOptions(score, round(fraction * 1e6), structure)
    with _operator(config, target, key) as (loaded, operator):
        model_id = model or _only_model(loaded.planners)
        order = DeletionOrder(model_id, tuple(client or ()), selection, options, ttl_s)
        response = operator.create_requests(order)
    rows = [
        {
            "request_id": r.request_id,
            "client_id": r.client_id,
            "mask_sha256": r.mask_sha256,
            "masked_weights": r.masked_weights,
            "forget_samples": r.forget_samples,
        }
        for r in response.requests
    ]
    if json_output:
        print(json.dumps({"model_id": model_id, "requests": rows}, indent=2))
        return
    table = Table("request", "client", "masked weights", "forget samples", "mask sha256", title=model_id)
    for row in rows:
        table.add_row(
            row["request_id"], row["client_id"], str(row["masked_weights"]), str(row["forget_samples"]),
            row["mask_sha256"][:16],
        )  # fmt: skip
    console.print(table)


def _only_model(planners: dict[str, Any] | Any) -> str:
    names: list[str] = sorted(planners)
    if len(names) != 1:
        raise _fail(f"name the model with --model (the config's planners: {names or 'none'})")
    return names[0]


def status(
    config: ConfigOption = Path("provider.toml"),
    target: TargetOption = None,
    key: KeyOption = None,
    json_output: JsonOption = False,
) -> None:
    """Clients, requests, verdicts and the log's size and root of the running provider."""
    from zkunlearn.proofs.statements import SignedStatement

    with _operator(config, target, key) as (_, operator):
        response = operator.status()
    head = SignedStatement.from_wire(bytes(response.tree_head.canonical), bytes(response.tree_head.signature))
    out = {
        "clients": response.clients,
        "requests": response.requests,
        "answered_requests": response.answered_requests,
        "pending_submissions": response.pending_submissions,
        "accepted_submissions": response.accepted_submissions,
        "rejected_submissions": response.rejected_submissions,
        "log_size": head.payload["tree_size"],
        "log_root": head.payload["root_hash"],
        "models": list(response.model_ids),
    }
    if json_output:
        print(json.dumps(out, indent=2))
        return
    table = Table("", "", title="provider status", show_header=False)
    for name, value in out.items():
        table.add_row(name.replace("_", " "), ", ".join(value) if isinstance(value, list) else str(value))
    console.print(table)


_VERDICTS = {1: "pending", 2: "accepted", 3: "rejected"}


def _receipt_rows(items: Any) -> list[dict[str, Any]]:
    from zkunlearn.proofs.statements import SignedStatement

    rows = []
    for item in items:
        statement = SignedStatement.from_wire(bytes(item.receipt.canonical), bytes(item.receipt.signature))
        rows.append(
            {
                "leaf_index": item.receipt.leaf_index,
                "request_id": item.request_id,
                "client_id": item.client_id,
                "verdict": _VERDICTS.get(int(item.verdict), str(item.verdict)),
                "reason": statement.payload.get("reason", ""),
                "receipt": statement.to_dict(),
            }
        )
    return rows


def receipts_list(
    config: ConfigOption = Path("provider.toml"),
    start: Annotated[int, typer.Option(help="first log index")] = 0,
    limit: Annotated[int, typer.Option(help="at most this many (1..1000)")] = 100,
    target: TargetOption = None,
    key: KeyOption = None,
    json_output: JsonOption = False,
) -> None:
    """List logged receipts from ``--start``."""
    if start < 0 or not 1 <= limit <= 1000:
        raise _fail("--start must be >= 0 and --limit in 1..1000")
    with _operator(config, target, key) as (_, operator):
        response = operator.receipts(start, limit)
    rows = _receipt_rows(response.receipts)
    if json_output:
        print(json.dumps({"log_size": response.log_size, "receipts": rows}, indent=2))
        return
    table = Table("index", "request", "client", "verdict", "reason", title=f"log size {response.log_size}")
    for row in rows:
        table.add_row(
            str(row["leaf_index"]), row["request_id"], row["client_id"], row["verdict"], row["reason"]
        )
    console.print(table)


def receipts_show(
    index: Annotated[int, typer.Argument(help="log index of the receipt")],
    config: ConfigOption = Path("provider.toml"),
    target: TargetOption = None,
    key: KeyOption = None,
) -> None:
    """Print one logged receipt, with its signed statement, as JSON."""
    if index < 0:
        raise _fail("the log index must be >= 0")
    with _operator(config, target, key) as (_, operator):
        response = operator.receipts(index, 1)
    rows = _receipt_rows(response.receipts)
    if not rows:
        raise _fail(f"no receipt at log index {index} (log size {response.log_size})", code=1)
    print(json.dumps(rows[0], indent=2))


def operator_key(
    out: Annotated[Path, typer.Option(help="where to write the new private key (0600)")] = Path(
        "operator.key"
    ),
) -> None:
    """Create an operator key; add the printed public key to the provider's operator.public_keys."""
    from zkunlearn.proofs.statements import StatementError, StatementSigner

    signer = StatementSigner.generate()
    try:
        signer.save(out)
    except (OSError, StatementError) as exc:
        raise _fail(str(exc)) from exc
    console.print(
        f"operator key written to {out}; add its public key to [operator] public_keys:", markup=False
    )
    print(signer.public_bytes().hex())


def provider_key(
    config: ConfigOption = Path("provider.toml"),
    json_output: JsonOption = False,
) -> None:
    """Print the provider's public key (hex) for clients and auditors to pin; creates the key if missing."""
    from zkunlearn.proofs.statements import StatementError
    from zkunlearn.provider.config import ConfigError, ProviderConfig
    from zkunlearn.provider.server import load_signer

    try:
        signer = load_signer(ProviderConfig.load(config).key_file)
    except (ConfigError, OSError, StatementError) as exc:
        raise _fail(str(exc)) from exc
    if json_output:
        print(json.dumps({"public_key": signer.public_bytes().hex(), "key_id": signer.key_id}))
    else:
        print(signer.public_bytes().hex())
