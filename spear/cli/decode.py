"""``spear decode``: a validation pass over a manifest (quarantine + report; 16 kHz audio parts
that no job reads, see :mod:`spear.pipeline.decode`)."""

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
    echo,
    require_urls,
    resolve,
)


def decode(
    manifest: ManifestOpt = "",
    out: OutOpt = "",
    resampler: Annotated[
        str | None, typer.Option(help="Resampler: soxr or torchaudio (see benchmarks/decode.py).")
    ] = None,
    min_seconds: Annotated[
        float | None, typer.Option(help="Quarantine decoded items shorter than this (seconds).")
    ] = None,
    check_only: Annotated[
        bool,
        typer.Option(help="Decode everything but store no audio parts (item ids only)."),
    ] = False,
    s3_endpoint: EndpointOpt = None,
    address: AddressOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Validate a manifest: decode every item (range reads, downmix, resample to 16 kHz, int16).

    Items that fail become quarantine rows with their reason (the ones tokenize, embed and
    features would meet); the job goes on and reports rates. The 16 kHz audio parts it writes
    are for a person or an outside tool: no spear job reads them. Re-running with the same
    --out resumes.
    """
    from spear.pipeline.decode import run_decode

    require_urls(manifest=manifest, out=out)
    cfg = resolve(
        config,
        set_,
        **{
            "decode.resampler": resampler,
            "decode.min_seconds": min_seconds,
            "storage.endpoint_url": s3_endpoint,
            "ray.address": address,
        },
    )
    summary = run_decode(
        manifest, out, cfg.decode, cfg.storage.resolved(), cfg.ray, check_only=check_only
    )
    echo(summary.line())
