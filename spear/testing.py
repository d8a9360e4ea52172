"""Builders for tests and benchmarks: valid spear outputs written with the real writers.

:func:`write_token_output` makes a finished tokenize output (token shards, quarantine files,
commit entries, plan, index, ``_SUCCESS.json``) from items the caller describes, through
:class:`spear.shards.writer.TokenShardWriter` and the commit protocol, so it is exactly what
``spear tokenize`` would have written for those codes (``spear shards validate`` passes).
:func:`write_embedding_shards` does the same for a ``spear embed`` output.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from spear.formats import SAMPLE_RATE
from spear.record import RunRecord
from spear.shards.schema import (
    FRAME_FORMULAS,
    NOT_RUN_FRAMES,
    PLAN_FILE,
    SUCCESS_FILE,
    TokenTeacherInfo,
)
from spear.storage import StorageConfig, join, write_atomic


@dataclass
class TokenItem:
    """One item of a test output: its audio's length, where it lives, its codes per teacher
    (uint8 ``(frames, C)``; None where the teacher did not run), or an error (quarantined)."""

    item_id: str
    num_samples: int
    domain: str = "speech"
    source: str = "test"
    url: str = ""
    start: float = 0.0
    codes: dict[str, np.ndarray | None] = field(default_factory=dict)
    error_type: str = ""
    error: str = ""


def teacher(
    prefix: str,
    num_codebooks: int,
    *,
    codebook_size: int = 256,
    quantizer_id: str | None = None,
    domains: Sequence[str] | None = None,
) -> TokenTeacherInfo:
    """A teacher entry for tests: ``wavlm`` (50 Hz, speech + audio) or ``dasheng`` (25 Hz,
    audio) by prefix."""
    family = "dasheng" if prefix.startswith("dasheng") else "wavlm"
    return TokenTeacherInfo(
        prefix=prefix,
        teacher=f"{family}-test",
        family=family,
        layer=21 if family == "wavlm" else 40,
        frame_rate=50.0 if family == "wavlm" else 25.0,
        num_codebooks=num_codebooks,
        codebook_size=codebook_size,
        quantizer_id=quantizer_id or f"mvq-test-{prefix}",
        checkpoint_sha256=None,
        domains=tuple(domains or (("audio",) if family == "dasheng" else ("speech", "audio"))),
    )


def random_codes(info: TokenTeacherInfo, num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 codes of the right shape for an item of ``num_samples`` (the family's formula)."""
    frames = FRAME_FORMULAS[info.family](num_samples)
    return rng.integers(0, info.codebook_size, (frames, info.num_codebooks), dtype=np.uint8)


def write_token_output(
    out: str,
    shards: Sequence[Sequence[TokenItem]],
    teachers: Sequence[TokenTeacherInfo],
    *,
    run_id: str = "test-run",
    storage: StorageConfig | None = None,
) -> list[dict[str, Any]]:
    """A finished tokenize output at ``out`` whose shard N holds the items ``shards[N]``;
    returns the shards' commit entries. :func:`cut` makes the shards from a list of items."""
    batches = [_batch(items, teachers) for items in shards]
    return write_token_batches(out, batches, teachers, run_id=run_id, storage=storage)


def write_token_batches(
    out: str,
    batches: Sequence[dict[str, Any]],
    teachers: Sequence[TokenTeacherInfo],
    *,
    run_id: str = "test-run",
    storage: StorageConfig | None = None,
) -> list[dict[str, Any]]:
    """A finished tokenize output at ``out`` whose shard N holds the rows of ``batches[N]``
    (the tokenize actors' output columns), written and committed as the job's write tasks
    do; returns the shards' commit entries."""
    from spear.commit import commit_unit
    from spear.shards.writer import TokenShardWriter, write_index

    storage = storage or StorageConfig()
    writer = TokenShardWriter(tuple(teachers), run_id)
    entries = []
    for shard, batch in enumerate(batches):
        files, entry = writer(shard, batch)
        name = entry.pop("name")
        entries.append(commit_unit(out, name, files, entry | {"unit": shard}, storage))
    write_index(out, entries, storage)
    n = sum(len(b["item_id"]) for b in batches)
    record = RunRecord("tokenize", {}, run_id, "test items", n, len(entries))
    write_atomic(join(out, PLAN_FILE), json.dumps(record.as_dict()).encode(), storage)
    summary = {"items": n, "shards": len(entries)}
    write_atomic(join(out, SUCCESS_FILE), json.dumps(summary).encode(), storage)
    return entries


