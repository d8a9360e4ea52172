"""``spear quantizer``: train and evaluate MVQ quantisers."""

from __future__ import annotations

from typing import Annotated

import typer

from spear.cli.common import (
    ConfigOpt,
    EmbeddingsOpt,
    EndpointOpt,
    JsonOutOpt,
    OutOpt,
    QuantizerOpt,
    SetOpt,
    echo,
    resolve,
)

app = typer.Typer(help="Train and evaluate MVQ quantisers.", no_args_is_help=True)


@app.command("train")
def train(
    embeddings: EmbeddingsOpt,
    out: OutOpt,
    codebooks: Annotated[
        int | None, typer.Option(help="Codebooks C (16 WavLM, 8 Dasheng).")
    ] = None,
    phase_steps: Annotated[int | None, typer.Option(help="Steps per phase.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Frames per minibatch.")] = None,
    normalise: Annotated[
        bool | None, typer.Option("--normalise/--no-normalise", help="Per-dim mean/std.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or auto.")] = None,
    teacher: Annotated[str | None, typer.Option(help="Teacher name to record.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    s3_endpoint: EndpointOpt = None,
) -> None:
    """Train a quantiser on embedding shards; resumes from OUT's checkpoint, and leaves a
    finished OUT as it is."""
    from spear.pipeline.quantize import train_quantizer

    cfg = resolve(
        config,
        set_,
        **{
            "storage.endpoint_url": s3_endpoint,
            "quantizer.train.num_codebooks": codebooks,
            "quantizer.train.phase_steps": phase_steps,
            "quantizer.train.batch_size": batch_size,
            "quantizer.train.normalise": normalise,
            "quantizer.train.device": device,
            "quantizer.train.teacher": teacher,
        },
    )
    train_quantizer(cfg.quantizer, embeddings, out, cfg.storage.resolved(), report=echo)


@app.command("eval")
def eval_(
    quantizer: QuantizerOpt,
    embeddings: EmbeddingsOpt,
    json_out: JsonOutOpt = None,
    rounds: Annotated[int | None, typer.Option(help="Refinement rounds 0..5.")] = None,
    max_frames: Annotated[int, typer.Option(help="Frames to use when not held-out.")] = 10_000,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    s3_endpoint: EndpointOpt = None,
) -> None:
    """RRL and codebook usage on the quantiser's held-out frames (or the first MAX_FRAMES)."""
    from spear.pipeline.quantize import evaluate_quantizer

    cfg = resolve(
        config,
        set_,
        **{"storage.endpoint_url": s3_endpoint, "quantizer.encode.refine_rounds": rounds},
    )
    report = evaluate_quantizer(
        cfg.quantizer,
        quantizer,
        embeddings,
        cfg.storage.resolved(),
        max_frames=max_frames,
        json_out=json_out,
    )
    echo(report.table())
