"""Tokenize stage: audio batch -> one teacher's MVQ codes, computed inside the teacher's actor.

The teacher's float embeddings never leave the actor: it runs the teacher, encodes the frames
with that teacher's quantiser and hands back uint8 codes (800 B per second of audio for WavLM at
SPEC's settings, against 100 kB/s of float16 embeddings).

* :class:`TokenizeTeacherConfig` - one teacher of the tokenize job: model, quantiser, domains.
* :func:`tokenize_batch` - the pure function (no Ray): batch in, batch with codes out.
* :class:`TokenizeStage` - one teacher's Ray Data actor; :class:`FusedTokenizeStage` - every
  teacher of the job in one actor (``tokenize.fuse_teachers``), each through its
  :class:`TokenizeStage`.

Batch in: an audio batch (``spear.formats``) with ``domain`` and the decode stage's
``error_type`` column. Rows that failed to decode, and rows of other domains, pass through with
``{prefix}_frames = -1`` and empty ``{prefix}_codes``. ``audio`` goes on only for rows of
``keep_audio`` (the domains of the teachers after this one), empty for the others. A row this
teacher should tokenize but that gives it no frame gets ``error_type = "too_short"`` (and
``error``), so it leaves the job as a quarantine row. ``{prefix}_seconds`` is this stage's
compute time spread over the batch's rows (the run report's per-stage throughput).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from spear.errors import ConfigError, SpearError
from spear.formats import AUDIO_DTYPE, DOMAINS
from spear.shards.schema import NOT_RUN_FRAMES, TokenTeacherInfo, codes_to_bytes
from spear.stages.teachers import LoadedTeacher, TeacherConfig, load_teacher, run_teacher
from spear.storage import StorageConfig

log = logging.getLogger(__name__)

NOT_RUN = NOT_RUN_FRAMES
"""``{prefix}_frames`` of a row this teacher did not run on (a null in the token shard)."""


@dataclass(kw_only=True, frozen=True)
class TokenizeTeacherConfig:
    """One teacher of ``spear tokenize``: which quantiser encodes its frames, on which items."""

    quantizer: str | None = None
    """The trained quantiser (``spear quantizer train`` output folder or its ``.safetensors``);
    None: this teacher does not run."""
    domains: tuple[str, ...] = ("speech", "audio")
    """Domains of the items this teacher tokenizes."""

    def __post_init__(self) -> None:
        bad = [d for d in self.domains if d not in DOMAINS]
        if bad:
            raise ConfigError(f"tokenize domains {bad} are not among {list(DOMAINS)}")


@dataclass(kw_only=True, frozen=True)
class DashengTokenizeConfig(TokenizeTeacherConfig):
    """:class:`TokenizeTeacherConfig` defaulting to audio items only (a YAML section or a
    ``--set`` may omit ``domains``)."""

    domains: tuple[str, ...] = ("audio",)
    """Domains of the items this teacher tokenizes."""


@dataclass(kw_only=True, frozen=True)
class TokenizeConfig:
    """``spear tokenize``: teachers per domain (SPEC section 4's rule by default), sharding."""

    wavlm: TokenizeTeacherConfig = field(default_factory=TokenizeTeacherConfig)
    """WavLM tokens: on speech and audio items."""
    dasheng: DashengTokenizeConfig = field(default_factory=DashengTokenizeConfig)
    """Dasheng tokens: on audio items only."""
    items_per_shard: int = 10_000
    """Most items per token shard (the resume unit); with items of ~10 s the hours cap below
    decides first."""
    max_shard_hours: float | None = 10.0
    """Most audio per token shard, in hours (10 h: ~36 MB of tokens at SPEC's settings, a
    good Parquet file for the readers). Audio never travels with a shard (the teacher actors
    decode the items they run on, in chunks), so this no longer bounds memory; it sets how many
    shards the driver commits per second (197k h: ~20k shards; 512 H100s at ~8,000x real time
    each finish ~114 shards/s at 10 h, 570 at 2 h: the driver's per-shard cost times that must
    stay well under one core, ``benchmarks/scale.py``) and the work redone for a lost shard
    (seconds of one GPU). None: items only."""
    fuse_teachers: Literal["auto"] | bool = "auto"
    """Both teachers in one actor pool (each actor decodes a shard's items once and runs WavLM
    + MVQ and Dasheng + MVQ on them), or one pool per teacher (an audio item decoded by each).
    ``auto``: fused when both teachers run and ask for the same per-actor resources
    (``device``, ``num_gpus``, ``num_cpus``: both fit one GPU share), else per-teacher pools;
    ``true``: fused, refused when their resources differ; ``false``: per-teacher pools (each
    teacher its own GPU share and pool size). A fused pool has
    ``max(teachers.*.num_actors)`` actors. docs/tokenize.md "Where decode runs" has the
    measurements."""
    progress_seconds: float = 30.0
    """Seconds between one-line progress summaries in the log (without a terminal)."""

    def __post_init__(self) -> None:
        if self.items_per_shard < 1:
            raise ConfigError("tokenize items_per_shard must be >= 1")
        if self.progress_seconds <= 0:
            raise ConfigError("tokenize progress_seconds must be positive")
        if self.max_shard_hours is not None and self.max_shard_hours <= 0:
            raise ConfigError("tokenize max_shard_hours must be positive (or null)")


def tokenize_batch(
    teacher: LoadedTeacher,
    quantizer: Any,
    batch: dict[str, Any],
    *,
    prefix: str,
    domains: tuple[str, ...],
    refine_rounds: int,
    keep_audio: tuple[str, ...],
) -> dict[str, Any]:
    """Codes of ``teacher`` + ``quantizer`` for the rows of ``domains`` (see module docstring)."""
    import torch

    t0 = time.perf_counter()
    n = len(batch["item_id"])
    err = np.array(
        [str(e) for e in batch.get("error_type", [""] * n)], dtype=object
    )  # copy: rows may turn into errors here
    msg = np.array([str(e) for e in batch.get("error", [""] * n)], dtype=object)
    domain = [str(d) for d in batch["domain"]]
    run = [i for i in range(n) if err[i] == "" and domain[i] in domains]
    waves = [np.frombuffer(batch["audio"][i], dtype=AUDIO_DTYPE) for i in run]
    embs = run_teacher(teacher, waves)
    frames = np.full(n, NOT_RUN, dtype=np.int32)
    codes = np.empty(n, dtype=object)
    codes[:] = [b""] * n
    for i, e in zip(run, embs, strict=True):
        if len(e) == 0:
            err[i] = "too_short"
            msg[i] = (
                f"{batch['url'][i]}: {len(batch['audio'][i]) // 2} samples give no "
                f"{teacher.spec.name} frame"
            )
    # One encode call for the whole batch: the quantiser's chunks stay full (codes of a frame
    # do not depend on its neighbours).
    keep = [(i, e) for i, e in zip(run, embs, strict=True) if len(e)]
    if keep:
        flat = torch.from_numpy(np.concatenate([e for _, e in keep]))
        all_codes = quantizer.encode(flat, refine_rounds).cpu().numpy()
        at = 0
        for i, e in keep:
            frames[i] = len(e)
            codes[i] = codes_to_bytes(all_codes[at : at + len(e)])
            at += len(e)
    out = {k: v for k, v in batch.items() if k != "audio"}
    if keep_audio:
        # Only rows a later teacher runs on carry their audio on: the rest would be object-store
        # traffic for nothing (speech items after WavLM, by default).
        audio = np.empty(n, dtype=object)
        audio[:] = [
            batch["audio"][i] if err[i] == "" and domain[i] in keep_audio else b"" for i in range(n)
        ]
        out["audio"] = audio
    out["error_type"], out["error"] = err, msg
    out[f"{prefix}_frames"] = frames
    out[f"{prefix}_codes"] = codes
    out[f"{prefix}_seconds"] = np.full(n, (time.perf_counter() - t0) / max(n, 1))
    return out


def teacher_info(
    prefix: str, teacher: TeacherConfig, quantizer: Any, domains: tuple[str, ...], sha: str | None
) -> TokenTeacherInfo:
    """The token shard metadata entry for one teacher of the job."""
    spec = teacher.spec
    return TokenTeacherInfo(
        prefix=prefix,
        teacher=spec.name,
        family=spec.family,
        layer=teacher.layer or spec.layer,
        frame_rate=spec.frame_rate,
        num_codebooks=quantizer.num_codebooks,
        codebook_size=quantizer.codebook_size,
        quantizer_id=quantizer.id,
        checkpoint_sha256=sha,
        domains=tuple(domains),
    )


class TokenizeStage:
    """Ray Data actor: loads the teacher and its quantiser once, then tokenizes each batch."""

    def __init__(
        self,
        teacher: TeacherConfig,
        quantizer_url: str,
        storage: StorageConfig,
        *,
        prefix: str,
        domains: tuple[str, ...],
        refine_rounds: int,
        keep_audio: tuple[str, ...],
        quantizer_id: str | None = None,
    ):
        from spear.stages.quantizers import load_quantizer

        self.teacher = load_teacher(teacher, storage)
        self.quantizer = load_quantizer(quantizer_url, storage, str(self.teacher.device)).eval()
        if quantizer_id is not None and self.quantizer.id != quantizer_id:
            # The file changed between planning and this actor's start: its codes would carry
            # the plan's id without being that quantiser's.
            raise SpearError(
                f"quantizer {quantizer_url!r} is now {self.quantizer.id}, the job planned "
                f"{quantizer_id}; re-run the command"
            )
        self.kw = {
            "prefix": prefix,
            "domains": domains,
            "refine_rounds": refine_rounds,
            "keep_audio": keep_audio,
        }

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        try:
            return tokenize_batch(self.teacher, self.quantizer, batch, **self.kw)  # type: ignore[arg-type]
        except Exception:  # e.g. CUDA out of memory on one long item, or a frame-count bug
            log.exception(
                "tokenize: a batch of %d failed; retrying item by item", len(batch["item_id"])
            )
            return tokenize_rows_one_by_one(self.teacher, self.quantizer, batch, **self.kw)


def tokenize_rows_one_by_one(
    teacher: LoadedTeacher, quantizer: Any, batch: dict[str, Any], **kw: Any
) -> dict[str, Any]:
    """:func:`tokenize_batch` per row, so one item that fails is quarantined
    (``error_type = "internal"``, stage teacher) instead of failing the job on every re-run."""
    import torch

    n = len(batch["item_id"])
    parts = []
    for i in range(n):
        row = {k: v[i : i + 1] for k, v in batch.items()}
        try:
            parts.append(tokenize_batch(teacher, quantizer, row, **kw))
        except Exception as err:
            log.exception("tokenize: item %s failed", row["item_id"][0])
            if teacher.device.type == "cuda":
                torch.cuda.empty_cache()
            row["error_type"] = np.array(["internal"], dtype=object)
            row["error"] = np.array(
                [f"{row['url'][0]}: {teacher.spec.name}: {type(err).__name__}: {err}"],
                dtype=object,
            )
            parts.append(tokenize_batch(teacher, quantizer, row, **kw))  # skips the row
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


class FusedTokenizeStage:
    """Ray Data actor holding every teacher of the job (each with its quantiser, built by
    :class:`TokenizeStage`), run in turn on each batch: the items are decoded once for all of
    them. ``stages``: each teacher's :class:`TokenizeStage` keyword arguments, in job order;
    a teacher's ``keep_audio`` must name the domains of the teachers after it (the audio they
    need), the last one's none. The output is that of the per-teacher pools chained."""

    def __init__(self, stages: list[dict[str, Any]]):
        if not stages:
            raise SpearError("a fused tokenize actor needs at least one teacher")
        self.stages = [TokenizeStage(**kw) for kw in stages]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        for stage in self.stages:
            batch = stage(batch)
        return batch
