"""Token shards -> lhotse cuts, as icefall's SPEAR / MVQ distillation recipes read them.

Each token row becomes a ``MonoCut`` (id = ``item_id``) with the custom fields ``domain`` and
``source`` and, per teacher, ``{prefix}_codebook_indexes``: a ``TemporalArray`` of uint8 codes
``(T, C)`` with ``frame_shift = 1 / frame_rate`` (0.02 s for WavLM, 0.04 s for Dasheng) and
``start`` = the cut's start, so ``cut.load_custom("wavlm_codebook_indexes")`` returns all of
them. Items a teacher did not run on (speech items for Dasheng) have no such field.

Two layouts under a local folder ``DEST``:

* cuts (default): per token shard N, ``cuts.NNNNN.jsonl.gz`` and, per teacher,
  ``{prefix}_codebook_indexes.NNNNN.h5`` (lhotse's ``NumpyHdf5Writer``, one HDF5 dataset per
  cut; needs ``h5py``; the manifests name the HDF5 files by absolute path). Each cut's
  ``Recording`` is the original file (``url``; lhotse opens remote URLs with smart_open), the
  cut spans ``start`` / ``duration`` in it. A Recording needs the file's own sample rate,
  length and channels, which token shards do not carry: they come from the run's manifest
  (``manifest=``, a ``spear manifest`` output or its Parquet files), else from each file's
  header. Spear computed the tokens on the mean of a file's channels; such a cut reads
  channel 0. Besides, ``cuts.jsonl.gz`` holds every cut once, in shard order (the single
  manifest icefall recipes take), written along with the per-shard files (which let readers
  go in parallel), one shard at a time. All files are written under temporary names and
  renamed when every one is complete, so a failed (re-)export leaves the earlier one as it
  was; a re-export then deletes the files of an earlier one that it did not write.
* Lhotse Shar (``shar=True``): ``cuts.NNNNNN.jsonl.gz``, ``recording.NNNNNN.tar`` and per
  teacher ``{prefix}_codebook_indexes.NNNNNN.tar`` (``.npy`` members), ``shard_size`` cuts per
  shard. Shar stores the data of a cut from its start, so the audio goes in too: each segment
  decoded by spear's decode stage (default settings; 16 kHz mono, cut or padded to exactly
  ``num_samples``; FLAC or WAV), the cut
  starting at 0, the original ``url`` / ``start`` kept as custom ``audio_url`` /
  ``audio_start``. Read with ``CutSet.from_shar(in_dir=DEST)``. No single manifest here: Shar
  cuts carry no data references, and ``from_shar`` would take any ``cuts.*`` file in ``DEST``
  for a shard.

lhotse is optional: ``pip install 'spear[lhotse]'``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import logging
import os
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import soundfile as sf

from spear.errors import SpearError
from spear.formats import SAMPLE_RATE
from spear.shards import ShardEntry, open_run, read_table, shard_url
from spear.shards.schema import ITEM_COLUMNS, SOURCE_COLUMNS, TokenTeacherInfo, codes_from_bytes
from spear.storage import StorageConfig, filesystem, join, protocol_of, unstrip

log = logging.getLogger(__name__)

MAX_SAMPLE_SLACK = 320
"""Samples (20 ms) a re-decoded segment may differ from the tokens' ``num_samples`` (resampler
edges) before the export refuses it; within that, the audio is cut or zero-padded to fit."""


COMBINED_CUTS = "cuts.jsonl.gz"
"""The one manifest of every cut (cuts layout), at the export's root."""

_CUTS_LAYOUT_FILE = re.compile(
    r"(\.tmp-[0-9a-f]{32}-)?(cuts(\.\d{5,})?\.jsonl\.gz|\w+_codebook_indexes\.\d{5,}\.h5)"
)
"""Names the cuts layout writes (and its temporary files): what a re-export may delete."""


@dataclass(frozen=True)
class AudioFileInfo:
    """What a lhotse Recording needs to know about an audio file."""

    sample_rate: int
    num_samples: int
    channels: int


@dataclass
class ExportSummary:
    dest: str
    layout: str
    cuts: int = 0
    fields: dict[str, int] = field(default_factory=dict)
    """Cuts carrying each ``{prefix}_codebook_indexes`` field."""
    files: list[str] = field(default_factory=list)
    combined: str | None = None
    """The single manifest of all cuts (cuts layout only)."""

    def text(self) -> str:
        per = ", ".join(f"{k}: {v}" for k, v in self.fields.items())
        line = f"wrote {self.cuts} cuts as {self.layout} to {self.dest} ({per})"
        return line + (f"\nall cuts in one manifest: {self.combined}" if self.combined else "")


def codebook_field(prefix: str) -> str:
    """The cut's custom field for a teacher's codes: ``wavlm_codebook_indexes``, ..."""
    return f"{prefix}_codebook_indexes"


