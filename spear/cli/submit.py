"""``spear submit STAGE ...``: run a stage as a Ray job on a cluster, with the stage's own options.

Everything after STAGE that ``submit`` does not know itself goes to the stage unchanged, and is
checked against the stage's options before anything is sent. The job's driver runs
``spear STAGE ...`` on the cluster (the image has spear installed), where ``RAY_ADDRESS``
already points at the cluster. A ``--config FILE`` travels with the job in its working dir.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from spear.errors import SpearError

# Settings that only say where storage is; forwarded from the submitting shell when set.
# Credentials never travel with a job: the cluster's nodes have them (Secret, workload identity).
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")
_SECRET_MARKERS = ("SECRET", "TOKEN", "PASSWORD", "ACCESS_KEY", "CREDENTIAL")

# Options whose value is a local file the job must see: shipped in the working dir.
_FILE_OPTIONS = ("--config", "-c")
# Options whose value is an output or input URL: a local path there means the head's disk.
_URL_OPTIONS = ("--out", "-o", "--manifest", "-m", "--embeddings", "--shards", "--quantizer")

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass(kw_only=True)
class JobSpec:
    """What is submitted: the arguments of ``JobSubmissionClient.submit_job``."""

    address: str
    entrypoint: str
    submission_id: str
    runtime_env: dict[str, Any] = field(default_factory=dict)
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None
    entrypoint_resources: dict[str, float] | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def ray_cli(self) -> str:
        """The same submission as a ``ray job submit`` command line."""
        cmd = ["ray", "job", "submit", "--address", self.address]
        cmd += ["--submission-id", self.submission_id]
        if self.runtime_env:
            cmd += ["--runtime-env-json", json.dumps(self.runtime_env, sort_keys=True)]
        if self.metadata:
            cmd += ["--metadata-json", json.dumps(self.metadata, sort_keys=True)]
        if self.entrypoint_num_cpus is not None:
            cmd += ["--entrypoint-num-cpus", f"{self.entrypoint_num_cpus:g}"]
        if self.entrypoint_num_gpus is not None:
            cmd += ["--entrypoint-num-gpus", f"{self.entrypoint_num_gpus:g}"]
        if self.entrypoint_resources:
            cmd += ["--entrypoint-resources", json.dumps(self.entrypoint_resources)]
        return shlex.join([*cmd, "--no-wait", "--"]) + " " + self.entrypoint


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
    hidden = {"submit", "config", "plan", "report"}
    while hasattr(node, "commands") and rest and not rest[0].startswith("-"):
        name = rest.pop(0)
        sub = node.commands.get(name)
        if sub is None or name in hidden:
            known = sorted(set(node.commands) - hidden)
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


def _option_value(args: list[str], names: tuple[str, ...]) -> list[tuple[int, str]]:
    """(index of the value, value) of every occurrence of the options ``names`` in ``args``."""
    found = []
    for i, a in enumerate(args):
        for n in names:
            if a == n and i + 1 < len(args):
                found.append((i + 1, args[i + 1]))
            elif n.startswith("--") and a.startswith(n + "="):
                found.append((i, a[len(n) + 1 :]))
    return found


def ship_config_files(args: list[str], working_dir: str | None) -> tuple[list[str], str | None]:
    """Make ``--config FILE`` work on the cluster: the file goes in the job's working dir.

    With ``working_dir`` the file must lie inside it (its path becomes relative); without one,
    a fresh directory holding only the config files becomes the working dir."""
    args = list(args)
    for i, value in _option_value(args, _FILE_OPTIONS):
        path = Path(value)
        if not path.is_file():
            raise SpearError(f"config file not found: {value}")
        if working_dir:
            try:
                rel = path.resolve().relative_to(Path(working_dir).resolve())
            except ValueError:
                raise SpearError(
                    f"--config {value} is outside --working-dir {working_dir}: the job would "
                    "not see it"
                ) from None
            new = str(rel)
        else:
            if working_dir is None:
                working_dir = tempfile.mkdtemp(prefix="spear-submit-")
            new = f"config-{len(os.listdir(working_dir))}-{path.name}"
            shutil.copyfile(path, Path(working_dir) / new)
        args[i] = new if args[i] == value else args[i].split("=", 1)[0] + "=" + new
    return args, working_dir


def env_vars(extra: list[str]) -> dict[str, str]:
    """The job's environment: storage settings from this shell, then ``--env KEY=VALUE``."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpearError(f"--env takes KEY=VALUE, got {item!r}")
        if any(m in key.upper() for m in _SECRET_MARKERS):
            raise SpearError(
                f"--env {key}: credentials do not travel with a job; give the cluster's nodes "
                "a Secret or workload identity (deploy/README.md)"
            )
        env[key] = value
    # The job's driver is not under `uv run`; keep Ray from trying to re-run workers through it.
    env.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    return env


