"""Dasheng (Dinkel et al. 2024), inference only, batch-safe.

Computes what the ``dasheng`` package's ``Dasheng`` model computes for one item:

1. log-mel front end: |STFT|² (n_fft 512, Hann window 512, hop 160, ``center=True`` with reflect
   padding), 64 HTK mel bins over 0-8 kHz, ``10 * log10(max(x, 1e-10))``, floor at
   ``max - top_db`` (120 dB), then BatchNorm over mel bins (eval statistics);
2. patches of 64 mels x 4 frames (40 ms) -> ``embed_dim`` via a strided conv;
3. the patch sequence is cut into chunks of ``target_length / 4`` patches (1008 mel frames =
   10.08 s); each chunk gets the time/frequency position embeddings, runs through the ViT and the
   final LayerNorm on its own; outputs are concatenated.

Unlike the package, padding never changes an item's output:

* each item is reflect-padded at its own ends before the STFT (the package pads the batch, so
  an item's last frames see zeros, not its own reflection);
* the top_db floor is taken per item over its own valid frames (the package takes one max over
  the whole batch, so a quiet item batched with a loud one changes);
* a short last chunk is zero-padded to the batch's chunk width and the padded patches are masked
  out of attention, so it equals the package's unpadded short chunk; outputs are trimmed.

Frame count: ``(1 + n // 160) // 4`` for ``n`` samples (mel frames with ``center=True``, then whole
4-frame patches).

The architecture only: reading checkpoints (the package's ``.pt``, a hub mirror folder) into it
is :mod:`spear.stages.teachers.weights`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(kw_only=True, frozen=True)
class DashengArch:
    """Dasheng architecture (defaults: Dasheng 1.2B)."""

    embed_dim: int = 1536
    """ViT width."""
    depth: int = 40
    """ViT blocks."""
    num_heads: int = 24
    """Attention heads."""
    mlp_ratio: float = 4.0
    """MLP inner width / embed_dim."""
    qkv_bias: bool = True
    """Bias on the fused q/k/v projection."""
    layer_scale: bool = False
    """Per-channel LayerScale after attention and MLP (``init_values`` set in the package)."""
    target_length: int = 1008
    """Mel frames per chunk encoded on its own (10.08 s)."""
    patch_frames: int = 4
    """Mel frames per patch (40 ms)."""
    n_mels: int = 64
    """Mel bins (one patch spans all of them)."""
    n_fft: int = 512
    win_length: int = 512
    hop_length: int = 160
    f_min: float = 0.0
    f_max: float = 8000.0
    sample_rate: int = 16_000
    top_db: float = 120.0
    """Dynamic range kept below each item's loudest mel bin."""

    def num_frames(self, num_samples: int) -> int:
        """Output frames (25 Hz) for ``num_samples`` samples."""
        return (1 + num_samples // self.hop_length) // self.patch_frames


def dasheng_12b() -> DashengArch:
    return DashengArch()


def dasheng_06b() -> DashengArch:
    return DashengArch(embed_dim=1280, depth=32, num_heads=16)


def dasheng_base() -> DashengArch:
    return DashengArch(embed_dim=768, depth=12, num_heads=12)


def dasheng_tiny() -> DashengArch:
    """Same code, a few narrow blocks: for tests and the demo."""
    return DashengArch(embed_dim=64, depth=2, num_heads=4)


def mel_filterbank(arch: DashengArch) -> Tensor:
    """HTK-scale triangular mel filters without area normalisation. # (n_fft//2+1, n_mels)

    torchaudio's ``melscale_fbanks`` in float32, the very weights the package's
    ``MelSpectrogram`` uses: the same formula in float64 differs by up to 8.3e-6 per weight,
    which on a narrow-band item moved the output by 1.1e-5 relative (beyond the parity goal).
    """
    from torchaudio.functional import melscale_fbanks

    # On the CPU even where the model is built on the meta device (the driver's checkpoint
    # check): the formula reads values back.
    with torch.device("cpu"):
        return melscale_fbanks(
            arch.n_fft // 2 + 1,
            arch.f_min,
            arch.f_max,
            arch.n_mels,
            arch.sample_rate,
            norm=None,
            mel_scale="htk",
        )


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        b, n, d = x.shape  # (B, N, D)
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # (B, H, N, hd)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class _LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, arch: DashengArch):
        super().__init__()
        d = arch.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = _Attention(d, arch.num_heads, arch.qkv_bias)
        self.ls1: nn.Module = _LayerScale(d) if arch.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = _Mlp(d, int(d * arch.mlp_ratio))
        self.ls2: nn.Module = _LayerScale(d) if arch.layer_scale else nn.Identity()

    def forward(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), key_mask))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _PatchEmbed(nn.Module):
    def __init__(self, arch: DashengArch):
        super().__init__()
        size = (arch.n_mels, arch.patch_frames)
        self.proj = nn.Conv2d(1, arch.embed_dim, kernel_size=size, stride=size)


