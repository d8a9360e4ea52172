"""Learning shown: the tiny student learns real teacher tokens, and not permuted ones.

    uv run python benchmarks/learning.py [--steps 300] [--seed 0] [--threads 1] [--quick]

Everything in one process, no Ray, through spear's own code:

1. **Corpus** - Debian's pocketsphinx-testdata recordings (LibriVox "Sense and Sensibility",
   CMU "cards", and the headerless 16 kHz int16 ``*.raw`` files, rewritten as WAV so the
   decode stage reads them), cut into overlapping windows (manifest rows: url, start,
   duration).
2. **Token shards** - :func:`spear.stages.decode.decode_batch`, the tiny random-initialised
   WavLM teacher (:func:`spear.stages.teachers.load_teacher` / ``run_teacher``), an MVQ
   quantiser trained on its embeddings (:class:`spear.quantizer.train.QuantizerTrainer` /
   ``fit``), :func:`spear.stages.tokenize.tokenize_batch`, and the tokenize job's writer
   and commit as :func:`spear.testing.write_token_batches` runs them, read
   back through :func:`spear.shards.index.open_run`. WavLM only: the corpus is speech, and
   speech items carry WavLM tokens only (SPEC section 4), so a Dasheng head would get no loss.
3. **Training** - the ``tiny`` student as :func:`spear.student.recipe.train_loop` trains it,
   without Ray Train: :func:`spear.student.data.prepare_batch` (decode, mixing, fbank) on
   16-row calls, ``bucket_batches`` + ``collate_rows`` every epoch (the same stream each
   epoch, as the job's), :func:`spear.student.model.train_step` with
   :func:`spear.student.optim.build_optimizer` (ScaledAdam + Eden). Twice with the same seed
   and batches: real targets, and a control whose targets are another item's tokens (a seeded
   derangement, tiled or trimmed to the item's own frame count). The control can only learn
   the codes' frequencies (and memorise items), so the gap between the curves is what the
   student learnt from the audio. Three settings differ from the recipe for a 300-step run
   (no Eden warm-up, no time masking, machinery off; :class:`Settings` says why).
4. **Machinery** - both runs again with icefall's training machinery on (the preset's
   defaults) instead of off (off: no stochastic depth, dropout, feature masks, bypass floors,
   Balancer, Whiten, score penalty or embedding gradient scale; the near-identity initial
   scales stay, ScaledAdam expects them): loss, gap and CPU seconds per step of each.

``--quick`` runs steps 1-3 only (the slow test, ``tests/student/test_learning.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from spear.formats import SAMPLE_RATE
from spear.quantizer.config import QuantizerTrainConfig
from spear.quantizer.data import shuffled_batches
from spear.quantizer.mvq import QuantizerInfo
from spear.quantizer.train import QuantizerTrainer, fit, normalisation_stats
from spear.shards.index import open_run, read_table
from spear.shards.schema import TokenTeacherInfo
from spear.stages.decode import DecodeConfig, decode_batch
from spear.stages.teachers import TeacherConfig, load_teacher, run_teacher
from spear.stages.tokenize import teacher_info, tokenize_batch
from spear.storage import StorageConfig
from spear.student.config import (
    HeadConfig,
    MaskConfig,
    MixConfig,
    OptimConfig,
    Schedule,
    StudentConfig,
    TrainDataConfig,
    ZipformerMachinery,
    zipformer_tiny,
)
from spear.student.data import bucket_batches, collate_rows, iter_rows, prepare_batch
from spear.student.model import Student, train_step
from spear.student.optim import build_optimizer
from spear.testing import write_token_batches

POCKETSPHINX = "/usr/share/pocketsphinx/test/data"
LOCAL = StorageConfig()
PREFIX = "wavlm"
INSTALL = "install Debian's pocketsphinx-testdata (apt-get install pocketsphinx-testdata)"


@dataclass(frozen=True)
class Settings:
    """What the benchmark runs with. The defaults are the measured, chosen ones; where they
    differ from the recipe, docs/student.md ("Learning") gives the measurement behind it."""

    window: float = 2.0
    """Segment length in seconds (shorter files are one item each)."""
    hop: float = 0.25
    """Seconds between segment starts: 92 items. With 0.5 s (50 items, 30 epochs in 300
    steps) the control memorises its random targets and its loss falls too."""
    num_codebooks: int = 4
    """Codebooks of the tiny quantiser (a power of two; the demo's 4 x 64 for the 64-d
    teacher)."""
    codebook_size: int = 64
    """Entries per codebook (a square <= 256)."""
    quantizer_steps: int = 300
    """Quantiser steps per phase."""
    steps: int = 300
    """Student optimiser steps per run."""
    batch_seconds: float = 10.0
    """Audio seconds per student batch (~5 windows)."""
    lr: float = 0.045
    """ScaledAdam base learning rate (the recipe's; 0.2 learnt less)."""
    warmup_batches: float = 0.0
    """Eden warm-up steps. The recipe's 500 are for runs of 400k steps; here they would keep
    the rate at 50-80 % for the whole run."""
    mask_time_prob: float = 0.0
    """Time-span masking probability on the fbank (the recipe: 0.65). The tiny random
    teacher's codes change almost every frame, so a masked frame's code cannot be told from
    its context: masking 47 % of the frames hides about half of what there is to learn.
    Channel masking stays on."""
    machinery: bool = False
    """icefall's training machinery in the main comparison. At 10 s batches, 300 steps are
    a schedule batch count of 5 (of 600 s each), where every schedule is at its start (layer
    skip 0.5, dropout 0.3, ...): the second table measures what that costs."""
    seed: int = 0
    """One seed for the teacher, quantiser, student, masks and the control's permutation."""


# -- corpus -------------------------------------------------------------------------------


def source_files(root: str = POCKETSPHINX) -> list[str]:
    """The recordings under ``root``: ``*.wav`` of librivox/ and cards/, and every ``*.raw``."""
    wavs = [p for d in ("librivox", "cards") for p in glob.glob(os.path.join(root, d, "*.wav"))]
    raws = glob.glob(os.path.join(root, "**", "*.raw"), recursive=True)
    return sorted(wavs) + sorted(raws)


def as_wav(path: str, folder: str) -> str:
    """A WAV the decode stage can read: ``path`` itself, or a headerless raw (16 kHz mono int16
    little-endian) rewritten with a header under ``folder``."""
    if not path.endswith(".raw"):
        return path
    import soundfile as sf

    samples = np.fromfile(path, dtype="<i2")
    parent = os.path.basename(os.path.dirname(path))
    stem = os.path.basename(path)[: -len(".raw")]
    out = os.path.join(folder, f"{parent}_{stem}.wav")
    sf.write(out, samples, SAMPLE_RATE, subtype="PCM_16")
    return out


def segment_rows(files: Sequence[str], s: Settings) -> dict[str, np.ndarray]:
    """Manifest rows of overlapping windows over ``files`` (WAVs), ids in a seeded order.

    The recipe reads shards in order and the writer sorts rows by id: numbering the windows
    in a seeded random order keeps a batch from holding only neighbouring, overlapping
    windows of one recording."""
    import soundfile as sf

    rows: list[tuple[str, float, float]] = []
    for path in files:
        total = sf.info(path).frames / SAMPLE_RATE
        if total <= s.window:
            rows.append((path, 0.0, total))
            continue
        n = int((total - s.window) / s.hop + 1e-9) + 1
        rows += [(path, round(k * s.hop, 6), s.window) for k in range(n)]
    order = np.random.default_rng(s.seed).permutation(len(rows))
    ids = np.empty(len(rows), dtype=object)
    for rank, i in enumerate(order):
        ids[i] = f"seg-{rank:04d}"

    def col(values: list[Any]) -> np.ndarray:
        arr = np.empty(len(values), dtype=object)
        arr[:] = values
        return arr

    return {
        "item_id": ids,
        "source": col([os.path.basename(os.path.dirname(p)) or "data" for p, _, _ in rows]),
        "domain": col(["speech"] * len(rows)),
        "url": col([p for p, _, _ in rows]),
        "start": np.array([r[1] for r in rows]),
        "duration": np.array([r[2] for r in rows]),
    }


# -- token shards -------------------------------------------------------------------------


@dataclass
class ShardRun:
    out: str
    items: int
    audio_seconds: float
    quantizer_id: str
    rrl: float
    marginal_entropy: float
    """Mean over codebooks of the entropy (nats) of the codes' distribution: the loss of a
    student that learnt only which codes are frequent."""
    seconds: float


def write_shards(rows: dict[str, np.ndarray], out: str, s: Settings) -> ShardRun:
    """Decode, embed, train the quantiser, tokenize and write one token shard under ``out``."""
    t0 = time.perf_counter()
    decoded = decode_batch(rows, DecodeConfig(io_threads=1), LOCAL)
    bad = [str(e) for e in decoded["error"] if str(e)]
    if bad:
        raise SystemExit(f"decoding the corpus failed: {bad[0]}")
    cfg = TeacherConfig(name="wavlm-tiny", device="cpu", seed=s.seed)
    teacher = load_teacher(cfg, LOCAL)
    waves = [np.frombuffer(a, dtype="<i2") for a in decoded["audio"]]
    embs = run_teacher(teacher, waves)
    q = train_quantizer(embs, teacher.spec.dim, s)
    batch = dict(decoded) | {"decode_seconds": np.zeros(len(waves))}
    tokens = tokenize_batch(
        teacher,
        q,
        batch,
        prefix=PREFIX,
        domains=("speech", "audio"),
        refine_rounds=5,
        keep_audio=(),
    )
    info = teacher_info(PREFIX, cfg, q, ("speech", "audio"), None)
    run_id = f"learning-{s.seed}"
    (entry,) = write_token_batches(out, [tokens], (info,), run_id=run_id, storage=LOCAL)
    codes = np.concatenate(
        [np.frombuffer(c, np.uint8).reshape(-1, s.num_codebooks) for c in tokens[f"{PREFIX}_codes"]]
    )
    return ShardRun(
        out=out,
        items=int(entry["rows"]),
        audio_seconds=float(entry["audio_seconds"]),
        quantizer_id=q.id,
        rrl=float(q.info.rrl),
        marginal_entropy=marginal_entropy(codes, s.codebook_size),
        seconds=time.perf_counter() - t0,
    )


def marginal_entropy(codes: np.ndarray, codebook_size: int) -> float:
    """Mean over the codebooks of ``codes`` (frames, C) of their entropy in nats."""
    out = []
    for c in range(codes.shape[1]):
        p = np.bincount(codes[:, c], minlength=codebook_size) / len(codes)
        p = p[p > 0]
        out.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(out))


