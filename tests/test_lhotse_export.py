"""Token shards -> lhotse cuts and Lhotse Shar, loaded back with lhotse."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf
from test_shards import build_output, rewrite_shard

from spear.cli.main import run
from spear.errors import SpearError
from spear.formats import MANIFEST_SCHEMA, SAMPLE_RATE, parquet_bytes, with_metadata
from spear.lhotse_export import export_lhotse, recording_id
from spear.stages.audio_io import local_version

lhotse = pytest.importorskip("lhotse")


def _rate(row: dict) -> tuple[int, int]:
    """(sample rate, channels) of the file behind a row: speech 16 kHz mono, audio 8 kHz stereo."""
    return (16000, 1) if row["domain"] == "speech" else (8000, 2)


def audio_files(written: dict[str, dict]) -> None:
    """Real files behind the rows: noise, long enough for the row's segment."""
    rng = np.random.default_rng(0)
    for row in written.values():
        path = Path(row["url"])
        path.parent.mkdir(parents=True, exist_ok=True)
        sr, ch = _rate(row)
        n = round((row["start"] + row["duration"]) * sr) + sr // 10
        sf.write(path, rng.uniform(-0.5, 0.5, (n, ch)).astype(np.float32), sr, subtype="PCM_16")


def _check_codes(cut, row: dict) -> None:
    w = cut.load_custom("wavlm_codebook_indexes")
    assert w.dtype == np.uint8 and w.shape == (row["wavlm_frames"], 4)
    assert w.tobytes() == row["wavlm_codes"]
    assert cut.wavlm_codebook_indexes.frame_shift == pytest.approx(0.02)
    assert cut.custom["domain"] == row["domain"] and cut.custom["source"] == row["source"]
    if row["domain"] == "speech":
        assert not cut.has_custom("dasheng_codebook_indexes")
    else:
        d = cut.load_custom("dasheng_codebook_indexes")
        assert d.shape == (row["dasheng_frames"], 2) and d.tobytes() == row["dasheng_codes"]
        assert cut.dasheng_codebook_indexes.frame_shift == pytest.approx(0.04)


def _check_cuts(cuts: list, written: dict[str, dict]) -> None:
    """Cuts of the default layout: the original files, at the rows' offsets."""
    assert sorted(c.id for c in cuts) == sorted(written)
    assert any(c.start > 0 for c in cuts)
    for cut in cuts:
        row = written[cut.id]
        assert (cut.start, cut.duration) == (row["start"], row["duration"])
        assert cut.recording.sources[0].source == row["url"]
        assert cut.recording.id == recording_id(row["url"])
        assert (cut.recording.sampling_rate, cut.recording.num_channels) == _rate(row)
        _check_codes(cut, row)


def test_cuts_round_trip_reading_headers(tmp_path: Path) -> None:
    pytest.importorskip("h5py")
    out = str(tmp_path / "out")
    written = build_output(out, shards=2, rows=4, url_root=str(tmp_path / "audio"))
    audio_files(written)
    dest = tmp_path / "cuts"
    summary = export_lhotse(out, str(dest))
    assert summary.cuts == 8
    assert summary.fields == {"wavlm_codebook_indexes": 8, "dasheng_codebook_indexes": 4}
    cuts = [c for p in sorted(dest.glob("cuts.*.jsonl.gz")) for c in lhotse.load_manifest(p)]
    _check_cuts(cuts, written)
    for cut in cuts[:3]:  # the Recording really points at the file, at the offset
        assert cut.load_audio().shape[1] == pytest.approx(cut.duration * cut.sampling_rate, abs=1)


def test_cuts_round_trip_with_the_runs_manifest(tmp_path: Path) -> None:
    pytest.importorskip("h5py")
    out = str(tmp_path / "out")
    written = build_output(out, shards=2, rows=4, url_root=str(tmp_path / "audio"))
    # No audio files: the recordings' rates and lengths come from the manifest alone.
    rows = []
    for r in written.values():
        sr, ch = _rate(r)
        rows.append(
            {
                "item_id": r["item_id"],
                "source": r["source"],
                "domain": r["domain"],
                "url": r["url"],
                "segment": 0,
                "start": r["start"],
                "duration": r["duration"],
                "file_duration": r["start"] + r["duration"] + 0.1,
                "sample_rate": sr,
                "channels": ch,
                "format": "WAV",
                "subtype": "PCM_16",
                "file_size": 1,
            }
        )
    manifest = tmp_path / "manifest-out" / "manifest"
    manifest.mkdir(parents=True)
    schema = with_metadata(MANIFEST_SCHEMA, "manifest", 1)
    table = pa.Table.from_pylist(rows, schema=schema)
    (manifest / "part-000.parquet").write_bytes(parquet_bytes(table))
    dest = tmp_path / "cuts"
    export_lhotse(out, str(dest), manifest=str(tmp_path / "manifest-out"))
    cuts = [c for p in sorted(dest.glob("cuts.*.jsonl.gz")) for c in lhotse.load_manifest(p)]
    _check_cuts(cuts, written)


