"""``spear config``: look at the resolved configuration."""

from __future__ import annotations

import typer

from spear.cli.common import ConfigOpt, SetOpt, resolve
from spear.config import dump_yaml

app = typer.Typer(help="Inspect configuration.", no_args_is_help=True)


@app.command("show")
def show(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved config (defaults <- --config file <- --set overrides) as YAML;
    credentials (URL user info, signatures) are shown as ***."""
    typer.echo(dump_yaml(resolve(config, set_)), nl=False)
