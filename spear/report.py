"""Run reports: one self-contained HTML file per run, plots as inline SVG (no network, no JS).

``spear report RUN_URL`` reads what a run left behind and draws it:

* a **tokenize** run (``report.json`` with ``kind: tokenize``, ``index.parquet``,
  ``quarantine/*.parquet``, ``tokens/*.parquet``): throughput over time and per stage,
  quarantine reasons, hours by domain and by source, per-codebook usage histograms computed
  from (a sample of) the token shards, RRL per teacher, and token bytes per audio second
  against SPEC section 3's 1,000 B/s bound;
* a **train** run (``metrics.jsonl``, one JSON row per logged step: ``step`` and any of
  ``time`` (seconds since the start), ``loss``, ``loss_wavlm``, ``loss_dasheng``, ``lr``,
  ``hours``, ``audio_s_per_s``): loss curves, learning rate, audio hours seen, throughput.

Loading (:func:`load_tokenize_run`, :func:`load_train_metrics`) is separate from drawing
(:func:`render_tokenize`, :func:`render_train`), which are pure functions of the loaded data.
Every plot is a ``<figure class="plot">`` whose ``<svg>`` holds its marks in ``<g class="marks">``.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import math
import posixpath
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spear.errors import SpearError
from spear.formats import (
    QUARANTINE_SCHEMA,
    TokenTeacherInfo,
    codes_from_bytes,
    read_token_teachers,
)
from spear.storage import StorageConfig, exists, filesystem, join, read_bytes

TOKEN_BOUND_BYTES_PER_SECOND = 1000.0
"""SPEC section 3: WavLM 16 x 50 Hz + Dasheng 8 x 25 Hz bytes of codes per second of audio."""

PALETTE = ("#1f6fb4", "#d1495b", "#2a9d5c", "#e39b20", "#7a5bb5", "#8c564b", "#178f9f", "#666")

# ---------------------------------------------------------------- SVG drawing


def _esc(s: object) -> str:
    return html.escape(str(s), quote=True)


def _num(v: float) -> str:
    """A tick or value label: short, no trailing zeros."""
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e9:
        return f"{v / 1e9:.3g}G"
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e4:
        return f"{v / 1e3:.3g}k"
    if a >= 1:
        return f"{v:.4g}"
    return f"{v:.3g}"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    v = start
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 12))
        v += step
    if ticks[-1] < hi:
        ticks.append(round(v, 12))
    return ticks


@dataclass(frozen=True)
class _Frame:
    """Plot area inside an SVG: data ranges mapped to pixels."""

    width: int
    height: int
    left: int
    right: int
    top: int
    bottom: int
    x0: float
    x1: float
    y0: float
    y1: float

    def x(self, v: float) -> float:
        span = self.x1 - self.x0 or 1.0
        return self.left + (v - self.x0) / span * (self.width - self.left - self.right)

    def y(self, v: float) -> float:
        span = self.y1 - self.y0 or 1.0
        return (
            self.height
            - self.bottom
            - (v - self.y0) / span * (self.height - self.top - self.bottom)
        )


def _svg(title: str, width: int, height: int, body: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot-svg" role="img" '
        f'aria-label="{_esc(title)}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">{body}</svg>'
    )


def _figure(title: str, svg: str, caption: str = "") -> str:
    cap = f"<figcaption>{_esc(caption)}</figcaption>" if caption else ""
    return (
        f'<figure class="plot" data-title="{_esc(title)}"><h3>{_esc(title)}</h3>{svg}{cap}</figure>'
    )


def _axes(f: _Frame, xticks: list[float], yticks: list[float], xlabel: str, ylabel: str) -> str:
    parts = ['<g class="axes" stroke="#bbb" stroke-width="1">']
    for t in yticks:
        y = f.y(t)
        parts.append(f'<line x1="{f.left}" x2="{f.width - f.right}" y1="{y:.1f}" y2="{y:.1f}" />')
    parts.append('</g><g class="ticks" fill="#333">')
    for t in yticks:
        parts.append(
            f'<text x="{f.left - 4}" y="{f.y(t) + 4:.1f}" text-anchor="end">{_num(t)}</text>'
        )
    for t in xticks:
        parts.append(
            f'<text x="{f.x(t):.1f}" y="{f.height - f.bottom + 14}" '
            f'text-anchor="middle">{_num(t)}</text>'
        )
    mid_y = (f.top + f.height - f.bottom) / 2
    parts.append(
        f'<text x="{(f.left + f.width - f.right) / 2:.1f}" y="{f.height - 4}" '
        f'text-anchor="middle">{_esc(xlabel)}</text>'
        f'<text transform="translate(12,{mid_y:.1f}) rotate(-90)" '
        f'text-anchor="middle">{_esc(ylabel)}</text></g>'
    )
    return "".join(parts)


@dataclass(frozen=True)
class Series:
    """One line of a line plot."""

    name: str
    x: Sequence[float]
    y: Sequence[float]


def line_plot(
    title: str,
    series: list[Series],
    *,
    xlabel: str,
    ylabel: str,
    refs: Sequence[tuple[str, float]] = (),
    caption: str = "",
    width: int = 640,
    height: int = 260,
) -> str:
    """Lines (with point marks when there are few points) and dashed horizontal references."""
    pts = [
        (float(x), float(y))
        for s in series
        for x, y in zip(s.x, s.y, strict=True)
        if math.isfinite(float(y))
    ]
    if not pts:
        raise ValueError(f"{title}: nothing to plot")
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts] + [v for _, v in refs]
    xt = nice_ticks(min(xs), max(xs))
    yt = nice_ticks(min(0.0, min(ys)), max(ys))
    legend_h = 16 if len(series) > 1 or refs else 0
    f = _Frame(width, height, 56, 14, 10 + legend_h, 34, xt[0], xt[-1], yt[0], yt[-1])
    marks = ['<g class="marks" fill="none" stroke-width="1.8">']
    legend = []
    for i, s in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        good = [(x, y) for x, y in zip(s.x, s.y, strict=True) if math.isfinite(float(y))]
        if not good:
            continue
        d = " ".join(f"{f.x(x):.1f},{f.y(y):.1f}" for x, y in good)
        marks.append(f'<polyline points="{d}" stroke="{color}"><title>{_esc(s.name)}</title>')
        marks.append("</polyline>")
        if len(good) <= 60:
            marks += [
                f'<circle cx="{f.x(x):.1f}" cy="{f.y(y):.1f}" r="2.5" fill="{color}" />'
                for x, y in good
            ]
        legend.append((s.name, color, ""))
    for j, (name, v) in enumerate(refs):
        color = PALETTE[(len(series) + j) % len(PALETTE)]
        marks.append(
            f'<line x1="{f.left}" x2="{width - f.right}" y1="{f.y(v):.1f}" y2="{f.y(v):.1f}" '
            f'stroke="{color}" stroke-dasharray="5,4"><title>{_esc(name)}</title></line>'
        )
        legend.append((name, color, ' stroke-dasharray="5,4"'))
    marks.append("</g>")
    leg = []
    if legend_h:
        lx = f.left
        for name, color, dash in legend:
            leg.append(
                f'<line x1="{lx}" x2="{lx + 18}" y1="10" y2="10" stroke="{color}" '
                f'stroke-width="2"{dash} /><text x="{lx + 22}" y="14">{_esc(name)}</text>'
            )
            lx += 30 + 7 * len(name)
    body = _axes(f, xt, yt, xlabel, ylabel) + "".join(marks) + "".join(leg)
    return _figure(title, _svg(title, width, height, body), caption)


def bar_plot(
    title: str,
    items: Sequence[tuple[str, float]],
    *,
    xlabel: str,
    refs: Sequence[tuple[str, float]] = (),
    caption: str = "",
    width: int = 640,
    value_fmt: str = "{:,.4g}",
) -> str:
    """Horizontal bars, one per (label, value), with optional vertical reference lines."""
    if not items:
        raise ValueError(f"{title}: nothing to plot")
    label_w = min(240, 16 + 7 * max(len(str(k)) for k, _ in items))
    bar_h = 20
    height = 44 + bar_h * len(items)
    hi = max([v for _, v in items] + [v for _, v in refs])
    xt = nice_ticks(0.0, hi)
    f = _Frame(width, height, label_w, 70, 8, 34, 0.0, xt[-1], 0.0, 1.0)
    marks = ['<g class="marks">']
    labels = ['<g class="labels" fill="#333">']
    for i, (label, v) in enumerate(items):
        y = f.top + i * bar_h
        w = max(f.x(v) - f.left, 1.0 if v > 0 else 0.5)
        color = PALETTE[i % len(PALETTE)] if len(items) <= len(PALETTE) else PALETTE[0]
        marks.append(
            f'<rect x="{f.left}" y="{y + 3}" width="{w:.1f}" height="{bar_h - 6}" '
            f'fill="{color}"><title>{_esc(label)}: {_esc(value_fmt.format(v))}</title></rect>'
        )
        labels.append(
            f'<text x="{f.left - 6}" y="{y + bar_h / 2 + 4:.1f}" text-anchor="end">'
            f'{_esc(label)}</text><text x="{f.left + w + 4:.1f}" y="{y + bar_h / 2 + 4:.1f}">'
            f"{_esc(value_fmt.format(v))}</text>"
        )
    for name, v in refs:
        marks.append(
            f'<line x1="{f.x(v):.1f}" x2="{f.x(v):.1f}" y1="{f.top}" '
            f'y2="{height - f.bottom}" stroke="#d1495b" stroke-dasharray="5,4" stroke-width="1.5">'
            f"<title>{_esc(name)}</title></line>"
            f'<text x="{f.x(v):.1f}" y="{height - f.bottom + 26}" fill="#d1495b" '
            f'text-anchor="middle">{_esc(name)}</text>'
        )
    marks.append("</g>")
    labels.append("</g>")
    axis = ['<g class="ticks" fill="#333">'] + [
        f'<text x="{f.x(t):.1f}" y="{height - f.bottom + 14}" text-anchor="middle">{_num(t)}</text>'
        for t in xt
    ]
    axis.append(
        f'<text x="{(f.left + width - f.right) / 2:.1f}" y="{height - 2}" '
        f'text-anchor="middle">{_esc(xlabel)}</text></g>'
    )
    body = "".join(axis) + "".join(marks) + "".join(labels)
    return _figure(title, _svg(title, width, height, body), caption)


def histogram_grid(
    title: str,
    panels: Sequence[tuple[str, np.ndarray]],
    *,
    columns: int = 4,
    caption: str = "",
    panel_w: int = 180,
    panel_h: int = 90,
) -> str:
    """Small multiples: one histogram (counts per bin, as bars) per panel."""
    if not panels:
        raise ValueError(f"{title}: nothing to plot")
    rows = math.ceil(len(panels) / columns)
    width, height = columns * panel_w, rows * (panel_h + 18)
    marks = ['<g class="marks">']
    text = ['<g class="labels" fill="#333">']
    for i, (label, counts) in enumerate(panels):
        px, py = (i % columns) * panel_w, (i // columns) * (panel_h + 18)
        x0, y0, w, h = px + 6, py + 16, panel_w - 12, panel_h - 6
        c = np.asarray(counts, dtype=np.float64)
        top = float(c.max()) if c.size and c.max() > 0 else 1.0
        bw = w / max(len(c), 1)
        d = []
        for k, v in enumerate(c):
            if v > 0:
                bh = v / top * h
                d.append(f"M{x0 + k * bw:.2f},{y0 + h:.1f}h{bw:.2f}v{-bh:.2f}h{-bw:.2f}z")
        marks.append(
            f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="#f4f6f8" />'
            f'<path d="{" ".join(d) or f"M{x0},{y0 + h}h{w}"}" fill="{PALETTE[0]}" '
            f'stroke="{PALETTE[0]}" stroke-width="0.3"><title>{_esc(label)}</title></path>'
        )
        text.append(f'<text x="{x0}" y="{py + 12}">{_esc(label)}</text>')
    marks.append("</g>")
    text.append("</g>")
    return _figure(title, _svg(title, width, height, "".join(marks) + "".join(text)), caption)


# ---------------------------------------------------------------- codebook usage


@dataclass(frozen=True)
class CodebookUsage:
    """Code counts of one teacher over the shards read."""

    teacher: TokenTeacherInfo
    counts: np.ndarray
    """(num_codebooks, codebook_size) int64."""
    frames: int

    def perplexity(self) -> np.ndarray:
        """Per codebook: exp(entropy of the code distribution); K when usage is uniform."""
        p = self.counts / np.maximum(self.counts.sum(axis=1, keepdims=True), 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ent = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
        return np.asarray(np.exp(ent))

    def dead(self) -> np.ndarray:
        """Per codebook: entries never used."""
        return np.asarray((self.counts == 0).sum(axis=1))


def count_codes(table: pa.Table, teacher: TokenTeacherInfo, into: np.ndarray) -> int:
    """Add the code counts of ``teacher``'s column in ``table`` to ``into`` (C, K); frames."""
    col = table.column(f"{teacher.prefix}_codes").drop_null()
    if len(col) == 0:
        return 0
    c, k = teacher.num_codebooks, teacher.codebook_size
    codes = codes_from_bytes(b"".join(col.to_pylist()), c).astype(np.int64)  # (T, C)
    if codes.size and int(codes.max()) >= k:
        raise SpearError(f"{teacher.prefix}: code {int(codes.max())} outside 0..{k - 1}")
    flat = (codes + np.arange(c, dtype=np.int64) * k).ravel()  # codebook c -> bins c*K..
    into += np.bincount(flat, minlength=c * k).reshape(c, k)
    return int(codes.shape[0])


