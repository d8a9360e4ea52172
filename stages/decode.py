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
blocks, not the file.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import soundfile as sf

from spear.errors import ConfigError, SpearError
from spear.formats import AUDIO_DTYPE, audio_to_bytes, quarantine_row
from spear.storage import StorageConfig, filesystem

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

STAGE = "decode"

# fsspec cache for remote reads: libsndfile seeks back and forth (headers, FLAC's seek search);
# an LRU of aligned blocks serves them without re-fetching, where s3fs's default "readahead"
# re-fetched a whole block after a 1 KB backward seek (measured on a 10-minute FLAC).
_CACHE_TYPE = "blockcache"

ERROR_TYPES = ("empty", "truncated", "unreadable", "too_short", "io", "internal")
"""Reasons a segment is quarantined: ``empty`` (0 bytes or 0 frames), ``truncated`` (less audio
than the header or the manifest promised), ``unreadable`` (libsndfile cannot open or decode it:
random bytes, text, unsupported containers), ``too_short`` (below ``min_seconds``), ``io``
(storage failed), ``internal`` (a bug in spear; logged with its traceback)."""

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


class DecodeError(SpearError):
    """A segment that cannot become audio; ``error_type`` is one of :data:`ERROR_TYPES`."""

    def __init__(self, error_type: str, message: str, transient: bool = False) -> None:
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.message = message
        self.transient = transient
        """A storage failure that may pass (throttling, a reset connection): worth a retry."""


class _GuardedFile:
    """A read-only file proxy for libsndfile's virtual I/O.

    soundfile calls ``read``/``seek`` from C callbacks, where a Python exception is printed and
    turned into a short read: a storage failure would then look like a truncated file. The proxy
    keeps the first exception so the caller can report it as ``io``.
    """

    def __init__(self, f: Any) -> None:
        self._f = f
        self.error: BaseException | None = None

    def read(self, n: int = -1) -> bytes:
        if self.error is not None:
            return b""
        try:
            data: bytes = self._f.read(n)
        except Exception as err:
            self.error = err
            return b""
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        try:
            self._f.seek(offset, whence)
        except Exception as err:
            self.error = err
        return self.tell()

    def tell(self) -> int:
        return int(self._f.tell())

    def seekable(self) -> bool:
        return True


def _io_error(url: str, err: BaseException) -> DecodeError:
    # A missing object or a refused permission will not change on retry; anything else may.
    transient = not isinstance(err, FileNotFoundError | PermissionError | IsADirectoryError)
    return DecodeError("io", f"{url}: {type(err).__name__}: {err}", transient=transient)


