"""The manifest job: sources -> listing (Ray tasks) -> header probes (Ray Data) -> Parquet.

Steps:
1. Check the output against its run record (``spear/record.py``: sources, the settings that
   change a good file's rows, the manifest format version): a finished run with the same
   record returns at once; another is refused naming what differs.
2. List each source in a Ray task (one per source and first-level folder); each task writes its
   files, sorted, as listing chunks of ``files_per_task`` under ``_work/listing/``.
3. Probe every chunk whose manifest part is missing (Ray Data ``map_batches``, one chunk a
   row): read headers, cut items, write ``quarantine/part-*.parquet`` then
   ``manifest/part-*.parquet``. The manifest part is the chunk's commit marker, so a killed run
   re-probes only unfinished chunks and never duplicates a row.
4. Write ``_SUCCESS.json`` with the summary.

Output layout under ``--out``::

    manifest/part-SSS-LLLLL-CCCCC.parquet    # MANIFEST_SCHEMA; the directory is the dataset
    quarantine/part-SSS-LLLLL-CCCCC.parquet  # QUARANTINE_SCHEMA
    skipped/part-SSS-LLLLL.parquet           # SKIPPED_SCHEMA: listed paths that are no item
    _work/plan.json, _work/listing/...       # the run record, resume state
    _SUCCESS.json                            # summary of a finished run

The format (schemas, :func:`~spear.formats.manifest.read_manifest`) is
:mod:`spear.formats.manifest`; this module is the job that writes it.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from spear.configio import to_dict
from spear.credentials import redact
from spear.errors import SpearError
from spear.formats.manifest import (
    MANIFEST_VERSION,
    SUCCESS,
    manifest_table,
    skipped_table,
)
from spear.formats.parquet import parquet_bytes
from spear.formats.quarantine import quarantine_table
from spear.ray_utils import RayConfig, init_ray
from spear.record import RunRecord, check_record
from spear.stages.manifest import (
    ManifestConfig,
    SourceConfig,
    _is_list_file,
    _is_local,
    list_source,
    local_subfolders,
    probe_files,
)
from spear.storage import (
    StorageConfig,
    exists,
    filesystem,
    join,
    read_bytes,
    remove_tree,
    unstrip,
    write_atomic,
)

log = logging.getLogger(__name__)


@dataclass
class ManifestSummary:
    out: str
    files: int = 0
    items: int = 0
    hours: float = 0.0
    dropped_hours: float = 0.0
    quarantined: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    """Listed paths that became no item and no quarantine row, by reason (``skipped/``)."""
    duplicate_files: int = 0
    chunks: int = 0
    chunks_done_before: int = 0
    wall_seconds: float = 0.0

    def line(self) -> str:
        q = sum(self.quarantined.values())
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.quarantined.items()))
        resumed = (
            f", {self.chunks_done_before} chunks already done" if self.chunks_done_before else ""
        )
        dup = f"; WARNING {self.duplicate_files} files listed twice" if self.duplicate_files else ""
        n_skip = sum(self.skipped.values())
        skip = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items()))
        return (
            f"manifest: {self.files} files -> {self.items} items, {self.hours:.3f} h; "
            f"{q} quarantined{' (' + reasons + ')' if q else ''}; "
            f"{n_skip} paths skipped{' (' + skip + ')' if n_skip else ''}{resumed}{dup}; "
            f"{self.wall_seconds:.1f} s -> {self.out}"
        )


def _listing_tasks(src: SourceConfig, storage: StorageConfig) -> list[tuple[SourceConfig, bool]]:
    """``(source, recursive)`` listing tasks: a directory source splits by its first-level
    folders (listed recursively, in parallel) plus its own top level (listed flat)."""
    fs, path = filesystem(src.url, storage)
    if _is_list_file(src.url) or fs.isfile(path):
        return [(src, True)]
    if _is_local(fs):  # folder links followed, a link to a folder above left to the walk
        subdirs = local_subfolders(path)
    else:
        entries = fs.ls(path, detail=True)
        subdirs = sorted(e["name"] for e in entries if e.get("type") == "directory")
    if not subdirs:
        return [(src, True)]
    parts = [
        (SourceConfig(url=unstrip(fs, d), domain=src.domain, name=src.label()), True)
        for d in subdirs
    ]
    return [(src, False), *parts]


def _list_task(
    src: SourceConfig,
    walk: tuple[bool, str],
    prefix: str,
    out: str,
    cfg: ManifestConfig,
    storage: StorageConfig,
) -> int:
    """Ray task: list one source (or one folder of it) into listing chunks and its skipped
    paths; returns #chunks. ``walk``: (recursive, the URL of the source the folder is of)."""
    recursive, root = walk
    skipped: list[dict[str, str]] = []
    files = list_source(src, cfg, storage, recursive=recursive, skipped=skipped, root=root)
    write_atomic(
        join(out, "skipped", f"part-{prefix}.parquet"),
        parquet_bytes(skipped_table(sorted(skipped, key=lambda r: r["url"]))),
        storage,
    )
    n = cfg.files_per_task
    chunks = [files[i : i + n] for i in range(0, len(files), n)]
    for c, chunk in enumerate(chunks):
        table = pa.table(
            {
                "url": [f[0] for f in chunk],
                "size": pa.array([f[1] for f in chunk], pa.int64()),
                "domain": [f[2] for f in chunk],
            }
        )
        write_atomic(
            join(out, "_work/listing", f"{prefix}-{c:05d}.parquet"), parquet_bytes(table), storage
        )
    done = {"chunks": len(chunks), "files": len(files), "source": src.url, "label": src.label()}
    write_atomic(
        join(out, "_work/listing", f"{prefix}.done.json"), json.dumps(done).encode(), storage
    )
    return len(chunks)