def train_quantizer(embs: list[np.ndarray], dim: int, s: Settings) -> Any:
    """The two-phase MVQ recipe on the corpus' frames, every 8th item held out for its RRL."""
    cfg = QuantizerTrainConfig(
        num_codebooks=s.num_codebooks,
        codebook_size=s.codebook_size,
        phase_steps=s.quantizer_steps,
        batch_size=256,
        seed=s.seed,
        device="cpu",
        log_every=0,
        teacher="wavlm-tiny",
        layer=2,
    )
    held = np.concatenate(embs[::8])
    train = np.concatenate([e for i, e in enumerate(embs) if i % 8])
    torch.manual_seed(s.seed)
    info = QuantizerInfo(
        dim=dim,
        num_codebooks=s.num_codebooks,
        codebook_size=s.codebook_size,
        teacher=cfg.teacher,
        layer=cfg.layer,
    )
    trainer = QuantizerTrainer(cfg, info, torch.device("cpu"))
    trainer.quantizer.set_normalisation(*normalisation_stats(torch.from_numpy(train)))
    batches = shuffled_batches(lambda _: train, 1, dim, cfg.batch_size, len(train), s.seed)
    return fit(trainer, batches, torch.from_numpy(held), refine_rounds=5)


# -- student ------------------------------------------------------------------------------


