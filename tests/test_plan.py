"""``spear plan``: the arithmetic against hand-computed cases, rates files, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spear.cli.main import run
from spear.errors import SpearError
from spear.plan import (
    Rates,
    RunSpec,
    explicit,
    load_rates,
    pick_rate,
    plan_run,
    resolve_rates,
)


def rates(wavlm: float, decode: float, dasheng: float | None = None, **kw: float) -> Rates:
    return Rates(
        wavlm=explicit("wavlm", wavlm),
        decode=explicit("decode", decode),
        dasheng=explicit("dasheng", dasheng) if dasheng else None,
        mvq_wavlm=explicit("mvq.wavlm", kw["mvq_wavlm"]) if "mvq_wavlm" in kw else None,
        token_bytes=explicit("token_bytes", kw["token_bytes"]) if "token_bytes" in kw else None,
    )


def test_gpu_bound_run_by_hand() -> None:
    # 100 h = 360,000 s of audio, a quarter of it audio-domain.
    # WavLM: 360,000 / 1,000 = 360 GPU-s; Dasheng: 90,000 / 500 = 180 GPU-s; 540 GPU-s total.
    # 2 GPUs: 270 s wall. Decode at 100x/core: 360,000 / 270 / 100 = 13.33 cores to keep up.
    p = plan_run(RunSpec(hours=100, gpus=2, audio_fraction=0.25), rates(1000, 100, 500))
    assert p.audio_seconds == 360_000
    assert p.wavlm_gpu_seconds == pytest.approx(360)
    assert p.dasheng_gpu_seconds == pytest.approx(180)
    assert p.gpu_hours == pytest.approx(0.15)
    assert p.gpu_wall_seconds == pytest.approx(270)
    assert p.wall_seconds == pytest.approx(270)
    assert p.limit == "gpu"
    assert p.cpus_to_feed == pytest.approx(13.3333, rel=1e-4)
    assert p.cpu_wall_seconds is None
    # int16 audio: 32 kB/s x 360,000 s x (1 + 0.25) passes = 14.4 GB, over 270 s.
    assert p.object_store_bytes == pytest.approx(14.4e9)
    assert p.object_store_bytes_per_second == pytest.approx(14.4e9 / 270)
    # codes: (800 + 0.25 x 200) B/s x 360,000 s = 306 MB; the 1,000 B/s bound is 360 MB.
    assert p.output_bytes_per_audio_second == pytest.approx(850)
    assert p.output_bytes == pytest.approx(306e6)
    assert p.output_bound_bytes == pytest.approx(360e6)
    assert "WavLM takes 67%" in p.notes[0]


def test_decode_bound_run_by_hand() -> None:
    # Same run with only 4 decode cores: 360,000 / (4 x 100) = 900 s > 270 s: decode limits.
    p = plan_run(RunSpec(hours=100, gpus=2, cpus=4, audio_fraction=0.25), rates(1000, 100, 500))
    assert p.cpu_wall_seconds == pytest.approx(900)
    assert p.wall_seconds == pytest.approx(900)
    assert p.limit == "decode"
    assert p.object_store_bytes_per_second == pytest.approx(14.4e9 / 900)
    assert "14 cores would keep all 2 fed" in p.notes[0]
    assert "limited by decode" in p.table()


def test_mvq_in_series_measured_bytes_and_wavlm_only() -> None:
    # Teacher 1,000x and MVQ 1,000x in one actor: 1 / (1/1000 + 1/1000) = 500x.
    # 10 h = 36,000 s -> 72 GPU-s on 1 GPU; no Dasheng; 36,000 / 72 / 50 = 10 cores.
    p = plan_run(
        RunSpec(hours=10, gpus=1, dasheng=False),
        rates(1000, 50, mvq_wavlm=1000, token_bytes=700),
    )
    assert p.wavlm_rate == pytest.approx(500)
    assert p.gpu_seconds == pytest.approx(72)
    assert p.dasheng_gpu_seconds == 0
    assert p.cpus_to_feed == pytest.approx(10)
    assert p.object_store_bytes == pytest.approx(32_000 * 36_000)
    assert p.output_bytes == pytest.approx(700 * 36_000)


def test_paper_scale_with_spec_anchors() -> None:
    # SPEC sec. 6: ~10,000x real time per H100 for WavLM at 40 % MFU -> 197k h in ~20 GPU-h.
    p = plan_run(
        RunSpec(hours=197_000, gpus=8, dasheng=False), rates(10_000, 5_000, mvq_wavlm=1e12)
    )
    assert p.gpu_hours == pytest.approx(19.7, rel=1e-3)
    # 0.71 TB of tokens at 1,000 B/s (SPEC sec. 3).
    assert p.output_bound_bytes == pytest.approx(0.7092e12, rel=1e-3)


def test_bad_inputs_are_one_line_errors() -> None:
    with pytest.raises(SpearError, match="--gpus"):
        RunSpec(hours=1, gpus=0)
    with pytest.raises(SpearError, match="dasheng"):
        plan_run(RunSpec(hours=1, gpus=1), rates(1000, 100))
    with pytest.raises(SpearError, match="no rate for wavlm, decode"):
        resolve_rates([], {}, None, dasheng=False)


def _write_rates(path: Path, entries: list[dict]) -> Path:
    path.write_text(json.dumps(entries))
    return path


def test_rates_files_pick_by_device_and_date(tmp_path: Path) -> None:
    common = {"unit": "x_realtime/gpu", "command": "benchmarks/teachers.py"}
    _write_rates(
        tmp_path / "a.json",
        [
            {"name": "wavlm", "value": 100, "device": "CPU, 2 threads", "date": "2026-01-01"}
            | common,
            {"name": "wavlm", "value": 3000, "device": "NVIDIA H100", "date": "2026-01-01"}
            | common,
        ],
    )
    _write_rates(
        tmp_path / "b.json",
        [{"name": "wavlm", "value": 4000, "device": "NVIDIA H100", "date": "2026-02-01"} | common],
    )
    stored = load_rates([tmp_path])
    assert len(stored) == 3
    with pytest.raises(SpearError, match="several devices"):
        pick_rate(stored, "wavlm")
    best = pick_rate(stored, "wavlm", "h100")
    assert best is not None and best.value == 4000 and best.source.endswith("b.json")
    assert pick_rate(stored, "dasheng", "h100") is None


def test_rates_file_errors(tmp_path: Path) -> None:
    bad = _write_rates(tmp_path / "bad.json", [{"name": "decode", "value": 1, "device": "x"}])
    with pytest.raises(SpearError, match="missing unit"):
        load_rates([bad])
    unit = _write_rates(
        tmp_path / "unit.json",
        [{"name": "decode", "value": 1, "unit": "x_realtime/gpu", "device": "x"}],
    )
    with pytest.raises(SpearError, match="x_realtime/core"):
        load_rates([unit])


def test_cli_mixes_file_and_explicit_rates(tmp_path: Path, capsys) -> None:
    f = _write_rates(
        tmp_path / "h100.json",
        [
            {"name": "wavlm", "value": 1000, "unit": "x_realtime/gpu", "device": "H100"},
            {"name": "dasheng", "value": 500, "unit": "x_realtime/gpu", "device": "H100"},
        ],
    )
    args = ["plan", "--hours", "100", "--gpus", "2", "--rates", str(f), "--decode-rate", "100"]
    assert run([*args, "--audio-fraction", "0.25", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gpu_hours"] == pytest.approx(0.15)
    assert out["limit"] == "gpu"
    assert out["rates"]["decode"]["source"] == "--decode-rate"
    assert run([*args, "--cpus", "4"]) == 0
    text = capsys.readouterr().out
    assert "limited by decode" in text and "h100.json [H100]" in text
    assert run(["plan", "--hours", "1", "--gpus", "1"]) == 2
    assert "no rate for wavlm, decode, dasheng" in capsys.readouterr().err
