"""The report of a tokenize run: a pure function of :class:`~spear.report.load.TokenizeRun`.

Sections: summary; throughput (hours and rate over time, each stage's busy workers and
throughput over time, whole-run stage rates, the slowest shards); quarantine (reasons per
stage as a plot and a table, the first rows); hours by domain and by source (plot and table);
codes (RRL per teacher, per-codebook usage); token bytes per audio second per shard; config.
"""

from __future__ import annotations

import json
import math
import posixpath
from collections import Counter
from typing import Any

import numpy as np

from spear.errors import SpearError
from spear.report.load import TokenizeRun
from spear.report.page import esc, fmt, kv_table, note, page, table
from spear.report.plots import PALETTE, Series, bar_plot, histogram_grid, line_plot

TOKEN_BOUND_BYTES_PER_SECOND = 1000.0
"""SPEC section 3: WavLM 16 x 50 Hz + Dasheng 8 x 25 Hz bytes of codes per second of audio."""

SOURCES_PLOTTED = 15
"""Sources drawn one bar each; the rest share one bar (the table lists every source)."""

HOURS = "audio hours with tokens"

STAGE_COLORS = {
    "decode": PALETTE[0],
    "wavlm": PALETTE[1],
    "dasheng": PALETTE[2],
    "write": PALETTE[3],
}
"""Fixed colours of the stages every tokenize run has, so they read the same in every report;
other stages take the remaining colours in order."""


def time_axis(span: float) -> tuple[float, str]:
    """Seconds per axis unit and the axis label for a run of ``span`` seconds: seconds under
    3 minutes, minutes under 3 hours, then hours."""
    if span < 180:
        return 1.0, "seconds of run time"
    if span < 3 * 3600:
        return 60.0, "minutes of run time"
    return 3600.0, "hours of run time"


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


def _steps(
    t: list[float], num: list[float], den: list[float] | None = None, unit: float = 60.0
) -> tuple[list[float], list[float]]:
    """Average rate of the cumulative ``num`` per cumulative ``den`` (default: the time ``t``)
    over each interval between marks, as a step line with x in ``unit`` seconds; an interval in
    which ``den`` did not grow is a gap (NaN)."""
    den = t if den is None else den
    xs: list[float] = []
    ys: list[float] = []
    for i in range(1, len(t)):
        if t[i] <= t[i - 1]:
            continue
        d = den[i] - den[i - 1]
        r = (num[i] - num[i - 1]) / d if d > 0 else math.nan
        xs += [t[i - 1] / unit, t[i] / unit]
        ys += [r, r]
    return xs, ys


def _stage_colors(r: dict[str, Any]) -> dict[str, str]:
    """One colour per stage in every plot: pipeline order (report.json's ``stages``), then any
    stage only the timeline names."""
    names = list(r.get("stages") or {})
    names += sorted(
        {k for m in r.get("timeline") or [] for k in m.get("stage_busy") or {}} - set(names)
    )
    rest = [c for c in PALETTE if c not in STAGE_COLORS.values()]
    others = [k for k in names if k not in STAGE_COLORS]
    return {k: STAGE_COLORS.get(k) or rest[others.index(k) % len(rest)] for k in names}


def _throughput(r: dict[str, Any]) -> list[str]:
    raw = r.get("timeline") or []
    if not raw:
        return [note("no progress timeline in report.json")]
    span = max(float(m["t"]) for m in raw)
    unit, xlabel = time_axis(span)
    timeline = thin_marks(raw, max(1.0, 0.002 * span))
    t = [0.0] + [float(m["t"]) for m in timeline]
    audio_s = [0.0] + [float(m["hours_done"]) * 3600 for m in timeline]
    runs = len(r.get("invocations") or []) or 1
    resumed = (
        f" The run was resumed: {runs} invocations, their working time laid end to end."
        if runs > 1
        else ""
    )
    out = [
        line_plot(
            "Audio hours tokenized over time",
            [Series("hours done", [v / unit for v in t], [a / 3600 for a in audio_s])],
            caption=f"Cumulative audio hours with tokens.{resumed}",
            xlabel=xlabel,
            ylabel="audio hours",
        )
    ]
    xs, ys = _steps(t, audio_s, unit=unit)
    if xs:
        out.append(
            line_plot(
                "Pipeline throughput over time",
                [Series("x real time", xs, ys)],
                xlabel=xlabel,
                ylabel="audio s per wall s",
                caption="Audio seconds tokenized per wall second, averaged between progress marks.",
            )
        )
    colors = _stage_colors(r)
    busy_named = {k for m in timeline for k in (m.get("stage_busy") or {})}
    stages = [k for k in colors if k in busy_named]
    busy = {
        s: [0.0] + [float((m.get("stage_busy") or {}).get(s, 0.0)) for m in timeline]
        for s in stages
    }
    workers = [Series(s, *_steps(t, busy[s], unit=unit), color=colors[s]) for s in stages]
    workers = [s for s in workers if s.x]
    if workers:
        out.append(
            line_plot(
                "Stage busy time over time",
                workers,
                xlabel=xlabel,
                ylabel="busy s per wall s",
                caption="Seconds each stage's workers spent working per wall second, averaged "
                "between progress marks: about the number of busy workers (decode tasks, "
                "teacher actors).",
            )
        )
    rates = [Series(s, *_steps(t, audio_s, busy[s], unit), color=colors[s]) for s in stages]
    rates = [s for s in rates if any(math.isfinite(y) for y in s.y)]
    if rates:
        out.append(
            line_plot(
                "Stage throughput over time",
                rates,
                xlabel=xlabel,
                ylabel="audio s per busy s",
                caption="Audio seconds the pipeline tokenized per second of each stage's busy "
                "time, between progress marks (gaps: the stage did no work). A stage that sees "
                "only part of the audio (Dasheng: audio-domain items) reads high by that share; "
                "the whole-run stage rates below count each stage's own audio.",
            )
        )
    return out


