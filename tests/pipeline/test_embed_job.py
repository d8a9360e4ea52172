"""`spear embed` through the CLI on a real local Ray: exact against a direct computation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from spear.cli.main import run
from spear.formats import EMBEDDING_DTYPE, read_metadata
from spear.formats.embeddings import committed_shards, validate_embeddings
from spear.formats.manifest import read_manifest
from spear.pipeline.embed import EmbedConfig, select_items
from spear.stages.decode import DecodeConfig, decode_segment
from spear.stages.teachers import TeacherConfig, load_teacher, run_teacher
from spear.storage import StorageConfig
from spear.synth import write_corpus, write_speech_like

pytestmark = pytest.mark.integration


def cli(*args: str) -> int:
    return run(args)


@pytest.fixture(scope="module")
def manifest(ray_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("embed")
    write_speech_like(str(root / "c" / "speech"), 6, seconds=(1, 4), seed=3)
    write_corpus(str(root / "c" / "speech" / "mixed"), long_minutes=0)
    write_speech_like(
        str(root / "c" / "audio"), 3, seconds=(3, 12), seed=4, sample_rate=44100, fmt="WAV"
    )
    out = str(root / "m")
    assert cli("manifest", f"speech={root}/c/speech", f"audio={root}/c/audio", "--out", out) == 0
    return out


@pytest.mark.parametrize(
    # Dasheng's embed job with -m slow: the demo embeds its audio items with it in the default run.
    "name",
    ["wavlm-tiny", pytest.param("dasheng-tiny", marks=pytest.mark.slow)],
)
def test_embed_matches_direct_computation(manifest: str, tmp_path: Path, name: str) -> None:
    family = name.split("-")[0]
    out = str(tmp_path / "e")
    args = [
        "embed",
        "--manifest",
        manifest,
        "--out",
        out,
        "--teacher",
        family,
        "--name",
        name,
        "--items-per-shard",
        "3",
        "--random-teachers",
    ]
    assert cli(*args) == 0
    table = pq.read_table(tmp_path / "e" / "embeddings")
    meta = read_metadata(table.schema)
    assert meta["schema"] == "embedding_shard" and meta["teacher"] == name
    rows = read_manifest(manifest, StorageConfig()).to_pylist()
    want_domain = "speech" if family == "wavlm" else "audio"
    want = {r["item_id"]: r for r in rows if r["domain"] == want_domain}
    assert set(table["item_id"].to_pylist()) == set(want)
    # The index lists every committed shard; readers read those (spear.formats.embeddings).
    assert len(committed_shards(out, StorageConfig())) == -(-len(want) // 3)
    assert validate_embeddings(out, StorageConfig()) == []

    # Tokens' ground truth: the same teacher and decode, one item at a time, no Ray.
    teacher = load_teacher(TeacherConfig(name=name))
    for row in table.to_pylist()[:4]:
        m = want[row["item_id"]]
        wave = decode_segment(m["url"], m["start"], m["duration"], DecodeConfig(), StorageConfig())
        (ref,) = run_teacher(teacher, [wave])
        got = np.frombuffer(row["embeddings"], EMBEDDING_DTYPE).reshape(row["num_frames"], -1)
        assert got.shape == ref.shape
        np.testing.assert_allclose(got.astype(np.float32), ref, rtol=2e-3, atol=2e-3)

    # Resume: a lost shard is recomputed, the others are kept, nothing is doubled.
    shards = sorted((tmp_path / "e" / "embeddings").iterdir())
    shards[0].unlink()
    assert cli(*args) == 0
    again = pq.read_table(tmp_path / "e" / "embeddings")
    assert sorted(again["item_id"].to_pylist()) == sorted(table["item_id"].to_pylist())
    summary = json.loads((tmp_path / "e" / "_SUCCESS.json").read_text())
    assert summary["shards_done_before"] == len(shards) - 1
    assert validate_embeddings(out, StorageConfig()) == []

    # Another teacher into the same output is refused.
    other = "dasheng-tiny" if family == "wavlm" else "wavlm-tiny"
    args[args.index("--teacher") + 1] = other.split("-")[0]
    args[args.index("--name") + 1] = other
    assert cli(*args) == 2


def test_sample_by_hours_is_stable_and_bounded(manifest: str) -> None:
    table = read_manifest(manifest, StorageConfig())
    speech_hours = sum(r["duration"] for r in table.to_pylist() if r["domain"] == "speech") / 3600
    cfg = EmbedConfig(hours=speech_hours / 2, seed=7)
    a = select_items(table, cfg, "wavlm")
    b = select_items(table.take(np.arange(table.num_rows)[::-1]), cfg, "wavlm")
    assert a["item_id"].to_pylist() == b["item_id"].to_pylist()  # input order does not matter
    hours = sum(a["duration"].to_pylist()) / 3600
    assert speech_hours / 2 <= hours < speech_hours
    assert set(a["domain"].to_pylist()) == {"speech"}
    other_seed = select_items(table, EmbedConfig(hours=speech_hours / 2, seed=8), "wavlm")
    assert other_seed["item_id"].to_pylist() != a["item_id"].to_pylist()