class Dasheng(nn.Module):
    """Dasheng encoder: waveform -> 25 Hz embeddings after the final LayerNorm."""

    window: Tensor
    mel_fb: Tensor

    def __init__(self, arch: DashengArch):
        super().__init__()
        self.arch = arch
        self.register_buffer("window", torch.hann_window(arch.win_length), persistent=False)
        self.register_buffer("mel_fb", mel_filterbank(arch), persistent=False)
        self.init_bn = nn.BatchNorm1d(arch.n_mels, momentum=0.01)
        self.patch_embed = _PatchEmbed(arch)
        t_patches = arch.target_length // arch.patch_frames
        self.time_pos_embed = nn.Parameter(torch.zeros(1, arch.embed_dim, 1, t_patches))
        self.freq_pos_embed = nn.Parameter(torch.zeros(1, arch.embed_dim, 1, 1))
        self.blocks = nn.ModuleList([_Block(arch) for _ in range(arch.depth)])
        self.norm = nn.LayerNorm(arch.embed_dim, eps=1e-6)
        for p in (self.time_pos_embed, self.freq_pos_embed):
            nn.init.normal_(p, std=0.02)

    def log_mel(self, wave: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Batch-safe log-mel in float32. # (B, S) -> (B, n_mels, T), valid frames (B,)"""
        a = self.arch
        wave = wave.float()
        pad = a.n_fft // 2
        # Reflect-pad every item at its own ends, as an unbatched center=True STFT would.
        b, s = wave.shape
        padded = wave.new_zeros(b, s + 2 * pad)
        for i in range(b):
            n = int(lengths[i])
            if n > pad:  # shorter items yield no output frame; reflect padding needs n > pad
                padded[i, : n + 2 * pad] = F.pad(wave[i : i + 1, :n], (pad, pad), mode="reflect")[0]
        spec = torch.stft(
            padded,
            a.n_fft,
            hop_length=a.hop_length,
            win_length=a.win_length,
            window=self.window,
            center=False,
            return_complex=True,
        )  # (B, F, T) with T = 1 + S // hop
        power = spec.real.square() + spec.imag.square()
        mel = torch.matmul(power.transpose(1, 2), self.mel_fb).transpose(1, 2)  # (B, n_mels, T)
        db = 10.0 * torch.log10(mel.clamp(min=1e-10))
        frames = 1 + torch.div(lengths, a.hop_length, rounding_mode="floor")  # (B,)
        valid = torch.arange(db.shape[2], device=db.device)[None, :] < frames[:, None]  # (B, T)
        peak = db.masked_fill(~valid[:, None, :], float("-inf")).amax(dim=(1, 2), keepdim=True)
        db = torch.maximum(db, peak - a.top_db)
        return self.init_bn(db), frames

    def forward(self, wave: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Returns embeddings (B, T, D) and valid frames per item (B,)."""
        a = self.arch
        # The front end stays float32 under autocast: bf16 mel power would cost ~0.1 dB.
        with torch.autocast(wave.device.type, enabled=False):
            mel, mel_frames = self.log_mel(wave, lengths)  # (B, M, T_mel)
        x = self.patch_embed.proj(mel[:, None].to(self.patch_embed.proj.weight.dtype))
        x = x.flatten(2)  # (B, D, P): one patch row, since a patch spans all mel bins
        frames = torch.div(mel_frames, a.patch_frames, rounding_mode="floor")  # (B,)
        b, d, p = x.shape
        chunk = a.target_length // a.patch_frames
        n_chunks = max(1, math.ceil(p / chunk))
        x = F.pad(x, (0, n_chunks * chunk - p))  # (B, D, C*chunk)
        x = x + self.freq_pos_embed[:, :, 0, :]
        width = min(chunk, p)  # a batch shorter than one chunk needs no padding
        pos = self.time_pos_embed[:, :, 0, :width]  # (1, D, width)
        # Chunks become batch rows: (B * C, width, D); each attends only within itself.
        x = x.view(b, d, n_chunks, chunk)[..., :width] + pos[:, :, None, :]
        x = x.permute(0, 2, 3, 1).reshape(b * n_chunks, width, d)
        idx = torch.arange(n_chunks * chunk, device=x.device).view(n_chunks, chunk)[:, :width]
        valid = idx[None] < frames[:, None, None]  # (B, C, width)
        valid = valid.reshape(b * n_chunks, width)
        # Rows whose chunk is all padding still need one key to avoid NaN; their output is dropped.
        valid[:, 0] = True
        key_mask = None if bool(valid.all()) else valid[:, None, None, :]  # (B*C, 1, 1, width)
        for block in self.blocks:
            x = block(x, key_mask)
        x = self.norm(x)  # (B*C, width, D)
        x = x.view(b, n_chunks * width, d)[:, :p]
        return x, frames


def build_dasheng(arch: DashengArch) -> Dasheng:
    """A random-initialised :class:`Dasheng` (unit BatchNorm) in eval mode (weights:
    ``weights.load_strict``)."""
    return Dasheng(arch).eval()
