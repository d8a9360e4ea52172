"""Training data: token shards -> decoded, mixed fbank rows -> length-bucketed batches.

Pure pieces, each testable without Ray (``pipeline/train.py`` chains them on Ray Data):

* the shards themselves come through the token shard contract
  (:func:`spear.shards.index.open_run`: the index, every shard's metadata checked).
* :func:`prepare_batch` - a ``map_batches`` function on CPU workers: drop items outside
  [min_seconds, max_seconds], decode their audio (:func:`spear.stages.decode.decode_batch`),
  mix (:mod:`spear.student.mixing`), compute the fbank. Output rows carry the fbank as float32
  bytes and, per teacher, the (possibly token-mixed) codes.
* :class:`SecondsBucketer` - on the training worker: rows go to buckets by duration; a bucket
  yields a batch when its items reach ``batch_seconds`` of audio, so a batch holds utterances of
  similar length (little padding) and a bounded amount of audio.
* :func:`collate_rows` - rows -> a :class:`spear.student.model.Batch`.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from spear.formats import SAMPLE_RATE
from spear.shards.schema import codes_from_bytes
from spear.stages.decode import DecodeConfig, decode_batch, decode_segment
from spear.storage import StorageConfig
from spear.student.config import MixConfig, TrainDataConfig
from spear.student.frontend import NUM_MEL_BINS, fbank
from spear.student.losses import AUDIO, IGNORE, SPEECH
from spear.student.mixing import Codes, mix_batch
from spear.student.model import Batch

FEAT_DTYPE = np.dtype("<f4")


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
    """Token shard rows -> training rows (``item_id``, ``domain``, ``num_samples``,
    ``num_frames``, ``fbank`` float32 (frames, 128) bytes, per teacher ``{t}_codes`` and
    ``{t}_frames``).

    ``teachers`` maps prefix -> codebooks, ``rates`` prefix -> token rate. Rows that fail to
    decode are dropped (the tokenize job already quarantined what it could not read)."""
    secs = np.asarray(batch["num_samples"], dtype=np.float64) / SAMPLE_RATE
    keep = (secs >= data.min_seconds) & (secs <= data.max_seconds)
    batch = {k: np.asarray(v)[keep] for k, v in batch.items()}
    n = int(keep.sum())
    empty = {
        "item_id": [],
        "domain": [],
        "num_samples": np.zeros(0, np.int64),
        "num_frames": np.zeros(0, np.int32),
        "fbank": [],
    }
    for t in teachers:
        empty[f"{t}_codes"] = []
        empty[f"{t}_frames"] = np.zeros(0, np.int32)
    if n == 0:
        return empty
    decoded = decode_batch(
        {"url": batch["url"], "start": batch["start"], "duration": batch["duration"]},
        decode,
        storage,
    )
    ok = np.asarray(decoded["error_type"]).astype(str) == ""
    idx = np.flatnonzero(ok)
    if len(idx) == 0:
        return empty
    audio = [np.frombuffer(decoded["audio"][i], dtype="<i2") for i in idx]
    codes = [row_codes(batch, int(i), teachers) for i in idx]
    rng = _batch_rng(batch["item_id"][idx], seed)
    noise = _noise_clips(data.noise_urls, storage) if data.noise_urls else []
    audio, codes, _ = mix_batch(audio, codes, rates, mix, rng, noise)
    feats = [fbank(a).numpy().astype(FEAT_DTYPE) for a in audio]
    out: dict[str, Any] = {
        "item_id": np.asarray(batch["item_id"][idx], dtype=object),
        "domain": np.asarray(batch["domain"][idx], dtype=object),
        "num_samples": np.array([len(a) for a in audio], dtype=np.int64),
        "num_frames": np.array([len(f) for f in feats], dtype=np.int32),
        "fbank": _objects([f.tobytes() for f in feats]),
    }
    for t in teachers:
        cs = [c[t] for c in codes]
        out[f"{t}_codes"] = _objects([b"" if c is None else c.tobytes() for c in cs])
        out[f"{t}_frames"] = np.array([0 if c is None else len(c) for c in cs], dtype=np.int32)
    return out


def _objects(values: list[bytes]) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


def iter_rows(batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Column batches -> one dict per row."""
    for b in batches:
        keys = list(b)
        for i in range(len(b[keys[0]]) if keys else 0):
            yield {k: b[k][i] for k in keys}


@dataclass
class SecondsBucketer:
    """Groups rows into batches of at most ``batch_seconds`` of audio, by duration bucket."""

    min_seconds: float
    max_seconds: float
    batch_seconds: float
    num_buckets: int
    _pending: list[list[dict[str, Any]]] = field(default_factory=list)
    _seconds: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._edges = np.geomspace(self.min_seconds, self.max_seconds, self.num_buckets + 1)[1:-1]
        self._pending = [[] for _ in range(self.num_buckets)]
        self._seconds = [0.0] * self.num_buckets

    def bucket_of(self, seconds: float) -> int:
        return int(np.searchsorted(self._edges, seconds, side="right"))

    def add(self, row: dict[str, Any]) -> list[dict[str, Any]] | None:
        """Add a row; returns a full batch when the row's bucket cannot take another item."""
        s = float(row["num_samples"]) / SAMPLE_RATE
        b = self.bucket_of(s)
        out = None
        if self._pending[b] and self._seconds[b] + s > self.batch_seconds:
            out = self._pending[b]
            self._pending[b], self._seconds[b] = [], 0.0
        self._pending[b].append(row)
        self._seconds[b] += s
        return out

    def flush(self) -> Iterator[list[dict[str, Any]]]:
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


def collate_rows(rows: list[dict[str, Any]], teachers: dict[str, int]) -> Batch:
    """Training rows -> padded tensors. Codes absent for an item are -100."""
    frames = [int(r["num_frames"]) for r in rows]
    feats = torch.zeros(len(rows), max(frames), NUM_MEL_BINS)
    for i, r in enumerate(rows):
        f = np.frombuffer(r["fbank"], dtype=FEAT_DTYPE).reshape(-1, NUM_MEL_BINS)
        feats[i, : len(f)] = torch.from_numpy(f.copy())
    targets = {}
    for t, c in teachers.items():
        n = [int(r[f"{t}_frames"]) for r in rows]
        codes = torch.full((len(rows), max(max(n), 1), c), IGNORE, dtype=torch.long)
        for i, r in enumerate(rows):
            if n[i]:
                arr = codes_from_bytes(r[f"{t}_codes"], c)
                codes[i, : n[i]] = torch.from_numpy(arr.astype(np.int64))
        targets[t] = codes
    return Batch(
        feats=feats,
        feat_lens=torch.tensor(frames, dtype=torch.long),
        domains=torch.tensor([AUDIO if str(r["domain"]) == "audio" else SPEECH for r in rows]),
        targets=targets,
        num_samples=torch.tensor([int(r["num_samples"]) for r in rows]),
    )