# ---------------------------------------------------------------- loading a run


@dataclass(kw_only=True)
class TokenizeRun:
    """What the report of a tokenize run is drawn from."""

    url: str
    report: dict[str, Any]
    index: pa.Table | None = None
    quarantine: pa.Table | None = None
    usage: list[CodebookUsage] = field(default_factory=list)
    shards_read: int = 0
    shards_total: int = 0


def _read_parquet_dir(url: str, storage: StorageConfig, schema: pa.Schema) -> pa.Table | None:
    fs, path = filesystem(url, storage)
    if not fs.exists(path):
        return None
    files = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
    if not files:
        return None
    tables = [pq.read_table(p, filesystem=fs).select(schema.names) for p in files]
    return pa.concat_tables([t.cast(schema.remove_metadata()) for t in tables])


def _sample(n: int, k: int) -> list[int]:
    """``k`` evenly spread indexes of ``n`` (all when ``k >= n``)."""
    if k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})


def load_tokenize_run(url: str, storage: StorageConfig, max_shards: int = 16) -> TokenizeRun:
    """Read a tokenize run's report, index, quarantine and a sample of its token shards."""
    report = _read_report(url, storage)
    run = TokenizeRun(url=url, report=report)
    if exists(join(url, "index.parquet"), storage):
        fs, path = filesystem(join(url, "index.parquet"), storage)
        run.index = pq.read_table(path, filesystem=fs).sort_by("shard")
    run.quarantine = _read_parquet_dir(join(url, "quarantine"), storage, QUARANTINE_SCHEMA)
    if run.index is not None and run.index.num_rows:
        paths = run.index.column("path").to_pylist()
        run.shards_total = len(paths)
        usage: dict[str, tuple[TokenTeacherInfo, np.ndarray, list[int]]] = {}
        for i in _sample(len(paths), max_shards):
            fs, path = filesystem(join(url, paths[i]), storage)
            pf = pq.ParquetFile(fs.open(path, "rb"))
            teachers = read_token_teachers(pf.schema_arrow)
            table = pf.read(columns=[f"{t.prefix}_codes" for t in teachers])
            for t in teachers:
                if t.prefix not in usage:
                    usage[t.prefix] = (
                        t,
                        np.zeros((t.num_codebooks, t.codebook_size), np.int64),
                        [0],
                    )
                info, counts, frames = usage[t.prefix]
                if info.quantizer_id != t.quantizer_id:
                    raise SpearError(
                        f"{paths[i]}: {t.prefix} quantizer {t.quantizer_id} differs from "
                        f"{info.quantizer_id} in earlier shards"
                    )
                frames[0] += count_codes(table, t, counts)
            run.shards_read += 1
        run.usage = [CodebookUsage(teacher=t, counts=c, frames=f[0]) for t, c, f in usage.values()]
    return run


