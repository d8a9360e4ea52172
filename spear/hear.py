"""The HEAR 2021 API over any spear ``student.pt`` (https://hearbenchmark.com/hear-api.html).

    import spear.hear as hear
    model = hear.load_model("s3://bucket/run/student.pt")       # any fsspec URL or path
    emb, ts = hear.get_timestamp_embeddings(audio, model)     # audio: (n, samples) at 16 kHz
    scene = hear.get_scene_embeddings(audio, model)           # (n, D)

Timestamp embeddings are the student's 50 Hz frames (20 ms apart), timestamps the centres of
the audio each frame is computed from; scene embeddings their mean over time. ``load_model``
takes a ``layer`` (an index into ``Student.encode(..., layers=True)``) to embed with one encoder
layer instead of the output. ``hear-validator spear.hear -m student.pt`` accepts the module
(tests/test_hear.py; docs/student.md says how to install the validator).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from spear.student.hidden import encode_waveforms, select_layers
from spear.student.model import Student

SAMPLE_RATE = 16_000
HOP_MS = 20.0
"""Student frames are 2 fbank frames (10 ms) apart."""


def first_center_ms(snip_edges: bool) -> float:
    """Centre of output frame 0: it is computed from fbank frames 0..6 (the subsampling's three
    3-wide convolutions), so it sits on fbank frame 3. With Kaldi's ``snip_edges`` (version-2
    students' torchaudio front end) that frame's 25 ms window starts at 30 ms: 42.5 ms; with
    SPEAR's lhotse front end (``snip_edges=False``) frame i is centred at 10 i + 5 ms: 35 ms."""
    return 42.5 if snip_edges else 35.0


BATCH = 16
"""Sounds per forward pass (bounds memory on long clips)."""


class HearModel(nn.Module):
    """A student with the attributes HEAR asks for."""

    sample_rate = SAMPLE_RATE

    def __init__(self, student: Student, layer: int | None = None) -> None:
        super().__init__()
        self.student = student.eval()
        self.layer = layer
        self.scene_embedding_size = student.output_dim
        self.timestamp_embedding_size = student.output_dim

    def frames(self, audio: Tensor) -> tuple[Tensor, Tensor]:
        """(n, samples) -> embeddings (n, T, D), valid frames (n,)."""
        outs, lens = [], []
        for i in range(0, audio.shape[0], BATCH):
            with torch.inference_mode():
                out, n, hidden = encode_waveforms(
                    self.student, list(audio[i : i + BATCH]), layers=self.layer is not None
                )
            outs.append(out if self.layer is None else hidden[self.layer])
            lens.append(n)
        t = max(o.shape[1] for o in outs)
        padded = [nn.functional.pad(o, (0, 0, 0, t - o.shape[1])) for o in outs]
        return torch.cat(padded).float(), torch.cat(lens)


def load_model(model_file_path: str = "", layer: int | None = None, **_: Any) -> HearModel:
    """A ``student.pt`` (path or fsspec URL, or a training checkpoint folder) as a HEAR model.
    ``layer``: embed with this encoder layer's state (0-based; negative from the end) instead of
    the output."""
    if not model_file_path:
        raise ValueError("spear.hear.load_model needs the path of a student.pt")
    student = Student.from_checkpoint(model_file_path)
    if torch.cuda.is_available():
        student = student.cuda()
    picked = select_layers(str(layer), student.num_layers) if layer is not None else None
    return HearModel(student, picked[0] if picked else None)


def _check(audio: Tensor) -> Tensor:
    if audio.ndim != 2:
        raise ValueError(f"audio must be (n_sounds, n_samples), got {tuple(audio.shape)}")
    return audio


def get_timestamp_embeddings(audio: Tensor, model: HearModel) -> tuple[Tensor, Tensor]:
    """(n_sounds, n_samples) at 16 kHz in [-1, 1] -> embeddings (n_sounds, n_frames, D) and
    timestamps (n_sounds, n_frames) in ms (all sounds of a batch have one length in HEAR)."""
    emb, _ = model.frames(_check(audio))
    t = emb.shape[1]
    first = first_center_ms(model.student.frontend.cfg.snip_edges)
    ts = first + HOP_MS * torch.arange(t, device=emb.device, dtype=torch.float32)
    return emb, ts.expand(emb.shape[0], t)


def get_scene_embeddings(audio: Tensor, model: HearModel) -> Tensor:
    """(n_sounds, n_samples) -> (n_sounds, D): the mean of each sound's valid frames."""
    emb, lengths = model.frames(_check(audio))
    valid = torch.arange(emb.shape[1], device=emb.device)[None, :] < lengths[:, None]
    summed = (emb * valid[..., None]).sum(1)
    return summed / lengths.clamp_min(1)[:, None].to(summed.dtype)