def _per_shard(dest: Path) -> list:
    """The cuts of the per-shard manifests, in shard order."""
    parts = sorted(dest.glob("cuts.*.jsonl.gz"), key=lambda p: int(p.name.split(".")[1]))
    return [c for p in parts for c in lhotse.load_manifest(p)]


def test_one_manifest_holds_every_cut_once_in_shard_order(tmp_path: Path) -> None:
    pytest.importorskip("h5py")
    out = str(tmp_path / "out")
    written = build_output(out, shards=3, rows=4, url_root=str(tmp_path / "audio"))
    audio_files(written)
    dest = tmp_path / "cuts"
    summary = export_lhotse(out, str(dest))
    combined = dest / "cuts.jsonl.gz"
    assert summary.combined == str(combined) and str(combined) in summary.files
    assert f"all cuts in one manifest: {combined}" in summary.text()
    lazy = lhotse.load_manifest_lazy(combined)
    assert isinstance(lazy, lhotse.CutSet) and lazy.is_lazy
    cuts = list(lazy)
    parts = _per_shard(dest)
    assert len(parts) == 12 and len({c.id for c in cuts}) == len(cuts) == 12
    assert [c.to_dict() for c in cuts] == [c.to_dict() for c in parts]
    assert [c.id for c in lhotse.CutSet.from_jsonl_lazy(combined)] == [c.id for c in parts]
    assert [c.id for c in cuts] == sorted(written)  # shard order, each shard's row order
    _check_cuts(cuts, written)  # codes load from the HDF5 files under their final names
    assert all(".tmp-" not in c.wavlm_codebook_indexes.array.storage_path for c in cuts)
    assert not [p for p in dest.iterdir() if p.name.startswith(".tmp-")]


def test_reexport_replaces_everything_with_new_files(tmp_path: Path) -> None:
    pytest.importorskip("h5py")
    first = build_output(str(tmp_path / "a"), shards=2, rows=4, url_root=str(tmp_path / "audio"))
    audio_files(first)
    dest = tmp_path / "cuts"
    export_lhotse(str(tmp_path / "a"), str(dest))
    before = (dest / "cuts.jsonl.gz").stat().st_ino
    # A smaller export with other codes, one teacher: shard 1 and the Dasheng files go.
    second = build_output(
        str(tmp_path / "b"), shards=1, rows=4, seed=1, url_root=str(tmp_path / "b-audio")
    )
    audio_files(second)
    export_lhotse(str(tmp_path / "b"), str(dest), teachers=["wavlm"])
    assert (dest / "cuts.jsonl.gz").stat().st_ino != before
    names = sorted(p.name for p in dest.iterdir())
    assert names == ["cuts.00000.jsonl.gz", "cuts.jsonl.gz", "wavlm_codebook_indexes.00000.h5"]
    cuts = list(lhotse.load_manifest_lazy(dest / "cuts.jsonl.gz"))
    assert sorted(c.id for c in cuts) == sorted(second)
    for cut in cuts:
        row = second[cut.id]
        assert cut.recording.sources[0].source == row["url"]
        assert cut.load_custom("wavlm_codebook_indexes").tobytes() == row["wavlm_codes"]
        assert not cut.has_custom("dasheng_codebook_indexes")
    assert any(second[c].get("wavlm_codes") != first[c]["wavlm_codes"] for c in second)


def test_failed_reexport_leaves_the_earlier_export_as_it_was(tmp_path: Path) -> None:
    pytest.importorskip("h5py")
    first = build_output(str(tmp_path / "a"), shards=2, rows=4, url_root=str(tmp_path / "audio"))
    audio_files(first)
    dest = tmp_path / "cuts"
    export_lhotse(str(tmp_path / "a"), str(dest))
    snapshot = {p.name: (p.stat().st_ino, p.read_bytes()) for p in dest.iterdir()}
    second = build_output(
        str(tmp_path / "b"), shards=2, rows=4, seed=1, url_root=str(tmp_path / "b-audio")
    )
    audio_files(second)
    Path(second["00010003-0000"]["url"]).unlink()  # shard 1's last file: shard 0 is done by then
    with pytest.raises(SpearError, match="pass the run's manifest"):
        export_lhotse(str(tmp_path / "b"), str(dest))
    assert {p.name: (p.stat().st_ino, p.read_bytes()) for p in dest.iterdir()} == snapshot
    _check_cuts(list(lhotse.load_manifest_lazy(dest / "cuts.jsonl.gz")), first)


