"""``spear submit``: the submission it builds, and real jobs on a Ray head started here.

The head is this test's own (``ray start --head --block`` on loopback, its own ports and temp
dir), not the session cluster of ``tests/conftest.py``. It is ended by signalling the process
group it was started in: ``ray stop`` would also stop every other Ray on this machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from spear.cli.main import run
from spear.cli.submit import stage_command


def dry_run(args: list[str], capsys) -> list[str]:
    assert run(["submit", *args, "--address", "http://head:8265", "--dry-run"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith("#")]
    assert len(lines) == 1
    return shlex.split(lines[0])


def _opt(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_dry_run_prints_the_ray_job_submit_line(capsys, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never-forwarded")
    cmd = dry_run(
        ["tokenize", "--manifest", "s3://b/m", "--out", "s3://b/t", "--env", "A=1"], capsys
    )
    assert cmd[:3] == ["ray", "job", "submit"]
    assert _opt(cmd, "--address") == "http://head:8265"
    assert _opt(cmd, "--submission-id").startswith("spear-tokenize-")
    env = json.loads(_opt(cmd, "--runtime-env-json"))["env_vars"]
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000" and env["A"] == "1"
    assert "AWS_SECRET_ACCESS_KEY" not in env
    assert _opt(cmd, "--entrypoint-num-cpus") == "1"
    assert "--entrypoint-num-gpus" not in cmd
    sep = cmd.index("--")
    assert cmd[sep + 1 :] == ["spear", "tokenize", "--manifest", "s3://b/m", "--out", "s3://b/t"]


def test_dry_run_line_uses_options_ray_knows(capsys) -> None:
    cmd = dry_run(
        [
            "embed",
            "--manifest",
            "s3://b/m",
            "--out",
            "s3://b/e",
            "--entrypoint-resources",
            '{"head": 1}',
            "--entrypoint-num-gpus",
            "0.5",
        ],
        capsys,
    )
    ours = [w for w in cmd[: cmd.index("--")] if w.startswith("--")]
    ray = Path(sys.executable).parent / "ray"
    res = subprocess.run(
        [str(ray), "job", "submit", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    for opt in ours:
        assert re.search(rf"\s{re.escape(opt)}\b", res.stdout), f"ray job submit has no {opt}"
    assert json.loads(_opt(cmd, "--entrypoint-resources")) == {"head": 1.0}


def test_quantizer_train_driver_gets_a_gpu_unless_cpu(capsys) -> None:
    base = ["quantizer", "train", "--embeddings", "s3://b/e", "--out", "s3://b/q"]
    assert _opt(dry_run(base, capsys), "--entrypoint-num-gpus") == "1"
    cmd = dry_run([*base, "--device", "cpu"], capsys)
    assert "--entrypoint-num-gpus" not in cmd
    assert cmd[cmd.index("--") + 1 :][:3] == ["spear", "quantizer", "train"]


def test_config_file_travels_in_the_working_dir(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("manifest:\n  min_seconds: 0.5\n")
    cmd = dry_run(["manifest", "s3://b/a", "--out", "s3://b/m", "--config", str(cfg)], capsys)
    wdir = Path(json.loads(_opt(cmd, "--runtime-env-json"))["working_dir"])
    shipped = _opt(cmd, "--config")
    assert (wdir / shipped).read_text() == cfg.read_text()
    assert not Path(shipped).is_absolute()
    shutil.rmtree(wdir)  # a dry run leaves it for the printed command
    # With --working-dir the file must be inside it; its path becomes relative.
    cmd = dry_run(
        [
            "manifest",
            "s3://b/a",
            "--out",
            "s3://b/m",
            f"--config={cfg}",
            "--working-dir",
            str(tmp_path),
        ],
        capsys,
    )
    assert "--config=run.yaml" in cmd
    assert json.loads(_opt(cmd, "--runtime-env-json"))["working_dir"] == str(tmp_path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tokenize", "--manfest", "x"], "No such option: --manfest"),
        (["quantizer"], "needs a sub-command"),
        (["nosuch"], "no stage 'nosuch'"),
        (["submit"], "no stage 'submit'"),
        (
            ["manifest", "s3://a", "--out", "s3://b", "--env", "AWS_SECRET_ACCESS_KEY=x"],
            "credentials do not travel",
        ),
        (["manifest", "--config", "/no/such.yaml"], "config file not found"),
    ],
)
def test_bad_submissions_fail_before_sending(args: list[str], message: str, capsys) -> None:
    assert run(["submit", *args, "--address", "http://127.0.0.1:9", "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_stage_command_splits_nested_stages() -> None:
    assert stage_command(["quantizer", "eval", "--quantizer", "q", "--embeddings", "e"]) == (
        ["quantizer", "eval"],
        ["--quantizer", "q", "--embeddings", "e"],
    )


# ---------------------------------------------------------------- a real head


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _dashboard_missing() -> str | None:
    try:
        from ray._private.utils import get_dashboard_dependency_error
    except ImportError:  # a Ray without the check: try it
        return None
    err = get_dashboard_dependency_error()
    return str(err) if err else None


def _pids_in_group(pgid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if os.getpgid(int(d.name)) == pgid:
                    out.append(int(d.name))
    return out


@dataclass
class Head:
    address: str
    """The job server: http://127.0.0.1:PORT."""
    env: dict[str, str]
    """The environment a client needs: this head's auth token (Ray >= 2.59 requires one)."""


