"""``spear train`` (the student on Ray Train) and ``spear features`` (its frame output)."""

from __future__ import annotations

from typing import Annotated

import typer

from spear.cli.common import AddressOpt, ConfigOpt, EndpointOpt, SetOpt, require_urls, resolve
from spear.errors import SpearError


def train(
    shards: Annotated[
        str, typer.Option("--shards", help="Token shards: a `spear tokenize` --out URL.")
    ] = "",
    out: Annotated[
        str, typer.Option("--out", "-o", help="Output URL: checkpoints, metrics, student.pt.")
    ] = "",
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
    s3_endpoint: EndpointOpt = None,
    address: AddressOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Pre-train the student on token shards with Ray Train (DDP); re-running the same
    command resumes from the latest checkpoint under --out."""
    from spear.student.train_job import run_train

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
            "storage.endpoint_url": s3_endpoint,
            "ray.address": address,
        },
    )
    res = run_train(shards, out, cfg.train, cfg.storage.resolved(), cfg.ray)
    loss = res.metrics.get("loss")
    typer.echo(
        f"train: {res.steps} steps"
        + (f", loss {loss:.4f}" if isinstance(loss, float) else "")
        + f"; student {res.student_url}; checkpoint {res.checkpoint}"
    )


def features(
    checkpoint: Annotated[
        str, typer.Option("--checkpoint", help="A student.pt (or a training checkpoint folder).")
    ] = "",
    manifest: Annotated[
        str, typer.Option("--manifest", "-m", help="Manifest URL (a `spear manifest` --out).")
    ] = "",
    out: Annotated[str, typer.Option("--out", "-o", help="Output URL.")] = "",
    fmt: Annotated[
        str, typer.Option("--format", help="parquet (parts) or numpy (one .npy per item).")
    ] = "parquet",
    items_per_part: Annotated[
        int, typer.Option(help="Items per output part (the resume unit).")
    ] = 256,
    device: Annotated[str, typer.Option(help="auto, cuda or cpu.")] = "auto",
    s3_endpoint: EndpointOpt = None,
    address: AddressOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Write a trained student's 50 Hz frame features for every manifest item."""
    from spear.student.features import run_features

    require_urls(checkpoint=checkpoint, manifest=manifest, out=out)
    if device not in ("auto", "cuda", "cpu"):
        raise SpearError(f"--device must be auto, cuda or cpu, got {device!r}")
    cfg = resolve(config, set_, **{"storage.endpoint_url": s3_endpoint, "ray.address": address})
    s = run_features(manifest, checkpoint, out, cfg.storage.resolved(), cfg.ray,
                     decode=cfg.decode, fmt=fmt, items_per_part=items_per_part,  # type: ignore[arg-type]
                     device=device)  # fmt: skip
    typer.echo(s.line())
