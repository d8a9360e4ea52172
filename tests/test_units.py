"""Units (``spear/units.py``): cutting items into units, and the one quarantine split every
unit writer (embed, tokenize, features) uses, with its stage charging."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from spear.errors import SpearError
from spear.units import cut_units, sorted_units, split_quarantine


def _items(n: int, seconds: float = 10.0) -> pa.Table:
    return pa.table(
        {
            "item_id": [f"id{i:05d}" for i in range(n)],
            "url": [f"s3://b/{i}.flac" for i in range(n)],
            "duration": np.full(n, seconds),
        }
    )


def test_units_cut_by_items_and_by_seconds() -> None:
    t = cut_units(_items(10), items_per_unit=4)
    assert t["unit"].to_pylist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    # 25 s per unit at most: two 10 s items each, never zero (an item longer than the cap
    # is a unit of its own).
    t = cut_units(_items(5), items_per_unit=4, max_unit_seconds=25)
    assert t["unit"].to_pylist() == [0, 0, 1, 1, 2]
    t = cut_units(_items(3, seconds=100), items_per_unit=4, max_unit_seconds=25)
    assert t["unit"].to_pylist() == [0, 1, 2]


def test_sorted_units_sort_and_refuse_repeated_ids() -> None:
    t = _items(5).take([4, 2, 0, 1, 3])
    units = sorted_units(t, items_per_unit=2, max_unit_seconds=None, what="m")
    assert units["item_id"].to_pylist() == sorted(t["item_id"].to_pylist())
    assert units["unit"].to_pylist() == [0, 0, 1, 1, 2]
    twice = pa.concat_tables([t, t.slice(0, 1)])
    with pytest.raises(SpearError, match="m repeats item ids"):
        sorted_units(twice, items_per_unit=2, max_unit_seconds=None, what="m")


def _unit() -> dict[str, np.ndarray]:
    """A unit after its stages, out of id order: e decoded; d failed to decode (io); c is
    shorter than decode's min_seconds (decode's too_short: no audio); b decoded but gave the
    model no frame; a decoded and the model stage failed on it (internal)."""
    rows = [
        ("e", "", "", 16000, 50),
        ("d", "io", "s3://b/d.flac: not found", 0, 0),
        ("c", "too_short", "0.010 s < min_seconds 0.1", 0, 0),
        ("b", "", "", 80, 0),
        ("a", "internal", "s3://b/a.flac: wavlm: RuntimeError: boom", 32000, 0),
    ]
    return {
        "item_id": np.array([r[0] for r in rows], dtype=object),
        "url": np.array([f"s3://b/{r[0]}.flac" for r in rows], dtype=object),
        "error_type": np.array([r[1] for r in rows], dtype=object),
        "error": np.array([r[2] for r in rows], dtype=object),
        "num_samples": np.array([r[3] for r in rows], dtype=np.int64),
        "num_frames": np.array([r[4] for r in rows], dtype=np.int32),
    }


def test_quarantine_split_charges_each_item_to_the_stage_where_it_failed() -> None:
    items = _unit()
    split = split_quarantine(items, stage="teacher", model="wavlm", frames="num_frames")
    assert items["item_id"][split.order].tolist() == ["a", "b", "c", "d", "e"]
    assert items["item_id"][split.good].tolist() == ["e"]
    got = [(q["item_id"], q["stage"], q["error_type"]) for q in split.quarantine]
    assert got == [
        ("a", "teacher", "internal"),  # failed after it decoded: the model stage's
        ("b", "teacher", "too_short"),  # decoded, no frame: the model stage's too_short
        ("c", "decode", "too_short"),  # decode's own too_short (no audio): decode's
        ("d", "decode", "io"),
    ]
    b = split.quarantine[1]
    assert b["source"] == "s3://b/b.flac"
    assert b["message"] == "s3://b/b.flac: 80 samples give no wavlm frame"
    assert split.quarantine[3]["message"] == "s3://b/d.flac: not found"
    assert split.by_stage == {
        "teacher": {"internal": 1, "too_short": 1},
        "decode": {"too_short": 1, "io": 1},
    }
    # The features job's model stage is the student: the same rule, its own name.
    student = split_quarantine(items, stage="student", model="student", frames="num_frames")
    assert [q["stage"] for q in student.quarantine] == ["student", "student", "decode", "decode"]
    # Tokenize's stage flags a frameless item itself: without `frames`, only errors count.
    flagged = split_quarantine(items, stage="teacher", model="teacher")
    assert items["item_id"][flagged.good].tolist() == ["b", "e"]


def test_every_unit_writer_uses_the_one_split() -> None:
    """Embed, features and the token shard writer charge the same unit alike."""
    from spear.pipeline.embed import EmbeddingShardWriter
    from spear.pipeline.features import FeaturePartWriter
    from spear.shards.schema import TokenTeacherInfo
    from spear.shards.writer import TokenShardWriter
    from spear.stages.teachers import TeacherConfig

    items = _unit()
    n = len(items["item_id"])
    emb = dict(items, embeddings=np.array([b"\0\0" * 768 * f for f in items["num_frames"]], object))
    _, entry = EmbeddingShardWriter(TeacherConfig(name="wavlm-tiny"), None)(0, emb)
    charged = {"teacher": {"internal": 1, "too_short": 1}, "decode": {"too_short": 1, "io": 1}}
    assert entry["quarantine_by_stage"] == charged and entry["rows"] == 1

    feats = dict(items, features=np.array([b"\0\0" * 4 * f for f in items["num_frames"]], object))
    _, entry = FeaturePartWriter("parquet", "ckpt", "sha", 4)(0, feats)
    assert entry["quarantine_by_stage"] == {
        "student": {"internal": 1, "too_short": 1},
        "decode": {"too_short": 1, "io": 1},
    }

    # Tokenize: the teacher stage has already turned b's missing frame into too_short.
    tok = dict(items)
    tok["error_type"] = np.array(["", "io", "too_short", "too_short", "internal"], object)
    tok |= {
        "source": np.array(["s"] * n, object),
        "domain": np.array(["speech"] * n, object),
        "start": np.zeros(n),
        "duration": np.ones(n),
        "decode_seconds": np.zeros(n),
        "wavlm_frames": np.array([50, -1, -1, -1, -1], np.int64),
        "wavlm_codes": np.array([b"\0" * 50 * 16] + [b""] * 4, object),
        "wavlm_seconds": np.zeros(n),
    }
    info = TokenTeacherInfo("wavlm", "wavlm", "wavlm", 21, 50.0, 16, 256, "q", None, ("speech",))
    _, entry = TokenShardWriter((info,))(0, tok)
    assert entry["quarantine_by_stage"] == charged and entry["rows"] == 1
