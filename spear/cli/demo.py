"""``spear demo``: the main job end to end on a generated corpus."""

from __future__ import annotations

from spear.cli.common import AddressOpt, ConfigOpt, OutOpt, SetOpt, echo, resolve


def demo(
    out: OutOpt = "demo-out",
    address: AddressOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Generate a small corpus (good and bad files) and run every stage on it, locally."""
    from spear.pipeline.demo import run_demo

    cfg = resolve(config, set_, **{"ray.address": address})
    res = run_demo(out, cfg)
    echo(f"demo done: corpus {res.corpus}")
    echo(f"  manifest    {res.manifest.out}/manifest  (quarantine: {res.manifest.out}/quarantine)")
    for prefix, e in res.embed.items():
        echo(f"  embeddings  {e.out}/embeddings  ({prefix})")
    for prefix, q in res.quantizers.items():
        echo(f"  quantizer   {q}  ({prefix})")
    # The run folder is what the readers take (spear train --shards, spear shards, lhotse).
    echo(f"  tokens      {res.tokens}  (shards in tokens/, index.parquet)")
    echo(f"  report      {res.report}")
    if res.problems:
        for p in res.problems:
            echo(f"  invalid: {p}", err=True)
        raise SystemExit(1)
    echo(
        f"  validate    {res.tokens}: valid ({res.tokenize.shards} shards, {res.tokenize.ok} items)"
    )
