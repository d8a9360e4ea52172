"""Codes equal to the release's: the demo corpus tokenized with the tiny teachers and seeded
quantisers gives, item by item, the codes the release before the Ray Data pipeline gave.

``golden_tokenize.json`` holds, per item (file and segment start), the sha256 of each
teacher's codes (null where the teacher did not run) and the frame counts, written by the
release's own code (spear before the Ray Data port, commit 76450a7, run with this test file and
``SPEAR_WRITE_GOLDEN=1``). Regenerate it only when a
change is *meant* to change codes, and say so in the commit.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from spear.cli.main import run
from spear.pipeline.quantize import save_quantizer
from spear.quantizer.mvq import Quantizer, QuantizerInfo
from spear.storage import StorageConfig
from spear.synth import write_corpus, write_speech_like

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # ~50 s: a manifest and a tokenize job

GOLDEN = Path(__file__).with_name("golden_tokenize.json")


def _quantizer(url: str, teacher: str, seed: int) -> str:
    torch.manual_seed(seed)
    q = Quantizer(
        QuantizerInfo(dim=64, num_codebooks=4, codebook_size=16, teacher=teacher, layer=2)
    )
    with torch.no_grad():
        q.centers.normal_()
    save_quantizer(q, url, StorageConfig())
    return url


def _digest(row: dict, prefix: str) -> str | None:
    codes = row[f"{prefix}_codes"]
    return None if codes is None else hashlib.sha256(codes).hexdigest()


def test_codes_equal_the_release(ray_cluster: str, tmp_path: Path) -> None:
    # The demo's corpus (pipeline/demo.py), with a shorter long file: speech-like files, the
    # standard formats and broken files, 44.1 kHz audio clips.
    corpus = tmp_path / "corpus"
    write_speech_like(str(corpus / "speech"), 12, seconds=(2, 12), seed=1)
    write_corpus(str(corpus / "speech" / "mixed"), long_minutes=0.5)
    write_speech_like(
        str(corpus / "audio"), 4, seconds=(8, 25), seed=2, sample_rate=44100, fmt="WAV"
    )
    manifest = str(tmp_path / "m")
    sources = [f"speech={corpus}/speech", f"audio={corpus}/audio"]
    assert run(["manifest", *sources, "--out", manifest]) == 0
    out = tmp_path / "o"
    args = [
        "tokenize",
        "--manifest",
        manifest,
        "--out",
        str(out),
        "--wavlm",
        "wavlm-tiny",
        "--dasheng",
        "dasheng-tiny",
        "--wavlm-quantizer",
        _quantizer(str(tmp_path / "qw"), "wavlm-tiny", 0),
        "--dasheng-quantizer",
        _quantizer(str(tmp_path / "qd"), "dasheng-tiny", 1),
        "--items-per-shard",
        "8",
        "--random-teachers",
    ]
    assert run(args) == 0
    rows = pq.read_table(out / "tokens").to_pylist()
    # Keyed by file (relative to the corpus) and segment start: item ids hash the full URL.
    got = {
        f"{os.path.relpath(r['url'], corpus)}@{r['start']:.3f}": {
            "wavlm": _digest(r, "wavlm"),
            "dasheng": _digest(r, "dasheng"),
            "frames": [r["wavlm_frames"], r["dasheng_frames"]],
        }
        for r in rows
    }
    q = pq.read_table(out / "quarantine").to_pylist()
    quarantined = sorted(f"{os.path.relpath(r['source'], corpus)}: {r['error_type']}" for r in q)
    now = {"tokens": dict(sorted(got.items())), "quarantined": quarantined}
    if os.environ.get("SPEAR_WRITE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(now, indent=0, sort_keys=True) + "\n")
    want = json.loads(GOLDEN.read_text())
    assert len(want["tokens"]) > 20 and any(v["dasheng"] for v in want["tokens"].values())
    assert now["quarantined"] == want["quarantined"]
    assert now["tokens"] == want["tokens"]
