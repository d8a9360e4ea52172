"""Manifest stage, pure core: list audio files, probe their headers, cut them into items.

Probing reads only what a file's header needs, through fsspec range reads (a small block size,
so a probe of a 1-hour FLAC on S3 fetches a few KiB, not the file). A header's length is
believed only where it can be (:mod:`spear.stages.audio_io`): an unknown length (a streamed
FLAC) or an approximate one (MP3) is counted by decoding the file, in bounded chunks and within
``probe_timeout_seconds``. Files that cannot become an item (empty, truncated, not audio, a
lying header, too short, too long, too slow to read) become quarantine rows with their reason.

Item ids are ``<16 hex digits of blake2b(url, file version)>-<segment index, 4 digits>``: the
same file with the same content gives the same ids, whichever machine lists it; a file rewritten
since the last manifest gets new ids. Every row records the file's version (size plus mtime
locally, ETag/VersionId on S3), which every decode checks (``changed``). An MP3's rows also say
where in the file each segment's decode may start (a frame index built at probe time), so a
segment costs reads of its own length, not of its position.

Listing turns every path into an item, a quarantine row, or a ``skipped`` row with its reason
(:data:`SKIP_REASONS`); local folder links are followed, loops are skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import posixpath
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import soundfile as sf

from spear.errors import ConfigError, SpearError
from spear.formats import DOMAINS, quarantine_row
from spear.stages.audio_io import (
    BadAudio,
    Budget,
    GuardedFile,
    Mp3Index,
    StorageFailed,
    check_format,
    check_single_ogg_stream,
    mp3_index,
    mp3_seek_point,
    open_guarded,
    open_source,
    raise_guard_error,
    true_length,
)
from spear.storage import StorageConfig, canonical_url, check_url, filesystem, unstrip

log = logging.getLogger(__name__)

Domain = Literal["speech", "audio"]

AUDIO_EXTENSIONS = (
    "wav",
    "flac",
    "ogg",
    "oga",
    "opus",
    "mp3",
    "aif",
    "aiff",
    "aifc",
    "w64",
    "rf64",
    "au",
    "caf",
    "sph",
    "m4a",
    "aac",
    "wma",
    "webm",
    "mp4",
)
"""Listed by default. The last five are containers libsndfile cannot read: listing them anyway
turns a silent skip into a visible ``unreadable`` quarantine row."""

LIST_FILE_EXTENSIONS = (".txt", ".lst", ".list", ".scp")


@dataclass(kw_only=True, frozen=True)
class SourceConfig:
    """One root of audio: a directory/prefix URL, a single file, or a list file of URLs."""

    url: str
    """Directory or prefix to list recursively, one audio file, or a text file with one URL per
    line (``URL`` or ``DOMAIN<TAB>URL``; relative paths are relative to the list file; blank
    lines and lines starting with ``#`` are skipped; any other line with a tab is an error
    naming its line)."""
    domain: Domain = "speech"
    """Which losses and teachers apply to items from this source."""
    name: str = ""
    """Label kept on every item (default: the last path component of ``url``)."""

    def label(self) -> str:
        return self.name or posixpath.basename(self.url.rstrip("/")) or self.url


@dataclass(kw_only=True, frozen=True)
class ManifestConfig:
    """Listing, probing and segmenting."""

    sources: list[SourceConfig] = field(default_factory=list)
    """Sources from the config file; the CLI's positional sources are added to them."""
    speech_segment_seconds: float = 30.0
    """Speech files longer than this are cut into equal segments of at most this length."""
    audio_window_seconds: float = 10.0
    """Audio files are cut into windows of this length."""
    audio_min_tail_seconds: float = 1.0
    """A last audio window shorter than this is dropped (and counted), unless it is the only one."""
    min_seconds: float = 0.1
    """Files shorter than this are quarantined as too short."""
    extensions: list[str] = field(default_factory=lambda: list(AUDIO_EXTENSIONS))
    """File extensions listed under directory sources (case-insensitive)."""
    files_per_task: int = 500
    """Files probed per Ray task; also the resume granularity."""
    probe_threads: int = 16
    """Concurrent header reads inside one probe task (probing is latency-bound on S3)."""
    probe_block_size: int = 64 * 1024
    """Bytes fetched per range read while probing."""
    count_block_size: int = 4 << 20
    """Bytes fetched per range read when a probe must decode the whole file to learn its length
    (MP3, a FLAC streamed without a length): a 1-hour MP3 on S3 is ~15 reads, not ~900."""
    probe_timeout_seconds: float = 60.0
    """Wall-clock limit of one file's probe, header and any counting decode together, checked at
    every read libsndfile makes; a file over it is quarantined as ``timeout``. Counting a
    1-hour MP3 takes ~6 s of one core."""
    max_file_seconds: float = 86_400.0
    """Files longer than this (one day) are quarantined as ``too_long``; it also bounds the items
    one file can become (8,640 audio windows)."""
    min_sample_rate: int = 4_000
    """Files with a lower sample rate are quarantined as ``bad_header``."""
    max_sample_rate: int = 768_000
    """Files with a higher sample rate are quarantined as ``bad_header``."""
    max_channels: int = 64
    """Files with more channels are quarantined as ``bad_header``."""

    def __post_init__(self) -> None:
        if self.speech_segment_seconds <= 0 or self.audio_window_seconds <= 0:
            raise ConfigError("manifest segment lengths must be positive")
        if self.min_seconds < 0 or self.audio_min_tail_seconds < 0:
            raise ConfigError("manifest minimum lengths must not be negative")
        if self.files_per_task < 1 or self.probe_threads < 1 or self.probe_block_size < 512:
            raise ConfigError("manifest files_per_task/probe_threads must be >= 1, block >= 512")
        if self.count_block_size < 512:
            raise ConfigError("manifest count_block_size must be >= 512")
        if self.probe_timeout_seconds <= 0 or self.max_file_seconds <= 0:
            raise ConfigError("manifest probe_timeout_seconds and max_file_seconds must be > 0")
        if not 1 <= self.min_sample_rate <= self.max_sample_rate or self.max_channels < 1:
            raise ConfigError(
                "manifest needs 1 <= min_sample_rate <= max_sample_rate and max_channels >= 1"
            )