def _stage_rates(r: dict[str, Any]) -> list[str]:
    stages = r.get("stages") or {}
    rated = [
        (k, float(v["rate_x_realtime"])) for k, v in stages.items() if v.get("rate_x_realtime")
    ]
    if not rated:
        return []
    return [
        bar_plot(
            "Stage rates",
            rated,
            xlabel="x real time per busy worker (audio s / busy s)",
            caption="Audio seconds each stage handled per second of worker time, whole run.",
            value_fmt="{:,.1f}x",
            colors=[_stage_colors(r)[k] for k, _ in rated],
        )
    ]


def _number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SpearError(f"report.json: {where}: expected a number, got {v!r}")
    return float(v)


def _slowest_shards(run: TokenizeRun) -> list[str]:
    raw = run.report.get("slowest_shards")
    out = ["<h3>Slowest shards</h3>"]
    if raw is None:
        return [*out, note("slowest shards: not recorded in report.json")]
    if not isinstance(raw, list):
        raise SpearError("report.json: slowest_shards: expected a list of shard entries")
    paths: dict[int, str] = {}
    if run.index is not None:
        paths = dict(
            zip(
                run.index.column("shard").to_pylist(),
                run.index.column("path").to_pylist(),
                strict=True,
            )
        )
    rows = []
    for i, e in enumerate(raw):
        if not isinstance(e, dict):
            raise SpearError(f"report.json: slowest_shards[{i}]: expected an object")
        keys = ("shard", "seconds", "items", "audio_seconds")
        rows.append({k: _number(e.get(k), f"slowest_shards[{i}].{k}") for k in keys})
    if not rows:
        return [*out, note("slowest shards: none recorded in report.json")]
    rows.sort(key=lambda v: -v["seconds"])
    body = [
        (
            int(v["shard"]),
            paths.get(int(v["shard"]), "-"),
            f"{v['seconds']:,.1f}",
            f"{int(v['items']):,}",
            f"{v['audio_seconds']:,.1f}",
            f"{v['audio_seconds'] / v['seconds']:,.1f}x" if v["seconds"] > 0 else "-",
        )
        for v in rows
    ]
    header = ["shard", "path", "wall s", "items", "audio s", "x real time"]
    return [*out, table("slowest-shards", header, body, numeric={0, 2, 3, 4, 5})]


def quarantine_counts(run: TokenizeRun) -> tuple[list[tuple[str, str, int]], str]:
    """(stage, reason, items) quarantined, most first within each stage, and where the counts
    come from: report.json's ``quarantine_by_stage`` (every stage of the run's lineage) when
    present, else this run's quarantine rows, else report.json's ``quarantined`` (reasons only)."""
    r = run.report
    by_stage = r.get("quarantine_by_stage")
    if by_stage is not None:
        if not isinstance(by_stage, dict) or not all(
            isinstance(v, dict) for v in by_stage.values()
        ):
            raise SpearError("report.json: quarantine_by_stage: expected {stage: {reason: count}}")
        out = []
        for stage, reasons in by_stage.items():
            counts = {k: _number(n, f"quarantine_by_stage.{stage}.{k}") for k, n in reasons.items()}
            out += [
                (str(stage), str(k), int(n))
                for k, n in sorted(counts.items(), key=lambda kv: -kv[1])
                if n > 0
            ]
        stages = ", ".join(map(str, by_stage)) or "none"
        return out, f"every stage of the run's lineage ({stages})"
    q = run.quarantine
    if q is not None and q.num_rows:
        pairs = Counter(
            zip(q.column("stage").to_pylist(), q.column("error_type").to_pylist(), strict=True)
        )
        return [(s, e, n) for (s, e), n in pairs.most_common()], "this run's quarantine tables"
    flat = Counter(
        {k: int(_number(v, f"quarantined.{k}")) for k, v in (r.get("quarantined") or {}).items()}
    )
    return [("tokenize", k, n) for k, n in flat.most_common() if n > 0], (
        "report.json's quarantined counts (no stage recorded)"
    )


