"""Run planning: how many GPU-hours, how long, how many CPU cores, how many bytes.

A pure core (:func:`plan_run`) turns a run's size and a set of measured rates into a
:class:`Plan`; the CLI (``spear plan``) only parses options into these dataclasses.

The model (one line per figure; ``A`` = audio seconds in the run, ``a`` = audio-domain share)::

    GPU-seconds       = A / r_wavlm + a A / r_dasheng     # WavLM on every item, Dasheng on audio
    wall (GPU-bound)  = GPU-seconds / gpus
    CPU cores to feed = A / wall / r_decode               # decode keeps pace with the GPUs
    wall (CPU-bound)  = A / (cpus r_decode)               # when --cpus says what there is
    object store      = 32,000 B/s x A x (1 + a)          # int16 audio, decode -> each teacher
    output            = A x (800 + 200 a) B/s             # 16 x 50 + 8 x 25 Hz codes, or measured

The object-store line assumes audio reaches each teacher actor only for the items that teacher
runs on (every item for WavLM, audio items for Dasheng). The run takes the larger wall time;
the figure behind it is the run's *limit*. Teacher rates are per GPU; the MVQ encode runs
inside the teacher's actor, so when its rate is measured on its own the two combine as stages
in series (``1 / (1/r_teacher + 1/r_mvq)``).

Rates files
-----------
Benchmarks store what they measured as JSON, one file per run (``benchmarks/rates/*.json``):
a list of entries (or ``{"rates": [...]}``), each::

    {"name": "wavlm", "value": 2400.0, "unit": "x_realtime/gpu",
     "device": "NVIDIA H100 80GB HBM3", "command": "uv run python benchmarks/teachers.py ...",
     "date": "2026-11-25T20:00:00Z"}

Known names and units (:data:`RATE_UNITS`): ``wavlm``, ``dasheng`` (the teacher per GPU,
``x_realtime/gpu``: ``benchmarks/teachers.py``, or a tokenize run's stage rate, which already
includes the MVQ encode); ``mvq.wavlm``, ``mvq.dasheng`` (the MVQ encode alone, per GPU; give
them only when the teacher figure excludes the encode); ``decode`` (decode + resample per
core, ``x_realtime/core``); ``token_bytes`` (shard bytes per audio second,
``bytes/audio_second``). Other names are kept but unused. When a name appears
more than once, ``device`` picks entries whose device contains it; the newest entry wins.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from spear.errors import SpearError

AUDIO_BYTES_PER_SECOND = 32_000
"""int16 mono 16 kHz audio between decode and the teachers (SPEC section 6)."""
WAVLM_BYTES_PER_SECOND = 800
"""16 codebooks x 50 Hz x 1 byte (SPEC section 3)."""
DASHENG_BYTES_PER_SECOND = 200
"""8 codebooks x 25 Hz x 1 byte (SPEC section 3)."""
TOKEN_BOUND_BYTES_PER_SECOND = WAVLM_BYTES_PER_SECOND + DASHENG_BYTES_PER_SECOND
"""Both teachers on every second: SPEC section 3's 1,000 B/s."""
PAPER_AUDIO_FRACTION = 13.0 / 197.0
"""SPEC section 5: 13k of 197k hours are general audio (Dasheng runs on those)."""

RATE_UNITS: dict[str, str] = {
    "wavlm": "x_realtime/gpu",
    "dasheng": "x_realtime/gpu",
    "mvq.wavlm": "x_realtime/gpu",
    "mvq.dasheng": "x_realtime/gpu",
    "decode": "x_realtime/core",
    "token_bytes": "bytes/audio_second",
}


@dataclass(frozen=True, kw_only=True)
class Rate:
    """One measured figure, as a benchmark stored it."""

    name: str
    """What was measured: a key of :data:`RATE_UNITS`."""
    value: float
    unit: str
    device: str
    """The machine it was measured on (GPU name, or CPU model and cores)."""
    command: str = ""
    """The command that measured it."""
    date: str = ""
    """ISO 8601 date of the measurement."""
    source: str = ""
    """Where this rate came from: a file path, or ``--NAME-rate``; set by the loader."""

    def describe(self) -> str:
        where = f" [{self.device}]" if self.device else ""
        when = f" {self.date}" if self.date else ""
        return f"{self.source or 'given'}{where}{when}"


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """The run to plan."""

    hours: float
    """Audio hours in the manifest."""
    gpus: int
    """GPUs the teachers run on."""
    cpus: int | None = None
    """CPU cores available for decoding (None: report how many the GPUs need)."""
    audio_fraction: float = PAPER_AUDIO_FRACTION
    """Share of the hours in the audio domain (they also go through Dasheng)."""
    dasheng: bool = True
    """Whether the audio teacher runs at all."""

    def __post_init__(self) -> None:
        if self.hours <= 0:
            raise SpearError(f"--hours must be positive, got {self.hours}")
        if self.gpus < 1:
            raise SpearError(f"--gpus must be at least 1, got {self.gpus}")
        if self.cpus is not None and self.cpus < 1:
            raise SpearError(f"--cpus must be at least 1, got {self.cpus}")
        if not 0.0 <= self.audio_fraction <= 1.0:
            raise SpearError(f"--audio-fraction must be in [0, 1], got {self.audio_fraction}")


