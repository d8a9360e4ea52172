"""The features job: a trained student's 50 Hz frame features for every item of a manifest.

Steps (the skeleton of ``pipeline/job.py``):
1. Record: the manifest's items sorted by id, cut into parts of ``items_per_part`` (the resume
   unit); the run record (``spear/record.py``) keeps the items' content digest, the student
   checkpoint's sha256, the output format and the decode settings, so a re-run with another
   checkpoint into the same ``--out`` is refused instead of mixing features of two models.
2. Ray Data runs the unfinished parts, one dataset row each (the items, no audio): the
   student's autoscaling actor pool (:class:`spear.student.features.FeatureStage`, GPU when
   asked or present), whose actors decode the items and compute the features, then a
   Datasink that builds and commits each part's files (``spear/commit.py``).

Output under ``out``: ``features/part-NNNNN.parquet`` (the embedding shard layout:
``item_id``, ``num_frames``, ``embeddings``; metadata: checkpoint and its sha256, dim, frame
rate; :mod:`spear.formats.embeddings`, with ``index.parquet`` listing the committed parts, so
``spear quantizer train`` can read it too) or, with ``numpy``, ``features/ITEM_ID.npy`` per
item (float16); ``quarantine/part-NNNNN.parquet``; ``_work/``; ``_SUCCESS.json``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from spear.configio import to_dict
from spear.errors import SpearError
from spear.formats.embeddings import (
    STUDENT_FEATURES_KIND,
    embedding_shard_table,
    shard_path,
    write_embedding_index,
)
from spear.formats.manifest import read_manifest
from spear.formats.parquet import parquet_bytes
from spear.formats.quarantine import quarantine_table
from spear.pipeline.job import ActorStage, UnitJob, run_units
from spear.pipeline.settings import FeaturesConfig, Format
from spear.ray_utils import RayConfig
from spear.record import items_record
from spear.stages.decode import PROVENANCE_COLUMNS, DecodeConfig
from spear.storage import StorageConfig, filesystem, join, read_bytes, write_atomic
from spear.units import sorted_units, split_quarantine

log = logging.getLogger(__name__)

FRAME_RATE = 50.0
FEATURES_DIR = "features"
COLUMNS = ("item_id", "url", "start", "duration")


@dataclass
class FeaturesSummary:
    out: str
    items: int = 0
    ok: int = 0
    quarantined: int = 0
    parts: int = 0
    parts_done_before: int = 0
    wall_seconds: float = 0.0

    def line(self) -> str:
        return (
            f"features: {self.items} items -> {self.ok} with features, {self.quarantined} "
            f"quarantined; {self.parts} parts ({self.parts_done_before} done before); "
            f"{self.wall_seconds:.1f} s -> {join(self.out, 'features')}"
        )


def student_digest(checkpoint: str, storage: StorageConfig) -> str:
    """sha256 of the ``student.pt`` a checkpoint URL names (a file or a training folder)."""
    from spear.student.model import STUDENT_FILE

    fs, path = filesystem(checkpoint, storage)
    url = checkpoint.rstrip("/") + "/" + STUDENT_FILE if fs.isdir(path) else checkpoint
    return hashlib.sha256(read_bytes(url, storage)).hexdigest()


def run_features(
    manifest: str,
    checkpoint: str,
    out: str,
    cfg: FeaturesConfig,
    decode: DecodeConfig,
    storage: StorageConfig,
    ray_cfg: RayConfig,
) -> FeaturesSummary:
    """Write the student's features for every item of ``manifest`` under ``out``."""
    from spear.student.features import FeatureStage
    from spear.student.hidden import select_layers
    from spear.student.model import Student

    t0 = time.time()
    student = Student.from_checkpoint(checkpoint, storage)  # fails here, before Ray
    dim = student.output_dim
    layers = select_layers(cfg.layers, student.num_layers)
    sha = student_digest(checkpoint, storage)
    table = read_manifest(manifest, storage, columns=[*COLUMNS, *PROVENANCE_COLUMNS])
    if table.num_rows == 0:
        raise SpearError(f"the manifest at {manifest!r} has no items")
    table = sorted_units(
        table,
        items_per_unit=cfg.items_per_part,
        what=f"the manifest at {manifest!r}",
    )
    decides = {
        "checkpoint_sha256": sha,
        "format": cfg.format,
        "items_per_part": cfg.items_per_part,
        "decode": to_dict(decode) | {"io_threads": None, "io_retries": None},
        **({"layers": list(layers)} if layers else {}),
    }
    record = items_record(
        "features", table, COLUMNS, decides, {"manifest": manifest, "checkpoint": checkpoint}
    )
    unit_job = UnitJob(
        kind="features",
        out=out,
        unit_prefix="part",
        columns=(*COLUMNS, *PROVENANCE_COLUMNS),  # decode checks them: `changed`
        outputs=lambda n: (
            [f"quarantine/{n}.parquet"]
            + ([shard_path(n, FEATURES_DIR)] if cfg.format == "parquet" else [])
        ),
        actors=[
            ActorStage(
                name="student",
                cls=FeatureStage,
                kwargs={
                    "checkpoint": checkpoint,
                    "storage": storage.resolved(),
                    "device": cfg.device,
                    "layers": layers,
                },
                num_actors=cfg.num_actors,
                device=cfg.device,
                num_gpus=cfg.num_gpus,
                num_cpus=cfg.num_cpus,
            )
        ],
        writer=FeaturePartWriter(cfg.format, checkpoint, sha, dim, layers),
        decode=decode,
    )
    run = run_units(unit_job, record, table, storage, ray_cfg)
    summary = FeaturesSummary(out=out, parts=record.units or 0, parts_done_before=run.done_before)
    summary.items = sum(int(e["items"]) for e in run.entries)
    summary.quarantined = sum(int(e["quarantined"]) for e in run.entries)
    summary.ok = summary.items - summary.quarantined
    summary.wall_seconds = time.time() - t0
    report = asdict(summary) | {"checkpoint_sha256": sha, "digest": record.digest}
    if cfg.format == "parquet":  # the committed parts, what readers read
        write_embedding_index(out, run.entries, storage, FEATURES_DIR)
    write_atomic(join(out, "_SUCCESS.json"), json.dumps(report, indent=1).encode(), storage)
    return summary


