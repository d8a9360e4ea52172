"""The tokenize job: manifest -> decode -> teacher + MVQ encode -> token shards, exactly once.

Steps (the skeleton of ``pipeline/job.py``):
1. Plan, on the driver before any cluster work: read the finished manifest's job columns,
   keep the domains the configured teachers cover, sort by item id and cut into shards of at
   most ``items_per_shard`` items and ``max_shard_hours`` of audio. Load each teacher's
   quantiser header (its id, C, K) and the checkpoint digest. The run record (``spear/record.py``:
   these and the items' content digest) goes to ``_work/plan.json``; a re-run must record the
   same, or it is refused naming what differs.
2. Ray Data runs the unfinished shards, one dataset row each (the shard's item list, no
   audio) through autoscaling actor pools (``map_batches``; GPU when asked or present) whose
   actors decode the items they run on and run the teachers and their quantisers, so audio
   and float embeddings never enter the object store, only codes. :func:`tokenize_stages`
   picks the layout (``tokenize.fuse_teachers``): one pool of fused actors that decode each
   item once and run both teachers (``FusedTokenizeStage``) when the teachers ask the same
   per-actor resources, else one pool per teacher (``TokenizeStage``); both give the same
   codes and the report's per-teacher busy seconds. Then a Datasink whose write
   tasks build each shard's token and quarantine files and commit them
   (``spear/commit.py``). Token rows never reach the driver: it receives one small entry
   per shard.
3. At the end: ``index.parquet`` (one row per shard), ``report.json`` (counts, hours, the
   lineage's quarantine, per-stage throughput, a timeline, the slowest shards, config and
   versions) and ``_SUCCESS.json``, all from the shards' entries.

See ``docs/formats.md`` for the layout and ``docs/tokenize.md`` for running it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import platform
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from spear import __version__
from spear.configio import to_dict
from spear.credentials import redact
from spear.errors import SpearError
from spear.formats.manifest import read_manifest
from spear.pipeline.job import PROGRESS, ActorStage, UnitJob, run_units
from spear.quantizer.config import QuantizerEncodeConfig
from spear.ray_utils import RayConfig
from spear.record import items_record
from spear.shards.schema import (
    INDEX_FILE,
    REPORT_FILE,
    SUCCESS_FILE,
    TokenTeacherInfo,
    quarantine_path,
    token_path,
)
from spear.shards.writer import INPUT_COLUMNS, TokenShardWriter, write_index
from spear.stages.decode import PROVENANCE_COLUMNS, DecodeConfig
from spear.stages.teachers import TeacherConfig, check_quantizer_weights, checkpoint_sha256
from spear.stages.tokenize import (
    FusedTokenizeStage,
    TokenizeConfig,
    TokenizeStage,
    TokenizeTeacherConfig,
    teacher_info,
)
from spear.storage import StorageConfig, join, list_names, read_bytes, write_atomic
from spear.units import UNITS_PER_CALL, sorted_units

log = logging.getLogger(__name__)

SUCCESS, REPORT, INDEX = SUCCESS_FILE, REPORT_FILE, INDEX_FILE
RUN_COLUMNS = (*INPUT_COLUMNS, *PROVENANCE_COLUMNS)
"""What a unit carries: the shard's item columns and the provenance decode checks (``changed``)
and copies into the shard. The run record digests :data:`INPUT_COLUMNS` only: the manifest's
item id already follows the file's version."""
SLOWEST = 10


@dataclass(frozen=True)
class JobTeacher:
    """A teacher that runs in this job, resolved on the driver."""

    prefix: str
    config: TeacherConfig
    quantizer_url: str
    info: TokenTeacherInfo
    rrl: float | None
    """The quantiser's held-out relative reconstruction loss, as trained."""


