"""Every failure a user can cause, walked through the CLI: exit status 2 and exactly one stderr
line, ``error: ...``, that names the input and says what to do. Bad audio is no such failure:
it is quarantined and the job succeeds.

The embeddings and quantiser inputs (missing, unfinished, not a quantiser, training checkpoints
of any kind, wrong dimensions in eval) are walked in ``tests/quantizer/test_quantizer_cli.py``.
Cases that need a finished manifest share the session cluster of ``tests/conftest.py`` to build
it; the checks themselves run on the driver before any job work. The rest start no Ray.

In-process runs cannot show an abort at interpreter exit: ``test_user_errors_exit_2_every_time``
runs the console script as a process, three times per case.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from spear.cli.main import run


def one_error_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``spear ARGV``; assert exit status 2 and one ``error:`` line on stderr; return it."""
    capsys.readouterr()
    assert run(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def spear_process(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``spear ARGV`` as its own process (the console script): what a user's shell sees,
    exit status included, which an in-process run cannot show (an abort at interpreter exit)."""
    script = Path(sys.executable).with_name("spear")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "spear.cli.main"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run(
        [*cmd, *argv], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def assert_clean_error_exits(argv: list[str], phrases: list[str], times: int = 3) -> None:
    """Exit status 2 and one ``error:`` line every one of ``times`` runs (a race at exit,
    such as a native thread pool aborting the process, shows as 134 in some runs only)."""
    for attempt in range(times):
        done = spear_process(argv)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2, (attempt, done.returncode, done.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: "), (attempt, done.stderr)
        for phrase in phrases:
            assert phrase in lines[0], lines[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- no Ray needed


def _unfinished_manifest(root: Path) -> str:
    (root / "m" / "manifest").mkdir(parents=True)
    (root / "m" / "manifest" / "part-000-00000-00000.parquet").write_bytes(b"")
    return str(root / "m")


def _cases(root: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (argv, phrases the error line must hold)."""
    yaml_bad = root / "bad.yaml"
    yaml_bad.write_text("manifest: [unclosed\n")
    listed = root / "list.yaml"
    listed.write_text("- a\n- b\n")
    unfinished = _unfinished_manifest(root)
    listing = root / "files.txt"
    listing.write_text("# comments and blank lines are skipped\n\nspeech\ta.wav\nb.wav\tspeech\n")
    none = str(root / "none")
    out = str(root / "out")
    return {
        "unknown-config-key": (
            ["tokenize", "--manifest", none, "--out", out, "--set", "tokenize.items_per_shrd=3"],
            ["'tokenize.items_per_shrd'", "did you mean 'items_per_shard'"],
        ),
        "bad-config-value": (
            ["decode", "--manifest", none, "--out", out, "--set", "decode.resampler=best"],
            ["decode.resampler", "is not one of"],
        ),
        "bad-value-of-either-kind": (
            ["config", "show", "--set", "tokenize.fuse_teachers=maybe"],
            ["tokenize.fuse_teachers", "is not one of 'auto'; or expected true/false"],
        ),
        "config-not-yaml": (
            ["config", "show", "--config", str(yaml_bad)],
            [str(yaml_bad), "is not valid YAML"],
        ),
        "config-not-a-mapping": (
            ["config", "show", "--config", str(listed)],
            [str(listed), "must hold a mapping"],
        ),
        "missing-config": (["config", "show", "--config", none], [none, "does not exist"]),
        "bad-url": (
            ["decode", "--manifest", "nosuch://bucket/m", "--out", out],
            ["'nosuch://bucket/m'", "unsupported storage URL"],
        ),
        "s3-url-without-bucket": (
            ["tokenize", "--manifest", "s3://", "--out", out],
            ["'s3://'", "names no bucket"],
        ),
        "missing-option": (["train", "--shards", none], ["--out is required"]),
        "unknown-option": (["manifest", "--bogus"], ["No such option: --bogus", "spear manifest"]),
        "not-an-integer": (
            ["config", "show", "--set", "manifest.files_per_task=many"],
            ["manifest.files_per_task", "expected an integer"],
        ),
        "missing-manifest": (
            ["embed", "--manifest", none, "--out", out],
            [f"manifest '{none}' does not exist", "run `spear manifest`"],
        ),
        "unfinished-manifest": (
            ["tokenize", "--manifest", unfinished, "--out", out, "--wavlm-quantizer", none],
            [f"'{unfinished}' is not a finished manifest", "resume `spear manifest`"],
        ),
        "missing-source": (
            ["manifest", none, "--out", out],
            [f"source '{none}' does not exist"],
        ),
        "list-file-line-with-a-tab": (
            ["manifest", str(listing), "--out", out],
            [f"list '{listing}' line 4", "'b.wav\\tspeech' is not 'URL' or 'DOMAIN<TAB>URL'"],
        ),
        "not-a-token-output": (
            ["train", "--shards", str(root), "--out", out],
            [str(root), "not a finished tokenize output"],
        ),
    }


CASES = [
    "unknown-config-key",
    "bad-config-value",
    "config-not-yaml",
    "config-not-a-mapping",
    "missing-config",
    "bad-url",
    "s3-url-without-bucket",
    "missing-option",
    "unknown-option",
    "not-an-integer",
    "bad-value-of-either-kind",
    "missing-manifest",
    "unfinished-manifest",
    "missing-source",
    "list-file-line-with-a-tab",
    "not-a-token-output",
]


@pytest.mark.parametrize("name", CASES)
def test_user_errors_are_one_line(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, phrases = _cases(tmp_path)[name]
    line = one_error_line(argv, capsys)
    for phrase in phrases:
        assert phrase in line, line


# Each run is a fresh process (2-4 s on 2 shared cores): one case by default, all with -m slow.
CHEAP_PROCESS_CASES = ["missing-manifest"]


@pytest.mark.parametrize(
    "name",
    [n if n in CHEAP_PROCESS_CASES else pytest.param(n, marks=pytest.mark.slow) for n in CASES],
)
def test_user_errors_exit_2_every_time(name: str, tmp_path: Path) -> None:
    """The console script, three times per case: status 2 and the one line, every run."""
    argv, phrases = _cases(tmp_path)[name]
    assert_clean_error_exits(argv, phrases)


def test_an_unwritable_output_is_one_clear_error(tmp_path: Path) -> None:
    from spear.errors import StorageError
    from spear.storage import StorageConfig, write_atomic

    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="cannot write"):
        write_atomic(str(tmp_path / "file" / "below"), b"data", StorageConfig())


def test_a_ray_address_nobody_answers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    from spear.synth import write_speech_like

    write_speech_like(str(tmp_path / "a"), 1, seconds=(1, 1))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # the session cluster may be up
    address = f"127.0.0.1:{_free_port()}"
    argv = ["manifest", str(tmp_path / "a"), "--out", str(tmp_path / "m"), "--address", address]
    line = one_error_line(argv, capsys)
    assert f"cannot connect to the Ray cluster at '{address}'" in line
    assert "--address / RAY_ADDRESS" in line


def test_a_local_ray_that_does_not_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray's start-up timeout (a bare Exception after its 30 s window), every try."""
    import ray

    from spear.synth import write_speech_like

    tries: list[dict[str, Any]] = []

    def init(**kwargs: Any) -> None:
        tries.append(kwargs)
        raise Exception("The current node timed out during startup.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr("spear.ray_utils.time.sleep", lambda s: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    write_speech_like(str(tmp_path / "a"), 1, seconds=(1, 1))
    argv = ["manifest", str(tmp_path / "a"), "--out", str(tmp_path / "m")]
    line = one_error_line([*argv, "--set", "ray.start_attempts=2"], capsys)
    assert len(tries) == 2 and "address" not in tries[0]
    assert "a local Ray did not start after 2 tries" in line and "timed out" in line
    assert "--address" in line


# ---------------------------------------------------------------- a job server that fails


class _JobServer(BaseHTTPRequestHandler):
    """Answers the version check like Ray's job server; submitting fails as ``mode`` says."""

    mode = "drop"

    def log_message(self, *args: Any) -> None:  # keep the test's stderr to spear's own
        pass

    def do_GET(self) -> None:
        import ray

        body = json.dumps({"ray_version": ray.__version__, "version": "4"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        if self.mode == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.send_response(500)
        self.send_header("Content-Length", "4")
        self.end_headers()
        self.wfile.write(b"boom")


@pytest.fixture
def job_server() -> Iterator[Callable[[str], str]]:
    servers: list[ThreadingHTTPServer] = []

    def start(mode: str) -> str:
        handler = type("Handler", (_JobServer,), {"mode": mode})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


SUBMIT = ["submit", "manifest", "s3://bucket/audio", "--out", "s3://bucket/m"]


def test_submit_to_a_job_server_that_is_not_there(capsys: pytest.CaptureFixture[str]) -> None:
    address = f"http://127.0.0.1:{_free_port()}"
    line = one_error_line([*SUBMIT, "--address", address], capsys)
    assert f"nothing answers as a Ray job server at {address}" in line
    assert "RAY_API_SERVER_ADDRESS" in line


@pytest.mark.parametrize(
    ("mode", "phrase"), [("drop", "ConnectionError"), ("error", "status code 500")]
)
def test_submit_to_a_job_server_that_fails(
    mode: str, phrase: str, job_server: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    address = job_server(mode)
    line = one_error_line([*SUBMIT, "--address", address], capsys)
    assert f"submitting the job at the Ray job server {address} failed" in line and phrase in line


def test_submit_to_a_job_server_that_never_answers(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("spear.submit.ANSWER_TIMEOUT_S", 0.5)
    with socket.socket() as silent:  # accepts connections (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        address = f"http://127.0.0.1:{silent.getsockname()[1]}"
        line = one_error_line([*SUBMIT, "--address", address], capsys)
    assert f"the Ray job server at {address} did not answer in 0.5 s" in line


# ---------------------------------------------------------------- inputs of real jobs (Ray)


@pytest.fixture(scope="module")
def manifest(ray_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A finished manifest of three speech files and one that is not audio (quarantined)."""
    from spear.synth import write_speech_like

    root = tmp_path_factory.mktemp("errors")
    write_speech_like(str(root / "audio"), 3, seconds=(1, 2), seed=5)
    (root / "audio" / "broken.flac").write_bytes(b"fLaC" + b"\x00not audio" * 20)
    out = str(root / "manifest")
    assert run(["manifest", str(root / "audio"), "--out", out]) == 0
    return out


@pytest.mark.integration
@pytest.mark.slow  # a tokenize run in its own process, interrupted: ~40 s
def test_ctrl_c_says_what_was_committed(manifest: str, ray_cluster: str, tmp_path: Path) -> None:
    """SIGINT to the command's process group, as a terminal's Ctrl-C sends it, once units are
    committed: exit 130 and one line with the count and how to resume; no Ray traceback."""
    import signal
    import time

    q = _quantizer(str(tmp_path / "q"), 64, "wavlm-tiny")
    out = tmp_path / "t"
    argv = ["tokenize", "--manifest", manifest, "--out", str(out), "--wavlm", "wavlm-tiny"]
    argv += ["--wavlm-quantizer", q, "--items-per-shard", "1", "--random-teachers"]
    script = Path(sys.executable).with_name("spear")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "spear.cli.main"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ray_cluster}
    proc = subprocess.Popen(
        [*cmd, *argv], stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "_work" / "commits").glob("*.json")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    # Ray Data's executor thread may still log a warning of its own while the process ends.
    said = [line for line in err.strip().splitlines() if line.startswith("interrupted: ")]
    assert len(said) == 1, err
    last = said[0]
    assert last.startswith("interrupted: ") and f"units committed under {out}, kept" in last, err
    assert "run the same command again to resume" in last and "Traceback" not in err, err


@pytest.mark.integration
def test_an_empty_source_is_an_error(
    ray_cluster: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not exit 0 with an empty manifest: one line naming the source; its listing is
    forgotten, so the same command lists it again once it holds audio."""
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.md").write_text("no audio here")
    out = tmp_path / "m"
    line = one_error_line(["manifest", str(tmp_path / "empty"), "--out", str(out)], capsys)
    assert f"source '{tmp_path / 'empty'}' holds no audio file" in line, line
    assert not list((out / "_work" / "listing").glob("*.done.json"))


@pytest.mark.integration
def test_bad_audio_is_quarantined_not_an_error(manifest: str) -> None:
    import pyarrow.parquet as pq

    quarantine = pq.read_table(Path(manifest) / "quarantine").to_pylist()
    assert [Path(r["source"]).name for r in quarantine] == ["broken.flac"]
    done = json.loads((Path(manifest) / "_SUCCESS.json").read_text())
    assert done["items"] >= 3


def _quantizer(url: str, dim: int, teacher: str, weights: str = "") -> str:
    import torch

    from spear.pipeline.quantize import save_quantizer
    from spear.quantizer.mvq import Quantizer, QuantizerInfo
    from spear.storage import StorageConfig

    info = QuantizerInfo(dim=dim, num_codebooks=2, codebook_size=16, teacher=teacher, layer=2)
    info.teacher_weights = weights
    q = Quantizer(info)
    with torch.no_grad():
        q.centers.normal_()
    save_quantizer(q, url, StorageConfig())
    return url


@pytest.mark.integration
@pytest.mark.parametrize(
    ("dim", "teacher", "weights", "phrase"),
    [
        (32, "wavlm-tiny", "", "is for 32-d embeddings; teacher wavlm-tiny gives 64-d"),
        (64, "dasheng-tiny", "", "was trained on dasheng-tiny embeddings, not wavlm-tiny"),
        (
            64,
            "wavlm-tiny",
            "random",
            "was trained on embeddings of wavlm-tiny with random weights, but teacher wavlm-tiny "
            "runs with checkpoint sha256",
        ),
    ],
    ids=["wrong-dimension", "wrong-teacher", "other-weights"],
)
def test_a_quantiser_that_does_not_fit_the_teacher(
    manifest: str,
    dim: int,
    teacher: str,
    weights: str,
    phrase: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    q = _quantizer(str(tmp_path / "q"), dim, teacher, weights)
    argv = ["tokenize", "--manifest", manifest, "--out", str(tmp_path / "t"), "--random-teachers"]
    if weights:  # real weights for the teacher, a quantiser trained on random ones
        argv += ["--wavlm-checkpoint", str(_wavlm_folder(tmp_path / "w"))]
    line = one_error_line([*argv, "--wavlm", "wavlm-tiny", "--wavlm-quantizer", q], capsys)
    assert q in line and phrase in line, line


def _wavlm_folder(path: Path) -> Path:
    """A transformers WavLM folder (config.json + safetensors), tiny."""
    transformers = pytest.importorskip("transformers")
    config = transformers.WavLMConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        conv_dim=(32,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
    )
    transformers.WavLMModel(config).save_pretrained(path)
    return path


def _dasheng_pt(path: Path) -> Path:
    """spear's tiny Dasheng saved in the dasheng package's {'model', 'config'} layout."""
    import torch

    from spear.stages.teachers.dasheng import build_dasheng, dasheng_tiny

    arch = dasheng_tiny()
    config = {"embed_dim": arch.embed_dim, "depth": arch.depth, "num_heads": arch.num_heads}
    torch.save({"model": build_dasheng(arch).state_dict(), "config": config}, path)
    return path


class _Payload:
    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("executed",))


def _checkpoint(kind: str, root: Path) -> tuple[str, str, list[str]]:
    """(teacher, checkpoint, phrases) of a checkpoint that is wrong for the teacher."""
    if kind == "wavlm-folder-as-dasheng":
        return "dasheng", str(_wavlm_folder(root / "wavlm")), ["is a WavLM checkpoint, not Dasheng"]
    if kind == "dasheng-as-wavlm":
        path = str(_dasheng_pt(root / "dasheng.pt"))
        return "wavlm", path, ["is a Dasheng checkpoint, not WavLM", "--dasheng-checkpoint"]
    if kind == "garbage":
        (root / "garbage.pt").write_bytes(b"\x00\x01 not a checkpoint" * 10)
        return "wavlm", str(root / "garbage.pt"), ["cannot read", "as weights-only"]
    if kind == "pickle":
        (root / "pickle.pt").write_bytes(pickle.dumps({"model": _Payload()}))
        return "wavlm", str(root / "pickle.pt"), ["as weights-only", "re-save the state dict"]
    raise AssertionError(kind)


@pytest.mark.integration
@pytest.mark.parametrize(
    "kind", ["wavlm-folder-as-dasheng", "dasheng-as-wavlm", "garbage", "pickle", "wrong-shape"]
)
def test_a_teacher_checkpoint_that_is_wrong(
    manifest: str, kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Read on the driver against the preset before any actor starts: one line, and nothing
    of the job written."""
    if kind == "wrong-shape":
        import torch

        from spear.stages.teachers.dasheng import build_dasheng, dasheng_tiny

        state = build_dasheng(dasheng_tiny()).state_dict()
        state["blocks.0.mlp.fc1.weight"] = torch.zeros(5, 64)
        torch.save(state, tmp_path / "shape.pt")
        teacher, ckpt = "dasheng", str(tmp_path / "shape.pt")
        phrases = ["'blocks.0.mlp.fc1.weight' has shape (5, 64)"]
    else:
        teacher, ckpt, phrases = _checkpoint(kind, tmp_path)
    argv = ["embed", "--manifest", manifest, "--out", str(tmp_path / "e"), "--domain", "all"]
    argv += ["--teacher", teacher, "--name", f"{teacher}-tiny", "--checkpoint", ckpt]
    line = one_error_line(argv, capsys)
    assert ckpt in line, line
    for phrase in phrases:
        assert phrase in line, line
    assert not (tmp_path / "e").exists()


@pytest.mark.integration
@pytest.mark.parametrize("stage", ["embed", "tokenize"])
def test_random_teachers_need_the_flag(
    manifest: str, stage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No checkpoint and no --random-teachers: one line before any job work; with the flag the
    run says once that its weights are random."""
    out = str(tmp_path / "o")
    if stage == "embed":
        argv = ["embed", "--manifest", manifest, "--out", out, "--name", "wavlm-tiny"]
    else:
        q = _quantizer(str(tmp_path / "q"), 64, "wavlm-tiny")
        argv = ["tokenize", "--manifest", manifest, "--out", out, "--wavlm", "wavlm-tiny"]
        argv += ["--wavlm-quantizer", q]
    line = one_error_line(argv, capsys)
    assert "teacher wavlm-tiny has no checkpoint and would run with random weights" in line
    assert "--random-teachers" in line and not Path(out).exists()
