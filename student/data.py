"""Training data: token shards -> an epoch plan -> decoded, mixed int16 audio -> batches.

Pure pieces, each testable without Ray (``student/recipe.py`` runs them on every training
worker, the decode/mix work in Ray CPU tasks):

* :func:`plan_epoch` - the data order as a function of (seed, epoch, rank, world) and the
  shards' light columns only (``item_id``, ``source``, ``domain``, ``num_samples``): this
  worker's shards in a per-epoch shuffled order, the 0.9-32 s filter, per-source/per-domain
  sampling weights (an item appears ``floor(w)`` times plus once more with probability
  ``frac(w)``), a shuffle buffer, duration buckets. It yields batches of :class:`RowRef`, so a
  resumed run walks the plan up to its position without reading a single code or sample.
* :class:`ShardRows` - the heavy columns (url, offsets, codes) of the planned rows, read per
  shard (a few shards cached).
* :func:`prepare_batch` - decode the rows' audio (:func:`spear.stages.decode.decode_batch`),
  mix (:mod:`spear.student.mixing`). Output rows carry int16 audio (32 kB per audio second;
  the fbank is computed on the training device, :mod:`spear.student.frontend`) and, per
  teacher, the (possibly token-mixed) codes.
* :func:`stream_batches` - the plan from a position on: ``prepare`` calls kept in flight ahead
  of training (Ray tasks in the job, plain calls in tests), collated in plan order.
* :class:`SecondsBucketer` - rows go to buckets by duration; a bucket yields a batch when its
  items reach ``batch_seconds`` of audio, so a batch holds utterances of similar length (little
  padding) and a bounded amount of audio.
* :func:`collate_rows` - rows -> a :class:`spear.student.model.AudioBatch`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from spear.formats import SAMPLE_RATE
from spear.shards.schema import SOURCE_COLUMNS, codes_from_bytes
from spear.stages.decode import DecodeConfig, decode_batch, decode_segment
from spear.storage import StorageConfig, filesystem
from spear.student.config import MixConfig, TrainDataConfig
from spear.student.losses import AUDIO, IGNORE, SPEECH
from spear.student.mixing import Codes, mix_batch
from spear.student.model import AudioBatch

AUDIO_DTYPE = np.dtype("<i2")
LIGHT_COLUMNS = ("item_id", "source", "domain", "num_samples")
"""What the plan reads: 30-odd bytes a row, whatever the codes' size."""
HEAVY_COLUMNS = ("url", "start", "duration")
DROPPED = "dropped"
"""Key of :func:`prepare_batch`'s output that is not a row column: ``{reason: rows}`` it left
out (decode errors, ``changed`` files); :func:`stream_batches` adds them to
:attr:`ShardRows.dropped`."""

log = logging.getLogger(__name__)


def row_codes(batch: dict[str, Any], i: int, teachers: dict[str, int]) -> Codes:
    """Per teacher prefix: uint8 (frames, C) of row ``i``, or None where it did not run."""
    out: Codes = {}
    for name, c in teachers.items():
        raw = batch[f"{name}_codes"][i]
        out[name] = None if raw is None or len(raw) == 0 else codes_from_bytes(raw, c)
    return out


@functools.lru_cache(maxsize=4)
def _noise_clips(urls: tuple[str, ...], storage: StorageConfig) -> list[np.ndarray]:
    return [decode_segment(u, 0.0, None, DecodeConfig(), storage) for u in urls]


def _batch_rng(item_ids: Iterable[str], seed: int) -> np.random.Generator:
    # Seeded by the batch's content: a retried task mixes exactly as the first attempt did.
    h = hashlib.sha256(str(seed).encode())
    for i in item_ids:
        h.update(str(i).encode())
    return np.random.default_rng(int.from_bytes(h.digest()[:8], "little"))