@dataclass(frozen=True, kw_only=True)
class Rates:
    """The rates a plan uses, each with where it came from."""

    wavlm: Rate
    decode: Rate
    dasheng: Rate | None = None
    mvq_wavlm: Rate | None = None
    mvq_dasheng: Rate | None = None
    token_bytes: Rate | None = None


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What a run costs. Seconds and bytes; :meth:`table` formats them."""

    spec: RunSpec
    rates: Rates
    audio_seconds: float
    wavlm_rate: float
    """Effective WavLM actor rate (x real time per GPU, MVQ included)."""
    dasheng_rate: float | None
    wavlm_gpu_seconds: float
    dasheng_gpu_seconds: float
    gpu_seconds: float
    gpu_wall_seconds: float
    """Wall time if the GPUs were the only limit."""
    cpus_to_feed: float
    """Decode cores that keep every GPU busy (fractional; round up to provision)."""
    cpu_wall_seconds: float | None
    """Wall time if decode on ``spec.cpus`` cores were the only limit."""
    wall_seconds: float
    limit: str
    """``gpu`` or ``decode``: the figure that sets the wall time."""
    object_store_bytes: float
    object_store_bytes_per_second: float
    """Average object-store traffic while the run lasts."""
    output_bytes: float
    output_bytes_per_audio_second: float
    output_bound_bytes: float
    """SPEC section 3's bound: 1,000 B per second of audio."""
    notes: list[str] = field(default_factory=list)

    @property
    def gpu_hours(self) -> float:
        return self.gpu_seconds / 3600

    @property
    def wall_hours(self) -> float:
        return self.wall_seconds / 3600

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gpu_hours"] = self.gpu_hours
        d["wall_hours"] = self.wall_hours
        return d

    def table(self) -> str:
        """The plan as aligned text lines, one figure per line."""
        s, r = self.spec, self.rates
        rows: list[tuple[str, str, str]] = [
            ("audio", f"{s.hours:,.0f} h ({s.audio_fraction:.1%} audio domain)", ""),
            ("wavlm rate", f"{self.wavlm_rate:,.0f}x real time / GPU", r.wavlm.describe()),
        ]
        if r.mvq_wavlm:
            rows.append(("  (mvq.wavlm)", f"{r.mvq_wavlm.value:,.0f}x", r.mvq_wavlm.describe()))
        if self.dasheng_rate is not None and r.dasheng is not None:
            rows.append(
                ("dasheng rate", f"{self.dasheng_rate:,.0f}x real time / GPU", r.dasheng.describe())
            )
            if r.mvq_dasheng:
                rows.append(
                    ("  (mvq.dasheng)", f"{r.mvq_dasheng.value:,.0f}x", r.mvq_dasheng.describe())
                )
        rows += [
            ("decode rate", f"{r.decode.value:,.0f}x real time / core", r.decode.describe()),
            (
                "GPU-hours",
                f"{self.gpu_hours:,.1f}",
                f"wavlm {self.wavlm_gpu_seconds / 3600:,.1f} + "
                f"dasheng {self.dasheng_gpu_seconds / 3600:,.1f}",
            ),
            ("wall (GPU-bound)", _duration(self.gpu_wall_seconds), f"on {s.gpus} GPUs"),
            (
                "CPU cores to feed",
                f"{math.ceil(self.cpus_to_feed):,}",
                f"{self.cpus_to_feed / s.gpus:,.1f} per GPU",
            ),
        ]
        if self.cpu_wall_seconds is not None:
            rows.append(
                ("wall (decode-bound)", _duration(self.cpu_wall_seconds), f"on {s.cpus} cores")
            )
        rows += [
            ("wall time", _duration(self.wall_seconds), f"limited by {self.limit}"),
            (
                "object store",
                _bytes(self.object_store_bytes),
                f"{_bytes(self.object_store_bytes_per_second)}/s int16 audio, decode -> teachers",
            ),
            (
                "token shards",
                _bytes(self.output_bytes),
                f"{self.output_bytes_per_audio_second:,.0f} B/s of audio"
                + (f" ({r.token_bytes.describe()})" if r.token_bytes else "")
                + f"; bound {_bytes(self.output_bound_bytes)} at 1,000 B/s",
            ),
        ]
        width = max(len(k) for k, _, _ in rows) + 2
        vwidth = max(len(v) for _, v, _ in rows) + 2
        lines = [f"{k:<{width}}{v:<{vwidth}}{note}".rstrip() for k, v, note in rows]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _series(teacher: float, mvq: float | None) -> float:
    """Two stages in one actor, one after the other: the combined x-real-time rate."""
    return teacher if mvq is None else 1.0 / (1.0 / teacher + 1.0 / mvq)


