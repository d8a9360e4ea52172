"""The demo: the main job end to end on embedded defaults (local Ray, local files, tiny models).

Steps (each one is the same library call its CLI command makes):
1. Generate a corpus: speech-like files, audio clips, and the bad files real corpora contain.
2. ``spear manifest`` over the speech and audio folders.
3. ``spear embed`` with the tiny random-initialised WavLM (speech items) and Dasheng (audio
   items): the quantisers' training data.
4. ``spear quantizer train`` for each teacher (a short schedule, small codebooks).
5. ``spear tokenize``: WavLM tokens on every item, Dasheng tokens on audio items.
6. ``spear shards validate`` on the result.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Protocol

from spear.configio import replace
from spear.pipeline.embed import EmbedSummary, run_embed
from spear.pipeline.manifest import ManifestSummary, build_manifest
from spear.pipeline.quantize import train_quantizer
from spear.pipeline.settings import EmbedConfig
from spear.pipeline.tokenize import REPORT, TokenizeSummary, run_tokenize
from spear.quantizer.config import QuantizerConfig
from spear.ray_utils import RayConfig
from spear.shards import validate
from spear.stages.decode import DecodeConfig
from spear.stages.manifest import ManifestConfig, SourceConfig
from spear.stages.teachers import TeachersConfig
from spear.stages.tokenize import TokenizeConfig
from spear.storage import StorageConfig, exists, join, write_atomic
from spear.synth import write_corpus, write_speech_like

log = logging.getLogger(__name__)

TINY = {"wavlm": "wavlm-tiny", "dasheng": "dasheng-tiny"}


class DemoSections(Protocol):
    """The sections of ``spear.config.SpearConfig`` the demo reads: a job takes its sections,
    never the whole config (which sits above the jobs; the CLI passes a ``SpearConfig``)."""

    storage: StorageConfig
    ray: RayConfig
    manifest: ManifestConfig
    decode: DecodeConfig
    teachers: TeachersConfig
    embed: EmbedConfig
    quantizer: QuantizerConfig
    tokenize: TokenizeConfig


@dataclass
class DemoResult:
    corpus: str
    manifest: ManifestSummary
    embed: dict[str, EmbedSummary]
    quantizers: dict[str, str]
    tokenize: TokenizeSummary
    tokens: str
    report: str
    problems: list[str]


def run_demo(out: str, cfg: DemoSections, *, speech_files: int = 24) -> DemoResult:
    out = os.path.abspath(out) if "://" not in out else out
    storage = cfg.storage.resolved()
    corpus = join(out, "corpus")
    speech, audio = join(corpus, "speech"), join(corpus, "audio")
    done = join(corpus, "_DONE")
    if not exists(done, storage):  # the corpus is deterministic: generate it once
        write_speech_like(speech, speech_files, storage, seconds=(2, 12), seed=1)
        write_corpus(join(speech, "mixed"), storage, long_minutes=1.5)  # formats + bad files
        write_speech_like(audio, 8, storage, seconds=(8, 25), seed=2, sample_rate=44100, fmt="WAV")
        write_atomic(done, b"", storage)
    sources = [
        SourceConfig(url=speech, domain="speech", name="speech"),
        SourceConfig(url=audio, domain="audio", name="audio"),
    ]
    manifest = join(out, "manifest")
    m = build_manifest(sources, manifest, cfg.manifest, storage, cfg.ray)
    print(m.line(), flush=True)

    # Random weights, on purpose and said so (allow_random): the demo shows the machinery.
    teachers = {
        "wavlm": replace(
            cfg.teachers.wavlm, name=TINY["wavlm"], checkpoint=None, allow_random=True
        ),
        "dasheng": replace(
            cfg.teachers.dasheng, name=TINY["dasheng"], checkpoint=None, allow_random=True
        ),
    }
    embeds: dict[str, EmbedSummary] = {}
    quantizers: dict[str, str] = {}
    for prefix, teacher in teachers.items():
        ecfg = replace(cfg.embed, items_per_shard=16)
        e = run_embed(
            manifest, join(out, f"embeddings-{prefix}"), teacher, ecfg, cfg.decode, storage, cfg.ray
        )
        print(e.line(), flush=True)
        embeds[prefix] = e
        # A short schedule and small codebooks for the 64-d tiny teachers: seconds, not hours.
        qcfg = replace(
            cfg.quantizer,
            train=replace(
                cfg.quantizer.train,
                num_codebooks=4,
                codebook_size=64,
                phase_steps=150,
                batch_size=256,
                log_every=150,
                checkpoint_every=100,
                normalise=prefix == "wavlm",
            ),
        )
        qout = join(out, f"quantizer-{prefix}")
        q = train_quantizer(qcfg, join(out, f"embeddings-{prefix}"), qout, storage)
        quantizers[prefix] = f"{qout} ({q.id})"

    tcfg = replace(
        cfg.tokenize,
        items_per_shard=16,
        wavlm=replace(cfg.tokenize.wavlm, quantizer=join(out, "quantizer-wavlm")),
        dasheng=replace(cfg.tokenize.dasheng, quantizer=join(out, "quantizer-dasheng")),
    )
    tokens = join(out, "tokens")
    t = run_tokenize(
        manifest, tokens, teachers, tcfg, cfg.quantizer.encode, cfg.decode, storage, cfg.ray
    )
    print(t.line(), flush=True)
    problems = validate(tokens, storage)
    return DemoResult(
        corpus=corpus,
        manifest=m,
        embed=embeds,
        quantizers=quantizers,
        tokenize=t,
        tokens=tokens,
        report=join(tokens, REPORT),
        problems=problems,
    )
