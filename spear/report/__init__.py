"""Run reports: one self-contained HTML file per run, plots as inline SVG (no network, no JS).

``spear report RUN_URL`` reads what a run left behind and draws it:

* a **tokenize** run (``report.json`` with ``kind: tokenize``, ``index.parquet``,
  ``quarantine/*.parquet``, ``tokens/*.parquet``): throughput over time, per stage and the
  slowest shards; quarantine reasons per stage (of the whole lineage when ``report.json`` has
  ``quarantine_by_stage``); hours by domain and by source; per-codebook usage histograms
  computed from (a sample of) the token shards, RRL per teacher, and token bytes per audio
  second against SPEC section 3's 1,000 B/s bound;
* a **train** run (``metrics.jsonl``, one JSON row per logged step: ``step`` and any of
  ``elapsed`` (seconds of training, summed over resumes), ``time`` (the wall clock),
  ``loss``, ``loss_wavlm``, ``loss_dasheng``, ``lr``, ``hours``, ``audio_s_per_s``): loss
  curves, learning rate, audio hours seen, throughput. A run still training (no
  ``metrics.jsonl`` yet, or rank 0's ``metrics/step-*.json`` past it) is drawn from those
  per-step rows and marked in progress.

Loading (:mod:`spear.report.load`) is separate from drawing (:func:`render_tokenize`,
:func:`render_train`), which are pure functions of the loaded data; :mod:`spear.report.plots`
draws with matplotlib, :mod:`spear.report.page` writes the HTML around the plots.
"""

from __future__ import annotations

from spear.errors import SpearError
from spear.report.load import (
    CodebookUsage,
    TokenizeRun,
    TrainRun,
    count_codes,
    load_tokenize_run,
    load_train_metrics,
    load_train_run,
    read_report,
)
from spear.report.tokenize import (
    TOKEN_BOUND_BYTES_PER_SECOND,
    quarantine_counts,
    render_tokenize,
    thin_marks,
)
from spear.report.train import render_train
from spear.storage import StorageConfig, exists, filesystem, join

__all__ = [
    "TOKEN_BOUND_BYTES_PER_SECOND",
    "CodebookUsage",
    "TokenizeRun",
    "TrainRun",
    "build_report",
    "count_codes",
    "load_tokenize_run",
    "load_train_metrics",
    "load_train_run",
    "quarantine_counts",
    "render_tokenize",
    "render_train",
    "thin_marks",
]


def build_report(url: str, storage: StorageConfig, max_shards: int = 16) -> tuple[str, str]:
    """The report HTML of the run at ``url`` and its kind (``tokenize`` or ``train``)."""
    if exists(join(url, "report.json"), storage):
        kind = read_report(url, storage).get("kind", "tokenize")
        if kind == "tokenize":
            return render_tokenize(load_tokenize_run(url, storage, max_shards)), kind
        if kind != "train":
            raise SpearError(f"{url}/report.json: unknown run kind {kind!r}")
    fs, live = filesystem(join(url, "metrics"), storage)
    if exists(join(url, "metrics.jsonl"), storage) or fs.exists(live):
        run = load_train_run(url, storage)
        return render_train(url, run.rows, in_progress=run.in_progress), "train"
    raise SpearError(
        f"{url} holds neither report.json (tokenize run) nor metrics.jsonl (train run)"
    )
