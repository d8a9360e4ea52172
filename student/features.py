"""``spear features``: a trained student's frame features for every item of a manifest.

* :func:`features_batch` - pure: an audio batch (decode stage output) -> 50 Hz encoder output
  per row, float16 ``(num_frames, dim)`` row-major bytes (``EMBEDDING_SHARD_SCHEMA``'s layout).
* :class:`FeatureStage` - the Ray Data actor (loads the student once).
* :func:`run_features` - the job: manifest -> decode (CPU tasks) -> student (actors) -> parts
  written by the driver, each a fixed set of items (sorted ids), so a re-run writes only the
  missing parts. Output under ``out``: ``features/part-NNNNN.parquet`` (the embedding shard
  layout: ``item_id``, ``num_frames``, ``embeddings``; metadata: checkpoint, dim, frame rate,
  so ``spear quantizer train`` can read it too) or, with ``numpy``,
  ``features/ITEM_ID.npy`` per item (float16) plus an empty ``features/part-NNNNN.done``
  marker per part; ``quarantine/part-NNNNN.parquet``; ``_SUCCESS.json``.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch

from spear.errors import SpearError
from spear.formats import (
    AUDIO_DTYPE,
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
from spear.storage import StorageConfig, filesystem, join, write_atomic
from spear.student.frontend import fbank_batch
from spear.student.model import Student

log = logging.getLogger(__name__)

FRAME_RATE = 50.0
Format = Literal["parquet", "numpy"]


def features_batch(model: Student, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Encoder output for the rows that decoded; others keep their error and get no frames."""
    n = len(batch["item_id"])
    err = [str(e) for e in batch.get("error_type", [""] * n)]
    ok = [i for i in range(n) if not err[i]]
    frames = np.zeros(n, dtype=np.int32)
    feats = np.empty(n, dtype=object)
    feats[:] = [b""] * n
    if ok:
        waves = [np.frombuffer(batch["audio"][i], dtype=AUDIO_DTYPE) for i in ok]
        x, lengths = fbank_batch(waves)
        with torch.inference_mode():
            y, out_len = model.encode(x.to(device), lengths.to(device))
        arr = y.float().cpu().numpy()
        for row, i in enumerate(ok):
            f = int(out_len[row])
            frames[i] = f
            feats[i] = np.ascontiguousarray(arr[row, :f], dtype="<f2").tobytes()
    out = {k: v for k, v in batch.items() if k != "audio"}
    out["num_frames"], out["features"] = frames, feats
    return out


class FeatureStage:
    """Ray Data actor: the student on this actor's device, eval mode."""

    def __init__(self, checkpoint: str, storage: StorageConfig, device: str):
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if use_cuda else "cpu")
        self.model = Student.from_checkpoint(checkpoint, storage).to(self.device).eval()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return features_batch(self.model, batch, self.device)


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


