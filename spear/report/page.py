"""The HTML around the plots: one self-contained page (inline CSS, no scripts), tables, notes."""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Collection, Sequence
from typing import Any

_CSS = """
body{font-family:sans-serif;margin:24px auto;max-width:1000px;color:#222}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
h3{font-size:14px;margin:8px 0}figure{margin:16px 0}figcaption{color:#555;font-size:12px}
svg.plot-svg{max-width:100%;height:auto}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{padding:3px 10px;
border-bottom:1px solid #eee;text-align:left}td.n,th.n{text-align:right;
font-variant-numeric:tabular-nums}tr.total td{font-weight:bold;border-top:1px solid #ccc}
.note{color:#666;font-style:italic}pre{font-size:11px;background:#f6f6f6;padding:8px;
overflow:auto}
"""


def esc(s: object) -> str:
    return html.escape(str(s), quote=True)


def page(title: str, sections: Sequence[str]) -> str:
    """The whole document."""
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}'
        f"</title><style>{_CSS}</style></head><body><h1>{esc(title)}</h1>"
        + "".join(sections)
        + f'<p class="note">written by spear report, {now}</p></body></html>'
    )


def kv_table(rows: Sequence[tuple[str, object]]) -> str:
    body = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    return f'<table class="summary">{body}</table>'


def table(
    cls: str,
    header: Sequence[str],
    rows: Sequence[Sequence[object]],
    *,
    numeric: Collection[int] = (),
    total: Sequence[object] | None = None,
) -> str:
    """A ``<table class=cls>``; columns in ``numeric`` align right; ``total``: a last row."""

    def cls_of(i: int) -> str:
        return ' class="n"' if i in numeric else ""

    def row(cells: Sequence[object], attr: str = "") -> str:
        tds = "".join(f"<td{cls_of(i)}>{esc(c)}</td>" for i, c in enumerate(cells))
        return f"<tr{attr}>{tds}</tr>"

    head = "".join(f"<th{cls_of(i)}>{esc(h)}</th>" for i, h in enumerate(header))
    body = "".join(row(r) for r in rows)
    foot = row(total, ' class="total"') if total is not None else ""
    return f'<table class="{esc(cls)}"><tr>{head}</tr>{body}{foot}</table>'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def fmt(v: Any, spec: str = "{:,.2f}") -> str:
    """``v`` formatted by ``spec`` when it is a number, else ``-``."""
    return spec.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"
