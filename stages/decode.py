"""Decode stage: one manifest segment -> 16 kHz mono int16 samples.

* :func:`decode_segment` - pure: one ``(url, start, duration)`` -> int16 samples, or a
  :class:`DecodeError` whose ``error_type`` is one of :data:`ERROR_TYPES`.
* :func:`decode_batch` - pure: a batch of manifest rows -> the audio batch contract
  (:data:`spear.formats.AUDIO_BATCH_COLUMNS` + the manifest columns + ``error_type``/``error``).
  Failed rows stay in the batch with empty audio, so one pass decodes everything and a writer
  splits them with :func:`split_decoded`.
* :func:`decode_dataset` - the Ray Data wrapper (CPU tasks).

Reads are range reads: the file is opened through fsspec with the storage's block size and
libsndfile seeks to the segment, so a 5 s segment of a 10-minute file on S3 fetches a few
blocks, not the file. That holds for PCM, FLAC and Ogg by themselves; an MP3 (whose seek reads
every frame before the position) needs the manifest row's seek point (:class:`SeekPoint`, from
the probe's frame index), which :func:`decode_batch` takes from the row.

The file is opened by :func:`spear.stages.audio_io.open_source`, which refuses special files
and, given the row's ``file_version``, a file changed since the manifest (``changed``); every
decoded chunk is checked for NaN/Inf (``non_finite``) before downmix and resampling.

Bounds (:mod:`spear.stages.audio_io`): the header is checked before anything is read (sample
rate, channels, a length its bytes can hold); the memory a segment needs is computed and
refused over ``max_memory_bytes`` before it is allocated; samples are read in chunks of a few
MiB, and every read libsndfile makes checks the segment's ``timeout_seconds``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import soundfile as sf

from spear.errors import ConfigError, SpearError
from spear.formats import AUDIO_DTYPE, audio_to_bytes, quarantine_row
from spear.stages.audio_io import ERROR_TYPES as ERROR_TYPES  # the reasons, re-exported
from spear.stages.audio_io import (
    BadAudio,
    Budget,
    GuardedFile,
    Reopen,
    SpliceFile,
    StorageFailed,
    check_finite,
    check_format,
    check_single_ogg_stream,
    chunk_frames,
    header_frames,
    open_guarded,
    open_source,
    raise_guard_error,
    read_into,
    seek_or_skip,
)
from spear.storage import StorageConfig, filesystem

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

STAGE = "decode"

# fsspec cache for remote reads: libsndfile seeks back and forth (headers, FLAC's seek search);
# an LRU of aligned blocks serves them without re-fetching, where s3fs's default "readahead"
# re-fetched a whole block after a 1 KB backward seek (measured on a 10-minute FLAC).
_CACHE_TYPE = "blockcache"


Resampler = Literal["soxr", "torchaudio"]
RESAMPLERS: tuple[Resampler, ...] = ("soxr", "torchaudio")

# Columns decode_batch adds to the manifest columns it carries.
ERROR_COLUMNS = ("error_type", "error")


@dataclass(kw_only=True, frozen=True)
class DecodeConfig:
    """How audio is decoded and resampled."""

    sample_rate: int = 16_000
    """Output sample rate (the teachers and the student expect 16 kHz)."""
    resampler: Resampler = "soxr"
    """Resampling library. soxr (HQ) is the default: on one core it is as fast or faster than
    torchaudio's cached sinc kernel (1.0-2.2x) and far cleaner: flat to 7 kHz with aliases below
    -130 dB, where torchaudio's default droops 1.8 dB at 7 kHz and lets 8.5 kHz alias back at
    -11 dB. Measured by benchmarks/decode.py."""
    min_seconds: float = 0.1
    """Segments shorter than this after decoding are quarantined as too short."""
    truncation_tolerance: float = 0.1
    """Seconds a segment may fall short of what the manifest promised before it counts as
    truncated: a few codec frames (an MP3 frame is 26-72 ms) and header-estimate slack."""
    io_threads: int = 4
    """Threads per batch reading segments concurrently (remote reads wait on the network)."""
    io_retries: int = 3
    """Retries of a segment whose read failed transiently (S3 SlowDown, a reset connection),
    with exponential backoff from 0.5 s, before it is quarantined as ``io``."""
    timeout_seconds: float = 120.0
    """Wall-clock limit of one segment's decode (each retry has its own), checked at every read
    libsndfile makes and between chunks; a segment over it is quarantined as ``timeout``."""
    max_memory_bytes: int = 1 << 30
    """Memory one segment's decode may need (source-rate mono float32, its resampled copy and
    the int16 result: 8 bytes a source frame + 10 an output sample); a segment needing more is
    quarantined as ``too_long`` before anything is allocated. 1 GiB: ~50 min at 48 kHz."""
    min_sample_rate: int = 4_000
    """Files with a lower sample rate are quarantined as ``bad_header``."""
    max_sample_rate: int = 768_000
    """Files with a higher sample rate are quarantined as ``bad_header``."""
    max_channels: int = 64
    """Files with more channels are quarantined as ``bad_header``."""

    def __post_init__(self) -> None:
        if self.sample_rate <= 0:
            raise ConfigError(f"sample_rate must be positive, got {self.sample_rate}")
        if self.resampler not in RESAMPLERS:
            raise ConfigError(f"resampler must be 'soxr' or 'torchaudio', got {self.resampler!r}")
        if self.min_seconds < 0 or self.truncation_tolerance < 0:
            raise ConfigError("min_seconds and truncation_tolerance must be >= 0")
        if self.io_threads < 1:
            raise ConfigError(f"io_threads must be >= 1, got {self.io_threads}")
        if self.io_retries < 0:
            raise ConfigError(f"io_retries must be >= 0, got {self.io_retries}")
        if self.timeout_seconds <= 0 or self.max_memory_bytes <= 0:
            raise ConfigError("timeout_seconds and max_memory_bytes must be > 0")
        if not 1 <= self.min_sample_rate <= self.max_sample_rate or self.max_channels < 1:
            raise ConfigError("need 1 <= min_sample_rate <= max_sample_rate and max_channels >= 1")


class DecodeError(SpearError):
    """A segment that cannot become audio; ``error_type`` is one of :data:`ERROR_TYPES`."""

    def __init__(self, error_type: str, message: str, transient: bool = False) -> None:
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.message = message
        self.transient = transient
        """A storage failure that may pass (throttling, a reset connection): worth a retry."""


def _io_error(url: str, err: BaseException) -> DecodeError:
    # A missing object or a refused permission will not change on retry; anything else may.
    transient = not isinstance(err, FileNotFoundError | PermissionError | IsADirectoryError)
    return DecodeError("io", f"{url}: {type(err).__name__}: {err}", transient=transient)


@functools.lru_cache(maxsize=32)
def _torchaudio_resampler(orig: int, new: int) -> Callable[[Any], Any]:
    # The sinc kernel depends only on the rate pair: build it once per worker.
    import torchaudio

    return torchaudio.transforms.Resample(orig, new)


def resample(x: np.ndarray, orig: int, new: int, resampler: str) -> np.ndarray:
    """float32 mono -> float32 mono at ``new`` Hz, exactly ``round(len(x) * new / orig)`` long.

    Libraries disagree on the length (soxr rounds, torchaudio takes the ceiling); a fixed rule
    keeps ``num_samples`` and so the teachers' frame counts independent of the resampler.
    """
    if orig == new:
        return x
    n_out = round(len(x) * new / orig)
    if resampler == "soxr":
        import soxr

        y = soxr.resample(x, orig, new, quality="HQ")
    elif resampler == "torchaudio":
        import torch

        with torch.inference_mode():
            y = _torchaudio_resampler(orig, new)(torch.from_numpy(x)).numpy()
    else:
        raise ValueError(f"unknown resampler {resampler!r}")
    if len(y) >= n_out:
        return np.asarray(y[:n_out], dtype=np.float32)
    return np.pad(y, (0, n_out - len(y))).astype(np.float32)


def to_int16(x: np.ndarray) -> np.ndarray:
    """float in [-1, 1) -> int16 with clipping (libsndfile's 32768 scale, so PCM_16 round-trips)."""
    return np.clip(np.rint(x * 32768.0), -32768, 32767).astype(AUDIO_DTYPE)


@dataclass(frozen=True)
class SeekPoint:
    """Where a segment's decode starts, from the manifest (an MP3's frame index): the byte
    ``offset`` and the ``sample`` (at the file's rate) decoding from there yields first, after
    the Xing/Info frame ``header`` (``(offset, bytes)``; 0 bytes: none)."""

    offset: int
    sample: int
    header: tuple[int, int] = (0, 0)


SEEK_BLOCK_SIZE = 64 << 10
"""Range-read block of a decode that starts at a :class:`SeekPoint`: it reads the tag frame
at the top, the segment's frames and the decoder's look at the file's end, each a block, so a
30 s segment of a 70 kbit/s MP3 costs ~7 requests and ~450 KB where 1 MiB blocks would fetch
3-4 MiB (measured by benchmarks/decode.py --mp3-reads)."""


def decode_segment(
    url: str,
    start: float,
    duration: float | None,
    cfg: DecodeConfig,
    storage: StorageConfig,
    *,
    version: str | None = None,
    expect_size: int | None = None,
    seek: SeekPoint | None = None,
) -> np.ndarray:
    """Decode ``duration`` seconds from ``start`` (``None``: to the end) of ``url`` to mono
    int16 at ``cfg.sample_rate``. Raises :class:`DecodeError`.

    ``version`` (the manifest's ``file_version``) or, for manifests before version 2,
    ``expect_size`` (its ``file_size``) are checked against the file opened: a file rewritten
    since is ``changed`` (:func:`spear.stages.audio_io.open_source`). ``seek`` (an MP3 row's
    seek point) starts the decode at that frame instead of the top.

    Only the bytes libsndfile asks for are fetched: the header, a seek (FLAC's seek search,
    WAV's arithmetic, an MP3's frame from the manifest) and the segment's blocks.
    """
    budget = Budget(cfg.timeout_seconds, "decode")
    splice = seek if seek is not None and seek.offset > 0 else None
    block_size = min(storage.block_size, SEEK_BLOCK_SIZE) if splice else storage.block_size
    try:
        fs, path = filesystem(url, storage)
    except Exception as err:  # storage layers raise many types; all are I/O failures here
        raise _io_error(url, err) from err
    with contextlib.ExitStack() as stack:
        size = 0

        def open_raw() -> Any:
            try:
                return stack.enter_context(
                    fs.open(path, "rb", block_size=block_size, cache_type=_CACHE_TYPE)
                )
            except Exception as err:
                raise _io_error(url, err) from err

        def open_sound(raw: Any = None) -> tuple[sf.SoundFile, GuardedFile]:
            raw = raw if raw is not None else open_raw()
            if splice is not None:
                try:  # reads the tag frame
                    raw = SpliceFile(raw, splice.header, splice.offset, size)
                except Exception as err:
                    raise _io_error(url, err) from err
            snd, f = open_guarded(raw, budget)
            return stack.enter_context(snd), f

        try:
            try:
                raw, size, _ = open_source(
                    fs,
                    path,
                    block_size=block_size,
                    cache_type=_CACHE_TYPE,
                    expect_version=version,
                    expect_size=expect_size,
                )
            except BadAudio:
                raise
            except Exception as err:
                raise _io_error(url, err) from err
            stack.enter_context(raw)
            if not size:
                raise BadAudio("empty", "0 bytes")
            snd, f = open_sound(raw)
            if splice is not None and snd.format != "MP3":
                raise BadAudio(
                    "unreadable", f"the manifest gives an MP3 seek point, the file is {snd.format}"
                )
            if snd.format == "OGG" and not version:
                # No manifest's probe vouches for this file: refuse what would decode in part.
                check_single_ogg_stream(raw, size)
            origin = splice.sample if splice is not None else 0
            return _decode_open(snd, f, open_sound, size, start, duration, cfg, budget, origin)
        except BadAudio as err:
            raise DecodeError(err.error_type, f"{url}: {err.message}") from None
        except StorageFailed as err:
            raise _io_error(url, err.error) from err
        except sf.LibsndfileError as err:  # corrupt frames mid-stream
            raise DecodeError("unreadable", f"{url}: decoding failed: {err.error_string}") from err


def decode_bytes(frames: int, sample_rate: int, out_rate: int) -> int:
    """Memory a decode of ``frames`` source frames holds at its peak (see ``max_memory_bytes``)."""
    return 8 * frames + 10 * round(frames * out_rate / sample_rate)


def _decode_open(
    snd: sf.SoundFile,
    f: GuardedFile,
    reopen: Reopen,
    size: int,
    start: float,
    duration: float | None,
    cfg: DecodeConfig,
    budget: Budget,
    origin: int = 0,
) -> np.ndarray:
    """``origin``: the sample of the file that ``snd``'s first frame is (a seek point's)."""
    check_format(snd, cfg.min_sample_rate, cfg.max_sample_rate, cfg.max_channels)
    sr = snd.samplerate
    if snd.frames == 0:
        raise BadAudio("empty", f"no audio frames ({snd.format}/{snd.subtype})")
    known = header_frames(snd, size)  # None: unknown or approximate, decoding tells
    first = round(start * sr) - origin
    # The end is rounded on its own (not the length), so neighbouring segments tile the file.
    want = None if duration is None else round((start + duration) * sr) - origin - first
    if first < 0 or (known is not None and first > known) or (want is not None and want < 0):
        held = f"{known / sr:.3f} s" if known is not None else "an unknown length"
        raise BadAudio("truncated", f"segment starts at {start:.3f} s, file holds {held}")
    most = want if want is not None else (known - first if known is not None else None)
    if most is not None and decode_bytes(most, sr, cfg.sample_rate) > cfg.max_memory_bytes:
        raise _too_long(most, sr, cfg)
    snd, f = seek_or_skip(snd, f, first, reopen, budget)
    fast = snd.subtype == "PCM_16" and snd.channels == 1 and sr == cfg.sample_rate
    if want is None:  # to the end: stop one chunk past the memory limit
        limit = cfg.max_memory_bytes // decode_bytes(1, sr, cfg.sample_rate) + 1
        mono = _read_mono(snd, f, limit, fast, budget, first + origin)
        if len(mono) >= limit:
            raise _too_long(len(mono), sr, cfg)
    else:
        mono = _read_mono(snd, f, want, fast, budget, first + origin)
    got = len(mono)
    if got == 0 and first + origin == 0:
        raise BadAudio("empty", f"decoding yields no audio frames ({snd.format}/{snd.subtype})")
    if want is not None and want - got > cfg.truncation_tolerance * sr:
        raise BadAudio(
            "truncated",
            f"{got / sr:.3f} s decoded from {start:.3f} s, the manifest promised {want / sr:.3f} s",
        )
    out = mono if fast else to_int16(resample(mono, sr, cfg.sample_rate, cfg.resampler))
    if len(out) < cfg.min_seconds * cfg.sample_rate:
        raise BadAudio(
            "too_short", f"{len(out) / cfg.sample_rate:.3f} s < min_seconds {cfg.min_seconds}"
        )
    return out


def _too_long(frames: int, sr: int, cfg: DecodeConfig) -> BadAudio:
    need = decode_bytes(frames, sr, cfg.sample_rate)
    return BadAudio(
        "too_long",
        f"{frames / sr:.1f} s at {sr} Hz needs {need / 2**20:.0f} MiB to decode, over "
        f"max_memory_bytes ({cfg.max_memory_bytes / 2**20:.0f} MiB)",
    )


def _read_mono(
    snd: sf.SoundFile, f: GuardedFile, n: int, fast: bool, budget: Budget, offset: int = 0
) -> np.ndarray:
    """Up to ``n`` frames from the current position (frame ``offset`` of the file), downmixed
    chunk by chunk: int16 when ``fast`` (16 kHz mono PCM_16, bit-exact), else float32, every
    chunk checked for NaN and infinite samples (``non_finite``) before anything else sees it."""
    step = min(chunk_frames(snd.channels), max(1, n))
    buf = np.empty((step, snd.channels), np.int16 if fast else np.float32)
    parts: list[np.ndarray] = []
    total = 0
    while total < n:
        budget.check()
        want = min(step, n - total)
        got = read_into(snd, buf[:want])
        raise_guard_error(f, budget)
        block = buf[:got]
        check_finite(block, offset + total, snd.samplerate)
        if snd.channels > 1:
            parts.append(block.mean(axis=1, dtype=np.float32))
        else:
            parts.append(block[:, 0].copy())
        total += got
        if got < want:
            break
    if not parts:
        return np.empty(0, np.int16 if fast else np.float32)
    return np.concatenate(parts)


def _decode_row(
    url: str,
    start: float,
    duration: float | None,
    cfg: DecodeConfig,
    storage: StorageConfig,
    check: dict[str, Any] | None = None,
) -> tuple[bytes, int, str, str]:
    """(audio bytes, num_samples, error_type, error) for one row; never raises. ``check``:
    :func:`decode_segment`'s ``version``/``expect_size``/``seek``."""
    for attempt in range(cfg.io_retries + 1):
        try:
            samples = decode_segment(url, start, duration, cfg, storage, **(check or {}))
            break
        except DecodeError as err:
            if err.transient and attempt < cfg.io_retries:
                log.warning("decode %s: %s; retry %d", url, err.message, attempt + 1)
                time.sleep(0.5 * 2**attempt)
                continue
            return b"", 0, err.error_type, err.message
        except Exception as err:  # a bug must not kill a million-file job: quarantine and log it
            log.exception("internal error decoding %s", url)
            return b"", 0, "internal", f"{url}: {type(err).__name__}: {err}"
    return audio_to_bytes(samples), len(samples), "", ""


PROVENANCE_COLUMNS = (
    "file_version",
    "file_size",
    "seek_offset",
    "seek_sample",
    "seek_header_offset",
    "seek_header_bytes",
)
"""Manifest columns :func:`decode_batch` uses where a batch carries them: the file's identity
(checked: ``changed``) and an MP3 segment's seek point. A caller that decodes manifest items
should carry them (``file_version`` at least); without them a changed file is not noticed."""


def _present(v: Any) -> bool:
    return v is not None and v == v and v != ""  # None, NaN (a null in numpy) and "" are absent


def row_checks(batch: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """Per row, :func:`decode_segment`'s keyword arguments from the batch's
    :data:`PROVENANCE_COLUMNS` (those it has; nulls from a version 1 manifest are skipped)."""
    cols = {c: list(batch[c]) for c in PROVENANCE_COLUMNS if c in batch}
    out: list[dict[str, Any]] = []
    for i in range(n):
        v = {c: vals[i] for c, vals in cols.items() if _present(vals[i])}
        check: dict[str, Any] = {}
        if "file_version" in v:
            check["version"] = str(v["file_version"])
        elif "file_size" in v:
            check["expect_size"] = int(v["file_size"])
        if int(v.get("seek_offset", 0)) > 0 and "seek_sample" in v:
            header = (int(v.get("seek_header_offset", 0)), int(v.get("seek_header_bytes", 0)))
            check["seek"] = SeekPoint(int(v["seek_offset"]), int(v["seek_sample"]), header)
        out.append(check)
    return out


def decode_batch(
    batch: dict[str, np.ndarray], cfg: DecodeConfig, storage: StorageConfig
) -> dict[str, np.ndarray]:
    """Manifest rows -> audio batch. Needs ``url``; uses ``start`` (default 0), ``duration``
    (default: to the end) and the :data:`PROVENANCE_COLUMNS` it has. Every input column is
    carried; added: ``num_samples`` (int64), ``audio`` (int16 LE bytes), ``error_type`` and
    ``error`` ("" for rows that decoded; failed rows have empty audio and 0 samples)."""
    if "url" not in batch:
        raise ValueError(f"decode_batch needs a 'url' column, got {sorted(batch)}")
    urls = [str(u) for u in batch["url"]]
    n = len(urls)
    starts = [float(s) for s in batch["start"]] if "start" in batch else [0.0] * n
    durations: list[float | None] = (
        [float(d) for d in batch["duration"]] if "duration" in batch else [None] * n
    )
    checks = row_checks(batch, n)

    def one(i: int) -> tuple[bytes, int, str, str]:
        return _decode_row(urls[i], starts[i], durations[i], cfg, storage, checks[i])

    if cfg.io_threads > 1 and n > 1:
        with ThreadPoolExecutor(min(cfg.io_threads, n), thread_name_prefix="decode") as pool:
            results = list(pool.map(one, range(n)))
    else:
        results = [one(i) for i in range(n)]

    out = {k: v for k, v in batch.items() if k not in ("audio", "num_samples", *ERROR_COLUMNS)}
    audio = np.empty(n, dtype=object)
    audio[:] = [r[0] for r in results]
    out["audio"] = audio
    out["num_samples"] = np.array([r[1] for r in results], dtype=np.int64)
    out["error_type"] = np.array([r[2] for r in results], dtype=object)
    out["error"] = np.array([r[3] for r in results], dtype=object)
    return out


def split_decoded(
    batch: dict[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], list[dict[str, str]]]:
    """A decoded batch -> (the OK rows without the error columns, quarantine rows for the rest)."""
    err = np.asarray(batch["error_type"]).astype(str)
    bad = err != ""
    ok = {k: np.asarray(v)[~bad] for k, v in batch.items() if k not in ERROR_COLUMNS}
    ids = batch.get("item_id")
    rows = [
        quarantine_row(
            item_id=str(ids[i]) if ids is not None else "",
            source=str(batch["url"][i]),
            stage=STAGE,
            error_type=str(err[i]),
            message=str(batch["error"][i]),
        )
        for i in np.flatnonzero(bad)
    ]
    return ok, rows


def decode_dataset(
    ds: ray.data.Dataset,
    cfg: DecodeConfig,
    storage: StorageConfig,
    *,
    num_cpus: float = 1,
    batch_size: int = 16,
) -> ray.data.Dataset:
    """Decode every manifest row of ``ds`` in Ray CPU tasks; rows keep their error columns.

    ``batch_size`` rows per task call: 16 segments of 30 s are ~15 MB of int16, small enough
    to stream, large enough for the I/O threads to overlap reads. ``storage`` is resolved here,
    on the driver, and shipped to the workers explicitly.
    """
    return ds.map_batches(
        decode_batch,  # type: ignore[arg-type]  # Ray's stub ignores that fn_kwargs fills the rest
        fn_kwargs={"cfg": cfg, "storage": storage.resolved()},
        batch_format="numpy",
        batch_size=batch_size,
        num_cpus=num_cpus,
    )
