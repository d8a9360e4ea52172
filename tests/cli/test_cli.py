"""The CLI's contract: help for every command, config resolution, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from spear.cli.main import app, run


def _commands() -> list[list[str]]:
    import typer.main

    root = typer.main.get_command(app)
    out = []
    for name, cmd in root.commands.items():  # type: ignore[attr-defined]
        out.append([name])
        for sub in getattr(cmd, "commands", {}):
            out.append([name, sub])
    return out


@pytest.mark.parametrize("cmd", _commands(), ids=lambda c: " ".join(c))
def test_every_command_has_help_for_every_option(cmd: list[str], capsys) -> None:
    assert run([*cmd, "--help"]) == 0
    text = capsys.readouterr().out
    assert "Usage:" in text
    import typer.main

    node = typer.main.get_command(app)
    for part in cmd:
        node = node.commands[part]  # type: ignore[attr-defined]
    for param in node.params:
        if param.param_type_name == "option" and param.name != "help":
            assert getattr(param, "help", None), f"{' '.join(cmd)} --{param.name} has no help"


def test_config_show_resolves_file_then_set(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("manifest:\n  speech_segment_seconds: 20\n  audio_window_seconds: 5\n")
    assert (
        run(["config", "show", "--config", str(cfg), "--set", "manifest.audio_window_seconds=8"])
        == 0
    )
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["manifest"]["speech_segment_seconds"] == 20.0
    assert shown["manifest"]["audio_window_seconds"] == 8.0
    assert shown["decode"]["sample_rate"] == 16000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["config", "show", "--set", "manifest.speech_segmnt_seconds=3"], "did you mean"),
        (["config", "show", "--set", "decode.resampler=best"], "is not one of"),
        (["config", "show", "--set", "manifest.files_per_task=many"], "expected an integer"),
        (["config", "show", "--config", "/no/such.yaml"], "does not exist"),
        (["manifest", "--bogus"], "No such option"),
        (["manifest", "x", "--out", "nosuch://y"], "unsupported storage URL"),
        (["decode", "--manifest", "m"], "required"),
    ],
)
def test_errors_are_one_line(args: list[str], message: str, capsys) -> None:
    assert run(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_every_shipped_config_file_loads() -> None:
    from spear.config import load_config

    root = Path(__file__).resolve().parents[2]
    files = [*root.glob("configs/*.yaml"), *root.glob("deploy/**/spear*.yaml")]
    assert files, "no shipped config files found"
    for f in files:
        cfg = load_config(f)
        assert cfg.ray is not None


def test_unfinished_manifest_and_unwritable_output_fail_in_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "m" / "manifest").mkdir(parents=True)
    (tmp_path / "m" / "manifest" / "part-000-00000-00000.parquet").write_bytes(b"")
    assert run(["decode", "--manifest", str(tmp_path / "m"), "--out", str(tmp_path / "o")]) == 2
    assert "not a finished manifest" in capsys.readouterr().err

    from spear.errors import StorageError
    from spear.storage import StorageConfig, write_atomic

    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="cannot write"):
        write_atomic(str(tmp_path / "file" / "below"), b"data", StorageConfig())
