"""What a training run records besides the weights: its log rows, TensorBoard events, what it
trains on, and the checkpoint files that go with them (the recipe calls these; each is a small
piece so the recipe's loop stays readable).

* :class:`TrainedOn` - the token run and quantisers a run trains on: in the driver's
  ``OUT/plan.json``, every checkpoint's ``student.pt`` (``"trained_on"``, an extra key that
  :meth:`Student.from_state` ignores) and ``meta.json``; a resume onto other tokens is refused.
* :class:`RunClock` - seconds of training, summed over resumes (``elapsed`` in the rows).
* :class:`RankZeroLog` - rank 0's log rows (``OUT/metrics/step-*.json``, one small object per
  logged step: ``time`` is the wall clock, ``elapsed`` seconds of training) and TensorBoard
  event files (``OUT/tensorboard/``; tensorboardX, which Ray Train ships).
* :func:`save_extras` / :func:`restore_extras` - ``model_avg.pt`` and ``meta.json`` in a
  checkpoint folder.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from spear.errors import SpearError
from spear.storage import StorageConfig, join, protocol_of, write_atomic
from spear.student.averaging import AVERAGE_FILE, ModelAverage
from spear.student.config import TrainConfig

log = logging.getLogger(__name__)

META_FILE = "meta.json"
"""Small JSON in each checkpoint folder: step, hours, elapsed, trained_on, averaging."""
TENSORBOARD_DIR = "tensorboard"


@dataclass(frozen=True)
class TrainedOn:
    """The tokens a student is trained on."""

    token_run: str
    """The tokenize run's id (every token shard's ``run_id`` metadata)."""
    quantizers: dict[str, str] = field(default_factory=dict)
    """Teacher prefix -> quantiser id."""
    shards: str = ""
    """Where the shards were read (recorded, not compared: a copy of the run is the same run)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainedOn:
        return cls(
            token_run=str(d.get("token_run", "")),
            quantizers={str(k): str(v) for k, v in (d.get("quantizers") or {}).items()},
            shards=str(d.get("shards", "")),
        )

    def text(self) -> str:
        q = ", ".join(f"{k}={v}" for k, v in sorted(self.quantizers.items()))
        return f"token run {self.token_run or '(none recorded)'} (quantisers {q or 'none'})"

    def check_resume(self, recorded: TrainedOn, where: str) -> None:
        """SpearError when ``recorded`` (an earlier run in the same OUT) trained on other
        tokens than this run's."""
        if (recorded.token_run, recorded.quantizers) != (self.token_run, self.quantizers):
            raise SpearError(
                f"{where} was trained on {recorded.text()}, these shards are {self.text()}: "
                "a resume must read the same tokens; use a new --out"
            )


class RunClock:
    """Seconds of training: what earlier runs of the same OUT recorded plus this one's."""

    def __init__(self, before: float = 0.0) -> None:
        self.before = before
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.t0


class TensorBoard:
    """TensorBoard scalars from rank 0. A local OUT gets the event files directly; any other
    URL gets them through a local folder, uploaded after each write (a new file is started
    after each checkpoint, so an upload stays small however long the run)."""

    def __init__(self, out_url: str, storage: StorageConfig, step: int) -> None:
        self.url = join(out_url, TENSORBOARD_DIR)
        self.storage = storage
        self.local = protocol_of(out_url) == "file"
        self._tmp = None if self.local else tempfile.TemporaryDirectory(prefix="spear-tb-")
        self.folder = (
            os.path.abspath(self.url.removeprefix("file://"))
            if self._tmp is None
            else self._tmp.name
        )
        self._writer: Any = None
        self._opened_at = step

    def _open(self, step: int) -> Any:
        if self._writer is None:
            from tensorboardX import SummaryWriter

            os.makedirs(self.folder, exist_ok=True)
            # The suffix keeps two files of one second (a resume, a rotation) apart.
            self._writer = SummaryWriter(self.folder, filename_suffix=f".step{step}")
            self._opened_at = step
        return self._writer

    def add(self, metrics: dict[str, Any], step: int) -> None:
        w = self._open(step)
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                w.add_scalar(_tag(k), float(v), step)
        w.flush()
        self._upload()

    def rotate(self) -> None:
        """Close the current event file (the next write starts another)."""
        if self._writer is not None:
            self._writer.close()
            self._upload()
            self._writer = None
            if self._tmp is not None:
                for name in os.listdir(self.folder):
                    os.remove(os.path.join(self.folder, name))

    def close(self) -> None:
        self.rotate()
        if self._tmp is not None:
            self._tmp.cleanup()

    def _upload(self) -> None:
        if self.local or self._writer is None:
            return
        for name in os.listdir(self.folder):
            with open(os.path.join(self.folder, name), "rb") as f:
                write_atomic(join(self.url, name), f.read(), self.storage)


