"""Reading what a run left behind: a tokenize run's report, index, quarantine and code counts
from a sample of its token shards; a train run's metrics rows."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spear.errors import SpearError
from spear.formats import QUARANTINE_SCHEMA
from spear.shards.schema import TokenTeacherInfo, codes_from_bytes, read_token_teachers
from spear.storage import StorageConfig, exists, filesystem, join, read_bytes


@dataclass(frozen=True)
class CodebookUsage:
    """Code counts of one teacher over the shards read."""

    teacher: TokenTeacherInfo
    counts: np.ndarray
    """(num_codebooks, codebook_size) int64."""
    frames: int

    def perplexity(self) -> np.ndarray:
        """Per codebook: exp(entropy of the code distribution); K when usage is uniform."""
        p = self.counts / np.maximum(self.counts.sum(axis=1, keepdims=True), 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ent = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
        return np.asarray(np.exp(ent))

    def dead(self) -> np.ndarray:
        """Per codebook: entries never used."""
        return np.asarray((self.counts == 0).sum(axis=1))


def count_codes(table: pa.Table, teacher: TokenTeacherInfo, into: np.ndarray) -> int:
    """Add the code counts of ``teacher``'s column in ``table`` to ``into`` (C, K); frames."""
    col = table.column(f"{teacher.prefix}_codes").drop_null()
    if len(col) == 0:
        return 0
    c, k = teacher.num_codebooks, teacher.codebook_size
    codes = codes_from_bytes(b"".join(col.to_pylist()), c).astype(np.int64)  # (T, C)
    if codes.size and int(codes.max()) >= k:
        raise SpearError(f"{teacher.prefix}: code {int(codes.max())} outside 0..{k - 1}")
    flat = (codes + np.arange(c, dtype=np.int64) * k).ravel()  # codebook c -> bins c*K..
    into += np.bincount(flat, minlength=c * k).reshape(c, k)
    return int(codes.shape[0])


# ---------------------------------------------------------------- loading a run


@dataclass(kw_only=True)
class TokenizeRun:
    """What the report of a tokenize run is drawn from."""

    url: str
    report: dict[str, Any]
    index: pa.Table | None = None
    quarantine: pa.Table | None = None
    usage: list[CodebookUsage] = field(default_factory=list)
    shards_read: int = 0
    shards_total: int = 0


def _read_parquet_dir(url: str, storage: StorageConfig, schema: pa.Schema) -> pa.Table | None:
    fs, path = filesystem(url, storage)
    if not fs.exists(path):
        return None
    files = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
    if not files:
        return None
    tables = [pq.read_table(p, filesystem=fs).select(schema.names) for p in files]
    return pa.concat_tables([t.cast(schema.remove_metadata()) for t in tables])


def _sample(n: int, k: int) -> list[int]:
    """``k`` evenly spread indexes of ``n`` (all when ``k >= n``)."""
    if k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})


def load_tokenize_run(url: str, storage: StorageConfig, max_shards: int = 16) -> TokenizeRun:
    """Read a tokenize run's report, index, quarantine and a sample of its token shards."""
    report = read_report(url, storage)
    run = TokenizeRun(url=url, report=report)
    if exists(join(url, "index.parquet"), storage):
        fs, path = filesystem(join(url, "index.parquet"), storage)
        run.index = pq.read_table(path, filesystem=fs).sort_by("shard")
    run.quarantine = _read_parquet_dir(join(url, "quarantine"), storage, QUARANTINE_SCHEMA)
    if run.index is not None and run.index.num_rows:
        paths = run.index.column("path").to_pylist()
        run.shards_total = len(paths)
        usage: dict[str, tuple[TokenTeacherInfo, np.ndarray, list[int]]] = {}
        for i in _sample(len(paths), max_shards):
            fs, path = filesystem(join(url, paths[i]), storage)
            pf = pq.ParquetFile(fs.open(path, "rb"))
            teachers = read_token_teachers(pf.schema_arrow)
            table = pf.read(columns=[f"{t.prefix}_codes" for t in teachers])
            for t in teachers:
                if t.prefix not in usage:
                    usage[t.prefix] = (
                        t,
                        np.zeros((t.num_codebooks, t.codebook_size), np.int64),
                        [0],
                    )
                info, counts, frames = usage[t.prefix]
                if info.quantizer_id != t.quantizer_id:
                    raise SpearError(
                        f"{paths[i]}: {t.prefix} quantizer {t.quantizer_id} differs from "
                        f"{info.quantizer_id} in earlier shards"
                    )
                frames[0] += count_codes(table, t, counts)
            run.shards_read += 1
        run.usage = [CodebookUsage(teacher=t, counts=c, frames=f[0]) for t, c, f in usage.values()]
    return run


def read_report(url: str, storage: StorageConfig) -> dict[str, Any]:
    where = join(url, "report.json")
    if not exists(where, storage):
        raise SpearError(f"no report.json under {url}: is it a finished `spear tokenize` --out?")
    try:
        data = json.loads(read_bytes(where, storage))
    except json.JSONDecodeError as err:
        raise SpearError(f"{where}: not JSON ({err})") from None
    if not isinstance(data, dict):
        raise SpearError(f"{where}: expected a JSON object")
    return data


@dataclass(frozen=True)
class TrainRun:
    """What the report of a train run is drawn from."""

    rows: list[dict[str, Any]]
    in_progress: bool
    """The run's rank 0 has logged steps past ``metrics.jsonl`` (or there is none yet): it is
    running, or was stopped before it merged them."""


def _parse_rows(lines: list[str], where: str) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines) - 1:  # a writer killed mid-line
                continue
            raise SpearError(f"{where}:{n + 1}: not JSON") from None
    return rows


def load_train_metrics(url: str, storage: StorageConfig) -> list[dict[str, Any]]:
    """The rows of a train run's ``metrics.jsonl`` (blank and truncated last lines skipped)."""
    where = join(url, "metrics.jsonl")
    rows = _parse_rows(read_bytes(where, storage).decode().splitlines(), where)
    if not rows:
        raise SpearError(f"{where}: no rows")
    return rows


def load_train_run(url: str, storage: StorageConfig) -> TrainRun:
    """A train run's rows, finished or in progress: ``metrics.jsonl`` (written when a run
    ends) and the per-step rows rank 0 writes while it runs (``metrics/step-*.json``), whichever
    reaches the later step; a step logged by both is taken from the per-step rows."""
    merged = join(url, "metrics.jsonl")
    rows = load_train_metrics(url, storage) if exists(merged, storage) else []
    fs, path = filesystem(join(url, "metrics"), storage)
    names = (
        sorted(p for p in fs.ls(path, detail=False) if p.endswith(".json"))
        if fs.exists(path)
        else []
    )
    live = []
    for name, blob in sorted(fs.cat(names).items()) if names else []:
        live += _parse_rows([blob.decode()], name)  # a file being replaced reads whole or not
    if not rows and not live:
        raise SpearError(f"{url} holds no training rows yet (metrics.jsonl or metrics/step-*.json)")
    last = max((int(r.get("step", 0)) for r in rows), default=-1)
    in_progress = not rows or any(int(r.get("step", 0)) > last for r in live)
    if in_progress:
        by_step = {int(r.get("step", 0)): r for r in rows}
        by_step |= {int(r.get("step", 0)): r for r in live}
        rows = [by_step[k] for k in sorted(by_step)]
    return TrainRun(rows=rows, in_progress=in_progress)