@dataclass(frozen=True)
class FeaturePartWriter:
    """Builds one features part (and its quarantine file) from a unit's items (on a worker)."""

    fmt: Format
    checkpoint: str
    sha: str
    dim: int
    layers: tuple[int, ...] | None = None
    """Per-layer output: each item is (frames, len(layers), dim)."""

    def __call__(
        self, part: int, items: dict[str, np.ndarray]
    ) -> tuple[dict[str, bytes], dict[str, Any]]:
        name = f"part-{part:05d}"
        split = split_quarantine(items, stage="student", model="student", frames="num_frames")
        good = split.good
        files = {f"quarantine/{name}.parquet": parquet_bytes(quarantine_table(split.quarantine))}
        if self.fmt == "numpy":
            for i in good:
                frames = int(items["num_frames"][i])
                shape = (frames, len(self.layers), self.dim) if self.layers else (frames, self.dim)
                arr = np.frombuffer(bytes(items["features"][i]), "<f2").reshape(shape)
                buf = io.BytesIO()
                np.save(buf, arr)
                files[f"features/{items['item_id'][i]}.npy"] = buf.getvalue()
        else:
            take = good
            table = embedding_shard_table(
                items["item_id"][take].astype(str).tolist(),
                items["num_frames"][take],
                items["features"][take],
                dim=self.dim,
                kind=STUDENT_FEATURES_KIND,
                checkpoint=self.checkpoint,
                checkpoint_sha256=self.sha,
                frame_rate=FRAME_RATE,
                model="student",
                **({"layers": list(self.layers)} if self.layers else {}),
            )
            files[shard_path(name, FEATURES_DIR)] = parquet_bytes(table)
        entry = split.entry(name, items)
        return files, entry
