"""``spear manifest``: list, probe and segment audio into a Parquet manifest."""

from __future__ import annotations

from typing import Annotated

import typer

from spear.cli.common import (
    AddressOpt,
    ConfigOpt,
    EndpointOpt,
    OutOpt,
    SetOpt,
    echo,
    require_urls,
    resolve,
)


def manifest(
    sources: Annotated[
        list[str] | None,
        typer.Argument(
            help="Audio sources: a directory/prefix URL, one file, or a list file (.txt/.lst, "
            "one URL per line, optionally DOMAIN<TAB>URL). Prefix DOMAIN= or DOMAIN:NAME= to "
            "set the domain (speech|audio) and label, e.g. audio:audioset=s3://b/audioset.",
            show_default=False,
        ),
    ] = None,
    out: OutOpt = "",
    domain: Annotated[
        str, typer.Option(help="Domain of sources given without DOMAIN= (speech|audio).")
    ] = "speech",
    speech_segment_seconds: Annotated[
        float | None,
        typer.Option(help="Cut speech files into equal segments of at most this many seconds."),
    ] = None,
    audio_window_seconds: Annotated[
        float | None, typer.Option(help="Cut audio files into windows of this many seconds.")
    ] = None,
    min_seconds: Annotated[
        float | None, typer.Option(help="Quarantine files shorter than this (seconds).")
    ] = None,
    files_per_task: Annotated[
        int | None, typer.Option(help="Files probed per Ray task (the resume granularity).")
    ] = None,
    s3_endpoint: EndpointOpt = None,
    address: AddressOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """List audio under SOURCES, read each file's header, cut items and write a Parquet manifest.

    Re-running with the same --out resumes: finished chunks are kept, the rest is probed.
    """
    from spear.pipeline.manifest import build_manifest
    from spear.stages.manifest import parse_source

    require_urls(out=out)
    cfg = resolve(
        config,
        set_,
        **{
            "manifest.speech_segment_seconds": speech_segment_seconds,
            "manifest.audio_window_seconds": audio_window_seconds,
            "manifest.min_seconds": min_seconds,
            "manifest.files_per_task": files_per_task,
            "storage.endpoint_url": s3_endpoint,
            "ray.address": address,
        },
    )
    srcs = list(cfg.manifest.sources) + [parse_source(s, domain) for s in sources or []]
    summary = build_manifest(srcs, out, cfg.manifest, cfg.storage.resolved(), cfg.ray)
    echo(summary.line())
