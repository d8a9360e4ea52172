"""Input that must never become tokens silently: non-finite samples, files changed since the
manifest, odd names, special files, several Ogg streams, and MP3 segments read by seek point.

Each case goes through the real probe (``probe_files``) and decode (``decode_batch``), on local
files and, where storage matters, on the S3 API server fixture.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from spear.stages.audio_io import (
    MP3_PREROLL_FRAMES,
    SpliceFile,
    content_version,
    mp3_index,
    mp3_seek_point,
    read_into,
)
from spear.stages.decode import (
    DecodeConfig,
    DecodeError,
    SeekPoint,
    decode_batch,
    decode_segment,
)
from spear.stages.manifest import ManifestConfig, probe_files
from spear.storage import StorageConfig, filesystem, write_atomic

LOCAL = StorageConfig()
DECODE = DecodeConfig(io_threads=1, io_retries=0)


def batch(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    return {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}


def decode_rows(rows: list[dict[str, Any]], storage: StorageConfig = LOCAL) -> dict[str, Any]:
    return decode_batch(batch(rows), DECODE, storage)


def encode(x: np.ndarray, sr: int, fmt: str, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def tone(seconds: float, sr: int, channels: int = 1, freq: float = 440.0) -> np.ndarray:
    t = np.arange(round(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * freq * t)
    return np.repeat(x[:, None], channels, axis=1).astype(np.float32)


# ---------------------------------------------------------------- non-finite samples

FLOAT_FORMATS = [
    ("WAV", "FLOAT"),
    ("WAV", "DOUBLE"),
    ("AIFF", "FLOAT"),
    ("CAF", "DOUBLE"),
    ("AU", "FLOAT"),
    ("W64", "FLOAT"),
    ("RF64", "DOUBLE"),
]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(("fmt", "subtype"), FLOAT_FORMATS)
def test_non_finite_samples_are_quarantined(
    tmp_path: Path, fmt: str, subtype: str, bad: float
) -> None:
    """One NaN/Inf sample in one of six channels of a 44.1 kHz file: the probe (headers only)
    makes its items; the decode of the window holding it is ``non_finite``, the others decode."""
    sr = 44_100
    x = tone(3.0, sr, channels=6).astype(np.float64)
    x[round(2.5 * sr), 3] = bad
    path = tmp_path / f"bad.{fmt.lower()}"
    path.write_bytes(encode(x, sr, fmt, subtype))
    cfg = ManifestConfig(audio_window_seconds=1.0)
    res = probe_files([(str(path), -1, "audio")], "t", cfg, LOCAL)
    assert not res.quarantine and len(res.rows) == 3
    out = decode_rows(res.rows)
    assert list(out["error_type"]) == ["", "", "non_finite"], list(out["error"])
    assert "2.500 s" in out["error"][2] and str(path) in out["error"][2]
    with pytest.raises(DecodeError) as err:  # a decode to the end, no manifest
        decode_segment(str(path), 0.0, None, DECODE, LOCAL)
    assert err.value.error_type == "non_finite"


def test_finite_float_files_decode(tmp_path: Path) -> None:
    """The check refuses nothing finite: full-scale and tiny values pass."""
    x = tone(1.0, 16_000)
    x[10] = 1.0
    x[11] = -1.0
    x[12] = 1e-38
    path = tmp_path / "ok.wav"
    path.write_bytes(encode(x, 16_000, "WAV", "FLOAT"))
    y = decode_segment(str(path), 0.0, None, DECODE, LOCAL)
    assert len(y) == 16_000 and y[10] == 32767 and y[11] == -32768


# ---------------------------------------------------------------- files changed since the manifest


def _probe_one(url: str, storage: StorageConfig = LOCAL) -> list[dict[str, Any]]:
    res = probe_files([(url, -1, "speech")], "t", ManifestConfig(), storage)
    assert not res.quarantine, res.quarantine
    return res.rows


def test_changed_local_file_is_quarantined_and_rebuilt_with_new_ids(tmp_path: Path) -> None:
    path = tmp_path / "a.flac"
    path.write_bytes(encode(tone(40.0, 16_000), 16_000, "FLAC", "PCM_16"))
    rows = _probe_one(str(path))
    assert [r["file_version"].split(",")[0] for r in rows] == [f"size={path.stat().st_size}"] * 2
    assert list(decode_rows(rows)["error_type"]) == ["", ""]
    # Replaced by a longer recording: every item of it is `changed`, nothing decodes.
    path.write_bytes(encode(tone(70.0, 16_000, freq=880), 16_000, "FLAC", "PCM_16"))
    out = decode_rows(rows)
    assert list(out["error_type"]) == ["changed", "changed"]
    assert "changed since the manifest" in out["error"][0] and not any(out["audio"])
    # The same bytes written again (a new mtime): changed too; size and mtime are what is known.
    data = path.read_bytes()
    rows2 = _probe_one(str(path))
    time.sleep(0.01)
    path.write_bytes(data)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert list(decode_rows(rows2)["error_type"]) == ["changed"] * 3
    # A manifest built again holds the new content under new ids.
    rows3 = _probe_one(str(path))
    assert len(rows3) == 3 and list(decode_rows(rows3)["error_type"]) == [""] * 3
    assert not {r["item_id"] for r in rows3} & {r["item_id"] for r in rows}
    assert rows3[0]["item_id"] != rows2[0]["item_id"]


def test_old_manifest_rows_are_checked_by_size(tmp_path: Path) -> None:
    """A version 1 manifest has no file_version (null): its file_size is compared."""
    path = tmp_path / "a.wav"
    path.write_bytes(encode(tone(2.0, 16_000), 16_000, "WAV", "PCM_16"))
    rows = _probe_one(str(path))
    for r in rows:
        r["file_version"] = None
    assert list(decode_rows(rows)["error_type"]) == [""]
    path.write_bytes(encode(tone(3.0, 16_000), 16_000, "WAV", "PCM_16"))
    out = decode_rows(rows)
    assert list(out["error_type"]) == ["changed"] and "manifest recorded" in out["error"][0]


@pytest.mark.integration
def test_changed_s3_object_is_quarantined(s3_server: Any) -> None:
    storage = s3_server.storage
    url = s3_server.bucket("changed") + "/a.flac"
    write_atomic(url, encode(tone(40.0, 16_000), 16_000, "FLAC", "PCM_16"), storage)
    rows = _probe_one(url, storage)
    assert "etag=" in rows[0]["file_version"]
    assert list(decode_rows(rows, storage)["error_type"]) == ["", ""]
    write_atomic(url, encode(tone(40.0, 16_000, freq=880), 16_000, "FLAC", "PCM_16"), storage)
    assert list(decode_rows(rows, storage)["error_type"]) == ["changed", "changed"]
    rows2 = _probe_one(url, storage)
    assert list(decode_rows(rows2, storage)["error_type"]) == ["", ""]
    assert rows2[0]["item_id"] != rows[0]["item_id"]


def test_content_version_prefers_the_stores_identity() -> None:
    assert content_version(5, {"ETag": '"abc"', "LastModified": "x"}) == "size=5,etag=abc"
    assert content_version(5, {"ETag": '"a"', "VersionId": "v1"}) == "size=5,etag=a,versionid=v1"
    assert content_version(5, {"mtime_ns": 7}) == "size=5,mtime_ns=7"
    assert content_version(5, {}) == "size=5"


# ---------------------------------------------------------------- names fsspec reads as syntax

ODD_NAMES = [
    "a::b.wav",
    "c#d.wav",
    "e?f.wav",
    "g%20h%2Fi.wav",
    "j[1]{2}*.wav",
    "-k.wav",
    "l m&n=o+p'q.wav",
    "ü ß 語.wav",
]


def _odd_names_round_trip(root: str, storage: StorageConfig) -> None:
    from spear.stages.manifest import SourceConfig, list_source

    for i, name in enumerate(ODD_NAMES):
        x = tone(1.0 + i / 10, 16_000)
        write_atomic(f"{root}/{name}", encode(x, 16_000, "WAV", "PCM_16"), storage)
    listed = list_source(SourceConfig(url=root), ManifestConfig(), storage)
    assert sorted(u.rsplit("/", 1)[1] for u, _, _ in listed) == sorted(ODD_NAMES)
    res = probe_files(listed, "odd", ManifestConfig(), storage)
    assert not res.quarantine, res.quarantine
    out = decode_rows(res.rows, storage)
    assert list(out["error_type"]) == [""] * len(ODD_NAMES), list(out["error"])
    for url, n in zip(out["url"], out["num_samples"], strict=True):
        i = ODD_NAMES.index(url.rsplit("/", 1)[1])
        assert n == round((1.0 + i / 10) * 16_000)


def test_odd_names_local(tmp_path: Path) -> None:
    _odd_names_round_trip(str(tmp_path / "odd"), LOCAL)
    _, path = filesystem(str(tmp_path / "odd" / "a::b.wav"), LOCAL)
    assert path.endswith("/odd/a::b.wav")


@pytest.mark.integration
def test_odd_names_s3(s3_server: Any) -> None:
    _odd_names_round_trip(s3_server.bucket("odd") + "/dir", s3_server.storage)


# ---------------------------------------------------------------- special files


def test_dangling_link_and_pipe_have_their_reason(tmp_path: Path) -> None:
    os.symlink(tmp_path / "nowhere.wav", tmp_path / "dangling.wav")
    os.mkfifo(tmp_path / "pipe.wav")
    os.symlink(tmp_path / "self.wav", tmp_path / "self.wav")
    files = [(str(tmp_path / n), -1, "speech") for n in ("dangling.wav", "pipe.wav", "self.wav")]
    t0 = time.monotonic()
    res = probe_files(files, "t", ManifestConfig(), LOCAL)
    assert time.monotonic() - t0 < 5, "opening a named pipe waits for a writer forever"
    reasons = {q["source"].rsplit("/", 1)[1]: q for q in res.quarantine}
    assert reasons["dangling.wav"]["error_type"] == "dangling_link"
    assert "nowhere.wav" in reasons["dangling.wav"]["message"]
    assert reasons["pipe.wav"]["error_type"] == "special_file"
    assert "named pipe" in reasons["pipe.wav"]["message"]
    assert reasons["self.wav"]["error_type"] == "dangling_link"
    with pytest.raises(DecodeError) as err:
        decode_segment(str(tmp_path / "pipe.wav"), 0.0, 1.0, DECODE, LOCAL)
    assert err.value.error_type == "special_file"


# ---------------------------------------------------------------- several Ogg streams


def _chained(subtype: str) -> bytes:
    return encode(tone(1.0, 48_000), 48_000, "OGG", subtype) + encode(
        tone(2.0, 48_000), 48_000, "OGG", subtype
    )


@pytest.mark.parametrize("subtype", ["VORBIS", "OPUS"])
def test_chained_ogg_is_unsupported_not_truncated(tmp_path: Path, subtype: str) -> None:
    path = tmp_path / "chained.ogg"
    path.write_bytes(_chained(subtype))
    assert sf.info(str(path)).duration == pytest.approx(1.0, abs=0.01)  # what libsndfile sees
    res = probe_files([(str(path), -1, "speech")], "t", ManifestConfig(), LOCAL)
    assert not res.rows and res.quarantine[0]["error_type"] == "unsupported"
    assert "chained Ogg" in res.quarantine[0]["message"]
    with pytest.raises(DecodeError) as err:
        decode_segment(str(path), 0.0, None, DECODE, LOCAL)
    assert err.value.error_type == "unsupported"
    # One stream is fine, and so is a file cut mid-page (truncation is found elsewhere).
    single = tmp_path / "single.ogg"
    single.write_bytes(encode(tone(3.0, 48_000), 48_000, "OGG", subtype))
    res = probe_files([(str(single), -1, "speech")], "t", ManifestConfig(), LOCAL)
    assert not res.quarantine and res.rows[0]["file_duration"] == pytest.approx(3.0)


def test_multiplexed_ogg_is_unsupported(tmp_path: Path) -> None:
    """Two streams' first pages side by side (a grouped Ogg), then the first stream."""
    a = encode(tone(1.0, 48_000), 48_000, "OGG", "VORBIS")
    b = encode(tone(1.0, 48_000), 48_000, "OGG", "VORBIS")
    first_a = 27 + a[26] + sum(a[27 : 27 + a[26]])
    first_b = 27 + b[26] + sum(b[27 : 27 + b[26]])
    path = tmp_path / "grouped.ogg"
    path.write_bytes(a[:first_a] + b[:first_b] + a[first_a:])
    res = probe_files([(str(path), -1, "speech")], "t", ManifestConfig(), LOCAL)
    assert res.quarantine and res.quarantine[0]["error_type"] in ("unsupported", "unreadable")


