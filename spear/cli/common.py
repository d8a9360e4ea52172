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


def require_urls(**urls: str) -> None:
    """Fail with one line when an option is missing or not a URL spear can use: keys are the
    option names (``manifest`` for ``--manifest``), values what was given."""
    from spear.errors import SpearError
    from spear.storage import check_url

    missing = [f"--{k.replace('_', '-')}" for k, v in urls.items() if not v]
    if missing:
        raise SpearError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")
    for v in urls.values():
        check_url(v)
