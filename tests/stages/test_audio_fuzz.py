"""Fuzzing probe + decode with mutated WAV, FLAC, Ogg (Vorbis, Opus), MP3, AIFF and AU files.

Each case takes a small valid file (written by soundfile, so no encoder binary is needed) and
applies one to three mutations: random bytes, a truncation, a header field set to 0, 1, a
huge, negative (two's complement) or past-the-end value, bytes inserted or cut out. It then
runs the manifest probe and decodes every item it yields plus the whole file. Every case must
end in manifest rows or one quarantine row, and every decode in samples or a quarantine reason
from ERROR_TYPES other than ``internal`` (a bug) and ``io`` (the files are intact on local disk),
within bounds per case: 10 s, 64 MiB of traced Python/numpy allocation, and 256 MiB of peak
resident memory over the process's before it (Linux: VmHWM, reset per case, so libsndfile's own
allocations count too).

Hypothesis (the property-based testing library) draws the cases; the default run is
derandomised (the same cases on every machine, so CI is reproducible) and sized to ~30 s on
two cores (1,500 cases; ``SPEAR_FUZZ_EXAMPLES`` changes it). ``-m slow`` runs a 20x larger
random search. A failure prints the smallest mutation Hypothesis could shrink it to.
"""

from __future__ import annotations

import io
import os
import struct
import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spear.stages.decode import ERROR_TYPES, DecodeConfig, DecodeError, decode_batch, decode_segment
from spear.stages.manifest import ManifestConfig, probe_files
from spear.storage import StorageConfig
from spear.synth import sine

LOCAL = StorageConfig()
# Tight limits, so a case that ignores them shows as slow, not as a stalled job.
PROBE = ManifestConfig(probe_timeout_seconds=5.0, audio_window_seconds=0.2)
DECODE = DecodeConfig(timeout_seconds=5.0, io_threads=1, io_retries=0, min_seconds=0.0)
# Files on local disk: ``io`` would be a misread header taken for a storage failure (and retried
# in a job), ``internal`` a bug.
# ``changed``, ``dangling_link`` and ``special_file`` would be the harness's own doing.
REASONS = tuple(
    r
    for r in ERROR_TYPES
    if r not in ("io", "internal", "changed", "dangling_link", "special_file")
)
CASE_SECONDS = 10.0  # per case, probe and every decode together
CASE_BYTES = 64 << 20  # peak traced Python allocation per case (numpy buffers included)
CASE_RSS = 256 << 20  # peak resident memory per case over the one before it (C libraries too)
EXAMPLES = int(os.environ.get("SPEAR_FUZZ_EXAMPLES", "1500"))


@dataclass(frozen=True)
class Seed:
    name: str
    data: bytes
    fields: tuple[tuple[int, int, str], ...]
    """(offset, size, byte order) of the header's length, rate and count fields."""


def _encode(fmt: str, subtype: str | None, sr: int, channels: int, seconds: float) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, sine(seconds, sr, 440.0, channels), sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def _ogg_fields(data: bytes) -> list[tuple[int, int, str]]:
    """Granule position and segment count of every Ogg page."""
    out, pos = [], data.find(b"OggS")
    while pos >= 0:
        out += [(pos + 6, 8, "little"), (pos + 26, 1, "little")]
        pos = data.find(b"OggS", pos + 4)
    return out


def _mp3_fields(data: bytes) -> list[tuple[int, int, str]]:
    """The first frame headers' bitrate/rate bytes and a Xing tag's frame count."""
    out = [(p, 3, "big") for p in range(0, min(len(data), 4000)) if data[p] == 0xFF][:6]
    xing = data.find(b"Xing")
    if xing >= 0:
        out.append((xing + 8, 4, "big"))
    return out


