"""``spear tokenize``: manifest -> teachers + MVQ codes -> token shards (the main job)."""

from __future__ import annotations

from typing import Annotated

import typer

from spear.cli.common import (
    AddressOpt,
    ConfigOpt,
    DashengCheckpointOpt,
    DashengQuantizerOpt,
    EndpointOpt,
    ManifestOpt,
    OutOpt,
    RandomTeachersOpt,
    SetOpt,
    WavlmCheckpointOpt,
    WavlmQuantizerOpt,
    echo,
    require_urls,
    resolve,
)


def tokenize(
    manifest: ManifestOpt = "",
    out: OutOpt = "",
    wavlm_quantizer: WavlmQuantizerOpt = None,
    dasheng_quantizer: DashengQuantizerOpt = None,
    wavlm: Annotated[
        str | None, typer.Option(help="WavLM registry name (teachers.wavlm.name).")
    ] = None,
    dasheng: Annotated[
        str | None, typer.Option(help="Dasheng registry name (teachers.dasheng.name).")
    ] = None,
    wavlm_checkpoint: WavlmCheckpointOpt = None,
    dasheng_checkpoint: DashengCheckpointOpt = None,
    items_per_shard: Annotated[
        int | None, typer.Option(help="Items per token shard (the resume unit).")
    ] = None,
    refine_rounds: Annotated[
        int | None, typer.Option(help="MVQ refinement rounds at encode time (0..5).")
    ] = None,
    random_teachers: RandomTeachersOpt = None,
    s3_endpoint: EndpointOpt = None,
    address: AddressOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Tokenize every manifest item: WavLM codes on speech and audio items, Dasheng codes on
    audio items (configurable), written as token shards with an index and a run report.

    Re-running with the same --out finishes what is missing; other teachers or quantisers
    there are refused.
    """
    from spear.pipeline.tokenize import run_tokenize
    from spear.storage import check_url

    require_urls(manifest=manifest, out=out)
    cfg = resolve(
        config,
        set_,
        **{
            "tokenize.wavlm.quantizer": wavlm_quantizer,
            "tokenize.dasheng.quantizer": dasheng_quantizer,
            "tokenize.items_per_shard": items_per_shard,
            "teachers.wavlm.name": wavlm,
            "teachers.dasheng.name": dasheng,
            "teachers.wavlm.checkpoint": wavlm_checkpoint,
            "teachers.dasheng.checkpoint": dasheng_checkpoint,
            "quantizer.encode.refine_rounds": refine_rounds,
            "teachers.wavlm.allow_random": random_teachers,
            "teachers.dasheng.allow_random": random_teachers,
            "storage.endpoint_url": s3_endpoint,
            "ray.address": address,
        },
    )
    for q in (cfg.tokenize.wavlm.quantizer, cfg.tokenize.dasheng.quantizer):
        if q is not None:
            check_url(q)
    teachers = {"wavlm": cfg.teachers.wavlm, "dasheng": cfg.teachers.dasheng}
    summary = run_tokenize(
        manifest,
        out,
        teachers,
        cfg.tokenize,
        cfg.quantizer.encode,
        cfg.decode,
        cfg.storage.resolved(),
        cfg.ray,
    )
    echo(summary.line())
