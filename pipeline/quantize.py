"""The quantiser jobs: ``spear quantizer train`` and ``spear quantizer eval`` on any fsspec URL.

This is the storage side of :mod:`spear.quantizer` (a pure torch library): it reads embedding
shards, and reads and writes quantisers and training checkpoints.

Embeddings (:mod:`spear.formats.embeddings`: float16 (frames, dim) per item): one shard file, or
a finished ``spear embed`` (or ``spear features``) output, whose ``index.parquet`` lists the
shards read (other files in its folders are never read).

``spear quantizer train --out OUT`` writes, in this order::

    OUT/checkpoint.safetensors   the resumable state, every ``checkpoint_every`` steps
    OUT/quantizer.json           a readable copy of the quantiser's header (id, shapes, data)
    OUT/quantizer.safetensors    the quantiser; written last, so its presence means finished

The checkpoint and the quantiser's header keep the run record (``spear/record.py``: the recipe,
the data settings and the embeddings' content digest). A killed run resumes from its checkpoint
(same record only); its remaining steps see another batch order, so its weights, and hence its
id, differ from an uninterrupted run's. A rerun on a finished OUT with the same record changes
nothing and says so; another is refused naming what differs (train into another ``--out``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from spear.errors import SpearError
from spear.formats.embeddings import (
    EmbeddingDataError,
    committed_shards,
    embedding_frames,
    read_embedding_shard,
)
from spear.formats.parquet import read_metadata
from spear.quantizer.config import QuantizerConfig, QuantizerDataConfig
from spear.quantizer.data import choose_heldout, shuffled_batches
from spear.quantizer.eval import EvalReport, evaluate, heldout_items
from spear.quantizer.mvq import Quantizer, QuantizerInfo
from spear.quantizer.serial import (
    CHECKPOINT_FILE,
    INFO_FILE,
    QUANTIZER_FILE,
    quantizer_json,
    quantizer_to_bytes,
)
from spear.quantizer.train import QuantizerTrainer, fit, normalisation_stats, pick_device
from spear.record import RunRecord, compare
from spear.stages.quantizers import load_quantizer
from spear.storage import (
    StorageConfig,
    canonical_url,
    exists,
    join,
    read_bytes,
    write_atomic,
)

LEGACY_CHECKPOINT = "checkpoint.pt"
"""The pickled checkpoint earlier spear versions wrote; never read."""
SPEED_ONLY = ("device", "log_every", "checkpoint_every")
"""Train settings that do not change the result: a resume may change them."""


# -- embeddings ------------------------------------------------------------------------------


@dataclass
class EmbeddingSet:
    """The shards under one URL, with what their metadata says."""

    url: str
    shards: list[str]
    dim: int
    teacher: str = ""
    layer: int = -1
    weights: str = ""
    """The teacher's weights: checkpoint sha256, ``random``, or empty when the shards do not
    say (``spear embed`` records them; other writers may not)."""
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


def open_embeddings(
    url: str, storage: StorageConfig, data: QuantizerDataConfig, seed: int = 0
) -> EmbeddingSet:
    """Index the shards (item ids and frame counts only) and choose the held-out items."""
    shards = committed_shards(url, storage)
    dims: set[int] = set()
    weights: set[str] = set()
    emb = EmbeddingSet(url=url, shards=shards, dim=0)
    for shard in shards:
        table = read_embedding_shard(shard, storage, ["item_id", "num_frames"])
        meta = read_metadata(table.schema)
        if "dim" not in meta:
            raise EmbeddingDataError(f"{shard}: no 'dim' in the shard's spear metadata")
        dims.add(int(meta["dim"]))
        emb.teacher = emb.teacher or str(meta.get("teacher", "") or "")
        emb.layer = int(meta.get("layer", emb.layer))
        weights.add(_weights(meta))
        for item, n in zip(
            table.column("item_id").to_pylist(), table.column("num_frames").to_pylist(), strict=True
        ):
            emb.items[item] = int(n)
    if len(dims) != 1:
        raise EmbeddingDataError(f"shards under {url!r} disagree on dim: {sorted(dims)}")
    emb.dim = dims.pop()
    if len(weights) != 1:
        raise EmbeddingDataError(
            f"shards under {url!r} come from different teacher weights: {sorted(weights)}"
        )
    emb.weights = weights.pop()
    emb.heldout_items = choose_heldout(emb.items, data, seed)
    return emb


def _weights(meta: dict[str, Any]) -> str:
    """A shard's teacher weights: ``spear embed`` records ``checkpoint_sha256`` (null: random
    weights); without the key they are unknown (empty)."""
    if "checkpoint_sha256" not in meta:
        return ""
    return str(meta["checkpoint_sha256"] or "random")


def _frames(table: Any, dim: int, keep: set[str] | None, drop: set[str]) -> np.ndarray:
    """Decode a table's embeddings to float32 (frames, dim), filtering items."""
    parts = []
    ids = table.column("item_id").to_pylist()
    blobs = table.column("embeddings").to_pylist()
    for item, blob in zip(ids, blobs, strict=True):
        if item in drop or (keep is not None and item not in keep):
            continue
        parts.append(embedding_frames(blob, dim))
    if not parts:
        return np.zeros((0, dim), np.float32)
    return np.concatenate(parts).astype(np.float32)


