"""``spear report``: a schema-valid tokenize run and a train run render, and draw in Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from spear.cli.main import run
from spear.errors import SpearError
from spear.report import (
    TokenizeRun,
    build_report,
    load_tokenize_run,
    quarantine_counts,
    render_tokenize,
    thin_marks,
)
from spear.report.plots import bar_plot, wide
from spear.shards.schema import (
    TokenTeacherInfo,
)
from spear.storage import StorageConfig
from spear.testing import TokenItem, random_codes, write_token_output

TEACHERS = [
    TokenTeacherInfo(
        prefix="wavlm",
        teacher="wavlm-tiny",
        family="wavlm",
        layer=2,
        frame_rate=50.0,
        num_codebooks=4,
        codebook_size=256,
        quantizer_id="qw1",
        checkpoint_sha256=None,
        domains=("speech", "audio"),
    ),
    TokenTeacherInfo(
        prefix="dasheng",
        teacher="dasheng-tiny",
        family="dasheng",
        layer=2,
        frame_rate=25.0,
        num_codebooks=2,
        codebook_size=256,
        quantizer_id="qd1",
        checkpoint_sha256=None,
        domains=("audio",),
    ),
]

TOKENIZE_TITLES = [
    "Audio hours tokenized over time",
    "Pipeline throughput over time",
    "Stage busy time over time",
    "Stage throughput over time",
    "Stage rates",
    "Quarantine reasons",
    "Audio hours by domain",
    "Audio hours by source",
    "Quantiser RRL per teacher",
    "Codebook usage: wavlm",
    "Codebook usage: dasheng",
    "Token bytes per audio second",
]

TRAIN_TITLES = [
    "Training loss",
    "Learning rate",
    "Audio hours seen over time",
    "Training throughput",
]

LINEAGE_QUARANTINE = {
    "manifest": {"unreadable": 5, "empty": 2},
    "decode": {"truncated": 2, "corrupt": 1},
    "teacher": {},
}

SLOWEST = [
    {"shard": 1, "seconds": 40.0, "items": 4, "audio_seconds": 20.0},
    {"shard": 2, "seconds": 90.0, "items": 4, "audio_seconds": 18.0},
]


def write_tokenize_run(out: Path, shards: int = 3, items: int = 5, lineage: bool = True) -> dict:
    """A small, schema-valid `spear tokenize` output: tokens, quarantine, index, report;
    ``lineage``: report.json also has ``quarantine_by_stage`` and ``slowest_shards``."""
    rng = np.random.default_rng(0)
    units, by_domain, by_source = [], {"speech": 0.0, "audio": 0.0}, {}
    for s in range(shards):
        unit = []
        for i in range(items - 1):
            domain = "audio" if i % 3 == 0 else "speech"
            source = "audioset" if domain == "audio" else ("libri" if s % 2 else "giga")
            n = int(float(rng.uniform(2, 8)) * 16000)
            codes = {t.prefix: random_codes(t, n, rng) for t in TEACHERS if domain in t.domains}
            unit.append(
                TokenItem(f"s{s}i{i}", n, domain, source, f"file:///a/{s}-{i}.flac", codes=codes)
            )
            by_domain[domain] += n / 16000 / 3600
            by_source[source] = by_source.get(source, 0.0) + n / 16000 / 3600
        unit.append(
            TokenItem(
                f"s{s}bad",
                16000,
                url=f"file:///a/{s}-bad.mp3",
                error_type="truncated" if s else "corrupt",
                error="short read",
            )
        )
        units.append(unit)
    entries = write_token_output(str(out), units, TEACHERS)
    token_bytes = sum(e["files"][f"tokens/{e['name']}.parquet"]["bytes"] for e in entries)
    hours = sum(by_domain.values())
    report = {
        "kind": "tokenize",
        "out": str(out),
        "manifest": "file:///m",
        "started": "2026-11-25T20:00:00+00:00",
        "finished": "2026-11-25T20:03:00+00:00",
        "wall_seconds": 180.0,
        "items": shards * items,
        "ok": shards * (items - 1),
        "quarantined": {"corrupt": 1, "truncated": shards - 1},
        "hours_in": hours * 1.1,
        "hours_out": hours,
        "hours_by_domain": by_domain,
        "hours_by_source": by_source,
        "shards": shards,
        "shards_done_before": 1,
        "token_bytes": token_bytes,
        "bytes_per_audio_second": token_bytes / (hours * 3600),
        "teachers": [
            t.__dict__ | {"domains": list(t.domains), "rrl": rrl}
            for t, rrl in zip(TEACHERS, (0.31, 0.42), strict=True)
        ],
        "stages": {
            "decode": {"items": 15, "busy_seconds": 3.0, "rate_x_realtime": 250.0},
            "wavlm": {"items": 12, "busy_seconds": 20.0, "rate_x_realtime": 30.0},
            "dasheng": {"items": 3, "busy_seconds": 5.0, "rate_x_realtime": 25.0},
        },
        # dasheng idles between 60 and 120 s: a gap in its throughput, not a rate over nothing
        "timeline": [
            {
                "t": t,
                "items_done": 5 * k,
                "hours_done": hours * k / 3,
                "shards_done": k,
                "stage_busy": {"decode": k * 1.0, "wavlm": k * 6.5, "dasheng": d},
            }
            for k, t, d in ((1, 60.0, 1.6), (2, 120.0, 1.6), (3, 180.0, 3.2))
        ],
        "config": {"tokenize": {"items_per_shard": items}},
        "versions": {"spear": "0.1.0", "ray": "2.60.0", "torch": "2.11", "python": "3.11"},
    }
    if lineage:
        report["quarantine_by_stage"] = LINEAGE_QUARANTINE
        report["slowest_shards"] = SLOWEST
    (out / "report.json").write_text(json.dumps(report))
    return report


def write_train_run(out: Path) -> None:
    out.mkdir(parents=True)
    rows = [
        {
            "step": s,
            "time": 10.0 * s,
            "loss": 5.0 / (1 + s),
            "loss_wavlm": 4.0 / (1 + s),
            "loss_dasheng": 1.0 / (1 + s),
            "lr": 1e-3 * min(1, s / 5),
            "hours": 0.1 * s,
            "audio_s_per_s": 36.0,
            "epoch": 0,
        }
        for s in range(1, 21)
    ]
    text = "\n".join(json.dumps(r) for r in rows) + '\n{"step": 21, "ti'  # killed mid-line
    (out / "metrics.jsonl").write_text(text)


class _Tables(HTMLParser):
    """The cell texts of every ``<table class=...>``, by class."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._cls: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._cls = dict(attrs).get("class") or ""
            self.tables[self._cls] = []
        elif tag == "tr" and self._cls is not None:
            self.tables[self._cls].append([])
        elif tag in ("td", "th") and self._cls is not None:
            self._cell = []

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._cls is not None:
            self.tables[self._cls][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._cls = None


def tables(page: str) -> dict[str, list[list[str]]]:
    p = _Tables()
    p.feed(page)
    return p.tables


def plot_titles(page: str) -> list[str]:
    return re.findall(r'<figure class="plot" data-title="([^"]*)"><h3>', page)


def test_thin_marks_drops_marks_too_close_to_rate() -> None:
    marks = [{"t": 45.588, "hours_done": 1.0}, {"t": 45.611, "hours_done": 1.5}]
    assert thin_marks(marks, 1.0) == [{"t": 45.588, "hours_done": 1.5}]
    marks = [{"t": 0.2, "hours_done": 0.1}, {"t": 30.0, "hours_done": 1.0}]
    assert thin_marks(marks, 1.0) == [{"t": 30.0, "hours_done": 1.0}]


def test_wide_values_get_a_log_axis() -> None:
    assert wide([2556.5, 80.9, 1.0])
    assert not wide([2556.5, 80.9])  # 32x: linear
    assert not wide([0.0, 5.0, 5000.0])  # a zero has no place on a log axis
    linear = bar_plot("x", [("a", 10.0), ("b", 20.0)], xlabel="v")
    log = bar_plot("x", [("a", 1.0), ("b", 5000.0)], xlabel="v")
    # matplotlib labels log ticks as powers of ten (10^{k}), linear ones as plain numbers.
    assert "10^{" in log and "10^{" not in linear


def test_tokenize_report_has_every_plot(tmp_path: Path) -> None:
    rep = write_tokenize_run(tmp_path / "run")
    data = load_tokenize_run(str(tmp_path / "run"), StorageConfig(), max_shards=2)
    assert data.shards_read == 2 and data.shards_total == 3
    wavlm = data.usage[0]
    assert wavlm.counts.shape == (4, 256) and wavlm.counts.sum() == 4 * wavlm.frames
    assert (wavlm.perplexity() > 100).all()  # uniform random codes
    page = render_tokenize(data)
    assert plot_titles(page) == TOKENIZE_TITLES
    assert page.count("<svg") == len(TOKENIZE_TITLES)
    assert page.count('class="marks"') >= len(TOKENIZE_TITLES)
    # All SVGs share one document: an id twice would send url(#id) to another figure.
    ids = Counter(re.findall(r'\bid="([^"]+)"', page))
    assert ids and max(ids.values()) == 1, ids.most_common(3)
    assert re.findall(r'(?:url\(#|href="#)([^)"]+)', page)  # clip paths and markers ...
    assert all(i in ids for i in re.findall(r'(?:url\(#|href="#)([^)"]+)', page))  # resolve
    # Nothing fetched from the network: "http" only in XML namespace names.
    assert not re.sub(r'xmlns(:\w+)?="http://www\.w3\.org/[^"]*"', "", page).count("http")
    assert "<script" not in page and "<?xml" not in page

    t = tables(page)
    sources = t["sources"]
    assert sources[0] == ["source", "audio hours", "share"]
    by_source = sorted(rep["hours_by_source"].items(), key=lambda kv: -kv[1])
    assert [r[0] for r in sources[1:-1]] == [k for k, _ in by_source]
    assert sources[-1] == ["3 sources", f"{rep['hours_out']:.4g}", "100%"]

    reasons = t["quarantine-reasons"]
    assert reasons[0] == ["stage", "reason", "items", "share"]
    assert [r[:3] for r in reasons[1:-1]] == [
        ["manifest", "unreadable", "5"],
        ["manifest", "empty", "2"],
        ["decode", "truncated", "2"],
        ["decode", "corrupt", "1"],
    ]
    assert reasons[-1][2] == "10"
    assert "manifest: unreadable" in page and "lineage (manifest, decode, teacher)" in page
    assert len(t["quarantine"]) == 1 + 3  # header + this run's 3 quarantined items
    assert ["quarantined per stage", "manifest 7, decode 3, teacher 0"] in t["summary"]

    slow = t["slowest-shards"]
    assert slow[0] == ["shard", "path", "wall s", "items", "audio s", "x real time"]
    assert slow[1] == ["2", "tokens/shard-00002.parquet", "90.0", "4", "18.0", "0.2x"]
    assert slow[2][0] == "1" and slow[2][-1] == "0.5x"


def test_stage_throughput_has_a_gap_where_a_stage_idled(tmp_path: Path) -> None:
    from spear.report.tokenize import _steps

    t, audio = [0.0, 60.0, 120.0], [0.0, 600.0, 1200.0]
    xs, ys = _steps(t, audio, [0.0, 2.0, 2.0])
    assert xs == [0.0, 1.0, 1.0, 2.0]
    assert ys[:2] == [300.0, 300.0] and all(np.isnan(ys[2:]))
    assert _steps(t, audio) == ([0.0, 1.0, 1.0, 2.0], [10.0, 10.0, 10.0, 10.0])


def test_quarantine_counts_fall_back_without_lineage(tmp_path: Path) -> None:
    write_tokenize_run(tmp_path / "run", lineage=False)
    data = load_tokenize_run(str(tmp_path / "run"), StorageConfig())
    counts, origin = quarantine_counts(data)
    assert counts == [("decode", "truncated", 2), ("decode", "corrupt", 1)]
    assert origin == "this run's quarantine tables"
    page = render_tokenize(data)
    assert "slowest shards: not recorded in report.json" in page
    assert "slowest-shards" not in tables(page)

    # No quarantine rows either: report.json's reason counts, under the run's own name.
    bare = TokenizeRun(url="x", report=data.report)
    counts, origin = quarantine_counts(bare)
    assert counts == [("tokenize", "truncated", 2), ("tokenize", "corrupt", 1)]
    assert "no stage recorded" in origin


def test_many_sources_plot_the_largest_and_table_them_all(tmp_path: Path) -> None:
    write_tokenize_run(tmp_path / "run")
    data = load_tokenize_run(str(tmp_path / "run"), StorageConfig())
    data.report["hours_by_source"] = {f"src{i:02d}": float(i + 1) for i in range(20)}
    page = render_tokenize(data)
    fig = page[page.index('data-title="Audio hours by source"') :]
    fig = fig[: fig.index("</figure>")]
    assert fig.count('class="marks"') == 16 and "(5 other sources)" in fig
    rows = tables(page)["sources"]
    assert len(rows) == 1 + 20 + 1 and rows[1][0] == "src19" and rows[-2][0] == "src00"
    assert rows[1][2] == f"{20 / 210:.1%}"


def test_malformed_lineage_fields_are_one_clear_error(tmp_path: Path, capsys) -> None:
    rep = write_tokenize_run(tmp_path / "run")
    rep["slowest_shards"] = [{"shard": 1, "seconds": "slow", "items": 1, "audio_seconds": 1.0}]
    (tmp_path / "run" / "report.json").write_text(json.dumps(rep))
    assert run(["report", str(tmp_path / "run"), "--out", str(tmp_path / "r.html")]) == 2
    assert "slowest_shards[0].seconds: expected a number" in capsys.readouterr().err
    rep["slowest_shards"], rep["quarantine_by_stage"] = SLOWEST, {"decode": 3}
    (tmp_path / "run" / "report.json").write_text(json.dumps(rep))
    with pytest.raises(SpearError, match="quarantine_by_stage: expected"):
        build_report(str(tmp_path / "run"), StorageConfig())


def test_report_cli_train_run_and_errors(tmp_path: Path, capsys) -> None:
    write_train_run(tmp_path / "train")
    out = tmp_path / "train.html"
    assert run(["report", str(tmp_path / "train"), "--out", str(out)]) == 0
    assert "train report" in capsys.readouterr().out
    page = out.read_text()
    assert plot_titles(page) == TRAIN_TITLES
    assert run(["report", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert "neither report.json" in capsys.readouterr().err


def _summary(page: str) -> dict[str, str]:
    rows = re.findall(r"<tr><th>(.*?)</th><td>(.*?)</td></tr>", page)
    return dict(rows)


def test_train_elapsed_is_seconds_of_training_not_the_clock(tmp_path: Path) -> None:
    # Rows as `spear train` writes them: `time` is the wall clock (~1.8e9 s), `elapsed` the
    # seconds of training; before `elapsed` existed, the report printed `time` as elapsed.
    out = tmp_path / "run"
    out.mkdir()
    t0 = 1_796_584_000.0
    rows = [{"step": s, "time": t0 + 7 * s, "elapsed": 5.0 * s, "hours": 0.1 * s} for s in (1, 2)]
    (out / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    page, _ = build_report(str(out), StorageConfig())
    assert _summary(page)["elapsed"] == "10 s"
    assert _summary(page)["status"] == "finished"
    old = [{k: v for k, v in r.items() if k != "elapsed"} for r in rows]  # an older run
    (out / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in old))
    page, _ = build_report(str(out), StorageConfig())
    assert _summary(page)["elapsed"] == "7 s"  # since its first row, not since 1970


def test_train_run_in_progress_is_read_from_rank_zero_rows(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    (out / "metrics").mkdir(parents=True)

    def step_row(s: int) -> None:
        row = {"step": s, "loss": 5.0 / s, "hours": 0.1 * s, "elapsed": 2.0 * s, "lr": 1e-3}
        (out / "metrics" / f"step-{s:09d}.json").write_text(json.dumps(row))

    for s in (1, 2, 3):
        step_row(s)
    assert run(["report", str(out), "--out", str(tmp_path / "a.html")]) == 0  # no metrics.jsonl
    page = (tmp_path / "a.html").read_text()
    assert _summary(page)["status"].startswith("in progress")
    assert _summary(page)["last step"] == "3" and _summary(page)["elapsed"] == "6 s"
    # A resumed run: the first run's metrics.jsonl, the second's rows going past it.
    (out / "metrics.jsonl").write_text(json.dumps({"step": 3, "loss": 1.0, "elapsed": 6.0}))
    step_row(4)
    page, _ = build_report(str(out), StorageConfig())
    assert _summary(page)["last step"] == "4" and _summary(page)["logged rows"] == "4"
    (out / "metrics" / "step-000000004.json").unlink()  # the driver merged: finished
    page, _ = build_report(str(out), StorageConfig())
    assert _summary(page)["status"] == "finished" and _summary(page)["last step"] == "3"
    capsys.readouterr()


def test_quarantine_only_run_renders(tmp_path: Path) -> None:
    """A run whose every item failed still renders (no shards: notes instead of plots)."""
    out = tmp_path / "run"
    rep = write_tokenize_run(out, shards=1, lineage=False)
    (out / "index.parquet").unlink()
    rep["timeline"], rep["teachers"] = [], []
    (out / "report.json").write_text(json.dumps(rep))
    page, kind = build_report(str(out), StorageConfig())
    assert kind == "tokenize"
    assert "no progress timeline" in page and "no index.parquet" in page
    assert plot_titles(page) == [
        "Stage rates",
        "Quarantine reasons",
        "Audio hours by domain",
        "Audio hours by source",
    ]


# ---------------------------------------------------------------- headless Chromium

# Inserted first in <head>: collects load errors from the start; at load, per plot: the
# union box of its data marks and the SVG's laid-out size.
_CHECK = """<script>
const errors = [];
window.addEventListener('error', e => errors.push(String(e.message || e.target.outerHTML)), true);
window.addEventListener('load', () => {
  const plots = [];
  for (const fig of document.querySelectorAll('figure.plot')) {
    const svgs = fig.querySelectorAll('svg');
    const svg = svgs[0];
    const marks = svg ? [...svg.querySelectorAll('g.marks')] : [];
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const m of marks) {
      const b = m.getBBox();
      x0 = Math.min(x0, b.x); y0 = Math.min(y0, b.y);
      x1 = Math.max(x1, b.x + b.width); y1 = Math.max(y1, b.y + b.height);
    }
    const shown = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
    plots.push({title: fig.dataset.title, svgs: svgs.length, marks: marks.length,
                w: marks.length ? x1 - x0 : 0, h: marks.length ? y1 - y0 : 0,
                sw: shown.width, sh: shown.height});
  }
  const pre = document.createElement('pre');
  pre.id = 'plot-check';
  pre.textContent = JSON.stringify({plots, errors});
  document.body.appendChild(pre);
});
</script>"""

NO_BROWSER = (
    "no chromium binary: this test checks that the report's plots draw in a browser. "
    "Install it with `sudo apt-get install chromium` (Debian/Ubuntu; see the README's set-up). "
    "CI requires it: .ci/run sets SPEAR_REQUIRE_BROWSER=1, which turns this skip into a failure."
)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("SPEAR_REQUIRE_BROWSER") == "1":
        pytest.fail(f"SPEAR_REQUIRE_BROWSER=1 and {NO_BROWSER}")
    pytest.skip(NO_BROWSER)


def _headless(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def _drawn_plots(binary: str, html: Path, tmp: Path) -> list[dict]:
    """Open ``html`` in headless Chromium; per plot: title, marks, their extent, laid-out size.
    Fails on a console message or a load error."""
    probe = tmp / f"probe-{html.name}"
    probe.write_text(html.read_text().replace("<head>", "<head>" + _CHECK, 1))
    res = _headless(
        binary,
        tmp / f"profile-{html.stem}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=5000",
        "--dump-dom",
        probe.as_uri(),
    )
    found = re.search(r'<pre id="plot-check">(.*?)</pre>', res.stdout, re.S)
    assert found, f"chromium printed no check result (rc {res.returncode}): {res.stderr[-2000:]}"
    check = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert check["errors"] == []
    console = [line for line in res.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    for p in check["plots"]:
        assert p["svgs"] == 1 and p["marks"] > 0, p
        assert p["w"] > 0 and p["h"] > 0, f"{p['title']}: marks have no extent: {p}"
        assert p["sw"] > 100 and p["sh"] > 50, f"{p['title']}: not laid out: {p}"
    return check["plots"]


def test_report_draws_in_headless_chromium(tmp_path: Path) -> None:
    binary = _chromium()
    write_tokenize_run(tmp_path / "run")
    html = tmp_path / "report.html"
    assert run(["report", str(tmp_path / "run"), "--out", str(html)]) == 0
    plots = _drawn_plots(binary, html, tmp_path)
    assert [p["title"] for p in plots] == TOKENIZE_TITLES

    write_train_run(tmp_path / "train")
    train_html = tmp_path / "train.html"
    assert run(["report", str(tmp_path / "train"), "--out", str(train_html)]) == 0
    plots = _drawn_plots(binary, train_html, tmp_path)
    assert [p["title"] for p in plots] == TRAIN_TITLES

    # The page itself (no probe script) paints: its screenshot is far from a blank page's.
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    shots = {}
    for name, src in (("blank", blank), ("report", html)):
        png = tmp_path / f"{name}.png"
        _headless(
            binary,
            tmp_path / f"profile-{name}",
            f"--screenshot={png}",
            "--window-size=1100,2400",
            src.as_uri(),
        )
        assert png.exists(), f"chromium wrote no screenshot of {name}"
        shots[name] = png.stat().st_size
    assert shots["report"] > 5 * shots["blank"], shots


def test_tokenize_summary_names_weights_axis_fits_run_colours_fixed(tmp_path: Path) -> None:
    from spear.report.tokenize import STAGE_COLORS, _stage_colors, time_axis

    assert time_axis(90)[1] == "seconds of run time"
    assert time_axis(1800) == (60.0, "minutes of run time")
    assert time_axis(2 * 86400) == (3600.0, "hours of run time")
    # A stage keeps its colour whatever other stages a run has, or their order.
    one = _stage_colors({"stages": {"decode": {}, "wavlm": {}, "dasheng": {}}})
    other = _stage_colors({"stages": {"dasheng": {}, "student": {}, "decode": {}}})
    assert one["dasheng"] == other["dasheng"] == STAGE_COLORS["dasheng"]
    assert one["decode"] == other["decode"] and other["student"] not in STAGE_COLORS.values()
    write_tokenize_run(tmp_path / "run")
    data = load_tokenize_run(str(tmp_path / "run"), StorageConfig(), max_shards=1)
    data.report["teachers"] = [
        {
            "prefix": "wavlm",
            "teacher": "wavlm-large",
            "layer": 21,
            "checkpoint_sha256": "ab" * 32,
            "quantizer_id": "mvq-123",
            "num_codebooks": 16,
            "codebook_size": 256,
        }
    ]
    data.report["invocations"] = [
        {"started": "2026-01-01T00:00:00+00:00", "wall_seconds": 50, "shards_done": 2},
        {"started": "2026-01-02T00:00:00+00:00", "wall_seconds": 30, "shards_done": 1},
    ]
    summary = dict((r[0], r[1]) for r in tables(render_tokenize(data))["summary"])
    assert "ab" * 32 in summary["teachers"] and "mvq-123" in summary["teachers"]
    assert summary["invocations"].startswith("2: ")