def training_rows(out: str, s: Settings) -> tuple[list[dict[str, Any]], list[TokenTeacherInfo]]:
    """The shards under ``out`` as the recipe's data workers prepare them (decode, mixing,
    fbank), in the stream's order; the same every epoch (the job's seed does not change)."""
    run = open_run(out, LOCAL)
    info = {t.prefix: t for t in run.teachers}
    data = data_config(s)
    rows: list[dict[str, Any]] = []
    for entry in run.entries:
        table = read_table(run.url(entry), LOCAL).to_pydict()
        cols = {k: np.asarray(v, dtype=object) for k, v in table.items()}
        n = len(cols["item_id"])
        for at in range(0, n, data.prep_rows):
            part = {k: v[at : at + data.prep_rows] for k, v in cols.items()}
            prepared = prepare_batch(
                part,
                teachers={p: t.num_codebooks for p, t in info.items()},
                rates={p: t.frame_rate for p, t in info.items()},
                data=data,
                mix=MixConfig(),
                decode=DecodeConfig(io_threads=1),
                storage=LOCAL,
                seed=s.seed,
            )
            rows += list(iter_rows([prepared]))
    return rows, run.teachers


def data_config(s: Settings) -> TrainDataConfig:
    return TrainDataConfig(batch_seconds=s.batch_seconds, max_seconds=min(s.batch_seconds, 32.0))


