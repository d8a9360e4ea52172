"""Embedding shards (``schema: embedding_shard``): float16 frame embeddings per item.

``spear embed`` writes a teacher's embeddings for quantiser training; ``spear features`` writes
a student's in the same layout (``schema: student_features``). One module owns the layout:

* :func:`embedding_shard_table` - the one writer: a shard's table with its schema and metadata
  (``dim`` always; the producer adds teacher, layer, frame rate, checkpoint sha256, ...).
* :func:`embedding_index_table` / :func:`write_embedding_index` - ``OUT/index.parquet`` of a
  ``spear embed`` output, built from the shards' commit entries (:mod:`spear.commit`) once
  every shard is committed: what a reader reads.
* :func:`committed_shards` - the reader: the shards the index lists (never a folder listing,
  so a stray or copied file under ``embeddings/`` is never read), or one file given by URL;
  :func:`read_embedding_shard`, :func:`embedding_frames`.
* :func:`validate_embeddings` - every problem of an output (an empty list: valid).
* :func:`spear.testing.write_embedding_shards` - a valid output built with these, for tests.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spear.errors import SpearError
from spear.formats.parquet import parquet_bytes, read_metadata, with_metadata

if TYPE_CHECKING:  # storage (fsspec) is imported by the readers and writers when called
    from spear.storage import StorageConfig

EMBEDDING_SHARD_VERSION = 1
EMBEDDING_SHARD_KIND = "embedding_shard"
STUDENT_FEATURES_KIND = "student_features"
"""The same layout, written by ``spear features`` (a student's frames, not a teacher's)."""
EMBEDDING_INDEX_VERSION = 1

EMBEDDINGS_DIR = "embeddings"
INDEX_FILE = "index.parquet"
SUCCESS_FILE = "_SUCCESS.json"
PLAN_FILE = "_work/plan.json"

EMBEDDING_SHARD_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("num_frames", pa.int32(), nullable=False),
        pa.field(
            "embeddings", pa.binary(), nullable=False
        ),  # float16 LE, (num_frames, dim) C-order
    ]
)
EMBEDDING_DTYPE = np.dtype("<f2")

EMBEDDING_INDEX_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.int32(), nullable=False),
        pa.field("path", pa.string(), nullable=False),  # relative to OUT
        pa.field("rows", pa.int64(), nullable=False),
        pa.field("frames", pa.int64(), nullable=False),
        pa.field("bytes", pa.int64(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),  # of the file
    ]
)


class EmbeddingDataError(SpearError):
    """Embedding shards are missing, unfinished or inconsistent."""


# ---------------------------------------------------------------- writing


def shard_path(name: str, directory: str = EMBEDDINGS_DIR) -> str:
    """Relative to OUT: ``embeddings/shard-NNNNN.parquet`` for the unit ``shard-NNNNN``
    (``spear features``: ``features/part-NNNNN.parquet``)."""
    return f"{directory}/{name}.parquet"


def embedding_shard_table(
    item_ids: Sequence[str],
    num_frames: np.ndarray,
    embeddings: Iterable[Any],
    *,
    dim: int,
    kind: str = EMBEDDING_SHARD_KIND,
    **meta: Any,
) -> pa.Table:
    """One shard's table: ``embeddings[i]`` (bytes-like) holds ``num_frames[i] * dim``
    float16 values (little-endian, row-major); ``meta`` goes into the file's ``spear``
    metadata beside ``dim``."""
    schema = with_metadata(
        EMBEDDING_SHARD_SCHEMA, kind, EMBEDDING_SHARD_VERSION, dim=int(dim), **meta
    )
    return pa.table(
        {
            "item_id": pa.array([str(i) for i in item_ids], pa.string()),
            "num_frames": pa.array(np.asarray(num_frames, dtype=np.int32), pa.int32()),
            "embeddings": pa.array([bytes(x) for x in embeddings], pa.binary()),
        },
        schema=schema,
    )


def embedding_index_table(
    entries: list[dict[str, Any]], directory: str = EMBEDDINGS_DIR
) -> pa.Table:
    """``index.parquet`` from the shards' commit entries (``unit``, ``name``, ``rows``,
    ``frames`` and the ``files`` the commit recorded), in shard order."""
    rows = []
    for e in sorted(entries, key=lambda e: int(e["unit"])):
        path = shard_path(str(e["name"]), directory)
        f = e["files"][path]
        rows.append(
            {
                "shard": int(e["unit"]),
                "path": path,
                "rows": int(e["rows"]),
                "frames": int(e["frames"]),
                "bytes": int(f["bytes"]),
                "sha256": str(f["sha256"]),
            }
        )
    schema = with_metadata(EMBEDDING_INDEX_SCHEMA, "embedding_index", EMBEDDING_INDEX_VERSION)
    return pa.Table.from_pylist(rows, schema=schema)


def write_embedding_index(
    out: str, entries: list[dict[str, Any]], storage: StorageConfig, directory: str = EMBEDDINGS_DIR
) -> pa.Table:
    """Write ``OUT/index.parquet`` for every shard's commit entry (once all are committed)."""
    from spear.storage import join, write_atomic

    table = embedding_index_table(entries, directory)
    write_atomic(join(out, INDEX_FILE), parquet_bytes(table), storage)
    return table


