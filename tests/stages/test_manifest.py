"""Pure manifest functions: segmentation, ids, source parsing, header probes, listing."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from spear.errors import ConfigError, SpearError, StorageError
from spear.stages.decode import ERROR_TYPES, DecodeConfig, decode_batch, decode_segment
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
from spear.storage import StorageConfig, write_atomic
from spear.synth import HostileFile, hostile_files, sine, write_corpus

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
    # Another content version of the same file: other ids; "" keeps version 1's ids.
    v = item_id("s3://b/x.flac", 0, "size=5,etag=a")
    assert v == item_id("s3://b/x.flac", 0, "size=5,etag=a") != a
    assert v != item_id("s3://b/x.flac", 0, "size=5,etag=b")
    assert a == item_id("s3://b/x.flac", 0, "")
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
        info = probe_file(f"{bucket}/c/{name}", -1, s3_server.storage, CFG)
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


# ---------------------------------------------------------------- headers that lie

HOSTILE = hostile_files()


def decoded_frames(path: str) -> int:
    """Frames decoding the whole file yields, at its own rate (no resampling)."""
    rate = sf.info(path).samplerate
    return len(decode_segment(path, 0.0, None, DecodeConfig(sample_rate=rate), LOCAL))


def decode_rows(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    return decode_batch(batch, DecodeConfig(io_threads=1), LOCAL)


@pytest.mark.parametrize("case", HOSTILE, ids=[h.name for h in HOSTILE])
def test_lying_headers_probe_to_their_reason_or_true_length(
    case: HostileFile, tmp_path: Path
) -> None:
    path = tmp_path / case.name
    path.write_bytes(case.data)
    t0 = time.monotonic()
    res = probe_files([(str(path), -1, "audio")], "hostile", CFG, LOCAL)
    assert time.monotonic() - t0 < 5, "a lying header must not cost time"
    if case.probe is not None:
        assert not res.rows
        [q] = res.quarantine
        assert q["error_type"] == case.probe, q["message"]
        assert q["error_type"] in ERROR_TYPES and str(path) in q["message"]
        return
    assert not res.quarantine, res.quarantine
    seconds = case.seconds
    if seconds is None:  # an approximate header length: what decoding yields, to the frame
        rate = res.rows[0]["sample_rate"]
        seconds = decoded_frames(str(path)) / rate
    assert res.rows[0]["file_duration"] == pytest.approx(seconds, abs=1e-9)
    # Every window decodes to its promised length: none is quarantined as truncated.
    out = decode_rows(res.rows)
    assert list(out["error_type"]) == [""] * len(res.rows), list(out["error"])
    for row, n in zip(res.rows, out["num_samples"], strict=True):
        assert abs(int(n) - round(row["duration"] * 16000)) <= 1, row


def test_untagged_mp3_length_is_what_decoding_yields(tmp_path: Path) -> None:
    """The issue's case: libsndfile lists a 22.05 s CBR MP3 without an Info tag at 22.118 s
    (encoder delay and padding); the probe reports the 22.099 s decoding yields, so the last
    window no longer promises more than there is."""
    case = next(h for h in HOSTILE if h.name == "mp3_cbr_untagged.mp3")
    path = tmp_path / case.name
    path.write_bytes(case.data)
    header = sf.info(str(path)).frames
    info = probe_file(str(path), -1, LOCAL)
    assert info.frames == decoded_frames(str(path)) < header - 441  # 10 ms less than claimed


def test_segments_refuse_lengths_no_probe_passes() -> None:
    """What an unknown FLAC length once became: 2e14 s, ~2e13 windows built in memory."""
    t0 = time.monotonic()
    for duration in (9223372036854775807 / 44100, float("inf"), float("nan"), -1.0):
        with pytest.raises(SpearError, match="max_file_seconds"):
            segments(duration, "audio", CFG)
    assert time.monotonic() - t0 < 0.1
    assert len(segments(CFG.max_file_seconds, "audio", CFG)) == 8640


def _wav(tmp_path: Path, name: str, seconds: float, rate: int = 16000, channels: int = 1) -> str:
    path = tmp_path / name
    sf.write(path, sine(seconds, rate, 440.0, channels), rate, subtype="PCM_16")
    return str(path)


def test_limits_are_configurable(tmp_path: Path) -> None:
    mono = _wav(tmp_path, "mono.wav", 3.0)
    stereo = _wav(tmp_path, "stereo.wav", 1.0, 8000, 2)
    cases = [
        (mono, ManifestConfig(max_file_seconds=2.0), "too_long", "max_file_seconds 2"),
        (stereo, ManifestConfig(max_channels=1), "bad_header", "2 channels"),
        (stereo, ManifestConfig(min_sample_rate=16000), "bad_header", "8000 Hz is outside"),
        (mono, ManifestConfig(max_sample_rate=8000), "bad_header", "16000 Hz is outside"),
    ]
    for url, cfg, reason, text in cases:
        with pytest.raises(ProbeError) as err:
            probe_file(url, -1, LOCAL, cfg)
        assert err.value.error_type == reason and text in str(err.value) and url in str(err.value)
    with pytest.raises(ConfigError):
        ManifestConfig(probe_timeout_seconds=0)
    with pytest.raises(ConfigError):
        ManifestConfig(min_sample_rate=48000, max_sample_rate=16000)


def test_probe_time_limit_holds_inside_libsndfile(tmp_path: Path, slow_store: Any) -> None:
    """A slow store: every read libsndfile makes sleeps. Counting an MP3's length needs many
    reads; the budget ends them, and the file is quarantined as ``timeout`` on time."""
    slow_store("slowfs", 0.02)
    path = tmp_path / "long.mp3"
    sf.write(path, sine(60.0, 22050, 440.0), 22050, format="MP3")
    cfg = ManifestConfig(probe_timeout_seconds=0.5, count_block_size=512)
    t0 = time.monotonic()
    res = probe_files([(f"slowfs://{path}", -1, "audio")], "slow", cfg, LOCAL)
    took = time.monotonic() - t0
    assert [q["error_type"] for q in res.quarantine] == ["timeout"], res.quarantine
    assert "0.5 s limit" in res.quarantine[0]["message"]
    assert took < 0.5 + 1.0, took  # the budget, plus the one read under way and closing


# ---------------------------------------------------------------- files from real encoders

TOOLS_REQUIRED = os.environ.get("SPEAR_REQUIRE_SYSTEM_TOOLS") == "1"


def require_tool(name: str) -> None:
    """Skip, loudly, when an encoder binary is missing; fail instead where CI sets
    SPEAR_REQUIRE_SYSTEM_TOOLS=1 (it installs them)."""
    why = ""
    if shutil.which(name) is None:
        why = f"{name} is not installed"
    elif name == "sox":
        formats = subprocess.run(["sox", "-h"], capture_output=True, text=True).stdout
        if " mp3" not in formats:
            why = "sox cannot write MP3 (libsox-fmt-mp3 is missing)"
    if not why:
        return
    why += ": apt-get install sox libsox-fmt-mp3 ffmpeg lame to run this encoder test"
    if TOOLS_REQUIRED:
        pytest.fail(f"SPEAR_REQUIRE_SYSTEM_TOOLS=1 and {why}")
    pytest.skip(f"ENCODER TEST SKIPPED: {why}")


# (id, tool, command with {src} and {out}, output name, probe reason or None)
ENCODERS = [
    ("sox-cbr", "sox", "sox {src} {out}", "a.mp3", None),
    ("sox-vbr", "sox", "sox {src} -C -4.2 {out}", "a.mp3", None),
    ("lame-cbr", "lame", "lame --quiet -b 64 {src} {out}", "a.mp3", None),
    ("lame-vbr", "lame", "lame --quiet -V 2 {src} {out}", "a.mp3", None),
    ("lame-cbr-untagged", "lame", "lame --quiet -t -b 64 {src} {out}", "a.mp3", None),
    ("lame-vbr-untagged", "lame", "lame --quiet -t -V 2 {src} {out}", "a.mp3", "bad_header"),
    ("ffmpeg-mp3", "ffmpeg", "ffmpeg -loglevel error -i {src} -b:a 64k {out}", "a.mp3", None),
    (
        "ffmpeg-mp3-cbr-pipe",
        "ffmpeg",
        "ffmpeg -loglevel error -i {src} -b:a 64k -f mp3 - | cat > {out}",
        "a.mp3",
        None,
    ),
    (
        "ffmpeg-mp3-vbr-pipe",
        "ffmpeg",
        "ffmpeg -loglevel error -i {src} -q:a 2 -f mp3 - | cat > {out}",
        "a.mp3",
        "bad_header",
    ),
    (
        "ffmpeg-flac-pipe",
        "ffmpeg",
        "ffmpeg -loglevel error -i {src} -f flac - | cat > {out}",
        "a.flac",
        None,
    ),
    (
        "ffmpeg-wav-pipe",
        "ffmpeg",
        "ffmpeg -loglevel error -i {src} -f wav - | cat > {out}",
        "a.wav",
        None,
    ),
    (
        "ffmpeg-vorbis",
        "ffmpeg",
        "ffmpeg -loglevel error -i {src} -c:a libvorbis {out}",
        "a.ogg",
        None,
    ),
    ("ffmpeg-opus", "ffmpeg", "ffmpeg -loglevel error -i {src} -c:a libopus {out}", "a.opus", None),
    ("sox-vorbis", "sox", "sox {src} {out}", "a.ogg", None),
    ("sox-trim-past-end", "sox", "sox {src} {out} trim 30", "a.flac", "empty"),
]


@pytest.fixture(scope="module")
def source_wav(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The issue's file: 22.05 s at 44.1 kHz."""
    return _wav(tmp_path_factory.mktemp("enc"), "src.wav", 22.05, 44100)


