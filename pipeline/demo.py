"""The demo: the main job end to end on embedded defaults (local Ray, local files, tiny models).

Steps (each one is the same library call its CLI command makes):
1. Generate a corpus: speech-like files, audio clips, and the bad files real corpora contain.
2. ``spear manifest`` over the speech and audio folders.
3. ``spear decode`` of that manifest.
4. ``spear embed`` with the tiny random-initialised WavLM (speech items).
5. ``spear quantizer train`` on those embeddings (a short schedule), then its held-out report.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from spear.config import SpearConfig, replace
from spear.pipeline.decode import DecodeSummary, run_decode
from spear.pipeline.embed import EmbedConfig, EmbedSummary, run_embed
from spear.pipeline.manifest import ManifestSummary, build_manifest
from spear.quantizer.train import train_quantizer
from spear.stages.manifest import SourceConfig
from spear.storage import exists, join, write_atomic
from spear.synth import write_corpus, write_speech_like

log = logging.getLogger(__name__)


@dataclass
class DemoResult:
    corpus: str
    manifest: ManifestSummary
    decode: DecodeSummary
    embed: EmbedSummary
    quantizer: str


def run_demo(out: str, cfg: SpearConfig, *, speech_files: int = 24) -> DemoResult:
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
    m = build_manifest(sources, join(out, "manifest"), cfg.manifest, storage, cfg.ray)
    print(m.line(), flush=True)
    d = run_decode(join(out, "manifest"), join(out, "decoded"), cfg.decode, storage, cfg.ray)
    print(d.line(), flush=True)

    teacher = replace(cfg.teachers.wavlm, name="wavlm-tiny", checkpoint=None)
    e = run_embed(join(out, "manifest"), join(out, "embeddings"), teacher,
                  EmbedConfig(items_per_shard=16), cfg.decode, storage, cfg.ray)  # fmt: skip
    print(e.line(), flush=True)

    # A short schedule and small codebooks for the 64-d tiny teacher: seconds, not hours.
    qcfg = replace(
        cfg.quantizer,
        train=replace(
            cfg.quantizer.train,
            num_codebooks=4,
            codebook_size=64,
            phase_steps=150,
            batch_size=256,
            log_every=50,
            checkpoint_every=100,
        ),
    )
    qout = join(out, "quantizer")
    q = train_quantizer(qcfg, join(out, "embeddings"), qout, storage)
    return DemoResult(corpus=corpus, manifest=m, decode=d, embed=e, quantizer=f"{qout} ({q.id})")