def _per_stage(run: TokenizeRun) -> str:
    """The summary's one line of quarantine: items per stage, all stages of the lineage."""
    counts, _ = quarantine_counts(run)
    per: Counter[str] = Counter()
    for stage in run.report.get("quarantine_by_stage") or {}:
        per[str(stage)] = 0
    for stage, _, n in counts:
        per[stage] += n
    return ", ".join(f"{k} {n:,}" for k, n in per.items()) or "none"


def _quarantine(run: TokenizeRun) -> list[str]:
    counts, origin = quarantine_counts(run)
    if not counts:
        return [note(f"no item was quarantined ({origin})")]
    total = sum(n for _, _, n in counts)
    out = [
        bar_plot(
            "Quarantine reasons",
            [(f"{s}: {e}", float(n)) for s, e, n in counts],
            xlabel="items",
            value_fmt="{:,.0f}",
            caption=f"{total:,} items in quarantine (stage: reason), from {origin}.",
        ),
        table(
            "quarantine-reasons",
            ["stage", "reason", "items", "share"],
            [(s, e, f"{n:,}", f"{n / total:.1%}") for s, e, n in counts],
            numeric={2, 3},
            total=("all", "", f"{total:,}", "100%"),
        ),
    ]
    q = run.quarantine
    if q is not None and q.num_rows:
        rows = q.slice(0, 20).to_pylist()
        shown = f"{len(rows)} of {q.num_rows:,}"
        out.append(f"<h3>First quarantined items of this run ({shown})</h3>")
        out.append(
            table(
                "quarantine",
                ["item", "stage", "reason", "message"],
                [(x["item_id"], x["stage"], x["error_type"], x["message"][:160]) for x in rows],
            )
        )
    return out


def _hours_str(h: float) -> str:
    return f"{h:,.1f}" if h >= 100 else f"{h:.4g}"


def _hours(r: dict[str, Any]) -> list[str]:
    out = []
    domains = sorted((r.get("hours_by_domain") or {}).items(), key=lambda kv: -kv[1])
    if domains:
        out.append(bar_plot("Audio hours by domain", domains, xlabel=HOURS, value_fmt="{:,.3g} h"))
    else:
        out.append(note("no hours_by_domain in report.json"))
    sources = sorted((r.get("hours_by_source") or {}).items(), key=lambda kv: -kv[1])
    if not sources:
        return [*out, note("no hours_by_source in report.json")]
    shown = sources[:SOURCES_PLOTTED]
    rest = sources[SOURCES_PLOTTED:]
    if rest:
        shown.append((f"({len(rest)} other sources)", sum(h for _, h in rest)))
    total = sum(h for _, h in sources)
    out.append(bar_plot("Audio hours by source", shown, xlabel=HOURS, value_fmt="{:,.3g} h"))
    out.append(
        table(
            "sources",
            ["source", "audio hours", "share"],
            [(k, _hours_str(h), f"{h / total:.1%}" if total else "-") for k, h in sources],
            numeric={1, 2},
            total=(f"{len(sources)} sources", _hours_str(total), "100%"),
        )
    )
    return out


def _codes(run: TokenizeRun) -> list[str]:
    out = []
    teachers = run.report.get("teachers") or []
    rrl = [
        (t.get("prefix", t.get("teacher", "?")), float(t["rrl"])) for t in teachers if t.get("rrl")
    ]
    if rrl:
        out.append(
            bar_plot(
                "Quantiser RRL per teacher",
                rrl,
                xlabel="relative reconstruction loss (held-out frames; lower is better)",
                value_fmt="{:.3f}",
                log=False,
            )
        )
    else:
        out.append(note("no RRL recorded for the quantisers in report.json"))
    if not run.usage:
        return [*out, note("no token shards to count codes in")]
    for u in run.usage:
        t = u.teacher
        if not u.frames:
            out.append(note(f"codebook usage of {t.prefix}: no frames in the shards read"))
            continue
        ppl, dead = u.perplexity(), u.dead()
        panels = [
            (f"cb {c}: ppl {ppl[c]:.0f}, dead {dead[c]}", u.counts[c])
            for c in range(t.num_codebooks)
        ]
        out.append(
            histogram_grid(
                f"Codebook usage: {t.prefix}",
                panels,
                caption=f"{t.teacher}, quantiser {t.quantizer_id}: {u.frames:,} frames from "
                f"{run.shards_read} of {run.shards_total} shards; counts per code index "
                f"(0..{t.codebook_size - 1}); perplexity {t.codebook_size} = uniform.",
            )
        )
    return out


