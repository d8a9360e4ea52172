"""Option aliases shared by every command, and the one way commands resolve their config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from spear.config import SpearConfig, load_config

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
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
        help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL[_S3]).",
        show_default=False,
    ),
]


def resolve(config: Path | None, sets: list[str] | None, **overrides: Any) -> SpearConfig:
    """Defaults <- config file <- --set <- the command's own options (dotted keys)."""
    return load_config(config, overrides=overrides, sets=sets)
