"""``spear report``: a self-contained HTML report of a tokenize or train run."""

from __future__ import annotations

from typing import Annotated

import typer

from spear.cli.common import ConfigOpt, EndpointOpt, ReportOutOpt, SetOpt, echo, resolve


def report(
    run: Annotated[
        str,
        typer.Argument(
            help="The run: a `spear tokenize` --out (report.json) or a `spear train` --out "
            "(metrics.jsonl, or metrics/ while it trains); any fsspec URL.",
            show_default=False,
        ),
    ],
    out: ReportOutOpt = None,
    max_shards: Annotated[
        int, typer.Option(help="Token shards read (evenly spread) for codebook usage.")
    ] = 16,
    s3_endpoint: EndpointOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Write one HTML file with the run's plots (inline SVG: opens offline, no scripts)."""
    from spear.errors import SpearError
    from spear.report import build_report
    from spear.storage import check_url, join, write_atomic

    check_url(run)
    out = out or join(run, "report.html")
    check_url(out)
    if max_shards < 1:
        raise SpearError(f"--max-shards must be at least 1, got {max_shards}")
    cfg = resolve(config, set_, **{"storage.endpoint_url": s3_endpoint})
    storage = cfg.storage.resolved()
    page, kind = build_report(run, storage, max_shards)
    write_atomic(out, page.encode(), storage)
    echo(f"{kind} report: {out} ({len(page) / 1e3:,.0f} kB)")
