"""Checking a tokenize output: :func:`validate` lists every problem (an empty list: valid)."""

from __future__ import annotations

import hashlib
import io
import json
import math
import posixpath
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from spear.formats import DOMAINS, SAMPLE_RATE, read_metadata
from spear.shards.index import (
    ShardEntry,
    ShardError,
    _storage,
    list_shards,
    open_index,
    read_table,
    shard_url,
)
from spear.shards.schema import (
    FRAME_FORMULAS,
    INDEX_FILE,
    ITEM_COLUMNS,
    PLAN_FILE,
    QUARANTINE_DIR,
    SOURCE_COLUMNS,
    SUCCESS_FILE,
    TOKEN_INDEX_SCHEMA,
    TOKEN_INDEX_VERSION,
    TOKEN_SHARD_READS,
    TOKENS_DIR,
    TokenTeacherInfo,
    read_token_teachers,
    token_shard_schema,
)
from spear.storage import StorageConfig, exists, filesystem, join, read_bytes

MAX_EXAMPLES = 3
"""Rows named per kind of problem and shard; the rest are counted."""


def _rows_text(rows: np.ndarray, ids: pa.ChunkedArray | pa.Array) -> str:
    """``item_id``s of the first rows, and how many more."""
    shown = ", ".join(str(ids[int(i)]) for i in rows[:MAX_EXAMPLES])
    more = len(rows) - MAX_EXAMPLES
    return shown + (f" and {more} more" if more > 0 else "")


def _expected_frames(family: str, num_samples: np.ndarray) -> np.ndarray:
    """The family's frame formula on every row (called once per distinct length)."""
    formula = FRAME_FORMULAS[family]
    uniq, inverse = np.unique(num_samples, return_inverse=True)
    frames = np.fromiter((formula(int(n)) for n in uniq), dtype=np.int64, count=len(uniq))
    return frames[inverse.reshape(-1)]