def parse_source(text: str, default_domain: str = "speech") -> SourceConfig:
    """A CLI source: ``URL``, ``DOMAIN=URL`` or ``DOMAIN:NAME=URL``."""
    domain, name, url = default_domain, "", text
    head, sep, rest = text.partition("=")
    if sep and "://" not in head and "/" not in head:
        dom, _, nm = head.partition(":")
        if dom not in DOMAINS:
            raise ConfigError(f"source {text!r}: domain {dom!r} is not one of {DOMAINS}")
        domain, name, url = dom, nm, rest
    if domain not in DOMAINS:
        raise ConfigError(f"domain {domain!r} is not one of {DOMAINS}")
    check_url(url)
    return SourceConfig(url=url, domain=domain, name=name)  # type: ignore[arg-type]


def item_id(url: str, segment: int, version: str = "") -> str:
    """``<16 hex digits of blake2b(url, version)>-<segment>``: the same file's same content
    gets the same id on every machine; content rewritten since (another ``version``) a new one.
    ``version=""`` gives the ids of manifests before version 2 (url only)."""
    key = url if not version else f"{url}\0{version}"
    return f"{hashlib.blake2b(key.encode(), digest_size=8).hexdigest()}-{segment:04d}"


# ---------------------------------------------------------------- listing


def _is_list_file(url: str) -> bool:
    return url.lower().endswith(LIST_FILE_EXTENSIONS)


