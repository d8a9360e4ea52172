"""``spear plan``: the arithmetic against hand-computed cases, rates files and how they are
chosen, the shipped rates, manifests, the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spear.cli.main import run
from spear.errors import SpearError
from spear.formats import MANIFEST_SCHEMA
from spear.plan import (
    DRIVER_CARRYING_CORES,
    DRIVER_SECONDS_PER_CALL,
    DRIVER_SECONDS_PER_UNIT,
    RunSpec,
    manifest_facts,
    plan_run,
)
from spear.rates import (
    SHIPPED_DIR,
    STUDENT_PRESETS,
    Rate,
    RateChoice,
    Rates,
    explicit,
    load_rates,
    peak_tflops,
    pick_rate,
    resolve_rates,
    shipped_rates,
)


def rates(wavlm: float, decode: float, dasheng: float | None = None, **kw: float) -> Rates:
    def opt(name: str, key: str) -> Rate | None:
        return explicit(name, kw[key]) if key in kw else None

    return Rates(
        wavlm=explicit("wavlm", wavlm),
        decode=explicit("decode", decode),
        dasheng=explicit("dasheng", dasheng) if dasheng else None,
        mvq_wavlm=opt("mvq.wavlm", "mvq_wavlm"),
        tokenize_wavlm=opt("tokenize.wavlm", "tokenize_wavlm"),
        token_bytes=opt("token_bytes", "token_bytes"),
        student=opt("student.base", "student"),
    )


def entry(name: str, value: float, device: str, date: str = "2026-01-01") -> dict:
    unit = "x_realtime/core" if name == "decode" else "x_realtime/gpu"
    if name == "token_bytes":
        unit = "bytes/audio_second"
    return {"name": name, "value": value, "unit": unit, "device": device, "date": date}


def _write_rates(path: Path, entries: list[dict]) -> Path:
    path.write_text(json.dumps(entries))
    return path


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
    # No audio in the object store: codes (850 B/s) x 360,000 s, once (the fused actor) = 306 MB.
    assert p.object_store_bytes == pytest.approx(306e6)
    assert p.object_store_bytes_per_second == pytest.approx(306e6 / 270)
    # 10 shards in 270 s, one per call (too few to group): carrying + 10 / 270 x per shard.
    assert p.units_per_call == 1
    assert p.driver_cores == pytest.approx(
        DRIVER_CARRYING_CORES + 10 / 270 * (DRIVER_SECONDS_PER_CALL + DRIVER_SECONDS_PER_UNIT)
    )
    # codes: (800 + 0.25 x 200) B/s x 360,000 s = 306 MB; the 1,000 B/s bound is 360 MB.
    assert p.output_bytes_per_audio_second == pytest.approx(850)
    assert p.output_bytes == pytest.approx(306e6)
    assert p.output_bound_bytes == pytest.approx(360e6)
    assert "WavLM takes 67%" in p.notes[0]
    # No student rate, no price: no training or cost figures.
    assert p.student_gpu_seconds is None and p.tokenize_cost is None
    assert "student" not in p.table() and "cost" not in p.table()


def test_counts_and_source_bytes_by_hand() -> None:
    # Items: 270,000 s of speech / 20 s + 90,000 s of audio / 10 s = 13,500 + 9,000 = 22,500;
    # shards: max(22,500 / 10,000 -> 3, 100 h / 10 h = 10) = 10; storage 3 x 10 + 4 = 34;
    # object store: 3 per call, one shard a call = 30. Source: 360,000 s x 16,000 B/s = 5.76 GB.
    p = plan_run(RunSpec(hours=100, gpus=2, audio_fraction=0.25), rates(1000, 100, 500))
    assert (p.items, p.files, p.shards) == (22_500, 22_500, 10)
    assert p.storage_objects == 34 and p.object_store_objects == 30
    assert p.source_bytes == pytest.approx(5.76e9)
    assert p.counts_from == "estimate"
    # 44.1 kHz sources, 10-minute files, shards of 100 items: 360,000 / 600 = 600 files,
    # 22,500 / 100 = 225 shards (more than the 10 the hours need).
    p = plan_run(
        RunSpec(
            hours=100,
            gpus=2,
            audio_fraction=0.25,
            source_bytes_per_second=44_000,
            file_seconds=600,
            items_per_shard=100,
        ),
        rates(1000, 100, 500),
    )
    assert (p.files, p.shards) == (600, 225)
    assert p.source_bytes == pytest.approx(15.84e9)
    # 10,000 h: 1,000 shards, 8 to a call on 2 GPUs: 3 x 125 objects in the object store.
    p = plan_run(RunSpec(hours=10_000, gpus=2, dasheng=False), rates(1000, 100))
    assert (p.shards, p.units_per_call, p.object_store_objects) == (1_000, 8, 375)


def test_student_and_cost_by_hand() -> None:
    # Student base at 500x on 4 GPUs, 2 epochs: 360,000 x 2 / 500 = 1,440 GPU-s, 360 s wall.
    # At 2.0 a GPU-hour: tokenize 2 GPUs x 270 s = 0.15 h -> 0.30; student 4 x 360 s = 0.4 h
    # -> 0.80; total 1.10.
    p = plan_run(
        RunSpec(
            hours=100, gpus=2, audio_fraction=0.25, epochs=2, train_gpus=4, cost_per_gpu_hour=2.0
        ),
        rates(1000, 100, 500, student=500),
    )
    assert p.student_gpu_seconds == pytest.approx(1440)
    assert p.student_wall_seconds == pytest.approx(360)
    assert p.tokenize_cost == pytest.approx(0.30)
    assert p.student_cost == pytest.approx(0.80)
    text = p.table()
    assert "cost (total)" in text and "1.10" in text and "student base" in text
    # Decode-bound, the GPUs are held (and paid) for the longer wall time: 900 s x 2 GPUs.
    p = plan_run(
        RunSpec(hours=100, gpus=2, cpus=4, audio_fraction=0.25, cost_per_gpu_hour=2.0),
        rates(1000, 100, 500),
    )
    assert p.tokenize_cost == pytest.approx(1.0)
    assert p.student_cost is None


def test_decode_bound_run_by_hand() -> None:
    # Same run with only 4 decode cores: 360,000 / (4 x 100) = 900 s > 270 s: decode limits.
    p = plan_run(RunSpec(hours=100, gpus=2, cpus=4, audio_fraction=0.25), rates(1000, 100, 500))
    assert p.cpu_wall_seconds == pytest.approx(900)
    assert p.wall_seconds == pytest.approx(900)
    assert p.limit == "decode"
    assert p.object_store_bytes_per_second == pytest.approx(306e6 / 900)
    assert "14 cores would keep all 2 fed" in p.notes[0]
    assert "limited by decode" in p.table()


def test_mvq_in_series_fused_actor_measured_bytes_and_wavlm_only() -> None:
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
    assert p.object_store_bytes == pytest.approx(700 * 36_000)
    assert p.output_bytes == pytest.approx(700 * 36_000)
    # A measured fused actor (400x) is the rate; the series figure is shown beside it.
    p = plan_run(
        RunSpec(hours=10, gpus=1, dasheng=False),
        rates(1000, 50, mvq_wavlm=1000, tokenize_wavlm=400),
    )
    assert p.wavlm_rate == pytest.approx(400)
    assert p.gpu_seconds == pytest.approx(90)
    assert "in series 500.0x" in p.table()


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
    with pytest.raises(SpearError, match="--epochs"):
        RunSpec(hours=1, gpus=1, epochs=0)
    with pytest.raises(SpearError, match="dasheng"):
        plan_run(RunSpec(hours=1, gpus=1), rates(1000, 100))
    with pytest.raises(SpearError, match="no rate for wavlm, decode"):
        resolve_rates([], {}, RateChoice(dasheng=False, student=None))
    with pytest.raises(SpearError, match="--student-rate"):
        resolve_rates([], {"wavlm": 1.0, "decode": 1.0}, RateChoice(dasheng=False))
    with pytest.raises(SpearError, match="--student must be one of"):
        RateChoice(student="huge")


def test_student_presets_match_the_encoder_presets() -> None:
    from spear.student.config import ENCODER_PRESETS

    assert sorted(STUDENT_PRESETS) == sorted(ENCODER_PRESETS)


def test_rates_files_pick_by_device_and_date(tmp_path: Path) -> None:
    _write_rates(
        tmp_path / "a.json",
        [entry("wavlm", 100, "CPU, 2 threads"), entry("wavlm", 3000, "NVIDIA H100")],
    )
    _write_rates(tmp_path / "b.json", [entry("wavlm", 4000, "NVIDIA H100", "2026-02-01")])
    stored = load_rates([tmp_path])
    assert len(stored) == 3
    with pytest.raises(SpearError, match="several devices"):
        pick_rate(stored, "wavlm")
    best = pick_rate(stored, "wavlm", "h100")
    assert best is not None and best.value == 4000 and best.source.endswith("b.json")
    assert pick_rate(stored, "dasheng", "h100") is None


def test_host_rates_come_from_the_cpu_that_measured_them(tmp_path: Path) -> None:
    gpu, cpu = "NVIDIA H200", "CPU AMD EPYC, 1 threads"
    stored = load_rates(
        [
            _write_rates(
                tmp_path / "r.json",
                [
                    entry("wavlm", 9000, gpu),
                    entry("tokenize.wavlm", 7000, gpu),
                    entry("mvq.wavlm", 20000, gpu),
                    entry("student.base", 8000, gpu),
                    entry("decode", 900, cpu),
                    entry("token_bytes", 740, cpu),
                ],
            )
        ]
    )
    r = resolve_rates(stored, {}, RateChoice(device="H200", dasheng=False))
    assert r.decode.device == cpu and r.token_bytes is not None and r.token_bytes.value == 740
    assert r.tokenize_wavlm is not None and r.student is not None and r.student.value == 8000
    assert any("decode rate from CPU AMD EPYC" in n for n in r.notes)
    p = plan_run(RunSpec(hours=10, gpus=1, dasheng=False), r)
    assert p.wavlm_rate == 7000  # the fused actor, not the teacher alone
    assert any("from different devices" in n for n in p.notes)
    # An explicit teacher rate is the whole actor: the stored fused figure steps aside.
    r = resolve_rates(stored, {"wavlm": 5000}, RateChoice(device="H200", dasheng=False))
    assert r.tokenize_wavlm is None and r.wavlm is not None and r.wavlm.source == "--wavlm-rate"
    assert r.mvq_wavlm is None
    r = resolve_rates(stored, {"wavlm": 5000, "mvq.wavlm": 5000}, RateChoice(dasheng=False))
    assert plan_run(RunSpec(hours=10, gpus=1, dasheng=False), r).wavlm_rate == 2500
    # Two CPUs measured decode and none is the GPU machine's: the plan asks which.
    stored.append(Rate(name="decode", value=800, unit="x_realtime/core", device="CPU Intel"))
    with pytest.raises(SpearError, match="--cpu-device"):
        resolve_rates(stored, {}, RateChoice(device="H200", dasheng=False))
    r = resolve_rates(stored, {}, RateChoice(device="H200", cpu_device="intel", dasheng=False))
    assert r.decode.value == 800


def test_peak_table_and_arithmetic_rates() -> None:
    assert peak_tflops("NVIDIA H100 80GB HBM3") == (989.0, "H100")
    assert peak_tflops("NVIDIA H100 PCIe") == (756.0, "H100 PCIe")
    assert peak_tflops("NVIDIA L40S") == (362.0, "L40S")
    assert peak_tflops("NVIDIA H200") == (989.0, "H200")
    assert peak_tflops("CPU AMD EPYC, 2 threads") is None
    # SPEC sec. 6: 40 % of 989 TFLOP/s over 36.5 GFLOP per audio second = 10,838x (WavLM),
    # over 58 = 6,821x (Dasheng); the student base at 24.6 GFLOP/s 16,081x.
    stored = [Rate(name="decode", value=900, unit="x_realtime/core", device="CPU")]
    r = resolve_rates(stored, {}, RateChoice(device="H100", assume_mfu=0.4))
    assert r.wavlm is not None and r.wavlm.value == pytest.approx(10_838.4, rel=1e-4)
    assert r.dasheng is not None and r.dasheng.value == pytest.approx(6_820.7, rel=1e-4)
    assert r.student is not None and r.student.value == pytest.approx(16_081.3, rel=1e-4)
    assert r.wavlm.source.startswith("arithmetic: 40% MFU of 989 TFLOP/s (H100 bf16 dense)")
    assert r.mvq_wavlm is None  # no FLOP count for the encode: not invented
    p = plan_run(RunSpec(hours=197_000, gpus=16), r)
    assert any("not measurements" in n for n in p.notes)
    with pytest.raises(SpearError, match="--peak-tflops"):
        resolve_rates(stored, {}, RateChoice(device="MI300", assume_mfu=0.4))
    r = resolve_rates(stored, {}, RateChoice(device="MI300", assume_mfu=0.5, peak_tflops=1000))
    assert r.wavlm is not None and r.wavlm.value == pytest.approx(0.5e15 / 36.5e9)


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


def test_shipped_rates_are_measured_and_used_by_default(capsys) -> None:
    shipped = shipped_rates()
    assert SHIPPED_DIR.parent.name == "spear" and shipped
    names = {r.name for r in shipped}
    assert {"wavlm", "dasheng", "mvq.wavlm", "tokenize.wavlm", "decode", "student.base"} <= names
    assert all(r.device and r.command and r.date for r in shipped)
    assert run(["plan", "--hours", "100", "--gpus", "2"]) == 0
    text = capsys.readouterr().out
    # Each figure names the shipped file and the device that measured it.
    assert "cpu-amd-epyc" in text and "[CPU AMD EPYC" in text and "student base" in text
    assert "'GPU' means one process" in text


def test_docs_device_example(capsys) -> None:
    # docs/deploy.md: no H100 rates are shipped, so the plan names what exists ...
    args = ["plan", "--hours", "197000", "--gpus", "16", "--device", "H100"]
    assert run(args) == 2
    err = capsys.readouterr().err
    assert "no rate for wavlm" in err and "CPU AMD EPYC" in err and "--assume-mfu" in err
    # ... or plans from SPEC's arithmetic when asked, labelled as such.
    assert run([*args, "--assume-mfu", "0.4", "--cost-per-gpu-hour", "2.5"]) == 0
    text = capsys.readouterr().out
    assert "arithmetic: 40% MFU of 989 TFLOP/s" in text and "not measurements" in text
    assert "decode rate from CPU AMD EPYC" in text and "cost (total)" in text


def test_cli_mixes_file_and_explicit_rates(tmp_path: Path, capsys) -> None:
    f = _write_rates(
        tmp_path / "h100.json", [entry("wavlm", 1000, "H100"), entry("dasheng", 500, "H100")]
    )
    args = ["plan", "--hours", "100", "--gpus", "2", "--rates", str(f), "--decode-rate", "100"]
    args += ["--student-rate", "500", "--epochs", "2", "--train-gpus", "4"]
    assert run([*args, "--audio-fraction", "0.25", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gpu_hours"] == pytest.approx(0.15)
    assert out["limit"] == "gpu"
    assert out["rates"]["decode"]["source"] == "--decode-rate"
    assert out["rates"]["wavlm"]["source"] == str(f)
    assert out["student_wall_seconds"] == pytest.approx(360)
    assert run([*args, "--cpus", "4"]) == 0
    text = capsys.readouterr().out
    assert "limited by decode" in text and "h100.json [H100]" in text
    assert run(["plan", "--hours", "1", "--gpus", "1", "--rates", str(f)]) == 2
    assert "no rate for decode, student.base" in capsys.readouterr().err
    assert run(["plan", "--gpus", "1"]) == 2
    assert "--hours" in capsys.readouterr().err


def _manifest(out: Path) -> Path:
    # a.flac: one 30 s segment of a 60 s, 960 kB file (half its bytes are read);
    # b.flac: two 10 s audio windows of a 20 s, 640 kB file; c.flac: 15 s, 300 kB, whole.
    rows = [
        ("a", "speech", 0, 0.0, 30.0, 60.0, 960_000),
        ("b", "audio", 0, 0.0, 10.0, 20.0, 640_000),
        ("b", "audio", 1, 10.0, 10.0, 20.0, 640_000),
        ("c", "speech", 0, 0.0, 15.0, 15.0, 300_000),
    ]
    cols = {k: [] for k in MANIFEST_SCHEMA.names}
    for name, domain, seg, start, dur, fdur, size in rows:
        values = {
            "item_id": f"{name}-{seg:04d}",
            "source": "s",
            "domain": domain,
            "url": f"s3://b/{name}.flac",
            "segment": seg,
            "start": start,
            "duration": dur,
            "file_duration": fdur,
            "sample_rate": 16000,
            "channels": 1,
            "format": "FLAC",
            "subtype": "PCM_16",
            "file_size": size,
        }
        for k, v in values.items():
            cols[k].append(v)
    (out / "manifest").mkdir(parents=True)
    pq.write_table(pa.table(cols, schema=MANIFEST_SCHEMA), out / "manifest" / "part-0.parquet")
    (out / "_SUCCESS.json").write_text("{}")
    return out


def test_manifest_gives_exact_counts_and_bytes(tmp_path: Path, capsys) -> None:
    m = _manifest(tmp_path / "run")
    table = pq.read_table(m / "manifest")
    facts = manifest_facts(table, items_per_shard=2, max_shard_hours=None)
    assert (facts.items, facts.files, facts.shards) == (4, 3, 2)
    assert facts.hours == pytest.approx(65 / 3600)
    assert facts.audio_hours == pytest.approx(20 / 3600)
    assert facts.source_bytes == pytest.approx(480_000 + 640_000 + 300_000)
    assert facts.file_bytes == pytest.approx(1_900_000)
    args = [
        "plan",
        "--manifest",
        str(m),
        "--gpus",
        "1",
        "--wavlm-rate",
        "10",
        "--dasheng-rate",
        "10",
        "--decode-rate",
        "10",
        "--student",
        "none",
        "--json",
    ]
    assert run([*args, "--set", "tokenize.items_per_shard=2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["counts_from"] == "manifest" and (out["items"], out["files"]) == (4, 3)
    assert out["shards"] == 2 and out["source_bytes"] == pytest.approx(1_420_000)
    assert out["spec"]["audio_fraction"] == pytest.approx(20 / 65)
    assert run([*args, "--hours", "3"]) == 2
    assert "not both" in capsys.readouterr().err


def test_driver_line_and_note_when_shards_come_too_fast() -> None:
    # 197k h at 8,000x per GPU (WavLM only), 10 h shards: 19,700 shards. 64 GPUs: 1,385 s of
    # wall, 14.2 shards/s; 512 GPUs: 173 s, 114 shards/s. Either groups 8 shards per call.
    spec = RunSpec(hours=197_000, gpus=64, dasheng=False)
    p = plan_run(spec, rates(8000, 1000))
    assert p.shards == 19_700 and p.wall_seconds == pytest.approx(1385.2, rel=1e-3)
    per_shard = DRIVER_SECONDS_PER_CALL / 8 + DRIVER_SECONDS_PER_UNIT
    assert p.units_per_call == 8
    assert p.driver_cores == pytest.approx(
        DRIVER_CARRYING_CORES + 19_700 / p.wall_seconds * per_shard
    )
    assert "driver" in p.table() and "8 per actor call" in p.table()
    big = plan_run(dataclasses.replace(spec, gpus=512), rates(8000, 1000))
    assert big.driver_cores - DRIVER_CARRYING_CORES == pytest.approx(
        8 * (p.driver_cores - DRIVER_CARRYING_CORES)
    )
    too_fast = [n for n in big.notes if "raise tokenize.max_shard_hours" in n]
    assert bool(too_fast) == (big.driver_cores > 0.5)
    # Shards of 6 min: 100x the shards/s, too many for one core even 8 to a call.
    small = plan_run(dataclasses.replace(spec, max_shard_hours=0.1), rates(8000, 1000))
    assert any("raise tokenize.max_shard_hours" in n for n in small.notes)