def _read_report(url: str, storage: StorageConfig) -> dict[str, Any]:
    where = join(url, "report.json")
    if not exists(where, storage):
        raise SpearError(f"no report.json under {url}: is it a finished `spear tokenize` --out?")
    try:
        data = json.loads(read_bytes(where, storage))
    except json.JSONDecodeError as err:
        raise SpearError(f"{where}: not JSON ({err})") from None
    if not isinstance(data, dict):
        raise SpearError(f"{where}: expected a JSON object")
    return data


def load_train_metrics(url: str, storage: StorageConfig) -> list[dict[str, Any]]:
    """The rows of a train run's ``metrics.jsonl`` (blank and truncated last lines skipped)."""
    where = join(url, "metrics.jsonl")
    lines = read_bytes(where, storage).decode().splitlines()
    rows = []
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines) - 1:  # a writer killed mid-line
                continue
            raise SpearError(f"{where}:{n + 1}: not JSON") from None
    if not rows:
        raise SpearError(f"{where}: no rows")
    return rows


# ---------------------------------------------------------------- rendering

_CSS = """
body{font-family:sans-serif;margin:24px auto;max-width:1000px;color:#222}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
h3{font-size:14px;margin:8px 0}figure{margin:16px 0}figcaption{color:#555;font-size:12px}
table{border-collapse:collapse;font-size:13px}td,th{padding:3px 10px;border-bottom:1px solid #eee;
text-align:left}td.n{text-align:right}.note{color:#666;font-style:italic}pre{font-size:11px;
background:#f6f6f6;padding:8px;overflow:auto}
"""


