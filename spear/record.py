"""The run record: what decides a job's outputs, kept beside them and checked on every resume.

Every job that can be re-run into the same output folder (manifest, decode, embed, tokenize,
features, quantiser training, student training) writes one :class:`RunRecord` there before it
makes anything, and a re-run compares its own record with it:

- ``kind``: the job (``manifest``, ``decode``, ``embed``, ``tokenize``, ...);
- ``decides``: the settings, and the ids or digests of the models, that decide the outputs.
  Speed settings (threads, batch sizes, actors, devices) are left out: a resume may change them;
- ``digest``: the **content** digest of the job's inputs (a manifest's item columns, an
  embedding set's items and frames, a token run's id), never a URL: a copy of the inputs at
  another URL is the same run, another content is another run. ``digest_of`` names it in words;
- ``items``, ``units``: how many inputs, and the units (shards, parts) they are cut into, where
  the job has them;
- ``info``: recorded, never compared (where the inputs were read from, the whole config).

:func:`diff` is the one comparison: it names every differing key exactly
(``items_per_shard: 10000 there, 500 now``; ``manifest content (items digest): ...``), and
:func:`check_record` refuses a run whose record differs from the one that made the outputs, in
one line, before any cluster work. With nothing made yet, the record is (re)written: a corrected
retry may change it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from spear.credentials import redact
from spear.errors import SpearError
from spear.formats import table_digest
from spear.storage import StorageConfig, exists, join, read_bytes, write_atomic

RECORD_FILE = "_work/plan.json"
"""Where a job over manifest items (and the manifest and decode jobs) keeps its record."""
RECORD_VERSION = 3
"""2: the unit jobs' plan, whose digest covered the unit cut (a changed ``items_per_shard`` read
as another manifest); 3: the digest covers the inputs alone, every resumable job writes one."""
COMPARED = ("kind", "digest", "decides", "items", "units")
"""The keys :func:`diff` compares, in the order a refusal names them (the inputs, the settings,
then the counts that follow from both); the rest is recorded only."""
SHOWN = 4
"""Differences a refusal names before ``and N more``."""


@dataclass
class RunRecord:
    """What decides a run's outputs (see the module docstring)."""

    kind: str
    decides: dict[str, Any]
    digest: str = ""
    """Content digest of the inputs (never a URL); empty where the inputs are ``decides``."""
    digest_of: str = "inputs"
    """What the digest is of, in words: how a refusal names a change of it."""
    items: int | None = None
    units: int | None = None
    info: dict[str, Any] = field(default_factory=dict)
    """Recorded, never compared."""

    @property
    def run_id(self) -> str:
        """Digest of everything that decides the outputs: the id they carry, equal for a
        resumed run (and for a copy of the inputs elsewhere), new for any other."""
        d = {k: v for k, v in self.as_dict().items() if k in ("version", *COMPARED)}
        text = json.dumps(d, sort_keys=True, default=str).encode()
        return f"{self.kind}-{hashlib.blake2b(text, digest_size=8).hexdigest()}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": RECORD_VERSION,
            "kind": self.kind,
            "items": self.items,
            "units": self.units,
            "digest": self.digest,
            "digest_of": self.digest_of,
            "decides": self.decides,
            "info": self.info,
        }


def items_record(
    kind: str,
    table: pa.Table,
    digest_columns: tuple[str, ...],
    decides: dict[str, Any],
    info: dict[str, Any] | None = None,
) -> RunRecord:
    """The record of a job over manifest items: ``table`` in the job's order (with its
    ``unit`` column, when it cuts units) digested over ``digest_columns``. The unit cut is not
    digested: it follows from the items and ``decides`` (``items_per_shard`` and the like)."""
    units = None
    if "unit" in table.column_names:
        units = int(table["unit"][-1].as_py()) + 1 if table.num_rows else 0
    digest = table_digest(table, digest_columns)
    return RunRecord(
        kind,
        decides,
        digest,
        "manifest content (items digest)",
        table.num_rows,
        units,
        info or {},
    )


def diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Every difference between two records' :data:`COMPARED` keys, as ``key: old there, new
    now``: ``decides`` keys by their dotted path (``teachers.wavlm.quantizer_id``), the digest
    by what it is of (the new record's ``digest_of``)."""
    out = []
    for key in COMPARED:
        label = key
        if key == "decides":
            label = ""
        elif key == "digest":
            label = str(new.get("digest_of") or old.get("digest_of") or "digest")
        out += _diff(old.get(key), new.get(key), label)
    return out


def _diff(old: Any, new: Any, path: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(k), new.get(k), f"{path}.{k}" if path else str(k))
        return out
    return [] if old == new else [f"{path}: {_show(old)} there, {_show(new)} now"]


def _show(value: Any) -> str:
    return "(none)" if value is None else repr(value)


def refusal(where: str, old: dict[str, Any], diffs: list[str]) -> str:
    """The one-line refusal naming what differs (at most :data:`SHOWN` differences)."""
    shown = "; ".join(diffs[:SHOWN])
    more = f"; and {len(diffs) - SHOWN} more" if len(diffs) > SHOWN else ""
    kind = old.get("kind") or "the"
    return f"{where} holds {kind} outputs of another run ({shown}{more}); use another --out"


def read_record(out: str, storage: StorageConfig, path: str = RECORD_FILE) -> dict[str, Any] | None:
    """The record under ``out`` as written (None when there is none); one of another record
    version is a clear error."""
    url = join(out, path)
    if not exists(url, storage):
        return None
    old: dict[str, Any] = json.loads(read_bytes(url, storage))
    _check_version(repr(out), path, old)
    return old


def _check_version(where: str, what: str, old: dict[str, Any] | None) -> None:
    if old is None or old.get("version") != RECORD_VERSION or "kind" not in old:
        was = "no run record"
        if old is not None:
            was = (
                f"run record version {old.get('version')}" if "kind" in old else "an earlier layout"
            )
        raise SpearError(
            f"{where} was written by another spear version ({what}: {was}, this spear writes "
            f"run record version {RECORD_VERSION}); use another --out"
        )


def _fit_to_write(record: RunRecord) -> dict[str, Any]:
    """The record as written: a signed URL's signature (in a checkpoint or manifest URL) is
    masked; keys are spear's names of settings and ids, so none is masked for its name (the
    train record's ``token_run`` is the tokenize run's id)."""
    return dict(redact(record.as_dict(), by_name=False))


def compare(where: str, what: str, old: dict[str, Any] | None, record: RunRecord) -> None:
    """Refuse ``record`` unless it equals ``old``, a record kept inside an output (``what``: a
    quantiser's header, a checkpoint) rather than in its own file."""
    _check_version(where, what, old)
    assert old is not None
    diffs = diff(old, _fit_to_write(record))
    if diffs:
        raise SpearError(refusal(where, old, diffs))


def check_record(
    out: str,
    record: RunRecord,
    storage: StorageConfig,
    *,
    made: bool,
    path: str = RECORD_FILE,
) -> None:
    """Refuse a run whose record differs from the one that made outputs in ``out``; else write
    it. ``made``: ``out`` already holds outputs of a run (committed units, checkpoints, a
    listing). With nothing made, an earlier record is replaced."""
    new = _fit_to_write(record)
    if made:
        old = read_record(out, storage, path)
        if old is None:
            raise SpearError(
                f"{out!r} holds {record.kind} outputs but no {path}: cannot tell what made "
                "them; use another --out"
            )
        diffs = diff(old, new)
        if diffs:
            raise SpearError(refusal(repr(out), old, diffs))
        return
    write_atomic(join(out, path), json.dumps(new, indent=1, sort_keys=True).encode(), storage)
