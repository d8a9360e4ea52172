"""What a person sees: spear's own lines on the console, Ray's chatter in a log file.

* :func:`configure` (the CLI calls it once): ``quiet`` shows warnings and errors only (and no
  live progress display), ``normal`` adds spear's INFO lines (a job's summary, progress lines
  when there is no terminal), ``verbose`` adds spear's DEBUG lines and Ray's INFO output.
* :func:`route_ray_logs` (called once Ray is up): Ray's and Ray Data's INFO output (operator
  plans, the periodic "Total Progress" blocks, resource tables) goes to a log file instead of
  the console, its path printed once; their warnings and errors still show.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import sys
from pathlib import Path
from typing import Literal

Verbosity = Literal["quiet", "normal", "verbose"]

_STATE: dict[str, object] = {"verbosity": "normal"}
_RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")


class _Formatter(logging.Formatter):
    """INFO as plain lines; warnings and errors marked, with the logger's name."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {msg} ({record.name})"
        if record.levelno < logging.INFO:
            return f"debug {record.name}: {msg}"
        return msg


class _Stderr(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (a test's capture, a redirected
    stream), never to a stream closed since."""

    def emit(self, record: logging.LogRecord) -> None:
        # spear's own lines at their level; other libraries' (werkzeug, botocore, ...) only
        # from warnings up, whatever levels they set themselves.
        if record.levelno < logging.WARNING and not record.name.startswith("spear"):
            return
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


def configure(verbosity: Verbosity = "normal") -> None:
    """Console logging of the ``spear`` command (idempotent)."""
    _STATE["verbosity"] = verbosity
    root = logging.getLogger()
    if not any(getattr(h, "_spear", False) for h in root.handlers):
        handler = _Stderr()
        handler.setFormatter(_Formatter())
        handler._spear = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.WARNING)
    level = {"quiet": logging.WARNING, "normal": logging.INFO, "verbose": logging.DEBUG}
    logging.getLogger("spear").setLevel(level[verbosity])
    set_live(verbosity != "quiet")


def set_live(enabled: bool) -> None:
    _STATE["live"] = enabled


def live() -> bool:
    """Whether a terminal gets the jobs' live progress lines (``spear --quiet`` turns them off)."""
    return bool(_STATE.get("live", True))


_EXPECTED = (
    "Progress bars disabled",  # spear turns them off on purpose and shows its own line
    "Token authentication is enabled",  # a local cluster's default, nothing to act on
)


def _not_for_spear_users(record: logging.LogRecord) -> bool:
    """Drop Ray warnings about settings spear chose on purpose (still in the log file)."""
    return not any(text in record.getMessage() for text in _EXPECTED)


def verbosity() -> Verbosity:
    return _STATE["verbosity"]  # type: ignore[return-value]


def log_file_for(out: str | None) -> Path:
    """Where a job's Ray log goes: ``OUT/_logs/`` for a local output, else a local folder
    (``~/.cache/spear/logs``) named after the output."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    if out and "://" not in out:
        return Path(out) / "_logs" / f"ray-{stamp}.log"
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", out or "spear").strip("_")[-80:]
    return Path.home() / ".cache" / "spear" / "logs" / f"{name}-{stamp}.log"


def route_ray_logs(out: str | None) -> Path | None:
    """Send Ray's INFO output to a log file near ``out``; keep its warnings on the console.

    Returns the log file (None when verbose: then Ray's INFO stays on the console); the caller
    prints its path once Ray is up."""
    if _STATE["verbosity"] == "verbose":
        return None
    import ray.data  # noqa: F401  # configures Ray Data's loggers, which this adjusts

    path = log_file_for(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(path)
    file_handler.setLevel(logging.INFO)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in _RAY_LOGGERS:
        for h in logging.getLogger(name).handlers:
            # Ray's own console handlers only: never another library's (pytest's capture).
            if (
                type(h).__module__.startswith("ray.")
                and isinstance(h, logging.StreamHandler)
                and not isinstance(h, logging.FileHandler)
            ):
                h.setLevel(logging.WARNING)
                h.addFilter(_not_for_spear_users)
    file_handler._spear = True  # type: ignore[attr-defined]
    # "ray.data" does not propagate to "ray"; the others do. A later job in this process
    # (the demo runs several) takes over: its Ray lines go to its own file only.
    for name in ("ray", "ray.data"):
        logger = logging.getLogger(name)
        for h in [h for h in logger.handlers if getattr(h, "_spear", False)]:
            logger.removeHandler(h)
            h.close()
        logger.addHandler(file_handler)
    return path
