"""Linear probes (``spear probe``): how well each layer's mean-pooled features predict a label.

For a labelled set of clips (a Parquet or CSV table with ``url``, optional ``start`` /
``duration`` in seconds, and a label column: speaker, language, sound class, ...) and a feature
extractor (a spear ``student.pt``, or a teacher of the registry), every clip is decoded, run
through the model, and each layer's 50 Hz states are averaged over time. Per layer, a logistic
regression trained on a fixed budget (full-batch Adam, ``steps`` steps, weight decay, features
standardised on the training part) is scored on a held-out part (a stratified split drawn from
``seed``). The result is a table of held-out accuracy per layer beside the majority-class rate.

Layers: a student gives every encoder layer (``Student.encode(..., layers=True)``) and its
output; WavLM every transformer layer up to the configured one (1-based); Dasheng its output.
Runs on the local machine (CPU, or CUDA when present); it is meant for small labelled sets.

Inside ``spear train`` (``train.probe_every`` > 0), rank 0 decodes the labelled set once
(:class:`InLoopProbe`), and every ``probe_every`` steps pools the training student's layers
and adds ``probe_<layer>`` (held-out accuracy), ``probe_chance`` and, with ``probe_teacher``,
``probe_teacher`` (the teacher's best layer, computed once at the start) to that step's
metrics row; the training report draws them as curves (:func:`probe_metrics`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from spear.errors import ConfigError, SpearError
from spear.storage import StorageConfig, filesystem

log = logging.getLogger(__name__)


@dataclass(kw_only=True, frozen=True)
class ProbeConfig:
    """How the probes are trained and scored."""

    label_column: str = "label"
    """The labels file's column holding each clip's class."""
    test_fraction: float = 0.25
    """Share of each class held out for scoring (at least one clip per class)."""
    steps: int = 300
    """Full-batch optimiser steps per probe (the fixed budget)."""
    lr: float = 0.05
    weight_decay: float = 1e-3
    seed: int = 0
    """Seeds the split and the probes' initialisation."""

    def __post_init__(self) -> None:
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"probe test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.steps < 1 or self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError("probe steps must be >= 1, lr > 0 and weight_decay >= 0")


@dataclass
class ProbeResult:
    model: str
    classes: list[str]
    train: int
    test: int
    chance: float
    """Held-out accuracy of always answering the training part's most frequent class."""
    accuracy: dict[str, float] = field(default_factory=dict)
    """Held-out accuracy per layer name, in layer order."""

    def best(self) -> tuple[str, float]:
        name = max(self.accuracy, key=lambda k: self.accuracy[k])
        return name, self.accuracy[name]

    def table(self) -> str:
        lines = [
            f"probe {self.model}: {len(self.classes)} classes, {self.train} train / "
            f"{self.test} held-out clips; majority class {self.chance:.3f}",
            f"{'layer':>8}  accuracy",
        ]
        lines += [f"{name:>8}  {acc:.3f}" for name, acc in self.accuracy.items()]
        best, acc = self.best()
        lines.append(f"best: layer {best} ({acc:.3f})")
        return "\n".join(lines)


def read_labels(url: str, label_column: str, storage: StorageConfig) -> pa.Table:
    """The labels table (``.csv`` or Parquet file/folder) with ``url``, ``start``,
    ``duration`` (null: to the end) and ``label`` (as strings)."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    fs, path = filesystem(url, storage)
    if not fs.exists(path):
        raise SpearError(f"no labels file at {url!r}")
    try:
        if path.endswith(".csv"):
            with fs.open(path, "rb") as f:
                table = pcsv.read_csv(f)
        else:
            table = pq.read_table(path, filesystem=fs)
    except (pa.ArrowException, OSError) as err:
        raise SpearError(f"cannot read the labels at {url!r}: {err}") from None
    missing = [c for c in ("url", label_column) if c not in table.column_names]
    if missing:
        raise SpearError(
            f"the labels at {url!r} lack column(s) {missing} (have {table.column_names})"
        )
    n, cols = table.num_rows, table.column_names
    f64 = pa.float64()
    return pa.table(
        {
            "url": table["url"].cast(pa.string()),
            "start": table["start"].cast(f64) if "start" in cols else pa.array([0.0] * n, f64),
            "duration": table["duration"].cast(f64) if "duration" in cols else pa.nulls(n, f64),
            "label": table[label_column].cast(pa.string()),
        }
    )


def split(labels: Sequence[str], test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, test) indices: per class, ``round(n * test_fraction)`` clips (at
    least one) held out; classes with a single clip stay in training."""
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        by_class.setdefault(lab, []).append(i)
    train: list[int] = []
    test: list[int] = []
    for members in by_class.values():
        order = rng.permutation(members).tolist()
        k = 0 if len(order) < 2 else max(1, round(len(order) * test_fraction))
        test += order[:k]
        train += order[k:]
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(test), dtype=np.int64)