def prepare_batch(
    batch: dict[str, Any],
    *,
    teachers: dict[str, int],
    rates: dict[str, float],
    data: TrainDataConfig,
    mix: MixConfig,
    decode: DecodeConfig,
    storage: StorageConfig,
    seed: int,
) -> dict[str, Any]:
    """Token shard rows -> training rows (``item_id``, ``domain``, ``num_samples``, ``audio``
    int16 bytes, per teacher ``{t}_codes`` and ``{t}_frames``).

    ``teachers`` maps prefix -> codebooks, ``rates`` prefix -> token rate. The rows' source
    columns (:data:`spear.shards.schema.SOURCE_COLUMNS`, shards since version 2) go to decode:
    a file changed since the manifest fails as ``changed`` instead of giving other audio. Rows
    that fail to decode are dropped, logged and counted by reason under :data:`DROPPED`."""
    secs = np.asarray(batch["num_samples"], dtype=np.float64) / SAMPLE_RATE
    keep = (secs >= data.min_seconds) & (secs <= data.max_seconds)
    batch = {k: np.asarray(v)[keep] for k, v in batch.items()}
    n = int(keep.sum())
    empty: dict[str, Any] = {
        "item_id": [],
        "domain": [],
        "num_samples": np.zeros(0, np.int64),
        "audio": [],
        DROPPED: {},
    }
    for t in teachers:
        empty[f"{t}_codes"] = []
        empty[f"{t}_frames"] = np.zeros(0, np.int32)
    if n == 0:
        return empty
    cols = ("url", "start", "duration", *(c for c in SOURCE_COLUMNS if c in batch))
    decoded = decode_batch({c: batch[c] for c in cols}, decode, storage)
    errors = np.asarray(decoded["error_type"]).astype(str)
    dropped: Counter[str] = Counter()
    for i in np.flatnonzero(errors != ""):
        dropped[str(errors[i])] += 1
        log.warning("training data: dropped %s (%s)", batch["item_id"][i], decoded["error"][i])
    idx = np.flatnonzero(errors == "")
    if len(idx) == 0:
        return empty | {DROPPED: dict(dropped)}
    audio = [np.frombuffer(decoded["audio"][i], dtype="<i2") for i in idx]
    codes = [row_codes(batch, int(i), teachers) for i in idx]
    rng = _batch_rng(batch["item_id"][idx], seed)
    noise = _noise_clips(data.noise_urls, storage) if data.noise_urls else []
    audio, codes, _ = mix_batch(audio, codes, rates, mix, rng, noise)
    out: dict[str, Any] = {
        "item_id": np.asarray(batch["item_id"][idx], dtype=object),
        "domain": np.asarray(batch["domain"][idx], dtype=object),
        "num_samples": np.array([len(a) for a in audio], dtype=np.int64),
        "audio": _objects([np.ascontiguousarray(a, dtype=AUDIO_DTYPE).tobytes() for a in audio]),
        DROPPED: dict(dropped),
    }
    for t in teachers:
        cs = [c[t] for c in codes]
        out[f"{t}_codes"] = _objects([b"" if c is None else c.tobytes() for c in cs])
        out[f"{t}_frames"] = np.array([0 if c is None else len(c) for c in cs], dtype=np.int32)
    return out


def _objects(values: Sequence[Any]) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


