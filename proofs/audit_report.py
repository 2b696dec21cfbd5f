"""The offline audit's report: one OK or FAIL item per check, as JSON or as a rich table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.markup import escape
from rich.table import Table


@dataclass(frozen=True)
class AuditItem:
    item: str
    ok: bool
    reason: str = ""


@dataclass
class AuditReport:
    bundle: str
    key_pinned: bool = False
    provider_key_id: str = ""
    tree_size: int = 0
    items: list[AuditItem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True only if something was checked and nothing failed: an empty audit proves nothing."""
        return bool(self.items) and all(i.ok for i in self.items)

    @property
    def items_checked(self) -> int:
        return len(self.items)

    @property
    def failures(self) -> list[dict[str, str]]:
        return [{"item": i.item, "reason": i.reason} for i in self.items if not i.ok]


def report_json(report: AuditReport) -> dict[str, Any]:
    return {
        "bundle": report.bundle,
        "ok": report.ok,
        "key_pinned": report.key_pinned,
        "provider_key_id": report.provider_key_id,
        "tree_size": report.tree_size,
        "items_checked": report.items_checked,
        "failures": report.failures,
        "items": [{"item": i.item, "ok": i.ok, "reason": i.reason} for i in report.items],
    }


def render_table(report: AuditReport) -> Table:
    # Everything but the verdict words comes from the bundle, which anyone can edit: escaped, so that
    # text such as "[/x]" is shown as written instead of crashing rich's markup parser.
    verdict = "[green]OK[/green]" if report.ok else "[red]FAIL[/red]"
    pinned = "pinned" if report.key_pinned else "[yellow]NOT pinned[/yellow]"
    table = Table(
        title=f"Audit of {escape(report.bundle)}: {verdict}",
        caption=(
            f"provider key {escape(report.provider_key_id or '?')} ({pinned}); "
            f"log size {report.tree_size}; "
            f"{report.items_checked} checks, {len(report.failures)} failed"
        ),
    )
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    for item in report.items:
        table.add_row(
            escape(item.item), "[green]OK[/green]" if item.ok else "[red]FAIL[/red]", escape(item.reason)
        )
    return table
