"""Teacher registry, config, the pure stage function, fetching a teacher's checkpoint, the
driver's check of its weights and the Ray actor."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from spear import checkpoints
from spear.checkpoints import CheckpointError
from spear.config import load_config
from spear.errors import ConfigError, SpearError
from spear.formats import audio_to_bytes
from spear.quantizer.mvq import QuantizerInfo
from spear.stages.teachers import (
    TEACHERS,
    TeacherConfig,
    TeacherStage,
    _plan,
    check_quantizer_weights,
    checkpoint_sha256,
    embed_batch,
    load_teacher,
)
from spear.storage import StorageConfig


def test_registry_numbers() -> None:
    w, d = TEACHERS["wavlm"], TEACHERS["dasheng"]
    assert (w.sample_rate, w.frame_rate, w.dim, w.layer) == (16_000, 50.0, 1024, 21)
    assert (d.sample_rate, d.frame_rate, d.dim, d.layer) == (16_000, 25.0, 1536, 40)
    assert TEACHERS["dasheng-base"].dim == 768 and TEACHERS["dasheng-0.6b"].dim == 1280
    for name in ("wavlm", "dasheng", "dasheng-base", "dasheng-0.6b"):
        arch = TEACHERS[name].arch()
        assert getattr(arch, "dim", None) or arch.embed_dim == TEACHERS[name].dim


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="unknown teacher"):
        TeacherConfig(name="hubert")
    with pytest.raises(ConfigError, match="outside"):
        TeacherConfig(name="wavlm", layer=25)
    with pytest.raises(ConfigError, match="final layer"):
        TeacherConfig(name="dasheng", layer=3)
    cfg = load_config(sets=["teachers.dasheng.checkpoint=s3://b/d.pt", "teachers.wavlm.layer=20"])
    assert cfg.teachers.dasheng.name == "dasheng" and cfg.teachers.wavlm.layer == 20
    with pytest.raises(ConfigError, match="not a Dasheng"):
        load_config(sets=["teachers.dasheng.name=wavlm-tiny"])


def test_plan_sorts_and_bounds_padding() -> None:
    lengths = [50, 10, 40, 20, 30, 500]
    groups = _plan(lengths, budget=100)
    assert sorted(i for g in groups for i in g) == list(range(6))
    for g in groups:
        if len(g) > 1:
            assert len(g) * max(lengths[i] for i in g) <= 100
    assert groups[-1] == [5]  # longer than the budget: alone


def _batch(lengths: list[int]) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    audio = [audio_to_bytes((rng.standard_normal(n) * 1000).astype(np.int16)) for n in lengths]
    return {
        "item_id": np.array([f"id{i}" for i in range(len(lengths))], dtype=object),
        "domain": np.array(["speech"] * len(lengths), dtype=object),
        "num_samples": np.array(lengths, dtype=np.int64),
        "audio": np.array(audio, dtype=object),
        "source": np.array(["s"] * len(lengths), dtype=object),
    }


@pytest.mark.parametrize("name", ["wavlm-tiny", "dasheng-tiny"])
def test_embed_batch_contract(name: str) -> None:
    spec = TEACHERS[name]
    teacher = load_teacher(TeacherConfig(name=name, batch_seconds=1.0))
    lengths = [16_000, 3_000, 100, 24_000]
    out = embed_batch(teacher, _batch(lengths))
    assert "audio" not in out and list(out["item_id"]) == ["id0", "id1", "id2", "id3"]
    assert list(out["source"]) == ["s"] * 4
    assert out["num_frames"].dtype == np.int32
    assert out["num_frames"].tolist() == [spec.num_frames(n) for n in lengths]
    for n, blob in zip(out["num_frames"], out["embeddings"], strict=True):
        emb = np.frombuffer(blob, dtype="<f2").reshape(-1, spec.dim)
        assert emb.shape == (n, spec.dim) and np.isfinite(emb).all()
    kept = embed_batch(teacher, _batch([16_000]), prefix="t_", keep_audio=True)
    assert "audio" in kept and "t_embeddings" in kept and "t_num_frames" in kept


def test_embed_batch_rejects_inconsistent_rows() -> None:
    teacher = load_teacher(TeacherConfig(name="wavlm-tiny"))
    batch = _batch([1000])
    batch["num_samples"] = np.array([999], dtype=np.int64)
    with pytest.raises(SpearError, match="num_samples"):
        embed_batch(teacher, batch)


def _save_tiny_wavlm(path: Path) -> None:
    from torchaudio.models import wavlm_model

    torch.manual_seed(0)
    ta = wavlm_model(
        extractor_mode="layer_norm",
        extractor_conv_layer_config=[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2,
        extractor_conv_bias=False,
        encoder_embed_dim=64,
        encoder_projection_dropout=0.0,
        encoder_pos_conv_kernel=16,
        encoder_pos_conv_groups=4,
        encoder_num_layers=3,
        encoder_num_heads=4,
        encoder_num_buckets=32,
        encoder_max_distance=64,
        encoder_attention_dropout=0.0,
        encoder_ff_interm_features=128,
        encoder_ff_interm_dropout=0.0,
        encoder_dropout=0.0,
        encoder_layer_norm_first=True,
        encoder_layer_drop=0.0,
        aux_num_out=None,
    )
    torch.save(ta.state_dict(), path)


@pytest.mark.integration
def test_checkpoint_fetched_once_from_s3(s3_server: Any, tmp_path: Path, monkeypatch: Any) -> None:
    local = tmp_path / "wavlm_tiny.pt"
    _save_tiny_wavlm(local)
    bucket = s3_server.bucket("ckpt")
    url = f"{bucket}/models/wavlm_tiny.pt"
    from spear.storage import write_atomic

    write_atomic(url, local.read_bytes(), s3_server.storage)
    cfg = TeacherConfig(name="wavlm-tiny", checkpoint=url, cache_dir=str(tmp_path / "cache"))
    t = load_teacher(cfg, s3_server.storage)
    assert t.checkpoint_sha256 == hashlib.sha256(local.read_bytes()).hexdigest()
    assert t.layout == "torchaudio"

    def no_fetch(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("fetched twice")

    monkeypatch.setattr(checkpoints, "filesystem", no_fetch)
    again = load_teacher(cfg, s3_server.storage)
    assert again.checkpoint_sha256 == t.checkpoint_sha256


def test_missing_checkpoint_and_offline_hub_are_one_clear_error(
    tmp_path: Path, monkeypatch: Any
) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_teacher(TeacherConfig(name="wavlm-tiny", checkpoint=str(tmp_path / "nope.pt")))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="Hugging Face hub"):
        load_teacher(
            TeacherConfig(name="wavlm", checkpoint="no-such-org/wavlm", cache_dir=str(tmp_path))
        )


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("executed",))


def test_never_unpickles_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": _Evil(), "cfg": {}}, path)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_teacher(TeacherConfig(name="wavlm-tiny", checkpoint=str(path)))


def test_checkpoint_of_another_size_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "wavlm_tiny.pt"
    _save_tiny_wavlm(path)
    with pytest.raises(ConfigError, match="64-d model"):
        load_teacher(TeacherConfig(name="wavlm", checkpoint=str(path)))


@pytest.mark.integration
@pytest.mark.slow  # the embed and tokenize job tests run the same stage in actors
def test_ray_actor_stage(ray_cluster: str) -> None:
    import ray

    from spear.pipeline.job import pack, unit_actor, unpack

    cfg = TeacherConfig(name="wavlm-tiny")
    batch = _batch([8_000, 1_000, 16_000])
    actor = ray.remote(unit_actor(TeacherStage)).options(num_cpus=1).remote(cfg=cfg)
    got = unpack(ray.get(actor.run.remote(pack(batch))))
    by_id = {str(i): k for k, i in enumerate(got["item_id"])}
    assert sorted(by_id) == ["id0", "id1", "id2"]
    assert got["num_frames"][by_id["id2"]] == TEACHERS["wavlm-tiny"].num_frames(16_000)
    # The actor computes what the pure function computes.
    local = embed_batch(load_teacher(cfg), batch)
    np.testing.assert_allclose(
        np.frombuffer(got["embeddings"][by_id["id2"]], "<f2").astype(np.float32),
        np.frombuffer(local["embeddings"][2], "<f2").astype(np.float32),
        rtol=2e-3,
        atol=1e-3,
    )
    ray.kill(actor)


# ---------------------------------------------------------------- the driver's check of weights


def test_random_weights_need_allow_random_and_say_so(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ConfigError, match="would run with random weights") as err:
        checkpoint_sha256(TeacherConfig(name="wavlm-tiny"), StorageConfig())
    assert "--random-teachers" in str(err.value) and "teachers.wavlm.checkpoint" in str(err.value)
    caplog.clear()
    cfg = TeacherConfig(name="dasheng-tiny", allow_random=True)
    assert checkpoint_sha256(cfg, StorageConfig()) is None
    said = [r for r in caplog.records if "RANDOM weights" in r.getMessage()]
    assert (
        len(said) == 1 and said[0].levelname == "WARNING" and "dasheng-tiny" in said[0].getMessage()
    )


def _dasheng_pt(path: Path, state: dict[str, Any] | None = None) -> Path:
    from spear.stages.teachers.dasheng import build_dasheng, dasheng_tiny

    arch = dasheng_tiny()
    config = {"embed_dim": arch.embed_dim, "depth": arch.depth, "num_heads": arch.num_heads}
    torch.save({"model": state or build_dasheng(arch).state_dict(), "config": config}, path)
    return path


def test_driver_reads_the_checkpoint_against_the_preset(tmp_path: Path) -> None:
    """Keys and shapes are checked on the meta device before any actor exists; the sha256 is
    the file's."""
    from spear.stages.teachers.dasheng import build_dasheng, dasheng_tiny

    good = _dasheng_pt(tmp_path / "good.pt")
    cfg = TeacherConfig(name="dasheng-tiny", checkpoint=str(good))
    assert checkpoint_sha256(cfg, StorageConfig()) == hashlib.sha256(good.read_bytes()).hexdigest()
    state = build_dasheng(dasheng_tiny()).state_dict()
    state["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    bad = _dasheng_pt(tmp_path / "bad.pt", state)
    with pytest.raises(CheckpointError, match=r"'blocks.0.attn.qkv.weight' has shape \(3, 3\)"):
        checkpoint_sha256(replace_ckpt(cfg, bad), StorageConfig())
    with pytest.raises(CheckpointError, match="is a Dasheng checkpoint, not WavLM"):
        checkpoint_sha256(TeacherConfig(name="wavlm-tiny", checkpoint=str(good)), StorageConfig())
    # A model of another size: the message names the checkpoint and the teacher.
    with pytest.raises(ConfigError, match="64-d model") as err:
        checkpoint_sha256(TeacherConfig(name="dasheng-base", checkpoint=str(good)), StorageConfig())
    assert str(good) in str(err.value)


def replace_ckpt(cfg: TeacherConfig, path: Path) -> TeacherConfig:
    from dataclasses import replace

    return replace(cfg, checkpoint=str(path))


def test_a_quantiser_of_other_weights_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    cfg = TeacherConfig(name="wavlm-tiny", allow_random=True)
    sha = "cd" * 32
    info = QuantizerInfo(dim=64, num_codebooks=2, codebook_size=16, teacher="wavlm-tiny", layer=2)
    check_quantizer_weights(
        "q", QuantizerInfo(**{**info.__dict__, "teacher_weights": sha}), cfg, sha
    )
    check_quantizer_weights(
        "q", QuantizerInfo(**{**info.__dict__, "teacher_weights": "random"}), cfg, None
    )
    with pytest.raises(
        ConfigError,
        match="with random weights, but teacher wavlm-tiny runs with checkpoint sha256 cdcdcd",
    ):
        check_quantizer_weights(
            "q", QuantizerInfo(**{**info.__dict__, "teacher_weights": "random"}), cfg, sha
        )
    with pytest.raises(ConfigError, match=r"checkpoint sha256 cdcdcd.*runs with random weights"):
        check_quantizer_weights(
            "q", QuantizerInfo(**{**info.__dict__, "teacher_weights": sha}), cfg, None
        )
    caplog.clear()
    check_quantizer_weights("old q", info, cfg, sha)  # format < 3: unknown, said, not refused
    assert any("does not record the teacher weights" in r.getMessage() for r in caplog.records)
