"""Measured rates for ``spear plan``: the rates-file format, the shipped files, choosing by device,
peak FLOP/s by device name, and SPEC section 6's arithmetic where nothing was measured.

Rates files
-----------
Benchmarks store what they measured as JSON, one file per device (``benchmarks/rates.py``
writes them): a list of entries (or ``{"rates": [...]}``), each::

    {"name": "wavlm", "value": 2400.0, "unit": "x_realtime/gpu",
     "device": "NVIDIA H100 80GB HBM3", "command": "uv run python benchmarks/gpu.py",
     "date": "2026-11-25T20:00:00+00:00"}

Known names and units (:data:`RATE_UNITS`):

* ``wavlm``, ``dasheng`` - the teacher alone per GPU (``x_realtime/gpu``), or given on the
  command line, the teacher + MVQ actor;
* ``mvq.wavlm``, ``mvq.dasheng`` - the MVQ encode alone per GPU; the planner runs it in series
  with the teacher (``1 / (1/r_teacher + 1/r_mvq)``);
* ``tokenize.wavlm``, ``tokenize.dasheng`` - the fused tokenize actor (teacher + MVQ encode +
  codes to bytes) measured end to end; when stored, it is the actor rate and the two above
  are shown as its parts;
* ``student.<preset>`` - student training, audio seconds per second per GPU (``x_realtime/gpu``);
* ``decode`` - decode + resample per CPU core (``x_realtime/core``);
* ``token_bytes`` - shard bytes per audio second (``bytes/audio_second``).

Other names are kept but unused. ``device`` names the machine (a CUDA device name, or
``CPU <model>, <n> threads``); on CPU "per GPU" means per process with that many threads.

Choosing
--------
The shipped files (:data:`SHIPPED_DIR`, package data) are read when no ``--rates`` is given.
Per name, ``--device`` keeps entries whose device contains it (case-insensitive) and the
newest wins; the same name measured on several devices without ``--device`` is an error (a
plan must not mix an H100 figure with a CPU one by accident). The host rates (``decode``,
``token_bytes``) are chosen by ``--cpu-device`` (default ``--device``); when the device has none,
the only other device's figure is used, and the plan says so. ``token_bytes`` depends on the
data, not the machine, so the newest entry of any device is taken.

With ``--assume-mfu F`` a GPU rate that is neither given nor measured on the device is derived
from FLOPs: ``F x peak FLOP/s / FLOPs per audio second`` (SPEC section 6's arithmetic; the
peak from :data:`PEAK_TFLOPS` by device name, or ``--peak-tflops``), labelled as such.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spear.errors import SpearError

SHIPPED_DIR = Path(__file__).resolve().parent / "measured_rates"
"""The rates files shipped with spear (``benchmarks/rates.py`` writes here)."""

STUDENT_PRESETS = ("tiny", "base", "large", "xlarge")
"""The student encoder presets (``spear.student.config.ENCODER_PRESETS``)."""

TEACHER_RATES = ("wavlm", "dasheng")
RATE_UNITS: dict[str, str] = {
    "wavlm": "x_realtime/gpu",
    "dasheng": "x_realtime/gpu",
    "mvq.wavlm": "x_realtime/gpu",
    "mvq.dasheng": "x_realtime/gpu",
    "tokenize.wavlm": "x_realtime/gpu",
    "tokenize.dasheng": "x_realtime/gpu",
    **{f"student.{p}": "x_realtime/gpu" for p in STUDENT_PRESETS},
    "decode": "x_realtime/core",
    "token_bytes": "bytes/audio_second",
}
HOST_RATES = ("decode", "token_bytes")
"""Rates of the CPUs or of the data, not of the GPU the plan is for."""

PEAK_TFLOPS: dict[str, float] = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM (torch: "NVIDIA H100 80GB HBM3")
    "H200": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
}
"""Dense bf16 tensor-core peak per GPU (vendor data sheets), by a part of the device name;
the longest matching key wins ("H100 PCIe" before "H100")."""

STUDENT_GFLOPS_PER_SECOND: dict[str, float] = {"base": 24.6, "large": 78.0}
"""Student forward + backward GFLOPs per audio second at the encoder's steady-state schedules
(torch's FlopCounterMode on a 21 s train step, ``benchmarks/gpu.py --sizes cpu-real``), for
the arithmetic of ``--assume-mfu``."""


@dataclass(frozen=True, kw_only=True)
class Rate:
    """One measured figure, as a benchmark stored it."""

    name: str
    """What was measured: a key of :data:`RATE_UNITS`."""
    value: float
    unit: str
    device: str
    """The machine it was measured on (GPU name, or CPU model and threads)."""
    command: str = ""
    """The command that measured it."""
    date: str = ""
    """ISO 8601 date of the measurement."""
    source: str = ""
    """Where this rate came from: a file path, ``--NAME-rate`` or ``arithmetic: ...``."""

    def describe(self) -> str:
        where = f" [{self.device}]" if self.device else ""
        when = f" {self.date[:10]}" if self.date else ""
        # A file by its name (the JSON output keeps the path): the device says the rest.
        src = Path(self.source).name if self.source.endswith(".json") else self.source
        return f"{src or 'given'}{where}{when}"


@dataclass(frozen=True, kw_only=True)
class Rates:
    """The rates a plan uses, each with where it came from."""

    decode: Rate
    wavlm: Rate | None = None
    """The WavLM teacher (with ``mvq_wavlm``, or the whole actor when given as an option);
    may be None when ``tokenize_wavlm`` is set."""
    dasheng: Rate | None = None
    mvq_wavlm: Rate | None = None
    mvq_dasheng: Rate | None = None
    tokenize_wavlm: Rate | None = None
    """The fused actor measured end to end; when set, it is the WavLM actor rate."""
    tokenize_dasheng: Rate | None = None
    token_bytes: Rate | None = None
    student: Rate | None = None
    """``student.<preset>`` of the preset the plan trains (None: no training planned)."""
    notes: tuple[str, ...] = field(default_factory=tuple)
    """What choosing them involved (a host rate from another device, ...)."""

    def used(self) -> list[Rate]:
        return [r for r in vars(self).values() if isinstance(r, Rate)]


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


def shipped_rates() -> list[Rate]:
    """The rates shipped with spear (measured by the benchmarks; see :data:`SHIPPED_DIR`)."""
    return load_rates([SHIPPED_DIR]) if any(SHIPPED_DIR.glob("*.json")) else []


def pick_rate(rates: list[Rate], name: str, device: str | None = None) -> Rate | None:
    """The entry for ``name`` (on a device containing ``device``); the newest when several.

    Several devices and no ``device`` filter is an error."""
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
    if name == "token_bytes":
        opt = "--token-bytes"
    elif name.startswith("student."):
        opt = "--student-rate"
    else:
        opt = f"--{name.replace('.', '-')}-rate"
    return Rate(name=name, value=value, unit=RATE_UNITS[name], device="", source=opt)


def peak_tflops(device: str) -> tuple[float, str] | None:
    """(dense bf16 TFLOP/s, the matching key of :data:`PEAK_TFLOPS`) for a device name."""
    hits = [k for k in PEAK_TFLOPS if k.lower() in device.lower()]
    if not hits:
        return None
    key = max(hits, key=len)
    return PEAK_TFLOPS[key], key


def gflops_per_second(name: str) -> float | None:
    """Model GFLOPs per audio second behind a GPU rate name, when known."""
    if name in TEACHER_RATES:
        from spear.stages.teachers import TEACHERS

        return TEACHERS[name].gflops_per_second
    if name.startswith("student."):
        return STUDENT_GFLOPS_PER_SECOND.get(name.split(".", 1)[1])
    return None


def arithmetic(name: str, mfu: float, device: str | None, peak: float | None) -> Rate | None:
    """SPEC section 6's arithmetic for ``name`` at ``mfu`` of the device's peak (None: no FLOP
    count for it, e.g. the MVQ encode)."""
    gflops = gflops_per_second(name)
    if gflops is None:
        return None
    if peak is not None:
        label = f"{peak:,.0f} TFLOP/s (--peak-tflops)"
    else:
        found = peak_tflops(device or "")
        if found is None:
            known = ", ".join(PEAK_TFLOPS)
            raise SpearError(
                f"--assume-mfu: no peak FLOP/s known for device {device!r} (known: {known}); "
                "give --peak-tflops"
            )
        peak, key = found
        label = f"{peak:,.0f} TFLOP/s ({key} bf16 dense)"
    value = mfu * peak * 1e12 / (gflops * 1e9)
    return Rate(
        name=name,
        value=value,
        unit=RATE_UNITS[name],
        device=device or "",
        source=f"arithmetic: {mfu:.0%} MFU of {label}, {gflops:g} GFLOP per audio s",
    )


@dataclass(frozen=True, kw_only=True)
class RateChoice:
    """How to choose the rates of a plan (the CLI's options)."""

    device: str | None = None
    """Keep stored GPU rates measured on a device whose name contains this."""
    cpu_device: str | None = None
    """The same for the host rates (decode, token bytes); default ``device``."""
    dasheng: bool = True
    """Whether the plan runs Dasheng (its rates are needed)."""
    student: str | None = "base"
    """Student preset whose training is planned; None: none."""
    assume_mfu: float | None = None
    """Derive missing GPU rates from FLOPs at this MFU (SPEC section 6's arithmetic)."""
    peak_tflops: float | None = None
    """Peak TFLOP/s for that arithmetic (default: :data:`PEAK_TFLOPS` by device name)."""

    def __post_init__(self) -> None:
        if self.student is not None and self.student not in STUDENT_PRESETS:
            raise SpearError(
                f"--student must be one of {', '.join(STUDENT_PRESETS)} or none, "
                f"got {self.student!r}"
            )
        if self.assume_mfu is not None and not 0 < self.assume_mfu <= 1:
            raise SpearError(f"--assume-mfu must be in (0, 1], got {self.assume_mfu}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise SpearError(f"--peak-tflops must be positive, got {self.peak_tflops}")


def _host_rate(stored: list[Rate], name: str, choice: RateChoice, notes: list[str]) -> Rate | None:
    want = choice.cpu_device or choice.device
    found = [r for r in stored if r.name == name]
    if name == "token_bytes" and not choice.cpu_device:
        # Bytes per audio second are a property of the data and the quantisers, not the CPU.
        return max(found, key=lambda r: r.date) if found else None
    if want:
        hit = pick_rate(stored, name, want)
        if hit is not None or choice.cpu_device:
            return hit
    devices = sorted({r.device for r in found})
    if want and len(devices) > 1:
        raise SpearError(
            f"no {name} rate on a device matching {want!r}, and several others "
            f"({'; '.join(devices)}): choose one with --cpu-device"
        )
    hit = pick_rate(stored, name)
    if hit is not None and want:
        notes.append(f"{name} rate from {hit.device} (none measured on a device matching {want!r})")
    return hit


def resolve_rates(
    stored: list[Rate], given: dict[str, float | None], choice: RateChoice | None = None
) -> Rates:
    """Explicit rates over stored ones over arithmetic; one error line naming what is missing."""
    choice = choice or RateChoice()
    notes: list[str] = []
    names = ["wavlm", "decode", "mvq.wavlm", "tokenize.wavlm", "token_bytes"]
    need = ["wavlm", "decode"]
    if choice.dasheng:
        names += ["dasheng", "mvq.dasheng", "tokenize.dasheng"]
        need.append("dasheng")
    if choice.student:
        names.append(f"student.{choice.student}")
        need.append(f"student.{choice.student}")
    found: dict[str, Rate | None] = {}
    for name in names:
        key = "student" if name.startswith("student.") else name
        value = given.get(key)
        if value is not None:
            found[name] = explicit(name, value)
        elif name in HOST_RATES:
            found[name] = _host_rate(stored, name, choice, notes)
        else:
            found[name] = pick_rate(stored, name, choice.device)
            if found[name] is None and choice.assume_mfu is not None:
                found[name] = arithmetic(name, choice.assume_mfu, choice.device, choice.peak_tflops)
    # An explicit teacher rate is the whole actor (MVQ included unless its rate is given too):
    # a stored fused or MVQ figure, perhaps of another device, must not change it.
    for t in TEACHER_RATES:
        if given.get(t) is not None:
            found[f"tokenize.{t}"] = None
            if given.get(f"mvq.{t}") is None:
                found[f"mvq.{t}"] = None
    # A teacher is covered by its own rate or by the fused actor's.
    missing = [n for n in need if found[n] is None and found.get(f"tokenize.{n}") is None]
    if missing:
        flags = ", ".join(
            "--student-rate" if n.startswith("student.") else f"--{n}-rate" for n in missing
        )
        where = f" on a device matching {choice.device!r}" if choice.device else ""
        measured = sorted({r.device for r in stored})
        have = f" (rates are measured on: {'; '.join(measured)})" if measured else ""
        ways = [flags, "a --rates file with them (make bench-gpu writes one)"]
        if choice.device:
            ways.append("--assume-mfu 0.4 (SPEC's arithmetic)")
        if any(n.startswith("student.") for n in missing):
            ways.append("--student none")
        raise SpearError(
            f"no rate for {', '.join(missing)}{where}{have}: give "
            + ", ".join(ways[:-1])
            + f" or {ways[-1]}"
        )
    decode = found["decode"]
    if decode is None:  # unreachable: it is in `need`
        raise SpearError("no rate for decode")
    return Rates(
        wavlm=found["wavlm"],
        decode=decode,
        dasheng=found.get("dasheng"),
        mvq_wavlm=found["mvq.wavlm"],
        mvq_dasheng=found.get("mvq.dasheng"),
        tokenize_wavlm=found["tokenize.wavlm"],
        tokenize_dasheng=found.get("tokenize.dasheng"),
        token_bytes=found["token_bytes"],
        student=found.get(f"student.{choice.student}") if choice.student else None,
        notes=tuple(notes),
    )