def _probe_batch(
    batch: dict[str, Any], out: str, cfg: ManifestConfig, storage: StorageConfig
) -> dict[str, Any]:
    """Ray Data map_batches: probe the listing chunks named in ``batch``, write their parts."""
    stats: dict[str, list[Any]] = {
        k: [] for k in ("chunk", "files", "items", "seconds", "dropped", "quarantine")
    }
    for chunk, label in zip(batch["chunk"], batch["label"], strict=True):
        listing = pq.read_table(io.BytesIO(read_bytes(join(out, "_work/listing", chunk), storage)))
        files = list(
            zip(
                listing["url"].to_pylist(),
                listing["size"].to_pylist(),
                listing["domain"].to_pylist(),
                strict=True,
            )
        )
        res = probe_files(files, label, cfg, storage)
        part = chunk.replace(".parquet", "")
        write_atomic(
            join(out, "quarantine", f"part-{part}.parquet"),
            parquet_bytes(quarantine_table(res.quarantine)),
            storage,
        )
        table = manifest_table(res.rows)
        # Written last: its presence marks the chunk done.
        write_atomic(join(out, "manifest", f"part-{part}.parquet"), parquet_bytes(table), storage)
        stats["chunk"].append(chunk)
        stats["files"].append(res.files)
        stats["items"].append(len(res.rows))
        stats["seconds"].append(res.seconds)
        stats["dropped"].append(res.dropped_seconds)
        stats["quarantine"].append(json.dumps(Counter(q["error_type"] for q in res.quarantine)))
    return stats


# Speed and safety settings: they do not change a good file's rows, so a resume may change them.
_NOT_PLANNED = (
    "sources",
    "probe_threads",
    "probe_block_size",
    "count_block_size",
    "probe_timeout_seconds",
)


def manifest_record(sources: list[SourceConfig], cfg: ManifestConfig) -> RunRecord:
    """The manifest job's run record. Its inputs are its sources: their URLs decide the item
    ids (a hash of each file's URL), so here they are what decides the outputs, with the
    settings that change a good file's rows and the manifest format version."""
    settings = to_dict(cfg)
    for k in _NOT_PLANNED:
        settings.pop(k)
    decides = {
        "manifest_version": MANIFEST_VERSION,
        "sources": redact([asdict(s) for s in sources]),  # a signed URL's signature masked
        "settings": settings,
    }
    return RunRecord("manifest", decides, digest_of="sources")