def permuted(rows: list[dict[str, Any]], num_codebooks: int, seed: int) -> list[dict[str, Any]]:
    """The control: every row gets another row's codes (a seeded derangement), tiled or
    trimmed to its own frame count so both runs have the same target frames."""
    n = len(rows)
    rng = np.random.default_rng(seed + 1)
    while True:
        perm = rng.permutation(n)
        if n < 2 or not np.any(perm == np.arange(n)):
            break
    out = []
    for i, r in enumerate(rows):
        frames = int(r[f"{PREFIX}_frames"])
        other = np.frombuffer(rows[perm[i]][f"{PREFIX}_codes"], np.uint8).reshape(-1, num_codebooks)
        codes = np.resize(other, (frames, num_codebooks)) if frames else other[:0]
        out.append(r | {f"{PREFIX}_codes": np.ascontiguousarray(codes).tobytes()})
    return out


def machinery_off() -> ZipformerMachinery:
    """Every training-time part of icefall's machinery off; the initial scales stay."""
    zero = Schedule.of((0.0, 0.0))
    return ZipformerMachinery(
        dropout=0.0,
        pos_emb_dropout=0.0,
        layer_skip_start=0.0,
        layer_skip_end=0.0,
        attention_skip=zero,
        conv_skip=zero,
        ff_skip=zero,
        const_attention=zero,
        pos_emb_skip=zero,
        convnext_skip=zero,
        bypass_floor=zero,
        feature_mask_prob=0.0,
        balancers=False,
        whiteners=False,
        attention_score_limit=0.0,
        embed_grad_scale=1.0,
    )


SCHEDULE_BATCHES = 20_000.0
"""Where the machinery's long schedules end (dropout 0.3 -> 0.1, bypass floor 0.9 -> 0.2,
ConvNeXt skip 0.2 -> 0.015), in batches of ``ZipformerMachinery.batch_seconds`` (600 s):
20,000 x 600 s = 3,333 h of audio."""


@dataclass(frozen=True)
class Recipe:
    """The shipped recipe's training settings for a run: icefall's machinery, Eden with its
    warm-up, time masking 0.65 (SPEC)."""

    machinery: ZipformerMachinery
    optim: OptimConfig
    mask: MaskConfig


def shipped_recipe(s: Settings) -> Recipe:
    """The recipe's defaults as they ship (tuned for thousands of hours)."""
    return Recipe(ZipformerMachinery(), OptimConfig(lr=s.lr), MaskConfig())


def scaled_recipe(s: Settings) -> Recipe:
    """The shipped recipe with its time axis compressed to this run, as icefall scales its
    schedules to a data set: the schedules' batch (icefall's ``--ref-duration``) becomes the
    run's audio / 20,000, so every schedule reaches its 20,000-batch value at the last step;
    Eden's step constants (``lr_batches`` 7,500, warm-up 500) scale by steps / 20,000 and its
    hours (75,000) by the run's audio / 3,333 h. Nothing else changes."""
    run_seconds = s.steps * s.batch_seconds
    by_steps = s.steps / SCHEDULE_BATCHES
    by_audio = run_seconds / (SCHEDULE_BATCHES * ZipformerMachinery().batch_seconds)
    base = shipped_recipe(s)
    return Recipe(
        dataclasses.replace(base.machinery, batch_seconds=run_seconds / SCHEDULE_BATCHES),
        dataclasses.replace(
            base.optim,
            lr_batches=base.optim.lr_batches * by_steps,
            warmup_batches=base.optim.warmup_batches * by_steps,
            lr_hours=base.optim.lr_hours * by_audio,
        ),
        base.mask,
    )


