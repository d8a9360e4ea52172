"""Progress of a unit job on the driver: counts, a timeline for the report, what a person sees.

On a terminal one live line per job (rich): items, audio hours, rate, ETA, quarantined so far.
Without a terminal (a log file, a Kubernetes pod) one INFO line every ``every`` seconds. Both
are fed by the units' commit entries, so the driver's work stays O(units).
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
import time
from collections import Counter
from typing import Any

from spear.console import live

log = logging.getLogger(__name__)


def fmt_seconds(s: float) -> str:
    if s == float("inf") or s != s:
        return "?"
    return str(dt.timedelta(seconds=round(s)))


class Progress:
    """Counts units as their entries arrive (``add``), keeps a timeline, shows progress."""

    def __init__(
        self, job: str, items: int, hours: float, units: int, every: float, noun: str = "unit"
    ):
        self.job, self.total_items, self.total_hours, self.total_units = job, items, hours, units
        self.every, self.noun = every, noun
        self.t0 = time.time()
        self.items = self.units = 0
        self.hours = 0.0
        self.quarantined: Counter[str] = Counter()
        self.busy: Counter[str] = Counter()
        self.stage_audio: Counter[str] = Counter()
        self.timeline: list[dict[str, Any]] = []
        self._last_log = self.t0
        self._live: Any = None
        self._status = ""
        self._task: Any = None
        self._metrics = _metrics(job.split()[0])

    def __enter__(self) -> Progress:
        if live() and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, TextColumn
            from rich.progress import Progress as RichProgress

            self._live = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[line]}"),
                console=Console(stderr=True),
                transient=False,
            )
            self._live.start()
            self._task = self._live.add_task(self.job, total=self.total_items, line=self._text())
        self.mark()
        return self

    def __exit__(self, *exc: object) -> None:
        self.mark()
        if self._live is not None:
            self._live.update(self._task, completed=self.items, line=self._text())
            self._live.stop()

    def status(self, text: str) -> None:
        """What the job is doing before its first unit (start-up, models loading): on the live
        line, or one log line."""
        self._status = text
        if self._live is not None:
            self._live.update(self._task, line=self._text())
        else:
            log.info("%s: %s", self.job, text)

    def add(self, entry: dict[str, Any]) -> None:
        self.units += 1
        self.items += int(entry["items"])
        self.hours += float(entry["audio_seconds"]) / 3600
        for reasons in _stage_reasons(entry).values():
            self.quarantined.update(reasons)
        self.busy.update(entry.get("stage_busy", {}))
        self.stage_audio.update(entry.get("stage_audio_seconds", {}))
        if self._metrics is not None:
            hours, items, quarantined = self._metrics
            hours.inc(float(entry["audio_seconds"]) / 3600)
            items.inc(int(entry.get("rows", entry["items"])))
            for reasons in _stage_reasons(entry).values():
                for reason, n in reasons.items():
                    quarantined.inc(int(n), tags={"reason": reason})
        self.mark(min_gap=1.0)
        now = time.time()
        if self._live is not None:
            self._live.update(self._task, completed=self.items, line=self._text())
        elif now - self._last_log >= self.every:
            self._last_log = now
            log.info(self.line())

    def mark(self, min_gap: float = 0.0) -> None:
        """A timeline point for the report (skipped if the last one is under ``min_gap`` s old)."""
        t = time.time() - self.t0
        if self.timeline and t - self.timeline[-1]["t"] < min_gap:
            return
        self.timeline.append(
            {
                "t": round(t, 3),
                "items_done": self.items,
                "hours_done": round(self.hours, 6),
                "shards_done": self.units,
                "stage_busy": {k: round(v, 3) for k, v in self.busy.items()},
                "stage_audio_seconds": {k: round(v, 3) for k, v in self.stage_audio.items()},
            }
        )

    def _text(self) -> str:
        el = time.time() - self.t0
        if self.units == 0 and self._status:
            return self._status
        rate = self.hours * 3600 / el if el else 0.0
        left = max(self.total_hours - self.hours, 0.0)
        eta = left * 3600 / rate if rate else float("inf")
        q = sum(self.quarantined.values())
        return (
            f"{self.items}/{self.total_items} items, {self.hours:.3f}/{self.total_hours:.3f} h, "
            f"{self.units}/{self.total_units} {self.noun}s, {rate:.1f}x real time, ETA "
            f"{fmt_seconds(eta)}, {q} quarantined"
        )

    def line(self) -> str:
        return f"{self.job}: {self._text()}"


def _stage_reasons(entry: dict[str, Any]) -> dict[str, dict[str, int]]:
    return dict(entry.get("quarantine_by_stage") or {})


def _metrics(job: str) -> tuple[Any, Any, Any] | None:
    """Ray metrics (exported to Prometheus by the cluster's metrics agent):
    ``spear_{job}_hours``, ``spear_{job}_items``, ``spear_{job}_quarantined{reason}``."""
    try:
        import ray
        from ray.util.metrics import Counter as RayCounter

        if not ray.is_initialized():
            return None
        return (
            RayCounter(f"spear_{job}_hours", "Audio hours done"),
            RayCounter(f"spear_{job}_items", "Items done"),
            RayCounter(f"spear_{job}_quarantined", "Items quarantined", tag_keys=("reason",)),
        )
    except Exception:  # metrics are an extra; a cluster without the agent still runs the job
        log.debug("Ray metrics unavailable", exc_info=True)
        return None
