"""``spear submit STAGE ...``: run a stage as a Ray job on a cluster, with the stage's own options.

Everything after STAGE that ``submit`` does not know itself goes to the stage unchanged, and is
checked against the stage's options here before anything is sent. Building, sending and
following the job is :mod:`spear.submit`.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from spear.errors import SpearError

# Commands that are not stages: they run where they are typed.
_NOT_STAGES = {"submit", "config", "plan", "report"}


def stage_command(args: list[str]) -> tuple[list[str], list[str]]:
    """Split ``args`` into the stage's command path (``["quantizer", "train"]``) and its options,
    checking every option against the stage's own (a typo fails here, not on the cluster)."""
    import typer.main
    from typer._click.exceptions import UsageError  # typer vendors click

    from spear.cli.main import app

    if not args:
        raise SpearError("name a stage: spear submit STAGE [options], e.g. spear submit tokenize")
    node: Any = typer.main.get_command(app)
    path: list[str] = []
    rest = list(args)
    while hasattr(node, "commands") and rest and not rest[0].startswith("-"):
        name = rest.pop(0)
        sub = node.commands.get(name)
        if sub is None or name in _NOT_STAGES:
            known = sorted(set(node.commands) - _NOT_STAGES)
            raise SpearError(f"no stage {' '.join([*path, name])!r}; stages: {', '.join(known)}")
        node, path = sub, [*path, name]
    if hasattr(node, "commands"):
        subs = ", ".join(sorted(node.commands))
        raise SpearError(f"{' '.join(path) or 'spear'} needs a sub-command: {subs}")
    try:
        node.make_context(" ".join(["spear", *path]), list(rest), resilient_parsing=False)
    except UsageError as err:
        raise SpearError(f"spear {' '.join(path)}: {err.format_message()}") from None
    return path, rest


def submit(
    ctx: typer.Context,
    address: Annotated[
        str,
        typer.Option(
            "--address",
            envvar="RAY_API_SERVER_ADDRESS",
            help="The cluster's job server (dashboard) address, e.g. http://HEAD:8265.",
            show_default=False,
        ),
    ] = "",
    working_dir: Annotated[
        str | None,
        typer.Option(
            help="Local folder shipped to the cluster as the job's working dir (config files, "
            "scripts). Default: none (a --config file is shipped on its own); the cluster "
            "image's spear runs.",
            show_default=False,
        ),
    ] = None,
    env: Annotated[
        list[str] | None,
        typer.Option(
            "--env",
            help="KEY=VALUE for the job's environment (repeatable). A credential (a name with "
            "KEY, SECRET, TOKEN, PASSWORD, ... or a value with one) is refused unless named "
            "with --send-env.",
            show_default=False,
        ),
    ] = None,
    send_env: Annotated[
        list[str] | None,
        typer.Option(
            "--send-env",
            help="NAME of a credential variable to SEND with the job (repeatable): its value "
            "(from --env NAME=VALUE or this shell) is readable on the cluster and in its "
            "dashboard; shown as *** here.",
            show_default=False,
        ),
    ] = None,
    entrypoint_num_cpus: Annotated[
        float | None,
        typer.Option(help="CPUs reserved for the job's driver (default 1).", show_default=False),
    ] = None,
    entrypoint_num_gpus: Annotated[
        float | None,
        typer.Option(
            help="GPUs reserved for the driver (default: 1 for quantizer train, else none).",
            show_default=False,
        ),
    ] = None,
    entrypoint_resources: Annotated[
        str | None,
        typer.Option(
            help="Custom resources for the driver as JSON, e.g. '{\"head\": 1}'.",
            show_default=False,
        ),
    ] = None,
    submission_id: Annotated[
        str | None,
        typer.Option(
            help="Job id (default spear-STAGE-DATE-RANDOM); reusing a finished id is refused.",
            show_default=False,
        ),
    ] = None,
    spear_command: Annotated[
        str, typer.Option(help="How the cluster runs spear (e.g. 'python -m spear.cli.main').")
    ] = "spear",
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Print the equivalent `ray job submit` line (credentials ***), stop."
        ),
    ] = False,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait", help="Follow the job's logs; exit with its status (0 when it succeeded)."
        ),
    ] = False,
) -> None:
    """Submit STAGE (manifest, decode, embed, quantizer train, tokenize, train, ...) as a Ray
    job: spear submit tokenize --manifest URL --out URL --address http://HEAD:8265

    Options after STAGE are the stage's own, checked here before submitting. Resuming is
    submitting the same command again. Only storage settings (AWS_ENDPOINT_URL, region) and
    --env travel with the job; credentials only when named with --send-env.
    """
    from spear.cli.common import FILE_OPTIONS, URL_OPTIONS
    from spear.submit import prepare_job, run_job

    path, stage_args = stage_command(list(ctx.args))
    prepared = prepare_job(
        address,
        path,
        stage_args,
        url_options=URL_OPTIONS,
        file_options=FILE_OPTIONS,
        working_dir=working_dir,
        env=env,
        send_env=send_env,
        entrypoint_num_cpus=entrypoint_num_cpus,
        entrypoint_num_gpus=entrypoint_num_gpus,
        entrypoint_resources=entrypoint_resources,
        submission_id=submission_id,
        spear_command=spear_command,
    )
    for note in prepared.notes:
        typer.echo(note, err=True)
    if dry_run:
        if prepared.made_dir:
            typer.echo(f"# working dir holding the config file(s): {prepared.made_dir}")
        typer.echo(prepared.job.ray_cli())
        return
    try:
        code = run_job(prepared.job, wait, say=lambda line: typer.echo(line, err=True))
    finally:
        prepared.cleanup()  # uploaded by now
    if code:
        # Not typer.Exit: the CLI runs click with standalone_mode=False, which returns its code.
        sys.exit(code)
