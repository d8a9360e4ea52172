"""`spear shards`: inspect, validate (exit status and problems), stats, export-lhotse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_shards import build_output

from spear.cli.main import run


@pytest.fixture
def out(tmp_path: Path) -> str:
    out = str(tmp_path / "out")
    build_output(out, shards=2, rows=4)
    return out


def test_inspect_output_and_shard(out: str, tmp_path: Path, capsys) -> None:
    assert run(["shards", "inspect", out, "--json", str(tmp_path / "i.json")]) == 0
    text = capsys.readouterr().out
    assert "shards: 2" in text and "rows: 8" in text and "quarantined: 2" in text
    assert "wavlm: wavlm-tiny" in text and "per audio second" in text
    # Which weights made the tokens: a random-weights teacher, and a checkpoint's sha256.
    assert "weights random" in text and f"weights {'ab' * 32}" in text, text
    data = json.loads((tmp_path / "i.json").read_text())
    assert data["rows"] == 8
    assert [t["weights"] for t in data["teachers"]] == ["random", "ab" * 32]
    assert run(["shards", "inspect", f"{out}/tokens/shard-00000.parquet"]) == 0
    assert "shard: " in capsys.readouterr().out


def test_validate_valid_and_invalid(out: str, capsys) -> None:
    assert run(["shards", "validate", out]) == 0
    assert capsys.readouterr().out.strip() == "valid: 2 shards, 8 rows"
    shard = Path(out) / "tokens/shard-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    assert run(["shards", "validate", out]) == 1
    err = capsys.readouterr().err
    assert err.startswith("invalid: 2 problems") and "sha256 differs" in err, err


def test_not_a_tokenize_output_is_one_line(tmp_path: Path, capsys) -> None:
    assert run(["shards", "validate", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a finished tokenize output" in err[0]


def test_stats_table_and_json(out: str, tmp_path: Path, capsys) -> None:
    assert run(["shards", "stats", out, "--json", str(tmp_path / "s.json")]) == 0
    text = capsys.readouterr().out
    assert "perplexity" in text and "hours by domain" in text
    data = json.loads((tmp_path / "s.json").read_text())
    assert len(data["teachers"]["wavlm"]["histograms"]) == 4
    assert len(data["teachers"]["dasheng"]["histograms"][0]) == 200


def test_export_lhotse_without_audio_or_manifest_is_one_line(
    out: str, tmp_path: Path, capsys
) -> None:
    pytest.importorskip("lhotse")
    assert run(["shards", "export-lhotse", out, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pass the run's manifest" in err[0]


def test_export_lhotse_with_audio(tmp_path: Path, capsys) -> None:
    pytest.importorskip("lhotse")
    from test_lhotse_export import audio_files

    out = str(tmp_path / "out")
    written = build_output(out, shards=1, rows=3, url_root=str(tmp_path / "audio"))
    audio_files(written)
    dest = tmp_path / "shar"
    args = ["shards", "export-lhotse", out, "--out", str(dest), "--shar", "--teacher", "wavlm"]
    assert run(args) == 0
    assert "wrote 3 cuts as shar" in capsys.readouterr().out
    import lhotse

    cuts = list(lhotse.CutSet.from_shar(in_dir=dest))
    assert len(cuts) == 3 and not any(c.has_custom("dasheng_codebook_indexes") for c in cuts)
