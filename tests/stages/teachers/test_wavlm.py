"""WavLM parity against transformers (and the unilm / torchaudio layouts), batch safety, frames.

Tolerance: float32 on CPU, max |ours - reference| <= 1e-5 x max |reference| (measured ~3e-7).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from spear.checkpoints import fetch_checkpoint
from spear.stages.teachers import TEACHERS, TeacherConfig, load_teacher, run_teacher
from spear.stages.teachers.wavlm import WavLMArch, frame_lengths, normalize_waveform, wavlm_tiny
from spear.storage import StorageConfig

transformers = pytest.importorskip("transformers")

REL_TOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _hf_config(arch: WavLMArch, **changes: object) -> object:
    kw = dict(
        hidden_size=arch.dim,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        intermediate_size=arch.ffn_dim,
        conv_dim=[c for c, _, _ in arch.conv_layers],
        conv_kernel=[k for _, k, _ in arch.conv_layers],
        conv_stride=[s for _, _, s in arch.conv_layers],
        conv_bias=arch.conv_bias,
        num_conv_pos_embeddings=arch.pos_conv_kernel,
        num_conv_pos_embedding_groups=arch.pos_conv_groups,
        num_buckets=arch.num_buckets,
        max_bucket_distance=arch.max_distance,
        do_stable_layer_norm=True,
        feat_extract_norm="layer",
    )
    kw.update(changes)
    return transformers.WavLMConfig(**kw)


def _random_hf(config: object, seed: int = 0) -> object:
    torch.manual_seed(seed)
    model = transformers.WavLMModel(config).eval()
    with torch.no_grad():  # default init leaves LayerNorms / gates at identity: perturb them
        for name, p in model.named_parameters():
            if "layer_norm" in name or "gru_rel_pos_const" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.fixture(scope="module")
def hf_model() -> object:
    return _random_hf(_hf_config(wavlm_tiny()))


def _hf_hidden(model: object, wave: torch.Tensor, layer: int) -> torch.Tensor:
    with torch.no_grad():
        return model(wave, output_hidden_states=True).hidden_states[layer]  # type: ignore[operator]


def _ours(teacher_name: str, ckpt: str | None, layer: int, wave: torch.Tensor) -> torch.Tensor:
    cfg = TeacherConfig(name=teacher_name, checkpoint=ckpt, layer=layer, device="cpu")
    t = load_teacher(cfg)
    with torch.no_grad():
        y, _ = t.model(wave, torch.tensor([wave.shape[1]]))
    return y


@pytest.fixture(scope="module")
def hf_dir(hf_model: object, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("hf_wavlm")
    hf_model.save_pretrained(d)  # type: ignore[attr-defined]
    return d


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_matches_transformers_hidden_states(hf_model: object, hf_dir: Path, layer: int) -> None:
    # 2.6 s: 129 frames, beyond max_distance=64, so the log-spaced buckets are exercised.
    wave = torch.randn(1, 41_600, generator=torch.Generator().manual_seed(1))
    ref = _hf_hidden(hf_model, wave, layer)
    ours = _ours("wavlm-tiny", str(hf_dir), layer, wave)
    assert ours.shape == ref.shape
    assert _rel(ours, ref) < REL_TOL


def test_layers_above_are_not_built(hf_dir: Path) -> None:
    t = load_teacher(TeacherConfig(name="wavlm-tiny", checkpoint=str(hf_dir), layer=1))
    assert len(t.model.layers) == 1


# The original unilm/fairseq key names, written out here independently of spear's loader.
def _hf_to_unilm(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {"mask_emb": torch.zeros(hf["feature_projection.projection.weight"].shape[0])}
    for k, v in hf.items():
        if k.startswith("feature_extractor.conv_layers."):
            i = k.split(".")[2]
            if ".conv." in k:
                out[f"feature_extractor.conv_layers.{i}.0.{k.split('.')[-1]}"] = v
            else:
                out[f"feature_extractor.conv_layers.{i}.2.1.{k.split('.')[-1]}"] = v
        elif k.startswith("feature_projection.layer_norm."):
            out["layer_norm." + k.split(".")[-1]] = v
        elif k.startswith("feature_projection.projection."):
            out["post_extract_proj." + k.split(".")[-1]] = v
        elif k.startswith("encoder.pos_conv_embed.conv."):
            name = {"original0": "weight_g", "original1": "weight_v"}.get(k.split(".")[-1], "bias")
            out[f"encoder.pos_conv.0.{name}"] = v
        elif k.startswith("encoder.layer_norm."):
            out[k] = v
        elif k.startswith("encoder.layers."):
            rest = k.split(".", 3)[3]
            for theirs, mine in (
                ("attention.gru_rel_pos_linear", "self_attn.grep_linear"),
                ("attention.gru_rel_pos_const", "self_attn.grep_a"),
                ("attention.rel_attn_embed", "self_attn.relative_attention_bias"),
                ("attention.", "self_attn."),
                ("feed_forward.intermediate_dense", "fc1"),
                ("feed_forward.output_dense", "fc2"),
                ("final_layer_norm", "final_layer_norm"),
                ("layer_norm", "self_attn_layer_norm"),
            ):
                if rest.startswith(theirs):
                    out[k.replace(theirs, mine, 1)] = v
                    break
    return out


def test_unilm_layout(hf_model: object, tmp_path: Path) -> None:
    a = wavlm_tiny()
    cfg = {
        "extractor_mode": "layer_norm",
        "encoder_layers": a.num_layers,
        "encoder_embed_dim": a.dim,
        "encoder_ffn_embed_dim": a.ffn_dim,
        "encoder_attention_heads": a.num_heads,
        "conv_feature_layers": "[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2",
        "conv_bias": False,
        "conv_pos": a.pos_conv_kernel,
        "conv_pos_groups": a.pos_conv_groups,
        "relative_position_embedding": True,
        "num_buckets": a.num_buckets,
        "max_distance": a.max_distance,
        "gru_rel_pos": True,
        "layer_norm_first": True,
        "normalize": True,
    }
    path = tmp_path / "WavLM-Tiny.pt"
    torch.save({"cfg": cfg, "model": _hf_to_unilm(hf_model.state_dict())}, path)  # type: ignore[attr-defined]
    wave = torch.randn(1, 20_000, generator=torch.Generator().manual_seed(2))
    t = load_teacher(TeacherConfig(name="wavlm-tiny", checkpoint=str(path), layer=2))
    assert t.layout == "unilm"
    with torch.no_grad():
        ours, _ = t.model(wave, torch.tensor([wave.shape[1]]))
    assert _rel(ours, _hf_hidden(hf_model, wave, 2)) < REL_TOL


def test_torchaudio_layout(hf_model: object, tmp_path: Path) -> None:
    from torchaudio.models.wav2vec2.utils import import_huggingface_model

    ta = import_huggingface_model(hf_model).eval()
    path = tmp_path / "wavlm_ta.pt"
    torch.save(ta.state_dict(), path)
    wave = torch.randn(1, 20_000, generator=torch.Generator().manual_seed(3))
    t = load_teacher(TeacherConfig(name="wavlm-tiny", checkpoint=str(path), layer=2))
    assert t.layout == "torchaudio"
    with torch.no_grad():
        ours, _ = t.model(wave, torch.tensor([wave.shape[1]]))
        ta_out = ta.extract_features(wave, num_layers=2)[0][1]
    assert _rel(ours, ta_out) < REL_TOL
    assert _rel(ours, _hf_hidden(hf_model, wave, 2)) < REL_TOL


def test_post_ln_group_norm_variant(tmp_path: Path) -> None:
    """The Base-style layout (GroupNorm extractor, post-LN) also matches, and stays batch-safe."""
    model = _random_hf(
        _hf_config(wavlm_tiny(), do_stable_layer_norm=False, feat_extract_norm="group")
    )
    model.save_pretrained(tmp_path)  # type: ignore[attr-defined]
    wave = torch.randn(1, 24_000, generator=torch.Generator().manual_seed(4))
    t = load_teacher(TeacherConfig(name="wavlm-tiny", checkpoint=str(tmp_path), layer=3))
    with torch.no_grad():
        ours, _ = t.model(wave, torch.tensor([wave.shape[1]]))
    assert _rel(ours, _hf_hidden(model, wave, 3)) < REL_TOL
    short = (np.random.default_rng(0).standard_normal(5_000) * 3000).astype(np.int16)
    long = (np.random.default_rng(1).standard_normal(30_000) * 300).astype(np.int16)
    alone = run_teacher(t, [short])[0]
    together = run_teacher(t, [short, long])[0]
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-5 * np.abs(alone).max())


def test_padding_never_changes_an_item() -> None:
    t = load_teacher(TeacherConfig(name="wavlm-tiny", device="cpu"))
    rng = np.random.default_rng(5)
    waves = [
        (rng.standard_normal(n) * amp).astype(np.int16)
        for n, amp in ((4_000, 50), (27_000, 8_000), (12_345, 1_000), (300, 100))
    ]
    together = run_teacher(t, waves)
    for w, got in zip(waves, together, strict=True):
        alone = run_teacher(t, [w])[0]
        assert got.shape == (TEACHERS["wavlm-tiny"].num_frames(len(w)), 64)
        if len(alone):
            np.testing.assert_allclose(got, alone, rtol=0, atol=1e-5 * np.abs(alone).max())


def test_normalisation_uses_valid_samples_only() -> None:
    x = torch.randn(2, 1000) * 5 + 3
    x[1, 600:] = 0
    y = normalize_waveform(x, torch.tensor([1000, 600]))
    alone = torch.nn.functional.layer_norm(x[1:, :600], (600,))
    assert torch.allclose(y[1, :600], alone[0], atol=1e-5)
    assert torch.all(y[1, 600:] == 0)


def test_frame_formula() -> None:
    spec = TEACHERS["wavlm"]
    hf = transformers.WavLMModel(_hf_config(wavlm_tiny()))
    n = torch.tensor([0, 399, 400, 719, 720, 16_000, 160_000, 480_000, 480_321])
    closed = torch.clamp((n - 400) // 320 + 1, min=0)
    assert [spec.num_frames(int(v)) for v in n] == closed.tolist()
    assert frame_lengths(wavlm_tiny(), n).tolist() == closed.tolist()
    valid = n >= 400  # transformers' formula goes negative below one receptive field
    assert hf._get_feat_extract_output_lengths(n)[valid].tolist() == closed[valid].tolist()
    assert spec.num_frames(16_000) == 49  # ~50 Hz


def test_checkpoint_sha256_recorded(hf_dir: Path) -> None:
    ckpt = fetch_checkpoint(str(hf_dir), StorageConfig())
    t = load_teacher(TeacherConfig(name="wavlm-tiny", checkpoint=str(hf_dir)))
    assert t.checkpoint_sha256 == ckpt.sha256 and len(ckpt.sha256) == 64