def _lhotse() -> Any:
    try:
        import lhotse
    except ImportError:
        raise SpearError("exporting to lhotse needs lhotse: pip install 'spear[lhotse]'") from None
    return lhotse


def recording_id(url: str) -> str:
    """One id per audio file (the same hash that starts spear's item ids)."""
    return hashlib.blake2b(url.encode(), digest_size=8).hexdigest()


def read_manifest_info(manifest: str, storage: StorageConfig) -> dict[str, AudioFileInfo]:
    """``url -> AudioFileInfo`` from a ``spear manifest`` output (or a Parquet file / folder)."""
    fs, path = filesystem(manifest, storage)
    if fs.isfile(path):
        files = [path]
    else:
        base = path.rstrip("/") + "/manifest" if fs.isdir(path.rstrip("/") + "/manifest") else path
        files = sorted(p for p in fs.find(base) if p.endswith(".parquet"))
    if not files:
        raise SpearError(f"no manifest Parquet files under {manifest!r}")
    info: dict[str, AudioFileInfo] = {}
    for p in files:
        with fs.open(p, "rb") as f:
            t = pq.read_table(
                io.BytesIO(f.read()), columns=["url", "sample_rate", "file_duration", "channels"]
            )
        for url, sr, dur, ch in zip(*(t[c].to_pylist() for c in t.column_names), strict=True):
            info[url] = AudioFileInfo(int(sr), round(float(dur) * int(sr)), int(ch))
    log.info("manifest %s: %d files from %d parts", unstrip(fs, path), len(info), len(files))
    return info


def probe_info(url: str, storage: StorageConfig) -> AudioFileInfo:
    """Read one file's header (range reads)."""
    from spear.stages.manifest import ProbeError, probe_file

    try:
        f = probe_file(url, -1, storage)
    except ProbeError as err:
        raise SpearError(
            f"cannot read the header of {url!r} ({err}); pass the run's manifest instead"
        ) from None
    return AudioFileInfo(f.sample_rate, f.frames, f.channels)


def _recording(url: str, info: AudioFileInfo) -> Any:
    from lhotse import Recording
    from lhotse.audio import AudioSource

    proto = protocol_of(url)
    if proto == "file":
        source = AudioSource(
            type="file", channels=list(range(info.channels)), source=url.removeprefix("file://")
        )
    else:  # lhotse opens URLs with smart_open (s3 needs smart_open[s3] and credentials)
        source = AudioSource(type="url", channels=list(range(info.channels)), source=url)
    return Recording(
        id=recording_id(url),
        sources=[source],
        sampling_rate=info.sample_rate,
        num_samples=info.num_samples,
        duration=info.num_samples / info.sample_rate,
    )


def export_lhotse(
    out: str,
    dest: str,
    storage: StorageConfig | None = None,
    *,
    shar: bool = False,
    manifest: str | None = None,
    shard_size: int = 1000,
    audio_format: str = "flac",
    teachers: Sequence[str] | None = None,
) -> ExportSummary:
    """Write the tokenize output at ``out`` as lhotse cuts (or, with ``shar``, Lhotse Shar)
    under the local folder ``dest``; see the module docstring for both layouts."""
    _lhotse()
    storage = (storage or StorageConfig()).resolved()
    if "://" in dest and protocol_of(dest) != "file":
        raise SpearError(f"lhotse export writes to a local folder, got {dest!r}")
    if audio_format not in ("flac", "wav"):
        raise SpearError(f"Shar audio format must be flac or wav, got {audio_format!r}")
    run = open_run(out, storage)
    entries, tinfo = run.entries, run.select(teachers)
    dest = os.path.abspath(dest.removeprefix("file://"))
    os.makedirs(dest, exist_ok=True)
    summary = ExportSummary(dest=dest, layout="shar" if shar else "cuts")
    summary.fields = {codebook_field(t.prefix): 0 for t in tinfo}
    columns = [*ITEM_COLUMNS, *(f"{t.prefix}_codes" for t in tinfo)]
    _refuse_other_layout(dest, shar)
    if shar:
        _export_shar(out, storage, entries, tinfo, columns, shard_size, audio_format, summary)
    else:
        infos = read_manifest_info(manifest, storage) if manifest else {}
        _export_cuts(out, storage, entries, tinfo, columns, infos, summary)
    return summary


