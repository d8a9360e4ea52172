"""``spear decode``: decode a manifest to 16 kHz mono int16 audio shards (and quarantine)."""

from __future__ import annotations

from typing import Annotated

import typer

from spear.cli.common import AddressOpt, ConfigOpt, EndpointOpt, SetOpt, require_urls, resolve


def decode(
    manifest: Annotated[
        str, typer.Option("--manifest", "-m", help="Manifest URL (a `spear manifest` --out).")
    ] = "",
    out: Annotated[str, typer.Option("--out", "-o", help="Output URL (any fsspec URL).")] = "",
    resampler: Annotated[
        str | None, typer.Option(help="Resampler: soxr or torchaudio (see benchmarks/decode.py).")
    ] = None,
    min_seconds: Annotated[
        float | None, typer.Option(help="Quarantine decoded items shorter than this (seconds).")
    ] = None,
    check_only: Annotated[
        bool,
        typer.Option(help="Decode everything but store no audio: a validation pass."),
    ] = False,
    s3_endpoint: EndpointOpt = None,
    address: AddressOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Decode every manifest item (range reads, downmix, resample to 16 kHz, int16).

    Items that fail become quarantine rows with their reason; the job goes on. Re-running with
    the same --out resumes.
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
    typer.echo(summary.line())
