"""Run planning: GPU-hours, wall time, CPU cores, bytes, objects and cost of a run.

A pure core (:func:`plan_run`) turns a run's size (:class:`RunSpec`) and a set of measured
rates (:class:`spear.rates.Rates`; the rates files and how they are chosen are described in
``spear/rates.py``) into a :class:`Plan`; the CLI (``spear plan``) only parses options.

The model (one line per figure; ``A`` = audio seconds in the run, ``a`` = audio-domain share)::

    GPU-seconds       = A / r_wavlm + a A / r_dasheng     # WavLM on every item, Dasheng on audio
    wall (GPU-bound)  = GPU-seconds / gpus
    CPU cores to feed = A / wall / r_decode               # decode keeps pace with the GPUs
    wall (CPU-bound)  = A / (cpus r_decode)               # when --cpus says what there is
    object store      = output B/s x A                    # codes, the fused actor -> commit
    driver cores      = carrying + shards / wall x (s per call / units per call + s per unit)
    output            = A x (800 + 200 a) B/s             # 16 x 50 + 8 x 25 Hz codes, or measured
    source read       = A x source B/s                    # or the manifest's segment byte shares
    student GPU-s     = A x epochs / r_student            # per GPU; wall = that / train GPUs
    cost              = price x (gpus x wall + train GPUs x student wall)   # GPUs held, in hours

``r_teacher`` is the actor rate: the fused tokenize figure when measured (``tokenize.wavlm``),
else the teacher and its MVQ encode in series (``1 / (1/r_teacher + 1/r_mvq)``). Audio never
enters the object store (the teacher actors decode the items they run on); what does is each
unit's item list and the codes, once: the plan assumes tokenize's default layout, both teachers
in one fused actor (one pool per teacher, ``tokenize.fuse_teachers: false``, hands the codes on
once per teacher, up to twice the bytes). The run takes the larger wall time; the figure behind
it is the run's *limit*. The driver line is what the driver carries plus the shards per second
the run commits times the driver's CPU per shard: Ray Data's cost per actor call, shared by the
shards of a call (``spear.units.units_per_call`` with one actor per GPU), and each shard's
entry (:data:`DRIVER_SECONDS_PER_CALL`, measured by ``benchmarks/scale.py``).

Object counts: items are ``A (1 - a) / speech item seconds + a A / 10 s`` (SPEC section 5's
audio windows) unless a manifest is given; files listed are the items (one item per file)
unless ``file_seconds`` is set; token shards hold at most ``items_per_shard`` items and
``max_shard_hours`` hours (the tokenize job's cut, exact with a manifest). Each shard leaves 3
storage objects (token file, quarantine file, commit entry; a run adds index, report, plan and
``_SUCCESS.json``); each actor call (``units per call`` shards) passes through Ray's object store
as 3 objects (its units' rows, the fused actor's output, the write task's entries).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from spear.errors import SpearError
from spear.rates import Rates
from spear.stages.tokenize import TokenizeConfig
from spear.units import UNITS_PER_CALL, units_per_call

DRIVER_SECONDS_PER_CALL = 0.0113
"""Driver CPU per actor call on Ray Data, net of carrying (scheduling a call, submitting its
task and its write task, taking their outputs), whatever the units in it."""
DRIVER_SECONDS_PER_UNIT = 0.0016
"""Driver CPU per committed unit beyond its call's (its entry: progress, the report)."""
DRIVER_CARRYING_CORES = 0.04
"""Driver CPU per second while it carries a 512-GPU cluster's calls in flight and 20,000
queued shards, none finishing. The three from ``benchmarks/scale.py --part driver`` at a
simulated 512 GPUs, one pool (the fused default): 13.0 ms per shard net of carrying at one
shard per call and 3.1 ms at 8 give the per-call and per-unit figures; carrying measured
0.007-0.04 core in two runs, the larger kept (docs/tokenize.md)."""


def driver_seconds_per_shard(per_call: int) -> float:
    """The driver's CPU per committed shard at ``per_call`` shards per actor call."""
    return DRIVER_SECONDS_PER_CALL / per_call + DRIVER_SECONDS_PER_UNIT


