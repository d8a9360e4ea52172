"""The report's plots: matplotlib figures written as SVG text, inlined into the HTML page.

matplotlib's object API (``Figure`` on the SVG canvas, no pyplot): no display, no global
figure state. Text stays text (``svg.fonttype: none``), so a page is small and its labels
searchable. Every figure is one ``<figure class="plot">`` holding an ``<h3>`` title and one
``<svg>``; the groups of the data marks (lines, bars, histograms; not the axes or reference
lines) carry ``class="marks"``, which the browser test measures.

All figures share one HTML document, so each SVG's ids get a prefix of their own: matplotlib
names its groups and clip paths alike in every figure (``axes_1``, a hash of the clip box),
and a ``url(#id)`` would otherwise find another figure's clip path.
"""

from __future__ import annotations

import hashlib
import html
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import matplotlib as mpl
import numpy as np
from cycler import cycler
from matplotlib.axes import Axes
from matplotlib.backends.backend_svg import FigureCanvasSVG
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, MaxNLocator

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

PALETTE = ("#1f6fb4", "#d1495b", "#2a9d5c", "#e39b20", "#7a5bb5", "#8c564b", "#178f9f", "#666")

WIDTH_IN = 7.5
"""Figure width in inches (SVG points / 72): 720 CSS pixels, the page's text column."""

LOG_SPAN = 100.0
"""A plot switches to a log axis when its positive values span this factor or more."""

_RC: dict[RcKeyType, Any] = {
    "svg.fonttype": "none",
    "svg.hashsalt": "spear-report",  # ids from content, not uuid4: the same run, the same page
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Arial", "Helvetica"],
    "font.size": 9,
    "axes.prop_cycle": cycler(color=PALETTE),
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.color": "#e6e6e6",
    "grid.linewidth": 0.8,
    "legend.frameon": False,
    "legend.fontsize": 8,
}

_NO_METADATA = {"Creator": None, "Date": None, "Format": None, "Type": None}


@dataclass(frozen=True)
class Series:
    """One line of a line plot; non-finite ``y`` values leave gaps."""

    name: str
    x: Sequence[float]
    y: Sequence[float]
    color: str | None = None
    """Default: the palette's colour for the series' place in the plot."""


def wide(values: Sequence[float]) -> bool:
    """Whether ``values`` want a log axis: all positive and spanning :data:`LOG_SPAN` or more."""
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=np.float64)
    return bool(v.size > 1 and (v > 0).all() and v.max() / v.min() >= LOG_SPAN)


def figure_html(title: str, svg: str, caption: str = "") -> str:
    """One plot of the page: title, inline SVG, caption."""
    t = html.escape(title, quote=True)
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure class="plot" data-title="{t}"><h3>{t}</h3>{svg}{cap}</figure>'


def _new(height_in: float) -> Figure:
    fig = Figure(figsize=(WIDTH_IN, height_in), layout="constrained")
    FigureCanvasSVG(fig)
    return fig


