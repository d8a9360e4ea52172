"""``spear plan``: GPU-hours, wall time, cores, bytes, objects and cost of a run, from rates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from spear.cli.common import ConfigOpt, EndpointOpt, SetOpt, resolve
from spear.plan import FLAC_16K_BYTES_PER_SECOND, SPEECH_ITEM_SECONDS


def _opt(help: str) -> typer.models.OptionInfo:
    return typer.Option(help=help, show_default=False)


def plan(
    gpus: Annotated[int, typer.Option("--gpus", help="GPUs the teachers run on.")],
    hours: Annotated[
        float | None, _opt("Audio hours in the run (or --manifest: its items' hours).")
    ] = None,
    manifest: Annotated[
        str | None,
        _opt("A finished `spear manifest` output: exact hours, items, files, shards, bytes."),
    ] = None,
    cpus: Annotated[
        int | None, _opt("CPU cores for decoding (default: report how many the GPUs need).")
    ] = None,
    rates: Annotated[
        list[Path] | None,
        typer.Option(
            "--rates",
            help="Rates file(s) written by the benchmarks (JSON), or a folder of them "
            "(repeatable); default: the rates shipped with spear.",
            show_default=False,
        ),
    ] = None,
    device: Annotated[
        str | None, _opt("Use rates measured on a device whose name contains this (e.g. H100).")
    ] = None,
    cpu_device: Annotated[
        str | None, _opt("The same for the decode rate (default: --device, else the only one).")
    ] = None,
    audio_fraction: Annotated[
        float | None,
        _opt(
            "Share of the hours in the audio domain (Dasheng runs on them); default the "
            "paper's 13k/197k, or the manifest's."
        ),
    ] = None,
    no_dasheng: Annotated[
        bool, typer.Option("--no-dasheng", help="Plan a WavLM-only run.")
    ] = False,
    wavlm_rate: Annotated[
        float | None,
        _opt("WavLM actor, x real time per GPU (MVQ included unless --mvq-wavlm-rate)."),
    ] = None,
    dasheng_rate: Annotated[
        float | None,
        _opt("Dasheng actor, x real time per GPU (MVQ included unless --mvq-dasheng-rate)."),
    ] = None,
    mvq_wavlm_rate: Annotated[
        float | None, _opt("WavLM MVQ encode alone, x real time per GPU (in series).")
    ] = None,
    mvq_dasheng_rate: Annotated[
        float | None, _opt("Dasheng MVQ encode alone, x real time per GPU (in series).")
    ] = None,
    decode_rate: Annotated[
        float | None, _opt("Decode + resample, x real time per CPU core.")
    ] = None,
    token_bytes: Annotated[
        float | None,
        _opt("Token-shard bytes per audio second (default: 800 + 200 x audio share, SPEC 3)."),
    ] = None,
    student: Annotated[
        str,
        typer.Option(
            help="Student preset to plan training for (tiny, base, large, xlarge), or none."
        ),
    ] = "base",
    student_rate: Annotated[
        float | None, _opt("Student training, audio seconds per second per GPU.")
    ] = None,
    epochs: Annotated[float, typer.Option(help="Student passes over the hours.")] = 1.0,
    train_gpus: Annotated[int | None, _opt("GPUs the student trains on (default: --gpus).")] = None,
    cost_per_gpu_hour: Annotated[
        float | None, _opt("Price of a GPU-hour: adds cost lines (GPUs held for the wall time).")
    ] = None,
    source_bytes_per_second: Annotated[
        float,
        typer.Option(
            help="Source-file bytes per audio second (16 kHz FLAC ~16,000; 44.1 kHz "
            "~44,000); --manifest uses its file sizes."
        ),
    ] = float(FLAC_16K_BYTES_PER_SECOND),
    speech_item_seconds: Annotated[
        float, typer.Option(help="Mean speech item, for counts without --manifest.")
    ] = SPEECH_ITEM_SECONDS,
    file_seconds: Annotated[
        float | None,
        _opt(
            "Mean source file length, for files listed without --manifest (default: one "
            "item per file)."
        ),
    ] = None,
    assume_mfu: Annotated[
        float | None,
        _opt(
            "Derive GPU rates that are not measured from FLOPs at this MFU (e.g. 0.4; SPEC "
            "section 6's arithmetic, labelled as such)."
        ),
    ] = None,
    peak_tflops: Annotated[
        float | None, _opt("Peak TFLOP/s for --assume-mfu (default: known by device name).")
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the plan as JSON instead of a table.")
    ] = False,
    s3_endpoint: EndpointOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Predict a run: tokenize GPU-hours and wall time, decode cores, bytes read, moved and
    written, object counts, student training time and cost.

    Rates come from the shipped rates files (each figure names its device), --rates files,
    or options (--wavlm-rate ...); options win. The plan says which figure limits the run.
    """
    from spear.errors import SpearError
    from spear.plan import PAPER_AUDIO_FRACTION, RunSpec, manifest_facts, plan_run
    from spear.rates import RateChoice, load_rates, resolve_rates, shipped_rates

    cfg = resolve(config, set_, **{"storage.endpoint_url": s3_endpoint})
    tok = cfg.tokenize
    facts = None
    if manifest is not None:
        if hours is not None:
            raise SpearError("give --hours or --manifest, not both")
        from spear.formats.manifest import read_manifest

        cols = ["item_id", "url", "domain", "duration", "file_duration", "file_size"]
        table = read_manifest(manifest, cfg.storage.resolved(), cols)
        facts = manifest_facts(
            table, items_per_shard=tok.items_per_shard, max_shard_hours=tok.max_shard_hours
        )
        hours = facts.hours
        if audio_fraction is None:
            audio_fraction = facts.audio_hours / facts.hours
    if hours is None:
        raise SpearError("give --hours (audio hours in the run) or --manifest")
    spec = RunSpec(
        hours=hours,
        gpus=gpus,
        cpus=cpus,
        audio_fraction=PAPER_AUDIO_FRACTION if audio_fraction is None else audio_fraction,
        dasheng=not no_dasheng,
        epochs=epochs,
        train_gpus=train_gpus,
        cost_per_gpu_hour=cost_per_gpu_hour,
        source_bytes_per_second=source_bytes_per_second,
        speech_item_seconds=speech_item_seconds,
        file_seconds=file_seconds,
        items_per_shard=tok.items_per_shard,
        max_shard_hours=tok.max_shard_hours,
        manifest=facts,
    )
    choice = RateChoice(
        device=device,
        cpu_device=cpu_device,
        dasheng=spec.dasheng,
        student=None if student == "none" else student,
        assume_mfu=assume_mfu,
        peak_tflops=peak_tflops,
    )
    stored = load_rates(list(rates)) if rates else shipped_rates()
    given = {
        "wavlm": wavlm_rate,
        "dasheng": dasheng_rate,
        "mvq.wavlm": mvq_wavlm_rate,
        "mvq.dasheng": mvq_dasheng_rate,
        "decode": decode_rate,
        "token_bytes": token_bytes,
        "student": student_rate,
    }
    result = plan_run(spec, resolve_rates(stored, given, choice))
    if json_out:
        typer.echo(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        typer.echo(result.table())
