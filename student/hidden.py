"""Every encoder layer's output at 50 Hz (SPEAR's ``hidden_states``), for downstream probes.

A layer in a downsampled stack runs at 25 / 12.5 / 6.25 Hz; its output is repeated back to
50 Hz and cut to the encoder's frames, as SPEAR's ``DownsampledZipformer2Encoder`` does for its
hidden states, with the stack's own channel count. States are taken straight after each layer
(before the stack's upsampling bypass and the training-time feature mask), padded frames are 0.
Read through forward hooks, so the encoder's own forward is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spear.errors import SpearError
from spear.student.zipformer import Zipformer2, ZipformerStack, make_pad_mask


def encode_layers(
    encoder: Zipformer2, feats: Tensor, lengths: Tensor, batch_count: float | None = None
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """fbank (B, T, 128) -> (output (B, T', D), lengths (B,), one (B, T', d_stack) per layer,
    in order)."""
    captured: list[tuple[int, Tensor]] = []
    handles = []
    for stack in encoder.stacks:
        assert isinstance(stack, ZipformerStack)

        def keep(_m: nn.Module, _i: object, out: Tensor, ds: int = stack.ds) -> None:
            captured.append((ds, out))

        handles += [layer.register_forward_hook(keep) for layer in stack.layers]
    try:
        x, out_lengths = encoder(feats, lengths, batch_count)
    finally:
        for h in handles:
            h.remove()
    t = x.shape[1]
    pad = make_pad_mask(out_lengths, t)[..., None]
    hidden = [h.repeat_interleave(ds, dim=1)[:, :t].masked_fill(pad, 0.0) for ds, h in captured]
    return x, out_lengths, hidden


def select_layers(spec: str | None, num_layers: int) -> tuple[int, ...] | None:
    """``all`` or ``N,M,...`` (0-based indices into the hidden states; negative count from the
    end) -> sorted distinct indices; None/empty -> None (the final output only)."""
    if spec is None or not spec.strip():
        return None
    if spec.strip() == "all":
        return tuple(range(num_layers))
    try:
        picked = [int(v) for v in spec.split(",")]
    except ValueError:
        raise SpearError(
            f"--layers takes 'all' or comma-separated integers, got {spec!r}"
        ) from None
    bad = [v for v in picked if not -num_layers <= v < num_layers]
    if bad:
        raise SpearError(
            f"--layers {spec!r}: the student has layers 0..{num_layers - 1}, not {bad}"
        )
    return tuple(sorted({v % num_layers for v in picked}))


def stack_layers(hidden: list[Tensor], layers: tuple[int, ...], dim: int) -> Tensor:
    """The chosen layers as one (B, T, len(layers), dim) tensor; narrower stacks' states are
    zero-padded to ``dim`` (their channels above the stack's width are 0)."""
    picked = [F.pad(hidden[i], (0, dim - hidden[i].shape[-1])) for i in layers]
    return torch.stack(picked, dim=2)


def encode_waveforms(
    student: Any, waves: Sequence[Tensor], layers: bool = True
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """16 kHz float waveforms in [-1, 1] (any lengths, any device) -> the student's output
    (B, T, D), lengths, and every layer's state zero-padded to D (empty without ``layers``):
    the core of the HEAR and s3prl interfaces (:mod:`spear.hear`, :mod:`spear.s3prl`).
    Waveforms too short for one output frame are zero-padded to :data:`MIN_SAMPLES`."""
    device = next(student.parameters()).device
    clips = [w.detach().float().cpu().reshape(-1) for w in waves]
    clips = [
        F.pad(c, (0, MIN_SAMPLES - c.numel())) if c.numel() < MIN_SAMPLES else c for c in clips
    ]
    # The checkpoint's own front end (recorded in student.pt), on the student's device.
    feats, lengths = student.frontend.waves(clips, device)
    if not layers:
        out, out_len = student.encode(feats, lengths)
        return out, out_len, []
    out, out_len, hidden = student.encode(feats, lengths, layers=True)
    dim = out.shape[-1]
    return out, out_len, [F.pad(h, (0, dim - h.shape[-1])) for h in hidden]


MIN_SAMPLES = 1840
"""Samples for 9 fbank frames (one output frame) whatever the front end's edge handling."""