def build_manifest(
    sources: list[SourceConfig],
    out: str,
    cfg: ManifestConfig,
    storage: StorageConfig,
    ray_cfg: RayConfig,
) -> ManifestSummary:
    """Run (or resume) the manifest job; returns its summary."""
    t0 = time.time()
    if not sources:
        raise SpearError("no sources: give at least one URL or list file")
    # Fail before any cluster work: every source must exist, the output must be writable.
    for s in sources:
        if not exists(s.url, storage):
            raise SpearError(f"source {s.url!r} does not exist")
        if _is_list_file(s.url):
            list_source(s, cfg, storage)  # reads the list only: a bad line is one error here
    # A listing or a part made by an earlier run: this run must record the same to reuse it.
    made = exists(join(out, "_work/listing"), storage) or exists(join(out, "manifest"), storage)
    check_record(out, manifest_record(sources, cfg), storage, made=made)
    if made and exists(join(out, SUCCESS), storage):
        done = json.loads(read_bytes(join(out, SUCCESS), storage))
        summary = ManifestSummary(**{**done, "wall_seconds": time.time() - t0})
        log.info("manifest at %s is already complete", out)
        return summary

    init_ray(ray_cfg, out)
    import ray

    # 2. Listing, one task per source folder; finished listings are reused.
    list_remote = ray.remote(num_cpus=0.25)(_list_task)
    pending = []
    labels: dict[str, str] = {}
    for si, src in enumerate(sources):
        for li, (task_src, recursive) in enumerate(_listing_tasks(src, storage)):
            prefix = f"{si:03d}-{li:05d}"
            labels[prefix] = src.label()
            if exists(join(out, "_work/listing", f"{prefix}.done.json"), storage):
                continue
            walk = (recursive, src.url)
            pending.append(list_remote.remote(task_src, walk, prefix, out, cfg, storage))
    ray.get(pending)

    # 3. Probe chunks whose manifest part is missing.
    chunk_rows = []
    listed: Counter[int] = Counter()  # files per source
    for prefix, label in labels.items():
        done = json.loads(read_bytes(join(out, "_work/listing", f"{prefix}.done.json"), storage))
        listed[int(prefix[:3])] += int(done["files"])
        for c in range(done["chunks"]):
            chunk_rows.append({"chunk": f"{prefix}-{c:05d}.parquet", "label": label})
    _refuse_empty_sources(sources, listed, labels, out, storage)
    fs, mpath = filesystem(join(out, "manifest"), storage)
    have = set()
    if fs.exists(mpath):
        have = {posixpath.basename(p) for p in fs.ls(mpath, detail=False)}
    todo = [r for r in chunk_rows if f"part-{r['chunk']}" not in have]
    summary = ManifestSummary(out=out, chunks=len(chunk_rows))
    summary.chunks_done_before = len(chunk_rows) - len(todo)
    if todo:
        ds = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
            partial(_probe_batch, out=out, cfg=cfg, storage=storage),
            batch_size=1,
            num_cpus=0.5,  # probing waits on reads far more than it computes
        )
        ds.materialize()

    # 4. Summary over every part (also those of earlier, interrupted runs).
    summary = _summarise(out, storage, summary)
    summary.wall_seconds = time.time() - t0
    write_atomic(join(out, SUCCESS), json.dumps(asdict(summary), indent=1).encode(), storage)
    return summary


def _refuse_empty_sources(
    sources: list[SourceConfig],
    listed: Counter[int],
    labels: dict[str, str],
    out: str,
    storage: StorageConfig,
) -> None:
    """A source that lists no audio file is an error (exit 2), not an empty manifest: it is
    almost always a wrong URL or extension list. Its listing is forgotten first, so the same
    command lists it again once files are there."""
    empty = [i for i in range(len(sources)) if listed[i] == 0]
    if not empty:
        return
    for prefix in labels:
        if int(prefix[:3]) in empty:
            remove_tree(join(out, "_work/listing", f"{prefix}.done.json"), storage)
    src = sources[empty[0]]
    more = f" (and {len(empty) - 1} other source(s))" if len(empty) > 1 else ""
    raise SpearError(
        f"source {src.url!r}{more} holds no audio file (none with an extension of "
        "manifest.extensions): check the URL, or the extensions to list"
    )


def _summarise(out: str, storage: StorageConfig, summary: ManifestSummary) -> ManifestSummary:
    fs, mpath = filesystem(join(out, "manifest"), storage)
    files: set[str] = set()
    items, seconds, dropped = 0, 0.0, 0.0
    if fs.exists(mpath):
        table = pq.read_table(
            mpath, filesystem=fs, columns=["item_id", "url", "duration", "file_duration"]
        )
        items = table.num_rows
        urls = table["url"].to_pylist()
        files = set(urls)
        seconds = float(pc.sum(table["duration"]).as_py() or 0.0)
        per_file = dict(zip(urls, table["file_duration"].to_pylist(), strict=True))
        # A file reached by two sources gives two items with one id: say so loudly.
        ids = table["item_id"]
        summary.duplicate_files = len(ids) - len(pc.unique(ids))
        dropped = sum(per_file.values()) - seconds
    fs_q, qpath = filesystem(join(out, "quarantine"), storage)
    reasons: Counter[str] = Counter()
    qfiles = 0
    if fs_q.exists(qpath):
        q = pq.read_table(qpath, filesystem=fs_q, columns=["error_type"])
        reasons.update(q["error_type"].to_pylist())
        qfiles = q.num_rows
    fs_s, spath = filesystem(join(out, "skipped"), storage)
    skipped: Counter[str] = Counter()
    if fs_s.exists(spath):
        skipped.update(
            pq.read_table(spath, filesystem=fs_s, columns=["reason"])["reason"].to_pylist()
        )
    summary.skipped = dict(skipped)
    summary.files = len(files) + qfiles
    summary.items = items
    summary.hours = seconds / 3600
    summary.dropped_hours = max(0.0, dropped) / 3600
    summary.quarantined = dict(reasons)
    return summary