@dataclass
class Curve:
    losses: list[float]
    step_seconds: list[float]
    """Process CPU seconds per ``train_step``."""
    epochs: int

    def tail(self, n: int = 20) -> float:
        return float(np.mean(self.losses[-n:]))


def train(
    rows: list[dict[str, Any]],
    teachers: list[TokenTeacherInfo],
    s: Settings,
    machinery: ZipformerMachinery | None = None,
    recipe: Recipe | None = None,
) -> Curve:
    """``s.steps`` steps of the tiny student on ``rows``, epoch after epoch, as the recipe's
    ``train_loop`` runs them on one worker. ``recipe``: the recipe's machinery, Eden and
    masking instead of ``s``'s (``machinery`` is then ignored)."""
    enc = zipformer_tiny()
    if recipe is not None:
        machinery = recipe.machinery
    if machinery is not None:
        enc = dataclasses.replace(enc, machinery=machinery)
    t = {t.prefix: t for t in teachers}[PREFIX]
    head = HeadConfig(
        name=PREFIX,
        num_codebooks=t.num_codebooks,
        codebook_size=t.codebook_size,
        frame_rate=t.frame_rate,
    )
    student_cfg = StudentConfig(encoder=enc, heads=(head,))
    heads = {h.name: h.num_codebooks for h in student_cfg.heads}
    optim = OptimConfig(lr=s.lr, warmup_batches=s.warmup_batches)
    mask = MaskConfig(time_prob=s.mask_time_prob)
    if recipe is not None:
        optim, mask = recipe.optim, recipe.mask
    data = data_config(s)
    torch.manual_seed(s.seed)
    model = Student(student_cfg)
    opt, sched = build_optimizer(model, optim)
    generator = torch.Generator().manual_seed(s.seed * 1_000_003)
    torch.manual_seed(s.seed * 1_000_003)
    losses, times = [], []
    step, hours, epochs = 0, 0.0, 0
    while step < s.steps:
        epochs += 1
        for group in bucket_batches(iter(rows), data):
            batch = collate_rows(group, heads)
            t0 = time.process_time()
            stats = train_step(
                model,
                batch,
                opt,
                sched,
                step=step,
                hours=hours,
                mask=mask,
                generator=generator,
            )
            times.append(time.process_time() - t0)
            losses.append(stats.loss)
            step += 1
            hours += batch.seconds / 3600.0
            if step >= s.steps:
                break
    return Curve(losses, times, epochs)


# -- the benchmark ------------------------------------------------------------------------


@dataclass
class Result:
    settings: Settings
    shards: ShardRun
    curves: dict[str, Curve]
    """By :func:`run_names`."""

    def gap(self, real: str = "real", control: str = "control", n: int = 20) -> float:
        """Control minus real loss, nats per frame, mean of the last ``n`` steps."""
        return self.curves[control].tail(n) - self.curves[real].tail(n)


def run_names(s: Settings, machinery_table: bool = True) -> dict[str, tuple[bool, bool]]:
    """Run name -> (permuted targets, machinery on): real and control as ``s`` says, and with
    ``machinery_table`` the same two with the machinery flipped."""
    other = "on" if not s.machinery else "off"
    runs = {"real": (False, s.machinery), "control": (True, s.machinery)}
    if machinery_table:
        runs[f"real, machinery {other}"] = (False, not s.machinery)
        runs[f"control, machinery {other}"] = (True, not s.machinery)
    return runs


