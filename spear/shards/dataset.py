"""Reading token shards for training: a PyTorch ``IterableDataset`` and a Ray Dataset, both
through :func:`spear.shards.index.open_run` (the index, every shard's metadata checked)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import IterableDataset, get_worker_info

from spear.shards.index import ShardEntry, ShardError, open_run, read_table
from spear.shards.index import shard_url as run_url
from spear.shards.schema import ITEM_COLUMNS, codes_from_bytes
from spear.storage import StorageConfig, filesystem

if TYPE_CHECKING:
    import ray.data


@dataclass(frozen=True)
class ReadTask:
    """Rows ``[start, stop)`` (of the shard's row order for the epoch) of one shard."""

    shard: int
    start: int
    stop: int


def plan_reads(
    entries: Sequence[ShardEntry],
    reader: int,
    readers: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
) -> list[ReadTask]:
    """What reader ``reader`` of ``readers`` (rank x DataLoader workers) reads in ``epoch``.

    With at least as many shards as readers, whole shards are dealt round-robin in the epoch's
    shard order (seeded by ``seed`` and ``epoch`` when ``shuffle``): I/O stays one file per
    shard. With fewer shards than readers, every shard's rows are cut into ``readers``
    contiguous slices and each reader takes its own slice of each. Either way every row is read
    exactly once across all readers, and every reader computes the same plan."""
    if not 0 <= reader < readers:
        raise ValueError(f"reader {reader} is not in [0, {readers})")
    order = list(range(len(entries)))
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(len(entries)).tolist()
    if len(entries) >= readers:
        return [ReadTask(i, 0, entries[i].rows) for i in order[reader::readers]]
    tasks = []
    for i in order:
        n = entries[i].rows
        start, stop = n * reader // readers, n * (reader + 1) // readers
        if stop > start:
            tasks.append(ReadTask(i, start, stop))
    return tasks


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class TokenShardDataset(IterableDataset[dict[str, Any]]):
    """Items of a tokenize output, for a PyTorch ``DataLoader``.

    Each item is a dict: ``item_id``, ``source``, ``domain``, ``url`` (str), ``start``,
    ``duration`` (float, seconds), ``num_samples`` (int, 16 kHz) and, per teacher prefix, a
    ``(frames, C)`` tensor of codes (``codes_dtype``: uint8, or long for a loss's targets), or
    None on items the teacher did not run on.

    Shards are split across DDP ranks (``rank`` / ``world_size``, default: torch.distributed's
    when initialised, else 0 / 1) and DataLoader workers (:func:`plan_reads`): each row once per
    epoch. Ranks may get different numbers of rows; a DDP loop must tolerate that (e.g. join or
    a fixed number of steps). ``shuffle`` permutes the shard order and the rows inside each
    shard per epoch (seeded: call :meth:`set_epoch` before each epoch, with non-persistent
    workers)."""

    def __init__(
        self,
        out: str,
        storage: StorageConfig | None = None,
        *,
        shuffle: bool = False,
        seed: int = 0,
        teachers: Sequence[str] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        codes_dtype: torch.dtype = torch.uint8,
    ) -> None:
        super().__init__()
        self.out = out
        run = open_run(out, storage)
        self.storage = run.storage
        self.entries = run.entries
        self.teachers = run.select(teachers)
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.codes_dtype = codes_dtype
        self.epoch = 0
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_rows(self) -> int:
        """Rows of the whole output (all ranks)."""
        return sum(e.rows for e in self.entries)

    def reader(self) -> tuple[int, int]:
        """(this reader, readers): rank-major over DataLoader workers."""
        rank, world = (
            (self.rank, self.world_size)
            if self.rank is not None and self.world_size is not None
            else _distributed()
        )
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * workers + worker, world * workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        reader, readers = self.reader()
        tasks = plan_reads(
            self.entries, reader, readers, shuffle=self.shuffle, seed=self.seed, epoch=self.epoch
        )
        columns = list(ITEM_COLUMNS)
        for t in self.teachers:
            columns += [f"{t.prefix}_frames", f"{t.prefix}_codes"]
        for task in tasks:
            e = self.entries[task.shard]
            table = read_table(run_url(self.out, e), self.storage, columns)
            if table.num_rows != e.rows:
                raise ShardError(
                    f"{e.path!r} has {table.num_rows} rows, the index says {e.rows}: "
                    "run 'spear shards validate'"
                )
            rows = np.arange(e.rows)
            if self.shuffle:
                rows = np.random.default_rng([self.seed, self.epoch, e.shard]).permutation(e.rows)
            yield from self._items(table, rows[task.start : task.stop])

    def _items(self, table: pa.Table, rows: np.ndarray) -> Iterator[dict[str, Any]]:
        whole = len(rows) == table.num_rows and not self.shuffle
        part = table if whole else table.take(pa.array(rows, type=pa.int64()))
        cols = {c: part[c].to_pylist() for c in part.column_names}
        for i in range(part.num_rows):
            item: dict[str, Any] = {c: cols[c][i] for c in ITEM_COLUMNS}
            for t in self.teachers:
                raw = cols[f"{t.prefix}_codes"][i]
                if raw is None:
                    item[t.prefix] = None
                    continue
                codes = np.array(codes_from_bytes(raw, t.num_codebooks))  # (frames, C), writable
                item[t.prefix] = torch.from_numpy(codes).to(self.codes_dtype)
            yield item


def collate_tokens(items: Sequence[dict[str, Any]], pad: int = -100) -> dict[str, Any]:
    """A list of :class:`TokenShardDataset` items -> a batch: the per-item fields as lists
    (``num_samples`` as a tensor), per teacher ``codes`` ``(B, T_max, C)`` long padded with
    ``pad`` (items without the teacher are all ``pad``) and ``{prefix}_lens`` ``(B,)``."""
    batch: dict[str, Any] = {c: [it[c] for it in items] for c in ITEM_COLUMNS}
    batch["num_samples"] = torch.tensor(batch["num_samples"], dtype=torch.long)
    prefixes = [k for k in items[0] if k not in ITEM_COLUMNS] if items else []
    for p in prefixes:
        codes = [it[p] for it in items]
        present = [c for c in codes if c is not None]
        c_dim = present[0].shape[1] if present else 0
        t_max = max((c.shape[0] for c in present), default=0)
        out = torch.full((len(items), t_max, c_dim), pad, dtype=torch.long)
        lens = torch.zeros(len(items), dtype=torch.long)
        for i, c in enumerate(codes):
            if c is not None:
                out[i, : c.shape[0]] = c.long()
                lens[i] = c.shape[0]
        batch[p] = out
        batch[f"{p}_lens"] = lens
    return batch


def ray_dataset(
    out: str,
    storage: StorageConfig | None = None,
    columns: Sequence[str] | None = None,
    **read_kwargs: Any,
) -> ray.data.Dataset:
    """The token shards listed in the index as one Ray Dataset (``ray.data.read_parquet``),
    read through the same fsspec filesystem (and S3 endpoint) as the rest of spear."""
    import ray.data
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    run = open_run(out, storage)
    if not run.entries:
        raise ShardError(f"{out!r} has no token shards")
    fs, _ = filesystem(out, run.storage)
    paths = [filesystem(run.url(e), run.storage)[1] for e in run.entries]
    return ray.data.read_parquet(
        paths,
        filesystem=PyFileSystem(FSSpecHandler(fs)),
        columns=list(columns) if columns else None,
        **read_kwargs,
    )
