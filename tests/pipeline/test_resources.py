"""The resource rule and the sizing check (``pipeline/resources.py``): pure, then against the
session's Ray (integration)."""

from __future__ import annotations

import pytest

from spear.errors import SpearError
from spear.pipeline.resources import (
    Demand,
    actor_resources,
    check_fits,
    cpu_share,
    fit_now,
    pool_sizes,
)


def test_resource_rule_and_sizing() -> None:
    assert actor_resources("auto", 1.0, True, None, 0.5) == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert actor_resources("auto", 1.0, False, None, 0.5) == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert actor_resources("cuda", 0.5, False, 2.0, 0.5) == {"num_cpus": 2.0, "num_gpus": 0.5}
    assert actor_resources("cpu", 1.0, True, None, 1.0)["num_gpus"] == 0.0
    assert cpu_share(2, 2, 1.0) == 0.5 and cpu_share(64, 2, 1.0) == 1.0
    cluster = {"CPU": 2.0}
    check_fits([Demand("decode", 1, 1.0), Demand("wavlm", 2, 0.5)], cluster, autoscaling=False)
    with pytest.raises(SpearError, match="needs 3 CPUs"):
        check_fits([Demand("decode", 1, 1.0), Demand("wavlm", 2, 1.0)], cluster, autoscaling=False)
    with pytest.raises(SpearError, match="needs 1 GPUs"):
        check_fits([Demand("wavlm", 1, 1.0, 1.0)], cluster, autoscaling=False)
    check_fits([Demand("wavlm", 1, 1.0, 1.0)], cluster, autoscaling=True)
    # `spear submit embed` on a 2-CPU head: the driver holds 1 CPU; one commit task and one
    # actor sharing the other fit (the former decode task made it 1.375 CPUs, refused).
    share = cpu_share(1.0, 1, 0.25)
    free = {"CPU": 1.0}
    check_fits([Demand("write", 1, 0.25), Demand("wavlm", 1, share)], free, autoscaling=False)


def test_pool_sizes_start_with_what_fits() -> None:
    gpu = Demand("wavlm", 1, 1.0, 1.0)
    small = Demand("dasheng", 1, 1.0, 0.5)
    # 3 GPUs, 8 CPUs: one of each first (1.5 GPU), then in turn: wavlm 2 (2.5), dasheng 2 (3.0).
    assert pool_sizes([gpu, small], [4, 2], {"CPU": 8, "GPU": 3}) == [2, 2]
    assert pool_sizes([gpu, small], [1, 1], {"CPU": 8, "GPU": 3}) == [1, 1]
    # Nothing fits now (an autoscaling cluster): each pool still starts with its minimum of one.
    assert pool_sizes([gpu], [3], {"CPU": 0}) == [1]


@pytest.mark.integration
def test_sizing_waits_for_resources_a_finished_job_still_holds(ray_cluster: str) -> None:
    # Ray releases a killed actor's resources asynchronously: a job started right after
    # another must not fail its sizing check on them (the demo runs jobs back to back).
    import threading
    import time

    import ray

    @ray.remote(num_cpus=2)
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.remote()  # type: ignore[attr-defined]
    ray.get(holder.ready.remote())
    threading.Timer(1.5, ray.kill, args=(holder,)).start()
    t0 = time.monotonic()
    free, _ = fit_now(lambda _: [Demand("t", 1, 2.0)], autoscaling=False)
    assert free["CPU"] >= 2.0 and time.monotonic() - t0 >= 1.0
    with pytest.raises(SpearError, match=r"needs 3 CPUs at once .* has 2 in all"):
        fit_now(lambda _: [Demand("t", 1, 3.0)], autoscaling=False)  # never fits: no wait
