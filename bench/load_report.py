"""The load benchmark's outputs: ``load.json``, its Markdown table and its latency plot."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["render_markdown", "render_plot", "write_results"]


def write_results(records: Sequence[Mapping[str, Any]], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(list(records), indent=2) + "\n")
    out.with_suffix(".md").write_text(render_markdown(records))
    render_plot(records, out.with_suffix(".png"))


def render_plot(records: Sequence[Mapping[str, Any]], path: Path) -> None:
    """p50 bars with p99 whiskers per RPC, one colour per run: where the time goes under load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rpcs = sorted({name for r in records for name in r["rpc_latency_ms"]})
    fig, ax = plt.subplots(figsize=(max(10.0, 1.8 * len(rpcs)), 4.5))
    width = 0.8 / max(1, len(records))
    for k, r in enumerate(records):
        p50 = [r["rpc_latency_ms"].get(n, {}).get("p50", float("nan")) for n in rpcs]
        p99 = [r["rpc_latency_ms"].get(n, {}).get("p99", float("nan")) for n in rpcs]
        xs = [i + k * width for i in range(len(rpcs))]
        label = f"{r['clients']} {r.get('mode', 'real')}, {r['replicas']}x {r['backend']}"
        label += f", {len(r['kills'])} kills" if r["kills"] else ""
        ax.bar(xs, p50, width, label=label)
        ax.errorbar(xs, p50, yerr=[[0] * len(p50), [b - a for a, b in zip(p50, p99, strict=True)]],
                    fmt="none", ecolor="black", capsize=2, linewidth=0.8)  # fmt: skip
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rpcs))], rpcs, rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel("latency ms (bar p50, whisker p99)")
    ax.set_title("zkunlearn bench load: RPC latency seen by simulated edge clients")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_markdown(records: Sequence[Mapping[str, Any]]) -> str:
    rpcs = sorted({name for r in records for name in r["rpc_latency_ms"]})
    head = (
        "| clients | replicas | backend | proofs | kills | requests | acked | found | lost | dup | "
        "accepted / rejected | wrong | verdicts/s | wall s | audit |\n|" + "---|" * 15 + "\n"
    )
    rows = ""
    for r in records:
        verdicts = r.get("verdicts", {})
        audit = "OK" if r.get("audit", {}).get("ok") else "FAIL" if "audit" in r else "–"
        rows += (
            f"| {r['clients']} | {r['replicas']} | {r['backend']} | {r.get('mode', 'real')} | "
            f"{len(r['kills'])} | {r['requests']} | {r['receipts_acked']} | {r['receipts_found']} | "
            f"{r['lost']} | {r['duplicated']} | "
            f"{verdicts.get('accepted', '?')} / {verdicts.get('rejected', '?')} | {r['wrong_verdicts']} | "
            f"{r['verifications_per_s']} | {r['wall_s']} | {audit} |\n"
        )
    lat_head = "\n| run | " + " | ".join(f"{n} p50 / p99 ms" for n in rpcs) + " |\n"
    lat_head += "|---|" + "---|" * len(rpcs) + "\n"
    lat_rows = ""
    for r in records:
        cells = []
        for n in rpcs:
            p = r["rpc_latency_ms"].get(n)
            cells.append(f"{p['p50']:.0f} / {p['p99']:.0f}" if p and p["n"] else "–")
        label = f"{r['clients']} {r.get('mode', 'real')}, {r['replicas']}× {r['backend']}"
        label += f", {len(r['kills'])} kills" if r["kills"] else ""
        lat_rows += f"| {label} | " + " | ".join(cells) + " |\n"
    return head + rows + lat_head + lat_rows
