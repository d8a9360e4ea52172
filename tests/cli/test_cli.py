"""The CLI's contract: help for every command, config resolution, shipped configs, and the
URL options `spear submit` knows (one-line errors: test_errors.py)."""

from __future__ import annotations

import json
import threading
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


def test_every_shipped_config_file_loads() -> None:
    from spear.config import load_config

    root = Path(__file__).resolve().parents[2]
    files = [*root.glob("configs/*.yaml"), *root.glob("deploy/**/spear*.yaml")]
    assert files, "no shipped config files found"
    for f in files:
        cfg = load_config(f)
        assert cfg.ray is not None


def _stage_options() -> list[tuple[str, list[str], str]]:
    """(command, flag names, help) of every option of every command `spear submit` runs."""
    import typer.main

    from spear.cli.submit import _NOT_STAGES

    out = []
    root = typer.main.get_command(app)
    for name, cmd in root.commands.items():  # type: ignore[attr-defined]
        if name in _NOT_STAGES:
            continue
        for sub, leaf in (getattr(cmd, "commands", None) or {"": cmd}).items():
            for p in leaf.params:
                if p.param_type_name == "option":
                    out.append((f"{name} {sub}".strip(), list(p.opts), p.help or ""))
    return out


def test_every_url_option_of_every_stage_is_one_submit_treats_as_a_url() -> None:
    """Judged by its help (a URL, folder or path: what the option is for), not by how it was
    declared: an option declared without `url_option` fails here."""
    import re

    from spear.cli.common import FILE_OPTIONS, URL_OPTIONS

    storage = re.compile(r"\bURL\b|\bfolder\b|\bpath\b")
    found = [
        (cmd, opts)
        for cmd, opts, text in _stage_options()
        if storage.search(text) and not set(opts) & set(FILE_OPTIONS)
    ]
    assert len(found) >= 20
    for cmd, opts in found:
        assert set(opts) <= URL_OPTIONS, f"spear {cmd} {opts[0]} is not a registered URL option"
    flags = {o for _, opts, _ in _stage_options() for o in opts}
    assert flags >= URL_OPTIONS, "a registered URL option no stage has"


def test_submit_notes_every_local_path_of_a_url_option(capsys) -> None:
    args = ["tokenize", "--manifest", "m", "-o", "t", "--wavlm-quantizer=q", "--wavlm-checkpoint"]
    assert run(["submit", *args, "w.pt", "--address", "http://h:8265", "--dry-run"]) == 0
    err = capsys.readouterr().err
    for path in ("m", "t", "q", "w.pt"):
        assert f"note: {path} is a local path" in err, err


def test_ctrl_c_says_what_was_committed_and_how_to_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One line from the job's own plan and commit entries, exit 130; also when the Ctrl-C
    arrives as Ray's error about a dead actor (its workers got the signal first)."""
    from spear.cli import interrupt

    out = tmp_path / "e"
    (out / "_work" / "commits").mkdir(parents=True)
    (out / "_work" / "plan.json").write_text(json.dumps({"kind": "embed", "units": 5}))
    for n in ("shard-00000", "shard-00003"):
        (out / "_work" / "commits" / f"{n}.json").write_text("{}")

    def ctrl_c(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("spear.pipeline.embed.run_embed", ctrl_c)
    argv = ["embed", "--manifest", str(tmp_path / "m"), "--out", str(out), "--random-teachers"]
    capsys.readouterr()
    assert run(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"interrupted: 2 of 5 units committed under {out}, kept; run the same command again to "
        "resume"
    ]

    def actor_died(*args: object, **kwargs: object) -> None:
        raise RuntimeError("The actor died unexpectedly before finishing this task.")

    monkeypatch.setattr("spear.pipeline.embed.run_embed", actor_died)
    monkeypatch.setattr(interrupt, "_SIGNALLED", threading.Event())
    interrupt._SIGNALLED.set()
    assert run([*argv[:3], "--out", str(tmp_path / "new")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["interrupted: run the same command again to resume (what it committed is kept)"]
