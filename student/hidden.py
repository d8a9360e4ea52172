"""Every encoder layer's output at 50 Hz (SPEAR's ``hidden_states``), for downstream probes.

A layer in a downsampled stack runs at 25 / 12.5 / 6.25 Hz; its output is repeated back to
50 Hz and cut to the encoder's frames, as SPEAR's ``DownsampledZipformer2Encoder`` does for its
hidden states, with the stack's own channel count. States are taken straight after each layer
(before the stack's upsampling bypass and the training-time feature mask), padded frames are 0.
Read through forward hooks, so the encoder's own forward is unchanged.
"""

from __future__ import annotations

from torch import Tensor, nn

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