def run_features(
    manifest: str,
    checkpoint: str,
    out: str,
    storage: StorageConfig,
    ray_cfg: RayConfig,
    *,
    decode: DecodeConfig | None = None,
    fmt: Format = "parquet",
    items_per_part: int = 256,
    device: str = "auto",
    batch_size: int = 16,
    num_actors: int = 1,
) -> FeaturesSummary:
    """Write the student's features for every item of ``manifest`` under ``out``."""
    t0 = time.time()
    if fmt not in ("parquet", "numpy"):
        raise SpearError(f"--format must be parquet or numpy, got {fmt!r}")
    if items_per_part < 1:
        raise SpearError("--items-per-part must be >= 1")
    dim = Student.from_checkpoint(checkpoint, storage).output_dim  # fails here, before Ray
    table = read_manifest(manifest, storage).select(["item_id", "url", "start", "duration"])
    table = table.sort_by("item_id")
    part_of = np.arange(table.num_rows) // items_per_part
    table = table.append_column("part", pa.array(part_of, type=pa.int32()))
    parts = int(part_of[-1]) + 1 if table.num_rows else 0
    suffix = ".parquet" if fmt == "parquet" else ".done"
    fs, fpath = filesystem(join(out, "features"), storage)
    names = set()
    if fs.exists(fpath):
        names = {posixpath.basename(p) for p in fs.ls(fpath, detail=False)}
    todo = [p for p in range(parts) if f"part-{p:05d}{suffix}" not in names]
    summary = FeaturesSummary(out=out, items=table.num_rows, parts=parts)
    summary.parts_done_before = parts - len(todo)
    if todo:
        init_ray(ray_cfg)
        import ray
        from ray.data import ActorPoolStrategy

        gpus = ray.cluster_resources().get("GPU", 0) > 0
        pending = table.filter(pa.compute.is_in(table["part"], pa.array(todo, pa.int32())))
        expected = part_counts(pending, "part")
        ds = dataset_from_table(pending, max(1, pending.num_rows // batch_size))
        ds = decode_dataset(ds, decode or DecodeConfig(), storage.resolved())
        ds = ds.map_batches(
            FeatureStage,
            compute=ActorPoolStrategy(size=num_actors),
            batch_size=batch_size,
            batch_format="numpy",
            num_gpus=1 if device == "cuda" or (device == "auto" and gpus) else 0,
            fn_constructor_kwargs={
                "checkpoint": checkpoint,
                "storage": storage.resolved(),
                "device": device,
            },
        )
        gather_parts(
            ds.iter_batches(batch_format="numpy", batch_size=None),
            "part",
            expected,
            lambda p, rows: _write_part(out, p, rows, fmt, checkpoint, dim, storage),
        )
    fs_q, qpath = filesystem(join(out, "quarantine"), storage)
    if fs_q.exists(qpath):
        import pyarrow.parquet as pq

        summary.quarantined = pq.read_table(qpath, filesystem=fs_q).num_rows
    summary.ok = summary.items - summary.quarantined
    summary.wall_seconds = time.time() - t0
    write_atomic(join(out, "_SUCCESS.json"), json.dumps(asdict(summary), indent=1).encode(),
                 storage)  # fmt: skip
    return summary


def _write_part(
    out: str,
    part: int,
    rows: list[dict[str, Any]],
    fmt: Format,
    checkpoint: str,
    dim: int,
    storage: StorageConfig,
) -> None:
    good, bad = [], []
    for r in sorted(rows, key=lambda r: str(r["item_id"])):
        if str(r["error_type"]) or int(r["num_frames"]) == 0:
            bad.append(
                quarantine_row(
                    item_id=str(r["item_id"]),
                    source=str(r["url"]),
                    stage="decode" if str(r["error_type"]) else "student",
                    error_type=str(r["error_type"]) or "too_short",
                    message=str(r["error"]) or f"{r['url']}: no student frame",
                )
            )
        else:
            good.append(r)
    name = f"part-{part:05d}"
    write_atomic(join(out, "quarantine", name + ".parquet"), parquet_bytes(quarantine_table(bad)),
                 storage)  # fmt: skip
    if fmt == "numpy":
        for r in good:
            arr = np.frombuffer(bytes(r["features"]), "<f2").reshape(int(r["num_frames"]), dim)
            buf = io.BytesIO()
            np.save(buf, arr)
            write_atomic(join(out, "features", f"{r['item_id']}.npy"), buf.getvalue(), storage)
        write_atomic(join(out, "features", name + ".done"), b"", storage)  # the part's marker
        return
    meta = {"checkpoint": checkpoint, "dim": dim, "frame_rate": FRAME_RATE, "model": "student"}
    schema = with_metadata(EMBEDDING_SHARD_SCHEMA, "student_features", EMBEDDING_SHARD_VERSION,
                           **meta)  # fmt: skip
    table = pa.table(
        {
            "item_id": [str(r["item_id"]) for r in good],
            "num_frames": pa.array([int(r["num_frames"]) for r in good], pa.int32()),
            "embeddings": pa.array([bytes(r["features"]) for r in good], pa.binary()),
        },
        schema=schema,
    )
    write_atomic(join(out, "features", name + ".parquet"), parquet_bytes(table), storage)
