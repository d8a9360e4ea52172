"""The run record (``spear/record.py``): what decides a run's outputs, the one diff, and the
refusal that names exactly what differs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from spear.errors import SpearError
from spear.record import (
    RECORD_VERSION,
    RunRecord,
    check_record,
    compare,
    diff,
    items_record,
)
from spear.storage import StorageConfig
from spear.units import cut_units

LOCAL = StorageConfig()
COLS = ("item_id", "url", "duration")
DECIDES = {"items_per_shard": 4, "teachers": {"wavlm": {"quantizer_id": "mvq-1"}}}


def _items(n: int, seconds: float = 10.0) -> pa.Table:
    return pa.table(
        {
            "item_id": [f"id{i:05d}" for i in range(n)],
            "url": [f"s3://b/{i}.flac" for i in range(n)],
            "duration": np.full(n, seconds),
        }
    )


def _record(n: int = 10, per_unit: int = 4, decides: dict | None = None, **info: str) -> RunRecord:
    table = cut_units(_items(n), items_per_unit=per_unit)
    return items_record("tokenize", table, COLS, decides or DECIDES, info)


def _refusal(out: str, record: RunRecord) -> str:
    with pytest.raises(SpearError) as e:
        check_record(out, record, LOCAL, made=True)
    text = str(e.value)
    assert text.startswith(f"'{out}' holds tokenize outputs of another run (")
    assert text.endswith("); use another --out")
    return text


def test_record_check(tmp_path: Path) -> None:
    out = str(tmp_path / "o")
    check_record(out, _record(manifest="/a/m"), LOCAL, made=False)
    # The same content read from elsewhere is the same run, with the same id.
    moved = _record(manifest="s3://copy/m")
    check_record(out, moved, LOCAL, made=True)
    assert moved.run_id == _record(manifest="/a/m").run_id
    other = _record(decides=DECIDES | {"teachers": {"wavlm": {"quantizer_id": "mvq-2"}}})
    assert other.run_id != moved.run_id
    with pytest.raises(
        SpearError, match=r"teachers\.wavlm\.quantizer_id: 'mvq-1' there, 'mvq-2' now"
    ):
        check_record(out, other, LOCAL, made=True)
    # With nothing made, a corrected record replaces the old one.
    check_record(out, other, LOCAL, made=False)
    check_record(out, other, LOCAL, made=True)
    # Outputs but no record: nothing can tell what made them.
    with pytest.raises(SpearError, match=r"holds tokenize outputs but no _work/plan\.json"):
        check_record(str(tmp_path / "bare"), other, LOCAL, made=True)


def test_refusal_names_exactly_what_differs(tmp_path: Path) -> None:
    out = str(tmp_path / "o")
    check_record(out, _record(), LOCAL, made=False)
    # Another cut of the same items: the setting and the unit count, not the manifest content.
    per_unit = _record(per_unit=2, decides=DECIDES | {"items_per_shard": 2})
    assert "(items_per_shard: 4 there, 2 now; units: 3 there, 5 now)" in _refusal(out, per_unit)
    # Another manifest content: said so, with the item count that follows from it.
    text = _refusal(out, _record(n=11))
    assert "manifest content (items digest): '" in text and "items: 10 there, 11 now" in text
    assert "items_per_shard" not in text
    changed = _items(10).set_column(2, "duration", pa.array([10.0] * 9 + [10.5]))
    same_count = items_record("tokenize", cut_units(changed, items_per_unit=4), COLS, DECIDES)
    text = _refusal(out, same_count)
    assert text.count(" there, ") == 1 and "manifest content (items digest)" in text
    # A key only one side has; another job in the folder.
    extra = _record(decides=DECIDES | {"max_shard_hours": 2.0})
    assert "(max_shard_hours: (none) there, 2.0 now)" in _refusal(out, extra)
    embed = items_record("embed", cut_units(_items(10), items_per_unit=4), COLS, DECIDES)
    with pytest.raises(SpearError, match=r"\(kind: 'tokenize' there, 'embed' now\)"):
        check_record(out, embed, LOCAL, made=True)
    # Many differences: the first few, then how many more.
    many = {f"k{i}": i for i in range(6)}
    text = _refusal(out, _record(decides=DECIDES | many))
    assert text.count(" there, ") == 4 and "; and 2 more)" in text


def test_diff_is_the_one_comparison() -> None:
    a = {"kind": "x", "digest": "d1", "digest_of": "inputs", "decides": {"a": {"b": 1}}}
    b = {"kind": "x", "digest": "d2", "digest_of": "inputs", "decides": {"a": {"b": 2}}}
    assert diff(a, a) == []
    assert diff(a, b) == ["inputs: 'd1' there, 'd2' now", "a.b: 1 there, 2 now"]
    # What is recorded only (info, where the inputs were read) never differs.
    assert diff(a | {"info": {"manifest": "/x"}}, a | {"info": {"manifest": "/y"}}) == []


def test_records_of_another_version_or_layout_are_a_clear_error(tmp_path: Path) -> None:
    out = tmp_path / "o"
    (out / "_work").mkdir(parents=True)
    # The unit jobs' plan of version 2 digested the unit cut with the items.
    old = _record().as_dict() | {"version": 2}
    (out / "_work" / "plan.json").write_text(json.dumps(old))
    with pytest.raises(SpearError, match="run record version 2, this spear writes run record"):
        check_record(str(out), _record(), LOCAL, made=True)
    # The decode job's plan before it had a record.
    (out / "_work" / "plan.json").write_text(json.dumps({"manifest": "/m", "decode": {}}))
    with pytest.raises(SpearError, match=r"an earlier layout.*use another --out"):
        check_record(str(out), _record(), LOCAL, made=True)
    check_record(str(out), _record(), LOCAL, made=False)  # nothing made: replaced
    assert json.loads((out / "_work" / "plan.json").read_text())["version"] == RECORD_VERSION


def test_compare_a_record_kept_inside_an_output() -> None:
    rec = RunRecord("quantizer", {"train": {"lr": 0.005}}, "d", "embeddings content")
    compare("'q'", "its checkpoint", rec.as_dict(), rec)
    other = RunRecord("quantizer", {"train": {"lr": 0.001}}, "d", "embeddings content")
    with pytest.raises(SpearError, match=r"'q' holds quantizer outputs .*train.lr: 0.005 there"):
        compare("'q'", "its checkpoint", rec.as_dict(), other)
    with pytest.raises(SpearError, match="its checkpoint: no run record"):
        compare("'q'", "its checkpoint", None, rec)


def test_a_record_keeps_its_ids_and_masks_a_signed_url(tmp_path: Path) -> None:
    """Written records mask credentials by value (a signed URL's signature), never an id for
    its key's name: the train record's ``token_run`` is the tokenize run's id."""
    out = str(tmp_path / "o")
    signed = "https://b.s3.amazonaws.com/m?X-Amz-Signature=abcdef0123456789&X-Amz-Expires=60"
    record = RunRecord(
        "train",
        {"student": {"preset": "tiny"}},
        "synthetic-0",
        "token run",
        info={"trained_on": {"token_run": "synthetic-0"}, "manifest": signed},
    )
    check_record(out, record, LOCAL, made=False, path="plan.json")
    written = json.loads((tmp_path / "o" / "plan.json").read_text())
    assert written["info"]["trained_on"]["token_run"] == "synthetic-0"
    assert "abcdef0123456789" not in json.dumps(written)
    assert written["info"]["manifest"].startswith("https://b.s3.amazonaws.com/m?")
    check_record(out, record, LOCAL, made=True, path="plan.json")  # the same run
