"""Dasheng parity against the ``dasheng`` package's model class, batch safety, frame count.

Tolerance: float32 on CPU, max |ours - reference| <= 1e-5 x max |reference| (measured ~8e-7).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from spear.stages.dasheng import DashengArch, dasheng_tiny, mel_filterbank
from spear.stages.teachers import TEACHERS, TeacherConfig, load_teacher, run_teacher

REL_TOL = 1e-5
KWARGS = {"embed_dim": 64, "depth": 2, "num_heads": 4}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    pretrained = pytest.importorskip("dasheng.pretrained.pretrained")
    torch.manual_seed(0)
    model = pretrained.Dasheng(**KWARGS).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics and LayerNorms
        bn = model.init_bn[1]
        bn.running_mean.normal_(-40, 5)
        bn.running_var.uniform_(50, 200)
        bn.weight.normal_(1, 0.1)
        bn.bias.normal_(0, 0.1)
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def package_pt(reference: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dasheng") / "dasheng_tiny.pt"
    torch.save({"model": reference.state_dict(), "config": dict(KWARGS)}, path)
    return path


def _ours(ckpt: Path, wave: torch.Tensor) -> torch.Tensor:
    t = load_teacher(TeacherConfig(name="dasheng-tiny", checkpoint=str(ckpt)))
    with torch.no_grad():
        y, _ = t.model(wave, torch.tensor([wave.shape[1]]))
    return y


@pytest.mark.parametrize("seconds", [0.7, 3.3, 12.5])  # 12.5 s: two chunks, the last one short
def test_matches_package(reference: torch.nn.Module, package_pt: Path, seconds: float) -> None:
    wave = torch.randn(1, int(16_000 * seconds), generator=torch.Generator().manual_seed(1)) * 0.1
    with torch.no_grad():
        ref = reference(wave)
    ours = _ours(package_pt, wave)
    assert ours.shape == ref.shape
    assert _rel(ours, ref) < REL_TOL


def test_hub_mirror_layout(reference: torch.nn.Module, tmp_path: Path) -> None:
    """``mispeech/dasheng-*``: config.json with encoder_kwargs, weights under ``encoder.``."""
    from safetensors.torch import save_file

    state = {
        f"encoder.{k}": v.contiguous()
        for k, v in reference.state_dict().items()
        if not k.startswith("front_end.")
    }
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"name": "x", "encoder_kwargs": KWARGS}))
    wave = torch.randn(1, 40_000, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = reference(wave)
    assert _rel(_ours(tmp_path, wave), ref) < REL_TOL


def test_mel_filterbank_matches_torchaudio() -> None:
    from torchaudio.functional import melscale_fbanks

    ref = melscale_fbanks(257, 0.0, 8000.0, 64, 16_000, norm=None, mel_scale="htk")
    assert torch.allclose(mel_filterbank(DashengArch()), ref, atol=1e-5)


def test_padding_and_loudness_never_change_an_item(package_pt: Path) -> None:
    """The package fails both: zero-padding shifts the edge frames, top_db is taken per batch."""
    t = load_teacher(TeacherConfig(name="dasheng-tiny", checkpoint=str(package_pt)))
    rng = np.random.default_rng(3)
    waves = [
        (rng.standard_normal(n) * amp).astype(np.int16)
        for n, amp in ((64_000, 3), (170_000, 20_000), (23_456, 500), (200, 100))
    ]
    together = run_teacher(t, waves)
    for w, got in zip(waves, together, strict=True):
        alone = run_teacher(t, [w])[0]
        assert got.shape == (TEACHERS["dasheng-tiny"].num_frames(len(w)), 64)
        if len(alone):
            np.testing.assert_allclose(got, alone, rtol=0, atol=1e-5 * np.abs(alone).max())


def test_frame_formula(reference: torch.nn.Module) -> None:
    spec = TEACHERS["dasheng"]
    assert spec.num_frames(16_000) == 25 and spec.num_frames(160_000) == 250
    assert spec.num_frames(0) == 0 and spec.num_frames(479) == 0 and spec.num_frames(480) == 1
    assert dasheng_tiny().num_frames(161_280) == spec.num_frames(161_280) == 252  # one chunk
    for n in (480, 1_000, 16_000, 161_279, 161_280, 161_600, 200_003):
        with torch.no_grad():
            assert reference(torch.zeros(1, n) + 0.01).shape[1] == spec.num_frames(n)


def test_random_init_builds_every_preset_arch() -> None:
    for name in ("dasheng", "dasheng-0.6b", "dasheng-base"):
        arch = TEACHERS[name].arch()
        assert arch.embed_dim == TEACHERS[name].dim
