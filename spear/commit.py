"""Exactly-once commit of a job's output units, done by the worker that built the unit.

A unit (a token shard, an embedding shard, a feature part) is a fixed set of items that the plan
names (``shard-00042``). Its files (``tokens/shard-00042.parquet``,
``quarantine/shard-00042.parquet``, ...) are committed in three steps:

1. **stage**: every file is written under ``_work/attempts/NAME/ATTEMPT/`` (a fresh attempt id);
2. **commit**: ``_work/commits/NAME.json``, the unit's entry (counts, bytes and sha256 of every
   file, the attempt id), is created exclusively (:func:`spear.storage.create_exclusive`). Of
   two attempts at one unit (a task Ray retried after its worker died, a duplicated task, a
   second driver) exactly one wins; the loser drops its staged files and returns the winner's
   entry, so the outputs and the entry always agree;
3. **publish**: the winner's staged files move to their final names (a rename locally, a
   server-side copy on S3), in the entry's order: the data file last. Each appears whole.

A worker or driver killed at any point leaves staged files of an uncommitted unit (removed by
:func:`recover` on the next run, which redoes the unit) or a committed unit not yet fully
published (:func:`recover` finishes publishing it from the staged files). Final folders never
hold a partial or temporary file. Readers go through the index, built from the entries.

Test hook: ``SPEAR_FAULTS="POINT:NAME[:hang],..."`` makes the worker process exit abruptly (as
if killed), or hang, at ``POINT`` (``mid_stage``, ``before_commit``, ``before_publish``) of
unit ``NAME``, once per ``SPEAR_FAULTS_DIR`` (a folder that records which faults fired).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from spear.errors import SpearError
from spear.storage import (
    StorageConfig,
    create_exclusive,
    filesystem,
    join,
    list_names,
    move,
    read_bytes,
    remove_tree,
    write_atomic,
)

log = logging.getLogger(__name__)

ATTEMPTS = "_work/attempts"
COMMITS = "_work/commits"


def commit_unit(
    out: str,
    name: str,
    files: dict[str, bytes],
    entry: dict[str, Any],
    storage: StorageConfig,
) -> dict[str, Any]:
    """Stage, commit and publish one unit; returns the committed entry (this attempt's or,
    when another attempt committed first, the winner's).

    ``files`` maps paths relative to ``out`` to their bytes, in publishing order (data last).
    ``entry`` is the unit's metadata; ``attempt`` and ``files`` (bytes, sha256) are added.
    """
    attempt = uuid.uuid4().hex[:16]
    staged = join(out, ATTEMPTS, name, attempt)
    for i, (rel, data) in enumerate(files.items()):
        write_atomic(join(staged, rel), data, storage)
        if i == 0:
            _fault("mid_stage", name)
    mine = entry | {
        "name": name,
        "attempt": attempt,
        "files": {
            rel: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for rel, data in files.items()
        },
    }
    _fault("before_commit", name)
    marker = join(out, COMMITS, f"{name}.json")
    if create_exclusive(marker, json.dumps(mine, sort_keys=True).encode(), storage):
        committed = mine
    else:
        committed = json.loads(read_bytes(marker, storage))
        log.info("unit %s: attempt %s lost to %s", name, attempt, committed.get("attempt"))
        remove_tree(staged, storage)
        _remove_if_empty(join(out, ATTEMPTS, name), storage)
    _fault("before_publish", name)
    publish(out, committed, storage)
    return committed


def publish(out: str, entry: dict[str, Any], storage: StorageConfig) -> None:
    """Move a committed unit's staged files to their final names; idempotent (a file already
    moved by an earlier or concurrent call is skipped)."""
    name, attempt = entry["name"], entry["attempt"]
    staged = join(out, ATTEMPTS, name, attempt)
    for rel, meta in entry["files"].items():
        dst = join(out, rel)
        try:
            move(join(staged, rel), dst, storage)
        except FileNotFoundError:
            if not _has_size(dst, int(meta["bytes"]), storage):
                raise SpearError(
                    f"{out!r}: unit {name} is committed but {rel} is neither staged nor "
                    f"published; delete {join(out, COMMITS, name + '.json')} to redo the unit"
                ) from None
    # Only this attempt's folder: other attempts of the unit may still be staging (they clean
    # up after themselves when they lose; recover() removes what killed ones leave).
    remove_tree(staged, storage)
    _remove_if_empty(join(out, ATTEMPTS, name), storage)


def _remove_if_empty(url: str, storage: StorageConfig) -> None:
    fs, path = filesystem(url, storage)
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if proto in ("file", "local"):  # object stores have no folders to leave behind
        with contextlib.suppress(OSError):
            os.rmdir(path)


def _has_size(url: str, size: int, storage: StorageConfig) -> bool:
    fs, path = filesystem(url, storage)
    try:
        return int(fs.size(path)) == size
    except FileNotFoundError:
        return False


def committed_names(out: str, storage: StorageConfig) -> set[str]:
    """Names of the units with a commit entry."""
    return {
        n[: -len(".json")] for n in list_names(join(out, COMMITS), storage) if n.endswith(".json")
    }


def read_entries(
    out: str, names: Iterable[str], storage: StorageConfig
) -> dict[str, dict[str, Any]]:
    """The commit entries of ``names``, fetched in one concurrent request."""
    names = sorted(names)
    if not names:
        return {}
    fs, base = filesystem(join(out, COMMITS), storage)
    paths = [posixpath.join(base, f"{n}.json") for n in names]
    blobs = fs.cat(paths)
    by_base = {posixpath.basename(k): v for k, v in blobs.items()}
    return {n: json.loads(by_base[f"{n}.json"]) for n in names}


def recover(
    out: str, storage: StorageConfig, expected: Callable[[str], list[str]] | None = None
) -> set[str]:
    """Bring ``out`` to a clean state after a killed run; returns the committed unit names.

    Staged files of uncommitted units are deleted (the unit is redone); committed units whose
    staged files remain are published. ``expected(name)`` lists files (relative to ``out``) a
    committed unit must have published: a unit missing one (a shard deleted or lost since) is
    uncommitted, so this run redoes it. The check lists each folder once: O(units) names."""
    done = committed_names(out, storage)
    pending = list_names(join(out, ATTEMPTS), storage)
    entries = read_entries(out, [n for n in pending if n in done], storage)
    for name in pending:
        if name in entries:
            publish(out, entries[name], storage)
        # What is left (attempts of killed writers; all of an uncommitted unit) is garbage.
        remove_tree(join(out, ATTEMPTS, name), storage)
    if expected is not None and done:
        listed: dict[str, set[str]] = {}
        for name in sorted(done):
            for rel in expected(name):
                folder, base = posixpath.split(rel)
                if folder not in listed:
                    listed[folder] = set(list_names(join(out, folder), storage))
                if base not in listed[folder]:
                    log.warning("unit %s: %s is missing; the unit is redone", name, rel)
                    fs, path = filesystem(join(out, COMMITS, f"{name}.json"), storage)
                    fs.rm(path)
                    done.discard(name)
                    break
    return done


def clean_attempts(out: str, storage: StorageConfig) -> None:
    """Delete what killed attempts left under ``_work/attempts``; call when every unit is
    committed and published (no writer of this job runs any more)."""
    remove_tree(join(out, ATTEMPTS), storage)


def _fault(point: str, name: str) -> None:
    """The test hook (module docstring): exit this process abruptly, or hang, once."""
    spec = os.environ.get("SPEAR_FAULTS")
    if not spec:
        return
    actions = {f: "exit" for f in spec.split(",")} | {
        f[: -len(":hang")]: "hang" for f in spec.split(",") if f.endswith(":hang")
    }
    action = actions.get(f"{point}:{name}")
    if action is None:
        return
    record = os.path.join(os.environ.get("SPEAR_FAULTS_DIR", "/tmp"), f"{point}-{name}")
    try:
        with open(record, "x"):
            pass
    except FileExistsError:
        return
    log.error("test fault %s at unit %s: %s", point, name, action)
    if action == "hang":
        time.sleep(3600)
    os._exit(17)