def linear_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
    cfg: ProbeConfig,
) -> float:
    """Held-out accuracy of a logistic regression on ``x`` (N, D) -> ``y`` (N,) class ids."""
    import torch

    mean = x_train.mean(0, keepdims=True)
    std = x_train.std(0, keepdims=True) + 1e-6
    xtr = torch.from_numpy(((x_train - mean) / std).astype(np.float32))
    xte = torch.from_numpy(((x_test - mean) / std).astype(np.float32))
    ytr = torch.from_numpy(y_train.astype(np.int64))
    g = torch.Generator().manual_seed(cfg.seed)
    w = torch.zeros(xtr.shape[1], num_classes)
    w.normal_(0.0, 0.01, generator=g)
    w.requires_grad_(True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.AdamW([w, b], lr=cfg.lr, weight_decay=cfg.weight_decay)
    for _ in range(cfg.steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xtr @ w + b, ytr)
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = (xte @ w + b).argmax(-1).numpy()
    return float((pred == y_test).mean()) if len(y_test) else float("nan")


PoolFn = Callable[[list[np.ndarray]], tuple[list[str], np.ndarray]]
"""int16 clips -> (layer names, pooled features (N, layers, D))."""


def student_pool(checkpoint: str, storage: StorageConfig) -> tuple[str, PoolFn]:
    """A student's layers (``0``..``L-1``) and output (``out``), mean-pooled."""
    import torch

    from spear.student.model import Student

    student = Student.from_checkpoint(checkpoint, storage)
    if torch.cuda.is_available():
        student = student.cuda()
    return f"student {checkpoint}", module_pool(student)


def module_pool(student: Any) -> PoolFn:
    """The pooling of a :class:`~spear.student.model.Student` module as it is (its device);
    eval mode while pooling, its mode restored after (the training loop's probes)."""
    import torch

    from spear.student.hidden import encode_waveforms

    names = [str(i) for i in range(student.num_layers)] + ["out"]

    def pool(clips: list[np.ndarray]) -> tuple[list[str], np.ndarray]:
        rows = []
        was_training = student.training
        student.eval()
        try:
            for clip in clips:  # one at a time: no padding, small sets
                wave = torch.from_numpy(clip.astype(np.float32) / 32768.0)
                with torch.inference_mode():
                    out, n, hidden = encode_waveforms(student, [wave])
                states = torch.stack([*hidden, out], dim=1)[0, :, : int(n[0])]  # (L+1, T, D)
                rows.append(states.float().mean(1).cpu().numpy())
        finally:
            student.train(was_training)
        return names, np.stack(rows)

    return pool


def teacher_pool(name: str, checkpoint: str | None, storage: StorageConfig) -> tuple[str, PoolFn]:
    """A teacher's layers (WavLM: 1..its configured layer; Dasheng: its output), mean-pooled."""
    import torch

    from spear.stages.teachers import TeacherConfig, load_teacher, run_teacher

    teacher = load_teacher(TeacherConfig(name=name, checkpoint=checkpoint), storage)
    layers = list(getattr(teacher.model, "layers", [])) if teacher.spec.family == "wavlm" else []
    names = [str(i + 1) for i in range(len(layers))] or [str(teacher.layer)]

    def pool(clips: list[np.ndarray]) -> tuple[list[str], np.ndarray]:
        rows = []
        captured: list[torch.Tensor] = []
        handles = [
            m.register_forward_hook(lambda _m, _i, o: captured.append(o.detach())) for m in layers
        ]
        try:
            for clip in clips:  # one at a time: no padding, small sets
                captured.clear()
                (final,) = run_teacher(teacher, [clip])
                if not len(final):
                    raise SpearError(f"a clip of {len(clip)} samples is too short for {name}")
                states = [c[0, : len(final)].float().mean(0).cpu().numpy() for c in captured]
                rows.append(np.stack(states or [final.mean(0)]))
        finally:
            for h in handles:
                h.remove()
        return names, np.stack(rows)

    return f"teacher {name}", pool


def load_clips(
    labels_url: str, cfg: ProbeConfig, storage: StorageConfig, decode: Any = None
) -> tuple[list[np.ndarray], list[str]]:
    """Every labelled clip decoded (int16, 16 kHz) with its label; undecodable clips are
    skipped with a warning. Fewer than 2 classes or nothing to hold out is an error."""
    from spear.stages.decode import DecodeConfig, DecodeError, decode_segment

    table = read_labels(labels_url, cfg.label_column, storage)
    decode = decode or DecodeConfig()
    clips, labels = [], []
    for row in table.to_pylist():
        try:
            clips.append(
                decode_segment(row["url"], row["start"] or 0.0, row["duration"], decode, storage)
            )
        except DecodeError as err:
            log.warning("probe: skipping %s: %s", row["url"], err)
            continue
        labels.append(str(row["label"]))
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise SpearError(f"the labels at {labels_url!r} need at least 2 classes, got {classes}")
    if not len(split(labels, cfg.test_fraction, cfg.seed)[1]):
        raise SpearError("no clip held out: give at least 2 clips of some class")
    return clips, labels


def probe_clips(
    clips: list[np.ndarray], labels: list[str], pool: tuple[str, PoolFn], cfg: ProbeConfig
) -> ProbeResult:
    """Pool each layer of the clips, train and score one probe per layer."""
    classes = sorted(set(labels))
    train, test = split(labels, cfg.test_fraction, cfg.seed)
    model, pool_fn = pool
    names, feats = pool_fn(clips)  # (N, layers, D)
    y = np.array([classes.index(lab) for lab in labels])
    majority = np.bincount(y[train], minlength=len(classes)).argmax()
    result = ProbeResult(
        model=model,
        classes=classes,
        train=len(train),
        test=len(test),
        chance=float((y[test] == majority).mean()),
    )
    for k, name in enumerate(names):
        x = feats[:, k]
        result.accuracy[name] = linear_probe(
            x[train], y[train], x[test], y[test], len(classes), cfg
        )
    return result


def run_probe(
    labels_url: str,
    pool: tuple[str, PoolFn],
    cfg: ProbeConfig,
    storage: StorageConfig,
    decode: Any = None,
) -> ProbeResult:
    """Decode every labelled clip, pool each layer, train and score one probe per layer."""
    clips, labels = load_clips(labels_url, cfg, storage, decode)
    return probe_clips(clips, labels, pool, cfg)


def probe_metrics(result: ProbeResult, teacher: ProbeResult | None = None) -> dict[str, float]:
    """A training step's probe figures: ``probe_<layer>`` held-out accuracy per layer,
    ``probe_chance`` (majority class) and ``probe_teacher`` (the teacher's best layer)."""
    out = {f"probe_{name}": acc for name, acc in result.accuracy.items()}
    out["probe_chance"] = result.chance
    if teacher is not None:
        out["probe_teacher"] = teacher.best()[1]
    return out


class InLoopProbe:
    """Rank 0's probes inside ``spear train``: the labelled clips decoded once, the teacher's
    reference scored once, then :meth:`metrics` on the training student every ``probe_every``
    steps (the same split and budget each time, so the curves compare)."""

    def __init__(
        self,
        labels_url: str,
        cfg: ProbeConfig,
        storage: StorageConfig,
        teacher: str | None = None,
        decode: Any = None,
    ) -> None:
        self.cfg = cfg
        self.clips, self.labels = load_clips(labels_url, cfg, storage, decode)
        self.teacher: ProbeResult | None = None
        if teacher:
            self.teacher = probe_clips(
                self.clips, self.labels, teacher_pool(teacher, None, storage), cfg
            )
            log.info("probe: teacher %s reference %.3f", teacher, self.teacher.best()[1])

    def metrics(self, student: Any) -> dict[str, float]:
        result = probe_clips(self.clips, self.labels, ("student", module_pool(student)), self.cfg)
        return probe_metrics(result, self.teacher)