@dataclass
class TokenizeSummary:
    out: str
    items: int = 0
    ok: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    hours_in: float = 0.0
    hours_out: float = 0.0
    shards: int = 0
    shards_done_before: int = 0
    token_bytes: int = 0
    wall_seconds: float = 0.0

    def line(self) -> str:
        q = sum(self.quarantined.values())
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.quarantined.items()))
        bps = self.token_bytes / (self.hours_out * 3600) if self.hours_out else 0.0
        return (
            f"tokenize: {self.items} items -> {self.ok} tokenized ({self.hours_out:.3f} h of "
            f"{self.hours_in:.3f} h), {q} quarantined{' (' + reasons + ')' if q else ''}; "
            f"{self.shards} shards ({self.shards_done_before} done before), "
            f"{self.token_bytes / 1e6:.2f} MB ({bps:.0f} B per audio second); "
            f"{self.wall_seconds:.1f} s -> {self.out} (report {join(self.out, REPORT)})"
        )


def resolve_teachers(
    teachers: dict[str, TeacherConfig],
    cfg: TokenizeConfig,
    storage: StorageConfig,
) -> list[JobTeacher]:
    """The teachers with a quantiser configured, checked against each other (driver side)."""
    from spear.stages.quantizers import load_quantizer

    out = []
    for prefix, tcfg in teachers.items():
        tok: TokenizeTeacherConfig = getattr(cfg, prefix)
        if tok.quantizer is None or not tok.domains:
            log.debug("tokenize: no %s tokens (no quantizer or no domains configured)", prefix)
            continue
        q = load_quantizer(tok.quantizer, storage)
        spec = tcfg.spec
        layer = tcfg.layer or spec.layer
        if q.dim != spec.dim:
            raise SpearError(
                f"tokenize.{prefix}.quantizer {tok.quantizer!r} is for {q.dim}-d embeddings; "
                f"teacher {spec.name} gives {spec.dim}-d"
            )
        if q.info.teacher and q.info.teacher != spec.name:
            raise SpearError(
                f"tokenize.{prefix}.quantizer {tok.quantizer!r} was trained on {q.info.teacher} "
                f"embeddings, not {spec.name}"
            )
        if q.info.layer not in (-1, layer):
            raise SpearError(
                f"tokenize.{prefix}.quantizer {tok.quantizer!r} was trained on layer "
                f"{q.info.layer}, the teacher outputs layer {layer}"
            )
        sha = checkpoint_sha256(tcfg, storage)
        check_quantizer_weights(f"tokenize.{prefix}.quantizer {tok.quantizer!r}", q.info, tcfg, sha)
        info = teacher_info(prefix, tcfg, q, tok.domains, sha)
        out.append(JobTeacher(prefix, tcfg, tok.quantizer, info, q.info.rrl))
    if not out:
        raise SpearError(
            "no teacher has a quantiser: set tokenize.wavlm.quantizer (--wavlm-quantizer) "
            "and/or tokenize.dasheng.quantizer (--dasheng-quantizer)"
        )
    return out


def _decides(
    teachers: list[JobTeacher],
    cfg: TokenizeConfig,
    decode: DecodeConfig,
    encode: QuantizerEncodeConfig,
) -> dict[str, Any]:
    """What changes which items go in which shard, or the codes an item gets. Speed settings
    (threads, batch sizes, actors) may change between runs."""
    return {
        "items_per_shard": cfg.items_per_shard,
        "max_shard_hours": cfg.max_shard_hours,
        "teachers": {
            t.prefix: asdict(t.info) | {"domains": list(t.info.domains), "dtype": t.config.dtype}
            for t in teachers
        },
        "refine_rounds": encode.refine_rounds,
        "decode": {
            k: getattr(decode, k)
            for k in ("sample_rate", "resampler", "min_seconds", "truncation_tolerance")
        },
    }


