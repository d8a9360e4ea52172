"""``spear report``: a schema-valid tokenize run and a train run render, and draw in Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from spear.cli.main import run
from spear.formats import (
    TOKEN_INDEX_SCHEMA,
    TOKEN_INDEX_VERSION,
    TokenTeacherInfo,
    codes_to_bytes,
    parquet_bytes,
    quarantine_row,
    quarantine_table,
    token_shard_metadata,
    with_metadata,
)
from spear.report import (
    build_report,
    load_tokenize_run,
    nice_ticks,
    render_tokenize,
    thin_marks,
)
from spear.storage import StorageConfig

TEACHERS = [
    TokenTeacherInfo(prefix="wavlm", teacher="wavlm-tiny", family="wavlm", layer=2,
                     frame_rate=50.0, num_codebooks=4, codebook_size=256, quantizer_id="qw1",
                     checkpoint_sha256=None, domains=("speech", "audio")),
    TokenTeacherInfo(prefix="dasheng", teacher="dasheng-tiny", family="dasheng", layer=2,
                     frame_rate=25.0, num_codebooks=2, codebook_size=256, quantizer_id="qd1",
                     checkpoint_sha256=None, domains=("audio",)),
]  # fmt: skip

TOKENIZE_TITLES = [
    "Audio hours tokenized over time",
    "Pipeline throughput over time",
    "Stage busy time over time",
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


def write_tokenize_run(out: Path, shards: int = 3, items: int = 5) -> dict:
    """A small, schema-valid `spear tokenize` output: tokens, quarantine, index, report."""
    rng = np.random.default_rng(0)
    schema, _ = token_shard_metadata(TEACHERS, items_per_shard=items)
    (out / "tokens").mkdir(parents=True)
    (out / "quarantine").mkdir()
    index, by_domain, by_source = [], {"speech": 0.0, "audio": 0.0}, {}
    for s in range(shards):
        rows = []
        for i in range(items - 1):
            domain = "audio" if i % 3 == 0 else "speech"
            source = "audioset" if domain == "audio" else ("libri" if s % 2 else "giga")
            secs = float(rng.uniform(2, 8))
            n = int(secs * 16000)
            row = {"item_id": f"s{s}i{i}", "source": source, "domain": domain,
                   "url": f"file:///a/{s}-{i}.flac", "start": 0.0, "duration": secs,
                   "num_samples": n}  # fmt: skip
            for t in TEACHERS:
                if domain in t.domains:
                    frames = int(secs * t.frame_rate)
                    codes = rng.integers(0, 256, (frames, t.num_codebooks), dtype=np.uint8)
                    row[f"{t.prefix}_frames"] = frames
                    row[f"{t.prefix}_codes"] = codes_to_bytes(codes)
                else:
                    row[f"{t.prefix}_frames"] = None
                    row[f"{t.prefix}_codes"] = None
            rows.append(row)
            by_domain[domain] += secs / 3600
            by_source[source] = by_source.get(source, 0.0) + secs / 3600
        data = parquet_bytes(pa.Table.from_pylist(rows, schema=schema))
        path = f"tokens/shard-{s:06d}.parquet"
        (out / path).write_bytes(data)
        reason = "truncated" if s else "corrupt"
        q = [quarantine_row(item_id=f"s{s}bad", source=f"file:///a/{s}-bad.mp3", stage="decode",
                            error_type=reason, message="short read")]  # fmt: skip
        (out / f"quarantine/shard-{s:06d}.parquet").write_bytes(parquet_bytes(quarantine_table(q)))
        index.append({"shard": s, "path": path, "rows": len(rows), "quarantined": 1,
                      "bytes": len(data), "sha256": "0" * 64,
                      "audio_seconds": sum(r["duration"] for r in rows)})  # fmt: skip
    idx = pa.Table.from_pylist(
        index, schema=with_metadata(TOKEN_INDEX_SCHEMA, "token_index", TOKEN_INDEX_VERSION)
    )
    (out / "index.parquet").write_bytes(parquet_bytes(idx))
    hours = sum(by_domain.values())
    token_bytes = sum(e["bytes"] for e in index)
    report = {
        "kind": "tokenize", "out": str(out), "manifest": "file:///m",
        "started": "2026-11-25T20:00:00+00:00", "finished": "2026-11-25T20:03:00+00:00",
        "wall_seconds": 180.0, "items": shards * items, "ok": shards * (items - 1),
        "quarantined": {"corrupt": 1, "truncated": shards - 1},
        "hours_in": hours * 1.1, "hours_out": hours, "hours_by_domain": by_domain,
        "hours_by_source": by_source, "shards": shards, "shards_done_before": 1,
        "token_bytes": token_bytes, "bytes_per_audio_second": token_bytes / (hours * 3600),
        "teachers": [t.__dict__ | {"domains": list(t.domains), "rrl": rrl}
                     for t, rrl in zip(TEACHERS, (0.31, 0.42), strict=True)],
        "stages": {"decode": {"items": 15, "busy_seconds": 3.0, "rate_x_realtime": 250.0},
                   "wavlm": {"items": 12, "busy_seconds": 20.0, "rate_x_realtime": 30.0},
                   "dasheng": {"items": 3, "busy_seconds": 5.0, "rate_x_realtime": 25.0}},
        "timeline": [{"t": t, "items_done": 5 * k, "hours_done": hours * k / 3,
                      "shards_done": k,
                      "stage_busy": {"decode": k * 1.0, "wavlm": k * 6.5, "dasheng": k * 1.6}}
                     for k, t in ((1, 60.0), (2, 120.0), (3, 180.0))],
        "config": {"tokenize": {"items_per_shard": items}},
        "versions": {"spear": "0.1.0", "ray": "2.60.0", "torch": "2.11", "python": "3.11"},
    }  # fmt: skip
    (out / "report.json").write_text(json.dumps(report))
    return report


def write_train_run(out: Path) -> None:
    out.mkdir(parents=True)
    rows = [
        {"step": s, "time": 10.0 * s, "loss": 5.0 / (1 + s), "loss_wavlm": 4.0 / (1 + s),
         "loss_dasheng": 1.0 / (1 + s), "lr": 1e-3 * min(1, s / 5), "hours": 0.1 * s,
         "audio_s_per_s": 36.0, "epoch": 0}
        for s in range(1, 21)
    ]  # fmt: skip
    text = "\n".join(json.dumps(r) for r in rows) + '\n{"step": 21, "ti'  # killed mid-line
    (out / "metrics.jsonl").write_text(text)


def test_nice_ticks() -> None:
    assert nice_ticks(0, 10) == [0, 2, 4, 6, 8, 10]
    assert nice_ticks(0, 0.9)[-1] >= 0.9
    assert nice_ticks(5, 5)[0] <= 5


def test_thin_marks_drops_marks_too_close_to_rate() -> None:
    marks = [{"t": 45.588, "hours_done": 1.0}, {"t": 45.611, "hours_done": 1.5}]
    assert thin_marks(marks, 1.0) == [{"t": 45.588, "hours_done": 1.5}]
    marks = [{"t": 0.2, "hours_done": 0.1}, {"t": 30.0, "hours_done": 1.0}]
    assert thin_marks(marks, 1.0) == [{"t": 30.0, "hours_done": 1.0}]


def test_tokenize_report_has_every_plot(tmp_path: Path) -> None:
    write_tokenize_run(tmp_path / "run")
    data = load_tokenize_run(str(tmp_path / "run"), StorageConfig(), max_shards=2)
    assert data.shards_read == 2 and data.shards_total == 3
    wavlm = data.usage[0]
    assert wavlm.counts.shape == (4, 256) and wavlm.counts.sum() == 4 * wavlm.frames
    assert (wavlm.perplexity() > 100).all()  # uniform random codes
    page = render_tokenize(data)
    for title in TOKENIZE_TITLES:
        assert f"<h3>{title}</h3>" in page, title
    assert page.count("<svg") == len(TOKENIZE_TITLES)
    assert "decode: truncated" in page and "http" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    )  # nothing fetched from the network
    assert "<script" not in page


def test_report_cli_train_run_and_errors(tmp_path: Path, capsys) -> None:
    write_train_run(tmp_path / "train")
    out = tmp_path / "train.html"
    assert run(["report", str(tmp_path / "train"), "--out", str(out)]) == 0
    assert "train report" in capsys.readouterr().out
    page = out.read_text()
    for title in TRAIN_TITLES:
        assert f"<h3>{title}</h3>" in page
    assert run(["report", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert "neither report.json" in capsys.readouterr().err


def test_quarantine_only_run_renders(tmp_path: Path) -> None:
    """A run whose every item failed still renders (no shards: notes instead of plots)."""
    out = tmp_path / "run"
    rep = write_tokenize_run(out, shards=1)
    (out / "index.parquet").unlink()
    rep["timeline"], rep["teachers"] = [], []
    (out / "report.json").write_text(json.dumps(rep))
    page, kind = build_report(str(out), StorageConfig())
    assert kind == "tokenize"
    assert "no progress timeline" in page and "no index.parquet" in page


# ---------------------------------------------------------------- headless Chromium

_CHECK = """<script>
window.addEventListener('load', () => {
  const out = [];
  for (const fig of document.querySelectorAll('figure.plot')) {
    const svg = fig.querySelector('svg');
    const marks = svg ? svg.querySelector('g.marks') : null;
    const box = marks ? marks.getBBox() : {width: 0, height: 0};
    const shown = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
    out.push({title: fig.dataset.title, marks: marks ? marks.childElementCount : 0,
              w: box.width, h: box.height, sw: shown.width, sh: shown.height});
  }
  const pre = document.createElement('pre');
  pre.id = 'plot-check';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _headless(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", f"--user-data-dir={profile}", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(
    _chromium() is None,
    reason="no chromium binary: install Debian's `chromium` package (.ci/run does) to check "
    "that the report's plots draw in a browser",
)
def _drawn_plots(binary: str, html: Path, tmp: Path) -> list[dict]:
    """Open ``html`` in headless Chromium; per plot: title, marks, their extent, laid-out size."""
    probe = tmp / f"probe-{html.name}"
    probe.write_text(html.read_text().replace("</body>", _CHECK + "</body>"))
    res = _headless(binary, tmp / f"profile-{html.stem}", "--virtual-time-budget=5000",
                    "--dump-dom", probe.as_uri())  # fmt: skip
    found = re.search(r'<pre id="plot-check">(.*?)</pre>', res.stdout, re.S)
    assert found, f"chromium printed no check result (rc {res.returncode}): {res.stderr[-2000:]}"
    plots = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    for p in plots:
        assert p["marks"] > 0, p
        assert p["w"] > 0 and p["h"] > 0, f"{p['title']}: marks have no extent: {p}"
        assert p["sw"] > 100 and p["sh"] > 50, f"{p['title']}: not laid out: {p}"
    return plots


def test_report_draws_in_headless_chromium(tmp_path: Path) -> None:
    binary = _chromium()
    assert binary is not None
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
        _headless(binary, tmp_path / f"profile-{name}", f"--screenshot={png}",
                  "--window-size=1100,2400", src.as_uri())  # fmt: skip
        assert png.exists(), f"chromium wrote no screenshot of {name}"
        shots[name] = png.stat().st_size
    assert shots["report"] > 5 * shots["blank"], shots
