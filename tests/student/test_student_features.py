"""`spear features`: a saved student's frame features for a manifest, through the CLI on Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from spear.cli.main import run
from spear.formats.embeddings import committed_shards, validate_embeddings
from spear.formats.manifest import read_manifest
from spear.stages.decode import DecodeConfig, decode_segment
from spear.storage import StorageConfig
from spear.student.config import StudentConfig
from spear.student.model import Student
from spear.synth import write_speech_like

pytestmark = pytest.mark.integration


def cli(*args: str) -> int:
    return run(args)


def test_features_match_the_standalone_module(ray_cluster: str, tmp_path: Path) -> None:
    write_speech_like(str(tmp_path / "speech"), 3, seconds=(1, 3), seed=5)
    (tmp_path / "speech" / "broken.wav").write_bytes(b"RIFF....WAVEfmt nonsense")
    assert cli("manifest", f"speech={tmp_path}/speech", "--out", str(tmp_path / "m")) == 0
    torch.manual_seed(0)
    model = Student(StudentConfig(preset="tiny")).eval()
    model.save(str(tmp_path / "student.pt"))
    out = tmp_path / "f"
    args = [
        "features",
        "--checkpoint",
        str(tmp_path / "student.pt"),
        "--manifest",
        str(tmp_path / "m"),
        "--out",
        str(out),
        "--items-per-part",
        "2",
    ]
    assert cli(*args) == 0
    table = pq.read_table(out / "features")
    manifest = read_manifest(str(tmp_path / "m"), StorageConfig())
    rows = {r["item_id"]: r for r in manifest.to_pylist()}
    assert sorted(table["item_id"].to_pylist()) == sorted(rows)
    # The standalone module (Student.from_checkpoint) gives the same frames, one item at a time.
    loaded = Student.from_checkpoint(str(tmp_path / "student.pt")).eval()
    for r in table.to_pylist():
        m = rows[r["item_id"]]
        wave = decode_segment(m["url"], m["start"], m["duration"], DecodeConfig(), StorageConfig())
        with torch.inference_mode():
            x, n = loaded.frontend.waves([wave])
            y, lengths = loaded.encode(x, n)
        assert r["num_frames"] == int(lengths[0])
        got = np.frombuffer(r["embeddings"], "<f2").reshape(r["num_frames"], -1)
        np.testing.assert_allclose(got, y[0, : r["num_frames"]].numpy(), rtol=1e-2, atol=1e-2)
    summary = json.loads((out / "_SUCCESS.json").read_text())
    assert summary["ok"] == len(rows)
    # The parts are embedding shards with an index: the quantiser's reader reads them.
    assert validate_embeddings(str(out), StorageConfig()) == []
    assert len(committed_shards(str(out), StorageConfig())) == summary["parts"]
    # Re-running finds every part done.
    assert cli(*args) == 0
    assert json.loads((out / "_SUCCESS.json").read_text())["parts_done_before"] == summary["parts"]
    # Another checkpoint into the same output is refused (features of two models never mix).
    torch.manual_seed(1)
    Student(StudentConfig(preset="tiny")).eval().save(str(tmp_path / "other.pt"))
    other = [a if a != str(tmp_path / "student.pt") else str(tmp_path / "other.pt") for a in args]
    assert cli(*other) == 2


def test_features_of_chosen_layers(ray_cluster: str, tmp_path: Path) -> None:
    write_speech_like(str(tmp_path / "speech"), 2, seconds=(1, 2), seed=6)
    assert cli("manifest", f"speech={tmp_path}/speech", "--out", str(tmp_path / "m")) == 0
    torch.manual_seed(0)
    Student(StudentConfig(preset="tiny")).save(str(tmp_path / "student.pt"))
    out = tmp_path / "f"
    base = ["features", "--checkpoint", str(tmp_path / "student.pt")]
    base += ["--manifest", str(tmp_path / "m"), "--out", str(out), "--format", "numpy"]
    assert cli(*base, "--layers", "0,-1") == 0
    loaded = Student.from_checkpoint(str(tmp_path / "student.pt"))
    manifest = read_manifest(str(tmp_path / "m"), StorageConfig()).to_pylist()
    for m in manifest:
        got = np.load(out / "features" / f"{m['item_id']}.npy")
        wave = decode_segment(m["url"], m["start"], m["duration"], DecodeConfig(), StorageConfig())
        x, n = loaded.frontend.waves([wave])
        with torch.inference_mode():
            _, _, hidden = loaded.encode(x, n, layers=True)
        assert got.shape == (hidden[0].shape[1], 2, loaded.output_dim)
        # tiny's first and last stacks are 64 wide, zero-padded to the output's 96.
        for col, layer in ((0, 0), (1, 6)):
            want = hidden[layer][0].numpy()
            np.testing.assert_allclose(got[:, col, :64], want, rtol=1e-2, atol=1e-2)
            assert np.all(got[:, col, 64:] == 0)
    # Other layers into the same output are refused; an impossible layer fails before Ray.
    assert cli(*base, "--layers", "all") == 2
    assert cli(*base[:-4], "--out", str(tmp_path / "g"), "--layers", "7") == 2
