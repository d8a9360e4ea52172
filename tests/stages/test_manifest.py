"""Pure manifest functions: segmentation, ids, source parsing, header probes, listing."""

from __future__ import annotations

from pathlib import Path

import pytest

from spear.errors import ConfigError, StorageError
from spear.stages.manifest import (
    ManifestConfig,
    ProbeError,
    SourceConfig,
    item_id,
    list_source,
    parse_source,
    probe_file,
    probe_files,
    segments,
)
from spear.storage import StorageConfig
from spear.synth import write_corpus

CFG = ManifestConfig()
LOCAL = StorageConfig()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    root = tmp_path_factory.mktemp("corpus")
    files = write_corpus(str(root), long_minutes=2)
    return root, files


def test_speech_segments_are_equal_and_at_most_the_limit() -> None:
    segs = segments(75.0, "speech", CFG)
    assert len(segs) == 3
    assert all(d <= 30.0 + 1e-9 for _, d in segs)
    assert segs[0] == (0.0, 25.0) and segs[2][0] == pytest.approx(50.0)
    assert sum(d for _, d in segs) == pytest.approx(75.0)
    assert segments(30.0, "speech", CFG) == [(0.0, 30.0)]
    assert segments(12.3, "speech", CFG) == [(0.0, 12.3)]


def test_audio_windows_and_tail_rule() -> None:
    segs = segments(25.5, "audio", CFG)
    assert segs == [(0.0, 10.0), (10.0, 10.0), (20.0, pytest.approx(5.5))]
    # A tail shorter than audio_min_tail_seconds is dropped...
    assert segments(20.4, "audio", CFG) == [(0.0, 10.0), (10.0, 10.0)]
    # ...unless it is the only window.
    assert segments(0.4, "audio", CFG) == [(0.0, pytest.approx(0.4))]


def test_item_ids_are_stable_and_distinct() -> None:
    a = item_id("s3://b/x.flac", 0)
    assert a == item_id("s3://b/x.flac", 0)
    assert a != item_id("s3://b/x.flac", 1) != item_id("s3://b/y.flac", 1)
    assert a.endswith("-0000") and len(a) == 21


def test_parse_source_forms() -> None:
    assert parse_source("s3://b/libri") == SourceConfig(url="s3://b/libri", domain="speech")
    assert parse_source("/data/x", "audio").domain == "audio"
    s = parse_source("audio:audioset=s3://b/as")
    assert (s.domain, s.name, s.url) == ("audio", "audioset", "s3://b/as")
    assert parse_source("s3://b/k=v/x").url == "s3://b/k=v/x"  # '=' inside a URL is no prefix
    with pytest.raises(ConfigError, match="domain 'music'"):
        parse_source("music=s3://b/x")
    with pytest.raises(StorageError, match="unsupported storage URL"):
        parse_source("nosuchproto://b/x")


def test_bad_config_values_fail() -> None:
    with pytest.raises(ConfigError):
        ManifestConfig(speech_segment_seconds=0)
    with pytest.raises(ConfigError):
        ManifestConfig(files_per_task=0)


def test_probe_describes_every_good_file(corpus: tuple[Path, list]) -> None:
    root, files = corpus
    for cf in files:
        if cf.bad:
            continue
        info = probe_file(str(root / cf.name), -1, LOCAL)
        assert info.sample_rate == cf.sample_rate, cf.name
        assert info.channels == cf.channels, cf.name
        assert info.format == cf.format and info.subtype == cf.subtype, cf.name
        # MP3 encoders pad a little; everything else is exact.
        tol = 0.06 if cf.format == "MP3" else 1e-6
        assert info.duration == pytest.approx(cf.duration, abs=tol), cf.name


def test_every_bad_file_is_quarantined_with_its_reason(corpus: tuple[Path, list]) -> None:
    root, files = corpus
    listed = [(str(root / cf.name), -1, "speech") for cf in files]
    res = probe_files(listed, "corpus", CFG, LOCAL)
    reasons = {q["source"].rsplit("/", 1)[1]: q["error_type"] for q in res.quarantine}
    expected = {cf.name: cf.bad for cf in files if cf.bad}
    assert reasons == expected
    assert all(q["stage"] == "manifest" and q["message"] for q in res.quarantine)
    good = [cf for cf in files if not cf.bad]
    assert len({r["url"] for r in res.rows}) == len(good)
    # The 2-minute speech file is cut into 4 segments of 30 s.
    long_rows = [r for r in res.rows if r["url"].endswith("long_16k_mono.flac")]
    assert [r["segment"] for r in long_rows] == [0, 1, 2, 3]
    assert all(r["duration"] == pytest.approx(30.0) for r in long_rows)