def plan_run(spec: RunSpec, rates: Rates) -> Plan:
    """The pure planning core; see the module docstring for the formulas."""
    for r in (rates.wavlm, rates.decode, rates.dasheng, rates.mvq_wavlm, rates.mvq_dasheng):
        if r is not None and r.value <= 0:
            raise SpearError(f"rate {r.name} must be positive, got {r.value} ({r.describe()})")
    notes: list[str] = []
    audio_s = spec.hours * 3600.0
    audio_frac = spec.audio_fraction if spec.dasheng else 0.0
    wavlm_rate = _series(rates.wavlm.value, rates.mvq_wavlm.value if rates.mvq_wavlm else None)
    wavlm_gpu = audio_s / wavlm_rate
    dasheng_rate: float | None = None
    dasheng_gpu = 0.0
    if audio_frac > 0:
        if rates.dasheng is None:
            raise SpearError("no dasheng rate: give --dasheng-rate or a rates file with one")
        dasheng_rate = _series(
            rates.dasheng.value, rates.mvq_dasheng.value if rates.mvq_dasheng else None
        )
        dasheng_gpu = audio_frac * audio_s / dasheng_rate
    gpu_s = wavlm_gpu + dasheng_gpu
    gpu_wall = gpu_s / spec.gpus
    cpus_to_feed = audio_s / gpu_wall / rates.decode.value
    cpus = spec.cpus
    cpu_wall = audio_s / (cpus * rates.decode.value) if cpus else None
    if cpus and cpu_wall is not None and cpu_wall > gpu_wall:
        wall, limit = cpu_wall, "decode"
        notes.append(
            f"decode limits the run: {cpus} cores keep {cpus / cpus_to_feed:.0%} of "
            f"the GPUs busy; {math.ceil(cpus_to_feed)} cores would keep all {spec.gpus} fed"
        )
    else:
        wall, limit = gpu_wall, "gpu"
        share = wavlm_gpu / gpu_s
        notes.append(
            f"the GPUs limit the run; WavLM takes {share:.0%} of the GPU time"
            + (f", Dasheng {1 - share:.0%}" if dasheng_gpu else "")
        )
    devices = {r.device for r in (rates.wavlm, rates.dasheng) if r is not None and r.device}
    if len(devices) > 1:
        notes.append(f"teacher rates were measured on different devices: {sorted(devices)}")
    store = AUDIO_BYTES_PER_SECOND * audio_s * (1.0 + audio_frac)
    if rates.token_bytes is not None:
        per_s = rates.token_bytes.value
    else:
        per_s = WAVLM_BYTES_PER_SECOND + DASHENG_BYTES_PER_SECOND * audio_frac
    return Plan(
        spec=spec,
        rates=rates,
        audio_seconds=audio_s,
        wavlm_rate=wavlm_rate,
        dasheng_rate=dasheng_rate,
        wavlm_gpu_seconds=wavlm_gpu,
        dasheng_gpu_seconds=dasheng_gpu,
        gpu_seconds=gpu_s,
        gpu_wall_seconds=gpu_wall,
        cpus_to_feed=cpus_to_feed,
        cpu_wall_seconds=cpu_wall,
        wall_seconds=wall,
        limit=limit,
        object_store_bytes=store,
        object_store_bytes_per_second=store / wall,
        output_bytes=per_s * audio_s,
        output_bytes_per_audio_second=per_s,
        output_bound_bytes=TOKEN_BOUND_BYTES_PER_SECOND * audio_s,
        notes=notes,
    )


