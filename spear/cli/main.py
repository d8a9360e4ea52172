"""The ``spear`` command: one sub-command (group) per stage.

Commands only parse options into configs and call library functions. Known errors
(:class:`spear.errors.SpearError`, bad options) print one line; ``--debug`` or ``SPEAR_DEBUG=1``
shows the traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import typer

# typer >= 0.29 vendors click; its exceptions live here (plain `click` ones are not raised).
from typer import Abort, Exit
from typer._click.exceptions import UsageError

from spear import __version__
from spear.cli import config_cmd
from spear.errors import SpearError

app = typer.Typer(
    name="spear",
    help="SPEAR speech + audio pre-training: manifest, decode, teachers, MVQ tokens, student.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=False,
)
app.add_typer(config_cmd.app, name="config")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"spear {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Also show spear's debug lines and Ray's INFO output."
    ),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="Only warnings, errors and each command's result line."
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    if debug:
        os.environ["SPEAR_DEBUG"] = "1"
    from spear.console import configure

    configure("verbose" if verbose else "quiet" if quiet else "normal")


def _register() -> None:
    # Stage commands import their stage modules lazily, so `spear --help` stays fast.
    from spear.cli import decode, demo, embed, manifest

    app.command("manifest")(manifest.manifest)
    app.command("decode")(decode.decode)
    app.command("embed")(embed.embed)
    from spear.cli import tokenize

    app.command("tokenize")(tokenize.tokenize)
    from spear.cli import train

    app.command("train")(train.train)
    app.command("features")(train.features)
    app.command("demo")(demo.demo)
    from spear.cli import quantizer

    app.add_typer(quantizer.app, name="quantizer")
    from spear.cli import shards

    app.add_typer(shards.app, name="shards")
    from spear.cli import plan, report, submit

    app.command("plan")(plan.plan)
    app.command("report")(report.report)
    # Options `submit` does not know go to the stage (checked against the stage's own).
    app.command(
        "submit",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        options_metavar="STAGE [STAGE OPTIONS] [OPTIONS]",
    )(submit.submit)


_register()


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning known errors into one line on stderr."""
    debug = "--debug" in (argv or sys.argv) or os.environ.get("SPEAR_DEBUG") == "1"
    try:
        # Without standalone mode, click returns the code of a `raise typer.Exit(n)`.
        rc = app(args=argv, standalone_mode=False)
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except Exit as err:
        sys.exit(err.exit_code)
    except Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except UsageError as err:
        cmd = err.ctx.command_path if err.ctx else "spear"
        typer.echo(f"error: {err.format_message()} (see '{cmd} --help')", err=True)
        sys.exit(2)
    except SpearError as err:
        if debug:
            raise
        # Raised inside a Ray task, the error arrives wrapped with the remote traceback.
        cause = getattr(err, "cause", None)
        typer.echo(f"error: {cause if isinstance(cause, SpearError) else err}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


def run(argv: Sequence[str]) -> int:
    """Run the CLI in this process and return its exit status (for tests and notebooks)."""
    try:
        main(list(argv))
    except SystemExit as err:
        return err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    return 0


if __name__ == "__main__":
    main()
