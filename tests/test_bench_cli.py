"""`zkunlearn bench`'s unlearning commands, run through the typer layer on stored per-seed rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from zkunlearn.cli import app

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def _rows_of(task: str, tmp_path: Path) -> Path:
    """The stored seeds file cut down to one task (fast to render)."""
    blob = json.loads((RESULTS / "unlearning_seeds.json").read_text())
    cut = {"rows": [r for r in blob["rows"] if r["task"] == task], "sweep": []}
    path = tmp_path / f"{task}_seeds.json"
    path.write_text(json.dumps(cut))
    return path


def test_finalize_merges_stored_runs_into_one_table(tmp_path: Path) -> None:
    mlp, vit = _rows_of("mlp", tmp_path), _rows_of("vit", tmp_path)
    out = tmp_path / "merged" / "unlearning.json"
    result = CliRunner().invoke(app, ["bench", "unlearning-finalize", str(mlp), str(vit), "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = (out.parent / "unlearning.md").read_text()
    assert "| mlp |" in table
    assert "| vit |" in table
    assert "| code-lm |" not in table


def test_finalize_names_a_missing_seeds_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a short path: the error box wraps long ones
    result = CliRunner().invoke(app, ["bench", "unlearning-finalize", "nope_seeds.json"])
    assert result.exit_code == 2
    assert "nope_seeds.json" in result.output
    assert "does not exist" in result.output
    assert "Traceback" not in result.output


def test_structures_merge_writes_one_table_from_several_runs(tmp_path: Path) -> None:
    rows = json.loads((RESULTS / "unlearning_structures.json").read_text())
    tasks = sorted({r["task"] for r in rows})
    runs = []
    for task in tasks:
        path = tmp_path / task / "unlearning_structures.json"
        path.parent.mkdir()
        path.write_text(json.dumps([r for r in rows if r["task"] == task]))
        runs.append(str(path))
    out = tmp_path / "unlearning_structures.json"
    result = CliRunner().invoke(app, ["bench", "unlearning-structures-merge", *runs, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert len(json.loads(out.read_text())) == len(rows)
    assert all(f"| {task} |" in out.with_suffix(".md").read_text() for task in tasks)
