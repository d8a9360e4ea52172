"""Opening a tokenize output: its index, its shards' files and teachers (the one reader core).

:func:`open_run` is what every consumer (the PyTorch and Ray readers, the student, the lhotse
export, the report) starts from: the shards the index lists (files the index does not list
are ignored, whatever their name), each shard's metadata read and checked, one set of
teachers and quantisers for the whole output (a shard of another quantiser, wherever it sits,
is refused).
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from spear.errors import SpearError
from spear.shards.schema import (
    INDEX_FILE,
    QUARANTINE_DIR,
    TOKEN_INDEX_SCHEMA,
    TokenTeacherInfo,
    read_token_teachers,
)
from spear.storage import StorageConfig, exists, filesystem, join, read_bytes, unstrip

READ_THREADS = 32
"""Concurrent footer reads when opening an output (object stores answer each in ~10-50 ms)."""


class ShardError(SpearError):
    """A token output is missing, unfinished or unreadable."""


# ---------------------------------------------------------------- the index


@dataclass(frozen=True)
class ShardEntry:
    """One row of ``index.parquet``."""

    shard: int
    path: str
    """Relative to OUT: ``tokens/shard-NNNNN.parquet``."""
    rows: int
    quarantined: int
    bytes: int
    sha256: str
    audio_seconds: float

    @property
    def quarantine_path(self) -> str:
        """Relative to OUT: ``quarantine/shard-NNNNN.parquet``."""
        return posixpath.join(QUARANTINE_DIR, posixpath.basename(self.path))


def _storage(storage: StorageConfig | None) -> StorageConfig:
    return (storage or StorageConfig()).resolved()


def open_index(out: str, storage: StorageConfig | None = None) -> pa.Table:
    """``OUT/index.parquet`` as a table; :class:`ShardError` when OUT has none."""
    storage = _storage(storage)
    url = join(out, INDEX_FILE)
    if not exists(url, storage):
        raise ShardError(f"{out!r} is not a finished tokenize output (no {INDEX_FILE})")
    try:
        return pq.read_table(io.BytesIO(read_bytes(url, storage)))
    except (pa.ArrowException, OSError) as err:
        raise ShardError(f"cannot read {url!r}: {err}") from None


def list_shards(out: str, storage: StorageConfig | None = None) -> list[ShardEntry]:
    """The index's rows, by shard number."""
    table = open_index(out, storage)
    missing = [n for n in TOKEN_INDEX_SCHEMA.names if n not in table.column_names]
    if missing:
        raise ShardError(f"{join(out, INDEX_FILE)!r} lacks columns {missing}")
    rows = table.select(TOKEN_INDEX_SCHEMA.names).to_pylist()
    return sorted((ShardEntry(**r) for r in rows), key=lambda e: e.shard)


def shard_url(out: str, entry: ShardEntry) -> str:
    return join(out, entry.path)


def read_table(url: str, storage: StorageConfig, columns: Sequence[str] | None = None) -> pa.Table:
    """One Parquet file (a shard, the index, a quarantine file), whole, by URL."""
    fs, path = filesystem(url, storage)
    try:
        with fs.open(path, "rb") as f:
            return pq.read_table(io.BytesIO(f.read()), columns=list(columns) if columns else None)
    except FileNotFoundError:
        raise ShardError(f"{url!r} does not exist") from None
    except (pa.ArrowException, OSError) as err:
        raise ShardError(f"cannot read {url!r}: {err}") from None


def _read_schema(url: str, storage: StorageConfig) -> pa.Schema:
    fs, path = filesystem(url, storage)
    try:
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).schema_arrow
    except FileNotFoundError:
        raise ShardError(f"{url!r} does not exist") from None
    except (pa.ArrowException, OSError) as err:
        raise ShardError(f"cannot read {url!r}: {err}") from None


def teachers_of(schema: pa.Schema, url: str) -> list[TokenTeacherInfo]:
    """The teachers of a shard's schema; :class:`ShardError` naming ``url`` otherwise."""
    try:
        return read_token_teachers(schema)
    except (ValueError, KeyError, TypeError) as err:
        raise ShardError(f"{url!r}: {err}") from None


@dataclass(frozen=True)
class TokenRun:
    """A tokenize output as its readers see it: the indexed shards and their one set of
    teachers."""

    out: str
    storage: StorageConfig
    entries: list[ShardEntry]
    teachers: list[TokenTeacherInfo]

    def url(self, entry: ShardEntry) -> str:
        return shard_url(self.out, entry)

    def urls(self) -> list[str]:
        """Full URLs of the shards (for pyarrow, pandas, DuckDB, Ray Data)."""
        fs, _ = filesystem(self.out, self.storage)
        return [unstrip(fs, filesystem(self.url(e), self.storage)[1]) for e in self.entries]

    @property
    def num_rows(self) -> int:
        return sum(e.rows for e in self.entries)

    def select(self, prefixes: Sequence[str] | None) -> list[TokenTeacherInfo]:
        """The teachers named by ``prefixes`` in that order (all when None); a name the output
        lacks is an error."""
        known = {t.prefix: t for t in self.teachers}
        if prefixes is None:
            return list(self.teachers)
        unknown = [p for p in prefixes if p not in known]
        if unknown:
            raise ShardError(f"teachers {unknown} are not in {self.out!r} (it has {list(known)})")
        return [known[p] for p in prefixes]


def open_run(out: str, storage: StorageConfig | None = None) -> TokenRun:
    """The indexed shards of ``out`` with their teachers, every shard's metadata checked.

    Reads the index and every shard's Parquet footer (concurrently; no row data). Raises
    :class:`ShardError` when OUT is not a finished output, a shard is missing or not a token
    shard, or two shards record different teachers or quantisers."""
    storage = _storage(storage)
    entries = list_shards(out, storage)
    urls = [shard_url(out, e) for e in entries]
    with ThreadPoolExecutor(min(READ_THREADS, max(1, len(urls)))) as pool:
        schemas = list(pool.map(lambda u: _read_schema(u, storage), urls))
    teachers: list[TokenTeacherInfo] = []
    for i, (url, schema) in enumerate(zip(urls, schemas, strict=True)):
        found = teachers_of(schema, url)
        if i == 0:
            teachers = found
        elif found != teachers:
            raise ShardError(
                f"{url!r} records other teachers or quantisers than {urls[0]!r} "
                f"({_teachers_text(found)} vs {_teachers_text(teachers)}): codes of two "
                "quantisers must not be mixed; run 'spear shards validate'"
            )
    return TokenRun(out, storage, entries, teachers)


def _teachers_text(teachers: list[TokenTeacherInfo]) -> str:
    return ", ".join(f"{t.prefix}={t.quantizer_id}" for t in teachers) or "none"


def shard_teachers(out: str, storage: StorageConfig | None = None) -> list[TokenTeacherInfo]:
    """The teachers of the output (every shard checked, see :func:`open_run`)."""
    return open_run(out, storage).teachers


def shard_urls(out: str, storage: StorageConfig | None = None) -> list[str]:
    """Full URLs of the shards listed in the index (for pyarrow / pandas / DuckDB)."""
    return open_run(out, storage).urls()
