"""``spear embed``: one teacher over a manifest (or a sample) -> float16 embedding shards."""

from __future__ import annotations

from typing import Annotated

import typer

from spear.cli.common import (
    AddressOpt,
    CheckpointOpt,
    ConfigOpt,
    EndpointOpt,
    ManifestOpt,
    OutOpt,
    RandomTeachersOpt,
    SetOpt,
    echo,
    require_urls,
    resolve,
)
from spear.errors import SpearError


def embed(
    manifest: ManifestOpt = "",
    out: OutOpt = "",
    teacher: Annotated[
        str,
        typer.Option(
            help="Which configured teacher runs: wavlm (teachers.wavlm) or dasheng "
            "(teachers.dasheng)."
        ),
    ] = "wavlm",
    name: Annotated[
        str | None,
        typer.Option(help="Registry name of the model, e.g. wavlm, wavlm-tiny, dasheng-base."),
    ] = None,
    checkpoint: CheckpointOpt = None,
    layer: Annotated[int | None, typer.Option(help="WavLM layer (1-based; default 21).")] = None,
    hours: Annotated[
        float | None, typer.Option(help="Embed a seeded sample of about this many hours.")
    ] = None,
    fraction: Annotated[
        float | None, typer.Option(help="Embed a seeded fraction of the items.")
    ] = None,
    domain: Annotated[
        str | None,
        typer.Option(
            help="Items of this domain: auto (speech for WavLM, audio for "
            "Dasheng), speech, audio or all (embed.domain).",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the sample (embed.seed).")] = None,
    items_per_shard: Annotated[
        int | None, typer.Option(help="Items per output shard, the resume unit (embed).")
    ] = None,
    random_teachers: RandomTeachersOpt = None,
    s3_endpoint: EndpointOpt = None,
    address: AddressOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Run one teacher over a manifest and write float16 embedding shards (quantiser data).

    Re-running with the same --out resumes; another teacher or sample there is refused.
    """
    from spear.pipeline.embed import run_embed

    require_urls(manifest=manifest, out=out)
    if teacher not in ("wavlm", "dasheng"):
        raise SpearError(f"--teacher must be wavlm or dasheng, got {teacher!r}")
    section = f"teachers.{teacher}"
    cfg = resolve(
        config,
        set_,
        **{
            f"{section}.name": name,
            f"{section}.checkpoint": checkpoint,
            f"{section}.layer": layer,
            "embed.hours": hours,
            "embed.fraction": fraction,
            "embed.domain": domain,
            "embed.seed": seed,
            "embed.items_per_shard": items_per_shard,
            "teachers.wavlm.allow_random": random_teachers,
            "teachers.dasheng.allow_random": random_teachers,
            "storage.endpoint_url": s3_endpoint,
            "ray.address": address,
        },
    )
    tcfg = getattr(cfg.teachers, teacher)
    summary = run_embed(manifest, out, tcfg, cfg.embed, cfg.decode, cfg.storage.resolved(), cfg.ray)
    echo(summary.line())
