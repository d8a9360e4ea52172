"""``spear train`` (the student on Ray Train) and ``spear features`` (its frame output)."""

from __future__ import annotations

from typing import Annotated

import typer

from spear.cli.common import (
    AddressOpt,
    ConfigOpt,
    EndpointOpt,
    ManifestOpt,
    OutOpt,
    SetOpt,
    ShardsOpt,
    StudentOpt,
    echo,
    require_urls,
    resolve,
    url_option,
)


def train(
    shards: ShardsOpt = "",
    out: OutOpt = "",
    preset: Annotated[
        str | None, typer.Option(help="Encoder preset: tiny, base, large or xlarge.")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Training workers (one per GPU; DDP).")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps.")] = None,
    batch_seconds: Annotated[
        float | None, typer.Option(help="Audio seconds per batch per worker.")
    ] = None,
    optimizer: Annotated[
        str | None, typer.Option(help="scaled_adam (the paper's, default) or adamw.")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Base learning rate.")] = None,
    precision: Annotated[
        str | None, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32.")
    ] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Steps between checkpoints.")] = None,
    gpu: Annotated[
        bool | None,
        typer.Option("--gpu/--no-gpu", help="Train on GPUs (default: when the cluster has any)."),
    ] = None,
    init_from: Annotated[
        str | None,
        url_option(
            "--init-from",
            help="Start the encoder from a student.pt or a SPEAR release folder (new heads; "
            "ignored on resume).",
        ),
    ] = None,
    probe_every: Annotated[
        int | None, typer.Option(help="Steps between linear probes of the layers (0: none).")
    ] = None,
    probe_labels: Annotated[
        str | None,
        url_option("--probe-labels", help="The probes' labelled clips (as spear probe --labels)."),
    ] = None,
    probe_teacher: Annotated[
        str | None, typer.Option(help="A teacher probed once: the report's reference line.")
    ] = None,
    s3_endpoint: EndpointOpt = None,
    address: AddressOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Pre-train the student on token shards with Ray Train (DDP); re-running the same
    command resumes from the latest checkpoint under --out (on the same tokens only). Shows a
    live progress line; TensorBoard logs go to OUT/tensorboard."""
    from spear.pipeline.train import run_train

    require_urls(shards=shards, out=out)
    cfg = resolve(
        config,
        set_,
        **{
            "train.student.preset": preset,
            "train.num_workers": workers,
            "train.max_steps": max_steps,
            "train.data.batch_seconds": batch_seconds,
            "train.optim.name": optimizer,
            "train.optim.lr": lr,
            "train.precision": precision,
            "train.checkpoint_every": checkpoint_every,
            "train.use_gpu": gpu,
            "train.init_from": init_from,
            "train.probe_every": probe_every,
            "train.probe_labels": probe_labels,
            "train.probe_teacher": probe_teacher,
            "storage.endpoint_url": s3_endpoint,
            "ray.address": address,
        },
    )
    res = run_train(shards, out, cfg.train, cfg.storage.resolved(), cfg.ray, cfg.decode)
    loss = res.metrics.get("loss")
    echo(
        f"train: {res.steps} steps"
        + (f", loss {loss:.4f}" if isinstance(loss, float) else "")
        + f"; student {res.student_url}"
        + (f", averaged {res.average_url}" if res.average_url else "")
        + f"; checkpoint {res.checkpoint}"
    )


def features(
    checkpoint: StudentOpt = "",
    manifest: ManifestOpt = "",
    out: OutOpt = "",
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="parquet (parts) or numpy (one .npy per item); features.format.",
            show_default=False,
        ),
    ] = None,
    items_per_part: Annotated[
        int | None, typer.Option(help="Items per output part, the resume unit (features).")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="auto, cuda or cpu (features.device).", show_default=False)
    ] = None,
    layers: Annotated[
        str | None,
        typer.Option(
            help="all or N,M (0-based encoder layers): write those layers' states, "
            "(frames, layers, dim) per item, instead of the output (features.layers).",
            show_default=False,
        ),
    ] = None,
    s3_endpoint: EndpointOpt = None,
    address: AddressOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Write a trained student's 50 Hz frame features for every manifest item."""
    from spear.pipeline.features import run_features

    require_urls(checkpoint=checkpoint, manifest=manifest, out=out)
    cfg = resolve(
        config,
        set_,
        **{
            "features.format": fmt,
            "features.items_per_part": items_per_part,
            "features.device": device,
            "features.layers": layers,
            "storage.endpoint_url": s3_endpoint,
            "ray.address": address,
        },
    )
    s = run_features(
        manifest, checkpoint, out, cfg.features, cfg.decode, cfg.storage.resolved(), cfg.ray
    )
    echo(s.line())
