"""`spear quantizer train/eval` end to end through the real CLI, locally and on S3: content ids,
resume and no-op reruns, and one `error:` line (exit 2) for every input a user can get wrong."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spear.cli.main import run
from spear.config import SpearConfig
from spear.configio import replace
from spear.pipeline.quantize import train_quantizer
from spear.quantizer.mvq import content_id
from spear.quantizer.serial import quantizer_to_bytes
from spear.quantizer.synthetic import mixture_of_low_rank_gaussians
from spear.stages.quantizers import load_quantizer
from spear.storage import StorageConfig, exists, read_bytes
from spear.testing import write_embedding_shards

ARGS = ["--codebooks", "2", "--phase-steps", "6", "--batch-size", "64", "--device", "cpu"]
SMALL = ["--set", "quantizer.train.codebook_size=16", "--set", "quantizer.train.log_every=4"]
CKPT = ["--set", "quantizer.train.checkpoint_every=4"]


def train_args(emb: str, out: str, *extra: str) -> list[str]:
    return ["quantizer", "train", "--embeddings", emb, "--out", out, *ARGS, *SMALL, *extra]


def ok(argv: list[str]) -> None:
    assert run(argv) == 0


@pytest.fixture(scope="module")
def emb(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("emb") / "emb")
    write_embedding_shards(url, mixture_of_low_rank_gaussians(3000, 16), teacher="wavlm", layer=21)
    return url


@pytest.fixture(scope="module")
def trained(emb: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("q") / "q")
    ok(train_args(emb, out))
    return out


def test_train_eval_local(emb: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "q")
    ok(train_args(emb, out))
    text = capsys.readouterr().out
    assert "step 4/12" in text and "heldout_rrl" in text and "saved quantiser mvq-" in text
    q = load_quantizer(out, StorageConfig())
    assert (q.info.teacher, q.info.layer, q.info.dim, q.num_codebooks) == ("wavlm", 21, 16, 2)
    assert q.info.normalised and q.info.rrl is not None
    assert q.info.training["heldout_frames"] == 200  # the minimum of 4 items of 50 frames
    # The saved id is the hash of the saved tensors, and the readable copy says the same.
    t, i = q.export_tensors(), q.info
    assert q.id == content_id(t, i.dim, i.num_codebooks, i.codebook_size, i.normalised)
    assert json.loads((tmp_path / "q" / "quantizer.json").read_text())["id"] == q.id
    assert f"saved quantiser {q.id}" in text
    report = str(tmp_path / "eval.json")
    ok(["quantizer", "eval", "--quantizer", out, "--embeddings", emb, "--json", report])
    data = json.loads(Path(report).read_text())
    assert data["quantizer_id"] == q.id and data["frames"] == 200 and data["heldout"]
    assert len(data["codebooks"]) == 2
    shown = capsys.readouterr().out
    assert shown.startswith("held-out frames:") and "entropy(bits)" in shown


def test_identical_trainings_share_an_id_and_others_do_not(
    emb: str, trained: str, tmp_path: Path
) -> None:
    ok(train_args(emb, str(tmp_path / "again")))
    ok(train_args(emb, str(tmp_path / "seed1"), "--set", "quantizer.train.seed=1"))
    urls = [trained, str(tmp_path / "again"), str(tmp_path / "seed1")]
    ids = [load_quantizer(u, StorageConfig()).id for u in urls]
    assert ids[0] == ids[1] != ids[2]


def test_rerun_on_a_finished_output_is_a_no_op(
    emb: str, trained: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = Path(trained) / "quantizer.safetensors"
    before, mtime = path.read_bytes(), path.stat().st_mtime_ns
    q = load_quantizer(trained, StorageConfig())
    capsys.readouterr()
    ok(train_args(emb, trained))
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and f"is finished: quantiser {q.id}" in out
    assert "step" not in out  # nothing trained
    assert path.read_bytes() == before and path.stat().st_mtime_ns == mtime
    # Speed settings may differ; anything that changes the result is refused.
    ok(train_args(emb, trained, "--set", "quantizer.train.log_every=2"))
    assert run(train_args(emb, trained, "--set", "quantizer.train.lr=0.001")) == 2
    err = capsys.readouterr().err
    assert "train.lr: 0.005 there, 0.001 now" in err and "use another --out" in err
    assert path.read_bytes() == before


class Killed(Exception):
    pass


def test_killed_training_resumes_and_its_id_follows_its_weights(
    emb: str, trained: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "q")
    cfg = SpearConfig()
    small = {"num_codebooks": 2, "codebook_size": 16, "phase_steps": 6, "batch_size": 64}
    tc = replace(cfg.quantizer.train, **small, device="cpu", log_every=4, checkpoint_every=4)
    qcfg = replace(cfg.quantizer, train=tc)

    def kill_at_8(line: str) -> None:
        if line.startswith("step 8/"):
            raise Killed

    with pytest.raises(Killed):  # killed after the checkpoint at step 4, before the one at 8
        train_quantizer(qcfg, emb, out, StorageConfig(), report=kill_at_8)
    assert exists(str(tmp_path / "q" / "checkpoint.safetensors"), StorageConfig())
    assert not exists(str(tmp_path / "q" / "quantizer.safetensors"), StorageConfig())
    ok(train_args(emb, out, *CKPT))
    text = capsys.readouterr().out
    assert "resumed from" in text and "at step 4" in text and "step 4/12" not in text
    q = load_quantizer(out, StorageConfig())
    t, i = q.export_tensors(), q.info
    assert q.id == content_id(t, i.dim, i.num_codebooks, i.codebook_size, i.normalised)
    # Steps 5-12 saw another batch order than the uninterrupted run: other weights, other id.
    assert q.id != load_quantizer(trained, StorageConfig()).id


# -- one line per error --------------------------------------------------------------------


class Payload:
    """A pickle that would create a file if anything unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def _unfinished_embed(root: Path) -> str:
    url = root / "emb-unfinished"
    write_embedding_shards(str(url / "embeddings"), np.zeros((100, 16), np.float32), shards=1)
    (url / "_work").mkdir()
    (url / "_work" / "plan.json").write_text("{}")
    return str(url)