def _seeds() -> list[Seed]:
    wav = _encode("WAV", "PCM_16", 16000, 1, 0.5)
    wav24 = _encode("WAV", "PCM_24", 8000, 2, 0.5)
    flac = _encode("FLAC", "PCM_16", 16000, 1, 0.5)
    flac2 = _encode("FLAC", "PCM_24", 44100, 2, 0.3)
    vorbis = _encode("OGG", "VORBIS", 16000, 1, 0.5)
    opus = _encode("OGG", "OPUS", 48000, 1, 0.5)
    mp3 = _encode("MP3", None, 22050, 1, 0.5)
    aiff = _encode("AIFF", "PCM_16", 16000, 1, 0.5)
    au = _encode("AU", "PCM_16", 16000, 1, 0.5)
    wav_fields = (
        (4, 4, "little"),
        (16, 4, "little"),
        (20, 2, "little"),
        (22, 2, "little"),
        (24, 4, "little"),
        (28, 4, "little"),
        (32, 2, "little"),
        (34, 2, "little"),
        (40, 4, "little"),
    )
    flac_fields = (*((o, 1, "big") for o in range(5, 26)), (5, 3, "big"), (22, 4, "big"))
    ssnd = aiff.find(b"SSND")
    aiff_fields = (
        (4, 4, "big"),
        (20, 2, "big"),
        (22, 4, "big"),
        (26, 2, "big"),
        (28, 10, "big"),
        (ssnd + 4, 4, "big"),
        (ssnd + 8, 4, "big"),
    )
    au_fields = tuple((o, 4, "big") for o in (4, 8, 12, 16, 20))
    return [
        Seed("pcm16.wav", wav, wav_fields),
        Seed("pcm24_stereo.wav", wav24, wav_fields),
        Seed("mono.flac", flac, flac_fields),
        Seed("stereo.flac", flac2, flac_fields),
        Seed("vorbis.ogg", vorbis, tuple(_ogg_fields(vorbis))),
        Seed("opus.ogg", opus, tuple(_ogg_fields(opus))),
        Seed("vbr.mp3", mp3, tuple(_mp3_fields(mp3))),
        Seed("pcm16.aiff", aiff, aiff_fields),
        Seed("pcm16.au", au, au_fields),
    ]


SEEDS = _seeds()


def _value(kind: str, size: int, n: int, rnd: int) -> int:
    """A field value: what broken and lying writers put there."""
    top = 256**size
    return {
        "zero": 0,
        "one": 1,
        "max": top - 1,
        "half": top // 2,  # the sign bit: negative when read signed
        "minus_one": top - 1,
        "past_end": min(top - 1, n + 1 + rnd % 4096),
        "random": rnd % top,
    }[kind]


@st.composite
def mutation(draw: st.DrawFn, seed: Seed) -> tuple[str, bytes]:
    data = bytearray(seed.data)
    steps = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["field", "field", "bytes", "truncate", "insert", "cut"]))
        n = len(data)
        if kind == "field" and seed.fields:
            off, size, order = draw(st.sampled_from(seed.fields))
            what = draw(
                st.sampled_from(["zero", "one", "max", "half", "minus_one", "past_end", "random"])
            )
            value = _value(what, size, n, draw(st.integers(0, 2**64)))
            if off + size <= n:
                data[off : off + size] = value.to_bytes(size, order)  # type: ignore[arg-type]
            steps.append(f"field@{off}/{size}={what}")
        elif kind == "bytes" and n:
            for _ in range(draw(st.integers(1, 16))):
                data[draw(st.integers(0, n - 1))] = draw(st.integers(0, 255))
            steps.append("bytes")
        elif kind == "truncate":
            cut = draw(st.integers(0, n))
            del data[cut:]
            steps.append(f"truncate@{cut}")
        elif kind == "insert":
            at = draw(st.integers(0, n))
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
            steps.append(f"insert@{at}")
        elif kind == "cut" and n:
            at = draw(st.integers(0, n - 1))
            del data[at : at + draw(st.integers(1, 4096))]
            steps.append(f"cut@{at}")
    return "+".join(steps), bytes(data)


CASES = st.sampled_from(SEEDS).flatmap(lambda s: st.tuples(st.just(s.name), mutation(s)))


@dataclass
class Tally:
    """What the cases came to, for the summary line (``-s`` shows it)."""

    cases: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)
    items: int = 0
    seconds: float = 0.0
    slowest: float = 0.0
    peak: int = 0
    peak_rss: int = 0


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


