"""A synthetic audio corpus for the demo, the tests and the benchmarks.

Good files hold a sine of known frequency (so resampling can be checked) in many containers,
codecs, rates and channel counts; bad files cover every way input goes wrong in practice. Each
file is described by a :class:`CorpusFile` saying what a correct pipeline must make of it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from spear.stages.audio_io import mp3_frame_length
from spear.storage import StorageConfig, join, write_atomic


@dataclass(frozen=True)
class CorpusFile:
    name: str
    duration: float  # seconds of audio in the file (0 for bad files)
    sample_rate: int
    channels: int
    format: str  # soundfile major format, "" for bad files
    subtype: str
    freq: float  # sine frequency in Hz
    bad: str | None = None  # the quarantine reason a correct probe/decode gives, if any
    lossy: bool = False


def sine(duration: float, sample_rate: int, freq: float, channels: int = 1) -> np.ndarray:
    """float32 (frames, channels) sine at amplitude 0.5; channel c is phase-shifted by c/4 turn."""
    t = np.arange(round(duration * sample_rate), dtype=np.float64) / sample_rate
    cols = [0.5 * np.sin(2 * np.pi * freq * t + c * np.pi / 2) for c in range(channels)]
    return np.stack(cols, axis=1).astype(np.float32)


def encode(audio: np.ndarray, sample_rate: int, fmt: str, subtype: str | None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, sample_rate, format=fmt, subtype=subtype)
    return buf.getvalue()


# (name, seconds, rate, channels, format, subtype, freq, lossy)
_GOOD: list[tuple[str, float, int, int, str, str, float, bool]] = [
    ("pcm16_16k_mono.wav", 3.0, 16000, 1, "WAV", "PCM_16", 440.0, False),
    ("pcm24_48k_stereo.wav", 2.5, 48000, 2, "WAV", "PCM_24", 1000.0, False),
    ("float_44k_mono.wav", 2.0, 44100, 1, "WAV", "FLOAT", 660.0, False),
    ("pcm16_8k_mono.wav", 4.0, 8000, 1, "WAV", "PCM_16", 300.0, False),
    ("pcm16_44k_stereo.flac", 3.5, 44100, 2, "FLAC", "PCM_16", 880.0, False),
    ("pcm16_16k_mono.flac", 5.0, 16000, 1, "FLAC", "PCM_16", 500.0, False),
    ("vorbis_48k_stereo.ogg", 3.0, 48000, 2, "OGG", "VORBIS", 700.0, True),
    ("mp3_44k_mono.mp3", 3.0, 44100, 1, "MP3", "MPEG_LAYER_III", 600.0, True),
]


def corpus_files(long_minutes: float = 10.0) -> list[CorpusFile]:
    """Descriptions of the standard corpus (``long_minutes`` sets the long FLAC's length)."""
    files = [CorpusFile(n, d, r, c, f, s, fr, lossy=lossy) for n, d, r, c, f, s, fr, lossy in _GOOD]
    if long_minutes > 0:
        files.append(
            CorpusFile("long_16k_mono.flac", long_minutes * 60, 16000, 1, "FLAC", "PCM_16", 250.0)
        )
    files += [
        CorpusFile("empty.wav", 0, 0, 0, "", "", 0, bad="empty"),
        CorpusFile("truncated.wav", 0, 0, 0, "", "", 0, bad="truncated"),
        CorpusFile("random_bytes.flac", 0, 0, 0, "", "", 0, bad="unreadable"),
        CorpusFile("text_named.wav", 0, 0, 0, "", "", 0, bad="unreadable"),
        CorpusFile("zero_frames.wav", 0, 16000, 1, "WAV", "PCM_16", 0, bad="empty"),
        CorpusFile("too_short.wav", 0.05, 16000, 1, "WAV", "PCM_16", 440, bad="too_short"),
        CorpusFile("unsupported.m4a", 0, 0, 0, "", "", 0, bad="unreadable"),
    ]
    return files


def file_bytes(cf: CorpusFile, seed: int = 0) -> bytes:
    """The bytes of one corpus file."""
    rng = np.random.default_rng(seed)
    if cf.bad is None:
        return encode(
            sine(cf.duration, cf.sample_rate, cf.freq, cf.channels),
            cf.sample_rate,
            cf.format,
            cf.subtype,
        )
    if cf.name == "empty.wav":
        return b""
    if cf.name == "truncated.wav":
        # A valid header promising 2 s, cut off after 1,000 bytes of data.
        return encode(sine(2.0, 16000, 440.0), 16000, "WAV", "PCM_16")[:1044]
    if cf.name == "random_bytes.flac":
        return rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes()
    if cf.name == "text_named.wav":
        return b"This is not audio. It is a text file that somebody named .wav.\n" * 20
    if cf.name == "zero_frames.wav":
        return encode(np.zeros((0, 1), np.float32), 16000, "WAV", "PCM_16")
    if cf.name == "too_short.wav":
        return encode(sine(0.05, 16000, 440.0), 16000, "WAV", "PCM_16")
    if cf.name == "unsupported.m4a":
        # An MP4 'ftyp' box: a real container that libsndfile does not read.
        return b"\x00\x00\x00\x20ftypM4A \x00\x00\x02\x00M4A isomiso2\x00\x00\x00\x08free" + bytes(
            2000
        )
    raise ValueError(f"unknown bad file {cf.name}")


def write_corpus(
    url: str, storage: StorageConfig | None = None, long_minutes: float = 10.0
) -> list[CorpusFile]:
    """Write the standard corpus under ``url`` (any fsspec URL); returns its descriptions."""
    storage = storage or StorageConfig()
    files = corpus_files(long_minutes)
    for i, cf in enumerate(files):
        write_atomic(join(url, cf.name), file_bytes(cf, seed=i), storage)
    return files


def write_speech_like(
    url: str,
    n: int,
    storage: StorageConfig | None = None,
    seconds: tuple[float, float] = (2, 8),
    seed: int = 0,
    sample_rate: int = 16000,
    fmt: str = "FLAC",
) -> list[str]:
    """``n`` files of band-limited noise bursts with varying pitch (a cheap stand-in for speech
    that, unlike a pure sine, gives teachers and quantisers varied frames). Returns the URLs."""
    storage = storage or StorageConfig()
    rng = np.random.default_rng(seed)
    urls = []
    ext = {"FLAC": "flac", "WAV": "wav", "OGG": "ogg"}[fmt]
    for i in range(n):
        dur = float(rng.uniform(*seconds))
        t = np.arange(int(dur * sample_rate)) / sample_rate
        f0 = rng.uniform(90, 250) * (1 + 0.2 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t))
        phase = 2 * np.pi * np.cumsum(f0) / sample_rate
        voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
        env = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 6) * t) ** 2
        noise = rng.normal(0, 0.05, t.shape)
        x = (0.2 * voiced * env + noise).astype(np.float32)
        u = join(url, f"utt_{i:05d}.{ext}")
        write_atomic(u, encode(x[:, None], sample_rate, fmt, None), storage)
        urls.append(u)
    return urls