def _unfinished_quantizer(emb: str, root: Path) -> str:
    out = root / "q-unfinished"
    out.mkdir()
    ok(train_args(emb, str(root / "q-full"), *CKPT))
    (out / "checkpoint.safetensors").write_bytes(
        (root / "q-full" / "checkpoint.safetensors").read_bytes()
    )
    return str(out)


def _case(name: str, emb: str, trained: str, root: Path) -> tuple[list[str], str]:
    """(argv, a phrase the error line must hold) of each failure a user can cause."""
    if name == "pickle-checkpoint":
        out = root / "out"
        out.mkdir()
        (out / "checkpoint.safetensors").write_bytes(pickle.dumps(Payload(root / "ran")))
        return train_args(emb, str(out)), "never as pickles"
    if name == "garbage-checkpoint":
        out = root / "out"
        out.mkdir()
        (out / "checkpoint.safetensors").write_bytes(b"\x00" * 5 + b"not a checkpoint" * 9)
        return train_args(emb, str(out)), "checkpoint.safetensors is not a safetensors file"
    if name == "quantizer-as-checkpoint":
        out = root / "out"
        out.mkdir()
        q = load_quantizer(trained, StorageConfig())
        (out / "checkpoint.safetensors").write_bytes(quantizer_to_bytes(q))
        return train_args(emb, str(out)), "is a quantiser, not a spear training checkpoint"
    if name == "legacy-checkpoint":
        out = root / "out"
        out.mkdir()
        (out / "checkpoint.pt").write_bytes(pickle.dumps({"step": 1}))
        return train_args(emb, str(out)), "pickled checkpoint of an older spear"
    if name == "checkpoint-of-other-settings":
        out = _unfinished_quantizer(emb, root)
        return train_args(emb, out, "--set", "quantizer.train.lr=0.001"), "train.lr: 0.005"
    if name == "not-a-quantizer":
        bad = root / "bad.safetensors"
        bad.write_bytes(b"PK\x03\x04" + b"\x00" * 64)
        return ["quantizer", "eval", "--quantizer", str(bad), "--embeddings", emb], str(bad)
    if name == "checkpoint-as-quantizer":
        out = _unfinished_quantizer(emb, root)
        ck = str(Path(out) / "checkpoint.safetensors")
        return ["quantizer", "eval", "--quantizer", ck, "--embeddings", emb], "is a training"
    if name == "changed-quantizer":
        data = bytearray((Path(trained) / "quantizer.safetensors").read_bytes())
        data[-3] ^= 0x01  # one bit of the last tensor (norm_std)
        bad = root / "changed.safetensors"
        bad.write_bytes(bytes(data))
        return ["quantizer", "eval", "--quantizer", str(bad), "--embeddings", emb], "changed after"
    if name == "missing-quantizer":
        args = ["quantizer", "eval", "--quantizer", str(root / "none"), "--embeddings", emb]
        return args, "no quantiser at"
    if name == "unfinished-quantizer":
        out = _unfinished_quantizer(emb, root)
        args = ["quantizer", "eval", "--quantizer", out, "--embeddings", emb]
        return args, "is unfinished: its training stopped before the end"
    if name == "eval-wrong-dim":
        emb8 = str(root / "emb8")
        write_embedding_shards(emb8, mixture_of_low_rank_gaussians(400, 8), teacher="wavlm")
        args = ["quantizer", "eval", "--quantizer", trained, "--embeddings", emb8]
        return args, "are 8-d, quantiser"
    if name == "missing-embeddings-train":
        return train_args(str(root / "none"), str(root / "out")), "no embeddings at"
    if name == "missing-embeddings-eval":
        args = ["quantizer", "eval", "--quantizer", trained, "--embeddings", str(root / "none")]
        return args, "no embeddings at"
    if name == "unfinished-embeddings":
        return train_args(_unfinished_embed(root), str(root / "out")), "are unfinished"
    if name == "not-embeddings":
        other = root / "other"
        other.mkdir()
        (other / "x.parquet").write_bytes(b"not parquet")
        return train_args(str(other), str(root / "out")), "not an embedding shard"
    raise AssertionError(name)