def iter_rows(batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Column batches -> one dict per row (:data:`DROPPED` is not a column)."""
    for b in batches:
        keys = [k for k in b if k != DROPPED]
        for i in range(len(b[keys[0]]) if keys else 0):
            yield {k: b[k][i] for k in keys}


@dataclass
class SecondsBucketer:
    """Groups rows into batches of at most ``batch_seconds`` of audio, by duration bucket."""

    min_seconds: float
    max_seconds: float
    batch_seconds: float
    num_buckets: int
    _pending: list[list[Any]] = field(default_factory=list)
    _seconds: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._edges = np.geomspace(self.min_seconds, self.max_seconds, self.num_buckets + 1)[1:-1]
        self._pending = [[] for _ in range(self.num_buckets)]
        self._seconds = [0.0] * self.num_buckets

    def bucket_of(self, seconds: float) -> int:
        return int(np.searchsorted(self._edges, seconds, side="right"))

    def add(self, row: Any) -> list[Any] | None:
        """Add a row (a dict or a :class:`RowRef`); returns a full batch when the row's bucket
        cannot take another item."""
        n = row.num_samples if isinstance(row, RowRef) else row["num_samples"]
        s = float(n) / SAMPLE_RATE
        b = self.bucket_of(s)
        out = None
        if self._pending[b] and self._seconds[b] + s > self.batch_seconds:
            out = self._pending[b]
            self._pending[b], self._seconds[b] = [], 0.0
        self._pending[b].append(row)
        self._seconds[b] += s
        return out

    def flush(self) -> Iterator[list[Any]]:
        """The partial batches left at the end of the data."""
        for b in range(self.num_buckets):
            if self._pending[b]:
                yield self._pending[b]
            self._pending[b], self._seconds[b] = [], 0.0


def bucket_batches(
    rows: Iterable[dict[str, Any]], data: TrainDataConfig
) -> Iterator[list[dict[str, Any]]]:
    bucketer = SecondsBucketer(
        data.min_seconds, data.max_seconds, data.batch_seconds, data.num_buckets
    )
    for row in rows:
        full = bucketer.add(row)
        if full:
            yield full
    yield from bucketer.flush()


def collate_rows(rows: list[dict[str, Any]], teachers: dict[str, int]) -> AudioBatch:
    """Training rows -> padded tensors (int16 audio). Codes absent for an item are -100."""
    lengths = [int(r["num_samples"]) for r in rows]
    audio = torch.zeros(len(rows), max(lengths, default=0), dtype=torch.int16)
    for i, r in enumerate(rows):
        a = np.frombuffer(r["audio"], dtype=AUDIO_DTYPE)
        audio[i, : len(a)] = torch.from_numpy(a.copy())
    targets = {}
    for t, c in teachers.items():
        n = [int(r[f"{t}_frames"]) for r in rows]
        codes = torch.full((len(rows), max(max(n, default=0), 1), c), IGNORE, dtype=torch.long)
        for i, r in enumerate(rows):
            if n[i]:
                arr = codes_from_bytes(r[f"{t}_codes"], c)
                codes[i, : n[i]] = torch.from_numpy(arr.astype(np.int64))
        targets[t] = codes
    return AudioBatch(
        audio=audio,
        num_samples=torch.tensor(lengths, dtype=torch.long),
        domains=torch.tensor([AUDIO if str(r["domain"]) == "audio" else SPEECH for r in rows]),
        targets=targets,
    )


# ---- The epoch plan: data order as a function of (seed, epoch), resumable without replay.


@dataclass(frozen=True)
class RowRef:
    """One planned item: row ``row`` of shard ``shard`` (its index in the run's shard list)."""

    shard: int
    row: int
    num_samples: int
    copy: int = 0
    """0, or the repeat number of an item sampled more than once (weights > 1)."""


def _rng(*keys: object) -> np.random.Generator:
    h = hashlib.sha256("/".join(str(k) for k in keys).encode())
    return np.random.default_rng(int.from_bytes(h.digest()[:8], "little"))


def shard_order(num_shards: int, seed: int, epoch: int, rank: int, world: int) -> list[int]:
    """This worker's shards for ``epoch``: all shards permuted by (seed, epoch), dealt
    round-robin."""
    order = _rng("shards", seed, epoch).permutation(num_shards)
    return [int(i) for i in order[rank::world]]


def item_weights(light: dict[str, np.ndarray], data: TrainDataConfig) -> np.ndarray:
    """Sampling weight per row: ``source_weights[source] * domain_weights[domain]`` (1 where
    absent)."""
    n = len(light["num_samples"])
    w = np.ones(n)
    for col, table in (("source", data.source_weights), ("domain", data.domain_weights)):
        if table:
            w *= np.array([table.get(str(v), 1.0) for v in light[col]], dtype=np.float64)
    return w


def plan_epoch(
    num_shards: int,
    light: Callable[[int], dict[str, np.ndarray]],
    data: TrainDataConfig,
    *,
    planned: Callable[[int, np.ndarray], None] | None = None,
    seed: int,
    epoch: int,
    rank: int = 0,
    world: int = 1,
) -> Iterator[list[RowRef]]:
    """This worker's batches of ``epoch``, in order. ``light(shard)`` gives a shard's
    :data:`LIGHT_COLUMNS`; ``planned(shard, copies)`` hears how often each row of a shard will
    be used (:meth:`ShardRows.planned`). Deterministic in (seed, epoch, rank, world, the
    shards, ``data``)."""
    buffer: list[RowRef] = []
    pick = _rng("buffer", seed, epoch, rank)
    bucketer = SecondsBucketer(
        data.min_seconds, data.max_seconds, data.batch_seconds, data.num_buckets
    )

    def emit(ref: RowRef) -> Iterator[list[RowRef]]:
        full = bucketer.add(ref)
        if full:
            yield full

    for shard in shard_order(num_shards, seed, epoch, rank, world):
        cols = light(shard)
        samples = np.asarray(cols["num_samples"], dtype=np.int64)
        secs = samples / SAMPLE_RATE
        keep = (secs >= data.min_seconds) & (secs <= data.max_seconds)
        w = item_weights(cols, data)
        extra = _rng("weights", seed, epoch, shard).random(len(samples))
        copies = np.floor(w).astype(np.int64) + (extra < w - np.floor(w))
        copies[~keep] = 0
        if planned is not None:
            planned(shard, copies)
        for row in np.flatnonzero(copies):
            for c in range(int(copies[row])):
                ref = RowRef(shard, int(row), int(samples[row]), c)
                if len(buffer) < data.shuffle_buffer:
                    buffer.append(ref)
                    continue
                # A full buffer: a random slot goes out, the new row takes its place.
                j = int(pick.integers(len(buffer)))
                out, buffer[j] = buffer[j], ref
                yield from emit(out)
    for j in pick.permutation(len(buffer)):
        yield from emit(buffer[int(j)])
    yield from bucketer.flush()


class ShardRows:
    """Reads shards' columns for planned rows: the light ones for the plan, the heavy ones
    (url, offsets, codes) when a planned row is first prepared. A shard's heavy columns are
    read once an epoch; only the rows still planned are kept, each dropped once used (or
    skipped), so memory follows the shuffle buffer, not the shards."""

    def __init__(
        self, urls: Sequence[str], teachers: Sequence[str], storage: StorageConfig
    ) -> None:
        self.urls = list(urls)
        self.columns = (
            *LIGHT_COLUMNS,
            *HEAVY_COLUMNS,
            *SOURCE_COLUMNS,
            *(f"{t}_codes" for t in teachers),
        )
        self.storage = storage
        self._uses: dict[int, dict[int, int]] = {}
        self._rows: dict[tuple[int, int], dict[str, Any]] = {}
        self.heavy_reads = 0
        """Shards whose heavy columns were read (a test and benchmark figure)."""
        self.dropped: Counter[str] = Counter()
        """Rows :func:`stream_batches` got back dropped, by reason (``changed``, ...)."""

    def _read(self, shard: int, columns: Sequence[str]) -> dict[str, np.ndarray]:
        fs, path = filesystem(self.urls[shard], self.storage)
        names = set(pq.read_schema(path, filesystem=fs).names)
        # A version 1 shard has no source columns: its rows decode without the `changed` check.
        have = [c for c in columns if c in names or c not in SOURCE_COLUMNS]
        table = pq.read_table(path, columns=have, filesystem=fs)
        out = {c: table.column(c).to_numpy(zero_copy_only=False) for c in have}
        for c in columns:
            if c not in out:
                out[c] = _objects([None] * table.num_rows)
        return out

    def light(self, shard: int) -> dict[str, np.ndarray]:
        return self._read(shard, LIGHT_COLUMNS)

    def planned(self, shard: int, copies: np.ndarray) -> None:
        """The plan's uses of ``shard``'s rows (copies per row) this epoch."""
        self._uses[shard] = {int(r): int(copies[r]) for r in np.flatnonzero(copies)}

    def _use(self, ref: RowRef) -> dict[str, Any] | None:
        key = (ref.shard, ref.row)
        row = self._rows.get(key)
        uses = self._uses[ref.shard]
        uses[ref.row] -= 1
        if uses[ref.row] == 0:
            del uses[ref.row]
            self._rows.pop(key, None)
        return row

    def skip(self, refs: Sequence[RowRef]) -> None:
        for ref in refs:
            self._use(ref)

    def rows(self, refs: Sequence[RowRef]) -> dict[str, np.ndarray]:
        """The planned rows, all columns ``prepare_batch`` reads, in ``refs`` order."""
        for ref in refs:
            if (ref.shard, ref.row) not in self._rows:
                self.heavy_reads += 1
                table = self._read(ref.shard, self.columns)
                for r in self._uses[ref.shard]:
                    self._rows[(ref.shard, r)] = {c: table[c][r] for c in self.columns}
        parts: dict[str, list[Any]] = {c: [] for c in self.columns}
        for ref in refs:
            key = (ref.shard, ref.row)
            row = self._rows[key]
            self._use(ref)
            for c in self.columns:
                parts[c].append(row[c])
        out = {c: _objects(v) for c, v in parts.items()}
        # A repeated item (weight > 1) gets its own id for the mixing seed: its copies mix apart.
        out["item_id"] = _objects(
            [f"{i}#{r.copy}" if r.copy else i for i, r in zip(parts["item_id"], refs, strict=True)]
        )
        for c in ("start", "duration"):
            out[c] = np.asarray(parts[c], dtype=np.float64)
        out["num_samples"] = np.asarray(parts["num_samples"], dtype=np.int64)
        return out


Prepare = Callable[[dict[str, np.ndarray]], Any]
"""Rows -> prepared rows, or a handle ``resolve`` turns into them (a Ray ObjectRef)."""


def stream_batches(
    plan: Iterable[list[RowRef]],
    reader: ShardRows,
    prepare: Prepare,
    teachers: dict[str, int],
    *,
    skip: int = 0,
    prep_rows: int = 16,
    prefetch: int = 4,
    resolve: Callable[[list[Any]], list[dict[str, Any]]] = lambda xs: xs,
) -> Iterator[tuple[int, AudioBatch]]:
    """(plan index, batch) for the plan's batches from index ``skip`` on, in plan order.
    Skipped batches are only walked (their rows are never read, decoded or mixed). Each batch
    is prepared in chunks of ``prep_rows`` items, ``prefetch`` batches ahead. A batch whose
    every item failed to decode is left out (the index says where the stream is)."""
    pending: deque[list[Any]] = deque()
    plan_it = iter(plan)
    for _ in range(skip):
        refs = next(plan_it, None)
        if refs is None:
            return
        reader.skip(refs)

    def submit() -> bool:
        refs = next(plan_it, None)
        if refs is None:
            return False
        rows = reader.rows(refs)
        n = len(refs)
        pending.append(
            [
                prepare({k: v[i : i + prep_rows] for k, v in rows.items()})
                for i in range(0, n, prep_rows)
            ]
        )
        return True

    while len(pending) < prefetch and submit():
        pass
    index = skip
    while pending:
        chunks = resolve(pending.popleft())
        submit()
        for chunk in chunks:
            reader.dropped.update(chunk.get(DROPPED, {}))
        rows = list(iter_rows(chunks))
        if rows:
            yield index, collate_rows(rows, teachers)
        index += 1