def write_embedding_shards(
    url: str,
    x: np.ndarray,
    *,
    shards: int = 2,
    item_frames: int = 50,
    storage: StorageConfig | None = None,
    **meta: Any,
) -> list[str]:
    """A finished ``spear embed`` output at ``url`` holding the frames ``x`` (N, dim) as
    float16 items of ``item_frames`` (item ``i`` in shard ``i % shards``), with ``meta`` in
    every shard's metadata; written and committed as the job's write tasks do, then indexed.
    Returns the shard URLs."""
    from spear.commit import commit_unit
    from spear.formats.embeddings import (
        EMBEDDING_DTYPE,
        embedding_shard_table,
        shard_path,
        write_embedding_index,
    )
    from spear.formats.parquet import parquet_bytes

    storage = storage or StorageConfig()
    items = [x[i : i + item_frames] for i in range(0, len(x), item_frames)]
    entries = []
    for s in range(shards):
        mine = [(f"item{i:06d}", a) for i, a in enumerate(items) if i % shards == s]
        frames = np.array([len(a) for _, a in mine], dtype=np.int64)
        table = embedding_shard_table(
            [i for i, _ in mine],
            frames,
            [np.ascontiguousarray(a, EMBEDDING_DTYPE).tobytes() for _, a in mine],
            dim=x.shape[1],
            **meta,
        )
        name = f"shard-{s:05d}"
        files = {shard_path(name): parquet_bytes(table)}
        entry = {"unit": s, "rows": len(mine), "frames": int(frames.sum())}
        entries.append(commit_unit(url, name, files, entry, storage))
    write_embedding_index(url, entries, storage)
    summary = {"embedded": len(items), "shards": shards}
    write_atomic(join(url, SUCCESS_FILE), json.dumps(summary).encode(), storage)
    return [join(url, shard_path(e["name"])) for e in entries]


def cut(items: Sequence[TokenItem], items_per_shard: int) -> list[list[TokenItem]]:
    """``items`` sorted by id, in shards of ``items_per_shard`` (as ``spear tokenize`` cuts)."""
    ordered = sorted(items, key=lambda it: it.item_id)
    return [ordered[i : i + items_per_shard] for i in range(0, len(ordered), items_per_shard)]


def _batch(items: Sequence[TokenItem], teachers: Sequence[TokenTeacherInfo]) -> dict[str, Any]:
    """What the tokenize job's last teacher stage hands the writer for these items."""

    def col(values: list[Any]) -> np.ndarray:
        arr = np.empty(len(values), dtype=object)
        arr[:] = values
        return arr

    n = len(items)
    batch: dict[str, Any] = {
        "item_id": col([it.item_id for it in items]),
        "source": col([it.source for it in items]),
        "domain": col([it.domain for it in items]),
        "url": col([it.url or f"memory://test/{it.item_id}.flac" for it in items]),
        "start": np.array([it.start for it in items], dtype=np.float64),
        "duration": np.array([it.num_samples / SAMPLE_RATE for it in items]),
        "num_samples": np.array(
            [0 if it.error_type else it.num_samples for it in items], dtype=np.int64
        ),
        "error_type": col([it.error_type for it in items]),
        "error": col([it.error for it in items]),
        "decode_seconds": np.zeros(n),
    }
    for t in teachers:
        codes = [None if it.error_type else it.codes.get(t.prefix) for it in items]
        batch[f"{t.prefix}_frames"] = np.array(
            [NOT_RUN_FRAMES if c is None else len(c) for c in codes], dtype=np.int32
        )
        batch[f"{t.prefix}_codes"] = col(
            [b"" if c is None else np.ascontiguousarray(c).tobytes() for c in codes]
        )
        batch[f"{t.prefix}_seconds"] = np.zeros(n)
    return batch


def write_synthetic_output(
    out_dir: str,
    n_items: int,
    seconds: tuple[float, float],
    seed: int = 0,
    wavlm_codebooks: int = 2,
    dasheng_codebooks: int = 1,
    items_per_shard: int = 8,
) -> list[TokenTeacherInfo]:
    """A finished tokenize output on local disk with learnable synthetic codes
    (:func:`spear.student.synthetic.synth_items`): ``out_dir/audio/*.wav`` and the token shards,
    index and entries, written with the real writer. Returns the teachers."""
    import os

    import soundfile as sf

    from spear.student.synthetic import synth_items

    teachers = [
        teacher("wavlm", wavlm_codebooks, quantizer_id="synthetic-wavlm"),
        teacher("dasheng", dasheng_codebooks, quantizer_id="synthetic-dasheng"),
    ]
    os.makedirs(os.path.join(out_dir, "audio"), exist_ok=True)
    items = []
    for i, it in enumerate(synth_items(n_items, seconds, seed, wavlm_codebooks, dasheng_codebooks)):
        audio = np.asarray(it["audio"])
        path = os.path.join(out_dir, "audio", f"item-{i:04d}.wav")
        sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16")
        codes = {"wavlm": it["wavlm"], "dasheng": it["dasheng"]}
        items.append(
            TokenItem(
                item_id=f"item-{i:04d}",
                num_samples=len(audio),
                domain=str(it["domain"]),
                source="synthetic",
                url=path,
                codes=codes,  # type: ignore[arg-type]
            )
        )
    write_token_output(out_dir, cut(items, items_per_shard), teachers, run_id=f"synthetic-{seed}")
    return teachers