def default_resources(path: list[str], args: list[str]) -> tuple[float, float | None]:
    """Entrypoint CPUs and GPUs by stage: drivers of Ray stages need one CPU; ``quantizer train``
    trains in the driver itself, on a GPU unless ``--device cpu``."""
    if path == ["quantizer", "train"]:
        devices = [v for _, v in _option_value(args, ("--device",))]
        if "cpu" not in devices:
            return 1.0, 1.0
    return 1.0, None


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
            "--env", help="KEY=VALUE for the job's environment (repeatable).", show_default=False
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
        typer.Option("--dry-run", help="Print the equivalent `ray job submit` line and stop."),
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
    submitting the same command again.
    """
    path, stage_args = stage_command(list(ctx.args))
    if not address:
        raise SpearError("missing --address (or RAY_API_SERVER_ADDRESS): http://HEAD:8265")
    if not address.startswith(("http://", "https://")):
        raise SpearError(f"--address must be the job server's http(s)://HOST:8265, got {address!r}")
    made_dir = working_dir is None
    stage_args, wdir = ship_config_files(stage_args, working_dir)
    for _, value in _option_value(stage_args, _URL_OPTIONS):
        if "://" not in value and not value.startswith("memory:"):
            typer.echo(
                f"note: {value} is a local path: the job sees the head node's disk", err=True
            )
    cpus, gpus = default_resources(path, stage_args)
    resources = None
    if entrypoint_resources:
        try:
            resources = {str(k): float(v) for k, v in json.loads(entrypoint_resources).items()}
        except (ValueError, AttributeError, TypeError):
            raise SpearError(
                f"--entrypoint-resources must be a JSON object of numbers, got "
                f"{entrypoint_resources!r}"
            ) from None
    runtime_env: dict[str, Any] = {"env_vars": env_vars(list(env or []))}
    if wdir:
        runtime_env["working_dir"] = wdir
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    from spear import __version__

    job = JobSpec(
        address=address.rstrip("/"),
        entrypoint=" ".join([spear_command, shlex.join([*path, *stage_args])]),
        submission_id=submission_id or f"spear-{'-'.join(path)}-{stamp}-{secrets.token_hex(2)}",
        runtime_env=runtime_env,
        entrypoint_num_cpus=cpus if entrypoint_num_cpus is None else entrypoint_num_cpus,
        entrypoint_num_gpus=gpus if entrypoint_num_gpus is None else entrypoint_num_gpus,
        entrypoint_resources=resources,
        metadata={"spear_stage": " ".join(path), "spear_version": __version__},
    )
    if dry_run:
        if made_dir and wdir:
            typer.echo(f"# working dir holding the config file(s): {wdir}")
        typer.echo(job.ray_cli())
        return
    try:
        code = run_job(job, wait)
    finally:
        if made_dir and wdir:
            shutil.rmtree(wdir, ignore_errors=True)  # uploaded by now
    if code:
        # Not typer.Exit: the CLI runs click with standalone_mode=False, which returns its code.
        sys.exit(code)


def run_job(job: JobSpec, wait: bool, poll_seconds: float = 1.0) -> int:
    """Submit ``job``; with ``wait``, stream its logs and return its exit status."""
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(job.address)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise SpearError(f"cannot reach the Ray job server at {job.address}: {err}") from None
    try:
        job_id = client.submit_job(
            entrypoint=job.entrypoint,
            submission_id=job.submission_id,
            runtime_env=job.runtime_env,
            entrypoint_num_cpus=job.entrypoint_num_cpus,
            entrypoint_num_gpus=job.entrypoint_num_gpus,
            entrypoint_resources=job.entrypoint_resources,
            metadata=job.metadata,
        )
    except RuntimeError as err:
        raise SpearError(f"the job server refused the job: {err}") from None
    typer.echo(f"submitted {job_id}: {job.entrypoint}", err=True)
    if not wait:
        typer.echo(
            f"follow it: ray job logs --follow --address {job.address} {job_id}\n"
            f"dashboard: {job.address}/#/jobs/{job_id}",
            err=True,
        )
        return 0
    shown = 0
    try:
        while True:
            status = str(client.get_job_status(job_id).value)
            logs = client.get_job_logs(job_id)
            if len(logs) > shown:
                sys.stdout.write(logs[shown:])
                sys.stdout.flush()
                shown = len(logs)
            if status in TERMINAL:
                break
            time.sleep(poll_seconds)
    except KeyboardInterrupt:
        typer.echo(
            f"\nstopped following; the job goes on (ray job stop --address {job.address} "
            f"{job_id} ends it)",
            err=True,
        )
        return 130
    info = client.get_job_info(job_id)
    code = getattr(info, "driver_exit_code", None)
    typer.echo(f"job {job_id}: {status}" + (f" ({info.message})" if info.message else ""), err=True)
    if status == "SUCCEEDED":
        return 0
    return int(code) if code else 1
