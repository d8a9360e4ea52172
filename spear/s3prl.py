"""An s3prl-style upstream over any spear ``student.pt`` (SUPERB's harness).

s3prl's upstreams are ``nn.Module`` s whose ``forward(wavs)`` takes a list of 1-D 16 kHz float
waveforms and returns ``{"hidden_states": [(B, T, D), ...], ...}``; SUPERB's featurizer learns
a weighted sum over ``hidden_states``. :class:`UpstreamExpert` is that interface with nothing of
s3prl imported; docs/student.md shows the two files that register it inside an s3prl checkout.

``hidden_states``: every encoder layer's 50 Hz state (narrower stacks zero-padded to D), then
the encoder output: ``num_layers + 1`` tensors, all (B, T, D). Padded frames are 0 and do not
change the valid ones (spear's student is padding-exact).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from spear.student.hidden import encode_waveforms
from spear.student.model import Student

DOWNSAMPLE_RATE = 320
"""Input samples per output frame (16 kHz / 50 Hz), what s3prl's ``get_downsample_rates``
reports."""


class UpstreamExpert(nn.Module):
    """``UpstreamExpert(ckpt)``: ckpt a ``student.pt`` (path or fsspec URL)."""

    def __init__(self, ckpt: str, model_config: str | None = None, **_: Any) -> None:
        super().__init__()
        self.student = Student.from_checkpoint(ckpt)
        self.num_layers = self.student.num_layers + 1
        self.hidden_size = self.student.output_dim

    def get_downsample_rates(self, key: str = "hidden_states") -> int:
        return DOWNSAMPLE_RATE

    def forward(self, wavs: list[Tensor]) -> dict[str, Any]:
        out, lengths, hidden = encode_waveforms(self.student, wavs)
        states = [*hidden, out]
        return {
            "hidden_states": states,
            "last_hidden_state": out,
            "lengths": lengths,
        }