class LoopScaledAdam(torch.optim.Optimizer):
    """The per-tensor ScaledAdam spear had before the flat one (one update loop per tensor):
    the oracle of ``tests/student/test_student_optim.py`` and the benchmark's "before"."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.045,
        betas: tuple[float, float] = (0.9, 0.98),
        clipping_scale: float = 2.0,
        scalar_lr_scale: float = 0.1,
        eps: float = 1e-8,
        param_min_rms: float = 1e-5,
        param_max_rms: float = 3.0,
        scalar_max: float = 10.0,
        clipping_window: int = 100,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "clipping_scale": clipping_scale,
            "scalar_lr_scale": scalar_lr_scale,
            "eps": eps,
            "param_min_rms": param_min_rms,
            "param_max_rms": param_max_rms,
            "scalar_max": scalar_max,
            "clipping_window": clipping_window,
        }
        super().__init__(params, defaults)
        # Recent gradient norms live in the first param group, so state_dict() carries them.
        self.param_groups[0].setdefault("recent_norms", [])
        self.param_groups[0].setdefault("num_clipped", 0)

    def _clip_factor(self) -> float:
        """1, or threshold/norm when the norm exceeds clipping_scale x median of recent norms.

        The norm is of the *relative* gradient (grad x rms(param)), which is what drives the
        update size here."""
        terms = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g2 = p.grad.float().pow(2).sum()
                if p.numel() > 1:
                    g2 = g2 * p.detach().float().pow(2).mean().clamp_min(1e-10)
                terms.append(g2)
        # One device sync for the whole model, not one per tensor.
        sq = float(torch.stack(terms).sum()) if terms else 0.0
        norm = math.sqrt(sq)
        group0 = self.param_groups[0]
        history: list[float] = group0["recent_norms"]
        factor = 1.0
        if len(history) >= 10 and math.isfinite(norm):
            threshold = group0["clipping_scale"] * sorted(history)[len(history) // 2]
            if norm > threshold:
                factor = threshold / norm
                group0["num_clipped"] += 1
        if math.isfinite(norm):
            history.append(norm)
            del history[: -group0["clipping_window"]]
        return factor

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        clip = self._clip_factor()
        for group in self.param_groups:
            lr = group["lr"]
            beta1, beta2 = group["betas"]
            eps = group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float() * clip
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["delta"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                    if p.numel() > 1:
                        state["scale_exp_avg_sq"] = torch.zeros((), device=p.device)
                state["step"] += 1
                step = state["step"]
                bias2 = 1.0 - beta2**step
                v = state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                direction = grad / ((v / bias2).sqrt() + eps)
                delta = state["delta"]
                pf = p.detach().float()
                if p.numel() == 1:
                    update = -lr * group["scalar_lr_scale"] * direction
                else:
                    rms = pf.pow(2).mean().sqrt().clamp_min(group["param_min_rms"])
                    update = -lr * rms * direction
                    # The scale step: Adam on d(loss)/d(log scale) = sum(p * grad).
                    scale_grad = (pf * grad).sum()
                    sv = state["scale_exp_avg_sq"]
                    sv.mul_(beta2).add_(scale_grad**2, alpha=1.0 - beta2)
                    scale_step = (
                        -lr * group["scalar_lr_scale"] * scale_grad / ((sv / bias2).sqrt() + eps)
                    )
                    # Keep rms(param) in range: no growth above the max, no shrinking below the min.
                    scale_step = torch.where(
                        rms >= group["param_max_rms"], scale_step.clamp(max=0.0), scale_step
                    )
                    scale_step = torch.where(
                        rms <= group["param_min_rms"], scale_step.clamp(min=0.0), scale_step
                    )
                    update = update + pf * scale_step
                delta.mul_(beta1).add_(update, alpha=1.0 - beta1)
                new = pf + delta
                if p.numel() == 1:
                    new = new.clamp(-group["scalar_max"], group["scalar_max"])
                p.copy_(new.to(p.dtype))
        return loss


def read_tensorboard_scalars(folder: str) -> dict[str, list[tuple[int, float]]]:
    """Tag -> (step, value) of every scalar in the TensorBoard event files under ``folder``
    (TFRecord framing read directly; tensorboardX's protobuf decodes the events)."""
    import glob
    import os
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        at = 0
        while at + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[at : at + 8])
            record = data[at + 12 : at + 12 + n]
            at += 12 + n + 4  # length, its CRC, the record, its CRC
            event = event_pb2.Event.FromString(record)
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((int(event.step), float(v.simple_value)))
    return out
