"""Cutting a job's items into units: shared by the jobs (``pipeline/job.py``) and by
``spear plan``, which predicts a run's shards without importing a job."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def cut_units(
    table: pa.Table, *, items_per_unit: int, max_unit_seconds: float | None = None
) -> pa.Table:
    """``table`` (already in the job's order) with a ``unit`` column: consecutive runs of at
    most ``items_per_unit`` items and (when given) ``max_unit_seconds`` of ``duration``."""
    n = table.num_rows
    if max_unit_seconds is None:
        unit = np.arange(n, dtype=np.int64) // items_per_unit
    else:
        # A greedy cut needs a pass over the items; 10^7 durations take ~1 s in this loop's
        # vectorised form: cumulative sums restarted at each cut.
        dur = table["duration"].to_numpy()
        unit = np.empty(n, dtype=np.int64)
        u, start = 0, 0
        csum = np.cumsum(dur)
        while start < n:
            base = csum[start - 1] if start else 0.0
            by_secs = int(np.searchsorted(csum, base + max_unit_seconds, side="right"))
            stop = min(start + items_per_unit, max(by_secs, start + 1), n)
            unit[start:stop] = u
            u, start = u + 1, stop
    return table.append_column("unit", pa.array(unit.astype(np.int32)))