CASES = [
    "pickle-checkpoint",
    "garbage-checkpoint",
    "quantizer-as-checkpoint",
    "legacy-checkpoint",
    "checkpoint-of-other-settings",
    "not-a-quantizer",
    "checkpoint-as-quantizer",
    "changed-quantizer",
    "missing-quantizer",
    "unfinished-quantizer",
    "eval-wrong-dim",
    "missing-embeddings-train",
    "missing-embeddings-eval",
    "unfinished-embeddings",
    "not-embeddings",
]


@pytest.mark.parametrize("name", CASES)
def test_user_errors_are_one_line(
    name: str, emb: str, trained: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, phrase = _case(name, emb, trained, tmp_path)
    capsys.readouterr()
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert phrase in err, err
    assert not (tmp_path / "ran").exists()  # the pickle's payload never ran


def test_eval_on_the_wrong_dimension_exits_2_every_time(
    emb: str, trained: str, tmp_path: Path
) -> None:
    """As its own process (the console script), three runs: this case used to print its line
    and then abort in about half of the runs (exit 134, an Arrow worker thread still releasing
    a buffer at interpreter exit; see spear.cli.main.exit_process)."""
    argv, phrase = _case("eval-wrong-dim", emb, trained, tmp_path)
    script = Path(sys.executable).with_name("spear")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "spear.cli.main"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for attempt in range(3):
        done = subprocess.run(
            [*cmd, *argv], capture_output=True, text=True, timeout=120, env=env, check=False
        )
        assert done.returncode == 2, (attempt, done.returncode, done.stderr[-2000:])
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and phrase in lines[0], done.stderr


def test_the_quantiser_records_the_teacher_weights_of_its_embeddings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """From the embeddings' metadata (spear embed writes checkpoint_sha256, null for random
    weights); eval refuses embeddings of other weights in one line."""
    x = mixture_of_low_rank_gaussians(1500, 16)
    rand, real = str(tmp_path / "emb-random"), str(tmp_path / "emb-real")
    write_embedding_shards(rand, x, teacher="wavlm-tiny", layer=2, checkpoint_sha256=None)
    write_embedding_shards(real, x, teacher="wavlm-tiny", layer=2, checkpoint_sha256="ef" * 32)
    out = str(tmp_path / "q")
    ok(train_args(rand, out))
    assert "trained on wavlm-tiny, layer 2, random weights" in capsys.readouterr().out
    q = load_quantizer(out, StorageConfig())
    assert (q.info.teacher, q.info.layer, q.info.teacher_weights) == ("wavlm-tiny", 2, "random")
    ok(["quantizer", "eval", "--quantizer", out, "--embeddings", rand])
    assert "trained on: wavlm-tiny, layer 2, random weights" in capsys.readouterr().out
    assert run(["quantizer", "eval", "--quantizer", out, "--embeddings", real]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"with weights {'ef' * 32}" in err, err
    assert "trained on wavlm-tiny, layer 2, random weights" in err


@pytest.mark.integration
def test_train_eval_s3(s3_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bucket = s3_server.bucket("quantizer-test")
    emb = f"{bucket}/emb"
    write_embedding_shards(emb, mixture_of_low_rank_gaussians(1500, 16), storage=s3_server.storage)
    out = f"{bucket}/q"
    ep = ["--s3-endpoint", s3_server.endpoint]
    ok(train_args(emb, out, *ep))
    report = f"{bucket}/eval.json"
    ok(["quantizer", "eval", "--quantizer", out, "--embeddings", emb, "--json", report, *ep])
    data = json.loads(read_bytes(report, s3_server.storage))
    assert data["frames"] > 0
    assert data["quantizer_id"] == load_quantizer(out, s3_server.storage).id
    ok(train_args(emb, out, *ep))  # finished: a no-op on S3 too
