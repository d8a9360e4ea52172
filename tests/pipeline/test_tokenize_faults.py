"""Faults a multi-day tokenize job meets: the driver killed mid-run, a teacher actor killed.

Either way, running the command (again) ends with every manifest item exactly once, as tokens
or in quarantine, the shards holding exactly their planned items, and no partial file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from spear.cli.main import main
from spear.pipeline.manifest import read_manifest
from spear.pipeline.quantize import save_quantizer
from spear.quantizer.mvq import Quantizer, QuantizerInfo
from spear.storage import StorageConfig
from spear.synth import write_speech_like

pytestmark = pytest.mark.integration

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
    return {"manifest": manifest, "quantizer": str(root / "q"), "address": ray_cluster}


def command(job: dict[str, str], out: Path) -> list[str]:
    return [
        sys.executable, "-m", "spear.cli.main", "tokenize", "--manifest", job["manifest"],
        "--out", str(out), "--wavlm", "wavlm-tiny", "--wavlm-quantizer", job["quantizer"],
        "--items-per-shard", str(PER_SHARD), "--address", job["address"],
        # Small batches: many shards and actor calls, so a kill lands mid-run.
        "--set", "teachers.wavlm.batch_size=1", "--set", "tokenize.decode_batch_size=1",
    ]  # fmt: skip


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
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert [e["shard"] for e in index] == list(range(len(planned)))
    assert sum(e["rows"] + e["quarantined"] for e in index) == len(ids)


def test_driver_killed_mid_run_then_rerun(job: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "o"
    proc = subprocess.Popen(command(job, out), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(lambda: len(shards(out)) >= 1 or proc.poll() is not None, what="a first shard")
        assert proc.poll() is None, "the job finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    before = len(shards(out))
    assert not (out / "_SUCCESS.json").exists()
    rerun = subprocess.run(command(job, out), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads((out / "_SUCCESS.json").read_text())
    assert summary["shards_done_before"] >= before >= 1
    check_exactly_once(job, out)


def test_teacher_actor_killed_mid_run(job: dict[str, str], tmp_path: Path) -> None:
    # The GCS actor table (no dashboard needed; the state API's list_actors wants one).
    from ray._private.state import actors

    out = tmp_path / "o"
    proc = subprocess.Popen(command(job, out), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip

    def teacher_actor() -> int | None:
        for a in actors().values():
            if "TokenizeStage" in a["ActorClassName"] and a["State"] == "ALIVE" and a["Pid"]:
                return int(a["Pid"])
        return None

    pid: int | None = None

    def ready() -> bool:
        nonlocal pid
        pid = teacher_actor() if shards(out) else None
        return pid is not None or proc.poll() is not None

    wait_for(ready, what="a running teacher actor")
    assert proc.poll() is None and pid is not None, "the job finished before the kill"
    os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    restarted = [a for a in actors().values()
                 if "TokenizeStage" in a["ActorClassName"] and a["NumRestarts"] > 0]  # fmt: skip
    assert restarted, "the killed actor was not restarted"
    check_exactly_once(job, out)