def _page(title: str, sections: list[str]) -> str:
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}'
        f"</title><style>{_CSS}</style></head><body><h1>{_esc(title)}</h1>"
        + "".join(sections)
        + f'<p class="note">written by spear report, {now}</p></body></html>'
    )


def _kv_table(rows: Sequence[tuple[str, object]]) -> str:
    body = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows)
    return f'<table class="summary">{body}</table>'


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>'


def _f(v: Any, fmt: str = "{:,.2f}") -> str:
    return fmt.format(v) if isinstance(v, (int, float)) else "-"


def thin_marks(marks: list[dict[str, Any]], min_gap: float) -> list[dict[str, Any]]:
    """Progress marks at least ``min_gap`` seconds apart (and after t = 0), the last one kept:
    two marks a few milliseconds apart (the final mark after the last periodic one) would
    give a rate over no time."""
    kept: list[dict[str, Any]] = []
    last_t = 0.0
    for m in sorted(marks, key=lambda r: float(r["t"])):
        if float(m["t"]) - last_t >= min_gap:
            kept.append(m)
            last_t = float(m["t"])
        elif kept:
            kept[-1] = m | {"t": kept[-1]["t"]}  # later counts, earlier time: the rate holds
    if not kept and marks:
        kept = [max(marks, key=lambda r: float(r["t"]))]
    return kept