def _refuse_other_layout(dest: str, shar: bool) -> None:
    """One layout per folder: ``from_shar`` would take a cuts export's manifests for Shar
    shards, and a cuts re-export deletes ``cuts.*`` files it did not write."""
    names = os.listdir(dest)
    if shar:
        found = [n for n in names if _CUTS_LAYOUT_FILE.fullmatch(n) and n.endswith("h5")]
        found += [COMBINED_CUTS] if COMBINED_CUTS in names else []
    else:
        found = [n for n in names if re.fullmatch(r"recording\.\d+\.tar", n)]
    if found:
        other = "a cuts export" if shar else "a Shar export"
        raise SpearError(f"{dest} holds {other} ({found[0]}); export to another folder")


def _custom_fields(
    cols: dict[str, list[Any]],
    i: int,
    tinfo: list[TokenTeacherInfo],
    start: float,
    writers: dict[str, Any],
    summary: ExportSummary,
    final_paths: dict[str, str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Row ``i``'s cut fields: domain, source, ``extra``, then the codes of each teacher that
    ran on it (stored by ``writers[prefix]``, starting at ``start``; the manifest names
    ``final_paths[prefix]`` when given)."""
    custom: dict[str, Any] = {"domain": cols["domain"][i], "source": cols["source"][i], **extra}
    for t in tinfo:
        raw = cols[f"{t.prefix}_codes"][i]
        if raw is not None:
            f = codebook_field(t.prefix)
            path = final_paths[t.prefix] if final_paths else None
            custom[f] = _codes_field(t, raw, cols["item_id"][i], start, writers[t.prefix], path)
            summary.fields[f] += 1
    return custom


def _codes_field(
    t: TokenTeacherInfo,
    raw: bytes,
    item: str,
    start: float,
    writer: Any,
    storage_path: str | None = None,
) -> Any:
    """One teacher's codes stored by ``writer`` as a ``TemporalArray`` starting at ``start``;
    the manifest names ``storage_path`` (the file's final name) if given, else the writer's."""
    from lhotse.array import Array, TemporalArray

    value = np.array(codes_from_bytes(raw, t.num_codebooks))  # (T, C) uint8
    array = Array(
        storage_type=writer.name,
        storage_path=storage_path if storage_path is not None else writer.storage_path,
        storage_key=writer.write(item, value),
        shape=list(value.shape),
    )
    return TemporalArray(array=array, temporal_dim=0, frame_shift=1.0 / t.frame_rate, start=start)


def _export_cuts(
    out: str,
    storage: StorageConfig,
    entries: list[ShardEntry],
    tinfo: list[TokenTeacherInfo],
    columns: list[str],
    infos: dict[str, AudioFileInfo],
    summary: ExportSummary,
) -> None:
    """Cuts referencing the original files; codes in one HDF5 file per teacher and shard. Each
    cut's line goes to its shard's manifest and to the combined one, one shard at a time.

    Every file is written under a temporary name and renamed once all are complete (the
    combined manifest last), so a failed export, or a failed re-export, leaves the earlier
    export as it was."""
    from lhotse import MonoCut
    from lhotse.features.io import NumpyHdf5Writer

    try:
        import h5py  # noqa: F401
    except ImportError:
        raise SpearError(
            "exporting lhotse cuts stores codes in HDF5 and needs h5py (pip install h5py); "
            "--shar needs nothing more"
        ) from None
    token = uuid.uuid4().hex

    def staged(name: str) -> tuple[str, str]:
        """(temporary path, final path) of one output file."""
        return os.path.join(summary.dest, f".tmp-{token}-{name}"), os.path.join(summary.dest, name)

    pending: list[tuple[str, str]] = []  # per shard and file: O(shards), never O(cuts)
    combined = staged(COMBINED_CUTS)
    try:
        with gzip.open(combined[0], "wt", encoding="utf-8") as every:
            for e in entries:
                table = read_table(shard_url(out, e), storage, columns)
                cols = {c: table[c].to_pylist() for c in table.column_names}
                name = f"{e.shard:05d}"
                part = staged(f"cuts.{name}.jsonl.gz")
                h5 = {t.prefix: staged(f"{codebook_field(t.prefix)}.{name}.h5") for t in tinfo}
                pending += [part, *h5.values()]
                writers = {p: NumpyHdf5Writer(tmp) for p, (tmp, _) in h5.items()}
                final_h5 = {p: final for p, (_, final) in h5.items()}
                try:
                    with gzip.open(part[0], "wt", encoding="utf-8") as shard_file:
                        for i in range(table.num_rows):
                            item, url, start = (cols[c][i] for c in ("item_id", "url", "start"))
                            if url not in infos:
                                infos[url] = probe_info(url, storage)
                            custom = _custom_fields(
                                cols, i, tinfo, start, writers, summary, final_h5
                            )
                            cut = MonoCut(
                                id=item,
                                start=start,
                                duration=cols["duration"][i],
                                channel=0,
                                recording=_recording(url, infos[url]),
                                custom=custom,
                            )
                            # One serialization for both files (what lhotse's writer prints).
                            line = json.dumps(cut.to_dict(), ensure_ascii=False) + "\n"
                            shard_file.write(line)
                            every.write(line)
                            summary.cuts += 1
                finally:
                    for wr in writers.values():
                        wr.close()
        for tmp, final in [*pending, combined]:
            os.replace(tmp, final)
    finally:
        for tmp, _ in [*pending, combined]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    summary.files = [final for _, final in [*pending, combined]]
    summary.combined = combined[1]
    _remove_stale(summary.dest, set(summary.files))


def _remove_stale(dest: str, written: set[str]) -> None:
    """Delete the cuts-layout files in ``dest`` that this export did not write (an earlier
    export's extra shards or teachers, a killed run's temporary files), so that a glob of the
    per-shard files reads what ``cuts.jsonl.gz`` holds."""
    for name in sorted(os.listdir(dest)):
        path = os.path.join(dest, name)
        if _CUTS_LAYOUT_FILE.fullmatch(name) and path not in written and os.path.isfile(path):
            os.unlink(path)
            log.info("removed %s of an earlier export", path)


def _export_shar(
    out: str,
    storage: StorageConfig,
    entries: list[ShardEntry],
    tinfo: list[TokenTeacherInfo],
    columns: list[str],
    shard_size: int,
    audio_format: str,
    summary: ExportSummary,
) -> None:
    """Shar: each cut holds its own audio, decoded by spear's decode stage (16 kHz mono,
    exactly ``num_samples``), so cut, audio and codes all start at 0."""
    from lhotse import MonoCut, Recording
    from lhotse.audio import AudioSource
    from lhotse.features.io import MemoryRawWriter
    from lhotse.shar import SharWriter

    from spear.stages.decode import DecodeConfig, DecodeError, decode_segment, row_checks

    decode = _run_decode_config(out, storage, DecodeConfig)
    memory = MemoryRawWriter()
    in_memory = {t.prefix: memory for t in tinfo}
    fields = {"recording": audio_format} | {codebook_field(t.prefix): "numpy" for t in tinfo}
    with SharWriter(summary.dest, fields=fields, shard_size=shard_size) as w:
        for e in entries:
            table = read_table(shard_url(out, e), storage)
            # The source columns (shards since version 2): a file changed since the manifest
            # fails as `changed` rather than export other audio under these tokens.
            table = table.select(
                [c for c in (*columns, *SOURCE_COLUMNS) if c in table.schema.names]
            )
            cols = {c: table[c].to_pylist() for c in table.column_names}
            checks = row_checks(cols, table.num_rows)
            for i in range(table.num_rows):
                item, n = cols["item_id"][i], cols["num_samples"][i]
                try:
                    audio = decode_segment(
                        cols["url"][i],
                        cols["start"][i],
                        cols["duration"][i],
                        decode,
                        storage,
                        **checks[i],
                    )
                except DecodeError as err:
                    raise SpearError(f"item {item}: cannot decode its audio: {err}") from None
                if abs(len(audio) - n) > MAX_SAMPLE_SLACK:
                    raise SpearError(
                        f"item {item}: {cols['url'][i]} now decodes to {len(audio)} samples, "
                        f"its tokens were computed on {n}: the file changed since tokenize"
                    )
                audio = np.pad(audio[:n], (0, max(0, n - len(audio))))  # exactly n samples
                wav = io.BytesIO()
                sf.write(wav, audio, SAMPLE_RATE, format="WAV", subtype="PCM_16")
                rec = Recording(
                    id=item,
                    sources=[AudioSource(type="memory", channels=[0], source=wav.getvalue())],
                    sampling_rate=SAMPLE_RATE,
                    num_samples=n,
                    duration=n / SAMPLE_RATE,
                )
                custom = _custom_fields(
                    cols,
                    i,
                    tinfo,
                    0.0,
                    in_memory,
                    summary,
                    audio_url=cols["url"][i],
                    audio_start=cols["start"][i],
                )
                cut = MonoCut(
                    id=item,
                    start=0.0,
                    duration=n / SAMPLE_RATE,
                    channel=0,
                    recording=rec,
                    custom=custom,
                )
                w.write(cut)
                summary.cuts += 1
    summary.files = sorted(p for paths in w.output_paths.values() for p in paths)


def _run_decode_config(out: str, storage: StorageConfig, cls: Any) -> Any:
    """The decode settings the tokenize run used (its report.json), so the exported audio is
    the audio that was tokenized; the defaults when the report predates them."""
    from spear.configio import from_dict
    from spear.storage import exists, read_bytes

    url = join(out, "report.json")
    if exists(url, storage):
        saved = json.loads(read_bytes(url, storage)).get("config", {}).get("decode")
        if saved:
            return from_dict(cls, saved)
    return cls(sample_rate=SAMPLE_RATE)