WAVLM_BYTES_PER_SECOND = 800
"""16 codebooks x 50 Hz x 1 byte (SPEC section 3)."""
DASHENG_BYTES_PER_SECOND = 200
"""8 codebooks x 25 Hz x 1 byte (SPEC section 3)."""
TOKEN_BOUND_BYTES_PER_SECOND = WAVLM_BYTES_PER_SECOND + DASHENG_BYTES_PER_SECOND
"""Both teachers on every second: SPEC section 3's 1,000 B/s."""
PAPER_AUDIO_FRACTION = 13.0 / 197.0
"""SPEC section 5: 13k of 197k hours are general audio (Dasheng runs on those)."""
FLAC_16K_BYTES_PER_SECOND = 16_000
"""16 kHz 16-bit mono FLAC: about half of its 32 kB/s PCM (speech compresses ~2x)."""
AUDIO_ITEM_SECONDS = 10.0
"""SPEC section 5: audio files are cut into 10 s windows."""
SPEECH_ITEM_SECONDS = 20.0
"""Assumed mean speech item: segments of at most 30 s (SPEC section 5), most files longer."""
STORAGE_OBJECTS_PER_SHARD = 3
"""Token file, quarantine file, commit entry (``spear/commit.py``)."""
STORAGE_OBJECTS_PER_RUN = 4
"""``index.parquet``, ``report.json``, ``_work/plan.json``, ``_SUCCESS.json``."""
_TOKENIZE = TokenizeConfig()


@dataclass(frozen=True, kw_only=True)
class ManifestFacts:
    """What a finished manifest says about a run (:func:`manifest_facts`)."""

    items: int
    files: int
    """Distinct source files (URLs)."""
    hours: float
    audio_hours: float
    """Hours of audio-domain items."""
    source_bytes: float
    """Bytes decode reads: each item's share of its file's size (range reads)."""
    file_bytes: float
    """All the files' sizes (a whole-file reader's bytes)."""
    shards: int
    """Token shards, cut as ``spear tokenize`` cuts them."""


