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
        f"  manifest    {res.manifest.out}/manifest  (quarantine: {res.manifest.out}/quarantine)"
    )
    for prefix, e in res.embed.items():
        typer.echo(f"  embeddings  {e.out}/embeddings  ({prefix})")
    for prefix, q in res.quantizers.items():
        typer.echo(f"  quantizer   {q}  ({prefix})")
    typer.echo(f"  tokens      {res.tokens}/tokens  (index: {res.tokens}/index.parquet)")
    typer.echo(f"  report      {res.report}")
    if res.problems:
        for p in res.problems:
            typer.echo(f"  invalid: {p}", err=True)
        raise typer.Exit(1)
    typer.echo(
        f"  validate    {res.tokens}: valid ({res.tokenize.shards} shards, {res.tokenize.ok} items)"
    )
