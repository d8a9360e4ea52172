"""``spear probe``: linear probes of a student's or a teacher's layers on a labelled set."""

from __future__ import annotations

from typing import Annotated

import typer

from spear.cli.common import ConfigOpt, EndpointOpt, SetOpt, echo, resolve, url_option


def probe(
    labels: Annotated[
        str,
        url_option(
            "--labels",
            help="Labelled clips: a .csv or Parquet URL with url, label (--label-column) and "
            "optional start / duration (seconds).",
        ),
    ] = "",
    checkpoint: Annotated[
        str | None,
        url_option("--checkpoint", help="A student.pt (or training checkpoint folder) to probe."),
    ] = None,
    teacher: Annotated[
        str | None,
        typer.Option(help="Probe this teacher instead (registry name, e.g. wavlm, dasheng)."),
    ] = None,
    teacher_checkpoint: Annotated[
        str | None,
        url_option("--teacher-checkpoint", help="The teacher's weights (default: random init)."),
    ] = None,
    label_column: Annotated[str, typer.Option(help="The column holding the labels.")] = "label",
    steps: Annotated[int, typer.Option(help="Optimiser steps per probe (fixed budget).")] = 300,
    test_fraction: Annotated[float, typer.Option(help="Share of each class held out.")] = 0.25,
    seed: Annotated[int, typer.Option(help="Seed of the split and the probes.")] = 0,
    json_out: Annotated[
        str | None, url_option("--json-out", help="Also write the result as JSON here.")
    ] = None,
    s3_endpoint: EndpointOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Per-layer held-out accuracy of logistic regressions on mean-pooled features."""
    import json
    from dataclasses import asdict

    from spear.errors import SpearError
    from spear.probe import ProbeConfig, run_probe, student_pool, teacher_pool
    from spear.storage import write_atomic

    if not labels:
        raise SpearError("--labels is required")
    if (checkpoint is None) == (teacher is None):
        raise SpearError("give exactly one of --checkpoint (a student) or --teacher")
    cfg = resolve(config, set_, **{"storage.endpoint_url": s3_endpoint})
    storage = cfg.storage.resolved()
    pcfg = ProbeConfig(
        label_column=label_column, steps=steps, test_fraction=test_fraction, seed=seed
    )
    pool = (
        student_pool(checkpoint, storage)
        if checkpoint is not None
        else teacher_pool(str(teacher), teacher_checkpoint, storage)
    )
    result = run_probe(labels, pool, pcfg, storage, cfg.decode)
    echo(result.table())
    if json_out:
        write_atomic(json_out, json.dumps(asdict(result), indent=1).encode(), storage)