def run(
    s: Settings, root: str = POCKETSPHINX, *, machinery_table: bool = True, report: Any = None
) -> Result:
    """The whole benchmark in a temporary folder; ``report`` gets progress lines."""
    say = report or (lambda _line: None)
    files = source_files(root)
    if not files:
        raise SystemExit(f"no recordings under {root}: {INSTALL}")
    with tempfile.TemporaryDirectory(prefix="spear-learning-") as work:
        audio = os.path.join(work, "audio")
        os.makedirs(audio)
        rows = segment_rows([as_wav(p, audio) for p in files], s)
        shards = write_shards(rows, os.path.join(work, "tokens"), s)
        say(
            f"token shards: {shards.items} items, {shards.audio_seconds:.1f} s of windows, "
            f"quantiser {shards.quantizer_id} ({s.num_codebooks}x{s.codebook_size}, held-out "
            f"RRL {shards.rrl:.3f}; codes' marginal entropy {shards.marginal_entropy:.3f} "
            f"nats), {shards.seconds:.1f} s"
        )
        real, teachers = training_rows(shards.out, s)
    control = permuted(real, teachers[0].num_codebooks, s.seed)
    curves = {}
    for name, (shuffled, machinery) in run_names(s, machinery_table).items():
        t0 = time.perf_counter()
        curve = train(
            control if shuffled else real,
            teachers,
            s,
            machinery=None if machinery else machinery_off(),
        )
        curves[name] = curve
        say(
            f"{name}: last-20 loss {curve.tail():.3f} after {s.steps} steps "
            f"({curve.epochs} epochs, {time.perf_counter() - t0:.0f} s)"
        )
    return Result(s, shards, curves)


SCHEDULES_STEPS = 900
"""``--schedules``' default run length."""

SCHEDULE_RUNS = {
    "shipped real": (False, False),
    "shipped control": (True, False),
    "scaled real": (False, True),
    "scaled control": (True, True),
}
"""Run name -> (permuted targets, schedules scaled to the run)."""


def run_schedules(s: Settings, root: str = POCKETSPHINX, report: Any = None) -> Result:
    """The shipped recipe as is and with its schedules scaled to the run, real and control."""
    say = report or (lambda _line: None)
    files = source_files(root)
    if not files:
        raise SystemExit(f"no recordings under {root}: {INSTALL}")
    with tempfile.TemporaryDirectory(prefix="spear-learning-") as work:
        audio = os.path.join(work, "audio")
        os.makedirs(audio)
        rows = segment_rows([as_wav(p, audio) for p in files], s)
        shards = write_shards(rows, os.path.join(work, "tokens"), s)
        say(f"token shards: {shards.items} items, {shards.audio_seconds:.1f} s of windows")
        real, teachers = training_rows(shards.out, s)
    control = permuted(real, teachers[0].num_codebooks, s.seed)
    curves = {}
    for name, (shuffled, scaled) in SCHEDULE_RUNS.items():
        t0 = time.perf_counter()
        recipe = scaled_recipe(s) if scaled else shipped_recipe(s)
        curves[name] = curve = train(control if shuffled else real, teachers, s, recipe=recipe)
        say(
            f"{name}: last-20 loss {curve.tail():.3f} after {s.steps} steps "
            f"({curve.epochs} epochs, {time.perf_counter() - t0:.0f} s)"
        )
    return Result(s, shards, curves)