def binary_values(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets (n + 1,), all value bytes) of a binary array without copying per row."""
    arr = arr.cast(pa.binary()) if arr.type != pa.binary() else arr
    buffers = arr.buffers()
    if len(arr) == 0 or buffers[1] is None:
        return np.zeros(len(arr) + 1, np.int32), np.zeros(0, np.uint8)
    offsets = np.frombuffer(buffers[1], dtype=np.int32)[arr.offset : arr.offset + len(arr) + 1]
    values = buffers[2]
    data = np.frombuffer(values, dtype=np.uint8) if values is not None else np.zeros(0, np.uint8)
    return offsets, data


def check_shard_table(table: pa.Table, teachers: list[TokenTeacherInfo], name: str) -> list[str]:
    """The content problems of one token shard table (``name`` prefixes each message):
    domains, frame counts against the teachers' formulas, nulls exactly where a teacher did not
    run, code lengths (``frames * C``) and code values (``< K``)."""
    problems: list[str] = []
    expected = token_shard_schema([t.prefix for t in teachers])
    for f in expected:
        if f.name not in table.column_names:
            if f.name in SOURCE_COLUMNS:  # a version 1 shard: read without them
                continue
            problems.append(f"{name}: column {f.name!r} is missing")
        elif not table.schema.field(f.name).type.equals(f.type):
            problems.append(
                f"{name}: column {f.name!r} is {table.schema.field(f.name).type}, not {f.type}"
            )
    extra = [c for c in table.column_names if c not in expected.names]
    if extra:
        problems.append(f"{name}: unexpected columns {extra}")
    if problems:
        return problems
    ids = table["item_id"]
    for col in ITEM_COLUMNS:
        if table[col].null_count:
            problems.append(f"{name}: {table[col].null_count} nulls in {col!r}")
    if problems:
        return problems
    domain = np.asarray(table["domain"].to_numpy(zero_copy_only=False), dtype=object)
    bad_domain = np.flatnonzero(~np.isin(domain, DOMAINS))
    if len(bad_domain):
        problems.append(
            f"{name}: {len(bad_domain)} rows of a domain not in {list(DOMAINS)} "
            f"({_rows_text(bad_domain, ids)})"
        )
    num_samples = table["num_samples"].to_numpy()
    for t in teachers:
        if t.family not in FRAME_FORMULAS:
            problems.append(f"{name}: teacher {t.prefix!r} has unknown family {t.family!r}")
            continue
        ran = np.isin(domain, list(t.domains))
        frames_col = table[f"{t.prefix}_frames"].combine_chunks()
        codes_col = table[f"{t.prefix}_codes"].combine_chunks()
        frames_null = np.asarray(frames_col.is_null().to_numpy(zero_copy_only=False))
        codes_null = np.asarray(codes_col.is_null().to_numpy(zero_copy_only=False))
        for what, nulls in (("frames", frames_null), ("codes", codes_null)):
            rows = np.flatnonzero(ran & nulls)
            if len(rows):
                problems.append(
                    f"{name}: {t.prefix}_{what} is null on {len(rows)} rows of domains "
                    f"{list(t.domains)} ({_rows_text(rows, ids)})"
                )
            rows = np.flatnonzero(~ran & ~nulls)
            if len(rows):
                problems.append(
                    f"{name}: {t.prefix}_{what} is set on {len(rows)} rows of domains the "
                    f"teacher did not run on ({_rows_text(rows, ids)})"
                )
        frames = np.asarray(frames_col.fill_null(-1).to_numpy(), dtype=np.int64)
        want = _expected_frames(t.family, num_samples)
        wrong_frames = ran & ~frames_null & (frames != want)
        rows = np.flatnonzero(wrong_frames)
        if len(rows):
            i = int(rows[0])
            problems.append(
                f"{name}: {t.prefix}_frames differs from the {t.family} formula on {len(rows)} "
                f"rows ({_rows_text(rows, ids)}; e.g. {frames[i]} frames for "
                f"{num_samples[i]} samples, expected {want[i]})"
            )
        offsets, data = binary_values(codes_col)
        lengths = np.diff(offsets).astype(np.int64)
        rows = np.flatnonzero(
            ran & ~codes_null & ~frames_null & ~wrong_frames & (lengths != frames * t.num_codebooks)
        )
        if len(rows):
            i = int(rows[0])
            problems.append(
                f"{name}: {t.prefix}_codes length is not frames x {t.num_codebooks} on "
                f"{len(rows)} rows ({_rows_text(rows, ids)}; e.g. {lengths[i]} bytes for "
                f"{frames[i]} frames)"
            )
        if t.codebook_size < 256 and len(data):
            used = data[offsets[0] : offsets[-1]]
            if len(used) and int(used.max()) >= t.codebook_size:
                # Which rows: the running count of out-of-range codes, cut at the row offsets.
                bad = np.concatenate([[0], np.cumsum(used >= t.codebook_size)])
                per_row = bad[offsets[1:] - offsets[0]] - bad[offsets[:-1] - offsets[0]]
                rows = np.flatnonzero(per_row > 0)
                problems.append(
                    f"{name}: {t.prefix}_codes has codes >= codebook size {t.codebook_size} on "
                    f"{len(rows)} rows ({_rows_text(rows, ids)}; max {int(used.max())})"
                )
    return problems


def _id_hashes(ids: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """64-bit hashes of item ids (vectorised); duplicates are confirmed on the ids themselves."""
    import pandas as pd

    values = np.asarray(ids.to_numpy(zero_copy_only=False), dtype=object)
    return np.asarray(pd.util.hash_array(values), dtype=np.uint64)


def validate(out: str, storage: StorageConfig | None = None) -> list[str]:
    """Every problem of the tokenize output at ``out``; an empty list means valid.

    Reads every shard whole (sha256) once, and the ``item_id`` column again of the shards
    that share a hashed id. Memory: 8 bytes per item for the duplicate check."""
    storage = _storage(storage)
    problems: list[str] = []
    index = open_index(out, storage)
    if not index.schema.remove_metadata().equals(TOKEN_INDEX_SCHEMA):
        have = {f.name: str(f.type) for f in index.schema}
        want = {f.name: str(f.type) for f in TOKEN_INDEX_SCHEMA}
        if have != want:
            return [f"{INDEX_FILE}: columns {have} are not {want}"]
    version = read_metadata(index.schema).get("version")
    if version is not None and version != TOKEN_INDEX_VERSION:
        problems.append(f"{INDEX_FILE}: version {version} is not {TOKEN_INDEX_VERSION}")
    entries = list_shards(out, storage)
    if not exists(join(out, SUCCESS_FILE), storage):
        problems.append(f"{SUCCESS_FILE} is missing: the run did not finish")
    for what, values in (
        ("shard", [str(e.shard) for e in entries]),
        ("path", [e.path for e in entries]),
    ):
        dups = sorted({v for v, n in Counter(values).items() if n > 1})
        if dups:
            problems.append(f"{INDEX_FILE}: {what} listed twice: {', '.join(dups)}")
    problems += _stray_files(out, storage, entries)
    numbers = sorted(e.shard for e in entries)
    if numbers != list(range(len(numbers))):
        missing = sorted(set(range(max(numbers, default=-1) + 1)) - set(numbers))
        problems.append(
            f"{INDEX_FILE}: shards are not numbered 0..{len(numbers) - 1}"
            + (f" (missing {_shards_text(missing)})" if missing else "")
        )
    plan_url = join(out, PLAN_FILE)
    if exists(plan_url, storage):  # the run's plan says how many items the job had
        planned = json.loads(read_bytes(plan_url, storage)).get("items")
        n_items = sum(e.rows + e.quarantined for e in entries)
        if planned is not None and n_items != planned:
            problems.append(
                f"{INDEX_FILE}: {n_items} items (tokens + quarantine), the run's plan has {planned}"
            )

    teachers_seen: dict[str, dict[tuple[Any, ...], list[int]]] = {}
    token_hashes: list[np.ndarray] = []
    token_owner: list[np.ndarray] = []
    quarantine_hashes: list[np.ndarray] = []
    quarantine_owner: list[np.ndarray] = []
    readable = 0  # shards whose teachers could be read
    for e in entries:
        name = e.path
        url = shard_url(out, e)
        problems += _check_quarantine(out, storage, e, quarantine_hashes, quarantine_owner)
        try:
            data = read_bytes(url, storage)
        except FileNotFoundError:
            problems.append(f"{name}: listed in the index but missing")
            continue
        except Exception as err:
            problems.append(f"{name}: unreadable: {type(err).__name__}: {err}")
            continue
        if len(data) != e.bytes:
            problems.append(f"{name}: {len(data)} bytes, the index says {e.bytes}")
        if hashlib.sha256(data).hexdigest() != e.sha256:
            problems.append(f"{name}: sha256 differs from the index")
        try:
            table = pq.read_table(io.BytesIO(data))
        except (pa.ArrowException, OSError) as err:
            problems.append(f"{name}: not a readable Parquet file: {err}")
            continue
        meta = read_metadata(table.schema)
        if meta.get("schema") != "token_shard":
            problems.append(f"{name}: metadata schema is {meta.get('schema')!r}, not 'token_shard'")
            continue
        if meta.get("version") not in TOKEN_SHARD_READS:
            problems.append(
                f"{name}: token shard version {meta.get('version')}, not one of {TOKEN_SHARD_READS}"
            )
            continue
        try:
            teachers = read_token_teachers(table.schema)
        except (ValueError, KeyError, TypeError) as err:
            problems.append(f"{name}: bad teachers metadata: {err}")
            continue
        if "shard" in meta and meta["shard"] != e.shard:
            problems.append(f"{name}: metadata says shard {meta['shard']}, the index {e.shard}")
        if table.num_rows != e.rows:
            problems.append(f"{name}: {table.num_rows} rows, the index says {e.rows}")
        readable += 1
        for t in teachers:
            key = (t.teacher, t.family, t.layer, t.num_codebooks, t.codebook_size, t.quantizer_id)
            teachers_seen.setdefault(t.prefix, {}).setdefault(key, []).append(e.shard)
        problems += check_shard_table(table, teachers, name)
        if "num_samples" in table.column_names and table["num_samples"].null_count == 0:
            seconds = float(pc.sum(table["num_samples"]).as_py() or 0) / SAMPLE_RATE
            if not math.isclose(seconds, e.audio_seconds, rel_tol=1e-6, abs_tol=1e-3):
                problems.append(
                    f"{name}: {seconds:.3f} audio seconds, the index says {e.audio_seconds:.3f}"
                )
        if "item_id" in table.column_names:
            h = _id_hashes(table["item_id"])
            token_hashes.append(h)
            token_owner.append(np.full(len(h), e.shard, dtype=np.int64))

    problems += _teacher_consistency(teachers_seen, readable)
    problems += _duplicates(
        out, storage, entries, token_hashes, token_owner, quarantine_hashes, quarantine_owner
    )
    return problems


def _stray_files(out: str, storage: StorageConfig, entries: list[ShardEntry]) -> list[str]:
    """Shard files under ``tokens/`` that the index does not list (a glob would read them)."""
    fs, path = filesystem(join(out, TOKENS_DIR), storage)
    try:
        found = fs.find(path) if fs.isdir(path) else []
    except FileNotFoundError:
        found = []
    listed = {posixpath.basename(e.path) for e in entries}
    stray = sorted(
        posixpath.basename(p)
        for p in found
        if p.endswith(".parquet")
        and not posixpath.basename(p).startswith((".", "_"))
        and posixpath.basename(p) not in listed
    )
    if not stray:
        return []
    shown = ", ".join(stray[:MAX_EXAMPLES]) + (
        f" and {len(stray) - MAX_EXAMPLES} more" if len(stray) > MAX_EXAMPLES else ""
    )
    return [f"{TOKENS_DIR}/: {len(stray)} shard files not in the index ({shown})"]


def _check_quarantine(
    out: str,
    storage: StorageConfig,
    e: ShardEntry,
    hashes: list[np.ndarray],
    owners: list[np.ndarray],
) -> list[str]:
    url = join(out, e.quarantine_path)
    if not exists(url, storage):
        if e.quarantined:
            return [f"{e.quarantine_path}: missing, the index counts {e.quarantined} items"]
        return []
    try:
        table = read_table(url, storage)
    except ShardError as err:
        return [f"{e.quarantine_path}: {err}"]
    problems = []
    kind = read_metadata(table.schema).get("schema")
    if kind != "quarantine":
        problems.append(f"{e.quarantine_path}: metadata schema is {kind!r}, not 'quarantine'")
    if table.num_rows != e.quarantined:
        problems.append(
            f"{e.quarantine_path}: {table.num_rows} rows, the index says {e.quarantined}"
        )
    if "item_id" in table.column_names:
        ids = pc.filter(table["item_id"], pc.not_equal(table["item_id"], ""))
        h = np.unique(_id_hashes(ids))  # an item may be quarantined for two reasons
        hashes.append(h)
        owners.append(np.full(len(h), -1 - e.shard, dtype=np.int64))
    return problems


def _teacher_consistency(
    seen: dict[str, dict[tuple[Any, ...], list[int]]], num_shards: int
) -> list[str]:
    """Every teacher in every (readable) shard, with the same settings and quantiser."""
    problems = []
    for prefix, variants in sorted(seen.items()):
        covered = sum(len(v) for v in variants.values())
        if covered != num_shards:
            problems.append(f"teacher {prefix!r} is in {covered} of {num_shards} shards")
        if len(variants) > 1:
            parts = []
            for (teacher, _, layer, c, k, qid), shards in variants.items():
                parts.append(
                    f"{teacher} layer {layer} C={c} K={k} quantizer {qid} "
                    f"(shards {_shards_text(shards)})"
                )
            qids = {key[-1] for key in variants}
            what = f"{len(qids)} quantizer ids" if len(qids) > 1 else "different settings"
            problems.append(f"teacher {prefix!r}: {what} across shards: " + "; ".join(parts))
    return problems


def _shards_text(shards: list[int]) -> str:
    shown = ", ".join(str(s) for s in shards[:5])
    return shown + (f" and {len(shards) - 5} more" if len(shards) > 5 else "")


def _duplicates(
    out: str,
    storage: StorageConfig,
    entries: list[ShardEntry],
    token_hashes: list[np.ndarray],
    token_owner: list[np.ndarray],
    quarantine_hashes: list[np.ndarray],
    quarantine_owner: list[np.ndarray],
) -> list[str]:
    """Item ids twice among the token rows, or both in tokens and in quarantine. Owners are
    shard numbers (tokens) or ``-1 - shard`` (quarantine)."""
    if not token_hashes:
        return []
    h = np.concatenate(token_hashes + quarantine_hashes)
    owner = np.concatenate(token_owner + quarantine_owner)
    order = np.argsort(h, kind="stable")
    hs = h[order]
    same = hs[1:] == hs[:-1]
    if not same.any():
        return []
    suspect = set(hs[1:][same].tolist())
    involved = set(owner[order][1:][same].tolist()) | set(owner[order][:-1][same].tolist())
    # Confirm on the ids themselves (a 64-bit hash collision is possible, if unlikely).
    where: dict[str, list[str]] = {}
    by_shard = {e.shard: e for e in entries}
    for o in sorted(involved):
        e = by_shard[o if o >= 0 else -1 - o]
        path = e.path if o >= 0 else e.quarantine_path
        ids = read_table(join(out, path), storage, ["item_id"])["item_id"]
        hashes = _id_hashes(ids)
        rows = np.flatnonzero(np.isin(hashes, list(suspect)))
        for i in rows:
            where.setdefault(str(ids[int(i)]), []).append(path)
    dups = {}
    for k, paths in where.items():
        in_tokens = sum(not p.startswith(QUARANTINE_DIR + "/") for p in paths)
        # Twice in tokens, in tokens and quarantine, or in two shards' quarantine files.
        if k and (in_tokens > 1 or (in_tokens and len(paths) > in_tokens) or len(set(paths)) > 1):
            dups[k] = paths
    if not dups:
        return []
    shown = "; ".join(
        f"{k} in {', '.join(sorted(set(v)))}" for k, v in sorted(dups.items())[:MAX_EXAMPLES]
    )
    more = len(dups) - MAX_EXAMPLES
    return [
        f"{len(dups)} item ids appear more than once ({shown}"
        + (f"; and {more} more)" if more > 0 else ")")
    ]
