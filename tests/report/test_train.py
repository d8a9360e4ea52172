"""The train run report (spear.report.train.render_train): a pure function of metrics rows."""

from __future__ import annotations

from spear.report.train import render_train


def _rows(probes: bool) -> list[dict[str, float]]:
    rows = []
    for step in (10, 20, 30):
        row = {"step": step, "loss": 5.0 - step / 10, "lr": 1e-3, "hours": step / 100}
        if probes and step != 20:  # probes every 20 steps and at the end
            row |= {"probe_0": 0.4 + step / 100, "probe_1": 0.5, "probe_out": 0.45}
            row |= {"probe_chance": 0.33, "probe_teacher": 0.91}
        rows.append(row)
    return rows


def test_probe_curves_per_layer_with_teacher_reference() -> None:
    html = render_train("memory://run", _rows(probes=True))
    assert "<h2>Linear probes</h2>" in html
    assert "Held-out probe accuracy per layer" in html
    assert "latest best: layer 0 (0.700)" in html  # 0.4 + 30/100 at the last probe
    # One curve per layer and the two references, in the plot's legend.
    for name in ("layer 0", "layer 1", "layer out", "teacher (0.910)", "majority class (0.330)"):
        assert name in html, name
    assert "layer chance" not in html and "layer teacher" not in html


def test_no_probe_section_without_probe_rows() -> None:
    html = render_train("memory://run", _rows(probes=False))
    assert "Linear probes" not in html and "Training loss" in html
