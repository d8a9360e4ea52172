"""A job's units: cutting its items into units and grouping them into actor calls (shared by the
jobs, ``pipeline/job.py``, and by ``spear plan``, which predicts a run's shards and its driver
without importing a job), and splitting a unit's processed items into output rows and quarantine
rows (every unit writer)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spear.errors import SpearError
from spear.formats import quarantine_row


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


UNITS_PER_CALL = 8
"""The most token shards one actor call takes when the job chooses (``ray.units_per_call``
unset). Codes are ~1 kB per audio second: 8 shards of 10 h are ~290 MB of actor output."""


def units_per_call(pending: int, actors: int, asked: int | None = None, most: int = 1) -> int:
    """Units of one actor call: ``asked``, or as many as leave each actor of the largest pool
    (``actors``) four calls of the ``pending`` units, between 1 and ``most`` (the job's cap:
    :data:`UNITS_PER_CALL` for tokenize; embed and features keep 1, their units' outputs being
    ~100x larger per audio second and their runs a few hundred hours).

    Ray Data's driver pays per call, not per unit (scheduling, a task's submission and its
    outputs): 8 token shards per call cut its CPU per shard about 4x, which a 512-GPU cluster
    needs (``benchmarks/scale.py --part driver``). Four calls per actor keep the end of a job,
    the last calls while other actors idle, to about a quarter of one actor's share. A unit's
    commit stays its own: a call's units commit one by one in its write task."""
    if asked is not None:
        return asked
    return max(1, min(most, pending // (4 * max(actors, 1))))


def sorted_units(
    table: pa.Table, *, items_per_unit: int, what: str, max_unit_seconds: float | None = None
) -> pa.Table:
    """``table`` sorted by ``item_id`` and cut into units (:func:`cut_units`); a repeated item
    id (two rows that would be one item twice) is an error naming ``what``."""
    table = table.sort_by("item_id")
    ids = table["item_id"].combine_chunks()
    if len(ids) > 1 and pc.any(pc.equal(ids[1:], ids[:-1])).as_py():
        raise SpearError(f"{what} repeats item ids")
    return cut_units(table, items_per_unit=items_per_unit, max_unit_seconds=max_unit_seconds)


DECODE_STAGE = "decode"


@dataclass(frozen=True)
class UnitSplit:
    """A unit's processed items split for its writer (:func:`split_quarantine`)."""

    order: np.ndarray
    """Every item's row, in ``item_id`` order."""
    good: np.ndarray
    """Rows of the items that go to the unit's output, in ``item_id`` order."""
    quarantine: list[dict[str, str]]
    """One quarantine row per other item, in ``item_id`` order."""

    @property
    def by_stage(self) -> dict[str, dict[str, int]]:
        """Quarantined items counted by stage, then by reason (the unit entry's
        ``quarantine_by_stage``)."""
        out: dict[str, Counter[str]] = {}
        for r in self.quarantine:
            out.setdefault(r["stage"], Counter())[r["error_type"]] += 1
        return {k: dict(v) for k, v in out.items()}

    def entry(self, name: str, items: dict[str, np.ndarray]) -> dict[str, Any]:
        """The commit entry of an embedding or features unit: its counts, the good rows'
        frames (``num_frames``) and audio seconds (``num_samples`` at 16 kHz), quarantine by
        stage and reason."""
        good = self.good
        return {
            "name": name,
            "items": len(self.order),
            "rows": len(good),
            "quarantined": len(self.quarantine),
            "frames": int(items["num_frames"][good].astype(np.int64).sum()),
            "audio_seconds": float(items["num_samples"][good].astype(np.float64).sum()) / 16_000,
            "quarantine_by_stage": self.by_stage,
        }


def split_quarantine(
    items: dict[str, np.ndarray], *, stage: str, model: str, frames: str | None = None
) -> UnitSplit:
    """Split a unit's items (after its stages ran) into output rows and quarantine rows, the one
    rule every unit writer follows. A bad item is charged to the stage where it failed:

    - ``decode``: it has an ``error_type`` and no audio (``num_samples == 0``): the decode stage
      could not read, check or resample it (``io``, ``changed``, a decode ``too_short``, ...);
    - ``stage`` (``teacher``, ``student``): it has an ``error_type`` set after it decoded (the
      stage's own ``too_short``, an ``internal`` error), or it has none but the stage gave it
      no frame (``frames``: the column of frame counts, when the stage does not flag that
      itself): ``too_short``, "URL: N samples give no MODEL frame"."""
    order = np.argsort(items["item_id"].astype(str), kind="stable")
    err = items["error_type"].astype(str)
    samples = items["num_samples"].astype(np.int64)
    good: list[int] = []
    bad: list[dict[str, str]] = []
    for i in order:
        url = str(items["url"][i])
        if err[i]:
            where, kind, message = (
                DECODE_STAGE if samples[i] == 0 else stage,
                str(err[i]),
                str(items["error"][i]),
            )
        elif frames is not None and int(items[frames][i]) == 0:
            where, kind = stage, "too_short"
            message = f"{url}: {int(samples[i])} samples give no {model} frame"
        else:
            good.append(int(i))
            continue
        bad.append(
            quarantine_row(
                item_id=str(items["item_id"][i]),
                source=url,
                stage=where,
                error_type=kind,
                message=message,
            )
        )
    return UnitSplit(order, np.array(good, dtype=np.int64), bad)
