"""Decode stage: sample counts, resampling, downmix, segment slicing, bad input, range reads.

Sample-count tolerance: a manifest duration ``d`` becomes ``round(d * sr)`` source frames and then
``round(frames * 16000 / sr)`` output samples (the resampler-independent length rule of
``resample``). Two roundings can land one sample from ``round(d * 16000)``, never more, so "within
one frame" is +-1 output sample: the finest resolution there is at 16 kHz.
"""

from __future__ import annotations

import glob
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from spear.formats import AUDIO_BATCH_COLUMNS, audio_from_bytes
from spear.stages.decode import (
    ERROR_TYPES,
    RESAMPLERS,
    DecodeConfig,
    DecodeError,
    Resampler,
    decode_batch,
    decode_dataset,
    decode_segment,
    resample,
    split_decoded,
)
from spear.storage import StorageConfig, join, write_atomic
from spear.synth import CorpusFile, HostileFile, file_bytes, hostile_files, sine, write_corpus

LOCAL = StorageConfig()
LONG_MINUTES = 1.0  # the long FLAC, kept short here; the range-read test builds a 10-minute one
POCKETSPHINX = "/usr/share/pocketsphinx/test/data"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[CorpusFile]]:
    url = str(tmp_path_factory.mktemp("corpus"))
    return url, write_corpus(url, LOCAL, long_minutes=LONG_MINUTES)


def good(files: list[CorpusFile]) -> list[CorpusFile]:
    return [cf for cf in files if cf.bad is None]


def manifest_row(url: str, cf: CorpusFile) -> dict[str, Any]:
    """The row a manifest would hold for ``cf`` (bad files: what their header promises)."""
    duration = {"truncated.wav": 2.0}.get(cf.name, cf.duration or 1.0)
    return {
        "item_id": f"id-{cf.name}",
        "source": "synth",
        "domain": "speech",
        "url": join(url, cf.name),
        "segment": 0,
        "start": 0.0,
        "duration": duration,
        "sample_rate": cf.sample_rate,
    }