@pytest.fixture(scope="module")
def ray_head() -> Iterator[Head]:
    """A Ray head with its job server on loopback, with token authentication as a real
    cluster should have (a token of its own, not ~/.ray/auth_token)."""
    missing = _dashboard_missing()
    if missing:
        pytest.skip(f"the Ray job server needs ray[default] (dashboard packages): {missing}")
    temp = tempfile.mkdtemp(prefix="rsub", dir="/tmp")  # short: Unix socket paths are limited
    dash = _free_port()
    bindir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    ports = {
        "--port": _free_port(),
        "--dashboard-port": dash,
        "--ray-client-server-port": _free_port(),
        "--dashboard-agent-listen-port": _free_port(),
        "--dashboard-agent-grpc-port": _free_port(),
        "--runtime-env-agent-port": _free_port(),
        "--metrics-export-port": _free_port(),
        "--node-manager-port": _free_port(),
        "--object-manager-port": _free_port(),
    }
    cmd = [
        os.path.join(bindir, "ray"),
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        "--node-ip-address",
        "127.0.0.1",
        "--dashboard-host",
        "127.0.0.1",
        "--include-dashboard",
        "true",
        "--num-cpus",
        "4",
        "--num-gpus",
        "0",
        "--temp-dir",
        temp,
    ]
    for k, v in ports.items():
        cmd += [k, str(v)]
    log = open(Path(temp) / "ray-start.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                text = (Path(temp) / "ray-start.log").read_text(errors="replace")[-3000:]
                pytest.fail(f"ray start exited {proc.returncode}: {text}")
            try:  # any HTTP answer (401 without the token) means the job server is up
                with urllib.request.urlopen(f"{address}/api/version", timeout=2):
                    break
            except urllib.error.HTTPError:
                break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail("the Ray job server did not come up in 120 s")
            time.sleep(1)
        yield Head(address, env)
    finally:
        # End what this fixture started, by its process group: `ray start` (whose reaper takes
        # its children along), then anything left in the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        for pid in _pids_in_group(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def submit_cli(head: Head, *args: str) -> subprocess.CompletedProcess[str]:
    """`spear submit ... --address HEAD --wait` as a user runs it, in a subprocess."""
    cmd = [
        sys.executable,
        "-m",
        "spear.cli.main",
        "submit",
        *args,
        "--address",
        head.address,
        "--wait",
    ]
    return subprocess.run(
        cmd, env=head.env, capture_output=True, text=True, timeout=300, check=False
    )


@dataclass
class ManifestRun:
    out: str
    files: list[str]
    result: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def manifest_run(ray_head: Head, tmp_path_factory: pytest.TempPathFactory) -> ManifestRun:
    """A manifest job submitted to the head: speech-like files and two audio clips."""
    from spear.synth import write_speech_like

    root = tmp_path_factory.mktemp("submit")
    files = write_speech_like(str(root / "speech"), 4, seconds=(1, 3), seed=3)
    files += write_speech_like(str(root / "audio"), 2, seconds=(3, 5), seed=4)
    out = str(root / "manifest")
    # A config file on this machine travels with the job (its own working dir).
    cfg = root / "run.yaml"
    cfg.write_text("manifest:\n  files_per_task: 2\n")
    res = submit_cli(
        ray_head,
        "manifest",
        f"speech={root / 'speech'}",
        f"audio={root / 'audio'}",
        "--out",
        out,
        "--config",
        str(cfg),
    )
    return ManifestRun(out, files, res)


@pytest.mark.integration
@pytest.mark.slow  # starts a Ray head with a job server: ~1 min
def test_submitted_manifest_job_completes(manifest_run: ManifestRun) -> None:
    from spear.formats.manifest import read_manifest
    from spear.storage import StorageConfig

    res = manifest_run.result
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "SUCCEEDED" in res.stderr
    table = read_manifest(manifest_run.out, StorageConfig())
    assert sorted(set(table.column("url").to_pylist())) == sorted(manifest_run.files)
    # files_per_task 2 from the shipped config: 6 files in 3 parts (one per probe task).
    assert len(list((Path(manifest_run.out) / "manifest").glob("*.parquet"))) == 3


def _random_quantizer(url: str, teacher: str) -> str:
    """An untrained quantiser for a tiny teacher (64-d, layer 2), saved like a trained one."""
    import torch

    from spear.pipeline.quantize import save_quantizer
    from spear.quantizer.mvq import Quantizer, QuantizerInfo
    from spear.storage import StorageConfig

    torch.manual_seed(len(teacher))
    q = Quantizer(
        QuantizerInfo(dim=64, num_codebooks=4, codebook_size=16, teacher=teacher, layer=2)
    )
    with torch.no_grad():
        q.centers.normal_()
    save_quantizer(q, url, StorageConfig())
    return url


@pytest.mark.integration
@pytest.mark.slow
def test_submitted_tokenize_job_validates_and_reports(
    ray_head: Head, manifest_run: ManifestRun, tmp_path: Path
) -> None:
    """The main job as a Ray job: tiny teachers, random quantisers; the shards validate and
    `spear report` draws the real run."""
    import typer.main

    from spear.cli.main import app

    if "tokenize" not in typer.main.get_command(app).commands:  # type: ignore[attr-defined]
        pytest.skip("`spear tokenize` is not registered yet")
    from spear.shards import validate
    from spear.storage import StorageConfig

    assert manifest_run.result.returncode == 0
    out = str(tmp_path / "tokens")
    res = submit_cli(
        ray_head,
        "tokenize",
        "--manifest",
        manifest_run.out,
        "--out",
        out,
        "--wavlm",
        "wavlm-tiny",
        "--dasheng",
        "dasheng-tiny",
        "--wavlm-quantizer",
        _random_quantizer(str(tmp_path / "qw"), "wavlm-tiny"),
        "--dasheng-quantizer",
        _random_quantizer(str(tmp_path / "qd"), "dasheng-tiny"),
        "--items-per-shard",
        "3",
        "--random-teachers",
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert validate(out, StorageConfig()) == []
    report = json.loads((Path(out) / "report.json").read_text())
    assert report["ok"] == report["items"] > 0
    assert set(report["hours_by_domain"]) == {"speech", "audio"}

    html = tmp_path / "report.html"
    assert run(["report", out, "--out", str(html)]) == 0
    page = html.read_text()
    for title in (
        "Audio hours by domain",
        "Codebook usage: wavlm",
        "Codebook usage: dasheng",
        "Token bytes per audio second",
        "Stage rates",
    ):
        assert f"<h3>{title}</h3>" in page, title


@pytest.mark.integration
@pytest.mark.slow
def test_failed_job_status_comes_back(ray_head: Head, tmp_path: Path) -> None:
    # No sources: the stage exits 2 on the cluster, and so does `spear submit --wait`.
    res = submit_cli(ray_head, "manifest", "--out", str(tmp_path / "m"))
    assert res.returncode == 2, res.stdout[-3000:] + res.stderr[-3000:]
    assert "no sources" in res.stdout
    assert "FAILED" in res.stderr
