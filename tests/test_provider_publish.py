"""`zkunlearn provider publish` and `provider key`: what a provider with its own model runs first.

The published config is loaded by the provider's own config model and its verifier factory, so a
line the command prints that the provider could not use fails here."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner
from zkunlearn.provider.server import load_signer

from zkunlearn.cli import app

runner = CliRunner()


def test_key_prints_the_public_key_devices_pin_and_keeps_it(tmp_path: Path) -> None:
    key = tmp_path / "provider.key"
    config = tmp_path / "provider.toml"
    config.write_text(f'state = "{tmp_path / "p.db"}"\nkey_file = "{key}"\n')
    first = runner.invoke(app, ["provider", "key", "--config", str(config)])
    assert first.exit_code == 0, first.output
    assert first.output.strip() == load_signer(key).public_bytes().hex()
    again = runner.invoke(app, ["provider", "key", "--config", str(config)])
    assert again.output == first.output  # created once, then read


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layer", "fc1.weight=100"], "not a multiple of the block size 16"),
        (["--layer", "fc1.weight"], "expected NAME=WEIGHTS"),
        (["--analytic-head", "8,10"], "expected D,K,N_U"),
        (["--no-group-obs"], "nothing to publish"),
    ],
)
def test_publish_refuses_what_does_not_fit_before_building(
    tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "circuits"
    result = runner.invoke(
        app, ["provider", "publish", "--model-id", "mine", "--out", str(out), "--block", "16", *args]
    )
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert not out.exists()  # refused before anything was built


@pytest.mark.ezkl
def test_published_lines_are_a_config_the_provider_loads_and_verifies_with(tmp_path: Path) -> None:
    from zkunlearn.provider.config import ProviderConfig
    from zkunlearn.provider.verification import from_config

    out = tmp_path / "circuits"
    result = runner.invoke(
        app,
        [
            "provider", "publish", "--model-id", "mine", "--out", str(out), "--block", "16", "--rank", "8",
            "--batch", "2", "--layer", "fc1.weight=48", "--layer", "head.weight=160",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "# fc1.weight: 2 proof(s) per full deletion" in result.output  # 3 blocks, one padding block
    assert "# head.weight: 5 proof(s)" in result.output
    lines = [line for line in result.output.splitlines() if not line.startswith("#")]
    config = tmp_path / "provider.toml"
    config.write_text(
        "\n".join(
            [
                f'state = "{tmp_path / "p.db"}"',
                f'key_file = "{tmp_path / "p.key"}"',
                "srs_insecure = true",
                *lines,
                "",
            ]
        )
    )
    loaded = ProviderConfig.load(config)
    assert set(loaded.artifacts) == {"mine", "mine/group_obs_exact"}
    served = loaded.artifacts["mine/group_obs_exact"]
    assert set(served) == {"index", "settings", "enrollment_settings", "srs"}
    assert all(Path(path).is_file() for path in served.values())
    assert from_config(loaded) is not None  # the verifier finds and loads the published circuits


def test_no_two_cli_commands_share_a_name() -> None:
    """typer lets a later registration silently replace an earlier command of the same name."""
    import typer

    def names(group: typer.Typer, prefix: str) -> list[str]:
        found = [
            f"{prefix}{c.name or (c.callback.__name__ if c.callback else '')}"
            for c in group.registered_commands
        ]
        for sub in group.registered_groups:
            assert sub.typer_instance is not None
            found += names(sub.typer_instance, f"{prefix}{sub.name} ")
        return found

    everything = names(app, "")
    assert len(everything) > 20
    assert sorted({n for n in everything if everything.count(n) > 1}) == []
