"""The Student module: standalone checkpoints, learning on a synthetic corpus, exact resume."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from spear.student import scaling
from spear.student.checkpointing import TrainPosition, load_folder, save_folder
from spear.student.config import (
    ENCODER_PRESETS,
    HeadConfig,
    MaskConfig,
    OptimConfig,
    StudentConfig,
    ZipformerMachinery,
    legacy_frontend,
)
from spear.student.frontend import fbank_batch, pad_audio
from spear.student.model import AudioBatch, Batch, Student, compute_loss, train_step
from spear.student.optim import Eden, build_optimizer
from spear.student.synthetic import collate, synth_items

HEADS = (
    HeadConfig(name="wavlm", num_codebooks=2, frame_rate=50.0),
    HeadConfig(
        name="dasheng", num_codebooks=1, frame_rate=25.0, weight_speech=0.0, weight_audio=0.1
    ),
)
CFG = StudentConfig(preset="tiny", heads=HEADS)
OPTIM = OptimConfig(lr=0.045, warmup_batches=0, lr_batches=1e6, lr_hours=1e6)


def _batches(n_batches: int, per_batch: int, seed: int) -> list[Batch]:
    items = synth_items(n_batches * per_batch, (1.0, 1.6), seed, 2, 1)
    return [
        collate(items[i * per_batch : (i + 1) * per_batch], {"wavlm": 2, "dasheng": 1})
        for i in range(n_batches)
    ]


def test_from_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Student(CFG).eval()
    model.save(str(tmp_path / "student.pt"))
    model.save("memory://spear-test/student.pt")
    feats, lens = torch.randn(1, 120, 128), torch.tensor([120])
    want = model.encode(feats, lens)[0]
    for url in (str(tmp_path / "student.pt"), str(tmp_path), "memory://spear-test/student.pt"):
        loaded = Student.from_checkpoint(url).eval()
        assert isinstance(loaded, torch.nn.Module) and loaded.cfg == CFG
        torch.testing.assert_close(loaded.encode(feats, lens)[0], want)


def _eval_loss(model: Student, batch: Batch, shuffle: bool) -> float:
    if shuffle:  # same marginal code distribution, no relation to the audio
        g = torch.Generator().manual_seed(0)
        targets = {}
        for k, v in batch.targets.items():
            flat = v.reshape(-1, v.shape[-1])
            ok = torch.nonzero((flat != -100).all(-1)).flatten()
            perm = ok[torch.randperm(len(ok), generator=g)]
            flat = flat.clone()
            flat[ok] = flat[perm]
            targets[k] = flat.reshape(v.shape)
        batch = Batch(batch.feats, batch.feat_lens, batch.domains, targets)
    model.eval()
    with torch.no_grad():
        _, parts, _ = compute_loss(model, batch, None, None)
    return float(parts.per_teacher["wavlm"]) / int(parts.frames["wavlm"])


@pytest.mark.slow  # ~20 s; benchmarks/learning.py's slow test shows learning on real recordings
def test_learns_synthetic_tokens() -> None:
    # AdamW: on 4 items and 50 steps it descends smoothly; ScaledAdam at the paper's 0.045
    # learns too but its eval loss jumps around at this scale (tests/student/test_student_optim.py
    # covers ScaledAdam itself).
    torch.manual_seed(0)
    batches = _batches(1, 4, seed=0)
    model = Student(CFG)
    cfg = OptimConfig(name="adamw", lr=3e-3, warmup_batches=5, lr_batches=1e6, lr_hours=1e6)
    opt, sched = build_optimizer(model, cfg)
    g = torch.Generator().manual_seed(0)
    start = _eval_loss(model, batches[0], shuffle=False)
    for step in range(50):
        train_step(
            model,
            batches[0],
            opt,
            sched,
            step=step,
            hours=0.0,
            mask=MaskConfig(),
            generator=g,
            grad_clip=cfg.grad_clip,
        )
    true_loss = _eval_loss(model, batches[0], shuffle=False)
    shuffled = _eval_loss(model, batches[0], shuffle=True)
    # 8 levels: the best loss without the audio is the marginal entropy, <= log 8
    assert true_loss < 0.6 * math.log(8) < start
    assert true_loss < 0.5 * shuffled


def _resume_run(tmp_path: Path, interrupt: bool) -> float:
    torch.manual_seed(0)
    batches = _batches(1, 3, seed=1)
    model = Student(CFG)
    opt, sched = build_optimizer(model, OPTIM)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        train_step(
            model, batches[0], opt, sched, step=step, hours=0.0, mask=MaskConfig(), generator=g
        )
    if interrupt:
        save_folder(str(tmp_path / "ckpt"), model, opt, sched, TrainPosition(step=3), g)
        torch.manual_seed(123)  # whatever happens in between must not matter
        np.random.seed(5)
        model = Student(CFG)
        opt, sched = build_optimizer(model, OPTIM)
        g = torch.Generator().manual_seed(99)
        progress = load_folder(str(tmp_path / "ckpt"), model, opt, sched, g)
        assert progress.step == 3
    stats = train_step(
        model, batches[0], opt, sched, step=3, hours=0.0, mask=MaskConfig(), generator=g
    )
    return stats.loss


def test_resume_repeats_next_step(tmp_path: Path) -> None:
    assert _resume_run(tmp_path, interrupt=False) == _resume_run(tmp_path, interrupt=True)


def test_student_pt_records_the_frontend_and_version_2_keeps_torchaudios(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Student(CFG).eval()
    state = model.checkpoint_dict()
    assert state["version"] == 3
    assert state["config"]["frontend"]["implementation"] == "lhotse"
    assert state["config"]["frontend"]["high_freq"] == -400.0
    assert state["config"]["frontend"]["snip_edges"] is False
    old = dict(
        state, version=2, config={k: v for k, v in state["config"].items() if k != "frontend"}
    )
    loaded = Student.from_state(old)
    assert loaded.cfg.frontend == legacy_frontend()
    wave = synth_items(1, (1.0, 1.0), 0)[0]["audio"]
    x_old, n_old = loaded.frontend.waves([wave])
    want, want_n = fbank_batch([wave])  # what version-2 students were trained on
    torch.testing.assert_close(x_old, want)
    assert torch.equal(n_old, want_n)
    _, n_new = model.frontend.waves([wave])
    assert int(n_new[0]) == 100 and int(n_old[0]) == 98  # snip_edges off / on


def _no_randomness() -> ZipformerMachinery:
    return ZipformerMachinery(
        dropout=0.0,
        pos_emb_dropout=0.0,
        layer_skip_start=0.0,
        layer_skip_end=0.0,
        attention_skip=0.0,
        conv_skip=0.0,
        ff_skip=0.0,
        const_attention=0.0,
        pos_emb_skip=0.0,
        convnext_skip=0.0,
        feature_mask_prob=0.0,
        # Gradient-only modules that look at the batch's statistics (and at random calls).
        balancers=False,
        whiteners=False,
        attention_score_limit=0.0,
    )


def _plain_student() -> Student:
    enc = dataclasses.replace(ENCODER_PRESETS["tiny"](), machinery=_no_randomness())
    return Student(dataclasses.replace(CFG, encoder=enc))


def test_accumulated_micro_batches_give_the_gradient_of_one_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No masking, no random machinery, equal lengths (no padding): 2 micro-batches of 2 items
    # must give the gradient of the one batch of 4.
    monkeypatch.setattr(scaling, "LIMIT_PROB", 0.0)  # the bypass floors' random gradient limit
    items = synth_items(4, (1.2, 1.2), seed=3, wavlm_codebooks=2, dasheng_codebooks=1)
    heads = {"wavlm": 2, "dasheng": 1}
    whole = collate(items, heads)
    halves = [collate(items[:2], heads), collate(items[2:], heads)]
    no_mask = MaskConfig(time_prob=0.0, channel_prob=0.0)
    grads, losses = [], []
    for batch in (whole, halves):
        torch.manual_seed(0)
        model = _plain_student()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        stats = train_step(
            model,
            batch,  # type: ignore[arg-type]
            opt,
            Eden(opt),
            step=0,
            hours=0.0,
            mask=no_mask,
            generator=torch.Generator().manual_seed(0),
        )
        grads.append([(n, p.grad) for n, p in model.named_parameters() if p.grad is not None])
        losses.append(stats)
    assert losses[0].frames == losses[1].frames and losses[0].seconds == losses[1].seconds
    assert losses[0].loss == pytest.approx(losses[1].loss, rel=1e-5)
    assert losses[0].per_teacher == pytest.approx(losses[1].per_teacher, rel=1e-5)
    assert len(grads[0]) == len(grads[1]) > 100
    bad = [
        n
        for (n, a), (_, b) in zip(*grads, strict=True)
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    ]
    assert not bad


def test_train_step_takes_audio_batches_and_computes_the_fbank() -> None:
    items = synth_items(2, (1.0, 1.5), seed=4, wavlm_codebooks=2, dasheng_codebooks=1)
    heads = {"wavlm": 2, "dasheng": 1}
    feats = collate(items, heads)
    padded, n = pad_audio([np.asarray(it["audio"]) for it in items])
    audio = AudioBatch(audio=padded, num_samples=n, domains=feats.domains, targets=feats.targets)
    out = []
    for batch in (feats, audio):
        torch.manual_seed(0)
        model = Student(CFG)
        opt, sched = build_optimizer(model, OPTIM)
        g = torch.Generator().manual_seed(0)
        out.append(
            train_step(model, batch, opt, sched, step=0, hours=0.0, mask=MaskConfig(), generator=g)
        )
    assert out[0].loss == out[1].loss and out[0].seconds == out[1].seconds