def fuse_teachers(job: list[JobTeacher], cfg: TokenizeConfig) -> bool:
    """Whether the job's teachers run fused in one actor pool (``tokenize.fuse_teachers``):
    ``auto`` fuses two or more teachers that ask for the same per-actor resources (device,
    GPU share, CPU share: one actor holds both models in one GPU share); ``true`` fuses and
    refuses teachers whose resources differ; ``false`` never fuses."""
    if cfg.fuse_teachers is False:
        return False
    asks = {(t.config.device, t.config.num_gpus, t.config.num_cpus) for t in job}
    if len(asks) > 1:
        if cfg.fuse_teachers is True:
            parts = ", ".join(
                f"{t.prefix} device={t.config.device} num_gpus={t.config.num_gpus:g} "
                f"num_cpus={t.config.num_cpus}"
                for t in job
            )
            raise SpearError(
                f"tokenize.fuse_teachers=true needs the teachers to ask for the same "
                f"resources per actor, they ask {parts}: set them equal, or "
                "tokenize.fuse_teachers=auto/false for one pool per teacher"
            )
        return False
    return cfg.fuse_teachers is True or len(job) > 1


def tokenize_stages(
    job: list[JobTeacher],
    cfg: TokenizeConfig,
    encode: QuantizerEncodeConfig,
    storage: StorageConfig,
) -> tuple[list[ActorStage], str]:
    """The job's actor pools and a line saying which layout runs: one
    :class:`FusedTokenizeStage` pool (each actor decodes a shard's items once and runs every
    teacher on its domains' items; ``max(num_actors)`` actors, each asking the teachers'
    common device, GPU and CPU share), or one :class:`TokenizeStage` pool per teacher (each
    actor decodes the items of its teacher's domains). Both give the same columns and codes."""

    def kwargs(t: JobTeacher, keep_audio: tuple[str, ...]) -> dict[str, Any]:
        return {
            "teacher": t.config,
            "quantizer_url": t.quantizer_url,
            "storage": storage.resolved(),
            "prefix": t.prefix,
            "domains": getattr(cfg, t.prefix).domains,
            "refine_rounds": encode.refine_rounds,
            "quantizer_id": t.info.quantizer_id,
            "keep_audio": keep_audio,
        }

    if not fuse_teachers(job, cfg):
        stages = [
            ActorStage(
                name=t.prefix,
                cls=TokenizeStage,
                # Each teacher's actors decode the items they run on: no audio leaves them.
                kwargs=kwargs(t, ()),
                decodes=tuple(t.info.domains),
                num_actors=t.config.num_actors,
                device=t.config.device,
                num_gpus=t.config.num_gpus,
                num_cpus=t.config.num_cpus,
            )
            for t in job
        ]
        return stages, "one actor pool per teacher"
    per_teacher = []
    for k, t in enumerate(job):
        # A teacher keeps the audio of the items a later teacher of the actor runs on.
        later = tuple(dict.fromkeys(d for u in job[k + 1 :] for d in u.info.domains))
        per_teacher.append(kwargs(t, later))
    first = job[0].config
    fused = ActorStage(
        name="+".join(t.prefix for t in job),
        cls=FusedTokenizeStage,
        kwargs={"stages": per_teacher},
        decodes=tuple(dict.fromkeys(d for t in job for d in t.info.domains)),
        num_actors=max(t.config.num_actors for t in job),
        device=first.device,
        num_gpus=first.num_gpus,
        num_cpus=first.num_cpus,
    )
    return [fused], "teachers fused, each item decoded once"


