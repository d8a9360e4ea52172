"""The dataset card of a tokenize output: Hugging Face `datasets` loads OUT as written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from test_shards import TEACHERS, build_output

from spear.shards.card import CARD_FILE
from spear.shards.index import list_shards


def test_load_dataset_reads_the_indexed_token_shards(tmp_path: Path, monkeypatch) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "tokens"
    written = build_output(str(out))
    card = (out / CARD_FILE).read_text()
    assert card.startswith("---\nconfigs:")
    listed = re.findall(r"^    - (\S+)$", card, re.M)
    assert listed == [e.path for e in list_shards(str(out))]

    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.num_rows == len(written) == 18  # quarantined items are not rows
    assert set(ds["item_id"]) == set(written)
    # The card's recipe gives each teacher's codes as (frames, C) uint8 arrays.
    recipe = card.split("```python\n", 1)[1].split("```", 1)[0]
    recipe = recipe.replace('"path/to/this/folder"', repr(str(out)))
    cache = repr(str(tmp_path / "cache"))
    recipe = recipe.replace('split="train"', f'split="train", cache_dir={cache}')
    scope: dict[str, object] = {}
    exec(recipe, scope)  # the card's own snippet, as a reader would run it
    with_codes = scope["ds"]
    for i in range(ds.num_rows):
        row = with_codes[i]  # type: ignore[index]
        want = written[row["item_id"]]
        for t in TEACHERS:
            got = row[t.prefix]
            if want[f"{t.prefix}_codes"] is None:
                assert got is None
            else:
                expect = np.frombuffer(want[f"{t.prefix}_codes"], np.uint8)
                assert got.shape == (row[f"{t.prefix}_frames"], t.num_codebooks)
                np.testing.assert_array_equal(got.reshape(-1), expect)


def test_the_card_names_the_teachers(tmp_path: Path) -> None:
    out = tmp_path / "tokens"
    build_output(str(out), shards=1, rows=2)
    card = (out / CARD_FILE).read_text()
    for t in TEACHERS:
        assert f"| `{t.prefix}` | {t.teacher} |" in card
        assert f'"{t.prefix}": {t.num_codebooks}' in card
