"""The embed job: one teacher over a manifest (or a sample of it) -> float16 embedding shards.

These shards are the quantiser's training data (SPEC section 2: ~70 h of LibriSpeech for WavLM,
AudioSet balanced for Dasheng), so the job takes a seeded sample by hours or by fraction.

Steps (the skeleton of ``pipeline/job.py``):
1. Select items: filter by domain, then a seeded hash order (stable across runs and machines);
   ``--hours`` keeps a prefix of it, ``--fraction`` keeps items whose hash falls below it.
   Cut the selection into shards of ``items_per_shard`` (the resume unit); the run record
   (``spear/record.py``) keeps the selection's content digest, the teacher and its checkpoint
   digest.
2. Ray Data runs the unfinished shards, one dataset row each (the items, no audio): the
   teacher's autoscaling actor pool (GPU when asked or present), whose actors decode the
   items and run the teacher, then a Datasink that builds and commits ``quarantine/shard-N``
   and ``embeddings/shard-N`` (``spear/commit.py``). Embeddings never reach the driver.

Output under ``--out`` (the format: :mod:`spear.formats.embeddings`):
``embeddings/shard-NNNNN.parquet`` (metadata: teacher, layer, dim, frame rate, checkpoint
sha256), ``quarantine/shard-NNNNN.parquet``, ``index.parquet`` (the committed shards, written
once all are: what readers read), ``_work/``, ``_SUCCESS.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from spear.configio import to_dict
from spear.errors import SpearError
from spear.formats.embeddings import embedding_shard_table, shard_path, write_embedding_index
from spear.formats.manifest import read_manifest
from spear.formats.parquet import parquet_bytes
from spear.formats.quarantine import quarantine_table
from spear.pipeline.job import ActorStage, UnitJob, run_units
from spear.pipeline.settings import EmbedConfig
from spear.ray_utils import RayConfig
from spear.record import items_record
from spear.stages.decode import PROVENANCE_COLUMNS, DecodeConfig
from spear.stages.teachers import TeacherConfig, TeacherStage, checkpoint_sha256
from spear.storage import StorageConfig, join, write_atomic
from spear.units import cut_units, split_quarantine

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS.json"


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
    table = select_items(
        read_manifest(manifest, storage, columns=[*COLUMNS, *PROVENANCE_COLUMNS]), cfg, spec.family
    )
    if table.num_rows == 0:
        raise SpearError(f"no items of the selected domain in {manifest!r}")
    table = cut_units(table, items_per_unit=cfg.items_per_shard)
    # The weights' digest, once, on the driver: it goes into the record (other weights at the same
    # URL are refused on resume) and into every shard's metadata.
    sha = checkpoint_sha256(teacher, storage)
    speed = (
        "num_actors",
        "num_gpus",
        "num_cpus",
        "cpu_threads",
        "batch_seconds",
        "compile",
        "device",
        "cache_dir",
        "checkpoint",
        "allow_random",
    )
    decides = {
        "checkpoint_sha256": sha,
        "teacher": {k: v for k, v in to_dict(teacher).items() if k not in speed},
        "embed": to_dict(cfg),
        "decode": to_dict(decode) | {"io_threads": None, "io_retries": None},
    }
    record = items_record("embed", table, COLUMNS, decides, {"manifest": manifest})
    unit_job = UnitJob(
        kind=f"embed {spec.name}",
        out=out,
        unit_prefix="shard",
        columns=(*COLUMNS, *PROVENANCE_COLUMNS),  # decode checks them: `changed`
        outputs=lambda n: [f"quarantine/{n}.parquet", shard_path(n)],
        actors=[
            ActorStage(
                name=spec.name,
                cls=TeacherStage,
                kwargs={"cfg": teacher, "storage": storage.resolved()},
                num_actors=teacher.num_actors,
                device=teacher.device,
                num_gpus=teacher.num_gpus,
                num_cpus=teacher.num_cpus,
            )
        ],
        writer=EmbeddingShardWriter(teacher, sha),
        decode=decode,
    )
    run = run_units(unit_job, record, table, storage, ray_cfg)
    summary = EmbedSummary(
        out=out, teacher=spec.name, shards=record.units or 0, shards_done_before=run.done_before
    )
    q: Counter[str] = Counter()
    for e in run.entries:
        summary.embedded += int(e["rows"])
        summary.items += int(e["rows"]) + int(e["quarantined"])
        summary.frames += int(e["frames"])
        for counts in e["quarantine_by_stage"].values():
            q.update(counts)
    summary.hours = summary.frames / spec.frame_rate / 3600
    summary.quarantined = dict(q)
    summary.wall_seconds = time.time() - t0
    report = asdict(summary) | {"checkpoint_sha256": sha, "digest": record.digest}
    write_embedding_index(out, run.entries, storage)  # what readers read: the committed shards
    write_atomic(join(out, SUCCESS), json.dumps(report, indent=1).encode(), storage)
    return summary


COLUMNS = ("item_id", "domain", "url", "start", "duration")


@dataclass(frozen=True)
class EmbeddingShardWriter:
    """Builds one embedding shard and its quarantine file from a unit's items (on a worker)."""

    teacher: TeacherConfig
    sha: str | None

    def __call__(
        self, shard: int, items: dict[str, np.ndarray]
    ) -> tuple[dict[str, bytes], dict[str, Any]]:
        spec = self.teacher.spec
        name = f"shard-{shard:05d}"
        split = split_quarantine(items, stage="teacher", model=spec.name, frames="num_frames")
        take = split.good
        frames = items["num_frames"][take].astype(np.int32)
        table = embedding_shard_table(
            items["item_id"][take].astype(str).tolist(),
            frames,
            items["embeddings"][take],
            dim=spec.dim,
            teacher=spec.name,
            layer=self.teacher.layer or spec.layer,
            frame_rate=spec.frame_rate,
            checkpoint=self.teacher.checkpoint,
            checkpoint_sha256=self.sha,
            weights=self.sha or "random",
        )
        entry = split.entry(name, items)
        files = {
            f"quarantine/{name}.parquet": parquet_bytes(quarantine_table(split.quarantine)),
            shard_path(name): parquet_bytes(table),  # published last
        }
        return files, entry