# ---------------------------------------------------------------- reading


def read_index(out: str, storage: StorageConfig) -> list[dict[str, Any]]:
    """The rows of ``OUT/index.parquet``, in shard order."""
    from spear.storage import join, read_bytes

    url = join(out, INDEX_FILE)
    try:
        table = pq.read_table(io.BytesIO(read_bytes(url, storage)))
    except (pa.ArrowException, OSError) as err:
        raise EmbeddingDataError(f"cannot read {url!r}: {err}") from None
    missing = [n for n in EMBEDDING_INDEX_SCHEMA.names if n not in table.column_names]
    if missing or read_metadata(table.schema).get("schema") != "embedding_index":
        raise EmbeddingDataError(f"{url!r} is not an embedding index (lacks {missing})")
    return sorted(table.to_pylist(), key=lambda r: int(r["shard"]))


def committed_shards(url: str, storage: StorageConfig) -> list[str]:
    """The shard URLs to read at ``url``: one shard file, or the shards a finished ``spear
    embed`` output's index lists (files the index does not list are never read). Missing,
    unfinished and unindexed outputs are one-line errors."""
    from spear.commit import committed_names
    from spear.storage import exists, filesystem, join

    if not exists(url, storage):
        raise EmbeddingDataError(
            f"no embeddings at {url!r}: nothing is there (write them with spear embed --out URL)"
        )
    fs, path = filesystem(url, storage)
    if fs.isfile(path):
        return [url]
    if exists(join(url, INDEX_FILE), storage):
        return [join(url, r["path"]) for r in read_index(url, storage)]
    if exists(join(url, PLAN_FILE), storage) or fs.isdir(path.rstrip("/") + "/" + EMBEDDINGS_DIR):
        if exists(join(url, SUCCESS_FILE), storage):
            raise EmbeddingDataError(
                f"embeddings {url!r} have no {INDEX_FILE} (an earlier spear wrote them); rerun "
                "the same spear embed command to write it"
            )
        n = len(committed_names(url, storage))
        raise EmbeddingDataError(
            f"embeddings {url!r} are unfinished: spear embed has committed {n} shard(s) and "
            f"no {INDEX_FILE}; rerun the same spear embed command to finish them"
        )
    raise EmbeddingDataError(
        f"{url!r} is not an embedding shard nor a finished spear embed output (no {INDEX_FILE})"
    )


def read_embedding_shard(
    url: str, storage: StorageConfig, columns: Sequence[str] | None = None
) -> pa.Table:
    """One shard (only ``columns``, when given), its ``spear`` metadata in its schema."""
    from spear.storage import filesystem

    fs, path = filesystem(url, storage)
    try:
        with fs.open(path, "rb") as f:
            return pq.read_table(io.BytesIO(f.read()), columns=list(columns) if columns else None)
    except Exception as err:  # ArrowInvalid for a damaged file, KeyError for a missing column
        raise EmbeddingDataError(
            f"{url}: not an embedding shard ({type(err).__name__}: {err})"
        ) from None


def embedding_frames(blob: bytes, dim: int) -> np.ndarray:
    """An ``embeddings`` value -> float16 (frames, dim) (a read-only view)."""
    return np.frombuffer(blob, dtype=EMBEDDING_DTYPE).reshape(-1, dim)