def _reset_peak_rss() -> bool:
    """Reset the process's peak resident memory (Linux: VmHWM); False where not supported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _check_case(path: Path, tally: Tally) -> None:
    url = str(path)
    rss_known = _reset_peak_rss()
    rss0 = _status_kib("VmRSS:") * 1024 if rss_known else 0
    tracemalloc.start()  # only around spear's code: tracing Hypothesis would triple the time
    t0 = time.monotonic()
    try:
        _probe_and_decode(url, tally)
        took = time.monotonic() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    rss = _status_kib("VmHWM:") * 1024 - rss0 if rss_known else 0
    assert took < CASE_SECONDS, f"{took:.1f} s"
    assert peak < CASE_BYTES, f"{peak / 2**20:.0f} MiB traced"
    assert rss < CASE_RSS, f"{rss / 2**20:.0f} MiB resident"
    tally.cases += 1
    tally.seconds += took
    tally.slowest = max(tally.slowest, took)
    tally.peak = max(tally.peak, peak)
    tally.peak_rss = max(tally.peak_rss, rss)


def _probe_and_decode(url: str, tally: Tally) -> None:
    res = probe_files([(url, -1, "audio")], "fuzz", PROBE, LOCAL)
    assert (len(res.quarantine), bool(res.rows)) in ((1, False), (0, True)), res.quarantine
    for q in res.quarantine:
        assert q["error_type"] in REASONS, q
        assert url in q["message"], q
    tally.quarantined.update(q["error_type"] for q in res.quarantine)
    if res.rows:
        tally.items += len(res.rows)
        rows = res.rows[:3] + res.rows[3:][-1:]  # the first items and the last
        batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
        out = decode_batch(batch, DECODE, LOCAL)
        for err, msg in zip(out["error_type"], out["error"], strict=True):
            assert err in ("", *REASONS), msg
    try:
        decode_segment(url, 0.0, None, DECODE, LOCAL)
    except DecodeError as err:
        assert err.error_type in REASONS, err
        assert url in err.message


def _run(tmp_path: Path, examples: int, derandomize: bool) -> Tally:
    tally = Tally()

    @settings(
        max_examples=examples,
        derandomize=derandomize,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(CASES)
    def case(c: tuple[str, tuple[str, bytes]]) -> None:
        name, (_, data) = c
        path = tmp_path / f"case{tally.cases}-{name}"
        path.write_bytes(data)
        try:
            _check_case(path, tally)
        finally:
            path.unlink()

    t0 = time.monotonic()
    case()
    rss = f"{tally.peak_rss / 2**20:.1f} MiB" if _reset_peak_rss() else "not measurable here"
    print(
        f"fuzz: {tally.cases} cases in {time.monotonic() - t0:.1f} s (probe+decode "
        f"{tally.seconds:.1f} s, slowest {tally.slowest:.2f} s; per case at most "
        f"{tally.peak / 2**20:.1f} MiB traced, resident +{rss}); {tally.items} items from "
        f"{tally.cases - tally.quarantined.total()} files; quarantined {dict(tally.quarantined)}"
    )
    return tally


def test_seeds_are_valid_files(tmp_path: Path) -> None:
    """Unmutated, every seed probes to items that decode (so mutations start from good files)."""
    for seed in SEEDS:
        path = tmp_path / seed.name
        path.write_bytes(seed.data)
        res = probe_files([(str(path), -1, "audio")], "fuzz", PROBE, LOCAL)
        assert res.rows and not res.quarantine, (seed.name, res.quarantine)
        y = decode_segment(str(path), 0.0, None, DECODE, LOCAL)
        assert abs(len(y) - 16000 * res.rows[0]["file_duration"]) <= 1, seed.name
        assert all(off + size <= len(seed.data) for off, size, _ in seed.fields), seed.name


@pytest.mark.timeout(300)
def test_mutated_files_end_in_a_result_or_a_quarantine_row(tmp_path: Path) -> None:
    tally = _run(tmp_path, EXAMPLES, derandomize=True)
    assert tally.cases == EXAMPLES
    # The mutations reach both outcomes, and more than one way of failing.
    assert tally.cases - tally.quarantined.total() > EXAMPLES // 10
    assert len(tally.quarantined) >= 3, tally.quarantined


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_mutated_files_random_search(tmp_path: Path) -> None:
    _run(tmp_path, 20 * EXAMPLES, derandomize=False)


def test_values_cover_signed_and_past_end() -> None:
    assert _value("half", 4, 100, 0) == 2**31
    assert struct.unpack("<i", _value("minus_one", 4, 100, 0).to_bytes(4, "little"))[0] == -1
    assert _value("past_end", 4, 100, 7) == 108


# ---------------------------------------------------------------- the input checks, fuzzed
#
# Derandomised like the mutation search; ``-m slow`` runs each 10x larger with random draws.

FLOAT_FILES = [("WAV", "FLOAT"), ("WAV", "DOUBLE"), ("AIFF", "FLOAT"), ("CAF", "FLOAT")]
FLOAT_FILES += [("AU", "DOUBLE"), ("W64", "FLOAT"), ("FLAC", "PCM_16")]
NON_FINITE = st.sampled_from([float("nan"), float("inf"), float("-inf")])


@st.composite
def float_file(draw: st.DrawFn) -> tuple[bytes, int, list[int]]:
    """A float file with NaN/Inf at drawn frames; returns (bytes, rate, bad frames)."""
    fmt, subtype = draw(st.sampled_from(FLOAT_FILES))
    sr = draw(st.sampled_from([8000, 16000, 22050, 44100]))
    channels = draw(st.integers(1, 4))
    n = round(draw(st.floats(0.3, 1.5)) * sr)
    x = sine(n / sr, sr, 440.0, channels).astype(np.float64).reshape(n, channels)
    bad = (
        []
        if subtype.startswith("PCM")  # integer formats cannot hold them: decode must pass
        else draw(st.lists(st.integers(0, n - 1), max_size=3, unique=True))
    )
    for frame in bad:
        x[frame, draw(st.integers(0, channels - 1))] = draw(NON_FINITE)
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype=subtype)
    return buf.getvalue(), sr, sorted(bad)


def _fuzz_settings(examples: int, derandomize: bool) -> Any:
    return settings(
        max_examples=examples,
        derandomize=derandomize,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def _non_finite_search(tmp_path: Path, examples: int, derandomize: bool) -> Counter[str]:
    seen: Counter[str] = Counter()

    @_fuzz_settings(examples, derandomize)
    @given(float_file())
    def case(c: tuple[bytes, int, list[int]]) -> None:
        data, sr, bad = c
        path = tmp_path / "f.bin"
        path.write_bytes(data)
        res = probe_files([(str(path), -1, "audio")], "fuzz", PROBE, LOCAL)
        assert res.rows and not res.quarantine, res.quarantine  # headers are fine
        batch = {k: np.array([r[k] for r in res.rows], dtype=object) for k in res.rows[0]}
        out = decode_batch(batch, DECODE, LOCAL)
        for row, err in zip(res.rows, out["error_type"], strict=True):
            lo = round(row["start"] * sr)
            hi = round((row["start"] + row["duration"]) * sr)
            want = "non_finite" if any(lo <= b < hi for b in bad) else ""
            assert err == want, (row["start"], bad, err)
            seen[err or "ok"] += 1
        try:
            decode_segment(str(path), 0.0, None, DECODE, LOCAL)
            assert not bad
        except DecodeError as err:
            assert bad and err.error_type == "non_finite", err

    case()
    return seen


def test_non_finite_samples_fuzzed(tmp_path: Path) -> None:
    """Any NaN/Inf, anywhere, in any channel of any float format: exactly the windows holding
    one are ``non_finite``; all others decode."""
    seen = _non_finite_search(tmp_path, 300, derandomize=True)
    assert seen["non_finite"] and seen["ok"], seen


CHANGES = st.sampled_from(["append", "truncate", "same_bytes", "other_file", "flip_and_touch"])


def _changed_search(tmp_path: Path, examples: int, derandomize: bool) -> None:
    @_fuzz_settings(examples, derandomize)
    @given(st.sampled_from(SEEDS), CHANGES, st.integers(1, 4096), st.sampled_from(SEEDS))
    def case(seed: Seed, change: str, k: int, other: Seed) -> None:
        path = tmp_path / seed.name
        path.write_bytes(seed.data)
        res = probe_files([(str(path), -1, "audio")], "fuzz", PROBE, LOCAL)
        assert res.rows
        st0 = path.stat()
        data = seed.data
        if change == "append":
            data = data + bytes(k)
        elif change == "truncate":
            data = data[: max(1, len(data) - k)]
        elif change == "other_file":
            data = other.data if other.data != seed.data else seed.data + b"\0"
        elif change == "flip_and_touch":
            flipped = bytearray(data)
            flipped[k % len(flipped)] ^= 0xFF
            data = bytes(flipped)
        path.write_bytes(data)
        # Whatever the clock's resolution: the rewrite is later than the probe.
        os.utime(path, ns=(st0.st_atime_ns, st0.st_mtime_ns + k))
        batch = {k: np.array([r[k] for r in res.rows], dtype=object) for k in res.rows[0]}
        out = decode_batch(batch, DECODE, LOCAL)
        assert set(out["error_type"]) == {"changed"}, (change, list(out["error"]))
        assert not any(out["audio"])

    case()


def test_changed_files_fuzzed(tmp_path: Path) -> None:
    """A file rewritten after the probe in any way (longer, shorter, same bytes, another file,
    one byte) decodes to no audio: every row of it is ``changed``."""
    _changed_search(tmp_path, 300, derandomize=True)


# Half the characters are ones fsspec, URLs or shells read as syntax ("::" chains URLs).
SYNTAX = [*":#?%[]{}*-!~ &=+;,@$'\"\\.^`|<>", "::", "%2F", "%20", "?versionId"]
NAME = (
    st.lists(
        st.one_of(
            st.sampled_from(SYNTAX),
            st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/"),
        ),
        min_size=1,
        max_size=12,
    )
    .map("".join)
    .filter(lambda s: not s.startswith(".tmp-") and "?versionId=" not in s)
)
"""A file name: any character but ``/`` (NUL and controls left out: S3 APIs refuse them in
XML listings). ``?versionId=`` is s3fs's own syntax, which it strips from any key."""