SKIP_REASONS = ("not_audio", "spear_temporary", "symlink_loop", "unlistable_folder")
"""Why a listed path is not probed (the manifest's ``skipped`` table): its extension is not in
``extensions``; it is named like spear's own temporary files (``.tmp-*``, written beside a
target and renamed); it is a folder link back to a folder above it; or its folder cannot be
listed (permissions)."""


def skipped_row(url: str, reason: str, message: str) -> dict[str, str]:
    return {"url": url, "reason": reason, "message": message}


def list_source(
    src: SourceConfig,
    cfg: ManifestConfig,
    storage: StorageConfig,
    recursive: bool = True,
    *,
    skipped: list[dict[str, str]] | None = None,
    root: str | None = None,
) -> list[tuple[str, int, str]]:
    """All audio files of one source as sorted ``(url, size, domain)``; ``recursive=False``
    lists only the files directly under a directory source.

    Every other path found is appended to ``skipped`` with its reason (:data:`SKIP_REASONS`).
    Local folders reached through symbolic links are followed; a link back to a folder above it
    (up to the filesystem root, through ``root``: the source this folder belongs to) is a
    ``symlink_loop``. Links to nothing and special files (pipes, devices) are listed: the probe
    quarantines them as ``dangling_link`` / ``special_file``."""
    skipped = skipped if skipped is not None else []
    fs, path = filesystem(src.url, storage)
    exts = tuple("." + e.lower().lstrip(".") for e in cfg.extensions)
    out: list[tuple[str, int, str]] = []
    if _is_list_file(src.url) and fs.isfile(path):
        base = posixpath.dirname(src.url) if "://" in src.url else posixpath.dirname(path)
        for number, text in enumerate(fs.cat_file(path).decode().splitlines(), 1):
            parsed = parse_list_line(text, src.domain, f"list {src.url!r} line {number}")
            if parsed is None:
                continue
            domain, line = parsed
            url = line if ("://" in line or line.startswith("/")) else _join_relative(base, line)
            out.append((canonical_url(url, storage), -1, domain))  # size probed later
        return sorted(set(out))
    if _is_local(fs):
        if not os.path.isdir(path):
            return [(canonical_url(src.url, storage), -1, src.domain)]
        _, root_path = filesystem(root or src.url, storage)
        for p, size in walk_local(path, recursive, exts, skipped, above=root_path):
            out.append((p, size, src.domain))
        return sorted(out)
    if fs.isfile(path):
        return [(canonical_url(src.url, storage), int(fs.size(path)), src.domain)]
    if recursive:
        found = fs.find(path, detail=True, withdirs=False)
    else:
        found = {e["name"]: e for e in fs.ls(path, detail=True) if e.get("type") == "file"}
    for p, info in found.items():
        reason = _skip_reason(posixpath.basename(p), exts)
        if reason:
            skipped.append(skipped_row(unstrip(fs, p), *reason))
        else:
            out.append((unstrip(fs, p), int(info.get("size") or 0), src.domain))
    return sorted(out)


def _is_local(fs: Any) -> bool:
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return proto in ("file", "local")


def _skip_reason(name: str, exts: tuple[str, ...]) -> tuple[str, str] | None:
    if name.startswith(".tmp-"):
        return "spear_temporary", "named like spear's temporary files (.tmp-*), which are not read"
    if not name.lower().endswith(exts):
        return "not_audio", f"its extension is not one of manifest.extensions {list(exts)}"
    return None