def _steps(t: list[float], cum: list[float]) -> tuple[list[float], list[float]]:
    """Average rate of a cumulative count over each interval, as a step line (x in minutes)."""
    xs: list[float] = []
    ys: list[float] = []
    for i in range(1, len(t)):
        dt_ = t[i] - t[i - 1]
        if dt_ <= 0:
            continue
        r = (cum[i] - cum[i - 1]) / dt_
        xs += [t[i - 1] / 60, t[i] / 60]
        ys += [r, r]
    return xs, ys


def _throughput_plots(report: dict[str, Any]) -> list[str]:
    raw = report.get("timeline") or []
    if not raw:
        return [_note("no progress timeline in report.json")]
    span = max(float(r["t"]) for r in raw)
    timeline = thin_marks(raw, max(1.0, 0.002 * span))
    t = [0.0] + [float(r["t"]) for r in timeline]
    hours = [0.0] + [float(r["hours_done"]) for r in timeline]
    out = [
        line_plot(
            "Audio hours tokenized over time",
            [Series("hours done", [v / 60 for v in t], hours)],
            xlabel="minutes since start",
            ylabel="audio hours",
        )
    ]
    xs, ys = _steps(t, [h * 3600 for h in hours])
    if xs:
        out.append(
            line_plot(
                "Pipeline throughput over time",
                [Series("x real time", xs, ys)],
                xlabel="minutes since start",
                ylabel="audio s per wall s",
                caption="Audio seconds tokenized per wall second, averaged between progress marks.",
            )
        )
    stages = sorted({k for r in timeline for k in (r.get("stage_busy") or {})})
    series = []
    for s in stages:
        busy = [0.0] + [float((r.get("stage_busy") or {}).get(s, 0.0)) for r in timeline]
        sx, sy = _steps(t, busy)
        if sx:
            series.append(Series(s, sx, sy))
    if series:
        out.append(
            line_plot(
                "Stage busy time over time",
                series,
                xlabel="minutes since start",
                ylabel="busy s per wall s",
                caption="Seconds each stage's workers spent working per wall second, averaged "
                "between progress marks: about the number of busy workers (decode tasks, "
                "teacher actors).",
            )
        )
    return out


