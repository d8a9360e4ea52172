"""Embedding shards -> training frames and held-out frames.

Shards are Parquet files with :data:`spear.formats.EMBEDDING_SHARD_SCHEMA` (float16 (frames, dim)
per item) under any fsspec URL: a file, or a folder searched recursively for ``*.parquet``.
Whole items are held out (neighbouring frames are nearly equal, so holding out single frames
would leak): a seeded shuffle of items up to ``heldout_fraction`` of the frames, at most
``max_heldout_frames``. The training stream reads shards in a seeded random order, epoch after
epoch, through a shuffle buffer, so the whole set never has to fit in memory.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from spear.errors import SpearError
from spear.formats import EMBEDDING_DTYPE, read_metadata
from spear.quantizer.config import QuantizerDataConfig
from spear.storage import StorageConfig, filesystem, unstrip


class EmbeddingDataError(SpearError):
    """Embedding shards are missing or inconsistent."""


@dataclass
class EmbeddingSet:
    """The shards under one URL, with what their metadata says."""

    url: str
    shards: list[str]
    dim: int
    teacher: str = ""
    layer: int = -1
    items: dict[str, int] = field(default_factory=dict)  # item_id -> frames
    heldout_items: list[str] = field(default_factory=list)

    @property
    def total_frames(self) -> int:
        return sum(self.items.values())

    def summary(self) -> dict[str, Any]:
        held = sum(self.items[i] for i in self.heldout_items)
        return {
            "embeddings": self.url,
            "shards": len(self.shards),
            "items": len(self.items),
            "frames": self.total_frames,
            "heldout_frames": held,
            "heldout_items": sorted(self.heldout_items),
        }


def _read_table(url: str, storage: StorageConfig, columns: list[str] | None = None) -> Any:
    fs, path = filesystem(url, storage)
    with fs.open(path, "rb") as f:
        return pq.read_table(io.BytesIO(f.read()), columns=columns)


def list_shards(url: str, storage: StorageConfig) -> list[str]:
    fs, path = filesystem(url, storage)
    if fs.isfile(path):
        return [url]
    # A `spear embed` output folder: its shards sit under embeddings/, beside the quarantine.
    if fs.isdir(path.rstrip("/") + "/embeddings"):
        path = path.rstrip("/") + "/embeddings"
    found = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
    if not found:
        raise EmbeddingDataError(f"no embedding shards (*.parquet) under {url!r}")
    return [unstrip(fs, p) for p in found]


def open_embeddings(
    url: str, storage: StorageConfig, data: QuantizerDataConfig, seed: int = 0
) -> EmbeddingSet:
    """Index the shards (item ids and frame counts only) and choose the held-out items."""
    shards = list_shards(url, storage)
    dims: set[int] = set()
    emb = EmbeddingSet(url=url, shards=shards, dim=0)
    for shard in shards:
        fs, path = filesystem(shard, storage)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            meta = read_metadata(pf.schema_arrow)
            table = pf.read(columns=["item_id", "num_frames"])
        if "dim" not in meta:
            raise EmbeddingDataError(f"{shard}: no 'dim' in the shard's spear metadata")
        dims.add(int(meta["dim"]))
        emb.teacher = emb.teacher or str(meta.get("teacher", ""))
        emb.layer = int(meta.get("layer", emb.layer))
        for item, n in zip(
            table.column("item_id").to_pylist(), table.column("num_frames").to_pylist(), strict=True
        ):
            emb.items[item] = int(n)
    if len(dims) != 1:
        raise EmbeddingDataError(f"shards under {url!r} disagree on dim: {sorted(dims)}")
    emb.dim = dims.pop()
    target = min(data.heldout_fraction * emb.total_frames, data.max_heldout_frames)
    order = sorted(emb.items)
    random.Random(seed).shuffle(order)
    held = 0
    # At least a few items even on a small set: one held-out item can be a single stationary
    # sound whose frames barely vary, which makes its RRL (relative to that variance) meaningless.
    min_items = min(data.min_heldout_items, len(order) // 4) if target > 0 else 0
    for item in order:
        if held >= target and len(emb.heldout_items) >= min_items:
            break
        if held + emb.items[item] > data.max_heldout_frames:
            continue
        emb.heldout_items.append(item)
        held += emb.items[item]
    return emb


def _frames(table: Any, dim: int, keep: set[str] | None, drop: set[str]) -> np.ndarray:
    """Decode a table's embeddings to float32 (frames, dim), filtering items."""
    parts = []
    ids = table.column("item_id").to_pylist()
    blobs = table.column("embeddings").to_pylist()
    for item, blob in zip(ids, blobs, strict=True):
        if item in drop or (keep is not None and item not in keep):
            continue
        parts.append(np.frombuffer(blob, dtype=EMBEDDING_DTYPE).reshape(-1, dim))
    if not parts:
        return np.zeros((0, dim), np.float32)
    return np.concatenate(parts).astype(np.float32)


def load_frames(
    emb: EmbeddingSet, storage: StorageConfig, items: set[str] | None, max_frames: int = 0
) -> np.ndarray:
    """All frames (float32 (N, dim)) of ``items`` (None: all), at most ``max_frames`` (0: all)."""
    parts, total = [], 0
    for shard in emb.shards:
        arr = _frames(_read_table(shard, storage, ["item_id", "embeddings"]), emb.dim, items, set())
        parts.append(arr)
        total += len(arr)
        if max_frames and total >= max_frames:
            break
    out = np.concatenate(parts) if parts else np.zeros((0, emb.dim), np.float32)
    return out[:max_frames] if max_frames else out


def train_batches(
    emb: EmbeddingSet,
    storage: StorageConfig,
    batch_size: int,
    shuffle_frames: int,
    seed: int,
) -> Iterator[np.ndarray]:
    """Endless float32 minibatches (batch_size, dim) of training frames (held-out excluded)."""
    rng = np.random.default_rng(seed)
    drop = set(emb.heldout_items)
    buf = np.zeros((0, emb.dim), np.float32)
    if emb.total_frames - sum(emb.items[i] for i in drop) <= 0:
        raise EmbeddingDataError(f"no training frames left under {emb.url!r}")
    while True:
        for shard in rng.permutation(len(emb.shards)):
            table = _read_table(emb.shards[int(shard)], storage, ["item_id", "embeddings"])
            buf = np.concatenate([buf, _frames(table, emb.dim, None, drop)])
            if len(buf) < shuffle_frames:
                continue
            buf = buf[rng.permutation(len(buf))]
            while len(buf) >= batch_size:
                yield buf[:batch_size]
                buf = buf[batch_size:]
        # End of an epoch: small data sets never fill the buffer, so flush it here.
        buf = buf[rng.permutation(len(buf))]
        while len(buf) >= batch_size:
            yield buf[:batch_size]
            buf = buf[batch_size:]
