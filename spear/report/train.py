"""The report of a train run: a pure function of its ``metrics.jsonl`` rows."""

from __future__ import annotations

import posixpath
from typing import Any

from spear.report.page import fmt, kv_table, note, page
from spear.report.plots import Series, line_plot


def elapsed_seconds(rows: list[dict[str, Any]]) -> list[float | None]:
    """Seconds of training at each row: its ``elapsed`` (runs since it was recorded), else
    its wall-clock ``time`` minus the first row's (older runs; a resume's pause counts)."""
    t0 = next((r["time"] for r in rows if isinstance(r.get("time"), (int, float))), None)
    out: list[float | None] = []
    for r in rows:
        if isinstance(r.get("elapsed"), (int, float)):
            out.append(float(r["elapsed"]))
        elif t0 is not None and isinstance(r.get("time"), (int, float)):
            out.append(float(r["time"]) - float(t0))
        else:
            out.append(None)
    return out


def render_train(url: str, rows: list[dict[str, Any]], *, in_progress: bool = False) -> str:
    """The HTML report of a train run from its metrics rows (pure: no I/O).

    Rows need ``step``; every other figure is drawn when present: ``loss`` and any
    ``loss_<teacher>``, ``lr``, ``hours`` (audio hours seen; over the training time, see
    :func:`elapsed_seconds`, when rows carry it, else over steps) and ``audio_s_per_s``
    (throughput), ``probe_<layer>`` (held-out accuracy of the in-loop linear probes, one curve
    per layer, with ``probe_teacher`` and ``probe_chance`` as dashed references).
    ``in_progress``: the run is still training (said in the summary)."""

    def col(name: str, by: str = "step") -> tuple[list[float], list[float]]:
        pts = [
            (float(r[by]), float(r[name]))
            for r in rows
            if isinstance(r.get(name), (int, float)) and isinstance(r.get(by), (int, float))
        ]
        return [p[0] for p in pts], [p[1] for p in pts]

    last = rows[-1]
    elapsed = elapsed_seconds(rows)
    sections = [
        "<h2>Summary</h2>",
        kv_table(
            [
                ("run", url),
                ("status", "in progress (rows logged so far)" if in_progress else "finished"),
                ("logged rows", len(rows)),
                ("last step", last.get("step", "-")),
                ("last loss", fmt(last.get("loss"), "{:.4f}")),
                ("audio hours seen", fmt(last.get("hours"), "{:,.1f}")),
                ("elapsed", f"{fmt(elapsed[-1], '{:,.0f}')} s"),
            ]
        ),
        "<h2>Loss</h2>",
    ]
    names = ["loss", *sorted({k for r in rows for k in r if k.startswith("loss_")})]
    series = [s for s in (Series(n, *col(n)) for n in names) if s.x]
    if series:
        sections.append(
            line_plot(
                "Training loss",
                series,
                xlabel="step",
                ylabel="loss",
                integer_x=True,
            )
        )
    else:
        sections.append(note("no loss values in metrics.jsonl"))
    x, y = col("lr")
    if x:
        sections.append(
            line_plot(
                "Learning rate",
                [Series("lr", x, y)],
                xlabel="step",
                ylabel="learning rate",
                log=False,
                integer_x=True,
            )
        )
    timed = [
        (t / 60, float(r["hours"]))
        for t, r in zip(elapsed, rows, strict=True)
        if t is not None and isinstance(r.get("hours"), (int, float))
    ]
    x, y = ([p[0] for p in timed], [p[1] for p in timed]) if timed else col("hours")
    rate_x, rate_y = col("audio_s_per_s")
    if x or rate_x:
        sections.append("<h2>Throughput</h2>")
    if x:
        sections.append(
            line_plot(
                "Audio hours seen over time" if timed else "Audio hours seen",
                [Series("hours", x, y)],
                xlabel="minutes of training" if timed else "step",
                ylabel="audio hours",
                log=False,
                integer_x=not timed,
            )
        )
    if rate_x:
        sections.append(
            line_plot(
                "Training throughput",
                [Series("x real time", rate_x, rate_y)],
                xlabel="step",
                ylabel="audio s per wall s",
                log=False,
                integer_x=True,
            )
        )
    sections += _probe_section(rows, col)
    return page(f"spear train run: {posixpath.basename(url.rstrip('/'))}", sections)


def _probe_section(rows: list[dict[str, Any]], col: Any) -> list[str]:
    """Per-layer probe accuracy over steps; the teacher's (latest) and the majority class as
    dashed references."""
    refs_keys = {"probe_teacher": "teacher", "probe_chance": "majority class"}
    layers = [k for k in dict.fromkeys(k for r in rows for k in r) if k.startswith("probe_")]
    layers = [k for k in layers if k not in refs_keys]
    series = [s for s in (Series(f"layer {k[6:]}", *col(k)) for k in layers) if s.x]
    if not series:
        return []
    refs = []
    for key, label in refs_keys.items():
        _, y = col(key)
        if y:
            refs.append((f"{label} ({y[-1]:.3f})", y[-1]))
    best = max(series, key=lambda s: s.y[-1])
    return [
        "<h2>Linear probes</h2>",
        line_plot(
            "Held-out probe accuracy per layer",
            series,
            xlabel="step",
            ylabel="accuracy",
            refs=refs,
            log=False,
            integer_x=True,
            caption=f"latest best: {best.name} ({best.y[-1]:.3f})",
        ),
    ]
