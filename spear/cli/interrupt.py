"""What a Ctrl-C says: one line with what the job had committed and that the same command
resumes, read from the job's own output (its plan and commit entries), not from the scheduler.

A Ctrl-C reaches the driver as ``KeyboardInterrupt``, or, when Ray's worker processes got the
signal first, as a Ray error about a dead actor or task; :func:`install` records the signal, so
:func:`was_interrupted` tells the two apart from a real failure.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Sequence
from types import FrameType

from spear.record import RECORD_FILE

_SIGNALLED = threading.Event()

PLAN = RECORD_FILE
COMMITS = "_work/commits"


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    _SIGNALLED.set()
    # The job is being abandoned: what Ray's threads log while the process ends (Ray Data's
    # executor finding Ray shut down, with its traceback) would bury the one line we print.
    for name in ("ray", "ray.data", "ray.data._internal.stats", "ray._private.worker"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    signal.default_int_handler(signum, frame)


def install() -> None:
    """Record SIGINT (then raise ``KeyboardInterrupt`` as Python does); main thread only."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)


def was_interrupted() -> bool:
    return _SIGNALLED.is_set()


def out_of(argv: Sequence[str]) -> str | None:
    """The command's ``--out`` / ``-o`` value, if it has one."""
    for i, arg in enumerate(argv):
        if arg in ("--out", "-o") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--out="):
            return arg.split("=", 1)[1]
    return None


def committed(out: str) -> str | None:
    """What ``out`` holds so far, in words: units committed of the run record's (embed,
    tokenize, features), audio parts decoded, or manifest parts written; None when there is no
    record or it cannot be read (storage settings come from the environment here)."""
    from spear.storage import StorageConfig, exists, join, list_names, read_bytes

    storage = StorageConfig().resolved()
    try:
        if exists(join(out, PLAN), storage):
            plan = json.loads(read_bytes(join(out, PLAN), storage))
            kind = plan.get("kind", "manifest")
            if kind == "decode":
                parts = [
                    n for n in list_names(join(out, "audio"), storage) if n.endswith(".parquet")
                ]
                return f"{len(parts)} of {plan.get('units')} manifest parts decoded under {out}"
            if kind != "manifest":
                names = [n for n in list_names(join(out, COMMITS), storage) if n.endswith(".json")]
                return f"{len(names)} of {plan['units']} units committed under {out}"
            parts = [
                n for n in list_names(join(out, "manifest"), storage) if n.endswith(".parquet")
            ]
            return f"{len(parts)} manifest parts written under {out}"
    except Exception:  # an unreadable output: the line still says how to resume
        return None
    return None


def interrupted_line(argv: Sequence[str]) -> str:
    """The one line a Ctrl-C prints."""
    out = out_of(argv)
    done = committed(out) if out else None
    if done is None:
        return "interrupted: run the same command again to resume (what it committed is kept)"
    return f"interrupted: {done}, kept; run the same command again to resume"