# ---------------------------------------------------------------- headers that lie


@dataclass(frozen=True)
class HostileFile:
    """A file whose header says something its bytes do not: what a correct probe makes of it."""

    name: str
    data: bytes
    probe: str | None
    """The probe's quarantine reason, or ``None`` where the file is fine."""
    seconds: float | None
    """Length a correct probe reports (``None``: whatever decoding yields, e.g. an untagged MP3
    whose encoder delay and padding decode as audio)."""
    what: str


def flac_with_total(data: bytes, total: int) -> bytes:
    """A FLAC with STREAMINFO's 36-bit total-samples field set (0 means "unknown")."""
    if data[:4] != b"fLaC" or data[4] & 0x7F != 0:
        raise ValueError("not a FLAC starting with STREAMINFO")
    out = bytearray(data)
    out[21] = (out[21] & 0xF0) | ((total >> 32) & 0x0F)
    out[22:26] = (total & 0xFFFFFFFF).to_bytes(4, "big")
    return bytes(out)


def flac_metadata_only(data: bytes) -> bytes:
    """A FLAC's metadata blocks without any audio frame."""
    pos = 4
    while True:
        last, length = data[pos] & 0x80, int.from_bytes(data[pos + 1 : pos + 4], "big")
        pos += 4 + length
        if last:
            return data[:pos]