def batch_of(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def peak_hz(x: np.ndarray, sr: int) -> float:
    """Frequency of the strongest FFT bin, refined by parabolic interpolation."""
    spec = np.abs(np.fft.rfft(x.astype(np.float64) * np.hanning(len(x))))
    k = int(np.argmax(spec[1:-1])) + 1
    a, b, c = np.log(spec[k - 1 : k + 2] + 1e-12)
    return (k + 0.5 * (a - c) / (a - 2 * b + c)) * sr / len(x)


@pytest.mark.parametrize("resampler", RESAMPLERS)
def test_good_files_length_frequency_level(
    corpus: tuple[str, list[CorpusFile]], resampler: Resampler
) -> None:
    url, files = corpus
    cfg = DecodeConfig(resampler=resampler)
    for cf in good(files):
        y = decode_segment(join(url, cf.name), 0.0, cf.duration, cfg, LOCAL)
        assert y.dtype == np.int16 and y.ndim == 1
        assert abs(len(y) - round(cf.duration * 16000)) <= 1, cf.name
        assert peak_hz(y, 16000) == pytest.approx(cf.freq, abs=1.0), cf.name
        # Channel c is the sine shifted by c/4 turn: the stereo mean has amplitude 0.5*cos(pi/4).
        amp = 0.5 if cf.channels == 1 else 0.5 * np.cos(np.pi / 4)
        mid = y[len(y) // 4 : -len(y) // 4] / 32768.0  # away from codec/resampler edges
        assert np.sqrt(np.mean(mid**2)) == pytest.approx(amp / np.sqrt(2), rel=0.02), cf.name


def test_lossless_16k_is_bit_exact(corpus: tuple[str, list[CorpusFile]]) -> None:
    url, _ = corpus
    for name in ("pcm16_16k_mono.wav", "pcm16_16k_mono.flac"):
        ref, _sr = sf.read(join(url, name), dtype="int16")
        y = decode_segment(join(url, name), 0.0, None, DecodeConfig(), LOCAL)
        np.testing.assert_array_equal(y, ref)


def test_stereo_downmix_is_channel_mean(corpus: tuple[str, list[CorpusFile]]) -> None:
    url, _ = corpus
    path = join(url, "pcm24_48k_stereo.wav")
    ref, sr = sf.read(path, dtype="float32")
    # Decode at the file's own rate: no resampling, so only the downmix is under test.
    y = decode_segment(path, 0.0, None, DecodeConfig(sample_rate=sr), LOCAL)
    expected = np.clip(np.rint(ref.mean(axis=1) * 32768), -32768, 32767)
    np.testing.assert_array_equal(y, expected.astype(np.int16))


def test_segment_from_the_middle_of_the_long_file(corpus: tuple[str, list[CorpusFile]]) -> None:
    url, _ = corpus
    path = join(url, "long_16k_mono.flac")
    full, _sr = sf.read(path, dtype="int16")
    start, duration = 31.37, 5.0
    y = decode_segment(path, start, duration, DecodeConfig(), LOCAL)
    first = round(start * 16000)
    np.testing.assert_array_equal(y, full[first : first + 80000])


@pytest.mark.parametrize("resampler", RESAMPLERS)
def test_segment_slicing_every_format(
    corpus: tuple[str, list[CorpusFile]], resampler: Resampler
) -> None:
    """A middle third of each file: right length, and (lossless) the same samples as resampling
    the whole file and cutting, away from the segment's edges where the filters ramp in. Starts
    are whole 10 ms, so the source and 16 kHz sample grids line up at the cut."""
    url, files = corpus
    cfg = DecodeConfig(resampler=resampler)
    for cf in good(files):
        start, duration = round(cf.duration / 3, 2), cf.duration / 3
        y = decode_segment(join(url, cf.name), start, duration, cfg, LOCAL)
        assert abs(len(y) - round(duration * 16000)) <= 1, cf.name
        assert peak_hz(y, 16000) == pytest.approx(cf.freq, abs=1.0), cf.name
        if cf.lossy:
            continue
        whole = decode_segment(join(url, cf.name), 0.0, cf.duration, cfg, LOCAL)
        first = round(start * 16000)
        ref = whole[first : first + len(y)].astype(np.int32)
        edge = 200  # > the resamplers' filter half-lengths at 16 kHz
        diff = np.abs(y[edge:-edge].astype(np.int32) - ref[edge:-edge])
        assert diff.max() <= 2, cf.name


# (passband tone Hz, stopband tone Hz, max stopband level dB). torchaudio's default sinc (6 zero
# crossings, rolloff 0.99) droops 1.8 dB at 7 kHz and lets 8-9 kHz alias back at -7..-17 dB; soxr
# HQ is flat to 7 kHz and rejects everything above 8 kHz by > 130 dB (benchmarks/decode.py).
ALIAS_LIMITS = {"soxr": (7000, 8500, -120.0), "torchaudio": (4000, 12000, -50.0)}


@pytest.mark.parametrize("resampler", RESAMPLERS)
def test_resample_passband_and_alias_rejection(resampler: Resampler) -> None:
    sr = 48000
    t = np.arange(sr) / sr
    pass_hz, stop_hz, stop_db = ALIAS_LIMITS[resampler]

    def level_db(freq: float) -> float:
        x = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
        y = resample(x, sr, 16000, resampler)[2000:-2000]  # away from the edges
        return float(20 * np.log10(np.sqrt(np.mean(y**2)) / (0.5 / np.sqrt(2)) + 1e-15))

    assert abs(level_db(pass_hz)) < 0.1
    assert level_db(stop_hz) < stop_db


def test_bad_files_give_their_reason(corpus: tuple[str, list[CorpusFile]]) -> None:
    url, files = corpus
    bad = [cf for cf in files if cf.bad]
    assert {cf.bad for cf in bad} == {"empty", "truncated", "unreadable", "too_short"}
    for cf in bad:
        row = manifest_row(url, cf)
        with pytest.raises(DecodeError) as info:
            decode_segment(row["url"], row["start"], row["duration"], DecodeConfig(), LOCAL)
        assert info.value.error_type == cf.bad, (cf.name, info.value)
        assert info.value.error_type in ERROR_TYPES
        assert cf.name in info.value.message


def test_segment_beyond_the_file_is_truncated(corpus: tuple[str, list[CorpusFile]]) -> None:
    url, _ = corpus
    path = join(url, "pcm16_16k_mono.wav")  # 3 s
    for start, duration in ((0.0, 5.0), (10.0, 1.0), (2.5, 1.0)):
        with pytest.raises(DecodeError) as info:
            decode_segment(path, start, duration, DecodeConfig(), LOCAL)
        assert info.value.error_type == "truncated"
    # Within the tolerance (a few codec frames) the segment decodes, shorter.
    y = decode_segment(path, 2.0, 1.05, DecodeConfig(), LOCAL)
    assert len(y) == 16000


def test_too_short_threshold_is_configurable(corpus: tuple[str, list[CorpusFile]]) -> None:
    url, _ = corpus
    path = join(url, "too_short.wav")  # 0.05 s
    assert len(decode_segment(path, 0.0, 0.05, DecodeConfig(min_seconds=0.01), LOCAL)) == 800
    with pytest.raises(DecodeError, match="too_short"):
        decode_segment(
            join(url, "pcm16_16k_mono.wav"), 0.0, 3.0, DecodeConfig(min_seconds=5), LOCAL
        )


def test_missing_file_is_io(tmp_path: Path) -> None:
    with pytest.raises(DecodeError) as info:
        decode_segment(str(tmp_path / "nope.wav"), 0.0, 1.0, DecodeConfig(), LOCAL)
    assert info.value.error_type == "io"


def test_storage_failure_mid_read_is_io_not_truncated(
    corpus: tuple[str, list[CorpusFile]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """libsndfile turns a failing read into a short read; the guard reports the real cause."""
    import fsspec.implementations.local as local

    url, _ = corpus
    real_read = local.LocalFileOpener.read
    calls = []

    def flaky_read(self: Any, n: int = -1) -> bytes:
        calls.append(n)
        if len(calls) > 1:  # the header read succeeds, the samples' read fails
            raise ConnectionResetError("connection reset by peer")
        return bytes(real_read(self, n))

    monkeypatch.setattr(local.LocalFileOpener, "read", flaky_read)
    with pytest.raises(DecodeError) as info:
        decode_segment(join(url, "pcm16_16k_mono.wav"), 0.0, 3.0, DecodeConfig(), LOCAL)
    assert info.value.error_type == "io"
    assert "ConnectionResetError" in info.value.message


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="resampler"):
        DecodeConfig(resampler="sinc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="io_threads"):
        DecodeConfig(io_threads=0)
    with pytest.raises(ValueError, match="timeout_seconds"):
        DecodeConfig(timeout_seconds=0)
    with pytest.raises(ValueError, match="max_channels"):
        DecodeConfig(max_channels=0)


def check_decoded(out: dict[str, np.ndarray], rows: list[dict[str, Any]], files: Any) -> None:
    """``out`` (decode_batch or a dataset's rows) matches the corpus rows it came from."""
    by_url = {join(files[0], cf.name): cf for cf in files[1]}
    assert set(AUDIO_BATCH_COLUMNS) | {"error_type", "error", "url", "start"} <= set(out)
    assert len(out["item_id"]) == len(rows)
    for i, u in enumerate(out["url"]):
        cf = by_url[str(u)]
        audio = audio_from_bytes(out["audio"][i])
        assert len(audio) == out["num_samples"][i]
        if cf.bad is None:
            assert out["error_type"][i] == "" and out["error"][i] == ""
            assert abs(int(out["num_samples"][i]) - round(cf.duration * 16000)) <= 1
        else:
            assert out["error_type"][i] == cf.bad, (cf.name, out["error"][i])
            assert len(audio) == 0 and cf.name in out["error"][i]


def test_decode_batch_and_split(corpus: tuple[str, list[CorpusFile]]) -> None:
    url, files = corpus
    rows = [manifest_row(url, cf) for cf in files]
    out = decode_batch(batch_of(rows), DecodeConfig(io_threads=3), LOCAL)
    assert out["num_samples"].dtype == np.int64
    assert list(out["item_id"]) == [r["item_id"] for r in rows]  # order kept
    assert out["domain"][0] == "speech" and out["segment"][0] == 0  # manifest columns carried
    check_decoded(out, rows, corpus)

    ok, quarantine = split_decoded(out)
    assert "error_type" not in ok and "error" not in ok
    assert len(ok["item_id"]) == len(good(files))
    assert {q["item_id"]: q["error_type"] for q in quarantine} == {
        f"id-{cf.name}": cf.bad for cf in files if cf.bad
    }
    assert all(q["stage"] == "decode" and q["source"].startswith(url) for q in quarantine)


@pytest.fixture(scope="module")
def s3_corpus(s3_server: Any) -> tuple[str, list[CorpusFile]]:
    url = join(s3_server.bucket("decode-corpus"), "corpus")
    return url, write_corpus(url, s3_server.storage, long_minutes=0.5)


@pytest.mark.integration
def test_s3_good_and_bad(s3_corpus: tuple[str, list[CorpusFile]], s3_server: Any) -> None:
    url, files = s3_corpus
    rows = [manifest_row(url, cf) for cf in files]
    out = decode_batch(batch_of(rows), DecodeConfig(), s3_server.storage)
    check_decoded(out, rows, s3_corpus)
    with pytest.raises(DecodeError) as info:
        decode_segment(join(url, "missing.flac"), 0.0, 1.0, DecodeConfig(), s3_server.storage)
    assert info.value.error_type == "io"


@pytest.mark.integration
@pytest.mark.parametrize("fmt", ["FLAC", "WAV"])
def test_s3_segment_reads_a_few_blocks_not_the_file(
    s3_server: Any, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """5 s from the middle of a 10-minute file fetches O(blocks), not O(file)."""
    import s3fs.core

    block = 256 << 10
    storage = replace(s3_server.storage, block_size=block)
    cf = CorpusFile(f"ten_min.{fmt.lower()}", 600.0, 16000, 1, fmt, "PCM_16", 250.0)
    data = file_bytes(cf)
    url = join(s3_server.bucket("decode-ranges"), cf.name)
    write_atomic(url, data, storage)

    fetched: list[tuple[int, int]] = []
    real_fetch = s3fs.core.S3File._fetch_range

    def counting(self: Any, start: int, end: int) -> bytes:
        fetched.append((start, end))
        return bytes(real_fetch(self, start, end))

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", counting)
    y = decode_segment(url, 300.0, 5.0, DecodeConfig(), storage)
    total = sum(e - s for s, e in fetched)
    assert len(y) == 80000
    assert peak_hz(y, 16000) == pytest.approx(250.0, abs=1.0)
    assert total <= 4 * block and total < len(data) / 4, (total, len(data), fetched)


@pytest.mark.integration
def test_decode_dataset_on_ray(
    ray_cluster: str, s3_corpus: tuple[str, list[CorpusFile]], s3_server: Any
) -> None:
    import ray.data

    url, files = s3_corpus
    rows = [manifest_row(url, cf) for cf in files]
    ds = ray.data.from_items(rows)
    out = decode_dataset(ds, DecodeConfig(), s3_server.storage, batch_size=8)
    got = out.to_pandas().sort_values("item_id")
    rows.sort(key=lambda r: r["item_id"])
    check_decoded({c: got[c].to_numpy() for c in got.columns}, rows, s3_corpus)


def pocketsphinx_wavs() -> list[str]:
    return sorted(glob.glob(os.path.join(POCKETSPHINX, "**", "*.wav"), recursive=True))


@pytest.mark.skipif(
    not pocketsphinx_wavs(),
    reason=f"real recordings absent: install Debian's pocketsphinx-testdata ({POCKETSPHINX})",
)
def test_real_librivox_recordings() -> None:
    """LibriVox (Sense and Sensibility) and CMU 'cards' clips: 16 kHz PCM_16 speech."""
    wavs = pocketsphinx_wavs()
    assert any("librivox" in w for w in wavs)
    for path in wavs:
        ref, sr = sf.read(path, dtype="int16")
        y = decode_segment(path, 0.0, len(ref) / sr, DecodeConfig(), LOCAL)
        np.testing.assert_array_equal(y, ref)
        # Speech through a 16k -> 48k -> 16k round trip stays close: both resamplers are sound.
        up = resample(ref / 32768.0, sr, 48000, "soxr").astype(np.float32)
        for r in RESAMPLERS:
            back = resample(up, 48000, sr, r)
            err = back[400:-400] - ref[400:-400] / 32768.0
            snr = 10 * np.log10(np.sum((ref[400:-400] / 32768.0) ** 2) / np.sum(err**2))
            assert len(back) == len(ref) and snr > 30, (path, r, snr)


def test_transient_read_errors_are_retried(tmp_path) -> None:
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    from spear.stages.decode import decode_batch

    class Flaky(LocalFileSystem):  # the first two opens fail as a throttled S3 GET would
        protocol = "flaky"
        fails = 2

        def _open(self, path, *args, **kwargs):  # type: ignore[no-untyped-def]
            if Flaky.fails:
                Flaky.fails -= 1
                raise ConnectionResetError("connection reset by peer")
            return super()._open(path, *args, **kwargs)

    fsspec.register_implementation("flaky", Flaky, clobber=True)
    sf.write(tmp_path / "a.wav", np.zeros(16000, np.int16), 16000, subtype="PCM_16")
    batch = {"url": np.array([f"flaky://{tmp_path}/a.wav"], dtype=object)}
    cfg = DecodeConfig(io_retries=3)
    out = decode_batch(batch, cfg, StorageConfig())
    assert out["error_type"][0] == "" and out["num_samples"][0] == 16000
    Flaky.fails = 5  # more failures than retries: quarantined as io, with the reason
    out = decode_batch(batch, DecodeConfig(io_retries=1), StorageConfig())
    assert out["error_type"][0] == "io" and "reset" in out["error"][0]


# ---------------------------------------------------------------- headers that lie

HOSTILE = {h.name: h for h in hostile_files()}
# What decoding a whole hostile file gives where it differs from the probe's reason: the decode
# stage sees only items the probe passed, so these are for manifests made elsewhere.
DECODE_WHOLE = {
    "flac_cut_off.flac": "unreadable",  # libFLAC loses sync where the bytes stop
    "flac_no_samples.flac": "empty",
    "mp3_vbr_untagged.mp3": None,  # decodes libsndfile's 0.46 s estimate; the probe refuses it
}


@pytest.mark.parametrize("case", list(HOSTILE.values()), ids=list(HOSTILE))
def test_lying_headers_decode_or_quarantine(case: HostileFile, tmp_path: Path) -> None:
    path = str(tmp_path / case.name)
    Path(path).write_bytes(case.data)
    reason = DECODE_WHOLE.get(case.name, case.probe)
    try:
        y = decode_segment(path, 0.0, None, DecodeConfig(), LOCAL)
    except DecodeError as err:
        assert err.error_type == reason, err
        assert path in err.message
        return
    assert reason is None, f"decoded {len(y)} samples, expected {reason}"
    if case.probe is None and case.seconds is not None:
        assert len(y) == round(case.seconds * 16000)


def test_unknown_length_flac_segments_are_exact(tmp_path: Path) -> None:
    """A FLAC streamed without a length cannot seek (libFLAC fails); a segment from its middle
    is reached by decoding up to it, bit-exact."""
    case = HOSTILE["flac_streamed.flac"]
    path = str(tmp_path / case.name)
    Path(path).write_bytes(case.data)
    ref = (sine(3.0, 16000, 440.0)[:, 0] * 32768).round().clip(-32768, 32767)
    y = decode_segment(path, 1.25, 1.0, DecodeConfig(), LOCAL)
    np.testing.assert_array_equal(y, ref[20000:36000].astype(np.int16))
    with pytest.raises(DecodeError) as err:
        decode_segment(path, 4.0, 1.0, DecodeConfig(), LOCAL)
    assert err.value.error_type == "truncated" and "stream ends at 3.000 s" in err.value.message


def test_memory_limit_refuses_before_reading(tmp_path: Path, monkeypatch) -> None:
    path = str(tmp_path / "a.wav")
    sf.write(path, sine(10.0, 48000, 440.0), 48000, subtype="PCM_16")
    calls: list[int] = []
    import spear.stages.decode as decode

    monkeypatch.setattr(decode, "read_into", lambda *a: calls.append(1) or 0)
    cfg = DecodeConfig(max_memory_bytes=4 << 20)  # 10 s at 48 kHz needs 8*480000 + 10*160000
    for duration in (10.0, None):
        with pytest.raises(DecodeError) as err:
            decode_segment(path, 0.0, duration, cfg, LOCAL)
        assert err.value.error_type == "too_long" and "max_memory_bytes (4 MiB)" in str(err.value)
    assert not calls  # refused from the header, nothing read or allocated
    monkeypatch.undo()
    assert len(decode_segment(path, 0.0, 1.0, cfg, LOCAL)) == 16000


def test_memory_limit_bounds_a_file_of_unknown_length(tmp_path: Path) -> None:
    case = HOSTILE["flac_streamed.flac"]  # 3 s, length unknown to the header
    path = str(tmp_path / case.name)
    Path(path).write_bytes(case.data)
    cfg = DecodeConfig(max_memory_bytes=18 * 16000)  # 18 bytes a frame at 16 kHz: one second
    with pytest.raises(DecodeError) as err:
        decode_segment(path, 0.0, None, cfg, LOCAL)
    assert err.value.error_type == "too_long"


def test_decode_time_limit_holds_inside_libsndfile(tmp_path: Path, slow_store: Any) -> None:
    """Every read libsndfile makes sleeps; the segment's budget ends the decode on time."""
    import time

    slow_store("slowdecode", 0.05)
    path = tmp_path / "a.flac"
    sf.write(path, sine(30.0, 16000, 440.0), 16000, subtype="PCM_16")
    storage = StorageConfig(block_size=4096)
    t0 = time.monotonic()
    with pytest.raises(DecodeError) as err:
        decode_segment(
            f"slowdecode://{path}", 0.0, 30.0, DecodeConfig(timeout_seconds=0.5), storage
        )
    assert err.value.error_type == "timeout" and "0.5 s limit" in err.value.message
    assert time.monotonic() - t0 < 1.5