@pytest.mark.parametrize(
    ("tool", "command", "name", "reason"), [e[1:] for e in ENCODERS], ids=[e[0] for e in ENCODERS]
)
def test_files_from_real_encoders(
    source_wav: str, tmp_path: Path, tool: str, command: str, name: str, reason: str | None
) -> None:
    """Lengths are what decoding yields (to the frame) and every window decodes in full; what
    libsndfile cannot decode whole is quarantined with the reason."""
    require_tool(tool)
    out = tmp_path / name
    subprocess.run(
        command.format(src=source_wav, out=out), shell=True, check=True, stderr=subprocess.DEVNULL
    )
    res = probe_files([(str(out), -1, "audio")], "enc", CFG, LOCAL)
    if reason is not None:
        assert [q["error_type"] for q in res.quarantine] == [reason], res.quarantine
        return
    assert not res.quarantine, res.quarantine
    rate = res.rows[0]["sample_rate"]
    frames = round(res.rows[0]["file_duration"] * rate)
    assert frames == decoded_frames(str(out))  # to the sample, MP3 included
    assert res.rows[0]["file_duration"] == pytest.approx(22.05, abs=0.1)  # + encoder delay
    decoded = decode_rows(res.rows)
    assert list(decoded["error_type"]) == [""] * len(res.rows), list(decoded["error"])