def _tag(key: str) -> str:
    """TensorBoard groups by the part before '/': losses together, rates together."""
    if key.startswith("loss"):
        return f"loss/{key}"
    if key in ("lr", "hours", "eden_hours", "schedule_batch", "epoch"):
        return f"schedule/{key}"
    return f"speed/{key}"


class RankZeroLog:
    """Rank 0's record of the run: step rows for the report and the driver, TensorBoard."""

    def __init__(
        self, metrics_url: str, out_url: str, storage: StorageConfig, step: int, tensorboard: bool
    ) -> None:
        self.metrics_url, self.storage = metrics_url, storage
        self.tb = TensorBoard(out_url, storage, step) if tensorboard else None

    def row(self, metrics: dict[str, Any], step: int) -> None:
        # One small object per log line; the driver merges them into metrics.jsonl (the run
        # report's curves) when the run ends, and `spear report` reads them while it runs.
        row = json.dumps(metrics | {"time": time.time()}).encode()
        write_atomic(join(self.metrics_url, f"step-{step:09d}.json"), row, self.storage)
        if self.tb is not None:
            self.tb.add(metrics, step)

    def checkpointed(self) -> None:
        if self.tb is not None:
            self.tb.rotate()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def save_extras(
    folder: str,
    average: ModelAverage | None,
    trained_on: TrainedOn | None,
    meta: dict[str, Any],
) -> None:
    """Rank 0's extra checkpoint files: the running average and ``meta.json``."""
    if average is not None:
        torch.save(average.state_dict(), os.path.join(folder, AVERAGE_FILE))
    body = meta | {
        "trained_on": None if trained_on is None else trained_on.as_dict(),
        "average_step": None if average is None else average.step,
        "average_period": None if average is None else average.period,
    }
    with open(os.path.join(folder, META_FILE), "w") as f:
        json.dump(body, f)


def restore_extras(
    folder: str,
    average: ModelAverage | None,
    trained_on: TrainedOn | None,
    model: torch.nn.Module,
    step: int,
    device: torch.device,
) -> None:
    """Check the checkpoint's tokens against this run's and load the running average (a
    checkpoint from before averaging restarts it from the restored weights, loudly)."""
    meta_file = os.path.join(folder, META_FILE)
    if trained_on is not None and os.path.exists(meta_file):
        with open(meta_file) as f:
            recorded = json.load(f).get("trained_on")
        if recorded:
            trained_on.check_resume(TrainedOn.from_dict(recorded), "the checkpoint")
    if average is None:
        return
    avg_file = os.path.join(folder, AVERAGE_FILE)
    if not os.path.exists(avg_file):
        log.warning("the checkpoint has no %s: averaging restarts at step %d", AVERAGE_FILE, step)
        average.reset(model, step)
        return
    try:
        average.load_state_dict(torch.load(avg_file, map_location=device, weights_only=True))
    except ValueError as err:
        raise SpearError(f"{avg_file}: {err}") from None


def schedule_position(cfg: TrainConfig, hours: float, elapsed: float) -> dict[str, Any]:
    """Where the run stands on its schedules: the machinery's
    batch count (audio seen / its ``batch_seconds``), Eden's horizon (``lr_batches`` steps and
    ``lr_hours``; the run's step and ``hours`` are already in the row) and the run's length."""
    enc = cfg.student.encoder_config()
    return {
        "elapsed": elapsed,
        "max_steps": cfg.max_steps,
        "schedule_batch": enc.machinery.batch_count(hours),
        "eden_lr_batches": cfg.optim.lr_batches,
        "eden_lr_hours": cfg.optim.lr_hours,
    }
