"""The README's demo, end to end through the CLI on the session's Ray cluster."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from spear.cli.main import main

pytestmark = pytest.mark.integration


def test_demo_runs_every_stage(ray_cluster: str, tmp_path: Path, capsys) -> None:
    try:
        main(["demo", "--out", str(tmp_path / "demo")])
    except SystemExit as e:
        assert e.code in (0, None)
    captured = capsys.readouterr()
    out = captured.out
    assert "demo done" in out
    # One screen: every step's result line, no Ray INFO blocks (those go to the run's log).
    console = (out + captured.err).strip().splitlines()
    assert len(console) <= 40, "\n".join(console)
    assert not [line for line in console if "Total Progress" in line or "INFO" in line]
    assert list((tmp_path / "demo" / "tokens" / "_logs").glob("ray-*.log"))
    d = tmp_path / "demo"
    manifest = json.loads((d / "manifest" / "_SUCCESS.json").read_text())
    # The generated corpus holds 7 broken files; each one is quarantined with its reason.
    assert sum(manifest["quarantined"].values()) == 7
    emb = pq.read_table(d / "embeddings-wavlm" / "embeddings")
    assert emb.num_rows > 0 and min(emb["num_frames"].to_pylist()) > 0
    meta = json.loads((d / "quantizer-wavlm" / "quantizer.json").read_text())
    assert meta["rrl"] < 0.6  # a real fit, not the 1.0 of predicting the mean
    # Every manifest item is tokenized once; audio items carry Dasheng tokens, speech ones not.
    tokens = pq.read_table(d / "tokens" / "tokens")
    assert sorted(tokens["item_id"].to_pylist()) == sorted(
        pq.read_table(d / "manifest" / "manifest")["item_id"].to_pylist()
    )
    for row in tokens.select(["domain", "dasheng_frames", "wavlm_frames"]).to_pylist():
        assert row["wavlm_frames"] > 0
        assert (row["dasheng_frames"] is not None) == (row["domain"] == "audio")
    assert "valid (4 shards" in out