def load_frames(
    emb: EmbeddingSet, storage: StorageConfig, items: set[str] | None, max_frames: int = 0
) -> np.ndarray:
    """All frames (float32 (N, dim)) of ``items`` (None: all), at most ``max_frames`` (0: all)."""
    parts, total = [], 0
    for shard in emb.shards:
        table = read_embedding_shard(shard, storage, ["item_id", "embeddings"])
        arr = _frames(table, emb.dim, items, set())
        parts.append(arr)
        total += len(arr)
        if max_frames and total >= max_frames:
            break
    out = np.concatenate(parts) if parts else np.zeros((0, emb.dim), np.float32)
    return out[:max_frames] if max_frames else out


def train_batches(
    emb: EmbeddingSet, storage: StorageConfig, batch_size: int, shuffle_frames: int, seed: int
) -> Iterator[np.ndarray]:
    """Endless float32 minibatches (batch_size, dim) of training frames (held-out excluded)."""
    drop = set(emb.heldout_items)
    if emb.total_frames - sum(emb.items[i] for i in drop) <= 0:
        raise EmbeddingDataError(f"no training frames left under {emb.url!r}")

    def read(shard: int) -> np.ndarray:
        table = read_embedding_shard(emb.shards[shard], storage, ["item_id", "embeddings"])
        return _frames(table, emb.dim, None, drop)

    return shuffled_batches(read, len(emb.shards), emb.dim, batch_size, shuffle_frames, seed)


# -- train -------------------------------------------------------------------------------------


def _plain(obj: Any) -> Any:
    """A config dataclass as JSON values (tuples become lists, as they do in the files)."""
    return json.loads(json.dumps(asdict(obj)))


def quantizer_record(cfg: QuantizerConfig, emb: EmbeddingSet, storage: StorageConfig) -> RunRecord:
    """What decides the trained quantiser (the run record, ``spear/record.py``): the recipe
    (speed settings aside), the data settings and the embeddings' content (their items, frame
    counts, dim, teacher and weights; never their URL: a copy elsewhere is the same data). A
    finished or resumed OUT must have been trained with the same."""
    recipe = {k: v for k, v in _plain(cfg.train).items() if k not in SPEED_ONLY}
    h = hashlib.blake2b(digest_size=16)
    head = {"dim": emb.dim, "teacher": emb.teacher, "layer": emb.layer, "weights": emb.weights}
    h.update(json.dumps(head, sort_keys=True).encode())
    for item in sorted(emb.items):
        h.update(f"\0{item}\0{emb.items[item]}".encode())
    return RunRecord(
        "quantizer",
        {"train": recipe, "data": _plain(cfg.data)},
        h.hexdigest(),
        "embeddings content (items and frames)",
        len(emb.items),
        info={"embeddings": canonical_url(emb.url, storage), "frames": emb.total_frames},
    )


