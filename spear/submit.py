"""Running a spear stage as a Ray job on a cluster: the job's spec, environment and working dir,
submitting it, following it, and its status.

The job's driver runs ``spear STAGE ...`` on the cluster (its image has spear installed), where
``RAY_ADDRESS`` already points at the cluster. What travels with a job:

* the stage's options, unchanged except ``--config FILE`` (the file goes in the job's working
  dir, its path becomes relative to it); an option that holds a credential (URL user info, a
  signature) is refused: the command line shows in the dashboard;
* storage settings from this shell (:data:`FORWARDED_ENV`: where storage is, never how to log
  in) and ``--env KEY=VALUE``; a credential (a name or value matching
  :mod:`spear.credentials`) only when the user names it with ``--send-env NAME``. The
  cluster's nodes are meant to hold their credentials themselves (a Secret, workload identity).

Every failure to reach or use the job server (refused, dropped, an HTTP error, a timeout, an
authentication error) is one :class:`~spear.errors.SpearError` naming the server's address.
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
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from spear.credentials import MASK, has_credential, is_credential_name, redact, redact_text
from spear.errors import SpearError

# Settings that only say where storage is; forwarded from the submitting shell when set.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# The job server's first answer: a server that accepts the connection but never answers is
# reported after this long instead of hanging (Ray's client sets no timeout of its own).
ANSWER_TIMEOUT_S = 10.0

T = TypeVar("T")


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
    sent_secrets: tuple[str, ...] = ()
    """Credential variables the user chose to send (``--send-env``): masked when shown."""

    def shown_runtime_env(self) -> dict[str, Any]:
        """The runtime env fit to print: the values of sent credentials masked."""
        env = {
            k: MASK if k in self.sent_secrets else redact_text(v, {})
            for k, v in self.runtime_env.get("env_vars", {}).items()
        }
        return self.runtime_env | ({"env_vars": env} if "env_vars" in self.runtime_env else {})

    def ray_cli(self) -> str:
        """The same submission as a ``ray job submit`` command line, credentials masked."""
        cmd = ["ray", "job", "submit", "--address", self.address]
        cmd += ["--submission-id", self.submission_id]
        if self.runtime_env:
            cmd += ["--runtime-env-json", json.dumps(self.shown_runtime_env(), sort_keys=True)]
        if self.metadata:
            cmd += ["--metadata-json", json.dumps(self.metadata, sort_keys=True)]
        if self.entrypoint_num_cpus is not None:
            cmd += ["--entrypoint-num-cpus", f"{self.entrypoint_num_cpus:g}"]
        if self.entrypoint_num_gpus is not None:
            cmd += ["--entrypoint-num-gpus", f"{self.entrypoint_num_gpus:g}"]
        if self.entrypoint_resources:
            cmd += ["--entrypoint-resources", json.dumps(self.entrypoint_resources)]
        return shlex.join([*cmd, "--no-wait", "--"]) + " " + redact_text(self.entrypoint, {})


@dataclass
class PreparedJob:
    """A job ready to submit, and what the user should know about it."""

    job: JobSpec
    notes: list[str]
    """One line each: local paths the head node will resolve, variables not forwarded."""
    made_dir: str | None
    """A working dir made here for the config files (removed once submitted)."""

    def cleanup(self) -> None:
        if self.made_dir:
            shutil.rmtree(self.made_dir, ignore_errors=True)


def option_values(args: list[str], names: Collection[str]) -> list[tuple[int, str]]:
    """(index of the value, value) of every occurrence of the options ``names`` in ``args``
    (``--name VALUE``, ``--name=VALUE``, ``-n VALUE``)."""
    found = []
    for i, a in enumerate(args):
        for n in names:
            if a == n and i + 1 < len(args):
                found.append((i + 1, args[i + 1]))
            elif n.startswith("--") and a.startswith(n + "="):
                found.append((i, a[len(n) + 1 :]))
    return found


def _replace_value(args: list[str], i: int, old: str, new: str) -> None:
    args[i] = new if args[i] == old else args[i].split("=", 1)[0] + "=" + new


def ship_config_files(
    args: list[str], working_dir: str | None, file_options: Collection[str]
) -> tuple[list[str], str | None]:
    """Make ``--config FILE`` (the options ``file_options``) work on the cluster: the file goes
    in the job's working dir.

    With ``working_dir`` the file must lie inside it (its path becomes relative); without one,
    a fresh directory holding only the config files becomes the working dir. A file holding a
    credential is refused: the working dir is uploaded to the cluster."""
    args = list(args)
    for i, value in option_values(args, file_options):
        path = Path(value)
        if not path.is_file():
            raise SpearError(f"config file not found: {value}")
        _refuse_secret_file(path)
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
        _replace_value(args, i, value, new)
    return args, working_dir


def _refuse_secret_file(path: Path) -> None:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return  # the stage's own check on the cluster says what is wrong with it
    if redact(data) != data:
        raise SpearError(
            f"config file {path} holds a credential (a key or URL matching a credential "
            "pattern); it would be uploaded with the job: give the cluster's nodes the "
            "credential (a Secret, workload identity) and leave it out of the file"
        )


def refuse_secret_args(args: list[str]) -> None:
    """Fail when a stage option holds a credential: the entrypoint shows in the dashboard."""
    for a in args:
        if has_credential(a):
            raise SpearError(
                f"the stage option {redact_text(a, {})!r} holds a credential (URL user info, a "
                "signature or key); it would travel in the job's command line, visible in the "
                "dashboard: give the cluster's nodes the credential (a Secret, workload "
                "identity) and pass a plain URL"
            )


def job_env(
    extra: list[str], send: list[str], environ: Mapping[str, str] | None = None
) -> tuple[dict[str, str], tuple[str, ...], list[str]]:
    """The job's environment: storage settings from ``environ`` (default: this shell), then
    ``--env KEY=VALUE``, then the credentials named in ``send`` (``--send-env``).

    Returns (variables, the credential names among them, notes). A credential not named in
    ``send`` is refused (an option) or left behind with a note (this shell's)."""
    environ = os.environ if environ is None else environ
    env: dict[str, str] = {}
    notes: list[str] = []
    for k in FORWARDED_ENV:
        v = environ.get(k)
        if not v:
            continue
        if has_credential(v) and k not in send:
            notes.append(f"note: {k} is not forwarded: its value holds a credential")
            continue
        env[k] = v
    given: dict[str, str] = {}
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpearError(f"--env takes KEY=VALUE, got {redact_text(item, {})!r}")
        if (is_credential_name(key) or has_credential(value)) and key not in send:
            raise SpearError(
                f"--env {key}: credentials do not travel with a job unless named with "
                f"--send-env {key}; better, give the cluster's nodes a Secret or workload "
                "identity (deploy/README.md)"
            )
        given[key] = value
    env |= given
    for key in send:
        if key in given:
            continue
        if not environ.get(key):
            raise SpearError(
                f"--send-env {key}: no such variable in this shell; set it, or give "
                f"--env {key}=VALUE"
            )
        env[key] = environ[key]
    sent = tuple(sorted(k for k in env if k in send))
    # The job's driver is not under `uv run`; keep Ray from trying to re-run workers through it.
    env.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    return env, sent, notes


def default_gpus(path: list[str], args: list[str]) -> float | None:
    """Entrypoint GPUs by stage (every driver takes one CPU): ``quantizer train`` trains in the
    driver itself, on a GPU unless ``--device cpu``."""
    if path == ["quantizer", "train"]:
        devices = [v for _, v in option_values(args, ("--device",))]
        if "cpu" not in devices:
            return 1.0
    return None


def parse_resources(text: str | None) -> dict[str, float] | None:
    """``--entrypoint-resources`` JSON -> a name -> amount mapping."""
    if not text:
        return None
    try:
        return {str(k): float(v) for k, v in json.loads(text).items()}
    except (ValueError, AttributeError, TypeError):
        raise SpearError(
            f"--entrypoint-resources must be a JSON object of numbers, got {text!r}"
        ) from None


def check_address(address: str) -> str:
    """The job server's address, checked: ``http(s)://HOST:PORT`` without a trailing slash."""
    if not address:
        raise SpearError("missing --address (or RAY_API_SERVER_ADDRESS): http://HEAD:8265")
    if not address.startswith(("http://", "https://")):
        raise SpearError(
            f"--address must be the job server's http(s)://HOST:8265, got {redact_text(address)!r}"
        )
    return address.rstrip("/")


def prepare_job(
    address: str,
    path: list[str],
    stage_args: list[str],
    *,
    url_options: Collection[str],
    file_options: Collection[str],
    working_dir: str | None = None,
    env: list[str] | None = None,
    send_env: list[str] | None = None,
    entrypoint_num_cpus: float | None = None,
    entrypoint_num_gpus: float | None = None,
    entrypoint_resources: str | None = None,
    submission_id: str | None = None,
    spear_command: str = "spear",
    environ: Mapping[str, str] | None = None,
) -> PreparedJob:
    """Build the job for ``spear STAGE`` (``path``) with ``stage_args``, already checked
    against the stage's options. ``url_options``: the flags whose values are storage URLs
    (a local path there means the head node's disk); ``file_options``: the flags whose value
    is a local file to ship (``--config``)."""
    address = check_address(address)
    refuse_secret_args(stage_args)
    variables, sent, notes = job_env(list(env or []), list(send_env or []), environ)
    resources = parse_resources(entrypoint_resources)
    made_dir = working_dir is None
    stage_args, wdir = ship_config_files(stage_args, working_dir, file_options)
    from spear.checkpoints import is_hub_id

    for _, value in option_values(stage_args, url_options):
        if "://" not in value and not value.startswith("memory:") and not is_hub_id(value):
            notes.append(f"note: {value} is a local path: the job sees the head node's disk")
    runtime_env: dict[str, Any] = {"env_vars": variables}
    if wdir:
        runtime_env["working_dir"] = wdir
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    from spear import __version__

    job = JobSpec(
        address=address,
        entrypoint=" ".join([spear_command, shlex.join([*path, *stage_args])]),
        submission_id=submission_id or f"spear-{'-'.join(path)}-{stamp}-{secrets.token_hex(2)}",
        runtime_env=runtime_env,
        entrypoint_num_cpus=1.0 if entrypoint_num_cpus is None else entrypoint_num_cpus,
        entrypoint_num_gpus=(
            default_gpus(path, stage_args) if entrypoint_num_gpus is None else entrypoint_num_gpus
        ),
        entrypoint_resources=resources,
        metadata={"spear_stage": " ".join(path), "spear_version": __version__},
        sent_secrets=sent,
    )
    return PreparedJob(job, notes, wdir if made_dir else None)


# ---------------------------------------------------------------------------------------------
# The job server


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    line = text.splitlines()[0] if text else ""
    line = line if len(line) <= 300 else line[:300] + "..."
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def _server_errors() -> tuple[type[BaseException], ...]:
    # requests' errors are OSErrors; Ray raises RuntimeError for HTTP errors, ConnectionError
    # when it cannot connect, ValueError for a bad answer, and RayError subclasses (auth).
    from ray.exceptions import RayError

    return (OSError, RuntimeError, ValueError, RayError)


def server_call(address: str, what: str, fn: Callable[[], T]) -> T:
    """``fn()`` against the job server at ``address``; any failure becomes one SpearError."""
    try:
        return fn()
    except _server_errors() as err:
        if isinstance(err, OSError):
            hint = (
                "check --address (RAY_API_SERVER_ADDRESS), that the cluster is up and that its "
                "dashboard port is reachable from here (a port-forward, a firewall)"
            )
        else:
            hint = "the server answered with an error; see the cluster's dashboard logs"
        raise SpearError(
            f"{what} at the Ray job server {address} failed ({_first_line(err)}); {hint}"
        ) from None


def check_answers(address: str, timeout: float = ANSWER_TIMEOUT_S) -> None:
    """Fail in one line unless something answers HTTP at ``address`` within ``timeout``: a
    closed port, a dropped connection or a silent server are told apart from a bad job."""
    try:
        with urllib.request.urlopen(f"{address}/api/version", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # it answers (a 401 without the auth token is the client's to explain)
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", err)  # urllib wraps the socket's error
        if isinstance(reason, TimeoutError):
            raise SpearError(
                f"the Ray job server at {address} did not answer in {timeout:g} s; check "
                "--address (RAY_API_SERVER_ADDRESS) and that the head node is not overloaded"
            ) from None
        why = _first_line(reason) if isinstance(reason, BaseException) else str(reason)
        raise SpearError(
            f"nothing answers as a Ray job server at {address} ({why}); check --address "
            "(RAY_API_SERVER_ADDRESS), that the cluster is up and that its dashboard port is "
            "reachable from here (a port-forward, a firewall)"
        ) from None


def connect(address: str) -> Any:
    """A ``JobSubmissionClient`` for the job server at ``address``."""
    check_answers(address, ANSWER_TIMEOUT_S)
    from ray.job_submission import JobSubmissionClient

    return server_call(address, "connecting", lambda: JobSubmissionClient(address))


def submit(job: JobSpec, client: Any | None = None) -> str:
    """Submit ``job``; returns its id."""
    client = client or connect(job.address)
    job_id: str = server_call(
        job.address,
        "submitting the job",
        lambda: client.submit_job(
            entrypoint=job.entrypoint,
            submission_id=job.submission_id,
            runtime_env=job.runtime_env,
            entrypoint_num_cpus=job.entrypoint_num_cpus,
            entrypoint_num_gpus=job.entrypoint_num_gpus,
            entrypoint_resources=job.entrypoint_resources,
            metadata=job.metadata,
        ),
    )
    return job_id


@dataclass(frozen=True)
class JobState:
    """A job's status on the server."""

    status: str
    """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    message: str | None
    exit_code: int | None
    """The driver's exit status, once it ended."""

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    def code(self) -> int:
        """0 when the job succeeded, else the driver's exit status (1 when it has none)."""
        if self.status == "SUCCEEDED":
            return 0
        return int(self.exit_code) if self.exit_code else 1


def status(address: str, job_id: str, client: Any | None = None) -> JobState:
    """The status of job ``job_id`` at the job server ``address``."""
    client = client or connect(address)
    info = server_call(address, f"reading job {job_id}", lambda: client.get_job_info(job_id))
    code = getattr(info, "driver_exit_code", None)
    return JobState(str(info.status.value), info.message, None if code is None else int(code))


def follow(
    address: str,
    job_id: str,
    client: Any,
    write: Callable[[str], None],
    poll_seconds: float = 1.0,
) -> JobState:
    """Stream job ``job_id``'s log through ``write`` until it ends; returns its final state."""
    shown = 0
    while True:
        state = status(address, job_id, client)
        logs = server_call(
            address, f"reading job {job_id}'s log", lambda: client.get_job_logs(job_id)
        )
        if len(logs) > shown:
            write(redact_text(logs[shown:]))
            shown = len(logs)
        if state.done:
            return state
        time.sleep(poll_seconds)


def run_job(
    job: JobSpec,
    wait: bool,
    say: Callable[[str], None],
    write: Callable[[str], None] | None = None,
    poll_seconds: float = 1.0,
) -> int:
    """Submit ``job`` (``say`` tells what happened); with ``wait``, stream its log through
    ``write`` (default stdout) and return its exit status, else 0."""
    client = connect(job.address)
    job_id = submit(job, client)
    say(f"submitted {job_id}: {redact_text(job.entrypoint, {})}")
    if not wait:
        say(
            f"follow it: ray job logs --follow --address {job.address} {job_id}\n"
            f"dashboard: {job.address}/#/jobs/{job_id}"
        )
        return 0
    out = write or _stdout
    try:
        state = follow(job.address, job_id, client, out, poll_seconds)
    except KeyboardInterrupt:
        say(
            f"\nstopped following; the job goes on (ray job stop --address {job.address} "
            f"{job_id} ends it)"
        )
        return 130
    say(f"job {job_id}: {state.status}" + (f" ({state.message})" if state.message else ""))
    return state.code()


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