def manifest_facts(
    table: Any, *, items_per_shard: int, max_shard_hours: float | None
) -> ManifestFacts:
    """Facts of a manifest table (columns ``item_id``, ``url``, ``domain``, ``duration``,
    ``file_duration``, ``file_size``)."""
    import numpy as np

    from spear.units import cut_units

    if table.num_rows == 0:
        raise SpearError("the manifest has no items")
    dur = table["duration"].to_numpy()
    fdur = table["file_duration"].to_numpy()
    size = table["file_size"].to_numpy().astype(np.float64)
    share = np.where(fdur > 0, np.minimum(dur / np.where(fdur > 0, fdur, 1.0), 1.0), 1.0)
    urls = table["url"].to_numpy(zero_copy_only=False)
    _, first = np.unique(urls, return_index=True)
    audio = np.asarray(table["domain"].to_numpy(zero_copy_only=False) == "audio")
    cut = cut_units(
        table.select(["item_id", "duration"]).sort_by("item_id"),
        items_per_unit=items_per_shard,
        max_unit_seconds=max_shard_hours * 3600 if max_shard_hours else None,
    )
    return ManifestFacts(
        items=table.num_rows,
        files=len(first),
        hours=float(dur.sum()) / 3600,
        audio_hours=float(dur[audio].sum()) / 3600,
        source_bytes=float((size * share).sum()),
        file_bytes=float(size[first].sum()),
        shards=int(cut["unit"].to_numpy().max()) + 1,
    )


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
    epochs: float = 1.0
    """Passes of student training over the hours."""
    train_gpus: int | None = None
    """GPUs the student trains on (default ``gpus``)."""
    cost_per_gpu_hour: float | None = None
    """Price of one GPU for an hour (None: no cost lines)."""
    source_bytes_per_second: float = FLAC_16K_BYTES_PER_SECOND
    """Source-file bytes per audio second (ignored with a manifest: its file sizes count)."""
    speech_item_seconds: float = SPEECH_ITEM_SECONDS
    """Mean speech item length, for the counts without a manifest."""
    file_seconds: float | None = None
    """Mean source file length, for files listed without a manifest (None: one item a file)."""
    items_per_shard: int = _TOKENIZE.items_per_shard
    """``tokenize.items_per_shard``."""
    max_shard_hours: float | None = _TOKENIZE.max_shard_hours
    """``tokenize.max_shard_hours``."""
    manifest: ManifestFacts | None = None
    """A finished manifest's facts: exact counts and bytes instead of estimates."""

    def __post_init__(self) -> None:
        if self.hours <= 0:
            raise SpearError(f"--hours must be positive, got {self.hours}")
        if self.gpus < 1:
            raise SpearError(f"--gpus must be at least 1, got {self.gpus}")
        if self.cpus is not None and self.cpus < 1:
            raise SpearError(f"--cpus must be at least 1, got {self.cpus}")
        if not 0.0 <= self.audio_fraction <= 1.0:
            raise SpearError(f"--audio-fraction must be in [0, 1], got {self.audio_fraction}")
        if self.epochs <= 0:
            raise SpearError(f"--epochs must be positive, got {self.epochs}")
        if self.train_gpus is not None and self.train_gpus < 1:
            raise SpearError(f"--train-gpus must be at least 1, got {self.train_gpus}")
        if self.cost_per_gpu_hour is not None and self.cost_per_gpu_hour < 0:
            raise SpearError(f"--cost-per-gpu-hour must be >= 0, got {self.cost_per_gpu_hour}")
        for name in ("source_bytes_per_second", "speech_item_seconds"):
            if getattr(self, name) <= 0:
                raise SpearError(f"--{name.replace('_', '-')} must be positive")
        if self.file_seconds is not None and self.file_seconds <= 0:
            raise SpearError(f"--file-seconds must be positive, got {self.file_seconds}")
        if self.items_per_shard < 1:
            raise SpearError(f"--items-per-shard must be at least 1, got {self.items_per_shard}")
        if self.max_shard_hours is not None and self.max_shard_hours <= 0:
            raise SpearError(f"--max-shard-hours must be positive, got {self.max_shard_hours}")


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What a run costs. Seconds, bytes and counts; :meth:`table` formats them."""

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
    driver_cores: float
    """The driver's CPU while the run lasts: carrying, plus shards per second x its CPU per
    shard."""
    units_per_call: int
    """Shards per actor call, as the job chooses them for this run on ``spec.gpus`` actors."""
    output_bytes: float
    output_bytes_per_audio_second: float
    output_bound_bytes: float
    """SPEC section 3's bound: 1,000 B per second of audio."""
    source_bytes: float
    """Source-file bytes decode reads."""
    items: int
    files: int
    shards: int
    storage_objects: int
    """Objects the tokenize job leaves in object storage."""
    object_store_objects: int
    """Objects the shards pass through Ray's object store as, over the run (3 per call)."""
    counts_from: str
    """``manifest`` or ``estimate``."""
    train_gpus: int
    student_gpu_seconds: float | None
    student_wall_seconds: float | None
    tokenize_cost: float | None
    student_cost: float | None
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

    def _rate_rows(self, family: str) -> list[tuple[str, str, str]]:
        r = self.rates
        actor = getattr(r, f"tokenize_{family}")
        teacher, mvq = getattr(r, family), getattr(r, f"mvq_{family}")
        rate = self.wavlm_rate if family == "wavlm" else self.dasheng_rate
        rows: list[tuple[str, str, str]] = []
        if actor is not None:
            rows.append((f"{family} actor", f"{rate:,.1f}x real time / GPU", actor.describe()))
            if teacher is not None:
                rows.append(("  (teacher)", f"{teacher.value:,.1f}x", teacher.describe()))
            if mvq is not None:
                note = mvq.describe()
                if teacher is not None:
                    note += f"; in series {_series(teacher.value, mvq.value):,.1f}x"
                rows.append(("  (mvq)", f"{mvq.value:,.1f}x", note))
            return rows
        where = teacher.describe() if teacher is not None else ""
        rows.append((f"{family} rate", f"{rate:,.1f}x real time / GPU", where))
        if mvq is not None:
            rows.append((f"  (mvq.{family})", f"{mvq.value:,.1f}x", mvq.describe()))
        return rows

    def _count_rows(self) -> list[tuple[str, str, str]]:
        s = self.spec
        if self.counts_from == "estimate":
            items = (
                f"estimate: speech {s.speech_item_seconds:g} s, audio {AUDIO_ITEM_SECONDS:g} s "
                "an item (--manifest counts them)"
            )
            files = (
                "one item per file (--file-seconds)"
                if s.file_seconds is None
                else f"{s.file_seconds:g} s a file"
            )
        else:
            items = files = "manifest"
        limit = f"at most {s.items_per_shard:,} items"
        if s.max_shard_hours:
            limit += f" and {s.max_shard_hours:g} h"
        return [
            ("items", f"{self.items:,}", items),
            ("files listed", f"{self.files:,}", files),
            ("shards", f"{self.shards:,}", limit + " each"),
            (
                "storage objects",
                f"{self.storage_objects:,}",
                f"{STORAGE_OBJECTS_PER_SHARD} per shard + {STORAGE_OBJECTS_PER_RUN} per run",
            ),
            (
                "object store objs",
                f"{self.object_store_objects:,}",
                f"3 per actor call of {self.units_per_call} shards: units, codes, entries",
            ),
        ]

    def _student_rows(self) -> list[tuple[str, str, str]]:
        s, r = self.spec, self.rates.student
        if r is None or self.student_gpu_seconds is None or self.student_wall_seconds is None:
            return []
        preset = r.name.split(".", 1)[1]
        return [
            (f"student {preset}", f"{r.value:,.1f}x real time / GPU", r.describe()),
            (
                "student GPU-hours",
                f"{self.student_gpu_seconds / 3600:,.1f}",
                f"{s.hours:,.0f} h x {s.epochs:g} epoch(s)",
            ),
            ("student wall", _duration(self.student_wall_seconds), f"on {self.train_gpus} GPUs"),
        ]

    def _cost_rows(self) -> list[tuple[str, str, str]]:
        s = self.spec
        if self.tokenize_cost is None or s.cost_per_gpu_hour is None:
            return []
        price = f"{s.cost_per_gpu_hour:g} per GPU-hour"
        rows = [
            (
                "cost (tokenize)",
                f"{self.tokenize_cost:,.2f}",
                f"{s.gpus} GPUs x {self.wall_hours:,.1f} h x {price}",
            )
        ]
        if self.student_cost is not None and self.student_wall_seconds is not None:
            rows += [
                (
                    "cost (student)",
                    f"{self.student_cost:,.2f}",
                    f"{self.train_gpus} GPUs x {self.student_wall_seconds / 3600:,.1f} h",
                ),
                (
                    "cost (total)",
                    f"{self.tokenize_cost + self.student_cost:,.2f}",
                    "GPUs held for the wall times",
                ),
            ]
        return rows

    def table(self) -> str:
        """The plan as aligned text lines, one figure per line."""
        s, r = self.spec, self.rates
        if self.counts_from == "estimate":
            src = f"{s.source_bytes_per_second:,.0f} B/s of audio (--source-bytes-per-second)"
        else:
            src = "the items' shares of the manifest's file sizes"
        audio = f"{s.hours:,.0f} h ({s.audio_fraction:.1%} audio domain)"
        rows = [("audio", audio, "manifest" if s.manifest else ""), *self._rate_rows("wavlm")]
        if self.dasheng_rate is not None:
            rows += self._rate_rows("dasheng")
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
                "source read",
                _bytes(self.source_bytes),
                f"{src}; {_bytes(self.source_bytes / self.wall_seconds)}/s",
            ),
            (
                "object store",
                _bytes(self.object_store_bytes),
                f"{_bytes(self.object_store_bytes_per_second)}/s codes, fused actor -> "
                "commit (audio stays in the actors)",
            ),
            (
                "driver",
                f"{self.driver_cores:,.2f} core",
                f"{self.shards / self.wall_seconds:,.2f} shards/s x "
                f"{driver_seconds_per_shard(self.units_per_call) * 1e3:.1f} ms per shard "
                f"({self.units_per_call} per actor call) + carrying",
            ),
            (
                "token shards",
                _bytes(self.output_bytes),
                f"{self.output_bytes_per_audio_second:,.0f} B/s of audio"
                + (f" ({r.token_bytes.describe()})" if r.token_bytes else "")
                + f"; bound {_bytes(self.output_bound_bytes)} at 1,000 B/s",
            ),
            *self._count_rows(),
            *self._student_rows(),
            *self._cost_rows(),
        ]
        width = max(len(k) for k, _, _ in rows) + 2
        vwidth = max(len(v) for _, v, _ in rows) + 2
        lines = [f"{k:<{width}}{v:<{vwidth}}{note}".rstrip() for k, v, note in rows]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _series(teacher: float, mvq: float | None) -> float:
    """Two stages in one actor, one after the other: the combined x-real-time rate."""
    return teacher if mvq is None else 1.0 / (1.0 / teacher + 1.0 / mvq)