def train_quantizer(
    cfg: QuantizerConfig,
    embeddings: str,
    out: str,
    storage: StorageConfig,
    report: Callable[[str], None] = print,
) -> Quantizer:
    """Train on the shards under ``embeddings`` into the folder ``out`` (see the module
    docstring): resumes from ``out``'s checkpoint; a finished ``out`` is left as it is."""
    tc = cfg.train
    emb = open_embeddings(embeddings, storage, cfg.data, seed=tc.seed)
    record = quantizer_record(cfg, emb, storage)
    if exists(join(out, QUANTIZER_FILE), storage):
        q: Quantizer = load_quantizer(out, storage)
        recorded = q.info.training.get("record")
        if recorded is not None:  # quantisers of earlier spear versions did not record it
            compare(repr(out), f"the quantiser {q.id}", recorded, record)
        report(
            f"{out} is finished: quantiser {q.id} (held-out RRL {q.info.rrl}); nothing to do "
            "(to train again, give another --out)"
        )
        return q
    legacy = join(out, LEGACY_CHECKPOINT)
    if exists(legacy, storage):
        raise SpearError(
            f"{legacy!r} is a pickled checkpoint of an older spear, which is never read; "
            "delete it to start this training over"
        )
    device = pick_device(tc.device)
    torch.manual_seed(tc.seed)
    heldout = torch.from_numpy(load_frames(emb, storage, set(emb.heldout_items)))
    info = QuantizerInfo(
        dim=emb.dim,
        num_codebooks=tc.num_codebooks,
        codebook_size=tc.codebook_size,
        teacher=tc.teacher or emb.teacher,
        layer=tc.layer if tc.layer >= 0 else emb.layer,
        teacher_weights=emb.weights,
    )
    trainer = QuantizerTrainer(tc, info, device)
    ckpt_url = join(out, CHECKPOINT_FILE)
    kept = record.as_dict()
    if exists(ckpt_url, storage):
        extra = trainer.load_state_bytes(read_bytes(ckpt_url, storage), ckpt_url)
        compare(repr(out), f"its checkpoint {CHECKPOINT_FILE}", extra.get("record"), record)
        report(f"resumed from {ckpt_url} at step {trainer.step_count}")
    elif tc.normalise:
        frames = load_frames(emb, storage, set(emb.items) - set(emb.heldout_items), tc.norm_frames)
        trainer.quantizer.set_normalisation(*normalisation_stats(torch.from_numpy(frames)))
    trainer.quantizer.info.training = {**emb.summary(), "config": _plain(tc), "record": kept}
    # A different seed per resume: replaying the exact batch order is not needed.
    batches = train_batches(
        emb, storage, tc.batch_size, cfg.data.shuffle_frames, tc.seed + trainer.step_count
    )

    def checkpoint(tr: QuantizerTrainer) -> None:
        write_atomic(ckpt_url, tr.state_bytes({"record": kept}), storage)

    rounds = cfg.encode.refine_rounds
    q = fit(trainer, batches, heldout, refine_rounds=rounds, report=report, checkpoint=checkpoint)
    write_atomic(join(out, INFO_FILE), quantizer_json(q), storage)
    path = save_quantizer(q, out, storage)
    report(
        f"saved quantiser {q.id} to {path} (held-out RRL {q.info.rrl:.4f}; trained on "
        f"{q.info.trained_on()})"
    )
    return q


def save_quantizer(q: Quantizer, url: str, storage: StorageConfig) -> str:
    """Write ``q`` to a folder (its ``quantizer.safetensors``) or a ``.safetensors`` URL;
    returns the file's URL. Readers load it with :func:`spear.stages.quantizers.load_quantizer`."""
    target = url if url.endswith(".safetensors") else join(url, QUANTIZER_FILE)
    write_atomic(target, quantizer_to_bytes(q), storage)
    return target


# -- eval --------------------------------------------------------------------------------------


def evaluate_quantizer(
    cfg: QuantizerConfig,
    quantizer: str,
    embeddings: str,
    storage: StorageConfig,
    *,
    max_frames: int = 10_000,
    json_out: str | None = None,
) -> EvalReport:
    """RRL and codebook usage of the quantiser at ``quantizer`` on its held-out items among
    ``embeddings`` (when there are any; else the first ``max_frames`` frames); the report also
    goes to ``json_out`` when given."""
    q: Quantizer = load_quantizer(quantizer, storage)
    emb = open_embeddings(embeddings, storage, cfg.data)
    if emb.dim != q.dim:
        raise SpearError(
            f"embeddings {embeddings!r} are {emb.dim}-d, quantiser {quantizer!r} encodes "
            f"{q.dim}-d ones: give embeddings of the teacher it was trained on "
            f"({q.info.teacher or 'unknown'}, layer {q.info.layer})"
        )
    if emb.teacher and q.info.teacher and emb.teacher != q.info.teacher:
        raise SpearError(
            f"embeddings {embeddings!r} are {emb.teacher}'s, quantiser {quantizer!r} was "
            f"trained on {q.info.teacher}'s"
        )
    if emb.weights and q.info.teacher_weights and emb.weights != q.info.teacher_weights:
        raise SpearError(
            f"embeddings {embeddings!r} come from {emb.teacher or 'a teacher'} with weights "
            f"{emb.weights}, quantiser {quantizer!r} was trained on {q.info.trained_on()}"
        )
    held = heldout_items(q, emb.items)
    frames = load_frames(emb, storage, held or None, 0 if held else max_frames)
    rounds = cfg.encode.refine_rounds
    result = evaluate(q, torch.from_numpy(frames), rounds, heldout=bool(held))
    result.trained_on = q.info.trained_on()
    if json_out:
        write_atomic(json_out, json.dumps(result.to_dict(), indent=2).encode(), storage)
    return result
