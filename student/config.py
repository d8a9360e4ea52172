"""Typed settings of the student (SPEC section 4): encoder presets, masking, heads, mixing,
optimiser.

Presets are small functions (``zipformer_large()``); :data:`ENCODER_PRESETS` maps their names.
Every dataclass validates itself, so a bad value fails when the config is parsed, not mid-run.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from spear.errors import ConfigError

NUM_STACKS = 7
DOWNSAMPLING = (1, 2, 4, 8, 4, 2, 1)
"""Stack rates 50, 25, 12.5, 6.25, 12.5, 25, 50 Hz after the 2x Conv2d subsampling."""
CNN_KERNELS = (31, 31, 15, 15, 15, 31, 31)


def _per_stack(name: str, values: tuple[int, ...], n: int) -> None:
    if len(values) != n:
        raise ConfigError(f"{name} needs one value per stack ({n}), got {len(values)}")
    if any(v < 1 for v in values):
        raise ConfigError(f"{name} must be positive, got {values}")


@dataclass(kw_only=True, frozen=True)
class Schedule:
    """A value that follows training progress (icefall's ScheduledFloat): piecewise linear in
    the schedule batch count between ``points``, constant before the first and after the last.
    The batch count is audio seconds seen (all workers) / ``ZipformerMachinery.batch_seconds``,
    icefall's "adjusted batch count"."""

    points: tuple[tuple[float, float], ...]
    """(batch count, value) pairs, batch counts strictly increasing."""

    def __post_init__(self) -> None:
        if not self.points or any(len(p) != 2 for p in self.points):
            raise ConfigError(f"a schedule needs (batch, value) pairs, got {self.points}")
        xs = [p[0] for p in self.points]
        if any(b <= a for a, b in itertools.pairwise(xs)):
            raise ConfigError(f"schedule batch counts must increase, got {xs}")

    def __call__(self, batch_count: float) -> float:
        (x0, y0), (xn, yn) = self.points[0], self.points[-1]
        if batch_count <= x0:
            return float(y0)
        if batch_count >= xn:
            return float(yn)
        for (xa, ya), (xb, yb) in itertools.pairwise(self.points):
            if batch_count <= xb:
                return float(ya + (yb - ya) * (batch_count - xa) / (xb - xa))
        raise AssertionError("unreachable: batch_count lies inside the points")

    @classmethod
    def of(cls, *points: tuple[float, float]) -> Schedule:
        return cls(points=tuple((float(x), float(y)) for x, y in points))

    def values(self) -> tuple[float, ...]:
        return tuple(float(y) for _, y in self.points)


Scheduled = float | Schedule
"""A constant or a :class:`Schedule` (YAML: a number, or ``{points: [[0, 0.3], [20000, 0.1]]}``)."""


def scheduled(value: Scheduled, batch_count: float) -> float:
    """The value of a constant-or-schedule at ``batch_count``."""
    return value(batch_count) if isinstance(value, Schedule) else float(value)


@dataclass(kw_only=True, frozen=True)
class ZipformerMachinery:
    """What makes icefall's Zipformer2 train stably: stochastic depth, scheduled dropout and
    bypass floors, near-identity initial scales and the gradient-only Balancer/Whiten modules.
    Defaults are icefall's ``egs/librispeech/ASR/zipformer`` values (docs/student.md lists
    them). Nothing here changes the parameters or the eval-mode forward."""

    batch_seconds: float = 600.0
    """Audio seconds (all workers) that count as one batch of the schedules (icefall's
    ``--ref-duration``)."""
    dropout: Scheduled = Schedule(points=((0.0, 0.3), (20000.0, 0.1)))
    """Dropout after the feed-forward activation and on the subsampling output, one mask per
    (utterance, channel) shared over time."""
    pos_emb_dropout: float = 0.15
    """Element-wise dropout on the relative position embedding."""
    layer_skip_start: float = 0.5
    """Layer-skip (whole-layer, per utterance) probability while a layer warms up."""
    layer_skip_end: float = 0.035
    """Layer-skip probability after warm-up, times sqrt(stack downsampling); kept for good."""
    layer_skip_batches: float = 4000.0
    """Layer warm-up span: stack i of n warms up over batches [i+1, i+2] * this / (n+1), its
    layers one after another."""
    attention_skip: Scheduled = Schedule(points=((0.0, 0.2), (4000.0, 0.05), (16000.0, 0.0)))
    """Per-utterance skip of the non-linear attention and both attentions (one mask for all
    three)."""
    conv_skip: Scheduled = Schedule(points=((0.0, 0.2), (4000.0, 0.05), (16000.0, 0.0)))
    """Per-utterance skip of each convolution module."""
    ff_skip: Scheduled = Schedule(points=((0.0, 0.1), (4000.0, 0.01), (50000.0, 0.0)))
    """Per-utterance skip of the second and third feed-forward modules."""
    const_attention: Scheduled = Schedule(points=((0.0, 0.25), (4000.0, 0.025)))
    """Probability (per batch and layer) that the non-linear attention gets uniform weights
    over the valid frames instead of the computed ones."""
    pos_emb_skip: Scheduled = Schedule(points=((0.0, 0.5), (4000.0, 0.0)))
    """Probability (per batch and layer) that attention scores leave out the position part."""
    convnext_skip: Scheduled = Schedule(points=((0.0, 0.2), (20000.0, 0.015)))
    """Per-utterance skip of the subsampling's ConvNeXt block."""
    bypass_floor: Scheduled = Schedule(points=((0.0, 0.9), (20000.0, 0.2)))
    """Lower limit of every bypass scale (layer, mid-layer, stack output), enforced through the
    gradient as icefall does (the forward always uses the learned scale)."""
    feature_mask_prob: float = 0.125
    """Per utterance: channels between ``unmasked_dims`` and the midpoint up to the stack width
    are zeroed with this probability, channels above the midpoint also with it again (~2x);
    one draw per utterance shared by all stacks."""
    balancers: bool = True
    """Balancer modules: keep each channel's sign balance and magnitude in range (gradient
    only)."""
    whiteners: bool = True
    """Whiten modules: keep activation covariances from collapsing onto few directions
    (gradient only)."""
    attention_score_limit: float = 25.0
    """On 10 % of training calls, attention scores beyond +-limit get a gradient penalty
    (0: off)."""
    attention_score_penalty: float = 1e-4
    """That penalty per unit of excess, relative to a loss summed over output frames (scaled by
    1/frames here, since spear's loss is per frame)."""
    embed_grad_scale: float = 0.2
    """Gradient scale after the first subsampling convolution (1: off)."""
    near_identity_init: bool = True
    """icefall's initial scales: residual-branch output projections 0.05 (attention, conv)
    and 0.1 (feed-forward), ConvNeXt output 0.01, position projection 0.05, attention input
    query_head_dim^-0.25 (it replaces an explicit 1/sqrt(d)). False: torch defaults with the
    explicit 1/sqrt(d)."""

    def __post_init__(self) -> None:
        if self.batch_seconds <= 0:
            raise ConfigError(f"batch_seconds must be positive, got {self.batch_seconds}")
        for name in (
            "dropout",
            "pos_emb_dropout",
            "layer_skip_start",
            "layer_skip_end",
            "attention_skip",
            "conv_skip",
            "ff_skip",
            "const_attention",
            "pos_emb_skip",
            "convnext_skip",
            "bypass_floor",
            "feature_mask_prob",
        ):
            v = getattr(self, name)
            values = v.values() if isinstance(v, Schedule) else (float(v),)
            if any(not 0.0 <= x < 1.0 for x in values):
                raise ConfigError(f"{name} must stay in [0, 1), got {v}")
        if self.layer_skip_batches < 0 or self.attention_score_limit < 0:
            raise ConfigError("layer_skip_batches and attention_score_limit must be >= 0")
        if self.attention_score_penalty < 0 or self.embed_grad_scale < 0:
            raise ConfigError("attention_score_penalty and embed_grad_scale must be >= 0")

    def batch_count(self, hours: float) -> float:
        """The schedules' batch count after ``hours`` of audio (all workers)."""
        return hours * 3600.0 / self.batch_seconds


@dataclass(kw_only=True, frozen=True)
class ZipformerConfig:
    """A Zipformer2 encoder (icefall's layout; ``machinery`` holds its training-time parts)."""

    num_features: int = 128
    """Input feature bins (128-bin fbank)."""
    downsampling: tuple[int, ...] = DOWNSAMPLING
    """Per-stack downsampling relative to the 50 Hz embedding; its length is the stack count."""
    num_layers: tuple[int, ...] = (1, 2, 2, 3, 1, 1, 1)
    """Encoder layers per stack."""
    encoder_dims: tuple[int, ...] = (1024,) * NUM_STACKS
    """Channels per stack; the output has max(encoder_dims) channels."""
    feedforward_dims: tuple[int, ...] = (3072,) * NUM_STACKS
    """Feed-forward hidden size per stack (the three FF modules use 3/4, 1 and 5/4 of it)."""
    unmasked_dims: tuple[int, ...] = (512,) * NUM_STACKS
    """Channels never hit by the training-time feature mask (icefall's encoder_unmasked_dim)."""
    num_heads: tuple[int, ...] = (8,) * NUM_STACKS
    """Attention heads per stack."""
    cnn_kernels: tuple[int, ...] = CNN_KERNELS
    """Depthwise convolution kernel per stack (odd)."""
    query_head_dim: int = 32
    value_head_dim: int = 12
    pos_head_dim: int = 4
    pos_dim: int = 48
    """Size of the relative positional embedding."""
    embed_channels: tuple[int, int, int] = (8, 32, 128)
    """Channels of the three subsampling convolutions (icefall's layer1/2/3_channels)."""
    machinery: ZipformerMachinery = field(default_factory=ZipformerMachinery)
    """Stochastic depth, scheduled dropout and bypass floors, initial scales, Balancer/Whiten."""

    def __post_init__(self) -> None:
        n = len(self.downsampling)
        for name in (
            "downsampling",
            "num_layers",
            "encoder_dims",
            "feedforward_dims",
            "unmasked_dims",
            "num_heads",
            "cnn_kernels",
        ):
            _per_stack(name, getattr(self, name), n)
        if any(k % 2 == 0 for k in self.cnn_kernels):
            raise ConfigError(f"cnn_kernels must be odd, got {self.cnn_kernels}")
        if any(u > d for u, d in zip(self.unmasked_dims, self.encoder_dims, strict=True)):
            raise ConfigError("unmasked_dims must not exceed encoder_dims")
        if len(self.embed_channels) != 3 or min(self.embed_channels) < 1:
            raise ConfigError(f"embed_channels needs 3 positive values, got {self.embed_channels}")
        if self.pos_dim % 2:
            raise ConfigError(f"pos_dim must be even, got {self.pos_dim}")
        top = self.machinery.layer_skip_end * max(self.downsampling) ** 0.5
        if top >= 1.0:
            raise ConfigError(f"layer_skip_end x sqrt(downsampling) reaches {top:.3g} (>= 1)")

    @property
    def output_dim(self) -> int:
        return max(self.encoder_dims)


def zipformer_tiny() -> ZipformerConfig:
    """~1.5M parameters (2.1M with both heads): for tests and CPU smoke runs."""
    return ZipformerConfig(
        num_layers=(1,) * NUM_STACKS,
        encoder_dims=(64, 64, 96, 96, 96, 64, 64),
        feedforward_dims=(128, 128, 192, 192, 192, 128, 128),
        unmasked_dims=(32,) * NUM_STACKS,
        num_heads=(4,) * NUM_STACKS,
        cnn_kernels=(7, 7, 5, 5, 5, 7, 7),
        query_head_dim=16,
        value_head_dim=8,
        pos_head_dim=4,
        pos_dim=16,
        embed_channels=(4, 8, 16),
    )


def zipformer_base() -> ZipformerConfig:
    """~93M: 512-d at 50 Hz (the paper gives no layout; this one has 93.3M)."""
    return ZipformerConfig(
        num_layers=(1, 2, 2, 3, 2, 1, 1),
        encoder_dims=(512,) * NUM_STACKS,
        feedforward_dims=(1536,) * NUM_STACKS,
        unmasked_dims=(256,) * NUM_STACKS,
    )


def zipformer_large() -> ZipformerConfig:
    """~327M: layers 1,2,2,3,1,1,1, dim 1024, FF 3072, unmasked 512 (SPEC)."""
    return ZipformerConfig()


def zipformer_xlarge() -> ZipformerConfig:
    """~600M: layers 1,2,3,4,1,1,1, dim 1280, FF 3840, unmasked 768 (SPEC)."""
    return ZipformerConfig(
        num_layers=(1, 2, 3, 4, 1, 1, 1),
        encoder_dims=(1280,) * NUM_STACKS,
        feedforward_dims=(3840,) * NUM_STACKS,
        unmasked_dims=(768,) * NUM_STACKS,
    )


ENCODER_PRESETS: dict[str, Callable[[], ZipformerConfig]] = {
    "tiny": zipformer_tiny,
    "base": zipformer_base,
    "large": zipformer_large,
    "xlarge": zipformer_xlarge,
}

PRESET_PARAMS: dict[str, float] = {"base": 93e6, "large": 327e6, "xlarge": 600e6}
"""Published encoder parameter counts the presets land within 5% of (the heads add
24 x 256 x dim: 3.1M for base, 6.3M for large, 7.9M for xlarge)."""


@dataclass(kw_only=True, frozen=True)
class MaskConfig:
    """Masking on the fbank before subsampling (wav2vec2-style spans)."""

    time_prob: float = 0.65
    """wav2vec2's mask_prob: spans started = time_prob * frames / time_span (rounded randomly).
    Overlapping spans make the covered fraction lower (~0.48 at 0.65, 10)."""
    time_span: int = 10
    """Frames per time span (100 ms at 100 Hz); masked frames become the learned embedding."""
    channel_prob: float = 0.25
    """Like ``time_prob`` over mel bins; masked bins are set to 0 on every frame."""
    channel_span: int = 20
    """Mel bins per channel span."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.time_prob <= 1.0 or not 0.0 <= self.channel_prob <= 1.0:
            raise ConfigError("time_prob and channel_prob must be in [0, 1]")
        if self.time_span < 1 or self.channel_span < 1:
            raise ConfigError("spans must be >= 1")


@dataclass(kw_only=True, frozen=True)
class HeadConfig:
    """One teacher's prediction head and loss weights."""

    name: str
    """Token column prefix (``wavlm``, ``dasheng``)."""
    num_codebooks: int
    codebook_size: int = 256
    frame_rate: float = 50.0
    """Teacher token rate in Hz; aligned to the student's 50 Hz (x2 repeat for 25 Hz)."""
    weight_speech: float = 1.0
    """Loss weight on speech items."""
    weight_audio: float = 1.0
    """Loss weight on audio items."""

    def __post_init__(self) -> None:
        if self.num_codebooks < 1 or self.codebook_size < 2 or self.frame_rate <= 0:
            raise ConfigError(f"head {self.name!r}: bad codebooks/size/rate")
        if self.weight_speech < 0 or self.weight_audio < 0:
            raise ConfigError(f"head {self.name!r}: weights must be >= 0")


def default_heads() -> tuple[HeadConfig, ...]:
    """The asymmetric dual-domain loss: 1.0 WavLM everywhere, 0.1 Dasheng on audio only."""
    return (
        HeadConfig(name="wavlm", num_codebooks=16, frame_rate=50.0),
        HeadConfig(
            name="dasheng", num_codebooks=8, frame_rate=25.0, weight_speech=0.0, weight_audio=0.1
        ),
    )


LOG_EPS = -23.025850929940457
"""log(1e-10): lhotse's (and SPEAR's) padding value for fbank frames past an utterance's end."""


@dataclass(kw_only=True, frozen=True)
class FrontendConfig:
    """The fbank the student reads, recorded in ``student.pt`` (a model only works on the
    features it was trained on). ``lhotse``: lhotse's ``Fbank`` (its defaults, as SPEAR and
    icefall use them), computed batched on the model's device by
    ``lhotse.features.kaldi.layers``. ``torchaudio``: ``torchaudio.compliance.kaldi.fbank`` with
    snip_edges, high_freq 0 and zero padding: what checkpoints before version 3 were trained
    on; they keep it."""

    implementation: Literal["lhotse", "torchaudio"] = "lhotse"
    num_mel_bins: int = 128
    snip_edges: bool = False
    """False: frames = round(samples / 160), the signal reflected at both ends (lhotse)."""
    low_freq: float = 20.0
    high_freq: float = -400.0
    """<= 0: an offset from the Nyquist frequency (-400: 7.6 kHz at 16 kHz)."""
    pad_value: float = LOG_EPS
    """Value of the padded frames of a batch."""

    def __post_init__(self) -> None:
        if self.num_mel_bins < 1:
            raise ConfigError(f"num_mel_bins must be >= 1, got {self.num_mel_bins}")
        legacy = (self.snip_edges, self.low_freq, self.high_freq, self.pad_value)
        if self.implementation == "torchaudio" and legacy != (True, 20.0, 0.0, 0.0):
            raise ConfigError("the torchaudio frontend exists for old checkpoints only, as is")


def legacy_frontend(num_mel_bins: int = 128) -> FrontendConfig:
    """The frontend of ``student.pt`` versions before 3."""
    return FrontendConfig(
        implementation="torchaudio",
        num_mel_bins=num_mel_bins,
        snip_edges=True,
        low_freq=20.0,
        high_freq=0.0,
        pad_value=0.0,
    )


@dataclass(kw_only=True, frozen=True)
class StudentConfig:
    """Everything that defines the student network (what a checkpoint must carry)."""

    preset: str = "base"
    """Encoder preset name (``tiny``, ``base``, ``large``, ``xlarge``), used when ``encoder``
    is not given."""
    encoder: ZipformerConfig | None = None
    """Explicit encoder settings; overrides ``preset``."""
    heads: tuple[HeadConfig, ...] = field(default_factory=default_heads)
    """One head per teacher."""
    frontend: FrontendConfig = field(default_factory=FrontendConfig)
    """The fbank the encoder reads (its ``num_features`` must equal ``num_mel_bins``)."""

    def __post_init__(self) -> None:
        if self.encoder is None and self.preset not in ENCODER_PRESETS:
            raise ConfigError(
                f"preset must be one of {sorted(ENCODER_PRESETS)}, got {self.preset!r}"
            )
        if self.encoder_config().num_features != self.frontend.num_mel_bins:
            raise ConfigError(
                f"the encoder takes {self.encoder_config().num_features} features, the frontend "
                f"gives {self.frontend.num_mel_bins} bins"
            )
        names = [h.name for h in self.heads]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"heads need distinct names, got {names}")

    def encoder_config(self) -> ZipformerConfig:
        return self.encoder if self.encoder is not None else ENCODER_PRESETS[self.preset]()