def render_tokenize(run: TokenizeRun) -> str:
    """The HTML report of a tokenize run (pure: no I/O)."""
    r = run.report
    q_total = sum((r.get("quarantined") or {}).values())
    summary = _kv_table(
        [
            ("run", run.url),
            ("manifest", r.get("manifest", "-")),
            ("started / finished", f"{r.get('started', '-')} / {r.get('finished', '-')}"),
            ("wall time", f"{_f(r.get('wall_seconds'), '{:,.1f}')} s"),
            ("items", f"{r.get('items', '-')}: {r.get('ok', '-')} ok, {q_total} quarantined"),
            (
                "audio hours in / out",
                f"{_f(r.get('hours_in'), '{:,.4g}')} / {_f(r.get('hours_out'), '{:,.4g}')}",
            ),
            (
                "shards",
                f"{r.get('shards', '-')} ({r.get('shards_done_before', 0)} from earlier runs)",
            ),
            (
                "token bytes",
                f"{_f(r.get('token_bytes'), '{:,}')} "
                f"({_f(r.get('bytes_per_audio_second'), '{:,.0f}')} B per audio second)",
            ),
            ("versions", ", ".join(f"{k} {v}" for k, v in (r.get("versions") or {}).items())),
        ]
    )
    sections = ["<h2>Summary</h2>", summary]

    sections.append("<h2>Throughput</h2>")
    sections += _throughput_plots(r)
    stages = r.get("stages") or {}
    rated = [
        (k, float(v["rate_x_realtime"])) for k, v in stages.items() if v.get("rate_x_realtime")
    ]
    if rated:
        sections.append(
            bar_plot(
                "Stage rates",
                rated,
                xlabel="x real time per busy worker (audio s / busy s)",
                caption="Audio seconds each stage handled per second of worker time, whole run.",
                value_fmt="{:,.1f}x",
            )
        )

    sections.append("<h2>Quarantine</h2>")
    if run.quarantine is not None and run.quarantine.num_rows:
        reasons = Counter(
            f"{s}: {e}"
            for s, e in zip(
                run.quarantine.column("stage").to_pylist(),
                run.quarantine.column("error_type").to_pylist(),
                strict=True,
            )
        )
    else:
        reasons = Counter(r.get("quarantined") or {})
    if reasons:
        sections.append(
            bar_plot(
                "Quarantine reasons",
                reasons.most_common(),
                xlabel="items",
                value_fmt="{:,.0f}",
                caption=f"{sum(reasons.values())} items in quarantine (stage: reason).",
            )
        )
        if run.quarantine is not None and run.quarantine.num_rows:
            rows = run.quarantine.slice(0, 20).to_pylist()
            head = "<tr><th>item</th><th>stage</th><th>reason</th><th>message</th></tr>"
            body = "".join(
                f"<tr><td>{_esc(x['item_id'])}</td><td>{_esc(x['stage'])}</td>"
                f"<td>{_esc(x['error_type'])}</td><td>{_esc(x['message'][:160])}</td></tr>"
                for x in rows
            )
            sections.append(f'<table class="quarantine">{head}{body}</table>')
    else:
        sections.append(_note("no item was quarantined"))

    sections.append("<h2>Hours</h2>")
    for key, title in (("hours_by_domain", "domain"), ("hours_by_source", "source")):
        data = sorted((r.get(key) or {}).items(), key=lambda kv: -kv[1])
        if data:
            sections.append(
                bar_plot(
                    f"Audio hours by {title}",
                    data,
                    xlabel="audio hours with tokens",
                    value_fmt="{:,.3g} h",
                )
            )
        else:
            sections.append(_note(f"no {key} in report.json"))

    sections.append("<h2>Codes</h2>")
    teachers = r.get("teachers") or []
    rrl = [(t.get("prefix", t.get("teacher", "?")), t["rrl"]) for t in teachers if t.get("rrl")]
    if rrl:
        sections.append(
            bar_plot(
                "Quantiser RRL per teacher",
                [(k, float(v)) for k, v in rrl],
                xlabel="relative reconstruction loss (held-out frames; lower is better)",
                value_fmt="{:.3f}",
            )
        )
    else:
        sections.append(_note("no RRL recorded for the quantisers in report.json"))
    if run.usage:
        for u in run.usage:
            ppl, dead = u.perplexity(), u.dead()
            t = u.teacher
            panels = [
                (f"cb {c}: ppl {ppl[c]:.0f}, dead {dead[c]}", u.counts[c])
                for c in range(t.num_codebooks)
            ]
            sections.append(
                histogram_grid(
                    f"Codebook usage: {t.prefix}",
                    panels,
                    caption=f"{t.teacher}, quantiser {t.quantizer_id}: {u.frames:,} frames from "
                    f"{run.shards_read} of {run.shards_total} shards; counts per code index "
                    f"(0..{t.codebook_size - 1}); perplexity {t.codebook_size} = uniform.",
                )
            )
    else:
        sections.append(_note("no token shards to count codes in"))

    sections.append("<h2>Token bytes</h2>")
    if run.index is not None and run.index.num_rows:
        shards = [float(s) for s in run.index.column("shard").to_pylist()]
        b = np.asarray(run.index.column("bytes").to_numpy(), dtype=np.float64)
        secs = np.asarray(run.index.column("audio_seconds").to_numpy(), dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            per = np.where(secs > 0, b / secs, np.nan)
        total = float(b.sum() / secs.sum()) if secs.sum() else float("nan")
        refs = [("1,000 B/s bound", TOKEN_BOUND_BYTES_PER_SECOND)]
        if math.isfinite(total):
            refs.append((f"run: {total:,.0f} B/s", total))
        sections.append(
            line_plot(
                "Token bytes per audio second",
                [Series("shard", shards, per.tolist())],
                xlabel="shard",
                ylabel="bytes / audio second",
                refs=refs,
                caption="Parquet file bytes (codes + item columns, compressed) per second of "
                "audio, per shard, against SPEC section 3's 1,000 B/s of raw codes.",
            )
        )
    else:
        sections.append(_note("no index.parquet: no shard sizes"))

    if r.get("config"):
        sections.append(
            "<h2>Configuration</h2><details><summary>config used</summary><pre>"
            + _esc(json.dumps(r["config"], indent=2, sort_keys=True))
            + "</pre></details>"
        )
    return _page(f"spear tokenize run: {posixpath.basename(run.url.rstrip('/'))}", sections)


def render_train(url: str, rows: list[dict[str, Any]]) -> str:
    """The HTML report of a train run from its metrics rows (pure: no I/O).

    Rows need ``step``; every other figure is drawn when present: ``loss`` and any
    ``loss_<teacher>``, ``lr``, ``hours`` (audio hours seen; over ``time`` in seconds since
    the start when rows carry it, else over steps) and ``audio_s_per_s`` (throughput)."""

    def col(name: str, by: str = "step") -> tuple[list[float], list[float]]:
        pts = [
            (float(r[by]), float(r[name]))
            for r in rows
            if isinstance(r.get(name), (int, float)) and isinstance(r.get(by), (int, float))
        ]
        return [p[0] for p in pts], [p[1] for p in pts]

    last = rows[-1]
    sections = [
        "<h2>Summary</h2>",
        _kv_table(
            [
                ("run", url),
                ("logged rows", len(rows)),
                ("last step", last.get("step", "-")),
                ("last loss", _f(last.get("loss"), "{:.4f}")),
                ("audio hours seen", _f(last.get("hours"), "{:,.1f}")),
                ("elapsed", f"{_f(last.get('time'), '{:,.0f}')} s"),
            ]
        ),
        "<h2>Loss</h2>",
    ]
    names = ["loss", *sorted({k for r in rows for k in r if k.startswith("loss_")})]
    series = [Series(n, *col(n)) for n in names]
    series = [s for s in series if s.x]
    if series:
        sections.append(line_plot("Training loss", series, xlabel="step", ylabel="loss"))
    else:
        sections.append(_note("no loss values in metrics.jsonl"))
    x, y = col("lr")
    if x:
        sections.append(line_plot("Learning rate", [Series("lr", x, y)], xlabel="step",
                                  ylabel="learning rate"))  # fmt: skip
    timed = col("hours", by="time")
    x, y = ([v / 60 for v in timed[0]], timed[1]) if timed[0] else col("hours")
    rate_x, rate_y = col("audio_s_per_s")
    if x or rate_x:
        sections.append("<h2>Throughput</h2>")
    if x:
        sections.append(
            line_plot(
                "Audio hours seen over time" if timed[0] else "Audio hours seen",
                [Series("hours", x, y)],
                xlabel="minutes since start" if timed[0] else "step",
                ylabel="audio hours",
            )
        )
    if rate_x:
        sections.append(
            line_plot(
                "Training throughput",
                [Series("x real time", rate_x, rate_y)],
                xlabel="step",
                ylabel="audio s per wall s",
            )
        )
    return _page(f"spear train run: {posixpath.basename(url.rstrip('/'))}", sections)


def build_report(url: str, storage: StorageConfig, max_shards: int = 16) -> tuple[str, str]:
    """The report HTML of the run at ``url`` and its kind (``tokenize`` or ``train``)."""
    if exists(join(url, "report.json"), storage):
        kind = _read_report(url, storage).get("kind", "tokenize")
        if kind == "tokenize":
            return render_tokenize(load_tokenize_run(url, storage, max_shards)), kind
        if kind != "train":
            raise SpearError(f"{url}/report.json: unknown run kind {kind!r}")
    if exists(join(url, "metrics.jsonl"), storage):
        return render_train(url, load_train_metrics(url, storage)), "train"
    raise SpearError(
        f"{url} holds neither report.json (tokenize run) nor metrics.jsonl (train run)"
    )
