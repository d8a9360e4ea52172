"""Learning shown (``benchmarks/learning.py``): on real recordings the tiny student learns the
tiny teacher's tokens, and does not learn another item's tokens.

The slow test runs the benchmark's real-against-control comparison with its own settings and
all 300 steps: the gap opens late (about +0.1 nats per frame at step 200, docs/student.md), so
a shorter run would not show what is asserted. It takes ~4-6 minutes on a shared 2-core
machine. The other tests check the benchmark's pieces on made-up data and run by default.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[2]
POCKETSPHINX = "/usr/share/pocketsphinx/test/data"
GAP = 0.3
"""nats per frame (mean of the last 20 steps) the real run must end below the control; the
benchmark's default seed reached +0.47 (docs/student.md)."""


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "bench_learning", ROOT / "benchmarks" / "learning.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_learning"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_control_targets_are_other_items_cut_to_each_items_frames(bench: ModuleType) -> None:
    rng = np.random.default_rng(0)
    frames = [99, 99, 54, 99, 120, 7]
    rows = [
        {
            "item_id": f"i{k}",
            "wavlm_frames": n,
            "wavlm_codes": rng.integers(0, 64, (n, 4), dtype=np.uint8).tobytes(),
        }
        for k, n in enumerate(frames)
    ]
    out = bench.permuted(rows, 4, seed=0)
    assert [r["item_id"] for r in out] == [r["item_id"] for r in rows]
    codes = [np.frombuffer(r["wavlm_codes"], np.uint8).reshape(-1, 4) for r in rows]
    for k, r in enumerate(out):
        got = np.frombuffer(r["wavlm_codes"], np.uint8).reshape(-1, 4)
        assert len(got) == frames[k]  # the same target frames as the real run
        sources = [
            j
            for j, c in enumerate(codes)
            if np.array_equal(got, np.resize(c, got.shape)) and j != k
        ]
        assert sources, f"row {k} got codes of no other row"
        assert not np.array_equal(got, codes[k])
    assert bench.permuted(rows, 4, seed=0) == out  # seeded


def test_windows_cover_each_file_and_ids_are_shuffled(bench: ModuleType, tmp_path: Path) -> None:
    long, short = tmp_path / "long.wav", tmp_path / "short.wav"
    sf.write(long, np.zeros(int(16000 * 3.1), np.int16), 16000, subtype="PCM_16")
    sf.write(short, np.zeros(16000, np.int16), 16000, subtype="PCM_16")
    s = bench.Settings(window=2.0, hop=0.25)
    rows = bench.segment_rows([str(long), str(short)], s)
    starts = rows["start"][rows["url"] == str(long)]
    assert sorted(starts) == [0.25 * k for k in range(5)]  # 0 .. 1.0: windows stay inside
    assert set(rows["duration"][rows["url"] == str(long)]) == {2.0}
    assert list(rows["duration"][rows["url"] == str(short)]) == [1.0]  # a short file whole
    assert sorted(rows["item_id"]) == [f"seg-{k:04d}" for k in range(6)]
    assert list(rows["item_id"]) != sorted(rows["item_id"])  # not in file order


def test_machinery_off_turns_every_random_part_off(bench: ModuleType) -> None:
    m = bench.machinery_off()
    for name in ("attention_skip", "conv_skip", "ff_skip", "bypass_floor", "const_attention"):
        assert getattr(m, name)(0.0) == 0.0 and getattr(m, name)(1e5) == 0.0
    assert (m.dropout, m.layer_skip_start, m.feature_mask_prob) == (0.0, 0.0, 0.0)
    assert not m.balancers and not m.whiteners and m.embed_grad_scale == 1.0
    assert m.near_identity_init  # ScaledAdam's initial scales stay


def test_scaled_recipe_ends_every_schedule_with_the_run(bench: ModuleType) -> None:
    s = bench.Settings(steps=900, batch_seconds=10.0)
    shipped, scaled = bench.shipped_recipe(s), bench.scaled_recipe(s)
    assert shipped.machinery.batch_seconds == 600.0 and shipped.mask.time_prob == 0.65
    m = scaled.machinery
    end = m.batch_count(900 * 10.0 / 3600)  # the hours seen at the last step
    assert end == pytest.approx(20_000)
    assert m.dropout(end) == pytest.approx(0.1) and m.bypass_floor(end) == pytest.approx(0.2)
    assert scaled.optim.lr_batches == pytest.approx(7500 * 900 / 20_000)
    assert scaled.optim.warmup_batches == pytest.approx(500 * 900 / 20_000)
    # Eden's hours: 75,000 h of 3,333 h, as this run's 2.5 h of audio.
    assert scaled.optim.lr_hours == pytest.approx(75_000 * 2.5 / (20_000 * 600 / 3600))
    assert scaled.mask == shipped.mask and scaled.optim.lr == shipped.optim.lr


@pytest.mark.slow
@pytest.mark.skipif(
    not Path(POCKETSPHINX, "librivox").is_dir(),
    reason=f"real recordings absent: install Debian's pocketsphinx-testdata ({POCKETSPHINX})",
)
def test_real_tokens_are_learnt_and_permuted_ones_are_not(bench: ModuleType) -> None:
    s = bench.Settings()
    r = bench.run(s, POCKETSPHINX, machinery_table=False)
    assert r.shards.items >= 80 and r.shards.audio_seconds > 150
    assert r.shards.rrl < 0.5  # a real quantiser fit
    h = r.shards.marginal_entropy
    assert math.log(s.codebook_size) - 0.2 < h <= math.log(s.codebook_size)  # MVQ spreads codes
    real, control = r.curves["real"], r.curves["control"]
    assert len(real.losses) == len(control.losses) == s.steps
    assert all(math.isfinite(x) for x in real.losses + control.losses)
    # The control learns the codes' frequencies and little else; the real run learns the audio.
    assert control.tail() > h - 0.25, control.tail()
    assert real.tail() < h - GAP, real.tail()
    assert r.gap() >= GAP, r.gap()