# ---------------------------------------------------------------- checking


def validate_embeddings(out: str, storage: StorageConfig) -> list[str]:
    """Every problem of the ``spear embed`` output ``out`` (an empty list: valid): the index,
    each listed file's bytes and sha256, its schema and metadata (one ``dim``, teacher and
    weights for all), rows and frames against the index, each item's bytes against its
    frames, item ids unique, and shard files the index does not list."""
    from spear.storage import exists, join, list_names, read_bytes

    try:
        index = read_index(out, storage) if exists(join(out, INDEX_FILE), storage) else None
    except EmbeddingDataError as err:
        return [str(err)]
    if index is None:
        return [f"{out!r} has no {INDEX_FILE}: not a finished spear embed output"]
    problems: list[str] = []
    seen: Counter[str] = Counter()
    agreed: dict[str, set[str]] = {"dim": set(), "teacher": set(), "checkpoint_sha256": set()}
    for row in index:
        url = join(out, row["path"])
        try:
            data = read_bytes(url, storage)
        except FileNotFoundError:
            problems.append(f"{row['path']}: listed in the index, missing")
            continue
        if len(data) != row["bytes"] or hashlib.sha256(data).hexdigest() != row["sha256"]:
            problems.append(f"{row['path']}: bytes or sha256 differ from the index")
        try:
            table = pq.read_table(io.BytesIO(data))
        except (pa.ArrowException, OSError) as err:
            problems.append(f"{row['path']}: unreadable ({err})")
            continue
        problems += _check_shard(row, table, agreed)
        seen.update(table["item_id"].to_pylist() if "item_id" in table.column_names else [])
    for key, values in agreed.items():
        if len(values) > 1:
            problems.append(f"shards disagree on {key}: {sorted(values)}")
    dup = [i for i, n in seen.items() if n > 1]
    if dup:
        problems.append(f"{len(dup)} item ids in more than one row (e.g. {sorted(dup)[:3]})")
    listed = {r["path"] for r in index}
    for folder in sorted({posixpath.dirname(p) for p in listed} or {EMBEDDINGS_DIR}):
        stray = sorted(
            n
            for n in list_names(join(out, folder), storage)
            if n.endswith(".parquet") and f"{folder}/{n}" not in listed
        )
        if stray:
            problems.append(f"{folder}/: {len(stray)} files not in the index ({stray[:3]})")
    return problems


def _check_shard(row: dict[str, Any], table: pa.Table, agreed: dict[str, set[str]]) -> list[str]:
    name = row["path"]
    meta = read_metadata(table.schema)
    if meta.get("schema") not in (EMBEDDING_SHARD_KIND, STUDENT_FEATURES_KIND):
        return [f"{name}: not an embedding shard (schema {meta.get('schema')!r})"]
    if int(meta.get("version", 0)) > EMBEDDING_SHARD_VERSION:
        return [f"{name}: version {meta['version']}, newer than {EMBEDDING_SHARD_VERSION}"]
    missing = [n for n in EMBEDDING_SHARD_SCHEMA.names if n not in table.column_names]
    if missing or "dim" not in meta:
        return [f"{name}: lacks columns {missing} or 'dim' in its metadata"]
    dim = int(meta["dim"])
    agreed["dim"].add(str(dim))
    agreed["teacher"].add(str(meta.get("teacher", "")))
    agreed["checkpoint_sha256"].add(str(meta.get("checkpoint_sha256", "")))
    problems = []
    frames = table["num_frames"].to_numpy().astype(np.int64)
    if table.num_rows != row["rows"] or int(frames.sum()) != row["frames"]:
        problems.append(
            f"{name}: {table.num_rows} rows, {int(frames.sum())} frames; the index says "
            f"{row['rows']}, {row['frames']}"
        )
    sizes = np.array([len(b) for b in table["embeddings"].to_pylist()], dtype=np.int64)
    bad = np.flatnonzero((sizes != frames * dim * EMBEDDING_DTYPE.itemsize) | (frames <= 0))
    if len(bad):
        ids = table["item_id"]
        shown = ", ".join(str(ids[int(i)]) for i in bad[:3])
        problems.append(
            f"{name}: {len(bad)} rows whose bytes are not num_frames x {dim} float16 or that "
            f"have no frame ({shown})"
        )
    return problems