def run_tokenize(
    manifest: str,
    out: str,
    teachers: dict[str, TeacherConfig],
    cfg: TokenizeConfig,
    encode: QuantizerEncodeConfig,
    decode: DecodeConfig,
    storage: StorageConfig,
    ray_cfg: RayConfig,
) -> TokenizeSummary:
    """Tokenize (or resume tokenizing) every item of ``manifest`` into ``out``."""
    import time

    t0 = time.time()
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    table = read_manifest(manifest, storage, columns=list(RUN_COLUMNS))
    if table.num_rows == 0:
        raise SpearError(f"the manifest at {manifest!r} has no items")
    hours_in = float(pc.sum(table["duration"]).as_py()) / 3600
    job = resolve_teachers(teachers, cfg, storage)
    # Items of a domain no configured teacher covers are not part of this job (logged, counted).
    covered = sorted({d for t in job for d in t.info.domains})
    in_job = pc.is_in(table["domain"], pa.array(covered))
    skipped = table.num_rows - pc.sum(in_job).as_py()
    if skipped:
        log.warning(
            "tokenize: %d manifest items of domains outside %s are skipped", skipped, covered
        )
        table = table.filter(in_job)
        if table.num_rows == 0:
            raise SpearError(f"no manifest item is of the domains {covered} the teachers cover")
    table = sorted_units(
        table,
        items_per_unit=cfg.items_per_shard,
        max_unit_seconds=cfg.max_shard_hours * 3600 if cfg.max_shard_hours else None,
        what=f"the manifest at {manifest!r}",
    )
    record = items_record(
        "tokenize", table, INPUT_COLUMNS, _decides(job, cfg, decode, encode), {"manifest": manifest}
    )
    stages, layout = tokenize_stages(job, cfg, encode, storage)
    unit_job = UnitJob(
        kind="tokenize",
        out=out,
        unit_prefix="shard",
        columns=RUN_COLUMNS,
        outputs=lambda n: [quarantine_path(int(n[6:])), token_path(int(n[6:]))],
        actors=stages,
        layout=layout,
        writer=TokenShardWriter(tuple(t.info for t in job), record.run_id),
        decode=decode,
        progress_seconds=cfg.progress_seconds,
        max_units_per_call=UNITS_PER_CALL,
    )
    run = run_units(unit_job, record, table, storage, ray_cfg)
    del table
    summary = TokenizeSummary(out=out, shards=record.units or 0, shards_done_before=run.done_before)
    summary.hours_in = hours_in
    report = _finish(out, manifest, job, record.items or 0, run.entries, summary, storage)
    report["skipped_items"] = skipped
    report["timeline"], report["invocations"] = invocations_timeline(out, storage)
    if report["invocations"]:
        started = report["invocations"][0]["started"]  # the run began with its first invocation
    summary.wall_seconds = time.time() - t0
    report = {"started": started} | report
    report |= {
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "wall_seconds": round(summary.wall_seconds, 3),
        "config": {
            "tokenize": to_dict(cfg),
            "teachers": {t.prefix: to_dict(t.config) for t in job},
            "encode": to_dict(encode),
            "decode": to_dict(decode),
        },
        "versions": _versions(),
    }
    write_atomic(join(out, REPORT), json.dumps(redact(report), indent=1).encode(), storage)
    write_atomic(join(out, SUCCESS), json.dumps(asdict(summary), indent=1).encode(), storage)
    return summary


def invocations_timeline(
    out: str, storage: StorageConfig
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The report's timeline and invocations over every invocation of the run (each saved its
    own under ``_work/progress/``, a killed one up to its last save): laid end to end in time,
    counts running on from the earlier invocations' totals."""
    folder = join(out, PROGRESS)
    names = sorted(n for n in list_names(folder, storage) if n.endswith(".json"))
    marks: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    for k, name in enumerate(names):
        rec = json.loads(read_bytes(join(folder, name), storage))
        last = marks[-1] if marks else {}
        for m in rec["timeline"]:
            busy = Counter(last.get("stage_busy") or {})
            busy.update(m["stage_busy"])
            audio = Counter(last.get("stage_audio_seconds") or {})
            audio.update(m["stage_audio_seconds"])
            marks.append(
                m
                | {
                    "t": round(float(last.get("t", 0.0)) + m["t"], 3),
                    "items_done": int(last.get("items_done", 0)) + m["items_done"],
                    "hours_done": round(float(last.get("hours_done", 0.0)) + m["hours_done"], 6),
                    "shards_done": int(last.get("shards_done", 0)) + m["shards_done"],
                    "stage_busy": {s: round(v, 3) for s, v in busy.items()},
                    "stage_audio_seconds": {s: round(v, 3) for s, v in audio.items()},
                    "invocation": k,
                }
            )
        runs.append({key: rec[key] for key in ("started", "wall_seconds", "shards_done")})
    return marks, runs


