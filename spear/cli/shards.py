"""``spear shards``: inspect, validate, summarise and export the token shards of a tokenize run."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from spear.cli.common import (
    ConfigOpt,
    EndpointOpt,
    JsonOutOpt,
    LocalOutOpt,
    RunManifestOpt,
    SetOpt,
    echo,
    resolve,
)
from spear.storage import StorageConfig

app = typer.Typer(
    help="Inspect, validate, summarise and export token shards (a `spear tokenize` --out).",
    no_args_is_help=True,
)

UrlArg = Annotated[
    str, typer.Argument(help="A tokenize output URL (its index.parquet), or one shard file.")
]


def _storage(config: Path | None, set_: list[str] | None, s3_endpoint: str | None) -> StorageConfig:
    cfg = resolve(config, set_, **{"storage.endpoint_url": s3_endpoint})
    return cfg.storage.resolved()


def _write_json(url: str, obj: object, storage: StorageConfig) -> None:
    from spear.storage import write_atomic

    write_atomic(url, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), storage)


@app.command("inspect")
def inspect_(
    url: UrlArg,
    json_out: JsonOutOpt = None,
    s3_endpoint: EndpointOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Schema, version, teachers and sizes (shards, rows, hours, bytes per audio second)."""
    from spear.shards import inspect

    storage = _storage(config, set_, s3_endpoint)
    info = inspect(url, storage)
    echo(info.text())
    if json_out:
        _write_json(json_out, info.to_dict(), storage)


@app.command("validate")
def validate(
    url: Annotated[
        str, typer.Argument(help="A tokenize output URL (the folder with index.parquet).")
    ],
    s3_endpoint: EndpointOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Check every shard against the index (bytes, sha256, rows) and the contract (schema,
    frame counts, nulls, code ranges, one quantiser per teacher, no item twice).

    Exit status 1, with one line per problem, when the output is not valid."""
    from spear.shards import list_shards, validate

    storage = _storage(config, set_, s3_endpoint)
    problems = validate(url, storage)
    if problems:
        echo(f"invalid: {len(problems)} problems", err=True)
        for p in problems:
            echo(f"  {p}", err=True)
        # SystemExit, not typer.Exit: main() runs the app with standalone_mode=False, where
        # click turns Exit into a return value that main() does not pass on.
        sys.exit(1)
    entries = list_shards(url, storage)
    echo(f"valid: {len(entries)} shards, {sum(e.rows for e in entries)} rows")


@app.command("stats")
def stats(
    url: Annotated[
        str, typer.Argument(help="A tokenize output URL (the folder with index.parquet).")
    ],
    json_out: JsonOutOpt = None,
    s3_endpoint: EndpointOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Per teacher and codebook: entropy, perplexity and dead codes; hours by domain and source.
    --json adds the full usage histograms."""
    from spear.shards import stats as compute

    storage = _storage(config, set_, s3_endpoint)
    result = compute(url, storage)
    echo(result.table())
    if json_out:
        _write_json(json_out, result.to_dict(), storage)


@app.command("export-lhotse")
def export_lhotse(
    url: Annotated[
        str, typer.Argument(help="A tokenize output URL (the folder with index.parquet).")
    ],
    out: LocalOutOpt,
    shar: Annotated[
        bool,
        typer.Option(
            "--shar",
            help="Write Lhotse Shar (tar shards with each segment's 16 kHz audio) instead of "
            "cuts + HDF5 that reference the original files.",
        ),
    ] = False,
    audio_format: Annotated[
        str, typer.Option(help="Audio encoding inside Shar: flac or wav (with --shar).")
    ] = "flac",
    manifest: RunManifestOpt = None,
    shard_size: Annotated[int, typer.Option(help="Cuts per Shar shard (with --shar).")] = 1000,
    teacher: Annotated[
        list[str] | None,
        typer.Option(
            "--teacher",
            help="Export only this teacher's codes (repeatable; default: all).",
            show_default=False,
        ),
    ] = None,
    s3_endpoint: EndpointOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Lhotse cuts for icefall: one MonoCut per item with `{teacher}_codebook_indexes` (uint8
    (T, C); frame shift 0.02 s WavLM, 0.04 s Dasheng), per shard and all in OUT/cuts.jsonl.gz
    (printed). Needs `pip install 'spear[lhotse]'`."""
    from spear.lhotse_export import export_lhotse as run

    storage = _storage(config, set_, s3_endpoint)
    summary = run(
        url,
        out,
        storage,
        shar=shar,
        manifest=manifest,
        shard_size=shard_size,
        audio_format=audio_format,
        teachers=teacher,
    )
    echo(summary.text())
