"""Faults a multi-day tokenize job meets: a teacher actor killed, shard writers killed mid-write,
before or after their commit, the driver killed mid-run between a shard's write and its commit,
a copied or changed manifest.

Each ends, after running the command (again), with every manifest item exactly once, as tokens
or in quarantine, the shards holding exactly their planned items with the codes of an
uninterrupted run, and no partial or temporary file among the shards.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from spear.cli.main import main
from spear.formats.manifest import read_manifest
from spear.pipeline.quantize import save_quantizer
from spear.quantizer.mvq import Quantizer, QuantizerInfo
from spear.storage import StorageConfig
from spear.synth import write_speech_like

# Slow (~4 min: a reference run and five killed runs); the default run covers the commit
# protocol's recovery in test_commit.py and the no-rerun of committed units in test_job.py.
pytestmark = [pytest.mark.integration, pytest.mark.slow]

PER_SHARD = 2


@pytest.fixture(scope="module")
def job(ray_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("faults")
    write_speech_like(str(root / "speech"), 24, seconds=(2, 6), seed=21)
    manifest = str(root / "m")
    main(["manifest", f"speech={root}/speech", "--out", manifest])  # raises SystemExit if not ok
    torch.manual_seed(0)
    q = Quantizer(QuantizerInfo(dim=64, num_codebooks=4, codebook_size=16, teacher="wavlm-tiny"))
    save_quantizer(q, str(root / "q"), StorageConfig())
    q = Quantizer(QuantizerInfo(dim=64, num_codebooks=4, codebook_size=16, teacher="dasheng-tiny"))
    save_quantizer(q, str(root / "qd"), StorageConfig())
    return {
        "manifest": manifest,
        "quantizer": str(root / "q"),
        "dasheng_quantizer": str(root / "qd"),
        "address": ray_cluster,
    }


def command(
    job: dict[str, str], out: Path, manifest: str | None = None, *, fused: bool = False
) -> list[str]:
    # Small shards: many units and actor calls, so a kill lands mid-run. WavLM alone runs in
    # its own pool; ``fused`` adds Dasheng on the (speech) items, in one actor with WavLM.
    both = [
        "--dasheng",
        "dasheng-tiny",
        "--dasheng-quantizer",
        job["dasheng_quantizer"],
        "--set",
        "tokenize.dasheng.domains=speech",
        "--set",
        "tokenize.fuse_teachers=true",
    ]
    return [
        sys.executable,
        "-m",
        "spear.cli.main",
        "tokenize",
        "--random-teachers",
        "--manifest",
        manifest or job["manifest"],
        "--out",
        str(out),
        "--wavlm",
        "wavlm-tiny",
        "--wavlm-quantizer",
        job["quantizer"],
        "--items-per-shard",
        str(PER_SHARD),
        "--address",
        job["address"],
        *(both if fused else []),
    ]


@dataclass
class Reference:
    out: Path
    codes: dict[str, bytes]
    """item id -> WavLM codes of the uninterrupted run."""


@pytest.fixture(scope="module")
def reference(job: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """An uninterrupted run: what every faulted run must end equal to."""
    out = tmp_path_factory.mktemp("reference") / "o"
    done = subprocess.run(command(job, out), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    check_exactly_once(job, out)
    return Reference(out, codes(out))


def codes(out: Path) -> dict[str, bytes]:
    t = pq.read_table(out / "tokens")
    return dict(zip(t["item_id"].to_pylist(), t["wavlm_codes"].to_pylist(), strict=True))


def wait_for(cond, timeout: float = 240.0, what: str = "") -> None:
    end = time.time() + timeout
    while not cond():
        if time.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def shards(out: Path) -> list[Path]:
    d = out / "tokens"
    return sorted(d.glob("shard-*.parquet")) if d.exists() else []


def check_exactly_once(job: dict[str, str], out: Path) -> None:
    ids = sorted(read_manifest(job["manifest"], StorageConfig())["item_id"].to_pylist())
    planned = [ids[i : i + PER_SHARD] for i in range(0, len(ids), PER_SHARD)]
    assert len(shards(out)) == len(planned)
    for s, want in enumerate(planned):
        name = f"shard-{s:05d}.parquet"
        got = pq.read_table(out / "tokens" / name)["item_id"].to_pylist()
        got += pq.read_table(out / "quarantine" / name)["item_id"].to_pylist()
        assert sorted(got) == want, f"shard {s}"
    leftovers = [p.name for p in out.rglob(".tmp-*")]
    assert leftovers == []
    assert not (out / "_work/attempts").exists() or not list((out / "_work/attempts").iterdir())
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert [e["shard"] for e in index] == list(range(len(planned)))
    assert sum(e["rows"] + e["quarantined"] for e in index) == len(ids)


@pytest.mark.parametrize("layout", ["TokenizeStageUnits", "FusedTokenizeStageUnits"])
def test_teacher_actor_killed_mid_run(
    job: dict[str, str], reference: Reference, tmp_path: Path, layout: str
) -> None:
    """A teacher actor is killed mid-run, in either layout: a WavLM pool's actor, or a fused
    WavLM + Dasheng actor. Ray restarts it and the shards it held run again."""
    # The GCS actor table (no dashboard needed; the state API's list_actors wants one).
    from ray._private.state import actors

    out = tmp_path / "o"
    fused = layout.startswith("Fused")
    proc = subprocess.Popen(
        command(job, out, fused=fused),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    def teacher_actor() -> tuple[str, int] | None:
        for key, a in actors().items():
            # Ray Data names it MapWorker(MapBatches(<class>)).
            alive = a["State"] == "ALIVE" and a["Pid"]
            if alive and re.search(rf"\b{layout}\b", a["ActorClassName"]):
                return key, int(a["Pid"])
        return None

    found: tuple[str, int] | None = None

    def ready() -> bool:
        nonlocal found
        # Killed once it is alive and the job has started (on 2 cores the whole job can
        # finish within one poll of the first committed shard).
        found = teacher_actor()
        return found is not None or proc.poll() is not None

    wait_for(ready, what="a running teacher actor")
    assert proc.poll() is None and found is not None, "the job finished before the kill"
    killed, pid = found
    os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    # That actor (not one of an earlier test's job on this cluster) was restarted.
    assert actors()[killed]["NumRestarts"] > 0, "the killed actor was not restarted"
    check_exactly_once(job, out)
    assert codes(out) == reference.codes
    if fused:
        t = pq.read_table(out / "tokens")
        assert all(t["dasheng_frames"].to_pylist()) and t["dasheng_codes"].null_count == 0


def _env(tmp_path: Path, faults: str) -> dict[str, str]:
    return os.environ | {"SPEAR_FAULTS": faults, "SPEAR_FAULTS_DIR": str(tmp_path)}


WRITER_FAULTS = {
    "mid_stage": "shard-00001",
    "before_commit": "shard-00003",
    "before_publish": "shard-00005",
}


def test_shard_writers_killed(job: dict[str, str], reference: Reference, tmp_path: Path) -> None:
    """Three writers' processes die: one mid-write, one after writing but before its commit,
    one after the commit but before publishing. Ray retries each task; the job completes in
    one run."""
    out = tmp_path / "o"
    faults = ",".join(f"{point}:{unit}" for point, unit in WRITER_FAULTS.items())
    run = subprocess.run(
        command(job, out), capture_output=True, text=True, timeout=300, env=_env(tmp_path, faults)
    )
    assert run.returncode == 0, run.stderr[-2000:]
    for point, unit in WRITER_FAULTS.items():
        assert (tmp_path / f"{point}-{unit}").exists(), f"the {point} fault did not fire"
    check_exactly_once(job, out)
    assert codes(out) == reference.codes


def test_driver_killed_between_write_and_commit(
    job: dict[str, str], reference: Reference, tmp_path: Path
) -> None:
    """The driver (and with it the job) is killed mid-run while a shard is written but not
    committed; running the command again finishes the job, keeping the shards done before."""
    out = tmp_path / "o"
    proc = subprocess.Popen(
        command(job, out),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(tmp_path, "before_commit:shard-00004:hang"),
    )
    staged = out / "_work/attempts/shard-00004"
    try:
        wait_for(
            lambda: (
                ((tmp_path / "before_commit-shard-00004").exists() and shards(out))
                or proc.poll() is not None
            ),
            what="a writer between write and commit",
        )
        assert proc.poll() is None, "the job ended before it could be killed"
        assert list(staged.rglob("tokens/shard-00004.parquet")), "nothing staged"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    before = len(shards(out))
    assert before >= 1 and not (out / "tokens/shard-00004.parquet").exists()
    assert not (out / "_SUCCESS.json").exists()
    rerun = subprocess.run(command(job, out), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads((out / "_SUCCESS.json").read_text())
    assert summary["shards_done_before"] >= before
    check_exactly_once(job, out)
    assert codes(out) == reference.codes


def test_manifest_copy_resumes_and_changed_manifest_is_refused(
    job: dict[str, str], reference: Reference, tmp_path: Path
) -> None:
    import shutil

    copy = tmp_path / "elsewhere" / "manifest-copy"
    shutil.copytree(job["manifest"], copy)
    out = reference.out
    again = subprocess.run(
        command(job, out, str(copy)), capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr[-2000:]
    summary = json.loads((out / "_SUCCESS.json").read_text())
    assert summary["shards_done_before"] == summary["shards"]
    # One item fewer: another manifest content, refused in one line before any Ray work.
    parts = sorted((copy / "manifest").glob("*.parquet"))
    t = pq.read_table(parts[0])
    pq.write_table(t.slice(0, t.num_rows - 1), parts[0])
    changed = subprocess.run(
        command(job, out, str(copy)), capture_output=True, text=True, timeout=300
    )
    assert changed.returncode == 2
    # One error line; before it only the warnings this run gives by design (random teachers,
    # a quantiser that records no teacher weights).
    lines = changed.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "manifest content" in lines[-1], changed.stderr
    assert all(line.startswith("warning: ") for line in lines[:-1]), changed.stderr
    assert codes(out) == reference.codes