# ---------------------------------------------------------------- MP3 seek points


def _mp3(seconds: float, sr: int = 44_100, mode: str = "VARIABLE") -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.arange(round(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * 440 * t * (1 + 0.1 * np.sin(t)))
    x += 0.05 * rng.standard_normal(len(t))
    buf = io.BytesIO()
    with sf.SoundFile(
        buf, "w", sr, 1, format="MP3", subtype="MPEG_LAYER_III", bitrate_mode=mode
    ) as f:
        f.write(x.astype(np.float32))
    data = buf.getvalue()
    return data, sf.read(io.BytesIO(data), dtype="float32")[0]


@pytest.mark.parametrize("mode", ["VARIABLE", "CONSTANT"])
def test_mp3_decode_from_a_seek_point_equals_decode_from_the_top(mode: str) -> None:
    data, full = _mp3(60.0, mode=mode)
    index = mp3_index(lambda o, n: data[o : o + n], len(data), len(full))
    assert index is not None and index.header[1] > 0
    assert len(index.offsets) * index.samples_per_frame >= len(full)
    assert mp3_seek_point(index, 1000) == (0, 0)  # near the top: no seek point
    for first in (44_100 * 20 + 123, len(full) - 44_100):
        offset, sample = mp3_seek_point(index, first)
        assert offset > 0 and first - sample >= MP3_PREROLL_FRAMES * 1152
        snd = sf.SoundFile(SpliceFile(io.BytesIO(data), index.header, offset, len(data)))
        out = np.empty((first - sample + 44_100, 1), np.float32)
        got = read_into(snd, out)
        assert got == len(out)
        ref = full[first : first + 44_100]
        np.testing.assert_allclose(out[first - sample :, 0], ref, atol=1e-6)


def test_mp3_segments_from_the_manifest_match_and_read_little(tmp_path: Path) -> None:
    data, full = _mp3(150.0)
    path = tmp_path / "long.mp3"
    path.write_bytes(data)
    res = probe_files([(str(path), -1, "speech")], "t", ManifestConfig(), LOCAL)
    assert not res.quarantine and len(res.rows) == 5
    assert res.rows[0]["seek_offset"] == 0 and all(r["seek_offset"] > 0 for r in res.rows[1:])
    cfg = DecodeConfig(io_threads=1, io_retries=0, sample_rate=44_100)
    for r in res.rows:
        seek = SeekPoint(
            r["seek_offset"], r["seek_sample"], (r["seek_header_offset"], r["seek_header_bytes"])
        )
        y = decode_segment(r["url"], r["start"], r["duration"], cfg, LOCAL, seek=seek)
        first = round(r["start"] * 44_100)
        ref = np.clip(np.rint(full[first : first + len(y)] * 32768), -32768, 32767)
        assert len(y) == round((r["start"] + r["duration"]) * 44_100) - first
        assert np.abs(y.astype(np.int32) - ref).max() <= 1
    out = decode_rows(res.rows)
    assert list(out["error_type"]) == [""] * 5


@pytest.mark.integration
def test_mp3_segment_on_s3_reads_its_own_length(s3_server: Any, monkeypatch) -> None:
    """The last 30 s of a 5-minute MP3 on S3: the seek point's decode fetches a few blocks, the
    decode from the top fetches the file (benchmarks/decode.py --mp3-reads measures 20 min)."""
    import s3fs.core

    data, _ = _mp3(300.0)
    url = s3_server.bucket("mp3seek") + "/five.mp3"
    write_atomic(url, data, s3_server.storage)
    res = probe_files([(url, -1, "speech")], "t", ManifestConfig(), s3_server.storage)
    r = res.rows[-1]
    fetched: list[int] = []
    real = s3fs.core.S3File._fetch_range

    def counting(self: Any, start: int, end: int) -> bytes:
        fetched.append(end - start)
        return bytes(real(self, start, end))

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", counting)
    header = (r["seek_header_offset"], r["seek_header_bytes"])
    seek = SeekPoint(r["seek_offset"], r["seek_sample"], header)
    args = (r["url"], r["start"], r["duration"], DECODE, s3_server.storage)
    y = decode_segment(*args, version=r["file_version"], seek=seek)
    after = sum(fetched)
    fetched.clear()
    y0 = decode_segment(*args)
    before = sum(fetched)
    np.testing.assert_array_equal(y, y0)
    assert before >= len(data) * 0.9 and after <= 2 << 20 and after < before / 3, (after, before)