def _manifest_quarantine(manifest: str, storage: StorageConfig) -> dict[str, int]:
    """Reasons and counts of the files the manifest run itself quarantined."""
    try:
        done = json.loads(read_bytes(join(manifest, SUCCESS), storage))
    except (FileNotFoundError, ValueError):
        return {}
    return {str(k): int(v) for k, v in (done.get("quarantined") or {}).items()}


def _finish(
    out: str,
    manifest: str,
    job: list[JobTeacher],
    planned_items: int,
    entries: list[dict[str, Any]],
    summary: TokenizeSummary,
    storage: StorageConfig,
) -> dict[str, Any]:
    """Index, counts and the report over every shard's entry, earlier runs' included."""
    index = write_index(out, entries, storage)

    summary.ok = sum(int(e["rows"]) for e in entries)
    summary.items = sum(int(e["rows"]) + int(e["quarantined"]) for e in entries)
    if summary.items != planned_items:
        raise SpearError(
            f"{out!r} holds {summary.items} items, the plan has {planned_items}: the output was "
            "changed by hand; re-run into another --out"
        )
    reasons: Counter[str] = Counter()
    by_stage: dict[str, Counter[str]] = defaultdict(Counter)
    hours_domain: Counter[str] = Counter()
    hours_source: Counter[str] = Counter()
    busy: Counter[str] = Counter()
    audio: Counter[str] = Counter()
    for e in entries:
        for stage, counts in e["quarantine_by_stage"].items():
            reasons.update(counts)
            by_stage[stage].update(counts)
        hours_domain.update(e["hours_by_domain"])
        hours_source.update(e["hours_by_source"])
        busy.update(e.get("stage_busy", {}))
        audio.update(e.get("stage_audio_seconds", {}))
    manifest_q = _manifest_quarantine(manifest, storage)
    summary.quarantined = dict(reasons)
    summary.hours_out = sum(float(e["audio_seconds"]) for e in entries) / 3600
    summary.token_bytes = int(pc.sum(index["bytes"]).as_py() or 0)
    stages = {
        name: {
            "busy_seconds": round(b, 3),
            "rate_x_realtime": round(audio[name] / b, 1) if b else None,
        }
        for name, b in busy.items()
    }
    slowest = sorted(entries, key=lambda e: -sum(e.get("stage_busy", {}).values()))[:SLOWEST]
    teachers = [
        asdict(t.info)
        | {"domains": list(t.info.domains), "rrl": t.rrl}
        | {"weights": t.info.checkpoint_sha256 or "random"}
        for t in job
    ]
    return {
        "kind": "tokenize",
        "out": out,
        "manifest": manifest,
        "items": summary.items,
        "ok": summary.ok,
        "quarantined": summary.quarantined,
        "quarantine_by_stage": {"manifest": manifest_q} | {k: dict(v) for k, v in by_stage.items()},
        "quarantined_in_lineage": sum(manifest_q.values()) + sum(reasons.values()),
        "hours_in": summary.hours_in,
        "hours_out": summary.hours_out,
        "hours_by_domain": dict(sorted(hours_domain.items())),
        "hours_by_source": dict(sorted(hours_source.items())),
        "shards": summary.shards,
        "shards_done_before": summary.shards_done_before,
        "token_bytes": summary.token_bytes,
        "bytes_per_audio_second": (
            summary.token_bytes / (summary.hours_out * 3600) if summary.hours_out else None
        ),
        "teachers": teachers,
        "stages": stages,
        "slowest_shards": [
            {
                "shard": int(e["unit"]),
                "seconds": round(sum(e.get("stage_busy", {}).values()), 3),
                "items": int(e["items"]),
                "audio_seconds": round(float(e["audio_seconds"]), 3),
            }
            for e in slowest
        ],
    }


def _versions() -> dict[str, str]:
    import pyarrow
    import ray
    import torch

    return {
        "spear": __version__,
        "ray": ray.__version__,
        "torch": torch.__version__,
        "pyarrow": pyarrow.__version__,
        "python": platform.python_version(),
    }