def _names_search(root: str, storage: StorageConfig, examples: int, derandomize: bool) -> None:
    from spear.stages.manifest import SourceConfig, list_source
    from spear.storage import remove_tree, write_atomic

    wav = _encode("WAV", "PCM_16", 16000, 1, 0.2)
    counter = [0]

    @_fuzz_settings(examples, derandomize)
    @given(st.lists(NAME, min_size=1, max_size=3, unique=True))
    def case(names: list[str]) -> None:
        counter[0] += 1
        folder = f"{root}/case{counter[0]}"
        for name in names:
            write_atomic(f"{folder}/{name}.wav", wav, storage)
        listed = list_source(SourceConfig(url=folder), ManifestConfig(), storage)
        found = sorted(u.rsplit("/", 1)[1] for u, _, _ in listed)
        assert found == sorted(n + ".wav" for n in names)
        res = probe_files(listed, "fuzz", PROBE, storage)
        assert len(res.rows) == len(names) and not res.quarantine, res.quarantine
        batch = {k: np.array([r[k] for r in res.rows], dtype=object) for k in res.rows[0]}
        out = decode_batch(batch, DECODE, storage)
        assert list(out["num_samples"]) == [3200] * len(names), list(out["error"])
        remove_tree(folder, storage)

    case()


def test_odd_names_fuzzed_local(tmp_path: Path) -> None:
    """Any name a filesystem allows (fsspec's syntax characters included) lists, probes and
    decodes."""
    _names_search(str(tmp_path), LOCAL, 200, derandomize=True)


@pytest.mark.integration
def test_odd_names_fuzzed_s3(s3_server: Any) -> None:
    _names_search(s3_server.bucket("fuzznames"), s3_server.storage, 25, derandomize=True)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_input_checks_random_search(tmp_path: Path) -> None:
    _non_finite_search(tmp_path, 800, derandomize=False)
    _changed_search(tmp_path, 600, derandomize=False)
    _names_search(str(tmp_path / "names"), LOCAL, 600, derandomize=False)
