"""``spear demo``: the main job end to end on a generated corpus."""

from __future__ import annotations

from typing import Annotated

import typer

from spear.cli.common import AddressOpt, ConfigOpt, SetOpt, resolve


def demo(
    out: Annotated[str, typer.Option("--out", "-o", help="Where the demo writes.")] = "demo-out",
    address: AddressOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Generate a small corpus (good and bad files) and run every stage on it, locally."""
    from spear.pipeline.demo import run_demo

    cfg = resolve(config, set_, **{"ray.address": address})
    res = run_demo(out, cfg)
    typer.echo(f"demo done: corpus {res.corpus}")
    typer.echo(
        f"  manifest   {res.manifest.out}/manifest  (quarantine: {res.manifest.out}/quarantine)"
    )
    typer.echo(f"  decoded    {res.decode.out}/audio  (quarantine: {res.decode.out}/quarantine)")
    typer.echo(f"  embeddings {res.embed.out}/embeddings")
    typer.echo(f"  quantizer  {res.quantizer}")
