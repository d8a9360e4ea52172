"""The student: fbank -> (masking) -> Zipformer2 -> one head per teacher; and one training step.

* :class:`Student` - an ``nn.Module`` that needs nothing of the training job:
  ``Student.from_checkpoint(url)`` loads a ``student.pt`` (or a training checkpoint folder that
  holds one) in eval mode, ``Student.from_hf(src)`` a released SPEAR encoder, and
  ``student.encode(feats, lengths, layers=True)`` gives 50 Hz features (and every layer's) for
  downstream work.
* :class:`AudioBatch` - a collated training batch: padded int16 audio, sample counts, domains,
  teacher-rate targets; :meth:`Student.features` turns it into a :class:`Batch` (padded fbank)
  on the model's device with the student's recorded frontend (:mod:`spear.student.frontend`).
* :func:`compute_loss` / :func:`train_step` - pure functions of (model, batch, optimiser,
  schedule, generator): masks come from the explicit generator, dropout and the encoder's other
  random parts from torch's global RNG, so a run restored with both RNG states repeats the next
  step exactly. ``train_step`` sets the encoder's schedules from the audio hours seen.

``student.pt`` is ``torch.save`` of ``{"format": "spear-student", "version": 3, "config":
<StudentConfig as plain data, frontend included>, "model": state_dict}``; it loads with
``weights_only=True``. Version 2 files (no frontend recorded) load with the torchaudio frontend
they were trained on.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import torch
from torch import Tensor, nn

from spear.configio import from_dict, to_dict
from spear.errors import SpearError
from spear.storage import StorageConfig, filesystem, read_bytes, write_atomic
from spear.student.config import HeadConfig, MaskConfig, StudentConfig, legacy_frontend
from spear.student.frontend import Frontend
from spear.student.heads import CodebookHead
from spear.student.hidden import encode_layers
from spear.student.losses import LossOutput, align_targets, dual_domain_loss
from spear.student.masking import apply_masks, draw_masks
from spear.student.optim import Eden
from spear.student.zipformer import Conv2dSubsampling, Zipformer2

STUDENT_FILE = "student.pt"
STUDENT_FORMAT = "spear-student"
STUDENT_VERSION = 3
"""3: the frontend is recorded in the config (lhotse's fbank by default). 2: the encoder with
icefall's training machinery (initial scales replace the explicit attention scaling, bypasses
no longer clamp in the forward), torchaudio's fbank; still read. Version 1 files compute another
function, so they are refused."""
READ_VERSIONS = (2, 3)
FRAME_RATE = 50.0
"""Student output frames per second."""


class StudentFileError(SpearError):
    """A student checkpoint is missing or not one spear wrote."""


@dataclass
class StudentOutput:
    encoder_out: Tensor
    """(B, T, D) at 50 Hz, zero on padded frames."""
    lengths: Tensor
    """(B,) valid output frames."""
    logits: dict[str, Tensor]
    """Per teacher: (B, T, C, K)."""


class Student(nn.Module):
    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        self.cfg = cfg
        enc = cfg.encoder_config()
        self.frontend = Frontend(cfg.frontend)
        self.encoder = Zipformer2(enc)
        # Replaces masked fbank frames; small so masked input starts near the features' scale.
        self.mask_embedding = nn.Parameter(torch.randn(enc.num_features) * 0.1)
        self.heads = nn.ModuleDict({h.name: CodebookHead(enc.output_dim, h) for h in cfg.heads})

    @property
    def output_dim(self) -> int:
        return self.encoder.output_dim

    def features(self, batch: AudioBatch | Batch) -> Batch:
        """An audio batch -> its fbank batch (on the audio's device), by the student's frontend."""
        if isinstance(batch, Batch):
            return batch
        feats, lens = self.frontend(batch.audio, batch.num_samples)
        return Batch(
            feats=feats,
            feat_lens=lens,
            domains=batch.domains,
            targets=batch.targets,
            num_samples=batch.num_samples.cpu(),
        )

    @overload
    def encode(
        self, feats: Tensor, lengths: Tensor, layers: Literal[False] = False
    ) -> tuple[Tensor, Tensor]: ...

    @overload
    def encode(
        self, feats: Tensor, lengths: Tensor, layers: Literal[True]
    ) -> tuple[Tensor, Tensor, list[Tensor]]: ...

    def encode(
        self, feats: Tensor, lengths: Tensor, layers: bool = False
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, list[Tensor]]:
        """fbank (B, T, 128) + frame counts -> encoder output (B, (T-7)//2, D) + lengths; with
        ``layers``, also every layer's output at 50 Hz, (B, (T-7)//2, d_stack) each (SPEAR's
        ``hidden_states``; :mod:`spear.student.hidden`)."""
        if layers:
            return encode_layers(self.encoder, feats, lengths)
        out: tuple[Tensor, Tensor] = self.encoder(feats, lengths)
        return out

    @property
    def num_layers(self) -> int:
        """Encoder layers (the length of ``encode(..., layers=True)``'s list)."""
        return sum(self.encoder.cfg.num_layers)

    @classmethod
    def from_hf(
        cls,
        src: str,
        storage: StorageConfig | None = None,
        heads: tuple[HeadConfig, ...] | None = None,
    ) -> Student:
        """A released SPEAR encoder (``marcoyang/spear-*`` transformers folder: local path,
        fsspec URL, or hub id with ``huggingface_hub``), eval mode, with new heads
        (:func:`spear.student.hf.import_spear`)."""
        from spear.student.hf import import_spear

        return import_spear(src, storage, heads)

    def forward(
        self,
        feats: Tensor,
        lengths: Tensor,
        time_mask: Tensor | None = None,
        channel_mask: Tensor | None = None,
        batch_count: float | None = None,
    ) -> StudentOutput:
        """``batch_count``: the encoder schedules' position, needed in training mode."""
        if time_mask is not None and channel_mask is not None:
            feats = apply_masks(feats, time_mask, channel_mask, self.mask_embedding)
        x, out_lengths = self.encoder(feats, lengths, batch_count)
        logits = {name: head(x) for name, head in self.heads.items()}
        return StudentOutput(encoder_out=x, lengths=out_lengths, logits=logits)

    def init_encoder_from(self, other: Student) -> None:
        """Start from ``other``'s encoder and mask embedding (e.g. an imported SPEAR release),
        keeping this student's own, new heads: continued pre-training. The encoders must have
        the same settings (the training machinery may differ)."""
        mine, theirs = self.encoder.cfg, other.encoder.cfg
        shape = dataclasses.replace(theirs, machinery=mine.machinery)
        if shape != mine:
            raise StudentFileError(
                "the initial student's encoder differs from this one's; set "
                "train.student.encoder to the initial student's settings"
            )
        state = {k: v for k, v in other.state_dict().items() if not k.startswith("heads.")}
        missing = self.load_state_dict(state, strict=False).missing_keys
        if any(not k.startswith("heads.") for k in missing):
            raise StudentFileError(f"the initial student lacks {missing[:3]}")

    def checkpoint_dict(self) -> dict[str, Any]:
        return {
            "format": STUDENT_FORMAT,
            "version": STUDENT_VERSION,
            "config": to_dict(self.cfg),
            "model": self.state_dict(),
        }

    def save(self, url: str, storage: StorageConfig | None = None) -> None:
        """Write a standalone ``student.pt`` to ``url`` (any fsspec URL)."""
        buf = io.BytesIO()
        torch.save(self.checkpoint_dict(), buf)
        write_atomic(url, buf.getvalue(), storage or StorageConfig())

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Student:
        if state.get("format") != STUDENT_FORMAT:
            raise StudentFileError(
                f"not a spear student checkpoint (format {state.get('format')!r})"
            )
        if state.get("version") not in READ_VERSIONS:
            raise StudentFileError(
                f"student checkpoint version {state.get('version')}: this spear reads versions "
                f"{READ_VERSIONS}"
            )
        config = dict(state["config"])
        if state["version"] == 2:  # trained on torchaudio's fbank; keeps it
            config["frontend"] = to_dict(legacy_frontend())
        model = cls(from_dict(StudentConfig, config))
        model.load_state_dict(state["model"])
        return model

    @classmethod
    def from_checkpoint(
        cls, url: str, storage: StorageConfig | None = None, map_location: str = "cpu"
    ) -> Student:
        """Load a ``student.pt`` file, or the one inside a training checkpoint folder; the
        model comes back in eval mode (call ``.train()`` to train it)."""
        storage = storage or StorageConfig()
        fs, path = filesystem(url, storage)
        if fs.isdir(path):
            url = url.rstrip("/") + "/" + STUDENT_FILE
        try:
            data = read_bytes(url, storage)
        except FileNotFoundError:
            raise StudentFileError(f"no student checkpoint at {url!r}") from None
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        return cls.from_state(state).eval()


def unwrap(model: nn.Module) -> Student:
    """The Student inside a DDP (or other ``.module``) wrapper."""
    inner = getattr(model, "module", model)
    if not isinstance(inner, Student):
        raise TypeError(f"expected a Student, got {type(inner).__name__}")
    return inner


@dataclass
class Batch:
    feats: Tensor
    """(B, T, 128) fbank, zero-padded."""
    feat_lens: Tensor
    """(B,) fbank frames."""
    domains: Tensor
    """(B,) 0 speech, 1 audio."""
    targets: dict[str, Tensor] = field(default_factory=dict)
    """Per teacher prefix: (B, T_teacher, C) long at the teacher's rate, -100 where absent."""
    num_samples: Tensor | None = None
    """(B,) audio samples at 16 kHz (for hours seen); default from the fbank frames."""

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            feats=self.feats.to(device, non_blocking=True),
            feat_lens=self.feat_lens.to(device),
            domains=self.domains.to(device),
            targets={k: v.to(device, non_blocking=True) for k, v in self.targets.items()},
            num_samples=self.num_samples,
        )

    @property
    def seconds(self) -> float:
        if self.num_samples is not None:
            return float(self.num_samples.sum()) / 16_000
        return float(self.feat_lens.sum()) / 100.0


@dataclass
class AudioBatch:
    """A collated batch before the fbank (what the data workers ship: 32 kB per audio second)."""

    audio: Tensor
    """(B, N) int16, zero-padded."""
    num_samples: Tensor
    """(B,) samples at 16 kHz."""
    domains: Tensor
    targets: dict[str, Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> AudioBatch:
        return AudioBatch(
            audio=self.audio.to(device, non_blocking=True),
            num_samples=self.num_samples.to(device),
            domains=self.domains.to(device),
            targets={k: v.to(device, non_blocking=True) for k, v in self.targets.items()},
        )

    @property
    def seconds(self) -> float:
        return float(self.num_samples.sum()) / 16_000


@dataclass
class StepStats:
    step: int
    loss: float
    """Weighted loss per student frame (what is minimised)."""
    per_teacher: dict[str, float]
    """Unweighted loss per target frame, per teacher."""
    lr: float
    frames: int
    """Student output frames in the batch."""
    seconds: float
    """Audio seconds in the batch."""
    grad_norm: float = math.nan


def compute_loss(
    model: nn.Module,
    batch: Batch,
    mask: MaskConfig | None,
    generator: torch.Generator | None,
    batch_count: float | None = None,
) -> tuple[Tensor, LossOutput, Tensor]:
    """(loss per student frame, the loss parts, number of student frames). ``mask`` None: no
    masking (evaluation). ``batch_count``: see :meth:`Student.forward`."""
    student = unwrap(model)
    time_mask = channel_mask = None
    if mask is not None:
        if generator is None:
            raise ValueError("masking needs a generator")
        time_mask, channel_mask = draw_masks(
            batch.feat_lens.cpu(), batch.feats.shape[-1], mask, generator
        )
        t = batch.feats.shape[1]
        time_mask = nn.functional.pad(time_mask, (0, t - time_mask.shape[1]))
        time_mask, channel_mask = (
            time_mask.to(batch.feats.device),
            channel_mask.to(batch.feats.device),
        )
    out: StudentOutput = model(batch.feats, batch.feat_lens, time_mask, channel_mask, batch_count)
    t_out = out.encoder_out.shape[1]
    rates = {h.name: h.frame_rate for h in student.cfg.heads}
    targets = {
        name: align_targets(codes, rates[name], FRAME_RATE, t_out)
        for name, codes in batch.targets.items()
        if name in rates
    }
    # Targets on padded output frames are ignored: an item's padding is not its audio.
    padded = torch.arange(t_out, device=out.lengths.device)[None, :] >= out.lengths[:, None]
    targets = {k: v.masked_fill(padded[..., None], -100) for k, v in targets.items()}
    parts = dual_domain_loss(out.logits, targets, batch.domains, student.cfg.heads)
    frames = out.lengths.sum().clamp_min(1)
    return parts.total / frames, parts, frames


def train_step(
    model: nn.Module,
    batch: Batch | AudioBatch | Sequence[Batch | AudioBatch],
    optimizer: torch.optim.Optimizer,
    scheduler: Eden,
    *,
    step: int,
    hours: float,
    mask: MaskConfig,
    generator: torch.Generator,
    grad_clip: float = 0.0,
    autocast_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> StepStats:
    """One optimiser step on ``batch`` (already on the model's device), or on a list of
    micro-batches whose gradients accumulate (``TrainConfig.accum_steps``). Audio batches get
    their fbank here, on their device. ``step`` and ``hours`` are the progress *before* this
    step; they set the learning rate, and ``hours`` the encoder's schedules (skip rates,
    dropout, bypass floors; see ``ZipformerMachinery``).

    The loss is summed over frames (SPEC) and divided by the frame count of all the
    micro-batches together, so a step on k micro-batches computes the gradient of one batch
    holding them all; Adam-family updates are invariant to that scale. Under DDP only the last
    micro-batch's backward all-reduces."""
    model.train()
    scheduler.set_progress(step, hours)
    student = unwrap(model)
    batch_count = student.encoder.cfg.machinery.batch_count(hours)
    micro = [student.features(b) for b in (batch if isinstance(batch, Sequence) else [batch])]
    total = sum(int(Conv2dSubsampling.output_lengths(b.feat_lens).sum()) for b in micro)
    total = max(total, 1)
    device_type = micro[0].feats.device.type
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    frames_sum = 0
    teacher_sum: dict[str, float] = {}
    teacher_frames: dict[str, int] = {}
    for i, b in enumerate(micro):
        last = i == len(micro) - 1
        no_sync = getattr(model, "no_sync", None)
        sync = nullcontext() if last or no_sync is None else no_sync()
        ctx = (
            torch.autocast(device_type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else nullcontext()
        )
        with sync:
            with ctx:
                loss, parts, frames = compute_loss(model, b, mask, generator, batch_count)
            scaled = loss * (frames / total)
            if scaler is not None:
                scaler.scale(scaled).backward()
            else:
                scaled.backward()
        loss_sum += float(scaled.detach())
        frames_sum += int(frames)
        for k, v in parts.per_teacher.items():
            teacher_sum[k] = teacher_sum.get(k, 0.0) + float(v)
            teacher_frames[k] = teacher_frames.get(k, 0) + int(parts.frames[k])
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = math.nan
    if grad_clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    # A teacher without target frames in this batch (no audio items for Dasheng) is left out
    # rather than logged as a loss of 0.
    per_teacher = {k: v / teacher_frames[k] for k, v in teacher_sum.items() if teacher_frames[k]}
    return StepStats(
        step=step + 1,
        loss=loss_sum,
        per_teacher=per_teacher,
        lr=float(optimizer.param_groups[0]["lr"]),
        frames=frames_sum,
        seconds=sum(b.seconds for b in micro),
        grad_norm=grad_norm,
    )
