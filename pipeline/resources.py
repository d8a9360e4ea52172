"""The resource rule of every job's actor pools and tasks, and sizing a job against the cluster.

- :func:`actor_resources`, :func:`cpu_share`: one rule for the CPU/GPU shares of an actor (the
  unit jobs' pools in ``pipeline/job.py``);
- :class:`Demand`, :func:`check_fits`: what a job holds at once, checked against the cluster's
  resources so a job that can never run fails at once with a sizing message instead of waiting
  forever;
- :func:`fit_now`: the same against what is free now (waiting briefly for resources a job that
  just ended still holds), used by the unit jobs and by ``spear train``;
- :func:`pool_sizes`: how many actors of each pool fit now (pools start with those and grow).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from spear.errors import SpearError
from spear.ray_utils import free_resources


def actor_resources(
    device: str,
    num_gpus: float,
    gpus_in_cluster: bool,
    num_cpus: float | None,
    cpu_share: float,
) -> dict[str, float]:
    """CPU/GPU shares of one actor: the one rule every job's actor pools follow.

    ``device="cuda"`` always asks for GPUs (an autoscaler then adds GPU nodes); ``auto`` asks
    only when the cluster has GPUs now (a CPU-only laptop or CI cluster); ``cpu`` never.
    ``num_cpus=None`` means 1 CPU beside a GPU, and ``cpu_share`` (see :func:`cpu_share`) for
    an actor that computes on CPUs."""
    gpu = device == "cuda" or (device == "auto" and gpus_in_cluster)
    cpus = num_cpus if num_cpus is not None else (1.0 if gpu else cpu_share)
    return {"num_cpus": cpus, "num_gpus": num_gpus if gpu else 0.0}


def cpu_share(cluster_cpus: float, actors: int, task_cpus: float) -> float:
    """CPUs per CPU-computing actor when the config leaves it open: what the cluster has beside
    one of each task (decode, write), split evenly over the actors, at most 1 (2 CPUs, two
    teachers: 0.375 each, so a decode and a write still run)."""
    return max(0.125, min(1.0, (cluster_cpus - task_cpus) / max(actors, 1)))


@dataclass(frozen=True)
class Demand:
    """What one stage of a job holds at once: ``count`` x (``num_cpus``, ``num_gpus``)."""

    stage: str
    count: int
    num_cpus: float
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)


def check_fits(
    demands: list[Demand], cluster: dict[str, float], *, autoscaling: bool, free: bool = False
) -> None:
    """Fail at once, with a sizing message, when the stages cannot all run on ``cluster``
    (its total resources, or with ``free`` those free now).

    All of a job's actor pools (and its CPU tasks, given as demands too) must fit at once:
    otherwise Ray waits forever for resources that never come. On an autoscaling cluster the
    resources of now say nothing of what it will add; there the stall timeout of
    :func:`spear.pipeline.job.run_units` is the guard."""
    if autoscaling:
        return
    has = "free" if free else "in all"
    held = " (a submitted job's driver holds one)" if free else ""
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    need_cpu = sum(d.count * d.num_cpus for d in demands)
    need_gpu = sum(d.count * d.num_gpus for d in demands)
    parts = ", ".join(
        f"{d.stage} {d.count} x {d.num_cpus:g} CPU"
        + (f" + {d.num_gpus:g} GPU" if d.num_gpus else "")
        for d in demands
    )
    if need_gpu > gpus:
        raise SpearError(
            f"the job needs {need_gpu:g} GPUs ({parts}) but the cluster has {gpus:g} {has}: use a "
            "cluster with GPUs, device=cpu for the teachers, or set ray.autoscaling=true if "
            "the cluster adds GPU nodes on demand"
        )
    for key in sorted({k for d in demands for k in d.resources}):
        need = sum(d.count * d.resources.get(key, 0.0) for d in demands)
        if need > cluster.get(key, 0.0):
            raise SpearError(
                f"the job needs {need:g} of resource {key!r} but the cluster has "
                f"{cluster.get(key, 0.0):g} {has}: use fewer actors or a cluster that offers it"
            )
    if need_cpu > cpus:
        raise SpearError(
            f"the job needs {need_cpu:g} CPUs at once ({parts}) but the cluster has {cpus:g} "
            f"{has}{held}: use fewer actors or workers, fewer CPUs per actor or task, a larger "
            "cluster, or set ray.autoscaling=true if the cluster adds nodes on demand"
        )


SETTLE_SECONDS = 20.0
"""How long a job waits for resources that are held now but fit the cluster: the actors of a
job that just ended (Ray releases them asynchronously) or a neighbour's short task."""


def fit_now(
    size: Callable[[float], list[Demand]], *, autoscaling: bool
) -> tuple[dict[str, float], float]:
    """Size a job against the cluster: ``size(cpus)`` gives its demands when it may use
    ``cpus`` CPUs. Checks them against the cluster's resources, then against those free now,
    waiting up to :data:`SETTLE_SECONDS` for held ones; CPUs that stay held (a submitted job's
    driver holds one) are left out and the rest shared. Returns the free resources and the CPUs
    the job was sized for. A job that can never run fails with a sizing message instead of
    waiting forever."""
    import ray

    total = {k: float(v) for k, v in ray.cluster_resources().items()}
    cpus = total.get("CPU", 0.0)
    check_fits(size(cpus), total, autoscaling=autoscaling)
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        free = free_resources()
        try:
            check_fits(size(cpus), free, autoscaling=autoscaling, free=True)
            return free, cpus
        except SpearError:
            if time.monotonic() < deadline:
                time.sleep(0.5)
                continue
            if free.get("CPU", 0.0) >= cpus:
                raise
        cpus = free.get("CPU", 0.0)
        check_fits(size(cpus), free, autoscaling=autoscaling, free=True)
        return free, cpus


def pool_sizes(demands: list[Demand], asked: list[int], free: dict[str, float]) -> list[int]:
    """How many actors of each pool (``demands``: one actor's share each, after the tasks'
    demands) fit in ``free`` now: one of each first, then one more per pool in turn, up to
    ``asked``."""
    left = dict(free)

    def take(d: Demand) -> bool:
        need = {"CPU": d.num_cpus, "GPU": d.num_gpus} | d.resources
        if any(v > left.get(k, 0.0) + 1e-9 for k, v in need.items() if v):
            return False
        for k, v in need.items():
            left[k] = left.get(k, 0.0) - v
        return True

    sizes = [0] * len(demands)
    grew = True
    while grew:
        grew = False
        for i, d in enumerate(demands):
            if sizes[i] < asked[i] and take(d):
                sizes[i] += 1
                grew = True
    return [max(s, 1) for s in sizes]
