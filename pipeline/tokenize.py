"""The tokenize job: manifest -> decode -> teacher + MVQ encode -> token shards, exactly once.

Steps:
1. Plan (driver, before any cluster work): read the finished manifest, sort its items by id and
   cut them into shards of ``items_per_shard``; load each configured teacher's quantiser header
   (its id, C, K) and the checkpoint digest. The plan goes to ``_work/plan.json``; a later run
   against the same ``--out`` must produce the same plan, or it is refused (no mixed tokens).
2. Stream the items of unfinished shards through decode (CPU tasks, int16 audio) and one actor
   pool per teacher (GPU when the cluster has one). Each teacher's quantiser runs inside its
   actor, so float embeddings never enter the object store.
3. The driver gathers rows by shard, keyed by item id (a retried task cannot double a row), and
   writes a shard as soon as all its items are back: ``quarantine/shard-N``, then
   ``_work/shards/shard-N.json`` (rows, bytes, sha256), then ``tokens/shard-N``, the commit
   marker. Every write is atomic, so readers never see a partial file and a killed run redoes
   exactly the shards without a token file.
4. At the end: ``index.parquet`` (one row per shard), ``report.json`` (counts, hours, per-stage
   throughput, a progress timeline, config and versions) and ``_SUCCESS.json``.

See ``docs/formats.md`` for the layout and ``docs/tokenize.md`` for running it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import platform
import posixpath
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spear import __version__
from spear.config import to_dict
from spear.errors import SpearError
from spear.formats import (
    QUARANTINE_SCHEMA,
    SAMPLE_RATE,
    TOKEN_INDEX_SCHEMA,
    TOKEN_INDEX_VERSION,
    TokenTeacherInfo,
    parquet_bytes,
    quarantine_row,
    quarantine_table,
    token_shard_metadata,
    with_metadata,
)
from spear.pipeline.manifest import read_manifest
from spear.pipeline.parts import gather_parts, part_counts
from spear.quantizer.config import QuantizerEncodeConfig
from spear.ray_utils import RayConfig, dataset_from_table, init_ray
from spear.stages.decode import DecodeConfig, decode_batch
from spear.stages.teachers import TeacherConfig, checkpoint_sha256
from spear.stages.tokenize import (
    NOT_RUN,
    TokenizeConfig,
    TokenizeStage,
    TokenizeTeacherConfig,
    teacher_info,
    tokenize_map_kwargs,
)
from spear.storage import StorageConfig, exists, filesystem, join, read_bytes, write_atomic

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS.json"
REPORT = "report.json"
INDEX = "index.parquet"
RUN_COLUMNS = ("item_id", "source", "domain", "url", "start", "duration")


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
            f"{self.wall_seconds:.1f} s -> {join(self.out, 'tokens')}, report "
            f"{join(self.out, REPORT)}"
        )


def resolve_teachers(
    teachers: dict[str, TeacherConfig],
    cfg: TokenizeConfig,
    storage: StorageConfig,
) -> list[JobTeacher]:
    """The teachers with a quantiser configured, checked against each other (driver side)."""
    from spear.checkpoints import load_quantizer

    out = []
    for prefix, tcfg in teachers.items():
        tok: TokenizeTeacherConfig = getattr(cfg, prefix)
        if tok.quantizer is None or not tok.domains:
            log.warning("tokenize: no %s tokens (no quantizer or no domains configured)", prefix)
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
        info = teacher_info(prefix, tcfg, q, tok.domains, sha)
        out.append(JobTeacher(prefix, tcfg, tok.quantizer, info, q.info.rrl))
    if not out:
        raise SpearError(
            "no teacher has a quantiser: set tokenize.wavlm.quantizer (--wavlm-quantizer) "
            "and/or tokenize.dasheng.quantizer (--dasheng-quantizer)"
        )
    return out


def _plan(
    manifest: str,
    items: int,
    teachers: list[JobTeacher],
    cfg: TokenizeConfig,
    decode: DecodeConfig,
    encode: QuantizerEncodeConfig,
) -> dict[str, Any]:
    """What a resumed run must agree on: everything that changes which items go in which
    shard, or the codes an item gets. Speed settings (threads, batch sizes, actors) may change."""
    return {
        "manifest": manifest,
        "items": items,
        "items_per_shard": cfg.items_per_shard,
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


def _plan_diff(old: dict[str, Any], new: dict[str, Any], path: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    diffs = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        where = f"{path}.{k}" if path else k
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _plan_diff(a, b, where)
        elif a != b:
            diffs.append(f"{where}: {a!r} there, {b!r} now")
    return diffs


def _shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.parquet"


class _Progress:
    """Counts, the timeline for the report, periodic log lines and Ray metrics."""

    def __init__(self, total_items: int, total_hours: float, every: float, stages: list[str]):
        from ray.util.metrics import Counter as RayCounter

        self.t0 = time.time()
        self.total_items, self.total_hours, self.every = total_items, total_hours, every
        self.items = 0
        self.hours = 0.0
        self.shards = 0
        self.busy = dict.fromkeys(stages, 0.0)
        self.stage_items = dict.fromkeys(stages, 0)
        self.stage_seconds = dict.fromkeys(stages, 0.0)
        self.timeline: list[dict[str, Any]] = []
        self.last = self.t0
        self.m_hours = RayCounter("spear_tokenize_hours", "Audio hours tokenized")
        self.m_items = RayCounter("spear_tokenize_items", "Items tokenized")
        self.m_quarantined = RayCounter(
            "spear_tokenize_quarantined", "Items quarantined", tag_keys=("reason",)
        )

    def add(self, batch: dict[str, Any], prefixes: list[str]) -> None:
        n = len(batch["item_id"])
        secs = np.asarray(batch["num_samples"], dtype=np.float64) / SAMPLE_RATE
        err = [str(e) for e in batch["error_type"]]
        ok = np.array([e == "" for e in err])
        hours = float(secs[ok].sum()) / 3600
        self.items += n
        self.hours += hours
        self.busy["decode"] += float(np.sum(batch["decode_seconds"]))
        self.stage_items["decode"] += n
        self.stage_seconds["decode"] += float(secs.sum())
        for p in prefixes:
            self.busy[p] += float(np.sum(batch[f"{p}_seconds"]))
            ran = np.asarray(batch[f"{p}_frames"]) != NOT_RUN
            self.stage_items[p] += int(ran.sum())
            self.stage_seconds[p] += float(secs[ran].sum())
        self.m_items.inc(int(ok.sum()))
        if hours:
            self.m_hours.inc(hours)
        for reason, count in Counter(e for e in err if e).items():
            self.m_quarantined.inc(count, tags={"reason": reason})
        now = time.time()
        if now - self.last >= self.every:
            self.last = now
            self.mark()
            log.warning(self.line())

    def mark(self, min_gap: float = 0.0) -> None:
        """A timeline point for the report (skipped if the last one is under ``min_gap`` s old)."""
        if self.timeline and time.time() - self.t0 - self.timeline[-1]["t"] < min_gap:
            return
        self.timeline.append(
            {
                "t": round(time.time() - self.t0, 3),
                "items_done": self.items,
                "hours_done": round(self.hours, 6),
                "shards_done": self.shards,
                "stage_busy": {k: round(v, 3) for k, v in self.busy.items()},
            }
        )

    def line(self) -> str:
        el = time.time() - self.t0
        rate = self.hours * 3600 / el if el else 0.0
        left = max(self.total_hours - self.hours, 0.0)
        eta = left * 3600 / rate if rate else float("inf")
        pct = 100 * self.items / self.total_items if self.total_items else 100.0
        return (
            f"tokenize: {self.items}/{self.total_items} items ({pct:.0f}%), "
            f"{self.hours:.3f}/{self.total_hours:.3f} h, {self.shards} shards written, "
            f"{rate:.1f}x real time, ETA {_fmt_seconds(eta)}"
        )


def _fmt_seconds(s: float) -> str:
    if s == float("inf"):
        return "?"
    return str(dt.timedelta(seconds=round(s)))


def _decode_timed(
    batch: dict[str, np.ndarray], cfg: DecodeConfig, storage: StorageConfig
) -> dict[str, np.ndarray]:
    t0 = time.perf_counter()
    out = decode_batch(batch, cfg, storage)
    n = len(out["item_id"])
    out["decode_seconds"] = np.full(n, (time.perf_counter() - t0) / max(n, 1))
    return out


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
    t0 = time.time()
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    # Only the columns the job needs: the manifest is held on the driver for the whole run.
    table = read_manifest(manifest, storage).select([*RUN_COLUMNS])
    if table.num_rows == 0:
        raise SpearError(f"the manifest at {manifest!r} has no items")
    hours_in = float(pa.compute.sum(table["duration"]).as_py()) / 3600
    if pa.compute.count_distinct(table["item_id"]).as_py() != table.num_rows:
        raise SpearError(f"the manifest at {manifest!r} repeats item ids")
    job = resolve_teachers(teachers, cfg, storage)
    prefixes = [t.prefix for t in job]
    # Items of a domain no configured teacher covers are not part of this job (logged, counted).
    covered = sorted({d for t in job for d in t.info.domains})
    in_job = pa.compute.is_in(table["domain"], pa.array(covered))
    skipped = table.num_rows - pa.compute.sum(in_job).as_py()
    if skipped:
        log.warning("tokenize: %d manifest items of domains outside %s are skipped", skipped,
                    covered)  # fmt: skip
        table = table.filter(in_job)
        if table.num_rows == 0:
            raise SpearError(f"no manifest item is of the domains {covered} the teachers cover")
    table = table.sort_by("item_id")
    shard_of = np.arange(table.num_rows) // cfg.items_per_shard
    table = table.append_column("shard", pa.array(shard_of, type=pa.int32()))
    num_shards = int(shard_of[-1]) + 1

    plan = _plan(manifest, table.num_rows, job, cfg, decode, encode)
    done = _finished_shards(out, storage)
    plan_url = join(out, "_work/plan.json")
    if exists(plan_url, storage) and done:
        diffs = _plan_diff(json.loads(read_bytes(plan_url, storage)), plan)
        if diffs:
            raise SpearError(
                f"{out!r} holds tokens of another run ({'; '.join(diffs[:3])}"
                f"{'; ...' if len(diffs) > 3 else ''}); use another --out"
            )
    elif done:
        raise SpearError(
            f"{out!r} holds token shards but no _work/plan.json: cannot tell which teachers "
            "and quantisers made them; use another --out"
        )
    else:  # nothing committed yet: a corrected retry may change the plan
        write_atomic(plan_url, json.dumps(plan, indent=1).encode(), storage)

    todo = [s for s in range(num_shards) if s not in done]
    summary = TokenizeSummary(out=out, shards=num_shards, shards_done_before=len(done))
    stages = ["decode", *prefixes]
    progress: _Progress | None = None
    if todo:
        init_ray(ray_cfg)
        import ray

        gpus = ray.cluster_resources().get("GPU", 0) > 0
        pending = table.filter(pa.compute.is_in(table["shard"], pa.array(todo, pa.int32())))
        del table
        expected = part_counts(pending, "shard")
        secs = pending["duration"].to_numpy()
        progress = _Progress(
            pending.num_rows, float(secs.sum()) / 3600, cfg.progress_seconds, stages
        )
        blocks = max(1, min(len(todo) * 4, pending.num_rows // cfg.decode_batch_size or 1))
        ds = dataset_from_table(pending, blocks)
        del pending
        ds = ds.map_batches(
            _decode_timed,
            fn_kwargs={"cfg": decode, "storage": storage.resolved()},
            batch_format="numpy",
            batch_size=cfg.decode_batch_size,
            num_cpus=cfg.decode_cpus,
        )
        for k, t in enumerate(job):
            tok: TokenizeTeacherConfig = getattr(cfg, t.prefix)
            kwargs = tokenize_map_kwargs(
                t.config,
                t.quantizer_url,
                storage.resolved(),
                prefix=t.prefix,
                domains=tok.domains,
                refine_rounds=encode.refine_rounds,
                keep_audio=tuple(sorted({d for later in job[k + 1 :] for d in later.info.domains})),
                gpus_available=gpus,
            )
            ds = ds.map_batches(TokenizeStage, **kwargs)
        infos = [t.info for t in job]

        def write(shard: int, rows: list[dict[str, Any]]) -> None:
            _write_shard(out, shard, rows, infos, storage)
            progress.shards += 1
            progress.mark(min_gap=1.0)

        gather_parts(ds.iter_batches(batch_format="numpy", batch_size=None), "shard", expected,
                     write, on_batch=lambda b: progress.add(b, prefixes))  # fmt: skip
        progress.mark()
        log.warning(progress.line())

    summary.hours_in = hours_in
    summary, report = _finish(out, manifest, job, plan, summary, progress, storage)
    report["skipped_items"] = skipped
    if progress is None and exists(join(out, REPORT), storage):
        # Nothing was redone: keep the throughput record of the run that did the work.
        old = json.loads(read_bytes(join(out, REPORT), storage))
        report |= {k: old[k] for k in ("stages", "timeline", "started") if k in old}
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
    write_atomic(join(out, REPORT), json.dumps(report, indent=1).encode(), storage)
    write_atomic(join(out, SUCCESS), json.dumps(asdict(summary), indent=1).encode(), storage)
    return summary


def _finished_shards(out: str, storage: StorageConfig) -> set[int]:
    """Shards whose token file exists (the commit marker). Temporary files that a killed run
    left behind (local writes go through ``.tmp-*``) are removed from every output folder."""
    done: set[int] = set()
    for folder in ("tokens", "quarantine", "_work/shards"):
        fs, path = filesystem(join(out, folder), storage)
        if not fs.exists(path):
            continue
        for p in fs.ls(path, detail=False):
            name = posixpath.basename(p)
            if name.startswith(".tmp-"):
                fs.rm(p)
            elif folder == "tokens" and name.startswith("shard-") and name.endswith(".parquet"):
                done.add(int(name[len("shard-") : -len(".parquet")]))
    return done


def _write_shard(
    out: str,
    shard: int,
    rows: list[dict[str, Any]],
    teachers: list[TokenTeacherInfo],
    storage: StorageConfig,
) -> None:
    good, bad = [], []
    for r in sorted(rows, key=lambda r: str(r["item_id"])):
        err = str(r["error_type"])
        if err:
            stage = "decode" if int(r["num_samples"]) == 0 else "teacher"
            bad.append(
                quarantine_row(
                    item_id=str(r["item_id"]),
                    source=str(r["url"]),
                    stage=stage,
                    error_type=err,
                    message=str(r["error"]),
                )
            )
        else:
            good.append(r)
    schema, _ = token_shard_metadata(teachers, shard=shard)
    cols: dict[str, Any] = {
        "item_id": [str(r["item_id"]) for r in good],
        "source": [str(r["source"]) for r in good],
        "domain": [str(r["domain"]) for r in good],
        "url": [str(r["url"]) for r in good],
        "start": [float(r["start"]) for r in good],
        "duration": [float(r["duration"]) for r in good],
        "num_samples": [int(r["num_samples"]) for r in good],
    }
    for t in teachers:
        ran = [int(r[f"{t.prefix}_frames"]) != NOT_RUN for r in good]
        cols[f"{t.prefix}_frames"] = [
            int(r[f"{t.prefix}_frames"]) if x else None for r, x in zip(good, ran, strict=True)
        ]
        cols[f"{t.prefix}_codes"] = [
            bytes(r[f"{t.prefix}_codes"]) if x else None for r, x in zip(good, ran, strict=True)
        ]
    data = parquet_bytes(pa.table(cols, schema=schema))
    name = _shard_name(shard)
    entry = {
        "shard": shard,
        "path": f"tokens/{name}",
        "rows": len(good),
        "quarantined": len(bad),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "audio_seconds": sum(int(r["num_samples"]) for r in good) / SAMPLE_RATE,
    }
    write_atomic(join(out, "quarantine", name), parquet_bytes(quarantine_table(bad)), storage)
    write_atomic(
        join(out, "_work/shards", name[: -len(".parquet")] + ".json"),
        json.dumps(entry).encode(),
        storage,
    )
    write_atomic(join(out, "tokens", name), data, storage)  # the commit marker: last


def _finish(
    out: str,
    manifest: str,
    job: list[JobTeacher],
    plan: dict[str, Any],
    summary: TokenizeSummary,
    progress: _Progress | None,
    storage: StorageConfig,
) -> tuple[TokenizeSummary, dict[str, Any]]:
    """Index, counts and the report over every shard, those of earlier runs included."""
    # One request for all entries (fsspec fetches them concurrently on object stores).
    fs_w, wpath = filesystem(join(out, "_work/shards"), storage)
    paths = [posixpath.join(wpath, f"shard-{s:05d}.json") for s in range(summary.shards)]
    try:
        blobs = fs_w.cat(paths)
    except FileNotFoundError as err:
        raise SpearError(f"{out!r}: an index entry under _work/shards is missing ({err}); "
                         "re-run into another --out") from None  # fmt: skip
    by_name = {posixpath.basename(k): v for k, v in blobs.items()}
    entries = [json.loads(by_name[posixpath.basename(p)]) for p in paths]

    index = pa.Table.from_pylist(
        entries, schema=with_metadata(TOKEN_INDEX_SCHEMA, "token_index", TOKEN_INDEX_VERSION)
    )
    write_atomic(join(out, INDEX), parquet_bytes(index), storage)

    fs, tpath = filesystem(join(out, "tokens"), storage)
    tok = pq.read_table(tpath, filesystem=fs, columns=["source", "domain", "num_samples"])
    fs_q, qpath = filesystem(join(out, "quarantine"), storage)
    q = pq.read_table(qpath, filesystem=fs_q, schema=QUARANTINE_SCHEMA)
    summary.ok = tok.num_rows
    summary.items = tok.num_rows + q.num_rows
    if summary.items != plan["items"]:
        raise SpearError(
            f"{out!r} holds {summary.items} items, the plan has {plan['items']}: the output was "
            "changed by hand; re-run into another --out"
        )
    summary.quarantined = dict(Counter(q["error_type"].to_pylist()))
    secs = tok["num_samples"].to_numpy() / SAMPLE_RATE
    summary.hours_out = float(secs.sum()) / 3600
    summary.token_bytes = int(sum(e["bytes"] for e in entries))

    def hours_by(col: str) -> dict[str, float]:
        acc: dict[str, float] = defaultdict(float)
        for key, s in zip(tok[col].to_pylist(), secs, strict=True):
            acc[key] += float(s) / 3600
        return dict(sorted(acc.items()))

    stages: dict[str, Any] = {}
    if progress is not None:
        for name, busy in progress.busy.items():
            audio = progress.stage_seconds[name]
            stages[name] = {
                "items": progress.stage_items[name],
                "busy_seconds": round(busy, 3),
                "rate_x_realtime": round(audio / busy, 1) if busy else None,
            }
    teachers = []
    for t in job:
        entry = asdict(t.info) | {"domains": list(t.info.domains), "rrl": t.rrl}
        teachers.append(entry)
    report = {
        "kind": "tokenize",
        "out": out,
        "manifest": manifest,
        "items": summary.items,
        "ok": summary.ok,
        "quarantined": summary.quarantined,
        "hours_in": summary.hours_in,
        "hours_out": summary.hours_out,
        "hours_by_domain": hours_by("domain"),
        "hours_by_source": hours_by("source"),
        "shards": summary.shards,
        "shards_done_before": summary.shards_done_before,
        "token_bytes": summary.token_bytes,
        "bytes_per_audio_second": (
            summary.token_bytes / (summary.hours_out * 3600) if summary.hours_out else None
        ),
        "teachers": teachers,
        "stages": stages,
        "timeline": progress.timeline if progress is not None else [],
    }
    return summary, report


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
