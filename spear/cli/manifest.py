"""``spear manifest`` (being implemented)."""

from __future__ import annotations

import typer

from spear.errors import SpearError


def manifest(src: list[str] = typer.Argument(..., help="Sources.")) -> None:
    """Build a manifest."""
    raise SpearError("spear manifest is not implemented yet")