def _svg(fig: Figure, title: str) -> str:
    """``fig`` as an ``<svg>`` element for inlining: no XML prolog or metadata, own ids."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata=_NO_METADATA)
    text = buf.getvalue()
    text = re.sub(r"\n\s+", "\n", text[text.index("<svg") :])
    # Path coordinates to 1/100 pt (matplotlib writes 1e-6): a third of the bytes, same picture.
    text = re.sub(r' d="[^"]*"', lambda m: re.sub(r"(\.\d\d)\d+", r"\1", m[0]), text)
    prefix = "f" + hashlib.sha1(text.encode()).hexdigest()[:10] + "-"
    text = re.sub(r'\bid="([^"]+)"', rf'id="{prefix}\1"', text)
    text = re.sub(r'(url\(#|href="#)', rf"\1{prefix}", text)
    text = text.replace(f'<g id="{prefix}marks-', f'<g class="marks" id="{prefix}marks-')
    label = html.escape(title, quote=True)
    return text.replace("<svg ", f'<svg class="plot-svg" role="img" aria-label="{label}" ', 1)


def _short(label: str, n: int = 48) -> str:
    return label if len(label) <= n else label[: n - 1] + "…"


def line_plot(
    title: str,
    series: Sequence[Series],
    *,
    xlabel: str,
    ylabel: str,
    refs: Sequence[tuple[str, float]] = (),
    caption: str = "",
    log: bool | None = None,
    integer_x: bool = False,
    height_in: float = 2.8,
) -> str:
    """Lines (with point marks when there are few points) and dashed horizontal references.

    ``log``: a log y axis; ``None`` chooses one when the values are :func:`wide`.
    ``integer_x``: x ticks on whole numbers only (shard numbers)."""
    finite = [float(y) for s in series for y in s.y if math.isfinite(float(y))]
    if not finite:
        raise ValueError(f"{title}: nothing to plot")
    if log is None:
        log = wide(finite + [v for _, v in refs])
    with mpl.rc_context(_RC):
        fig = _new(height_in)
        ax = fig.add_subplot()
        for i, s in enumerate(series):
            y = np.asarray(s.y, dtype=np.float64)
            n = int(np.isfinite(y).sum())
            if not n:
                continue
            (line,) = ax.plot(
                np.asarray(s.x, dtype=np.float64),
                y,
                label=s.name,
                color=s.color or PALETTE[i % len(PALETTE)],
                linewidth=1.6,
                marker="o" if n <= 60 else None,
                markersize=3,
            )
            line.set_gid(f"marks-{i}")
        for j, (name, v) in enumerate(refs):
            ax.axhline(
                v, color=PALETTE[(len(series) + j) % len(PALETTE)], linestyle="--", label=name
            )
        if log:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=min(0.0, *finite))
        if integer_x:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if len(series) > 1 or refs:
            ax.legend(loc="best")
        svg = _svg(fig, title)
    return figure_html(title, svg, caption)


def bar_plot(
    title: str,
    items: Sequence[tuple[str, float]],
    *,
    xlabel: str,
    refs: Sequence[tuple[str, float]] = (),
    caption: str = "",
    value_fmt: str = "{:,.4g}",
    log: bool | None = None,
    colors: Sequence[str] | None = None,
) -> str:
    """Horizontal bars, one per (label, value), each labelled with its value, top to bottom
    in the given order; dashed vertical references. ``log``: as in :func:`line_plot`.
    ``colors``: one per bar; default the palette in turn (one colour when there are more bars)."""
    if not items:
        raise ValueError(f"{title}: nothing to plot")
    labels = [_short(str(k)) for k, _ in items]
    values = [float(v) for _, v in items]
    if log is None:
        log = wide(values)
    with mpl.rc_context(_RC):
        fig = _new(0.7 + 0.26 * len(items) + (0.25 if refs else 0.0))
        ax = fig.add_subplot()
        if colors is None:
            many = len(items) > len(PALETTE)
            colors = [PALETTE[0 if many else i] for i in range(len(items))]
        bars = ax.barh(range(len(items)), values, height=0.7, color=colors)
        for i, bar in enumerate(bars):
            bar.set_gid(f"marks-{i}")
        ax.bar_label(bars, labels=[value_fmt.format(v) for v in values], padding=3, fontsize=8)
        for name, v in refs:
            ax.axvline(v, color="#d1495b", linestyle="--", linewidth=1.4, label=name)
        ax.set_yticks(range(len(items)), labels)
        ax.set_ylim(len(items) - 0.5, -0.5)  # first item on top
        ax.grid(axis="y", visible=False)
        ax.spines["left"].set_visible(False)
        ax.tick_params(axis="y", length=0)
        if log:
            ax.set_xscale("log")
            ax.set_xlim(left=min(values) / 2)
        hi = max([*values, *(v for _, v in refs)])
        # Room on the right for the value labels.
        ax.set_xlim(right=hi * (4.0 if log else 1.18) if hi > 0 else 1.0)
        ax.set_xlabel(xlabel)
        if refs:
            ax.legend(loc="lower right")
        svg = _svg(fig, title)
    return figure_html(title, svg, caption)


def histogram_grid(
    title: str,
    panels: Sequence[tuple[str, np.ndarray]],
    *,
    columns: int = 4,
    caption: str = "",
) -> str:
    """Small multiples: one histogram (counts per bin) per panel, ``columns`` to a row."""
    if not panels:
        raise ValueError(f"{title}: nothing to plot")
    rows = math.ceil(len(panels) / columns)
    with mpl.rc_context(_RC | {"font.size": 7, "axes.grid": False}):
        fig = _new(0.3 + 1.15 * rows)
        axes: np.ndarray = np.asarray(fig.subplots(rows, columns, squeeze=False)).ravel()
        for i, (label, counts) in enumerate(panels):
            ax: Axes = axes[i]
            c = np.asarray(counts, dtype=np.float64)
            art = ax.stairs(c, np.arange(len(c) + 1), fill=True, color=PALETTE[0])
            art.set_gid(f"marks-{i}")
            ax.set_title(label, loc="left", fontsize=7)
            ax.set_xlim(0, len(c))
            ax.set_xticks([0, len(c) - 1])
            ax.yaxis.set_major_locator(MaxNLocator(2))
            ax.yaxis.set_major_formatter(EngFormatter(sep=""))
        for ax in axes[len(panels) :]:
            ax.set_visible(False)
        svg = _svg(fig, title)
    return figure_html(title, svg, caption)
