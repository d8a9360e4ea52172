"""Training recipe for the MVQ quantiser (one file: setup, train, checkpoint, save).

Two phases (SPEC section 2): 2C codebooks of sqrt(K) entries, then pairs merged into C codebooks
of K entries (:meth:`Quantizer.product`) with the learning rate halved. Loss per minibatch:

    ||x_hat - x||^2 / ||x - mean||^2      (relative reconstruction, at the refined indexes)
    + CE(logits, refined indexes)           (teaches the argmax start)
    + 0.01 * (log K - H(mean softmax)) / log K   (pushes codebook usage towards uniform)

Adam lr 5e-3, betas (0.9, 0.98); the lr halves ``lr_halvings`` times per phase.

A saved quantiser is one safetensors file; its header metadata holds the JSON of
:class:`QuantizerInfo` under ``spear`` (a ``quantizer.json`` copy sits beside it for people).
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from spear.errors import SpearError
from spear.quantizer.config import QuantizerConfig, QuantizerTrainConfig
from spear.quantizer.data import load_frames, open_embeddings, train_batches
from spear.quantizer.mvq import Quantizer, QuantizerInfo, relative_reconstruction_loss
from spear.storage import StorageConfig, exists, join, read_bytes, write_atomic

log = logging.getLogger(__name__)

QUANTIZER_FILE = "quantizer.safetensors"
INFO_FILE = "quantizer.json"
CHECKPOINT_FILE = "checkpoint.pt"


class QuantizerFileError(SpearError):
    """A quantiser file is missing or not one spear wrote."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SpearError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


@dataclass
class StepStats:
    step: int
    phase: int
    loss: float
    rrl: float  # on this minibatch, at the refined indexes
    logprob: float
    entropy: float


