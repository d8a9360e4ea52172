"""The tokenize stage's pure core: which rows run, what passes on, what becomes an error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spear.errors import ConfigError
from spear.formats import audio_to_bytes
from spear.quantizer.mvq import Quantizer, QuantizerInfo
from spear.shards.schema import codes_from_bytes
from spear.stages.teachers import TeacherConfig, load_teacher, run_teacher
from spear.stages.tokenize import NOT_RUN, TokenizeTeacherConfig, tokenize_batch


def batch_of(waves: list[np.ndarray], domains: list[str], errors: list[str]) -> dict:
    n = len(waves)
    audio = np.empty(n, dtype=object)
    audio[:] = [audio_to_bytes(w) for w in waves]
    return {
        "item_id": np.array([f"i{k}" for k in range(n)], dtype=object),
        "url": np.array([f"u{k}" for k in range(n)], dtype=object),
        "domain": np.array(domains, dtype=object),
        "num_samples": np.array([len(w) for w in waves], dtype=np.int64),
        "audio": audio,
        "error_type": np.array(errors, dtype=object),
        "error": np.array(["boom" if e else "" for e in errors], dtype=object),
    }


def test_rows_by_domain_error_and_length() -> None:
    teacher = load_teacher(TeacherConfig(name="dasheng-tiny"))
    torch.manual_seed(0)
    q = Quantizer(QuantizerInfo(dim=64, num_codebooks=4, codebook_size=16))
    rng = np.random.default_rng(0)
    waves = [(rng.standard_normal(n) * 3000).astype(np.int16) for n in (16000, 24000, 8000, 300)]
    b = batch_of(waves, ["audio", "speech", "audio", "audio"], ["", "", "io", ""])
    out = tokenize_batch(
        teacher, q, b, prefix="dasheng", domains=("audio",), refine_rounds=2, keep_audio=("audio",)
    )
    frames = out["dasheng_frames"].tolist()
    # Row 0 runs; row 1 is another domain; row 2 failed to decode; row 3 is too short.
    assert frames[1] == frames[2] == frames[3] == NOT_RUN and frames[0] > 0
    assert list(out["error_type"]) == ["", "", "io", "too_short"]
    (emb,) = run_teacher(teacher, [waves[0]])
    want = q.encode(torch.from_numpy(emb), 2).numpy()
    np.testing.assert_array_equal(codes_from_bytes(out["dasheng_codes"][0], 4), want)
    # Audio goes on only where a later teacher (domains in keep_audio) will need it.
    assert out["audio"][0] == b["audio"][0] and out["audio"][1] == b"" and out["audio"][2] == b""
    assert "audio" not in tokenize_batch(
        teacher, q, b, prefix="dasheng", domains=("audio",), refine_rounds=0, keep_audio=()
    )


def test_bad_domains_are_refused() -> None:
    with pytest.raises(ConfigError, match="music"):
        TokenizeTeacherConfig(domains=("speech", "music"))


def test_a_failing_item_is_quarantined_not_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    import spear.stages.tokenize as stage

    teacher = load_teacher(TeacherConfig(name="wavlm-tiny"))
    q = Quantizer(QuantizerInfo(dim=64, num_codebooks=4, codebook_size=16))
    rng = np.random.default_rng(1)
    waves = [(rng.standard_normal(n) * 3000).astype(np.int16) for n in (8000, 12345, 9000)]
    real = stage.run_teacher

    def flaky(t, ws):  # one item's length breaks the model (as a CUDA OOM would)
        if any(len(w) == 12345 for w in ws):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(t, ws)

    monkeypatch.setattr(stage, "run_teacher", flaky)
    tok = stage.TokenizeStage.__new__(stage.TokenizeStage)
    tok.teacher, tok.quantizer = teacher, q
    tok.kw = {"prefix": "wavlm", "domains": ("speech",), "refine_rounds": 1, "keep_audio": ()}
    out = tok(batch_of(waves, ["speech"] * 3, ["", "", ""]))
    assert list(out["error_type"]) == ["", "internal", ""]
    assert "simulated" in out["error"][1]
    assert out["wavlm_frames"][0] > 0 and out["wavlm_frames"][2] > 0
