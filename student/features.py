"""A trained student's frame features: the stage core of ``spear features``.

* :func:`features_batch` - pure: an audio batch (decode stage output) -> 50 Hz encoder output
  per row, float16 ``(num_frames, dim)`` row-major bytes (``EMBEDDING_SHARD_SCHEMA``'s layout);
  with ``layers``, the chosen layers' states instead, ``(num_frames, len(layers), dim)``
  (narrower stacks zero-padded to ``dim``; :mod:`spear.student.hidden`).
* :class:`FeatureStage` - the actor stage (loads the student once); the job that runs it is
  ``spear.pipeline.features``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from spear.formats import AUDIO_DTYPE
from spear.storage import StorageConfig
from spear.student.hidden import stack_layers
from spear.student.model import Student

log = logging.getLogger(__name__)

FRAME_RATE = 50.0


def features_batch(
    model: Student,
    batch: dict[str, Any],
    device: torch.device,
    layers: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Encoder output (or the ``layers``' states) for the rows that decoded; others keep their
    error and get no frames."""
    n = len(batch["item_id"])
    err = [str(e) for e in batch.get("error_type", [""] * n)]
    ok = [i for i in range(n) if not err[i]]
    frames = np.zeros(n, dtype=np.int32)
    feats = np.empty(n, dtype=object)
    feats[:] = [b""] * n
    if ok:
        waves = [np.frombuffer(batch["audio"][i], dtype=AUDIO_DTYPE) for i in ok]
        with torch.inference_mode():
            # The checkpoint's own frontend (recorded in student.pt), on the model's device.
            x, lengths = model.frontend.waves(waves, device)
            if layers is None:
                y, out_len = model.encode(x, lengths)
            else:
                _, out_len, hidden = model.encode(x, lengths, layers=True)
                y = stack_layers(hidden, layers, model.output_dim)  # (B, T, L, D)
        arr = y.float().cpu().numpy()
        for row, i in enumerate(ok):
            f = int(out_len[row])
            frames[i] = f
            feats[i] = np.ascontiguousarray(arr[row, :f], dtype="<f2").tobytes()
    out = {k: v for k, v in batch.items() if k != "audio"}
    out["num_frames"], out["features"] = frames, feats
    return out


class FeatureStage:
    """Actor stage: the student on this actor's device, eval mode."""

    def __init__(
        self,
        checkpoint: str,
        storage: StorageConfig,
        device: str,
        layers: tuple[int, ...] | None = None,
    ):
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if use_cuda else "cpu")
        self.model = Student.from_checkpoint(checkpoint, storage).to(self.device).eval()
        self.layers = layers

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return features_batch(self.model, batch, self.device, self.layers)