def schedules_table(r: Result, every: int = 100) -> str:
    """Gap (control - real, mean loss per window of ``every`` steps) of the shipped recipe
    and of the recipe scaled to the run."""
    c = r.curves
    lines = [
        "| steps | shipped: real | control | gap | scaled: real | control | gap |",
        "|---|---|---|---|---|---|---|",
    ]
    for step in range(every, len(c["shipped real"].losses) + 1, every):
        cells = []
        for kind in ("shipped", "scaled"):
            a = window_mean(c[f"{kind} real"].losses, step, every)
            b = window_mean(c[f"{kind} control"].losses, step, every)
            cells.append(f"{a:.3f} | {b:.3f} | {b - a:+.3f}")
        lines.append(f"| {step - every + 1}-{step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def recipe_text(name: str, r: Recipe) -> str:
    m, o = r.machinery, r.optim
    return (
        f"{name}: schedule batch {m.batch_seconds:g} s, Eden lr_batches {o.lr_batches:g}, "
        f"warm-up {o.warmup_batches:g}, lr_hours {o.lr_hours:g}, time masking "
        f"{r.mask.time_prob:g}, machinery on"
    )


def window_mean(losses: list[float], step: int, width: int) -> float:
    """Mean loss of the ``width`` steps ending at ``step`` (1-based)."""
    return float(np.mean(losses[max(0, step - width) : step]))


def learning_table(r: Result, every: int = 25) -> str:
    """Real against control, mean loss per window of ``every`` steps (the same batches in
    both runs at every step)."""
    real, control = r.curves["real"].losses, r.curves["control"].losses
    lines = [
        "| steps | loss real | loss control | gap (control - real) |",
        "|---|---|---|---|",
    ]
    for step in range(every, len(real) + 1, every):
        a, b = window_mean(real, step, every), window_mean(control, step, every)
        lines.append(f"| {step - every + 1}-{step} | {a:.3f} | {b:.3f} | {b - a:+.3f} |")
    return "\n".join(lines)


def machinery_table(r: Result) -> str:
    """Machinery on against off: real-target loss at three marks (mean of the 20 steps up to
    each), the control's, the gap and the step time."""
    steps = len(r.curves["real"].losses)
    marks = sorted({m for m in (steps // 3, 2 * steps // 3, steps) if m >= 20})
    head = " | ".join(f"real @{m}" for m in marks)
    lines = [
        f"| machinery | {head} | control @{steps} | gap @{steps} | step CPU s (median) |",
        "|---|" + "---|" * (len(marks) + 3),
    ]
    by_kind = {kind: name for name, kind in run_names(r.settings).items()}
    for label in ("on", "off"):
        real, control = by_kind[(False, label == "on")], by_kind[(True, label == "on")]
        c = r.curves[real]
        at = " | ".join(f"{window_mean(c.losses, m, 20):.3f}" for m in marks)
        lines.append(
            f"| {label} | {at} | {r.curves[control].tail():.3f} | {r.gap(real, control):+.3f} "
            f"| {statistics.median(c.step_seconds):.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=Settings.steps)
    ap.add_argument("--seed", type=int, default=Settings.seed)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="real against control only (the slow test's run), no machinery table",
    )
    ap.add_argument(
        "--schedules",
        action="store_true",
        help="the shipped recipe (machinery, Eden warm-up, time masking) as is and with its "
        "schedules scaled to the run, real against control (default 900 steps)",
    )
    ap.add_argument("--root", default=POCKETSPHINX, help="where the recordings are")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not source_files(args.root):
        print(f"no recordings under {args.root}: {INSTALL}", file=sys.stderr)
        return 1
    if args.schedules:
        return main_schedules(args)
    s = Settings(seed=args.seed, steps=args.steps)
    print(
        f"tiny student, {s.steps} steps, batches of {s.batch_seconds:g} s, seed {s.seed}, "
        f"{args.threads} thread(s), torch {torch.__version__}",
        flush=True,
    )
    t0 = time.perf_counter()
    r = run(
        s, args.root, machinery_table=not args.quick, report=lambda line: print(line, flush=True)
    )
    print()
    print(learning_table(r))
    print()
    print(f"final gap (control - real, mean of the last 20 steps): {r.gap():+.3f} nats/frame")
    if not args.quick:
        print()
        print(machinery_table(r))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


def main_schedules(args: argparse.Namespace) -> int:
    steps = args.steps if args.steps != Settings.steps else SCHEDULES_STEPS
    s = Settings(seed=args.seed, steps=steps)
    print(
        f"tiny student, {s.steps} steps, batches of {s.batch_seconds:g} s "
        f"({s.steps * s.batch_seconds / 3600:.2f} h seen), seed {s.seed}, {args.threads} "
        f"thread(s), torch {torch.__version__}",
        flush=True,
    )
    print(recipe_text("shipped", shipped_recipe(s)))
    print(recipe_text("scaled", scaled_recipe(s)), flush=True)
    t0 = time.perf_counter()
    r = run_schedules(s, args.root, report=lambda line: print(line, flush=True))
    print()
    print(schedules_table(r))
    print()
    for kind in ("shipped", "scaled"):
        gap = r.gap(f"{kind} real", f"{kind} control")
        print(f"{kind}: final gap (mean of the last 20 steps) {gap:+.3f} nats/frame")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