def mp3_without_info_tag(data: bytes) -> bytes:
    """An MP3 with its first frame dropped when that frame is a Xing/Info tag (the frame count,
    encoder delay and padding that make libsndfile's length exact), as sox writes MP3s."""
    pos = 0
    if data[:3] == b"ID3":
        pos = 10 + sum((data[6 + i] & 0x7F) << (7 * (3 - i)) for i in range(4))
    length = mp3_frame_length(data[pos : pos + 4])
    if length is None:
        raise ValueError("not an MPEG Layer III frame")
    if b"Xing" not in data[pos : pos + length] and b"Info" not in data[pos : pos + length]:
        return data
    return data[:pos] + data[pos + length :]


def _patched(data: bytes, offset: int, value: int, size: int, order: str = "little") -> bytes:
    return data[:offset] + value.to_bytes(size, order) + data[offset + size :]  # type: ignore[arg-type]


def hostile_files() -> list[HostileFile]:
    """Files with unknown, absurd or contradicted lengths, rates and channel counts; every one
    once reached a real pipeline or is one byte away from what a real writer produces."""
    tone = sine(3.0, 16000, 440.0)
    flac = encode(tone, 16000, "FLAC", "PCM_16")
    wav = encode(tone, 16000, "WAV", "PCM_16")  # canonical 44-byte header
    au = encode(tone, 16000, "AU", "PCM_16")
    mp3 = encode(sine(3.0, 44100, 600.0), 44100, "MP3", None)  # VBR with a Xing tag
    cbr = io.BytesIO()
    sf.write(
        cbr,
        sine(22.05, 44100, 600.0),
        44100,
        format="MP3",
        bitrate_mode="CONSTANT",
        compression_level=0.5,
    )
    return [
        HostileFile(
            "flac_no_samples.flac",
            flac_with_total(flac_metadata_only(flac), 0),
            "empty",
            0.0,
            "no audio frames, length 'unknown' (sox trim past the end)",
        ),
        HostileFile(
            "flac_streamed.flac",
            flac_with_total(flac, 0),
            None,
            3.0,
            "length 'unknown' (ffmpeg writing FLAC to a pipe); the audio is all there",
        ),
        HostileFile(
            "flac_absurd_length.flac",
            flac_with_total(flac, 2**36 - 1),
            "bad_header",
            0.0,
            "STREAMINFO claims 2^36-1 samples (49 days) in 31 KB",
        ),
        HostileFile(
            "flac_cut_off.flac",
            flac[: len(flac) // 2],
            "truncated",
            0.0,
            "a FLAC upload cut off halfway: its header promises 3 s",
        ),
        HostileFile(
            "wav_streamed.wav",
            _patched(_patched(wav, 4, 2**32 - 1, 4), 40, 2**32 - 1, 4),
            None,
            3.0,
            "RIFF and data sizes 0xFFFFFFFF (ffmpeg writing WAV to a pipe)",
        ),
        HostileFile(
            "wav_data_past_end.wav",
            _patched(wav, 40, 2**31, 4),
            "truncated",
            0.0,
            "data chunk size 2 GiB in a 96 KB file",
        ),
        HostileFile(
            "wav_absurd_rate.wav",
            _patched(wav, 24, 2**31 - 1, 4),
            "bad_header",
            0.0,
            "sample rate 2^31-1 Hz",
        ),
        HostileFile(
            "wav_1000_channels.wav", _patched(wav, 22, 1000, 2), "bad_header", 0.0, "1000 channels"
        ),
        HostileFile(
            "au_rate_1.au",
            _patched(au, 16, 1, 4, "big"),
            "bad_header",
            0.0,
            "sample rate 1 Hz: 96 KB would be 13 hours",
        ),
        HostileFile(
            "mp3_cbr_untagged.mp3",
            mp3_without_info_tag(cbr.getvalue()),
            None,
            None,
            "CBR MP3 without an Info tag (as sox writes): libsndfile's length estimate "
            "counts encoder delay and padding, 22.118 s where decoding yields 22.099 s",
        ),
        HostileFile(
            "mp3_vbr_untagged.mp3",
            mp3_without_info_tag(mp3),
            "bad_header",
            0.0,
            "VBR MP3 without a Xing tag (ffmpeg -q:a to a pipe, lame -t): libsndfile "
            "estimates 0.46 s from the first frame and decodes no further",
        ),
    ]
