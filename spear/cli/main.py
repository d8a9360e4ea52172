"""The ``spear`` command: one sub-command (group) per stage.

Commands only parse options into configs and call library functions. Known errors
(:class:`spear.errors.SpearError`, bad options) print one ``error:`` line and exit 2, also when
they arrive wrapped by Ray from a task or an actor's start-up; ``--debug`` or ``SPEAR_DEBUG=1``
shows the traceback. A Ctrl-C prints one line saying what the job had committed and that the
same command resumes (:mod:`spear.cli.interrupt`), exit 130. Credentials are masked in that
line and in every log record (:mod:`spear.credentials`).

The ``spear`` console script is :func:`entry`: it runs :func:`main`, then ends the process
itself (:func:`exit_process`), so that a native thread pool still winding down cannot turn the
documented status into an abort (see there). :func:`run` runs the CLI in-process (tests).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import re
import sys
import threading
from collections.abc import Iterator, Sequence

import typer

# typer >= 0.29 vendors click; its exceptions live here (plain `click` ones are not raised).
from typer import Abort, Exit
from typer._click.exceptions import UsageError

from spear import __version__
from spear.cli import config_cmd
from spear.credentials import install_log_redaction, redact_text
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

    install_log_redaction()
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
    from spear.cli import student

    app.add_typer(student.app, name="student")
    from spear.cli import plan, report, submit

    app.command("plan")(plan.plan)
    app.command("report")(report.report)
    app.command("probe")(importlib.import_module("spear.cli.probe").probe)
    # Options `submit` does not know go to the stage (checked against the stage's own).
    app.command(
        "submit",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        options_metavar="STAGE [STAGE OPTIONS] [OPTIONS]",
    )(submit.submit)


_register()


# The last line of a remote traceback that Ray puts in its error's text ("The actor died
# because of an error raised in its creation task ... spear.checkpoints.CheckpointError: ...").
_REMOTE = re.compile(r"^(spear(?:\.\w+)+)\.(\w+): (.+)$", re.M)


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        cause = getattr(e, "cause", None)
        todo += [cause if isinstance(cause, BaseException) else None, e.__cause__, e.__context__]


def user_error(err: BaseException) -> str | None:
    """The one-line message of the user error behind ``err``: a SpearError itself, or one
    that Ray wrapped (a task's error carries it as ``cause``; an actor that failed to start
    only in its text). None for anything else (a bug: its traceback is shown)."""
    for e in _chain(err):
        if isinstance(e, SpearError):
            cause = getattr(e, "cause", None)
            return str(cause if isinstance(cause, SpearError) else e)
    for module, name, message in reversed(_REMOTE.findall(str(err))):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and issubclass(cls, SpearError):
            return str(message)
    return None


def _one_line(message: str) -> str:
    return redact_text(" ".join(part.strip() for part in message.splitlines() if part.strip()))


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning known errors into one line on stderr."""
    from spear.cli import interrupt

    debug = "--debug" in (argv or sys.argv) or os.environ.get("SPEAR_DEBUG") == "1"
    install_log_redaction()
    interrupt.install()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        # Without standalone mode, click returns the code of a `raise typer.Exit(n)`.
        rc = app(args=argv, prog_name="spear", standalone_mode=False)
        if rc == 130:  # typer turns a KeyboardInterrupt into this status, without a word
            typer.echo(_one_line(interrupt.interrupted_line(args)), err=True)
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except Exit as err:
        sys.exit(err.exit_code)
    except Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except UsageError as err:
        cmd = err.ctx.command_path if err.ctx else "spear"
        typer.echo(f"error: {_one_line(err.format_message())} (see '{cmd} --help')", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo(_one_line(interrupt.interrupted_line(args)), err=True)
        sys.exit(130)
    except Exception as err:
        if interrupt.was_interrupted() and not debug:  # Ray's "actor died" after a Ctrl-C
            typer.echo(_one_line(interrupt.interrupted_line(args)), err=True)
            sys.exit(130)
        message = user_error(err)
        if message is None or debug:
            raise
        typer.echo(f"error: {_one_line(message)}", err=True)
        sys.exit(2)


def run(argv: Sequence[str]) -> int:
    """Run the CLI in this process and return its exit status (for tests and notebooks)."""
    try:
        main(list(argv))
    except SystemExit as err:
        return err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    return 0


def exit_process(code: int) -> None:
    """End the process with ``code`` after what would run at exit, without Python's final
    garbage collection and C++ static destructors.

    Why: native pools outlive the work they did. An Arrow worker thread that read a Parquet
    file through a Python file object can still be dropping its last buffer, a Python object,
    when the interpreter finalises; it then asks for the GIL, Python ends the thread with
    ``pthread_exit``, and the forced unwind through Arrow's C++ frames calls
    ``std::terminate`` ("terminate called without an active exception", exit 134 instead of
    the documented status; apache/arrow#34314). ``spear quantizer eval`` on embeddings of the
    wrong dimension did so in about half of its runs. So: join non-daemon threads and run the
    exit handlers (Ray's shutdown, logging's flush, executors' joins) exactly as finalisation
    would, flush the streams, and leave with ``os._exit``."""
    shutdown = getattr(threading, "_shutdown", None)  # what Py_FinalizeEx calls first
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        # A closed pipe or stream: nothing more can be said.
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def entry() -> None:
    """The ``spear`` console script: :func:`main`, then :func:`exit_process` with its status
    (a bug's traceback is printed and gives status 1, as Python would)."""
    code = 0
    try:
        main()
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
        if err.code is not None and not isinstance(err.code, int):
            print(err.code, file=sys.stderr)
    except BaseException:  # a bug (main shows it with its traceback) or a second Ctrl-C
        sys.excepthook(*sys.exc_info())
        code = 1
    exit_process(code)


if __name__ == "__main__":
    entry()
