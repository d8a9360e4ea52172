"""The demo: the main job end to end on embedded defaults (local Ray, local files, tiny models).

Steps (each one is the same library call its CLI command makes):
1. Generate a corpus: speech-like files, audio clips, and the bad files real corpora contain.
2. ``spear manifest`` over the speech and audio folders.
3. ``spear decode`` of that manifest.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from spear.config import SpearConfig
from spear.pipeline.decode import DecodeSummary, run_decode
from spear.pipeline.manifest import ManifestSummary, build_manifest
from spear.stages.manifest import SourceConfig
from spear.storage import exists, join, write_atomic
from spear.synth import write_corpus, write_speech_like

log = logging.getLogger(__name__)


@dataclass
class DemoResult:
    corpus: str
    manifest: ManifestSummary
    decode: DecodeSummary


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
    return DemoResult(corpus=corpus, manifest=m, decode=d)
