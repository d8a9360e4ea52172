"""`spear quantizer train/eval` end to end through the real CLI, locally and on S3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spear.cli.main import main
from spear.quantizer.synthetic import mixture_of_low_rank_gaussians, write_embedding_shards
from spear.quantizer.train import load_quantizer
from spear.storage import StorageConfig, exists, read_bytes

ARGS = ["--codebooks", "2", "--phase-steps", "6", "--batch-size", "64", "--device", "cpu"]
SMALL = ["--set", "quantizer.train.codebook_size=16", "--set", "quantizer.train.log_every=4"]


def run(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*argv])
        raise SystemExit(0)
    assert exc.value.code == 0


def test_train_eval_local(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    emb = str(tmp_path / "emb")
    write_embedding_shards(emb, mixture_of_low_rank_gaussians(3000, 16), teacher="wavlm", layer=21)
    out = str(tmp_path / "q")
    run(["quantizer", "train", "--embeddings", emb, "--out", out, *ARGS, *SMALL])
    text = capsys.readouterr().out
    assert "step 4/12" in text and "heldout_rrl" in text and "saved quantiser" in text
    q = load_quantizer(out, StorageConfig())
    assert (q.info.teacher, q.info.layer, q.info.dim, q.num_codebooks) == ("wavlm", 21, 16, 2)
    assert q.info.normalised and q.info.rrl is not None
    assert q.info.training["heldout_frames"] == 200  # the minimum of 4 items of 50 frames
    report = str(tmp_path / "eval.json")
    run(["quantizer", "eval", "--quantizer", out, "--embeddings", emb, "--json", report])
    data = json.loads(Path(report).read_text())
    assert data["quantizer_id"] == q.id and data["frames"] == 200
    assert len(data["codebooks"]) == 2
    assert "entropy(bits)" in capsys.readouterr().out


def test_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    emb = str(tmp_path / "emb")
    write_embedding_shards(emb, mixture_of_low_rank_gaussians(1000, 16))
    out = str(tmp_path / "q")
    ck = ["--set", "quantizer.train.checkpoint_every=4"]
    # A first run with fewer steps leaves a checkpoint at step 4 ...
    run(
        [
            "quantizer",
            "train",
            "--embeddings",
            emb,
            "--out",
            out,
            *ARGS,
            *SMALL,
            *ck,
            "--phase-steps",
            "3",
            "--no-normalise",
        ]
    )
    assert exists(str(tmp_path / "q" / "checkpoint.pt"), StorageConfig())
    capsys.readouterr()
    # ... which a longer run picks up.
    run(
        [
            "quantizer",
            "train",
            "--embeddings",
            emb,
            "--out",
            out,
            *ARGS,
            *SMALL,
            *ck,
            "--no-normalise",
        ]
    )
    assert "resumed from" in capsys.readouterr().out


def test_missing_embeddings_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["quantizer", "train", "--embeddings", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith("error:")


@pytest.mark.integration
def test_train_eval_s3(s3_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bucket = s3_server.bucket("quantizer-test")
    emb = f"{bucket}/emb"
    write_embedding_shards(emb, mixture_of_low_rank_gaussians(1500, 16), storage=s3_server.storage)
    out = f"{bucket}/q"
    ep = ["--s3-endpoint", s3_server.endpoint]
    run(["quantizer", "train", "--embeddings", emb, "--out", out, *ARGS, *SMALL, *ep])
    report = f"{bucket}/eval.json"
    run(["quantizer", "eval", "--quantizer", out, "--embeddings", emb, "--json", report, *ep])
    data = json.loads(read_bytes(report, s3_server.storage))
    assert data["frames"] > 0