# libsndfile logs "data : 64000 (should be 1000)" when a WAV/AIFF header promises more bytes
# than the file holds; it then silently decodes what is there.
_SHORT_CHUNK = re.compile(r"^(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


def _header_promises_more(extra_info: str) -> tuple[int, int] | None:
    for m in _SHORT_CHUNK.finditer(extra_info):
        declared, actual = int(m.group(1)), int(m.group(2))
        if declared > actual:
            return declared, actual
    return None


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


def decode_segment(
    url: str,
    start: float,
    duration: float | None,
    cfg: DecodeConfig,
    storage: StorageConfig,
) -> np.ndarray:
    """Decode ``duration`` seconds from ``start`` (``None``: to the end) of ``url`` to mono
    int16 at ``cfg.sample_rate``. Raises :class:`DecodeError`.

    Only the bytes libsndfile asks for are fetched: the header, a seek (FLAC's seek search or
    WAV's arithmetic) and the segment's blocks.
    """
    try:
        fs, path = filesystem(url, storage)
        # A listing cached in this worker (the manifest's probe) may hold an older size of an
        # object rewritten since; reads past the real end would then fail as I/O errors.
        fs.invalidate_cache(path)
        raw = fs.open(path, "rb", block_size=storage.block_size, cache_type=_CACHE_TYPE)
    except Exception as err:  # storage layers raise many types; all are I/O failures here
        raise _io_error(url, err) from err
    with raw:
        try:
            raw.seek(0, 2)
            size = raw.tell()
            raw.seek(0)
        except Exception as err:
            raise _io_error(url, err) from err
        if not size:
            raise DecodeError("empty", f"{url}: 0 bytes")
        f = _GuardedFile(raw)
        try:
            snd = sf.SoundFile(f, "r")
        except Exception as err:  # LibsndfileError, or TypeError/ValueError on odd headers
            if f.error is not None:
                raise _io_error(url, f.error) from err
            reason = getattr(err, "error_string", None) or f"{type(err).__name__}: {err}"
            raise DecodeError("unreadable", f"{url}: {reason}") from err
        with snd:
            return _decode_open(url, snd, f, start, duration, cfg)


def _decode_open(
    url: str,
    snd: sf.SoundFile,
    f: _GuardedFile,
    start: float,
    duration: float | None,
    cfg: DecodeConfig,
) -> np.ndarray:
    sr = snd.samplerate
    if snd.frames == 0:
        raise DecodeError("empty", f"{url}: no audio frames ({snd.format}/{snd.subtype})")
    short = _header_promises_more(snd.extra_info)
    if short is not None:
        raise DecodeError(
            "truncated", f"{url}: header promises {short[0]} data bytes, file holds {short[1]}"
        )
    first = round(start * sr)
    # The end is rounded on its own (not the length), so neighbouring segments tile the file.
    want = -1 if duration is None else round((start + duration) * sr) - first
    if first > snd.frames or first < 0:
        raise DecodeError(
            "truncated",
            f"{url}: segment starts at {start:.3f} s, file holds {snd.frames / sr:.3f} s",
        )
    fast = snd.subtype == "PCM_16" and snd.channels == 1 and sr == cfg.sample_rate
    try:
        if first:
            snd.seek(first)
        data = snd.read(want, dtype="int16" if fast else "float32", always_2d=True)
    except Exception as err:  # libsndfile fails mid-stream on corrupt frames
        if f.error is not None:
            raise _io_error(url, f.error) from err
        reason = getattr(err, "error_string", None) or f"{type(err).__name__}: {err}"
        raise DecodeError("unreadable", f"{url}: decoding failed: {reason}") from err
    if f.error is not None:
        raise _io_error(url, f.error)
    got = len(data)
    if want >= 0 and want - got > cfg.truncation_tolerance * sr:
        raise DecodeError(
            "truncated",
            f"{url}: {got / sr:.3f} s decoded from {start:.3f} s, the manifest promised "
            f"{want / sr:.3f} s",
        )
    if fast:
        out = np.ascontiguousarray(data[:, 0], dtype=AUDIO_DTYPE)
    else:
        mono = data.mean(axis=1, dtype=np.float32) if snd.channels > 1 else data[:, 0]
        out = to_int16(resample(np.ascontiguousarray(mono), sr, cfg.sample_rate, cfg.resampler))
    if len(out) < cfg.min_seconds * cfg.sample_rate:
        raise DecodeError(
            "too_short",
            f"{url}: {len(out) / cfg.sample_rate:.3f} s < min_seconds {cfg.min_seconds}",
        )
    return out


def _decode_row(
    url: str, start: float, duration: float | None, cfg: DecodeConfig, storage: StorageConfig
) -> tuple[bytes, int, str, str]:
    """(audio bytes, num_samples, error_type, error) for one row; never raises."""
    for attempt in range(cfg.io_retries + 1):
        try:
            samples = decode_segment(url, start, duration, cfg, storage)
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


def decode_batch(
    batch: dict[str, np.ndarray], cfg: DecodeConfig, storage: StorageConfig
) -> dict[str, np.ndarray]:
    """Manifest rows -> audio batch. Needs ``url``; uses ``start`` (default 0) and ``duration``
    (default: to the end). Every input column is carried; added: ``num_samples`` (int64),
    ``audio`` (int16 LE bytes), ``error_type`` and ``error`` ("" for rows that decoded; failed
    rows have empty audio and 0 samples)."""
    if "url" not in batch:
        raise ValueError(f"decode_batch needs a 'url' column, got {sorted(batch)}")
    urls = [str(u) for u in batch["url"]]
    n = len(urls)
    starts = [float(s) for s in batch["start"]] if "start" in batch else [0.0] * n
    durations: list[float | None] = (
        [float(d) for d in batch["duration"]] if "duration" in batch else [None] * n
    )

    def one(i: int) -> tuple[bytes, int, str, str]:
        return _decode_row(urls[i], starts[i], durations[i], cfg, storage)

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