@dataclass(kw_only=True, frozen=True)
class MixConfig:
    """Overlaying another batch item or a noise clip for robustness (SPEC section 4)."""

    inbatch_prob: float = 0.1
    """Fraction of items that get another item of their batch overlaid (our choice)."""
    noise_prob: float = 0.1
    """Fraction of items that get a noise clip overlaid (needs noise clips)."""
    inbatch_snr: tuple[float, float] = (-5.0, 5.0)
    """SNR range in dB (primary over mixed-in power) for speech-on-speech mixing."""
    noise_snr: tuple[float, float] = (5.0, 20.0)
    """SNR range in dB for noise mixing."""
    overlap: tuple[float, float] = (0.2, 0.5)
    """Fraction of the primary's length the mixed-in signal covers."""
    token_mixing: bool = False
    """In-batch mixing only: inside the overlap replace each target token by the mixed-in
    item's with probability r/(1+r), r = 10^(-SNR/10). Off: targets stay the clean primary's."""

    def __post_init__(self) -> None:
        for name in ("inbatch_prob", "noise_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1]")
        if self.inbatch_prob + self.noise_prob > 1.0:
            raise ConfigError("inbatch_prob + noise_prob must be <= 1")
        for name in ("inbatch_snr", "noise_snr", "overlap"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ConfigError(f"{name}: low {lo} > high {hi}")
        if not 0.0 < self.overlap[0] <= self.overlap[1] <= 1.0:
            raise ConfigError(f"overlap must lie in (0, 1], got {self.overlap}")


@dataclass(kw_only=True, frozen=True)
class OptimConfig:
    """Optimiser and learning-rate schedule."""

    name: Literal["scaled_adam", "adamw"] = "scaled_adam"
    """``scaled_adam`` (the paper's, with Eden) or ``adamw`` (with the same Eden shape)."""
    lr: float = 0.045
    """Base learning rate (0.045 for ScaledAdam; ~1e-3 is typical for AdamW)."""
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    """AdamW only (ScaledAdam bounds parameter RMS instead)."""
    clipping_scale: float = 2.0
    """ScaledAdam: clip the gradient norm at this multiple of the median of recent norms."""
    grad_clip: float = 1.0
    """AdamW: max gradient norm (0: off). ScaledAdam clips by itself (``clipping_scale``)."""
    lr_batches: float = 7500.0
    """Eden: steps at which the step factor has fallen to 2^-0.25."""
    lr_hours: float = 75_000.0
    """Eden: audio hours at which the data factor has fallen to 2^-0.25 (the paper's epochs
    counted in hours)."""
    warmup_batches: float = 500.0
    """Eden: linear warm-up from half the rate over this many steps."""

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.lr_batches <= 0 or self.lr_hours <= 0:
            raise ConfigError("lr, lr_batches and lr_hours must be positive")
        if self.warmup_batches < 0 or self.grad_clip < 0 or self.clipping_scale <= 0:
            raise ConfigError("warmup_batches, grad_clip must be >= 0; clipping_scale > 0")


@dataclass(kw_only=True, frozen=True)
class TrainDataConfig:
    """How token shards become training batches."""

    min_seconds: float = 0.9
    """Items shorter than this are skipped (SPEC: 0.9-32 s)."""
    max_seconds: float = 32.0
    """Items longer than this are skipped."""
    batch_seconds: float = 300.0
    """Audio seconds per batch per worker (the paper: ~300-400 s per GPU)."""
    num_buckets: int = 10
    """Duration buckets (log-spaced between min and max seconds)."""
    prep_rows: int = 16
    """Items per data-preparation task (a batch is split into tasks of this many; also the
    pool in-batch mixing draws partners from)."""
    prep_cpus: float = 1.0
    """CPUs per data-preparation task."""
    prefetch_batches: int = 4
    """Batches each training worker keeps in preparation ahead of the one it trains on."""
    shuffle_buffer: int = 4096
    """Items in the shuffle buffer: each epoch reads the shards in a new order (seed, epoch)
    and draws items at random from a buffer of this many, so a long file's segments spread
    out. The order is a function of (seed, epoch): a resumed run recomputes it."""
    source_weights: dict[str, float] = field(default_factory=dict)
    """Sampling weight per manifest source (the shards' ``source`` column; 1 where not
    given): an item of weight w appears floor(w) times an epoch plus once more with
    probability frac(w) (0 drops the source). SPEAR up-weights audio sets 1.7-3x."""
    domain_weights: dict[str, float] = field(default_factory=dict)
    """The same per domain (``speech``, ``audio``); multiplies the source weight."""
    val_shards: int = 0
    """Shards (the last ones of the run's index) held out for the validation loss; 0: none."""
    val_batches: int = 20
    """At most this many batches of the held-out shards per validation (the same each time)."""
    noise_urls: tuple[str, ...] = ()
    """Audio files to use as noise clips (decoded whole, once per worker process)."""

    def __post_init__(self) -> None:
        if not 0 < self.min_seconds < self.max_seconds:
            raise ConfigError("need 0 < min_seconds < max_seconds")
        if self.batch_seconds < self.max_seconds:
            raise ConfigError("batch_seconds must be >= max_seconds (a batch holds any item)")
        if self.num_buckets < 1 or self.prep_rows < 1 or self.prep_cpus <= 0:
            raise ConfigError("num_buckets, prep_rows must be >= 1 and prep_cpus > 0")
        if min(self.prefetch_batches, self.shuffle_buffer, self.val_batches) < 1:
            raise ConfigError("prefetch_batches, shuffle_buffer and val_batches must be >= 1")
        if self.val_shards < 0:
            raise ConfigError(f"val_shards must be >= 0, got {self.val_shards}")
        for name in ("source_weights", "domain_weights"):
            bad = {k: v for k, v in getattr(self, name).items() if not 0 <= v < float("inf")}
            if bad:
                raise ConfigError(f"{name} must be finite and >= 0, got {bad}")


Precision = Literal["auto", "bf16", "fp16", "fp32"]


@dataclass(kw_only=True, frozen=True)
class TrainConfig:
    """Everything ``spear train`` is configured with (the ``train`` config section)."""

    student: StudentConfig = field(default_factory=StudentConfig)
    """The network: encoder preset and one head per teacher with its loss weights."""
    mask: MaskConfig = field(default_factory=MaskConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    max_steps: int = 500_000
    """Stop after this many optimiser steps (epochs repeat the data until then)."""
    num_workers: int = 1
    """Training workers (one per GPU)."""
    use_gpu: bool | None = None
    """Train on GPUs; default: when the cluster has any."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per training worker (data preparation uses the rest)."""
    precision: Precision = "auto"
    """``auto``: bf16 autocast on GPU, fp32 on CPU; ``fp16`` adds a gradient scaler."""
    checkpoint_every: int = 2000
    """Steps between checkpoints (and one at the end)."""
    keep_checkpoints: int = 3
    """Checkpoints kept in storage (oldest deleted)."""
    log_every: int = 50
    """Steps between log lines / reported metrics."""
    accum_steps: int = 1
    """Batches whose gradients accumulate into one optimiser step (the effective batch is
    ``accum_steps x data.batch_seconds`` per worker); Eden and the schedules count optimiser
    steps and audio hours as usual."""
    val_every: int = 500
    """Steps between validation losses on ``data.val_shards`` (and one at the end)."""
    average_period: int = 200
    """Steps between updates of the running model average (icefall's ``--average-period``;
    rank 0, saved with every checkpoint, ``OUT/student-avg.pt`` at the end)."""
    tensorboard: bool = True
    """TensorBoard event files under ``OUT/tensorboard/`` (rank 0, every logged step)."""
    max_failures: int = 3
    """Worker failures retried from the latest checkpoint before the run fails."""
    probe_every: int = 0
    """Steps between linear probes of the student's layers on ``probe_labels`` (rank 0, see
    :mod:`spear.probe`); 0: no probes."""
    probe_labels: str | None = None
    """A labelled set as ``spear probe --labels`` takes (CSV or Parquet with ``url`` and the
    label column); keep it small: it is decoded once and pooled at every probe."""
    probe_label_column: str = "label"
    probe_steps: int = 300
    """Optimiser steps per probe (the fixed budget)."""
    probe_teacher: str | None = None
    """A teacher of the registry (e.g. ``wavlm-large``) probed once at the start: the
    report's reference line."""
    init_from: str | None = None
    """A ``student.pt`` (or training checkpoint folder) or a SPEAR release folder whose encoder
    starts the run (continued pre-training; the heads are new). Ignored when the run resumes
    from its own checkpoints."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.num_workers < 1 or self.cpus_per_worker <= 0:
            raise ConfigError("max_steps, num_workers must be >= 1 and cpus_per_worker > 0")
        if self.checkpoint_every < 1 or self.log_every < 1 or self.keep_checkpoints < 1:
            raise ConfigError("checkpoint_every, log_every and keep_checkpoints must be >= 1")
        if self.average_period < 1:
            raise ConfigError(f"average_period must be >= 1, got {self.average_period}")
        if self.max_failures < 0:
            raise ConfigError("max_failures must be >= 0")
        if self.accum_steps < 1 or self.val_every < 1:
            raise ConfigError("accum_steps and val_every must be >= 1")
        if self.probe_every < 0 or self.probe_steps < 1:
            raise ConfigError("probe_every must be >= 0 and probe_steps >= 1")
        if self.probe_every and not self.probe_labels:
            raise ConfigError("probe_every > 0 needs probe_labels (a labelled CSV or Parquet)")
