"""Connecting to Ray: an existing cluster by address, or a local one with this machine's cores."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

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


@dataclass(kw_only=True, frozen=True)
class RayConfig:
    """Which Ray to run on."""

    address: str | None = None
    """Address of an existing cluster (``ray://host:10001``, ``host:6379`` or ``auto``).
    Default: ``RAY_ADDRESS``; without either a local Ray starts."""
    num_cpus: int | None = None
    """CPUs of a local Ray (default: all of this machine's)."""
    num_gpus: int | None = None
    """GPUs of a local Ray (default: those Ray detects)."""
    object_store_memory: int | None = None
    """Object store bytes of a local Ray (default: Ray's choice)."""
    progress_bars: bool = True
    """Show Ray Data's progress bars (they only draw in a terminal)."""


def init_ray(cfg: RayConfig) -> None:
    """Connect to the configured cluster, or start a local one; idempotent."""
    # Ray >= 2.45 re-runs workers through `uv run` when the driver runs under it; the driver's
    # environment is already the locked one, and the re-run only adds start-up time and noise.
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS") or None
    env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    runtime_env = {"env_vars": env} if env else None
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        ray.init(
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
            object_store_memory=cfg.object_store_memory,
            runtime_env=runtime_env,
            include_dashboard=False,
        )
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress_bars


def dataset_from_table(table: Any, blocks: int) -> Any:
    """A Ray Dataset of ``table`` in about ``blocks`` blocks, cut on the driver.

    Not ``from_arrow(table).repartition(n)``: a repartition is an all-to-all step whose tasks
    can starve behind actor pools that hold every CPU of a small cluster.
    """
    import ray

    step = max(1, -(-table.num_rows // max(1, blocks)))
    return ray.data.from_arrow([table.slice(i, step) for i in range(0, table.num_rows, step)])
