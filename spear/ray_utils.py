"""Connecting to Ray: an existing cluster by address, or a local one with this machine's cores."""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from spear.credentials import MASK, install_log_redaction, redact_text
from spear.errors import ConfigError, SpearError

log = logging.getLogger(__name__)

# Credentials the driver forwards to workers of a local Ray it starts itself. On a real cluster
# the workers take them from their own environment (a Secret, workload identity).
_FORWARDED_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
)
# Forwarded to any cluster: the commit protocol's fault hook (spear/commit.py), no secret.
_TEST_HOOK_ENV = ("SPEAR_FAULTS", "SPEAR_FAULTS_DIR")


@dataclass(kw_only=True, frozen=True)
class RayConfig:
    """Which Ray to run on, and how a job waits on it."""

    address: str | None = None
    """Address of an existing cluster (``ray://host:10001``, ``host:6379`` or ``auto``).
    Default: ``RAY_ADDRESS``; without either a local Ray starts."""
    num_cpus: int | None = None
    """CPUs of a local Ray (default: all of this machine's)."""
    num_gpus: int | None = None
    """GPUs of a local Ray (default: those Ray detects)."""
    object_store_memory: int | None = None
    """Object store bytes of a local Ray (default: Ray's choice)."""
    progress_bars: bool = False
    """Ray Data's own per-operator progress bars (spear shows one line per job instead)."""
    start_attempts: int = 3
    """Tries to start a local Ray: on a loaded machine the raylet may miss Ray's fixed 30 s
    registration window; each retry waits longer (5 s, 10 s, ...)."""
    autoscaling: bool = False
    """The cluster adds nodes on demand (KubeRay or cluster-launcher autoscaler): the sizing
    check that fails a job whose actors cannot fit the cluster of now is skipped."""
    stall_seconds: float = 1800.0
    """A job in which no unit finishes for this long ends with an error instead of waiting
    forever (the first unit includes actor start-up and model loading)."""

    units_per_call: int | None = None
    """Units (token shards, embedding shards, feature parts) one actor call of a unit job takes.
    Default: the job chooses: tokenize up to 8 shards, leaving every actor at least four calls;
    embed and features one (``spear.units.units_per_call``). More units per call, less driver
    CPU per unit, more actor output held at once; each unit still commits on its own."""

    def __post_init__(self) -> None:
        if self.start_attempts < 1 or self.stall_seconds <= 0:
            raise ConfigError("ray start_attempts must be >= 1 and stall_seconds positive")
        if self.units_per_call is not None and self.units_per_call < 1:
            raise ConfigError(f"ray units_per_call must be >= 1, not {self.units_per_call}")


def init_ray(cfg: RayConfig, out: str | None = None) -> None:
    """Connect to the configured cluster, or start a local one; idempotent. Ray's INFO output
    goes to a log file near the job's output ``out`` (:func:`spear.console.route_ray_logs`).

    A local Ray starts with what a batch job needs: no dashboard (its HTTP server and
    agents cost a loaded 2-core machine seconds of start-up), and a start-up timeout is retried
    with backoff. Failing that, one line says what to do."""
    # Ray >= 2.45 re-runs workers through `uv run` when the driver runs under it; the driver's
    # environment is already the locked one, and the re-run only adds start-up time and noise.
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    install_log_redaction()  # a job run from Python, not the CLI, logs no credential either
    import ray

    from spear.console import route_ray_logs

    # Before ray.init, so its own start-up lines go to the file too.
    log_file = route_ray_logs(out)
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS") or None
    # Credentials go only to the workers of a local Ray this process starts (the same
    # machine); a remote cluster's nodes have their own (a Secret, workload identity).
    names = _TEST_HOOK_ENV + (() if address else _FORWARDED_ENV)
    env = {k: os.environ[k] for k in names if k in os.environ}
    runtime_env = {"env_vars": env} if env else None
    if env:  # names only: the values may be credentials
        log.debug("forwarding %s to the Ray workers", ", ".join(f"{k}={MASK}" for k in sorted(env)))
    if address:
        log.debug("connecting to Ray at %s", redact_text(address))
        _check_reachable(address)
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=_verbose())
        except Exception as err:
            raise SpearError(
                f"cannot connect to the Ray cluster at {redact_text(address)!r} "
                f"({_first_line(err)}); check "
                "--address / RAY_ADDRESS and that the cluster is up (`ray status`)"
            ) from None
    else:
        _start_local(cfg, runtime_env)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress_bars
    if log_file is not None:
        log.info("Ray's log: %s", log_file)


def _verbose() -> bool:
    """Workers' own output on the driver's console only with ``--verbose``: their errors come
    back as the job's one error line, their logs stay in Ray's session logs."""
    from spear.console import verbosity

    return verbosity() == "verbose"


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in one line when nothing listens at ``host:port`` (Ray itself retries a dead
    address for minutes). ``auto`` and addresses of other forms are left to Ray."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        raise SpearError(
            f"cannot connect to the Ray cluster at {redact_text(address)!r} (nothing answers: "
            f"{_first_line(err)}); check --address / RAY_ADDRESS and that the cluster is up "
            "(`ray status`)"
        ) from None


def _start_local(cfg: RayConfig, runtime_env: dict[str, Any] | None) -> None:
    import ray

    last: Exception | None = None
    for attempt in range(cfg.start_attempts):
        if attempt:
            wait = 5.0 * attempt
            log.debug(
                "local Ray did not start (%s); retrying in %.0f s (%d/%d)",
                _first_line(last),
                wait,
                attempt + 1,
                cfg.start_attempts,
            )
            time.sleep(wait)
        try:
            ray.init(
                num_cpus=cfg.num_cpus,
                num_gpus=cfg.num_gpus,
                object_store_memory=cfg.object_store_memory,
                runtime_env=runtime_env,
                include_dashboard=False,
                log_to_driver=_verbose(),
            )
            return
        except Exception as err:  # Ray raises a bare Exception for the start-up timeout
            last = err
            ray.shutdown()
    raise SpearError(
        f"a local Ray did not start after {cfg.start_attempts} tries ({_first_line(last)}); "
        "the machine may be overloaded: stop other Ray processes (`ray stop`), retry, raise "
        "ray.start_attempts, or join a running cluster with --address"
    )


def _first_line(err: BaseException | None) -> str:
    text = str(err).strip().splitlines()[0] if err is not None and str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if err is not None else "unknown error"


def free_resources() -> dict[str, float]:
    """What a job started now can use: the cluster's resources less those held. A job sent
    with ``spear submit`` holds its driver's entrypoint CPU for its whole run, and other jobs
    hold theirs; sizing against the cluster's total would wait forever on a small cluster."""
    import ray

    total = ray.cluster_resources()
    free = ray.available_resources()
    # Resources with nothing free are absent from available_resources(): report them as 0.
    return {k: float(free.get(k, 0.0)) for k in total}
