"""Bounded reads of untrusted audio files, shared by the manifest probe and the decode stage.

Headers lie. A FLAC holding no samples says "length unknown" (libsndfile reports 2^63-1 frames),
a WAV streamed by ffmpeg says its data chunk is 4 GiB, an MP3's length is an estimate from the
first frame's bitrate, and a damaged file says anything. So nothing here sizes work or memory
from a header alone:

* a header's length is believed only up to what the file's bytes can hold
  (:func:`max_frames`); beyond that the file is ``truncated`` (PCM) or ``bad_header``;
* unknown and approximate lengths are counted by decoding, in chunks of bounded size
  (:func:`count_frames`), never by allocating what the header claims;
* every read libsndfile makes goes through :class:`GuardedFile`, which starts failing once the
  time budget is spent, so even a loop inside libsndfile that keeps reading ends;
* sample rates and channel counts outside the configured bounds are ``bad_header``.

Errors are :class:`BadAudio` with an ``error_type`` from :data:`ERROR_TYPES`; each stage turns
them into its own error with the file's URL in the message.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import soundfile as sf

ERROR_TYPES = (
    "empty",
    "truncated",
    "unreadable",
    "bad_header",
    "too_short",
    "too_long",
    "timeout",
    "io",
    "internal",
    "non_finite",
    "changed",
    "unsupported",
    "dangling_link",
    "special_file",
)
"""Reasons a file or a segment is quarantined: ``empty`` (0 bytes or 0 frames), ``truncated``
(less audio than the header or the manifest promised), ``unreadable`` (libsndfile cannot open or
decode it: random bytes, text, unsupported containers), ``bad_header`` (a sample rate or channel
count outside the configured bounds, or a length the file's bytes cannot hold), ``too_short``
(below ``min_seconds``), ``too_long`` (over the configured longest file, or a segment needing more
memory than allowed), ``timeout`` (over the per-file or per-segment time limit), ``io`` (storage
failed), ``internal`` (a bug in spear; logged with its traceback), ``non_finite`` (a NaN or
infinite sample: a float file's bytes that are no audio), ``changed`` (the file's size, mtime,
ETag or version differs from the manifest's: it was rewritten since), ``unsupported`` (audio
libsndfile would decode only in part: a chained or multiplexed Ogg), ``dangling_link`` (a
symbolic link to nothing), ``special_file`` (a named pipe, socket or device, not a file)."""

SF_COUNT_MAX = 2**63 - 1
"""libsndfile's frame count for "unknown length" (e.g. a FLAC whose STREAMINFO says 0)."""

APPROXIMATE_LENGTH_FORMATS = ("MP3",)
"""Formats whose header length is an estimate: libsndfile's MP3 frame count comes from the file
size and bitrate (and includes encoder delay and padding) unless a LAME/Xing tag says otherwise,
so it is counted by decoding."""

MAX_FRAMES_PER_BYTE = 8192
"""Most frames one byte of compressed audio may decode to. Measured on two minutes of digital
silence: FLAC 380, Vorbis 371, ALAC 204, Opus 205, MP3 12; the bound leaves 20x room for
encoders tuned to silence and still stops a 100-byte file from claiming hours."""

# Bits per sample of uncompressed subtypes: their length follows from the byte count exactly.
# (FLAC also names its sample width PCM_16 etc.; its bytes are compressed.)
_PCM_BITS = {
    "PCM_S8": 8,
    "PCM_U8": 8,
    "ULAW": 8,
    "ALAW": 8,
    "DPCM_8": 8,
    "PCM_16": 16,
    "DPCM_16": 16,
    "PCM_24": 24,
    "PCM_32": 32,
    "FLOAT": 32,
    "DOUBLE": 64,
}

# "data : 64000 (should be 1000)": a WAV/AIFF header promising more bytes than the file holds;
# libsndfile then decodes what is there.
_SHORT_CHUNK = re.compile(r"^(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
# A data size of 2^32-1 is the "length unknown" mark of writers that cannot seek back (ffmpeg
# writing WAV to a pipe): the audio that is there is the file.
_UNKNOWN_CHUNK_SIZE = 0xFFFFFFFF

# MPEG Layer III frame headers, enough to tell whether bytes hold audio frames.
_MP3_KBPS = {  # MPEG-1, then MPEG-2/2.5, by bitrate index
    3: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    2: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MP3_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}

END_CHECKED_FORMATS = ("FLAC", "OGG")
"""Compressed formats whose exact header length is checked by seeking to its last frame: their
bytes cannot tell a cut-off file from a complete one, as a PCM file's can."""

TAIL_SECONDS = 10.0
"""An approximate length is checked by seeking this far before it and decoding to the end."""

CHUNK_BYTES = 4 << 20
"""Decoded bytes per read call: bounds the memory of counting and the time between checks."""


class BadAudio(Exception):
    """A file that cannot become audio as its header describes it."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message


class Budget:
    """A wall-clock budget for one probe or one segment's decode."""

    def __init__(self, seconds: float, what: str) -> None:
        self.seconds = seconds
        self.what = what
        self.end = time.monotonic() + seconds

    def expired(self) -> bool:
        return time.monotonic() > self.end

    def error(self) -> BadAudio:
        return BadAudio("timeout", f"{self.what} took over its {self.seconds:g} s limit")

    def check(self) -> None:
        if self.expired():
            raise self.error()


class BudgetExpired(Exception):
    """Kept by :class:`GuardedFile` for reads asked after the budget's end."""


class StorageFailed(Exception):
    """A read libsndfile made failed in the storage layer; ``error`` is what it raised."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error


class GuardedFile:
    """A read-only file proxy for libsndfile's virtual I/O.

    soundfile calls ``read``/``seek`` from C callbacks, where a Python exception is printed and
    turned into a short read: a storage failure would then look like a truncated file. The proxy
    keeps the first exception so the caller can report it as ``io``. With a budget, reads after
    its end fail (as end of file to libsndfile, :class:`BudgetExpired` to the caller): a parse
    that keeps reading cannot outlive the budget.
    """

    def __init__(self, f: Any, budget: Budget | None = None) -> None:
        self._f = f
        self._budget = budget
        self.error: BaseException | None = None

    def read(self, n: int = -1) -> bytes:
        if self.error is not None:
            return b""
        if self._budget is not None and self._budget.expired():
            self.error = BudgetExpired()
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
        except ValueError:
            pass  # before the start: a lying header's offset, not a storage failure
        except OSError as err:
            if err.errno != errno.EINVAL:  # EINVAL: the same, from a local file
                self.error = err
        except Exception as err:
            self.error = err
        return self.tell()

    def tell(self) -> int:
        return int(self._f.tell())

    def peek(self, n: int) -> bytes:
        """Up to ``n`` bytes from the current position, which is kept (what a decoder left)."""
        pos = self.tell()
        try:
            return bytes(self._f.read(n))
        finally:
            self._f.seek(pos)

    def seekable(self) -> bool:
        return True


Reopen = Callable[[], tuple[sf.SoundFile, GuardedFile]]
"""Opens the file afresh, at frame 0 (after a failed seek libFLAC cannot go on)."""


def check_format(snd: sf.SoundFile, min_rate: int, max_rate: int, max_channels: int) -> None:
    """Refuse sample rates and channel counts no real recording has (``bad_header``)."""
    if not min_rate <= snd.samplerate <= max_rate:
        raise BadAudio(
            "bad_header",
            f"sample rate {snd.samplerate} Hz is outside [{min_rate}, {max_rate}] Hz",
        )
    if not 1 <= snd.channels <= max_channels:
        raise BadAudio("bad_header", f"{snd.channels} channels, over the limit of {max_channels}")


_COMPRESSED_FORMATS = ("FLAC", "OGG", "MP3")


def _pcm_bits(snd: sf.SoundFile) -> int | None:
    return None if snd.format in _COMPRESSED_FORMATS else _PCM_BITS.get(snd.subtype)


def max_frames(size: int, snd: sf.SoundFile) -> int:
    """The most frames ``size`` bytes of this format can hold."""
    bits = _pcm_bits(snd)
    if bits is not None:
        return (size * 8) // (bits * snd.channels)
    return size * MAX_FRAMES_PER_BYTE


def header_frames(snd: sf.SoundFile, size: int) -> int | None:
    """The header's frame count where it can be believed; ``None`` where only decoding can tell
    (unknown or approximate length). Raises :class:`BadAudio` for lengths the bytes contradict."""
    for m in _SHORT_CHUNK.finditer(snd.extra_info):
        declared, actual = int(m.group(1)), int(m.group(2))
        if declared > actual and declared != _UNKNOWN_CHUNK_SIZE:
            msg = f"header promises {declared} data bytes, file holds {actual}"
            raise BadAudio("truncated", msg)
    frames = snd.frames
    if frames == SF_COUNT_MAX or snd.format in APPROXIMATE_LENGTH_FORMATS:
        return None
    if frames < 0:
        raise BadAudio("bad_header", f"header gives a negative length ({frames} frames)")
    cap = max_frames(size, snd)
    if frames > cap:
        claim = f"header promises {frames} frames ({frames / snd.samplerate:.6g} s)"
        where = f"{size} bytes of {snd.format}/{snd.subtype} hold at most {cap}"
        if _pcm_bits(snd) is not None:
            raise BadAudio("truncated", f"{claim}; {where}")
        raise BadAudio("bad_header", f"{claim}; {where}")
    return int(frames)


def read_into(snd: sf.SoundFile, out: np.ndarray) -> int:
    """Fill ``out`` (frames, channels; float32 or int16) from the current position; returns
    the frames read (fewer at the end of the stream).

    soundfile's own ``read`` seeks to its idea of the position after every call, and that seek
    fails on a FLAC whose header gives no or a wrong length (libFLAC cannot seek there): a
    readable stream would look unreadable. So libsndfile's ``sf_readf_*`` is called directly.
    """
    ctype = {np.dtype(np.float32): "float", np.dtype(np.int16): "short"}[out.dtype]
    if not out.flags.c_contiguous or out.ndim != 2 or out.shape[1] != snd.channels:
        raise ValueError("read_into needs a C-contiguous (frames, channels) array")
    ptr = sf._ffi.cast(f"{ctype} *", out.ctypes.data)
    got = int(getattr(sf._snd, f"sf_readf_{ctype}")(snd._file, ptr, out.shape[0]))
    code = sf._snd.sf_error(snd._file)
    if code:
        raise sf.LibsndfileError(code)
    return got


def chunk_frames(channels: int) -> int:
    return max(1024, CHUNK_BYTES // (4 * channels))


def drain(snd: sf.SoundFile, n: int, budget: Budget, f: GuardedFile) -> int:
    """Decode and drop up to ``n`` frames from the current position, in bounded chunks; returns
    how many there were (fewer than ``n``: the stream ended)."""
    buf = np.empty((min(chunk_frames(snd.channels), max(1, n)), snd.channels), np.float32)
    total = 0
    while total < n:
        budget.check()
        want = min(len(buf), n - total)
        got = read_into(snd, buf[:want])
        raise_guard_error(f, budget)
        total += got
        if got < want:
            break
    return total


def count_frames(snd: sf.SoundFile, limit: int, budget: Budget, f: GuardedFile) -> int:
    """Frames from the current position to the end of the stream, at most ``limit + 1`` (the
    caller says what going over the limit means)."""
    return drain(snd, limit + 1, budget, f)


def raise_guard_error(f: GuardedFile, budget: Budget) -> None:
    """Raise what a libsndfile read callback hit: the budget (``timeout``), or storage
    (:class:`StorageFailed`)."""
    if isinstance(f.error, BudgetExpired):
        raise budget.error()
    if f.error is not None:
        raise StorageFailed(f.error)


def open_guarded(raw: Any, budget: Budget, prefix: str = "") -> tuple[sf.SoundFile, GuardedFile]:
    """libsndfile over the file object ``raw``, every read under ``budget``; a file it cannot
    open is ``unreadable`` (the reason after ``prefix``) unless storage or the budget failed."""
    f = GuardedFile(raw, budget)
    try:
        snd = sf.SoundFile(f, "r")
    except Exception as err:  # LibsndfileError, or TypeError/ValueError on odd headers
        raise_guard_error(f, budget)  # storage or the budget, not the bytes
        reason = getattr(err, "error_string", None) or f"{type(err).__name__}: {err}"
        raise BadAudio("unreadable", prefix + reason) from err
    return snd, f


def seek_or_skip(
    snd: sf.SoundFile,
    f: GuardedFile,
    first: int,
    reopen: Reopen,
    budget: Budget,
) -> tuple[sf.SoundFile, GuardedFile]:
    """Position at frame ``first``: a seek, or where the format cannot seek (a FLAC of unknown or
    wrong length) a fresh open and decoding up to it. Raises ``truncated`` when the stream ends
    before ``first``."""
    if first == 0:
        return snd, f
    try:
        snd.seek(first)
        return snd, f
    except (sf.LibsndfileError, RuntimeError, ValueError):
        pass  # libFLAC is left in a failed state: start again from the top
    snd.close()
    snd, f = reopen()
    skipped = drain(snd, first, budget, f)
    if skipped < first:
        raise BadAudio(
            "truncated",
            f"segment starts at {first / snd.samplerate:.3f} s, the stream ends at "
            f"{skipped / snd.samplerate:.3f} s",
        )
    return snd, f


def mp3_frame_length(header: bytes) -> int | None:
    """Bytes of the MPEG Layer III frame whose 4-byte header this is; ``None`` if it is none."""
    if len(header) < 4 or header[0] != 0xFF or header[1] & 0xE0 != 0xE0:
        return None
    version, layer = (header[1] >> 3) & 3, (header[1] >> 1) & 3
    kbps_index, rate_index = header[2] >> 4, (header[2] >> 2) & 3
    if version == 1 or layer != 1 or kbps_index in (0, 15) or rate_index == 3:
        return None
    kbps = _MP3_KBPS[3 if version == 3 else 2][kbps_index]
    rate = _MP3_RATES[version][rate_index]
    return (144 if version == 3 else 72) * kbps * 1000 // rate + ((header[2] >> 1) & 1)


def mp3_frames_follow(data: bytes, chained: int = 3) -> bool:
    """Whether ``data`` holds MPEG Layer III audio: ``chained`` frame headers in a row, each
    where the previous frame ends (a trailing ID3v1/APE tag or junk has none)."""
    pos = data.find(b"\xff")
    while 0 <= pos < len(data) - 4:
        at, n = pos, 0
        while n < chained and (length := mp3_frame_length(data[at : at + 4])) is not None:
            at, n = at + length, n + 1
        if n == chained:
            return True
        pos = data.find(b"\xff", pos + 1)
    return False


def true_length(snd: sf.SoundFile, size: int, reopen: Reopen, longest: int, budget: Budget) -> int:
    """The frames ``snd`` (``size`` bytes) holds: the header's count where it can be believed
    and, for FLAC and Ogg, is reached by a seek; else what decoding yields, counted in bounded
    chunks on fresh opens from ``reopen``. Over ``longest`` frames is ``too_long``; over what
    the bytes can hold is ``bad_header``; a header's end that decoding does not reach is
    ``truncated``."""
    sr = snd.samplerate
    frames = header_frames(snd, size)
    cap = min(max_frames(size, snd), longest)
    if frames is not None:
        if frames and snd.format in END_CHECKED_FORMATS and not _reaches(snd, frames):
            # The header's last frame is not there (a cut-off upload, a wrong length).
            try:
                snd2, f = reopen()
                yields = f"decoding yields {drain(snd2, frames, budget, f) / sr:.3f} s"
            except sf.LibsndfileError as err:
                yields = f"decoding fails: {err.error_string}"
            raise BadAudio("truncated", f"header promises {frames / sr:.3f} s, {yields}")
        return frames
    if snd.frames == SF_COUNT_MAX:
        snd2, f = reopen()
        n = count_frames(snd2, cap, budget, f)
        if n == 0:
            raise BadAudio("empty", "header gives no length and decoding finds no audio frames")
    else:
        n = _approximate_length(snd.frames, sr, reopen, cap, budget)
    if n > cap:
        if cap == longest:
            raise BadAudio("too_long", f"decodes to over the longest file allowed ({cap} frames)")
        raise BadAudio(
            "bad_header", f"decodes to over {cap} frames, more than {size} bytes of {snd.format}"
        )
    return n


def _reaches(snd: sf.SoundFile, frames: int) -> bool:
    """Whether the stream holds frame ``frames - 1``: a seek and a one-frame read (FLAC's seek
    search reads a few KiB)."""
    try:
        snd.seek(frames - 1)
        return read_into(snd, np.empty((1, snd.channels), np.float32)) == 1
    except sf.LibsndfileError:
        return False


def _approximate_length(claim: int, sr: int, reopen: Reopen, cap: int, budget: Budget) -> int:
    """What decoding an MP3 yields, given libsndfile's estimate ``claim``: seek a little before
    the estimate and decode to the end (from the top where the estimate is past the real end).

    libsndfile never returns frames past its estimate (it decodes a whole request, then cuts it
    there), so requests stop at the estimate, and where they reach it the bytes the decoder
    left are checked for more MPEG frames: a VBR file without a Xing/Info tag, estimated from
    its first frame's bitrate, would otherwise lose the rest of its audio silently.
    """
    claim = min(claim, cap + 1)
    start = max(0, claim - round(TAIL_SECONDS * sr))
    snd, f = reopen()
    got = 0
    if start:
        try:
            snd.seek(start)
            got = drain(snd, claim - start, budget, f)
        except sf.LibsndfileError:
            got = 0
        if not got:
            start = 0
            snd, f = reopen()
    if not start:
        got = drain(snd, claim, budget, f)
    n = start + got
    if n == claim and mp3_frames_follow(f.peek(1 << 16), chained=4):
        raise BadAudio(
            "bad_header",
            f"libsndfile's length estimate ({n / sr:.3f} s) ends before the audio does, and it "
            "decodes no further (a VBR MP3 without a Xing/Info tag); re-encode it with a tag",
        )
    return n


# ---------------------------------------------------------------- the source file itself


def content_version(size: int, info: dict[str, Any]) -> str:
    """What identifies a file's content cheaply, from its listing/``info`` entry: the size plus
    the store's own identity (S3's ETag and, in a versioned bucket, VersionId; a generation,
    else a modification time). Two different versions of a file differ here; the same bytes
    re-uploaded may not (an ETag is a content hash), which is what matters."""
    parts = [f"size={size}"]
    for key in ("ETag", "etag", "VersionId", "generation"):
        value = info.get(key)
        if value:
            parts.append(f"{key.lower()}={str(value).strip(chr(34))}")
    if len(parts) == 1:  # no content identity: the time it was written
        for key in ("mtime_ns", "mtime", "LastModified", "last_modified", "updated", "created"):
            value = info.get(key)
            if value:
                parts.append(f"{key.lower()}={value}")
                break
    return ",".join(parts)


def _local_kind(mode: int) -> str | None:
    for test, kind in (
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
    ):
        if test(mode):
            return kind
    return None if stat.S_ISREG(mode) else "not a regular file"


def check_local(path: str) -> os.stat_result:
    """``os.stat`` of a local audio path, refusing what is no regular file before anything
    opens it (opening a named pipe would wait for a writer forever): ``dangling_link``,
    ``special_file``. A missing path raises FileNotFoundError (an ``io`` failure)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise BadAudio(
                "dangling_link", f"a symbolic link to {os.readlink(path)!r}, which does not exist"
            ) from None
        raise
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise BadAudio("dangling_link", "a symbolic link that loops on itself") from None
        raise
    kind = _local_kind(st.st_mode)
    if kind is not None:
        raise BadAudio("special_file", f"{kind}, not a regular file")
    return st


def local_version(st: os.stat_result) -> str:
    return content_version(st.st_size, {"mtime_ns": st.st_mtime_ns})


def open_source(
    fs: Any,
    path: str,
    *,
    block_size: int,
    cache_type: str,
    expect_version: str | None = None,
    expect_size: int | None = None,
) -> tuple[Any, int, str]:
    """Open an audio file for range reads: ``(file, size, content version)``. The one place
    the manifest's probe and every decode (tokenize, ``spear decode``, the student's reader)
    open a source, so all of them refuse the same things:

    * a local path that is no regular file (:func:`check_local`);
    * with ``expect_version`` (the manifest's ``file_version``), a file whose version now
      differs; without it, with ``expect_size`` (an old manifest's ``file_size``), a file of
      another size: ``changed``. The version is taken from the opened file (``fstat`` of the
      open descriptor; s3fs's HEAD at open), so no extra request is made.

    The caller closes the file. Storage errors propagate as they are."""
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if proto in ("file", "local"):
        check_local(path)
        raw = fs.open(path, "rb")
        try:
            st = os.fstat(getattr(raw, "f", raw).fileno())
            size, version = st.st_size, local_version(st)
            _check_version(version, size, expect_version, expect_size)
        except BaseException:
            raw.close()
            raise
        return raw, size, version
    # A listing cached in this worker (the manifest's probe) may hold an older entry of an
    # object rewritten since.
    fs.invalidate_cache(path)
    raw = fs.open(path, "rb", block_size=block_size, cache_type=cache_type)
    try:
        details = getattr(raw, "details", None) or fs.info(path)
        size = int(details.get("size") or getattr(raw, "size", 0) or 0)
        version = content_version(size, details)
        _check_version(version, size, expect_version, expect_size)
    except BaseException:
        raw.close()
        raise
    return raw, size, version


def _check_version(
    version: str, size: int, expect_version: str | None, expect_size: int | None
) -> None:
    if expect_version:
        if version != expect_version:
            raise BadAudio(
                "changed",
                f"the file changed since the manifest was built ({expect_version} then, "
                f"{version} now); build the manifest again to use its new content",
            )
    elif expect_size is not None and expect_size >= 0 and size != expect_size:
        raise BadAudio(
            "changed",
            f"the file holds {size} bytes, the manifest recorded {expect_size}: it changed "
            "since; build the manifest again to use its new content",
        )


def check_finite(block: np.ndarray, offset: int, sample_rate: int) -> None:
    """Refuse a NaN or infinite sample (``non_finite``): a float file's bytes that are no
    audio. Left alone, NaN becomes 0 and Inf a full-scale click in int16, and one such sample
    through the resampler spoils its whole filter length. ``offset``: frames before ``block``."""
    if block.dtype.kind != "f":
        return
    bad = ~np.isfinite(block)
    if bad.any():
        i = int(np.flatnonzero(bad.reshape(len(block), -1).any(axis=1))[0])
        v = block.reshape(len(block), -1)[i][bad.reshape(len(block), -1)[i]][0]
        raise BadAudio(
            "non_finite",
            f"sample {offset + i} ({(offset + i) / sample_rate:.3f} s) is {v}: "
            f"{int(bad.sum())} non-finite values in this block",
        )


# ---------------------------------------------------------------- Ogg: one logical stream

_OGG_MAX_PAGE = 27 + 255 + 255 * 255


def _ogg_page(data: bytes, at: int) -> tuple[int, int, int] | None:
    """``(serial, header_type, page bytes)`` of the Ogg page at ``at``; None if there is none."""
    if data[at : at + 4] != b"OggS" or len(data) < at + 27 or data[at + 4] != 0:
        return None
    nsegs = data[at + 26]
    if len(data) < at + 27 + nsegs:
        return None
    body = sum(data[at + 27 : at + 27 + nsegs])
    serial = int.from_bytes(data[at + 14 : at + 18], "little")
    return serial, data[at + 5], 27 + nsegs + body


def _read_at(raw: Any, offset: int, n: int) -> bytes:
    raw.seek(offset)
    return bytes(raw.read(n))


def check_single_ogg_stream(raw: Any, size: int) -> None:
    """Refuse an Ogg file of several logical streams (``unsupported``): libsndfile decodes only
    the first, so a chained file (streams one after another: concatenated recordings, a radio
    capture) would silently lose the rest, and a multiplexed one (streams side by side) be
    read in part. Three reads: the first page, the page after it (a second beginning-of-stream
    page: multiplexed) and the last page (another serial number: chained). ``raw``'s position
    is kept."""
    pos = raw.tell()
    try:
        head = _read_at(raw, 0, 27 + 255)
        first = _ogg_page(head, 0)
        if first is None:
            return
        serial, _, length = first
        second = _ogg_page(_read_at(raw, length, 27 + 255), 0)
        if second is not None and second[1] & 0x02 and second[0] != serial:
            raise BadAudio(
                "unsupported",
                "a multiplexed Ogg (several logical streams side by side); libsndfile would "
                "decode only the first: demultiplex it",
            )
        start = max(0, size - _OGG_MAX_PAGE)
        tail = _read_at(raw, start, size - start)
        at = tail.rfind(b"OggS")
        while at >= 0:
            page = _ogg_page(tail, at)
            if page is not None and at + page[2] == len(tail):
                if page[0] != serial:
                    raise BadAudio(
                        "unsupported",
                        "a chained Ogg (several logical streams one after another); libsndfile "
                        "would decode only the first: split it or re-encode it as one stream",
                    )
                return
            at = tail.rfind(b"OggS", 0, at)
    finally:
        raw.seek(pos)


# ---------------------------------------------------------------- MP3: a seek index

MP3_PREROLL_FRAMES = 12
"""Frames decoded and dropped before a segment that starts mid-file: a Layer III frame may take
its data from up to 511 bytes of earlier frames (the bit reservoir: 8 frames at the smallest
bitrate) and overlaps its predecessor by one granule; after these the output is the same as a
decode from the top."""


def _mp3_frame(header: bytes) -> tuple[int, int, int] | None:
    """``(bytes, samples per frame, side-info bytes)`` of a Layer III frame header, or None."""
    length = mp3_frame_length(header)
    if length is None:
        return None
    mpeg1 = (header[1] >> 3) & 3 == 3
    mono = header[3] >> 6 == 3
    side = (17 if mono else 32) if mpeg1 else (9 if mono else 17)
    return length, 1152 if mpeg1 else 576, side


@dataclass(frozen=True)
class Mp3Index:
    """Where a Layer III stream's audio frames start: frame ``k`` starts at byte
    ``offsets[k]`` and decodes to samples ``k * samples_per_frame`` onwards (of libsndfile's
    output for the whole file, encoder delay removed alike in both). ``header`` is the
    ``(offset, bytes)`` of the Xing/Info frame: a decode from frame ``k`` reads that frame
    first, so the decoder trims the same encoder delay as for the whole file."""

    offsets: np.ndarray
    samples_per_frame: int
    header: tuple[int, int]


def mp3_index(data: Callable[[int, int], bytes], size: int, decoded_frames: int) -> Mp3Index | None:
    """The frame index of an MP3 of ``size`` bytes (``data(offset, n)`` reads it), or None
    where there is no Xing/Info tag frame (libsndfile's length of a decode from mid-file would
    be an estimate), the frames cannot be followed to the end (junk between frames, free
    format, a VBRI header, Layer I/II) or their count does not match the ``decoded_frames``
    libsndfile decoded: segments of such a file are decoded from the top."""
    at = 0
    head = data(0, 10)
    if head[:3] == b"ID3" and len(head) == 10:  # an ID3v2 tag: a syncsafe size, and a footer
        at = 10 + sum((b & 0x7F) << (7 * (3 - i)) for i, b in enumerate(head[6:10]))
        at += 10 if head[5] & 0x10 else 0
    window = data(at, 1 << 16)
    first = window.find(b"\xff")
    while 0 <= first < len(window) - 4 and not mp3_frames_follow(window[first : first + 8192]):
        first = window.find(b"\xff", first + 1)
    if first < 0 or first >= len(window) - 4:
        return None
    at += first
    frame = _mp3_frame(window[first : first + 4])
    if frame is None:
        return None
    length, spf, side = frame
    tag = window[first + 4 + side : first + 8 + side]
    if window[first + 36 : first + 40] == b"VBRI":
        return None  # mpg123 does not read a VBRI frame as a tag: which frame is first is unsure
    if tag not in (b"Xing", b"Info"):
        # Without the tag libsndfile's length of a decode from frame k is an estimate from the
        # bytes left, which may stop short of the whole file's decode.
        return None
    header = (at, length)
    at += length
    offsets: list[int] = []
    block_at, block = at, b""
    while at + 4 <= size:
        if at + 4 > block_at + len(block):
            block_at, block = at, data(at, 1 << 22)
        f = _mp3_frame(block[at - block_at : at - block_at + 4])
        if f is None or f[1] != spf:
            break
        offsets.append(at)
        at += f[0]
    rest = size - at
    # What may follow the last frame: an ID3v1 tag (128 bytes), an APE tag, a Lyrics3 block.
    if rest > 64 << 10 or not offsets:
        return None
    total = len(offsets) * spf
    # The whole file's decode is the frames less the encoder delay and padding (12 bits each in
    # the LAME tag) and the decoder's delay; a larger gap means frames the scan did not see.
    if not 0 <= total - decoded_frames <= 2 * 4096 + 529 + spf:
        return None
    return Mp3Index(np.asarray(offsets, np.int64), spf, header)


def mp3_seek_point(index: Mp3Index, first: int) -> tuple[int, int]:
    """``(byte offset, sample)`` to decode from for a segment starting at sample ``first``:
    the frame holding ``first`` less :data:`MP3_PREROLL_FRAMES`; ``(0, 0)`` near the top."""
    k = first // index.samples_per_frame - MP3_PREROLL_FRAMES
    if k <= 0 or k >= len(index.offsets):
        return 0, 0
    return int(index.offsets[k]), k * index.samples_per_frame


class SpliceFile:
    """A read-only file of the Xing/Info frame ``header`` (``(offset, bytes)`` of ``raw``)
    followed by ``raw``'s bytes ``[start, size)``: an MP3 decoder given it sees the file's tag
    (so it trims the same encoder delay), then the audio frames from ``start``. The tag's byte
    count is set to this file's size: mpg123 warns on stderr where the two differ."""

    def __init__(self, raw: Any, header: tuple[int, int], start: int, size: int) -> None:
        self._raw = raw
        self._head = _xing_with_bytes(_read_at(raw, *header), header[1] + size - start)
        self._start = start
        self._size = len(self._head) + size - start
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = self._size if n < 0 else min(self._size, self._pos + n)
        out = b""
        if self._pos < min(end, len(self._head)):
            out = self._head[self._pos : min(end, len(self._head))]
            self._pos += len(out)
        if self._pos < end:
            self._raw.seek(self._start + self._pos - len(self._head))
            got = bytes(self._raw.read(end - self._pos))
            out += got
            self._pos += len(got)
        return out

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        if base + offset < 0:
            raise ValueError("seek before the start")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos


def _xing_with_bytes(frame: bytes, size: int) -> bytes:
    """The Xing/Info frame ``frame`` with its stream byte count (when it has one) set to
    ``size``."""
    out = bytearray(frame)
    for tag in (b"Xing", b"Info"):
        at = out.find(tag)
        if at >= 0 and len(out) >= at + 16:
            flags = int.from_bytes(out[at + 4 : at + 8], "big")
            if flags & 2:
                q = at + 8 + (4 if flags & 1 else 0)
                out[q : q + 4] = size.to_bytes(4, "big")
            break
    return bytes(out)