def test_one_layout_per_folder(tmp_path: Path) -> None:
    pytest.importorskip("h5py")
    out = str(tmp_path / "out")
    audio_files(build_output(out, shards=1, rows=2, url_root=str(tmp_path / "audio")))
    export_lhotse(out, str(tmp_path / "cuts"))
    with pytest.raises(SpearError, match="holds a cuts export"):
        export_lhotse(out, str(tmp_path / "cuts"), shar=True)
    export_lhotse(out, str(tmp_path / "shar"), shar=True)
    export_lhotse(out, str(tmp_path / "shar"), shar=True)  # a Shar re-export is fine
    with pytest.raises(SpearError, match="holds a Shar export"):
        export_lhotse(out, str(tmp_path / "shar"))
    assert not (tmp_path / "shar" / "cuts.jsonl.gz").exists()


def test_cli_prints_where_the_one_manifest_is(tmp_path: Path, capsys) -> None:
    pytest.importorskip("h5py")
    out = str(tmp_path / "out")
    audio_files(build_output(out, shards=2, rows=2, url_root=str(tmp_path / "audio")))
    dest = tmp_path / "cuts"
    assert run(["shards", "export-lhotse", out, "--out", f"file://{dest}"]) == 0
    text = capsys.readouterr().out
    assert "wrote 4 cuts as cuts" in text
    assert f"all cuts in one manifest: {dest / 'cuts.jsonl.gz'}" in text
    assert len(lhotse.load_manifest(dest / "cuts.jsonl.gz")) == 4


def test_shar_round_trip_carries_the_decoded_audio(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    written = build_output(out, shards=2, rows=4, url_root=str(tmp_path / "audio"))
    audio_files(written)
    dest = tmp_path / "shar"
    summary = export_lhotse(out, str(dest), shar=True, shard_size=3)
    assert summary.cuts == 8 and len(list(dest.glob("cuts.*.jsonl.gz"))) == 3
    assert len(list(dest.glob("recording.*.tar"))) == 3
    cuts = list(lhotse.CutSet.from_shar(in_dir=dest))
    assert sorted(c.id for c in cuts) == sorted(written)
    for cut in cuts:
        row = written[cut.id]
        assert cut.start == 0 and cut.sampling_rate == SAMPLE_RATE
        assert cut.custom["audio_url"] == row["url"]
        assert cut.custom["audio_start"] == row["start"]
        assert cut.load_audio().shape == (1, row["num_samples"])
        _check_codes(cut, row)


def _record_versions(t: pa.Table) -> pa.Table:
    """Each row's `file_version` as a version 2 manifest records it (tokenize copies it)."""
    versions = [local_version(os.stat(u)) for u in t["url"].to_pylist()]
    at = t.schema.get_field_index("file_version")
    return t.set_column(at, t.schema.field(at), pa.array(versions, pa.string()))


def test_shar_refuses_audio_changed_since_the_manifest(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    written = build_output(out, shards=2, rows=2, url_root=str(tmp_path / "audio"))
    audio_files(written)
    for shard in (0, 1):
        rewrite_shard(out, shard, _record_versions)
    assert export_lhotse(out, str(tmp_path / "shar"), shar=True).cuts == 4
    # Other audio of the same length (so the sample count check cannot see it): `changed`.
    row = next(iter(written.values()))
    sr, ch = _rate(row)
    old = sf.read(row["url"])[0]
    time.sleep(0.01)
    sf.write(row["url"], -old.reshape(len(old), ch), sr, subtype="PCM_16")
    with pytest.raises(SpearError, match="changed since the manifest"):
        export_lhotse(out, str(tmp_path / "shar2"), shar=True)


def test_unreadable_audio_without_manifest_is_a_clear_error(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    build_output(out, shards=1, rows=2, url_root=str(tmp_path / "nowhere"))
    with pytest.raises(SpearError, match="pass the run's manifest"):
        export_lhotse(out, str(tmp_path / "cuts"))
    with pytest.raises(SpearError, match="cannot decode its audio"):
        export_lhotse(out, str(tmp_path / "shar"), shar=True)