def _actor_rate(rates: Rates, family: str) -> float:
    fused = getattr(rates, f"tokenize_{family}")
    if fused is not None:
        return float(fused.value)
    teacher, mvq = getattr(rates, family), getattr(rates, f"mvq_{family}")
    if teacher is None:
        raise SpearError(f"no {family} rate: give --{family}-rate or a rates file with one")
    return _series(teacher.value, mvq.value if mvq else None)


def _counts(spec: RunSpec, audio_s: float, audio_frac: float) -> tuple[int, int, int, float]:
    """(items, files, shards, source bytes) estimated from the hours."""
    items = math.ceil(
        audio_s * (1 - audio_frac) / spec.speech_item_seconds
        + audio_s * audio_frac / AUDIO_ITEM_SECONDS
    )
    files = items if spec.file_seconds is None else math.ceil(audio_s / spec.file_seconds)
    shards = math.ceil(items / spec.items_per_shard)
    if spec.max_shard_hours:
        shards = max(shards, math.ceil(audio_s / (spec.max_shard_hours * 3600)))
    return items, files, shards, audio_s * spec.source_bytes_per_second


def plan_run(spec: RunSpec, rates: Rates) -> Plan:
    """The pure planning core; see the module docstring for the formulas."""
    for r in rates.used():
        if r.value <= 0:
            raise SpearError(f"rate {r.name} must be positive, got {r.value} ({r.describe()})")
    notes: list[str] = list(rates.notes)
    audio_s = spec.hours * 3600.0
    audio_frac = spec.audio_fraction if spec.dasheng else 0.0
    wavlm_rate = _actor_rate(rates, "wavlm")
    wavlm_gpu = audio_s / wavlm_rate
    dasheng_rate: float | None = None
    dasheng_gpu = 0.0
    if audio_frac > 0:
        dasheng_rate = _actor_rate(rates, "dasheng")
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
    devices = sorted({r.device for r in rates.used() if r.device and r.name != "token_bytes"})
    if len(devices) > 1:
        notes.append(f"rates come from different devices: {'; '.join(devices)}")
    gpu_side = [r for r in rates.used() if r.unit.endswith("/gpu")]
    if any(r.device.startswith("CPU") for r in gpu_side):
        notes.append(
            "CPU figures among the actor and student rates: there 'GPU' means one "
            "process with the threads its device names"
        )
    if any(r.source.startswith("arithmetic") for r in rates.used()):
        notes.append(
            "arithmetic rates are SPEC section 6's FLOP counts at an assumed MFU, "
            "not measurements; they leave out the MVQ encode unless it is given"
        )
    if rates.token_bytes is not None:
        per_s = rates.token_bytes.value
    else:
        per_s = WAVLM_BYTES_PER_SECOND + DASHENG_BYTES_PER_SECOND * audio_frac
    m = spec.manifest
    if m is None:
        items, files, shards, source = _counts(spec, audio_s, audio_frac)
    else:
        items, files, shards, source = m.items, m.files, m.shards, m.source_bytes
    store = per_s * audio_s  # the fused actor's output carries every teacher's codes
    per_call = units_per_call(shards, spec.gpus, most=UNITS_PER_CALL)
    driver = DRIVER_CARRYING_CORES + shards / wall * driver_seconds_per_shard(per_call)
    if driver > 0.5:
        notes.append(
            f"the driver needs {driver:.1f} cores to commit {shards / wall:.1f} shards/s: raise "
            "tokenize.max_shard_hours (and items_per_shard) for fewer, larger shards"
        )
    train_gpus = spec.train_gpus or spec.gpus
    student_gpu = student_wall = None
    if rates.student is not None:
        student_gpu = audio_s * spec.epochs / rates.student.value
        student_wall = student_gpu / train_gpus
    price = spec.cost_per_gpu_hour
    tok_cost = None if price is None else price * spec.gpus * wall / 3600
    stu_cost = (
        None if price is None or student_wall is None else price * train_gpus * student_wall / 3600
    )
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
        driver_cores=driver,
        units_per_call=per_call,
        output_bytes=per_s * audio_s,
        output_bytes_per_audio_second=per_s,
        output_bound_bytes=TOKEN_BOUND_BYTES_PER_SECOND * audio_s,
        source_bytes=source,
        items=items,
        files=files,
        shards=shards,
        storage_objects=STORAGE_OBJECTS_PER_SHARD * shards + STORAGE_OBJECTS_PER_RUN,
        object_store_objects=3 * -(-shards // per_call),
        counts_from="estimate" if m is None else "manifest",
        train_gpus=train_gpus,
        student_gpu_seconds=student_gpu,
        student_wall_seconds=student_wall,
        tokenize_cost=tok_cost,
        student_cost=stu_cost,
        notes=notes,
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
