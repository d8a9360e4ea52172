"""``benchmarks/gpu.py --cpu-test``: the GPU check's code paths on CPU with the tiny presets, its
tables, the rates file it writes (never into the shipped rates) and ``spear plan`` reading it."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from spear.cli.main import run
from spear.rates import SHIPPED_DIR

ROOT = Path(__file__).resolve().parents[1]
NAMES = {
    "wavlm",
    "dasheng",
    "mvq.wavlm",
    "mvq.dasheng",
    "tokenize.wavlm",
    "tokenize.dasheng",
    "student.tiny",
}


def _load_gpu_bench(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # its `rates`, `teachers` helpers
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "gpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_gpu", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_cpu_test_measures_every_part_and_feeds_the_planner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    shipped = {p.name: p.read_bytes() for p in SHIPPED_DIR.glob("*.json")}
    gpu = _load_gpu_bench(monkeypatch)
    out_dir = tmp_path / "rates"
    assert gpu.main(["--cpu-test", "--rates-out", str(out_dir)]) == 0
    text = capsys.readouterr().out
    for title in ("Teachers", "MVQ encode alone", "Fused tokenize actor", "Student train step"):
        assert title in text
    assert re.search(r"^total \d+\.\d s", text, re.M)
    (path,) = out_dir.glob("*.json")
    assert f"rates: {path}" in text
    entries = json.loads(path.read_text())
    by_name = {e["name"]: e for e in entries}
    assert set(by_name) == NAMES
    for e in entries:
        assert e["value"] > 0 and e["unit"] == "x_realtime/gpu"
        assert e["device"].endswith("(tiny presets)") and "benchmarks/gpu.py" in e["command"]
    # The tables print the figures the file holds (tokenize row: its x RT column).
    row = next(line for line in text.splitlines() if line.startswith("tokenize.wavlm "))
    assert f"{by_name['tokenize.wavlm']['value']:,.1f}" in row.split()
    # The tiny figures stay out of the rates spear ships.
    assert {p.name: p.read_bytes() for p in SHIPPED_DIR.glob("*.json")} == shipped

    args = ["plan", "--hours", "10", "--gpus", "1", "--rates", str(path), "--student", "tiny"]
    assert run([*args, "--decode-rate", "100", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    rates = plan["rates"]
    assert rates["tokenize_wavlm"]["source"] == str(path)
    assert plan["wavlm_rate"] == pytest.approx(by_name["tokenize.wavlm"]["value"])
    assert plan["dasheng_rate"] == pytest.approx(by_name["tokenize.dasheng"]["value"])
    assert plan["student_gpu_seconds"] == pytest.approx(36_000 / by_name["student.tiny"]["value"])


def test_a_part_that_fails_or_runs_past_the_budget_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    gpu = _load_gpu_bench(monkeypatch)

    def out_of_memory(*args: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")

    monkeypatch.setattr(gpu, "bench_student", out_of_memory)
    args = ["--cpu-test", "--only", "student", "--rates-out", str(tmp_path)]
    assert gpu.main(args) == 1
    text = capsys.readouterr().out
    assert "student.tiny: out of memory (CUDA out of memory." in text
    assert "not measured: student.tiny (out of memory)" in text
    assert "rates: none measured" in text and not list(tmp_path.iterdir())
    assert gpu.main([*args, "--budget-seconds", "-1"]) == 1
    assert "not measured: student.tiny (past --budget-seconds)" in capsys.readouterr().out
