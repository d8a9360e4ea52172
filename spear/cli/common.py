"""Option aliases shared by every command, and the one way commands resolve their config.

An option whose value is a storage location (a URL or a path, read or written by the job) is
declared through :func:`url_option`, which records its flag names in :data:`URL_OPTIONS`:
``spear submit`` takes its list of URL options from there, so a new command's URL option is
covered by declaring it, not by remembering a second list.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from spear.config import SpearConfig, load_config

URL_OPTIONS: set[str] = set()
"""Flag names (``--out``, ``-o``, ...) of every option whose value is a storage URL or path."""
FILE_OPTIONS = ("--config", "-c")
"""Flag names of the option whose value is a local file that ``spear submit`` ships."""


def url_option(*names: str, help: str, **kwargs: Any) -> Any:
    """``typer.Option(*names, ...)`` for a storage URL, registered in :data:`URL_OPTIONS`."""
    URL_OPTIONS.update(names)
    return typer.Option(*names, help=help, metavar="URL", **kwargs)


# -- config and cluster ------------------------------------------------------------------------

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        *FILE_OPTIONS,
        help="YAML config file; options given here override it.",
        show_default=False,
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override any config key: --set section.key=value (repeatable).",
        show_default=False,
    ),
]
AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        envvar="RAY_ADDRESS",
        help="Ray cluster address; default: start a local Ray with this machine's cores.",
        show_default=False,
    ),
]
EndpointOpt = Annotated[
    str | None,
    typer.Option(
        "--s3-endpoint",
        help="S3-compatible endpoint address (default: AWS_ENDPOINT_URL[_S3]).",
        show_default=False,
    ),
]

# -- inputs and outputs (storage URLs) ---------------------------------------------------------

ManifestOpt = Annotated[
    str, url_option("--manifest", "-m", help="Manifest URL (a `spear manifest` --out).")
]
OutOpt = Annotated[
    str,
    url_option(
        "--out", "-o", help="Output URL (any fsspec URL); re-running with the same --out resumes."
    ),
]
ShardsOpt = Annotated[
    str, url_option("--shards", help="Token shards: a `spear tokenize` --out URL.")
]
EmbeddingsOpt = Annotated[
    str,
    url_option(
        "--embeddings", help="Embedding shards (a `spear embed` --out, or a Parquet file) URL."
    ),
]
QuantizerOpt = Annotated[
    str,
    url_option("--quantizer", help="Quantiser URL: a `spear quantizer train` --out or its file."),
]
CheckpointOpt = Annotated[
    str | None,
    url_option(
        "--checkpoint",
        help="Teacher weights: path, fsspec URL or hub id (default: random init).",
        show_default=False,
    ),
]
StudentOpt = Annotated[
    str,
    url_option(
        "--checkpoint", help="A trained student: its student.pt or a training checkpoint URL."
    ),
]
WavlmQuantizerOpt = Annotated[
    str | None,
    url_option(
        "--wavlm-quantizer",
        help="WavLM quantiser URL (a `spear quantizer train` --out); tokenize.wavlm.",
        show_default=False,
    ),
]
DashengQuantizerOpt = Annotated[
    str | None,
    url_option(
        "--dasheng-quantizer",
        help="Dasheng quantiser URL (a `spear quantizer train` --out); tokenize.dasheng.",
        show_default=False,
    ),
]
WavlmCheckpointOpt = Annotated[
    str | None,
    url_option(
        "--wavlm-checkpoint",
        help="WavLM weights: path, fsspec URL or hub id.",
        show_default=False,
    ),
]
DashengCheckpointOpt = Annotated[
    str | None,
    url_option(
        "--dasheng-checkpoint",
        help="Dasheng weights: path, fsspec URL or hub id.",
        show_default=False,
    ),
]
RandomTeachersOpt = Annotated[
    bool | None,
    typer.Option(
        "--random-teachers",
        help="Allow teachers without a checkpoint to run with random weights (tests, "
        "benchmarks): teachers.*.allow_random. Without it such a teacher is an error.",
        show_default=False,
    ),
]
RunManifestOpt = Annotated[
    str | None,
    url_option(
        "--manifest",
        help="The run's `spear manifest` output URL: the audio files' sample rates and lengths "
        "(default: read each file's header; not needed with --shar).",
        show_default=False,
    ),
]
LocalOutOpt = Annotated[
    str, url_option("--out", "-o", help="Local folder (on the machine that runs it) to write to.")
]
ReportOutOpt = Annotated[
    str | None,
    url_option(
        "--out", "-o", help="Where the HTML goes (any fsspec URL); default RUN/report.html."
    ),
]
JsonOutOpt = Annotated[
    str | None,
    url_option("--json", help="Also write the result as JSON to this URL.", show_default=False),
]


def resolve(config: Path | None, sets: list[str] | None, **overrides: Any) -> SpearConfig:
    """Defaults <- config file <- --set <- the command's own options (dotted keys)."""
    return load_config(config, overrides=overrides, sets=sets)


def require_urls(**urls: str | None) -> None:
    """Fail with one line when an option is missing or not a URL spear can use: keys are the
    option names (``manifest`` for ``--manifest``), values what was given."""
    from spear.errors import SpearError
    from spear.storage import check_url

    missing = [f"--{k.replace('_', '-')}" for k, v in urls.items() if not v]
    if missing:
        raise SpearError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")
    for v in urls.values():
        check_url(str(v))


def echo(text: str, err: bool = False) -> None:
    """Print one result line, credentials masked (an option's URL may carry a signature)."""
    from spear.credentials import redact_text

    typer.echo(redact_text(text), err=err)