# ---------------------------------------------------------------- nothing skipped silently


def test_listing_follows_folder_links_and_names_every_skip(tmp_path: Path) -> None:
    """Every path under a source becomes a listed file or a skipped row with its reason:
    spear's temporaries, other extensions, links back up (loops); folders reached through a
    link are listed; dangling links and pipes are listed (the probe names them)."""
    from spear.stages.manifest import walk_local

    root = tmp_path / "src"
    (root / "a").mkdir(parents=True)
    other = tmp_path / "elsewhere"
    other.mkdir()
    (root / "a" / "x.wav").write_bytes(b"RIFF")
    (other / "y.flac").write_bytes(b"fLaC")
    (root / "a" / ".tmp-1234-x.wav").write_bytes(b"RIFF")
    (root / "notes.txt").write_text("not audio")
    os.symlink(other, root / "linked")  # a folder through a link: followed
    os.symlink(root, root / "a" / "up")  # a loop
    os.symlink(tmp_path / "nowhere.wav", root / "dangling.wav")
    os.mkfifo(root / "pipe.wav")
    skipped: list[dict[str, str]] = []
    listed = list_source(SourceConfig(url=str(root)), CFG, LOCAL, skipped=skipped)
    names = {u.removeprefix(str(root) + "/"): size for u, size, _ in listed}
    assert names == {"a/x.wav": 4, "linked/y.flac": 4, "dangling.wav": -1, "pipe.wav": 0}
    reasons = {r["url"].removeprefix(str(root) + "/"): r["reason"] for r in skipped}
    assert reasons == {
        "a/.tmp-1234-x.wav": "spear_temporary",
        "notes.txt": "not_audio",
        "a/up": "symlink_loop",
    }
    # A listing task of one folder (the job splits a source so) finds the loop too: the
    # source's folders are above it.
    skipped = []
    files = list(walk_local(str(root / "a"), True, (".wav",), skipped, above=str(root)))
    assert [p for p, _ in files] == [str(root / "a" / "x.wav")]
    assert {r["reason"] for r in skipped} == {"spear_temporary", "symlink_loop"}
    # The probe gives the special paths their reasons, and an item to the rest.
    res = probe_files(listed, "t", CFG, LOCAL)
    got = {q["source"].rsplit("/", 1)[1]: q["error_type"] for q in res.quarantine}
    assert got == {
        "x.wav": "unreadable",
        "y.flac": "unreadable",
        "dangling.wav": "dangling_link",
        "pipe.wav": "special_file",
    }


@pytest.mark.integration
def test_listing_of_s3_names_skips(s3_server: Any) -> None:
    storage = s3_server.storage
    root = s3_server.bucket("skips") + "/src"
    for name in ("a.wav", "sub/b.flac", "sub/.tmp-9-b.flac", "readme.md"):
        write_atomic(f"{root}/{name}", b"x", storage)
    skipped: list[dict[str, str]] = []
    listed = list_source(SourceConfig(url=root), CFG, storage, skipped=skipped)
    assert [u.rsplit("/", 1)[1] for u, _, _ in listed] == ["a.wav", "b.flac"]
    assert sorted((r["url"].rsplit("/", 1)[1], r["reason"]) for r in skipped) == [
        (".tmp-9-b.flac", "spear_temporary"),
        ("readme.md", "not_audio"),
    ]