# ---------------------------------------------------------------- rates files


def parse_rates(data: Any, source: str) -> list[Rate]:
    """Rate entries from a rates file's parsed JSON (a list, or ``{"rates": [...]}``)."""
    entries = data.get("rates") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise SpearError(f"{source}: expected a list of rates or {{'rates': [...]}}")
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise SpearError(f"{source}[{i}]: expected an object, got {e!r}")
        missing = [k for k in ("name", "value", "unit", "device") if k not in e]
        if missing:
            raise SpearError(f"{source}[{i}]: missing {', '.join(missing)}")
        unknown = set(e) - {"name", "value", "unit", "device", "command", "date"}
        if unknown:
            raise SpearError(f"{source}[{i}]: unknown keys {sorted(unknown)}")
        name, unit = str(e["name"]), str(e["unit"])
        want = RATE_UNITS.get(name)
        if want is not None and unit != want:
            raise SpearError(f"{source}[{i}]: {name} must be in {want}, got {unit!r}")
        try:
            value = float(e["value"])
        except (TypeError, ValueError):
            raise SpearError(f"{source}[{i}]: value must be a number, got {e['value']!r}") from None
        out.append(
            Rate(
                name=name,
                value=value,
                unit=unit,
                device=str(e["device"]),
                command=str(e.get("command", "")),
                date=str(e.get("date", "")),
                source=source,
            )
        )
    return out


def load_rates(paths: list[Path]) -> list[Rate]:
    """Every entry of the given rates files; a folder means its ``*.json`` files."""
    out: list[Rate] = []
    for path in paths:
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        if not files:
            raise SpearError(f"no rates files (*.json) in {path}")
        for f in files:
            try:
                data = json.loads(f.read_text())
            except FileNotFoundError:
                raise SpearError(f"rates file not found: {f}") from None
            except json.JSONDecodeError as err:
                raise SpearError(f"{f}: not JSON ({err})") from None
            out += parse_rates(data, str(f))
    return out


def pick_rate(rates: list[Rate], name: str, device: str | None = None) -> Rate | None:
    """The entry for ``name`` (on a device containing ``device``); the newest when several.

    Several devices and no ``device`` filter is an error: a plan must not mix a CPU figure with
    an H100 one by accident."""
    found = [r for r in rates if r.name == name]
    if device:
        found = [r for r in found if device.lower() in r.device.lower()]
    if not found:
        return None
    devices = sorted({r.device for r in found})
    if len(devices) > 1 and not device:
        raise SpearError(
            f"rate {name} was measured on several devices ({'; '.join(devices)}): "
            "choose one with --device"
        )
    return max(found, key=lambda r: r.date)


def explicit(name: str, value: float) -> Rate:
    """A rate given on the command line (``--NAME-rate``)."""
    opt = "--token-bytes" if name == "token_bytes" else f"--{name.replace('.', '-')}-rate"
    return Rate(name=name, value=value, unit=RATE_UNITS[name], device="", source=opt)


def resolve_rates(
    stored: list[Rate], given: dict[str, float | None], device: str | None, dasheng: bool
) -> Rates:
    """Explicit rates over stored ones; a clear error naming what is missing."""

    def get(name: str) -> Rate | None:
        v = given.get(name)
        return explicit(name, v) if v is not None else pick_rate(stored, name, device)

    found = {name: get(name) for name in RATE_UNITS}
    need = ["wavlm", "decode"] + (["dasheng"] if dasheng else [])
    missing = [n for n in need if found[n] is None]
    if missing:
        flags = ", ".join(f"--{n}-rate" for n in missing)
        where = f" on a device matching {device!r}" if device else ""
        raise SpearError(
            f"no rate for {', '.join(missing)}{where}: give {flags} or a --rates file that "
            "has it (benchmarks write them to benchmarks/rates/)"
        )
    wavlm, decode = found["wavlm"], found["decode"]
    if wavlm is None or decode is None:  # unreachable: both are in `need`
        raise SpearError("no rate for wavlm or decode")
    return Rates(
        wavlm=wavlm,
        decode=decode,
        dasheng=found["dasheng"] if dasheng else None,
        mvq_wavlm=found["mvq.wavlm"],
        mvq_dasheng=found["mvq.dasheng"] if dasheng else None,
        token_bytes=found["token_bytes"],
    )


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:,.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:,.1f} h"
    return f"{seconds / 86400:,.1f} days"


def _bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"
