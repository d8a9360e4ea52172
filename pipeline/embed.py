"""The embed job: one teacher over a manifest (or a sample of it) -> float16 embedding shards.

These shards are the quantiser's training data (SPEC section 2: ~70 h of LibriSpeech for WavLM,
AudioSet balanced for Dasheng), so the job takes a seeded sample by hours or by fraction.

Steps:
1. Select items: filter by domain, then a seeded hash order (stable across runs and machines);
   ``--hours`` keeps a prefix of it, ``--fraction`` keeps items whose hash falls below it.
   Cut the selection into shards of ``items_per_shard`` (the resume unit).
2. Stream the items of unfinished shards through decode (CPU tasks) and the teacher (an actor
   pool, GPU when the cluster has one). Float embeddings stay on the actors until the driver
   collects a shard's rows.
3. The driver writes a shard (``quarantine/shard-N`` first, then ``embeddings/shard-N``: the
   commit marker) as soon as every one of its items has come back, exactly once.

Output under ``--out``: ``embeddings/shard-NNNNN.parquet`` (EMBEDDING_SHARD_SCHEMA, metadata:
teacher, layer, dim, frame rate, checkpoint sha256), ``quarantine/shard-NNNNN.parquet``,
``_work/plan.json``, ``_SUCCESS.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spear.config import to_dict
from spear.errors import SpearError
from spear.formats import (
    EMBEDDING_SHARD_SCHEMA,
    EMBEDDING_SHARD_VERSION,
    parquet_bytes,
    quarantine_row,
    quarantine_table,
    with_metadata,
)
from spear.pipeline.manifest import read_manifest
from spear.pipeline.parts import gather_parts, part_counts
from spear.ray_utils import RayConfig, dataset_from_table, init_ray
from spear.stages.decode import DecodeConfig, decode_dataset
from spear.stages.teachers import (
    TeacherConfig,
    TeacherStage,
    checkpoint_sha256,
    map_batches_kwargs,
)
from spear.storage import StorageConfig, exists, filesystem, join, read_bytes, write_atomic

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS.json"


@dataclass(kw_only=True, frozen=True)
class EmbedConfig:
    """Which items ``spear embed`` runs a teacher on."""

    domain: Literal["auto", "speech", "audio", "all"] = "auto"
    """Items of this domain; ``auto``: speech for WavLM teachers, audio for Dasheng ones."""
    hours: float | None = None
    """Keep a seeded sample of about this many hours (None: no limit)."""
    fraction: float | None = None
    """Keep a seeded fraction of the items (None: all)."""
    seed: int = 0
    """Seed of the sample."""
    items_per_shard: int = 256
    """Items per output shard; also the resume unit."""

    def __post_init__(self) -> None:
        if self.hours is not None and self.hours <= 0:
            raise SpearError("embed hours must be positive")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise SpearError("embed fraction must be in (0, 1]")
        if self.items_per_shard < 1:
            raise SpearError("embed items_per_shard must be >= 1")


@dataclass
class EmbedSummary:
    out: str
    teacher: str
    items: int = 0
    embedded: int = 0
    frames: int = 0
    hours: float = 0.0
    quarantined: dict[str, int] = field(default_factory=dict)
    shards: int = 0
    shards_done_before: int = 0
    wall_seconds: float = 0.0

    def line(self) -> str:
        q = sum(self.quarantined.values())
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.quarantined.items()))
        rate = self.hours * 3600 / self.wall_seconds if self.wall_seconds else 0.0
        return (
            f"embed {self.teacher}: {self.items} items -> {self.embedded} embedded "
            f"({self.frames} frames, {self.hours:.3f} h), {q} quarantined"
            f"{' (' + reasons + ')' if q else ''}; {self.shards} shards "
            f"({self.shards_done_before} done before); {self.wall_seconds:.1f} s "
            f"({rate:.1f}x real time) -> {join(self.out, 'embeddings')}"
        )


def _hash_unit(item_id: str, seed: int) -> float:
    digest = hashlib.blake2b(f"{seed}:{item_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def select_items(manifest: pa.Table, cfg: EmbedConfig, family: str) -> pa.Table:
    """The sampled manifest rows, in their stable (seeded hash) order."""
    domain = cfg.domain
    if domain == "auto":
        domain = "speech" if family == "wavlm" else "audio"
    if domain != "all":
        manifest = manifest.filter(pa.compute.equal(manifest["domain"], domain))
    ids = manifest["item_id"].to_pylist()
    keys = np.array([_hash_unit(i, cfg.seed) for i in ids], dtype=np.float64)
    order = np.argsort(keys, kind="stable")
    if cfg.fraction is not None:
        order = order[keys[order] < cfg.fraction]
    if cfg.hours is not None:
        dur = manifest["duration"].to_numpy()[order]
        keep = int(np.searchsorted(np.cumsum(dur), cfg.hours * 3600, side="left")) + 1
        order = order[:keep]
    return manifest.take(pa.array(order, type=pa.int64()))


def run_embed(
    manifest: str,
    out: str,
    teacher: TeacherConfig,
    cfg: EmbedConfig,
    decode: DecodeConfig,
    storage: StorageConfig,
    ray_cfg: RayConfig,
) -> EmbedSummary:
    """Embed (or resume embedding) the selected items of ``manifest`` into ``out``."""
    t0 = time.time()
    spec = teacher.spec
    table = select_items(read_manifest(manifest, storage), cfg, spec.family)
    if table.num_rows == 0:
        raise SpearError(f"no items of the selected domain in {manifest!r}")
    n = cfg.items_per_shard
    shard_of = np.arange(table.num_rows) // n
    table = table.append_column("shard", pa.array(shard_of, type=pa.int32()))
    num_shards = int(shard_of[-1]) + 1
    # The weights' digest, once, on the driver: it goes into the plan (other weights at the same
    # URL are refused on resume) and into every shard's metadata.
    sha = checkpoint_sha256(teacher, storage)
    plan = {
        "checkpoint_sha256": sha,
        "manifest": manifest,
        "teacher": to_dict(teacher) | {"num_actors": None, "batch_size": None, "num_gpus": None},
        "embed": to_dict(cfg),
        "decode": to_dict(decode),
        "items": table.num_rows,
    }
    plan_url = join(out, "_work/plan.json")
    if exists(plan_url, storage):
        if json.loads(read_bytes(plan_url, storage)) != plan:
            raise SpearError(
                f"{out!r} holds embeddings of another teacher, sample or manifest; "
                "use another --out"
            )
    else:
        write_atomic(plan_url, json.dumps(plan, indent=1).encode(), storage)

    fs, epath = filesystem(join(out, "embeddings"), storage)
    done = set()
    if fs.exists(epath):
        done = {posixpath.basename(p) for p in fs.ls(epath, detail=False)}
    todo = [s for s in range(num_shards) if f"shard-{s:05d}.parquet" not in done]
    summary = EmbedSummary(out=out, teacher=spec.name, shards=num_shards)
    summary.shards_done_before = num_shards - len(todo)
    if todo:
        init_ray(ray_cfg)

        pending = table.filter(pa.compute.is_in(table["shard"], pa.array(todo, pa.int32())))
        expected = part_counts(pending, "shard")
        blocks = max(1, min(len(todo) * 4, pending.num_rows // 4 or 1))
        ds = dataset_from_table(pending, blocks)
        ds = decode_dataset(ds, decode, storage)
        ds = ds.map_batches(TeacherStage, **map_batches_kwargs(teacher, storage))
        gather_parts(
            ds.iter_batches(batch_format="numpy", batch_size=None),
            "shard",
            expected,
            lambda s, rows: _write_shard(out, s, rows, teacher, sha, storage),
        )

    # Summary over every shard, those of earlier runs included.
    e = pq.read_table(epath, filesystem=fs, columns=["num_frames"])
    fs_q, qpath = filesystem(join(out, "quarantine"), storage)
    q = pq.read_table(qpath, filesystem=fs_q, columns=["error_type"])
    summary.embedded = e.num_rows
    summary.items = e.num_rows + q.num_rows
    summary.frames = int(np.sum(e["num_frames"].to_numpy()))
    summary.hours = summary.frames / spec.frame_rate / 3600
    summary.quarantined = dict(Counter(q["error_type"].to_pylist()))
    summary.wall_seconds = time.time() - t0
    report = asdict(summary) | {"checkpoint_sha256": sha}
    write_atomic(join(out, SUCCESS), json.dumps(report, indent=1).encode(), storage)
    return summary


def _write_shard(
    out: str,
    shard: int,
    rows: list[dict[str, Any]],
    teacher: TeacherConfig,
    sha: str | None,
    storage: StorageConfig,
) -> None:
    spec = teacher.spec
    good, bad = [], []
    for r in sorted(rows, key=lambda r: str(r["item_id"])):
        err = str(r.get("error_type", "") or "")
        where = {"item_id": str(r["item_id"]), "source": str(r["url"])}
        if err:
            bad.append(quarantine_row(**where, stage="decode", error_type=err,
                                      message=str(r["error"])))  # fmt: skip
        elif int(r["num_frames"]) == 0:
            msg = f"{int(r['num_samples'])} samples give no {spec.name} frame"
            bad.append(quarantine_row(**where, stage="teacher", error_type="too_short",
                                      message=msg))  # fmt: skip
        else:
            good.append(r)
    meta = {
        "teacher": spec.name,
        "layer": teacher.layer or spec.layer,
        "dim": spec.dim,
        "frame_rate": spec.frame_rate,
        "checkpoint": teacher.checkpoint,
        "checkpoint_sha256": sha,
    }
    schema = with_metadata(EMBEDDING_SHARD_SCHEMA, "embedding_shard", EMBEDDING_SHARD_VERSION,
                           **meta)  # fmt: skip
    table = pa.table(
        {
            "item_id": [str(r["item_id"]) for r in good],
            "num_frames": pa.array([int(r["num_frames"]) for r in good], pa.int32()),
            "embeddings": pa.array([bytes(r["embeddings"]) for r in good], pa.binary()),
        },
        schema=schema,
    )
    name = f"shard-{shard:05d}.parquet"
    write_atomic(join(out, "quarantine", name), parquet_bytes(quarantine_table(bad)), storage)
    write_atomic(join(out, "embeddings", name), parquet_bytes(table), storage)
