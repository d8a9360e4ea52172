"""``spear decode`` (being implemented)."""

from __future__ import annotations

import typer

from spear.errors import SpearError


def decode(manifest: str = typer.Option(..., "--manifest", help="Manifest URL.")) -> None:
    """Decode every manifest item to 16 kHz mono int16."""
    raise SpearError("spear decode is not implemented yet")