def _token_bytes(run: TokenizeRun) -> list[str]:
    if run.index is None or not run.index.num_rows:
        return [note("no index.parquet: no shard sizes")]
    shards = [float(s) for s in run.index.column("shard").to_pylist()]
    b = np.asarray(run.index.column("bytes").to_numpy(), dtype=np.float64)
    secs = np.asarray(run.index.column("audio_seconds").to_numpy(), dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        per = np.where(secs > 0, b / secs, np.nan)
    total = float(b.sum() / secs.sum()) if secs.sum() else math.nan
    refs = [("1,000 B/s bound", TOKEN_BOUND_BYTES_PER_SECOND)]
    if math.isfinite(total):
        refs.append((f"run: {total:,.0f} B/s", total))
    return [
        line_plot(
            "Token bytes per audio second",
            [Series("shard", shards, per.tolist())],
            xlabel="shard",
            ylabel="bytes / audio second",
            refs=refs,
            log=False,
            integer_x=True,
            caption="Parquet file bytes (codes + item columns, compressed) per second of "
            "audio, per shard, against SPEC section 3's 1,000 B/s of raw codes.",
        )
    ]


def _teachers(r: dict[str, Any]) -> str:
    """Which teachers made the codes: name, layer, weights' sha256, quantiser id."""
    rows = []
    for t in r.get("teachers") or []:
        sha = t.get("checkpoint_sha256") or "none (random weights)"
        rows.append(
            f"{t.get('prefix')}: {t.get('teacher')} layer {t.get('layer')}, weights sha256 "
            f"{sha}, quantiser {t.get('quantizer_id')} ({t.get('num_codebooks')} x "
            f"{t.get('codebook_size')})"
        )
    return "; ".join(rows) or "-"


def _invocations(r: dict[str, Any]) -> str:
    runs = r.get("invocations") or []
    if not runs:
        return "1"
    return f"{len(runs)}: " + "; ".join(
        f"{x.get('started', '-')} ({fmt(x.get('wall_seconds'), '{:,.0f}')} s, "
        f"{x.get('shards_done', 0)} shards)"
        for x in runs
    )


def render_tokenize(run: TokenizeRun) -> str:
    """The HTML report of a tokenize run (pure: no I/O)."""
    r = run.report
    q_total = sum((r.get("quarantined") or {}).values())
    summary = kv_table(
        [
            ("run", run.url),
            ("manifest", r.get("manifest", "-")),
            ("started / finished", f"{r.get('started', '-')} / {r.get('finished', '-')}"),
            ("wall time", f"{fmt(r.get('wall_seconds'), '{:,.1f}')} s"),
            ("items", f"{r.get('items', '-')}: {r.get('ok', '-')} ok, {q_total} quarantined"),
            (
                "audio hours in / out",
                f"{fmt(r.get('hours_in'), '{:,.4g}')} / {fmt(r.get('hours_out'), '{:,.4g}')}",
            ),
            (
                "shards",
                f"{r.get('shards', '-')} ({r.get('shards_done_before', 0)} from earlier runs)",
            ),
            (
                "token bytes",
                f"{fmt(r.get('token_bytes'), '{:,}')} "
                f"({fmt(r.get('bytes_per_audio_second'), '{:,.0f}')} B per audio second)",
            ),
            ("teachers", _teachers(r)),
            ("invocations", _invocations(r)),
            ("quarantined per stage", _per_stage(run)),
            ("versions", ", ".join(f"{k} {v}" for k, v in (r.get("versions") or {}).items())),
        ]
    )
    sections = ["<h2>Summary</h2>", summary, "<h2>Throughput</h2>"]
    sections += _throughput(r) + _stage_rates(r) + _slowest_shards(run)
    sections += ["<h2>Quarantine</h2>", *_quarantine(run)]
    sections += ["<h2>Hours</h2>", *_hours(r)]
    sections += ["<h2>Codes</h2>", *_codes(run)]
    sections += ["<h2>Token bytes</h2>", *_token_bytes(run)]
    if r.get("config"):
        sections.append(
            "<h2>Configuration</h2><details><summary>config used</summary><pre>"
            + esc(json.dumps(r["config"], indent=2, sort_keys=True))
            + "</pre></details>"
        )
    return page(f"spear tokenize run: {posixpath.basename(run.url.rstrip('/'))}", sections)
