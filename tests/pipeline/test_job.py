"""The job skeleton's pure parts: units, content digests, packing, the plan check, resources."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from spear.errors import SpearError
from spear.pipeline.job import (
    Demand,
    actor_resources,
    check_fits,
    check_plan,
    cpu_share,
    cut_units,
    make_plan,
    pack,
    table_digest,
    unpack,
)
from spear.storage import StorageConfig

LOCAL = StorageConfig()
COLS = ("item_id", "url", "duration")


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


def test_digest_follows_content_not_layout() -> None:
    t = _items(6)
    chunked = pa.concat_tables([t.slice(0, 2), t.slice(2, 4)])
    assert table_digest(t, COLS) == table_digest(chunked, COLS)
    assert table_digest(t, COLS) == table_digest(t.slice(0, 6).cast(t.schema), COLS)
    changed = t.set_column(2, "duration", pa.array([10.0] * 5 + [10.5]))
    assert table_digest(changed, COLS) != table_digest(t, COLS)
    renamed = t.set_column(1, "url", pa.array([f"s3://b/{i}.flac" for i in range(5)] + ["x"]))
    assert table_digest(renamed, COLS) != table_digest(t, COLS)
    # The boundary between two strings is part of the content.
    a = pa.table({"item_id": ["ab", "c"]})
    b = pa.table({"item_id": ["a", "bc"]})
    assert table_digest(a, ("item_id",)) != table_digest(b, ("item_id",))


def test_pack_roundtrip() -> None:
    batch = {
        "item_id": np.array(["a", "b"], dtype=object),
        "audio": np.array([b"\x00\x01", b""], dtype=object),
        "num_samples": np.array([1, 0], dtype=np.int64),
        "start": np.array([0.5, 1.5]),
    }
    got = unpack(pack(batch))
    assert list(got["item_id"]) == ["a", "b"] and list(got["audio"]) == [b"\x00\x01", b""]
    assert got["num_samples"].dtype == np.int64 and list(got["start"]) == [0.5, 1.5]


def test_plan_check(tmp_path: Path) -> None:
    out = str(tmp_path / "o")
    table = cut_units(_items(10), items_per_unit=4)
    plan = make_plan("tokenize", table, COLS, {"q": "mvq-1"}, {"manifest": "/a/m"})
    check_plan(out, plan, 0, LOCAL)
    # The same content read from elsewhere is the same run.
    moved = make_plan("tokenize", table, COLS, {"q": "mvq-1"}, {"manifest": "s3://copy/m"})
    check_plan(out, moved, 2, LOCAL)
    other = make_plan("tokenize", table, COLS, {"q": "mvq-2"})
    with pytest.raises(SpearError, match="q: 'mvq-1' there, 'mvq-2' now"):
        check_plan(out, other, 2, LOCAL)
    changed = cut_units(_items(11), items_per_unit=4)
    with pytest.raises(SpearError, match="manifest content"):
        check_plan(out, make_plan("tokenize", changed, COLS, {"q": "mvq-1"}), 2, LOCAL)
    # With nothing committed, a corrected plan replaces the old one.
    check_plan(out, other, 0, LOCAL)
    check_plan(out, other, 1, LOCAL)


def test_resource_rule_and_sizing() -> None:
    assert actor_resources("auto", 1.0, True, None, 0.5) == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert actor_resources("auto", 1.0, False, None, 0.5) == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert actor_resources("cuda", 0.5, False, 2.0, 0.5) == {"num_cpus": 2.0, "num_gpus": 0.5}
    assert actor_resources("cpu", 1.0, True, None, 1.0)["num_gpus"] == 0.0
    assert cpu_share(2, 2, 1.0) == 0.5 and cpu_share(64, 2, 1.0) == 1.0
    cluster = {"CPU": 2.0}
    check_fits([Demand("decode", 1, 1.0), Demand("wavlm", 2, 0.5)], cluster, autoscaling=False)
    with pytest.raises(SpearError, match="needs 3 CPUs"):
        check_fits([Demand("decode", 1, 1.0), Demand("wavlm", 2, 1.0)], cluster, autoscaling=False)
    with pytest.raises(SpearError, match="needs 1 GPUs"):
        check_fits([Demand("wavlm", 1, 1.0, 1.0)], cluster, autoscaling=False)
    check_fits([Demand("wavlm", 1, 1.0, 1.0)], cluster, autoscaling=True)


def test_sorted_units_sort_and_refuse_repeated_ids() -> None:
    from spear.pipeline.job import sorted_units

    t = _items(5).take([4, 2, 0, 1, 3])
    units = sorted_units(t, items_per_unit=2, max_unit_seconds=None, what="m")
    assert units["item_id"].to_pylist() == sorted(t["item_id"].to_pylist())
    assert units["unit"].to_pylist() == [0, 0, 1, 1, 2]
    twice = pa.concat_tables([t, t.slice(0, 1)])
    with pytest.raises(SpearError, match="m repeats item ids"):
        sorted_units(twice, items_per_unit=2, max_unit_seconds=None, what="m")