class QuantizerTrainer:
    """``while not trainer.done(): trainer.step(x)``; then ``trainer.quantizer``."""

    def __init__(self, cfg: QuantizerTrainConfig, info: QuantizerInfo, device: torch.device):
        self.cfg = cfg
        self.device = device
        root = round(math.sqrt(cfg.codebook_size))
        info.num_codebooks, info.codebook_size = 2 * cfg.num_codebooks, root
        self.quantizer = Quantizer(info).to(device)
        self.step_count = 0
        self.phase = 1
        self._init_optimizer()

    def _init_optimizer(self) -> None:
        lr = self.cfg.lr * (0.5 if self.phase == 2 else 1.0)
        self.optim = torch.optim.Adam(
            self.quantizer.parameters(), lr=lr, betas=self.cfg.betas, eps=1e-9, weight_decay=1e-6
        )
        every = max(1, self.cfg.phase_steps // self.cfg.lr_halvings)
        self.sched = torch.optim.lr_scheduler.StepLR(self.optim, step_size=every, gamma=0.5)

    def done(self) -> bool:
        return self.step_count >= 2 * self.cfg.phase_steps

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, StepStats]:
        """Loss of a normalised minibatch x (B, dim)."""
        q = self.quantizer
        logits = q.logits(x)  # (B, C, K)
        idx = q.indexes(x.detach(), self.cfg.train_refine_rounds)  # (B, C)
        x_hat = q.decode(idx, denormalise=False)  # (B, dim)
        rel = ((x_hat - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum().clamp_min(1e-20)
        logp = logits.log_softmax(-1)
        logprob = -logp.gather(2, idx[..., None]).mean()
        probs = logp.exp().mean(0) + 1e-20  # (C, K)
        ref = math.log(q.codebook_size)
        entropy = (ref - -(probs * probs.log()).sum(-1).mean()) / ref
        total = rel + logprob + self.cfg.entropy_weight * entropy
        vals = [float(v.detach()) for v in (total, rel, logprob, entropy)]
        stats = StepStats(self.step_count, self.phase, *vals)
        return total, stats

    def step(self, x: torch.Tensor) -> StepStats:
        """One optimiser step on a minibatch (B, dim) in the teacher's space."""
        x = self.quantizer.normalise(x.to(self.device, torch.float32))
        total, stats = self.loss(x)
        self.optim.zero_grad(set_to_none=True)
        total.backward()
        self.optim.step()
        self.sched.step()
        self.step_count += 1
        if self.phase == 1 and self.step_count >= self.cfg.phase_steps:
            self.quantizer = self.quantizer.product()
            self.phase = 2
            self._init_optimizer()
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step_count,
            "phase": self.phase,
            "info": self.quantizer.info.to_json(),
            "model": self.quantizer.state_dict(),
            "optim": self.optim.state_dict(),
            "sched": self.sched.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step"])
        self.phase = int(state["phase"])
        info = QuantizerInfo.from_json(state["info"])
        self.quantizer = Quantizer(info).to(self.device)
        self.quantizer.load_state_dict(state["model"])
        self._init_optimizer()
        self.optim.load_state_dict(state["optim"])
        self.sched.load_state_dict(state["sched"])


# -- save / load ---------------------------------------------------------------------------


def quantizer_bytes(q: Quantizer) -> bytes:
    return st_save(q.export_tensors(), metadata={"spear": q.info.to_json()})


def quantizer_from_bytes(data: bytes, where: str = "quantizer") -> Quantizer:
    try:
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        info = QuantizerInfo.from_json(header["__metadata__"]["spear"])
        tensors = st_load(data)
    except Exception as err:
        raise QuantizerFileError(f"{where} is not a spear quantiser: {err}") from None
    return Quantizer.from_tensors(info, tensors)


def quantizer_url(url: str) -> str:
    """A quantiser given as its folder or its ``.safetensors`` file -> the file."""
    return url if url.endswith(".safetensors") else join(url, QUANTIZER_FILE)


def save_quantizer(q: Quantizer, url: str, storage: StorageConfig) -> str:
    """Write the quantiser (``url`` is a folder or a ``.safetensors`` path); returns the file."""
    target = quantizer_url(url)
    write_atomic(target, quantizer_bytes(q), storage)
    info_url = target[: -len(".safetensors")] + ".json"
    write_atomic(info_url, json.dumps(q.info.__dict__, indent=2).encode(), storage)
    return target


def load_quantizer(url: str, storage: StorageConfig, device: str = "cpu") -> Quantizer:
    target = quantizer_url(url)
    if not exists(target, storage):
        raise QuantizerFileError(f"no quantiser at {target!r}")
    return quantizer_from_bytes(read_bytes(target, storage), target).to(device)


# -- the recipe ----------------------------------------------------------------------------


def train_quantizer(
    cfg: QuantizerConfig,
    embeddings: str,
    out: str,
    storage: StorageConfig,
    report: Callable[[str], None] = print,
) -> Quantizer:
    """Train on the shards under ``embeddings``; checkpoints and the result go under ``out``.
    Resumes from ``out``'s checkpoint when there is one."""
    tc = cfg.train
    device = pick_device(tc.device)
    torch.manual_seed(tc.seed)
    emb = open_embeddings(embeddings, storage, cfg.data, seed=tc.seed)
    heldout = torch.from_numpy(load_frames(emb, storage, set(emb.heldout_items)))
    info = QuantizerInfo(
        dim=emb.dim,
        num_codebooks=tc.num_codebooks,
        codebook_size=tc.codebook_size,
        teacher=tc.teacher or emb.teacher,
        layer=tc.layer if tc.layer >= 0 else emb.layer,
    )
    trainer = QuantizerTrainer(tc, info, device)
    ckpt_url = join(out, CHECKPOINT_FILE)
    if exists(ckpt_url, storage):
        state = torch.load(io.BytesIO(read_bytes(ckpt_url, storage)), map_location=device)
        trainer.load_state_dict(state)
        report(f"resumed from {ckpt_url} at step {trainer.step_count}")
    elif tc.normalise:
        frames = load_frames(emb, storage, set(emb.items) - set(emb.heldout_items), tc.norm_frames)
        x = torch.from_numpy(frames).double()
        trainer.quantizer.set_normalisation(x.mean(0).float(), x.std(0).float())
    trainer.quantizer.info.training = {**emb.summary(), "config": _plain(tc)}
    # A different seed per resume: replaying the exact batch order is not needed.
    batches = train_batches(
        emb, storage, tc.batch_size, cfg.data.shuffle_frames, tc.seed + trainer.step_count
    )
    start = time.time()
    while not trainer.done():
        stats = trainer.step(torch.from_numpy(next(batches)))
        step = trainer.step_count
        if tc.log_every and (step % tc.log_every == 0 or trainer.done()):
            rrl = evaluate_rrl(trainer.quantizer, heldout, cfg.encode.refine_rounds)
            report(
                f"step {step}/{2 * tc.phase_steps} phase {stats.phase} loss {stats.loss:.4f} "
                f"train_rrl {stats.rrl:.4f} heldout_rrl {rrl:.4f} "
                f"({time.time() - start:.1f}s)"
            )
        if tc.checkpoint_every and step % tc.checkpoint_every == 0 and not trainer.done():
            buf = io.BytesIO()
            torch.save(trainer.state_dict(), buf)
            write_atomic(ckpt_url, buf.getvalue(), storage)
    q = trainer.quantizer.eval()
    q.info.rrl = evaluate_rrl(q, heldout, cfg.encode.refine_rounds)
    path = save_quantizer(q, out, storage)
    report(f"saved quantiser {q.id} to {path} (held-out RRL {q.info.rrl:.4f})")
    return q


def evaluate_rrl(q: Quantizer, x: torch.Tensor, refine_rounds: int) -> float:
    """Held-out RRL in the quantiser's (normalised) space; NaN without held-out frames."""
    if len(x) == 0:
        return float("nan")
    with torch.no_grad():
        xn = q.normalise(x.to(q.centers.device, torch.float32))
        codes = q.encode(x, refine_rounds)
        return relative_reconstruction_loss(xn, q.decode(codes, denormalise=False))


def _plain(obj: Any) -> Any:
    from dataclasses import asdict

    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(obj).items()}
