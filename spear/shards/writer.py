"""Writing token shards: :class:`TokenShardWriter` builds one shard's files from a unit of
tokenized items (the tokenize job's write stage, and :mod:`spear.testing`), :func:`index_table`
turns the shards' commit entries into ``index.parquet``."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from spear.formats import (
    SAMPLE_RATE,
    parquet_bytes,
    quarantine_table,
    table_digest,
    with_metadata,
)
from spear.shards.schema import (
    NOT_RUN_FRAMES,
    SOURCE_COLUMNS,
    TOKEN_INDEX_SCHEMA,
    TOKEN_INDEX_VERSION,
    TokenTeacherInfo,
    quarantine_path,
    shard_name,
    token_path,
    token_shard_metadata,
)
from spear.storage import StorageConfig, join, write_atomic
from spear.units import split_quarantine

INPUT_COLUMNS = ("item_id", "source", "domain", "url", "start", "duration")
"""The manifest columns of an item that a shard's entry digests (with :data:`SOURCE_COLUMNS`,
what the shard records of it; those are not digested: the manifest's item id already follows
the file's version, and old runs keep their digests)."""


@dataclass(frozen=True)
class TokenShardWriter:
    """Builds one token shard and its quarantine file from a unit's items (on a worker)."""

    teachers: tuple[TokenTeacherInfo, ...]
    run_id: str = ""
    """Recorded in every shard's metadata: the tokenize plan's content digest, so shards of
    one run carry one id and another run's (other items or settings) another."""

    def __call__(
        self, shard: int, items: dict[str, np.ndarray]
    ) -> tuple[dict[str, bytes], dict[str, Any]]:
        name = shard_name(shard)
        prefixes = [t.prefix for t in self.teachers]
        # The teacher stage flags an item it gives no frame itself (``too_short``).
        split = split_quarantine(items, stage="teacher", model="teacher")
        order, good, qrows = split.order, split.good, split.quarantine
        schema, _ = token_shard_metadata(list(self.teachers), shard=shard, run_id=self.run_id)
        take = good
        cols: dict[str, Any] = {
            "item_id": items["item_id"][take].astype(str).tolist(),
            "source": items["source"][take].astype(str).tolist(),
            "domain": items["domain"][take].astype(str).tolist(),
            "url": items["url"][take].astype(str).tolist(),
            "start": items["start"][take].astype(np.float64),
            "duration": items["duration"][take].astype(np.float64),
            "num_samples": items["num_samples"][take].astype(np.int64),
        }
        for c in SOURCE_COLUMNS:  # null where the manifest (version 1) or the unit lacks them
            cols[c] = _nullable(items[c][take] if c in items else [None] * len(take), c)
        for p in prefixes:
            frames = items[f"{p}_frames"][take].astype(np.int64)
            ran = frames != NOT_RUN_FRAMES
            cols[f"{p}_frames"] = pa.array(frames, pa.int32(), mask=~ran)
            codes = items[f"{p}_codes"][take]
            cols[f"{p}_codes"] = pa.array(
                [bytes(c) if r else None for c, r in zip(codes, ran, strict=True)], pa.binary()
            )
        data = parquet_bytes(pa.table(cols, schema=schema))
        secs = cols["num_samples"] / SAMPLE_RATE
        run_secs = items["num_samples"].astype(np.float64) / SAMPLE_RATE
        busy = {"decode": float(np.sum(items["decode_seconds"]))}
        audio = {"decode": float(run_secs.sum())}
        for p in prefixes:
            busy[p] = float(np.sum(items[f"{p}_seconds"]))
            audio[p] = float(run_secs[items[f"{p}_frames"] != NOT_RUN_FRAMES].sum())
        entry = {
            "name": name,
            "items": len(order),
            "rows": len(good),
            "quarantined": len(qrows),
            "quarantine_by_stage": split.by_stage,
            "audio_seconds": float(secs.sum()),
            "input_digest": table_digest(
                pa.table({c: items[c][order] for c in INPUT_COLUMNS}), INPUT_COLUMNS
            ),
            "stage_busy": busy,
            "stage_audio_seconds": audio,
            "hours_by_domain": _sum_by(cols["domain"], secs),
            "hours_by_source": _sum_by(cols["source"], secs),
        }
        files = {
            quarantine_path(shard): parquet_bytes(quarantine_table(qrows)),
            token_path(shard): data,  # published last
        }
        return files, entry


def _nullable(values: Any, column: str) -> pa.Array:
    """A source column's values (None/NaN where absent) as the shard schema's type."""
    vals = [None if v is None or v != v or v == "" else v for v in list(values)]
    if column == "file_version":
        return pa.array([None if v is None else str(v) for v in vals], pa.string())
    return pa.array([None if v is None else int(v) for v in vals], pa.int64())


def _sum_by(keys: list[str], secs: np.ndarray) -> dict[str, float]:
    acc: dict[str, float] = defaultdict(float)
    for k, s in zip(keys, secs, strict=True):
        acc[k] += float(s) / 3600
    return dict(acc)


def index_table(entries: list[dict[str, Any]]) -> pa.Table:
    """``index.parquet`` from the shards' commit entries (in shard order)."""
    rows = []
    for e in entries:
        path = token_path(int(e["unit"]))
        f = e["files"][path]
        rows.append(
            {
                "shard": int(e["unit"]),
                "path": path,
                "rows": int(e["rows"]),
                "quarantined": int(e["quarantined"]),
                "bytes": int(f["bytes"]),
                "sha256": str(f["sha256"]),
                "audio_seconds": float(e["audio_seconds"]),
            }
        )
    schema = with_metadata(TOKEN_INDEX_SCHEMA, "token_index", TOKEN_INDEX_VERSION)
    return pa.Table.from_pylist(rows, schema=schema)


def write_index(out: str, entries: list[dict[str, Any]], storage: StorageConfig) -> pa.Table:
    """Write ``OUT/index.parquet`` for ``entries``, and the dataset card that lets Hugging Face
    ``datasets`` load the output (``README.md``, :mod:`spear.shards.card`); returns the table."""
    from spear.shards.card import write_card
    from spear.shards.schema import INDEX_FILE

    table = index_table(entries)
    write_atomic(join(out, INDEX_FILE), parquet_bytes(table), storage)
    write_card(out, table, storage)
    return table
