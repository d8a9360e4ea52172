"""``spear plan``: GPU-hours, wall time, CPU cores and bytes of a run, from measured rates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

RateOpt = Annotated[float | None, typer.Option(show_default=False)]


def plan(
    hours: Annotated[float, typer.Option("--hours", help="Audio hours in the run.")],
    gpus: Annotated[int, typer.Option("--gpus", help="GPUs the teachers run on.")],
    cpus: Annotated[
        int | None,
        typer.Option(
            help="CPU cores for decoding (default: report how many the GPUs need).",
            show_default=False,
        ),
    ] = None,
    rates: Annotated[
        list[Path] | None,
        typer.Option(
            "--rates",
            help="Rates file(s) written by the benchmarks (JSON), or a folder of them, e.g. "
            "benchmarks/rates (repeatable).",
            show_default=False,
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            help="Use stored rates measured on a device whose name contains this (e.g. H100).",
            show_default=False,
        ),
    ] = None,
    audio_fraction: Annotated[
        float | None,
        typer.Option(
            help="Share of the hours in the audio domain (Dasheng runs on them); default the "
            "paper's 13k/197k.",
            show_default=False,
        ),
    ] = None,
    no_dasheng: Annotated[
        bool, typer.Option("--no-dasheng", help="Plan a WavLM-only run.")
    ] = False,
    wavlm_rate: Annotated[
        float | None,
        typer.Option(
            help="WavLM teacher, x real time per GPU (MVQ included unless --mvq-wavlm-rate).",
            show_default=False,
        ),
    ] = None,
    dasheng_rate: Annotated[
        float | None,
        typer.Option(
            help="Dasheng teacher, x real time per GPU (MVQ included unless --mvq-dasheng-rate).",
            show_default=False,
        ),
    ] = None,
    mvq_wavlm_rate: Annotated[
        float | None,
        typer.Option(
            help="WavLM MVQ encode alone, x real time per GPU (combined in series).",
            show_default=False,
        ),
    ] = None,
    mvq_dasheng_rate: Annotated[
        float | None,
        typer.Option(
            help="Dasheng MVQ encode alone, x real time per GPU (combined in series).",
            show_default=False,
        ),
    ] = None,
    decode_rate: Annotated[
        float | None,
        typer.Option(help="Decode + resample, x real time per CPU core.", show_default=False),
    ] = None,
    token_bytes: Annotated[
        float | None,
        typer.Option(
            help="Measured token-shard bytes per audio second (default: 800 + 200 x audio "
            "share, SPEC section 3).",
            show_default=False,
        ),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the plan as JSON instead of a table.")
    ] = False,
) -> None:
    """Predict a tokenize run: GPU-hours, wall time, decode cores, object-store traffic, output.

    Rates come from benchmark files (--rates) or options (--wavlm-rate ...); options win.
    The plan says which figure limits the run.
    """
    from spear.plan import PAPER_AUDIO_FRACTION, RunSpec, load_rates, plan_run, resolve_rates

    spec = RunSpec(
        hours=hours,
        gpus=gpus,
        cpus=cpus,
        audio_fraction=PAPER_AUDIO_FRACTION if audio_fraction is None else audio_fraction,
        dasheng=not no_dasheng,
    )
    stored = load_rates(list(rates or []))
    given = {
        "wavlm": wavlm_rate,
        "dasheng": dasheng_rate,
        "mvq.wavlm": mvq_wavlm_rate,
        "mvq.dasheng": mvq_dasheng_rate,
        "decode": decode_rate,
        "token_bytes": token_bytes,
    }
    result = plan_run(spec, resolve_rates(stored, given, device, spec.dasheng))
    if json_out:
        typer.echo(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        typer.echo(result.table())