def test_probe_unknown_reason_is_io(tmp_path: Path) -> None:
    with pytest.raises(ProbeError) as err:
        probe_file(str(tmp_path / "missing.wav"), 10, LOCAL)
    assert err.value.error_type == "io"


def test_list_directory_and_list_file(corpus: tuple[Path, list], tmp_path: Path) -> None:
    root, files = corpus
    (root / "notes.md").write_text("not audio, not listed")
    listed = list_source(SourceConfig(url=str(root)), CFG, LOCAL)
    assert [u.rsplit("/", 1)[1] for u, _, _ in listed] == sorted(cf.name for cf in files)
    lst = tmp_path / "files.txt"
    lst.write_text(f"# comment\n{root}/pcm16_16k_mono.wav\naudio\t{root}/vorbis_48k_stereo.ogg\n")
    listed = list_source(SourceConfig(url=str(lst)), CFG, LOCAL)
    assert [(u.rsplit("/", 1)[1], d) for u, _, d in listed] == [
        ("pcm16_16k_mono.wav", "speech"),
        ("vorbis_48k_stereo.ogg", "audio"),
    ]


def test_probe_reads_only_the_header_over_s3(s3_server, monkeypatch: pytest.MonkeyPatch) -> None:
    """A probe of a 10-minute FLAC on S3 fetches a few blocks, not the file."""
    import s3fs

    bucket = s3_server.bucket("probe-range")
    files = write_corpus(f"{bucket}/c", s3_server.storage, long_minutes=10)
    fetched: list[int] = []
    orig = s3fs.core.S3File._fetch_range

    def counting(self, start: int, end: int) -> bytes:  # type: ignore[no-untyped-def]
        fetched.append(end - start)
        return orig(self, start, end)

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", counting)
    for name in ("long_16k_mono.flac", "pcm24_48k_stereo.wav"):
        fetched.clear()
        size = next(cf for cf in files if cf.name == name)
        info = probe_file(f"{bucket}/c/{name}", -1, s3_server.storage, block_size=65536)
        assert info.duration == pytest.approx(size.duration)
        assert sum(fetched) <= 4 * 65536, (name, fetched, info.size)
        assert sum(fetched) < info.size / 4


def test_bad_urls_in_a_list_become_quarantine_rows(tmp_path: Path) -> None:
    files = [(str(tmp_path / "nope.wav"), -1, "speech"), ("foo://x/a.wav", -1, "speech")]
    res = probe_files(files, "lst", CFG, LOCAL)
    assert [q["error_type"] for q in res.quarantine] == ["io", "io"]
    assert not res.rows


def test_segments_tile_the_file_exactly_when_decoded(tmp_path: Path) -> None:
    """Adjacent segments decode to disjoint sample ranges that add up to the whole file."""
    import numpy as np
    import soundfile as sf

    from spear.stages.decode import DecodeConfig, decode_segment

    n = 16000 * 75 + 7  # an awkward length: three equal speech segments of 25.0000x s
    x = (np.random.default_rng(0).standard_normal(n) * 3000).astype(np.int16)
    path = tmp_path / "odd.wav"
    sf.write(path, x, 16000, subtype="PCM_16")
    info = probe_file(str(path), -1, LOCAL)
    pieces = [
        decode_segment(str(path), s, d, DecodeConfig(), LOCAL)
        for s, d in segments(info.duration, "speech", CFG)
    ]
    assert len(pieces) == 3
    np.testing.assert_array_equal(np.concatenate(pieces), x)


def test_same_file_spelled_differently_gets_one_id(tmp_path: Path, monkeypatch) -> None:
    import shutil

    from spear.synth import encode, sine

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.wav").write_bytes(encode(sine(1.0, 16000, 440), 16000, "WAV", "PCM_16"))
    monkeypatch.chdir(tmp_path)
    spellings = ["d/a.wav", str(tmp_path / "d" / "a.wav"), f"file://{tmp_path}/d/a.wav"]
    urls = {list_source(SourceConfig(url=u), CFG, LOCAL)[0][0] for u in spellings}
    urls.add(list_source(SourceConfig(url=str(tmp_path / "d")), CFG, LOCAL)[0][0])
    assert urls == {str(tmp_path / "d" / "a.wav")}
    shutil.rmtree(tmp_path / "d")