def _dir_key(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def folder_keys_above(path: str) -> set[tuple[int, int]]:
    """(device, inode) of ``path``'s real folder and every folder above it."""
    keys = set()
    real = os.path.realpath(path)
    while True:
        with contextlib.suppress(OSError):
            keys.add(_dir_key(real))
        parent = os.path.dirname(real)
        if parent == real:
            return keys
        real = parent


def walk_local(
    path: str,
    recursive: bool,
    exts: tuple[str, ...],
    skipped: list[dict[str, str]],
    above: str | None = None,
) -> Iterator[tuple[str, int]]:
    """Files under the local folder ``path`` as ``(path, size)`` (size -1 where ``stat`` fails:
    a dangling link, which the probe names), following folder links. A folder whose (device,
    inode) is ``path``'s, one of its real parents, or one of ``above``'s and its parents, or a
    folder already entered on the way down, would be listed again forever: ``symlink_loop``."""
    seed = folder_keys_above(path) | (folder_keys_above(above) if above else set())
    stack = [(path, frozenset(seed))]
    while stack:
        folder, ancestors = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            skipped.append(skipped_row(folder, "unlistable_folder", f"{type(err).__name__}: {err}"))
            continue
        for e in entries:
            try:
                is_dir = e.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                try:
                    key = _dir_key(e.path)
                except OSError as err:
                    skipped.append(
                        skipped_row(e.path, "unlistable_folder", f"{type(err).__name__}: {err}")
                    )
                    continue
                if key in ancestors:
                    target = os.path.realpath(e.path)
                    msg = f"leads to {target}, a folder above it: following it never ends"
                    skipped.append(skipped_row(e.path, "symlink_loop", msg))
                    continue
                if recursive:
                    stack.append((e.path, ancestors | {key}))
                continue
            reason = _skip_reason(e.name, exts)
            if reason:
                skipped.append(skipped_row(e.path, *reason))
                continue
            try:
                size = e.stat(follow_symlinks=True).st_size
            except OSError:
                size = -1
            yield e.path, int(size)


def local_subfolders(path: str) -> list[str]:
    """The folders directly under local ``path`` (links to folders included) that are no link
    back to ``path`` or a folder above it, sorted."""
    above = folder_keys_above(path)
    out = []
    for e in sorted(os.scandir(path), key=lambda e: e.name):
        try:
            if e.is_dir(follow_symlinks=True) and _dir_key(e.path) not in above:
                out.append(e.path)
        except OSError:
            continue
    return out


def parse_list_line(text: str, default_domain: str, where: str) -> tuple[str, str] | None:
    """One line of a list file: ``URL`` or ``DOMAIN<TAB>URL`` -> (domain, URL); None for a
    blank line or a ``#`` comment. Any other tab-separated line is a :class:`ConfigError` that
    names ``where`` (the list and line number), the line and the two accepted forms."""
    line = text.strip()
    if not line or line.startswith("#"):
        return None
    if "\t" not in line:
        return default_domain, line
    domain, url = (p.strip() for p in line.split("\t", 1))
    if domain not in DOMAINS or not url or "\t" in url:
        raise ConfigError(
            f"{where}: {line!r} is not 'URL' or 'DOMAIN<TAB>URL' with DOMAIN one of "
            f"{', '.join(DOMAINS)} (a tab is read as the separator after the domain; "
            "'#' starts a comment line)"
        )
    return domain, url


def _join_relative(base: str, rel: str) -> str:
    """``base`` (a URL or path) joined with a relative path, ``..`` resolved."""
    if "://" in base:
        proto, rest = base.split("://", 1)
        return f"{proto}://{posixpath.normpath(posixpath.join(rest, rel))}"
    return posixpath.normpath(posixpath.join(base, rel))


# ---------------------------------------------------------------- probing


@dataclass(frozen=True)
class FileInfo:
    url: str
    size: int
    frames: int
    sample_rate: int
    channels: int
    format: str
    subtype: str
    version: str = ""
    """What identifies this content (:func:`spear.stages.audio_io.content_version`)."""
    mp3: Mp3Index | None = field(default=None, compare=False)
    """An MP3's frame index: where each segment's decode may start."""

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


class ProbeError(Exception):
    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


def probe_file(
    url: str, size: int, storage: StorageConfig, cfg: ManifestConfig | None = None
) -> FileInfo:
    """Describe one file from its header (range reads only), counting its length by decoding
    where the header cannot be believed; or raise ProbeError with the URL in the message."""
    cfg = cfg or ManifestConfig()
    budget = Budget(cfg.probe_timeout_seconds, "probe")
    try:
        return _probe(url, size, storage, cfg, budget)
    except BadAudio as err:
        raise ProbeError(err.error_type, f"{url}: {err.message}") from None
    except StorageFailed as err:
        raise ProbeError("io", f"{url}: cannot read: {err}") from None
    except SpearError as err:  # a URL no filesystem serves (e.g. a bad list-file line)
        raise ProbeError("io", f"{url}: {err}") from None
    except sf.LibsndfileError as err:  # a seek or read on a damaged stream
        raise ProbeError("unreadable", f"{url}: decoding failed: {err.error_string}") from None
    except OSError as err:
        raise ProbeError("io", f"{url}: cannot read: {type(err).__name__}: {err}") from None


def _probe(
    url: str, size: int, storage: StorageConfig, cfg: ManifestConfig, budget: Budget
) -> FileInfo:
    fs, path = filesystem(url, storage)
    with contextlib.ExitStack() as stack:
        raw, size, version = open_source(
            fs, path, block_size=cfg.probe_block_size, cache_type="readahead"
        )
        stack.enter_context(raw)
        if size == 0:
            raise BadAudio("empty", "file is empty (0 bytes)")

        def open_sound(block_size: int) -> tuple[sf.SoundFile, GuardedFile]:
            raw = stack.enter_context(
                fs.open(path, "rb", block_size=block_size, cache_type="readahead")
            )
            snd, f = open_guarded(raw, budget, "not readable as audio: ")
            return stack.enter_context(snd), f

        snd, _ = open_guarded(raw, budget, "not readable as audio: ")
        stack.enter_context(snd)
        check_format(snd, cfg.min_sample_rate, cfg.max_sample_rate, cfg.max_channels)
        if snd.format == "OGG":
            check_single_ogg_stream(raw, size)
        sr = snd.samplerate
        longest = math.ceil(cfg.max_file_seconds * sr)
        frames = true_length(snd, size, lambda: open_sound(cfg.count_block_size), longest, budget)
        index = None
        if snd.format == "MP3" and frames > 0:
            index = _mp3_index(fs, path, size, frames, cfg, budget, stack)
        info = FileInfo(
            url, size, frames, sr, snd.channels, snd.format, snd.subtype, version, index
        )
    if info.frames <= 0:
        raise BadAudio("empty", f"no audio frames in {size} bytes of {info.format}/{info.subtype}")
    if info.duration > cfg.max_file_seconds:
        raise BadAudio(
            "too_long", f"{info.duration:.1f} s is over max_file_seconds {cfg.max_file_seconds:g}"
        )
    return info


def _mp3_index(
    fs: Any,
    path: str,
    size: int,
    frames: int,
    cfg: ManifestConfig,
    budget: Budget,
    stack: contextlib.ExitStack,
) -> Mp3Index | None:
    """The MP3's frame index (one more sequential read of the file, in ``count_block_size``
    range reads), or None with a warning: its segments then decode from the top."""
    raw = stack.enter_context(
        fs.open(path, "rb", block_size=cfg.count_block_size, cache_type="readahead")
    )
    guarded = GuardedFile(raw, budget)

    def data(offset: int, n: int) -> bytes:
        guarded.seek(offset)
        out = guarded.read(n)
        raise_guard_error(guarded, budget)
        return out

    index = mp3_index(data, size, frames)
    if index is None:
        log.warning(
            "%s: its MPEG frames cannot be indexed (no Xing/Info tag, junk between frames, free "
            "format, a VBRI header or Layer I/II); each of its segments is decoded from the "
            "top of the file",
            fs.unstrip_protocol(path),
        )
    return index


def segments(duration: float, domain: str, cfg: ManifestConfig) -> list[tuple[float, float]]:
    """``(start, duration)`` of each item cut from a file of ``duration`` seconds (at most
    ``cfg.max_file_seconds``: the probe quarantines longer files, so no header's claim can make
    this list long)."""
    if not 0 <= duration <= cfg.max_file_seconds:
        raise SpearError(
            f"segments: {duration!r} s is outside [0, max_file_seconds {cfg.max_file_seconds:g}]"
        )
    if domain == "speech":
        n = max(1, math.ceil(duration / cfg.speech_segment_seconds - 1e-9))
        seg = duration / n
        return [(i * seg, seg if i < n - 1 else duration - i * seg) for i in range(n)]
    win = cfg.audio_window_seconds
    n_full = int(duration // win + 1e-9)
    out = [(i * win, win) for i in range(n_full)]
    tail = duration - n_full * win
    if tail > 1e-6 and (tail >= cfg.audio_min_tail_seconds or not out):
        out.append((n_full * win, tail))
    return out


def manifest_rows(
    info: FileInfo, source: str, domain: str, cfg: ManifestConfig
) -> tuple[list[dict[str, Any]], float]:
    """The items of one probed file, and the seconds dropped (a short audio tail)."""
    rows = []
    segs = segments(info.duration, domain, cfg)
    header = info.mp3.header if info.mp3 is not None else (0, 0)
    for i, (start, dur) in enumerate(segs):
        seek = (0, 0)
        if info.mp3 is not None:
            seek = mp3_seek_point(info.mp3, round(start * info.sample_rate))
        rows.append(
            {
                "item_id": item_id(info.url, i, info.version),
                "source": source,
                "domain": domain,
                "url": info.url,
                "segment": i,
                "start": start,
                "duration": dur,
                "file_duration": info.duration,
                "sample_rate": info.sample_rate,
                "channels": info.channels,
                "format": info.format,
                "subtype": info.subtype,
                "file_size": info.size,
                "file_version": info.version,
                "seek_offset": seek[0],
                "seek_sample": seek[1],
                "seek_header_offset": header[0] if seek[0] else 0,
                "seek_header_bytes": header[1] if seek[0] else 0,
            }
        )
    dropped = info.duration - sum(d for _, d in segs)
    return rows, max(0.0, dropped)


@dataclass
class ChunkResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    quarantine: list[dict[str, str]] = field(default_factory=list)
    files: int = 0
    seconds: float = 0.0
    dropped_seconds: float = 0.0


def probe_files(
    files: Iterable[tuple[str, int, str]],
    source: str,
    cfg: ManifestConfig,
    storage: StorageConfig,
) -> ChunkResult:
    """Probe ``(url, size, domain)`` files concurrently; rows come out in input order."""
    files = list(files)

    def one(f: tuple[str, int, str]) -> FileInfo | ProbeError:
        try:
            return probe_file(f[0], f[1], storage, cfg)
        except ProbeError as err:
            return err
        except Exception as err:  # a bug must not end a million-file job: quarantine, log
            log.exception("internal error probing %s", f[0])
            return ProbeError("internal", f"{f[0]}: {type(err).__name__}: {err}")

    res = ChunkResult(files=len(files))
    with ThreadPoolExecutor(max_workers=min(cfg.probe_threads, max(1, len(files)))) as pool:
        results: Iterator[FileInfo | ProbeError] = pool.map(one, files)
        for (url, _, domain), r in zip(files, results, strict=True):
            if isinstance(r, ProbeError):
                res.quarantine.append(_quarantine(url, r.error_type, str(r)))
            elif r.duration < cfg.min_seconds:
                msg = f"{url}: {r.duration:.3f} s is shorter than the minimum {cfg.min_seconds} s"
                res.quarantine.append(_quarantine(url, "too_short", msg))
            else:
                rows, dropped = manifest_rows(r, source, domain, cfg)
                res.rows += rows
                res.seconds += r.duration - dropped
                res.dropped_seconds += dropped
    return res


def _quarantine(url: str, error_type: str, message: str) -> dict[str, str]:
    return quarantine_row(
        item_id="", source=url, stage="manifest", error_type=error_type, message=message
    )
