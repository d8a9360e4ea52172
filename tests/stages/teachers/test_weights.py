"""The one strict loader both teachers use, and the family check of a checkpoint's layout.

The layouts themselves (transformers, unilm, torchaudio; the dasheng package, hub mirrors) are
checked by the parity tests beside this file: a layout read wrongly gives other outputs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spear.checkpoints import CheckpointError
from spear.stages.teachers import TeacherConfig, load_teacher
from spear.stages.teachers.dasheng import build_dasheng, dasheng_tiny
from spear.stages.teachers.wavlm import build_wavlm, wavlm_tiny
from spear.stages.teachers.weights import checkpoint_family, load_strict


def test_a_fitting_state_is_copied() -> None:
    torch.manual_seed(0)
    source = build_wavlm(wavlm_tiny(), 2)
    torch.manual_seed(1)
    target = build_wavlm(wavlm_tiny(), 2)
    assert load_strict(target, source.state_dict(), "WavLM") is target
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k


def test_missing_and_unexpected_keys_are_named() -> None:
    model = build_dasheng(dasheng_tiny())
    state = dict(model.state_dict())
    del state["norm.weight"], state["blocks.1.mlp.fc2.bias"]
    state["head.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as err:
        load_strict(model, state, "Dasheng")
    msg = str(err.value)
    assert msg.startswith("Dasheng weights do not fit: missing 2 (")
    assert "'norm.weight'" in msg and "'blocks.1.mlp.fc2.bias'" in msg
    assert "unexpected 1 ('head.weight')" in msg
    assert "\n" not in msg


def test_every_misshaped_key_is_named_before_any_copy() -> None:
    model = build_wavlm(wavlm_tiny(), 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = dict(model.state_dict())
    state["proj.weight"] = torch.zeros(5, 5)
    state["layers.0.ff1.bias"] = torch.zeros(7)
    with pytest.raises(CheckpointError, match=r"^WavLM weight 'proj.weight' has shape \(5, 5\)"):
        load_strict(model, state, "WavLM")
    with pytest.raises(CheckpointError, match=r"'layers.0.ff1.bias' has shape \(7,\)"):
        load_strict(model, state, "WavLM")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_teachers_checkpoint_goes_through_the_strict_loader(tmp_path: Path) -> None:
    arch = dasheng_tiny()
    state = build_dasheng(arch).state_dict()
    del state["freq_pos_embed"]
    path = tmp_path / "d.pt"
    config = {"embed_dim": arch.embed_dim, "depth": arch.depth, "num_heads": arch.num_heads}
    torch.save({"model": state, "config": config}, path)
    with pytest.raises(CheckpointError, match=r"missing 1 \('freq_pos_embed'\), unexpected 0"):
        load_teacher(TeacherConfig(name="dasheng-tiny", checkpoint=str(path)))


def test_the_family_is_told_by_config_or_weight_names() -> None:
    assert checkpoint_family((), {"model_type": "wavlm"}) == "WavLM"
    assert checkpoint_family((), {"model_type": "hubert"}) == "hubert"
    assert checkpoint_family((), {"encoder_kwargs": {}}) == "Dasheng"
    assert checkpoint_family(build_wavlm(wavlm_tiny(), 1).state_dict()) is None  # our own keys
    assert checkpoint_family(["encoder.layers.0.attention.gru_rel_pos_const"]) == "WavLM"
    assert checkpoint_family(["encoder.patch_embed.proj.weight"]) == "Dasheng"
