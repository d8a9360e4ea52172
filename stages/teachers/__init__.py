"""Teachers: audio batch -> float16 frame embeddings of one teacher (WavLM or Dasheng).

The package, one file per concern:

* ``__init__`` (this module) - the registry and the stage:

  * :data:`TEACHERS` - plain-dict registry of :class:`TeacherSpec` by name (``wavlm``,
    ``dasheng``, ``dasheng-base``, ``dasheng-0.6b`` and the tiny presets ``wavlm-tiny``,
    ``dasheng-tiny``).
  * :class:`TeacherConfig` - which teacher, which checkpoint, how to run it.
  * :func:`checkpoint_sha256` - the driver's check of a teacher's weights before any actor
    starts: a checkpoint is fetched and read against the preset (keys and shapes, one line on
    error); no checkpoint is refused unless ``allow_random`` (``--random-teachers``), and a
    random-weights run says so once. :func:`check_quantizer_weights` refuses a quantiser trained
    on other weights than the teacher runs.
  * :func:`load_teacher` - weights once (random init when no checkpoint is named).
  * :func:`run_teacher` / :func:`embed_batch` - the pure functions: waveforms (an audio batch
    dict) in, embeddings out; no Ray.
  * :class:`TeacherStage` - the actor stage (``__init__`` loads, ``__call__`` embeds); the jobs
    in ``pipeline/`` run it on their units.

* :mod:`~spear.stages.teachers.wavlm`, :mod:`~spear.stages.teachers.dasheng` - the
  architectures (this project's own, batch-safe; parity-tested against the references).
* :mod:`~spear.stages.teachers.weights` - the checkpoint layouts of each source read into them,
  and the one strict loader (fetching is :mod:`spear.checkpoints`).

Batch in (``spear.formats`` audio batch): ``item_id``, ``num_samples`` (int64), ``audio`` (binary,
int16 LE mono 16 kHz) plus any other columns, which pass through. Batch out: the same rows with
``{prefix}num_frames`` (int32) and ``{prefix}embeddings`` (binary, float16 LE ``(num_frames, dim)``
C-order, as in ``EMBEDDING_SHARD_SCHEMA``); ``audio`` is dropped unless ``keep_audio``.

This module imports no torch at import time (the architectures and weights are imported when a
model is built), so the CLI can list teachers quickly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from spear.errors import ConfigError, SpearError
from spear.formats import AUDIO_DTYPE, SAMPLE_RATE
from spear.shards.schema import dasheng_num_frames, wavlm_num_frames
from spear.storage import StorageConfig

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherSpec:
    """What a teacher is: its numbers, frame formula, and how to build / load it."""

    name: str
    family: Literal["wavlm", "dasheng"]
    sample_rate: int
    """Input sample rate (Hz)."""
    frame_rate: float
    """Output frames per second."""
    dim: int
    """Embedding dimension."""
    layer: int
    """Default layer: WavLM transformer layer (1-based); Dasheng depth (final, after LayerNorm)."""
    num_frames: Callable[[int], int]
    """Output frames for a number of input samples."""
    arch: Callable[[], Any]
    """Architecture preset (``WavLMArch`` / ``DashengArch``); imports torch lazily."""
    hub_id: str | None = None
    """Where the released weights live on the Hugging Face hub (used only when named)."""
    gflops_per_second: float | None = None
    """Model FLOPs per second of audio (SPEC section 6), for MFU."""
    max_layer: int = 0
    """Deepest selectable layer (WavLM)."""

    def build(self, layer: int | None = None) -> torch.nn.Module:
        """Random-initialised model (tests, demo, benchmarks)."""
        return _build(self, self.arch(), layer or self.layer, None)

    def load(
        self, checkpoint: Any, layer: int | None = None, *, meta: bool = False
    ) -> tuple[torch.nn.Module, str]:
        """Model from a :class:`spear.checkpoints.LocalCheckpoint`; returns (model, layout).

        ``meta``: build the model on PyTorch's meta device, so every key and shape of the
        checkpoint is checked against the architecture without holding the model's weights
        (the driver's check before any actor starts)."""
        from spear.stages.teachers.weights import read_dasheng_checkpoint, read_wavlm_checkpoint

        arch: Any
        if self.family == "wavlm":
            arch, state, layout = read_wavlm_checkpoint(checkpoint.path, self.arch())
        else:
            arch, state, layout = read_dasheng_checkpoint(checkpoint.path, self.arch())
        dim = getattr(arch, "dim", None) or getattr(arch, "embed_dim", None)
        if dim != self.dim:
            raise ConfigError(
                f"the checkpoint holds a {dim}-d model, teacher {self.name!r} is {self.dim}-d; "
                f"choose the matching teacher ({', '.join(TEACHERS)})"
            )
        for n in (0, 399, 400, 640, 16_000, 160_321, 481_000):
            if arch.num_frames(n) != self.num_frames(n):
                raise ConfigError(
                    f"the checkpoint's frame layout differs from teacher {self.name!r}"
                )
        if not meta:
            return _build(self, arch, layer or self.layer, state), layout
        import warnings

        import torch

        with torch.device("meta"), warnings.catch_warnings():
            # Copying a weight into a meta parameter is a no-op (torch warns): only the keys
            # and shapes are checked, which is the point.
            warnings.simplefilter("ignore", UserWarning)
            return _build(self, arch, layer or self.layer, state), layout


def _build(spec: TeacherSpec, arch: Any, layer: int, state: Any) -> torch.nn.Module:
    """The model of ``arch`` up to ``layer``: random init when ``state`` is None, else the
    checkpoint's weights through the one strict loader."""
    from spear.stages.teachers.weights import hf_to_ours, load_strict

    model: torch.nn.Module
    if spec.family == "wavlm":
        from spear.stages.teachers.wavlm import build_wavlm

        if not 1 <= layer <= arch.num_layers:
            raise ConfigError(f"teacher {spec.name}: layer {layer} is outside 1..{arch.num_layers}")
        model = build_wavlm(arch, layer)
        if state is not None:
            load_strict(model, hf_to_ours(state, arch, layer), "WavLM")
        return model
    from spear.stages.teachers.dasheng import build_dasheng

    if layer != arch.depth:
        raise ConfigError(f"teacher {spec.name}: only the final layer ({arch.depth}) is supported")
    model = build_dasheng(arch)
    if state is not None:
        load_strict(model, state, "Dasheng")
    return model


def _wavlm_large() -> Any:
    from spear.stages.teachers.wavlm import wavlm_large

    return wavlm_large()


def _wavlm_tiny() -> Any:
    from spear.stages.teachers.wavlm import wavlm_tiny

    return wavlm_tiny()


def _dasheng(preset: str) -> Callable[[], Any]:
    def make() -> Any:
        from spear.stages.teachers import dasheng

        return getattr(dasheng, preset)()

    return make


TEACHERS: dict[str, TeacherSpec] = {}


def register(spec: TeacherSpec) -> TeacherSpec:
    TEACHERS[spec.name] = spec
    return spec


register(
    TeacherSpec(
        name="wavlm",
        family="wavlm",
        sample_rate=SAMPLE_RATE,
        frame_rate=50.0,
        dim=1024,
        layer=21,
        max_layer=24,
        num_frames=wavlm_num_frames,
        arch=_wavlm_large,
        hub_id="microsoft/wavlm-large",
        gflops_per_second=36.5,
    )
)
register(
    TeacherSpec(
        name="wavlm-tiny",
        family="wavlm",
        sample_rate=SAMPLE_RATE,
        frame_rate=50.0,
        dim=64,
        layer=2,
        max_layer=3,
        num_frames=wavlm_num_frames,
        arch=_wavlm_tiny,
    )
)
for _name, _preset, _dim, _depth, _hub, _gf in (
    ("dasheng", "dasheng_12b", 1536, 40, "mispeech/dasheng-1.2B", 58.0),
    ("dasheng-0.6b", "dasheng_06b", 1280, 32, "mispeech/dasheng-0.6B", None),
    ("dasheng-base", "dasheng_base", 768, 12, "mispeech/dasheng-base", None),
    ("dasheng-tiny", "dasheng_tiny", 64, 2, None, None),
):
    register(
        TeacherSpec(
            name=_name,
            family="dasheng",
            sample_rate=SAMPLE_RATE,
            frame_rate=25.0,
            dim=_dim,
            layer=_depth,
            max_layer=_depth,
            num_frames=dasheng_num_frames,
            arch=_dasheng(_preset),
            hub_id=_hub,
            gflops_per_second=_gf,
        )
    )


@dataclass(kw_only=True, frozen=True)
class TeacherConfig:
    """How one teacher runs."""

    name: str = "wavlm"
    """Registry name: ``wavlm``, ``dasheng`` (1.2B), ``dasheng-0.6b``, ``dasheng-base``,
    ``wavlm-tiny``, ``dasheng-tiny``."""
    checkpoint: str | None = None
    """Weights: a local path or any fsspec URL (transformers folder, unilm ``WavLM-Large.pt``,
    torchaudio state dict, dasheng ``.pt``), or a hub id such as ``microsoft/wavlm-large`` (the
    only case that touches the network hub). None: random init (tests, demo, benchmarks)."""
    layer: int | None = None
    """WavLM transformer layer to output (1-based); default the registry's (21). Layers above it
    are never built. Dasheng always outputs its final layer."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Autocast dtype on CUDA (the front ends and normalisation stay float32). CPU runs float32."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """``auto``: CUDA when the actor sees a GPU."""
    compile: bool = False
    """``torch.compile`` the model (dynamic shapes); pays off on long runs."""
    batch_seconds: float = 300.0
    """Padded audio seconds per forward pass inside an actor (items sorted by length first)."""
    num_gpus: float = 1.0
    """GPU share per actor; fractional values put several actors on one GPU (ignored without
    GPUs)."""
    num_actors: int = 1
    """Actor pool size (the pool never grows beyond this)."""
    num_cpus: float | None = None
    """CPU share per actor (Ray's scheduling). None: 1 beside a GPU; on a CPU-only cluster
    what the cluster has beside one commit task, split over the job's actors (at most 1)."""
    cache_dir: str | None = None
    """Node-local checkpoint cache (default ``~/.cache/spear/checkpoints``)."""
    seed: int = 0
    """Seed of the random init when ``checkpoint`` is None."""
    allow_random: bool = False
    """Allow running with random weights when ``checkpoint`` is None (tests, the demo,
    benchmarks; ``--random-teachers`` sets it for both teachers). Without it a job refuses a
    teacher that has no checkpoint: random-weight embeddings and tokens look like data but
    carry nothing learned."""
    cpu_threads: int = 0
    """torch threads of an actor running on CPU; 0 keeps Ray's default (one per CPU the actor
    holds). More than its share helps when one teacher is the bottleneck on a small CPU-only
    cluster and the other's actor idles."""

    def __post_init__(self) -> None:
        if self.name not in TEACHERS:
            raise ConfigError(f"unknown teacher {self.name!r}; choose from {', '.join(TEACHERS)}")
        spec = TEACHERS[self.name]
        if self.layer is not None and not 1 <= self.layer <= spec.max_layer:
            raise ConfigError(
                f"teacher {self.name}: layer {self.layer} is outside 1..{spec.max_layer}"
            )
        if spec.family == "dasheng" and self.layer not in (None, spec.layer):
            raise ConfigError(
                f"teacher {self.name}: only the final layer ({spec.layer}) is available"
            )
        if self.batch_seconds <= 0 or self.num_actors < 1 or (self.num_cpus or 0) < 0:
            raise ConfigError("teacher batch_seconds, num_actors and num_cpus must be positive")
        if self.num_gpus < 0:
            raise ConfigError("teacher num_gpus must be >= 0")
        if self.cpu_threads < 0:
            raise ConfigError("teacher cpu_threads must be >= 0")

    @property
    def spec(self) -> TeacherSpec:
        return TEACHERS[self.name]


@dataclass(kw_only=True, frozen=True)
class DashengTeacherConfig(TeacherConfig):
    """:class:`TeacherConfig` whose default is the audio teacher (so a YAML section may omit it)."""

    name: str = "dasheng"
    """Registry name of a Dasheng teacher: ``dasheng``, ``dasheng-0.6b``, ``dasheng-base``,
    ``dasheng-tiny``."""


@dataclass(kw_only=True, frozen=True)
class TeachersConfig:
    """The two teachers SPEAR distils."""

    wavlm: TeacherConfig = field(default_factory=TeacherConfig)
    """Speech teacher (WavLM Large, layer 21)."""
    dasheng: DashengTeacherConfig = field(default_factory=DashengTeacherConfig)
    """Audio teacher (Dasheng 1.2B, final layer)."""

    def __post_init__(self) -> None:
        if self.wavlm.spec.family != "wavlm":
            raise ConfigError(f"teachers.wavlm: {self.wavlm.name!r} is not a WavLM teacher")
        if self.dasheng.spec.family != "dasheng":
            raise ConfigError(f"teachers.dasheng: {self.dasheng.name!r} is not a Dasheng teacher")


@dataclass
class LoadedTeacher:
    """A teacher with weights on its device, ready for :func:`embed_batch`."""

    spec: TeacherSpec
    config: TeacherConfig
    model: Any
    """The ``torch.nn.Module`` (possibly compiled)."""
    device: Any
    """``torch.device``."""
    autocast_dtype: Any
    """``torch.dtype`` for CUDA autocast, or None (CPU / float32)."""
    layer: int
    checkpoint_sha256: str | None
    """sha256 of the weights (None for random init): record it with the outputs."""
    layout: str
    """Checkpoint layout read (``random``, ``transformers``, ``unilm``, ``torchaudio``, ``dasheng``,
    ``hub``)."""


def load_teacher(cfg: TeacherConfig, storage: StorageConfig | None = None) -> LoadedTeacher:
    """Build the model and load its weights once (fetching the checkpoint to this node)."""
    import torch

    from spear.checkpoints import fetch

    spec = cfg.spec
    layer = cfg.layer or spec.layer
    sha: str | None = None
    model: Any
    if cfg.checkpoint is None:
        torch.manual_seed(cfg.seed)
        model, layout = spec.build(layer), "random"
    else:
        ckpt = fetch(cfg.checkpoint, storage or StorageConfig(), cfg.cache_dir)
        model, layout = spec.load(ckpt, layer)
        sha = ckpt.sha256
        log.info("teacher %s: %s checkpoint %s sha256 %s", spec.name, layout, ckpt.source, sha)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SpearError(f"teacher {spec.name}: device 'cuda' asked for, but no GPU is visible")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    model = model.to(device).eval()
    if device.type == "cpu" and cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    for p in model.parameters():
        p.requires_grad_(False)
    autocast = None
    if use_cuda and cfg.dtype != "float32":
        autocast = getattr(torch, cfg.dtype)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.compile:
        model = torch.compile(model, dynamic=True)
    return LoadedTeacher(
        spec=spec,
        config=cfg,
        model=model,
        device=device,
        autocast_dtype=autocast,
        layer=layer,
        checkpoint_sha256=sha,
        layout=layout,
    )


def checkpoint_sha256(cfg: TeacherConfig, storage: StorageConfig) -> str | None:
    """The driver's check of a teacher's weights, before any actor starts; returns their sha256
    (None: random weights). The job records it in its plan (other weights at the same URL are
    refused on resume) and in its outputs' metadata.

    * No checkpoint: a :class:`ConfigError` unless ``allow_random``; with it, one warning says
      the run uses random weights.
    * A checkpoint: fetched (once per node) and read against the teacher's preset on the meta
      device (every key and shape, no weights held), so a wrong file is one line here rather
      than a failure inside each actor."""
    from spear.checkpoints import fetch

    spec = cfg.spec
    if cfg.checkpoint is None:
        if not cfg.allow_random:
            raise ConfigError(
                f"teacher {spec.name} has no checkpoint and would run with random weights: give "
                f"its weights (teachers.{spec.family}.checkpoint, --{spec.family}-checkpoint, or "
                f"embed --checkpoint), or pass --random-teachers (teachers.{spec.family}."
                "allow_random=true) for a test run"
            )
        log.warning(
            "teacher %s runs with RANDOM weights (no checkpoint, allow_random): its embeddings "
            "and tokens carry nothing learned; outputs record checkpoint_sha256 null",
            spec.name,
        )
        return None
    ckpt = fetch(cfg.checkpoint, storage, cfg.cache_dir)
    try:
        _, layout = spec.load(ckpt, cfg.layer or spec.layer, meta=True)
    except SpearError as err:
        if ckpt.source in str(err) or str(ckpt.path) in str(err):
            raise
        raise type(err)(f"teacher {spec.name}, checkpoint {ckpt.source!r}: {err}") from None
    log.debug(
        "teacher %s: %s checkpoint %s, sha256 %s", spec.name, layout, ckpt.source, ckpt.sha256
    )
    return str(ckpt.sha256)


def weights_label(sha: str | None) -> str:
    """How outputs name a teacher's weights: the checkpoint's sha256, or ``random``."""
    return sha or "random"


def check_quantizer_weights(what: str, info: Any, cfg: TeacherConfig, sha: str | None) -> None:
    """Refuse (one line) a quantiser whose training embeddings came from other weights than
    ``cfg`` runs with (``sha``: :func:`checkpoint_sha256`); ``info`` is its
    :class:`spear.quantizer.mvq.QuantizerInfo`, ``what`` names it in the message. A quantiser
    that does not record its weights (written before format 3, or trained on embeddings that do
    not say) gets a warning: it cannot be checked."""
    trained = str(getattr(info, "teacher_weights", "") or "")
    if not trained:
        log.warning(
            "%s does not record the teacher weights it was trained on (a quantiser from before "
            "format 3, or trained on embeddings that do not say); it cannot be checked against "
            "teacher %s's %s",
            what,
            cfg.spec.name,
            "random weights" if sha is None else f"checkpoint sha256 {sha}",
        )
        return
    if trained != weights_label(sha):

        def say(w: str) -> str:
            return "random weights" if w == "random" else f"checkpoint sha256 {w[:16]}"

        raise ConfigError(
            f"{what} was trained on embeddings of {info.teacher or 'its teacher'} with "
            f"{say(trained)}, but teacher {cfg.spec.name} runs with {say(weights_label(sha))}: "
            "use the quantiser trained on this teacher's embeddings, or the weights it was "
            "trained on"
        )


def _plan(lengths: list[int], budget: int) -> list[list[int]]:
    """Group item indexes, sorted by length, so each group's padded samples fit ``budget``."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Sorted ascending: the newest item is the longest, so padded size = count * its length.
        if current and (len(current) + 1) * lengths[i] > budget:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


def run_teacher(teacher: LoadedTeacher, waves: list[np.ndarray]) -> list[np.ndarray]:
    """Embeddings of int16 (or float) waveforms: one float32 ``(num_frames, dim)`` per item."""
    import torch

    spec = teacher.spec
    lengths = [len(w) for w in waves]
    frames = [spec.num_frames(n) for n in lengths]
    out: list[np.ndarray] = [np.zeros((f, spec.dim), np.float32) for f in frames]
    runnable = [i for i, f in enumerate(frames) if f > 0]  # too short for one frame: empty output
    budget = int(teacher.config.batch_seconds * spec.sample_rate)
    dev = teacher.device
    for group_pos in _plan([lengths[i] for i in runnable], budget):
        group = [runnable[j] for j in group_pos]
        longest = max(lengths[i] for i in group)
        wave = torch.zeros(len(group), longest, dtype=torch.float32)
        for row, i in enumerate(group):
            w = waves[i]
            scale = 1.0 / 32768.0 if w.dtype == AUDIO_DTYPE else 1.0
            wave[row, : lengths[i]] = torch.from_numpy(np.asarray(w, dtype=np.float32) * scale)
        lens = torch.tensor([lengths[i] for i in group], dtype=torch.long)
        wave, lens = wave.to(dev, non_blocking=True), lens.to(dev)
        with torch.inference_mode():
            if spec.family == "wavlm":
                from spear.stages.teachers.wavlm import normalize_waveform

                wave = normalize_waveform(wave, lens)
            with torch.autocast(
                dev.type,
                dtype=teacher.autocast_dtype or torch.float32,
                enabled=teacher.autocast_dtype is not None,
            ):
                hidden, got = teacher.model(wave, lens)  # (B, T, D), (B,)
            hidden = hidden.float().cpu().numpy()
            got = got.cpu().numpy()
        for row, i in enumerate(group):
            if int(got[row]) != frames[i]:  # the formula is the contract; a mismatch is a bug
                raise RuntimeError(f"{spec.name}: {got[row]} frames, formula says {frames[i]}")
            out[i] = hidden[row, : frames[i]]
    return out


def embed_batch(
    teacher: LoadedTeacher,
    batch: dict[str, Any],
    *,
    prefix: str = "",
    keep_audio: bool = False,
) -> dict[str, Any]:
    """The pure stage function: audio batch in, embeddings out (see the module docstring)."""
    for col in ("audio", "num_samples"):
        if col not in batch:
            raise SpearError(f"teacher stage: the batch has no {col!r} column")
    waves = [np.frombuffer(b, dtype=AUDIO_DTYPE) for b in batch["audio"]]
    for w, n in zip(waves, batch["num_samples"], strict=True):
        if len(w) != int(n):
            raise SpearError(f"teacher stage: audio holds {len(w)} samples, num_samples says {n}")
    embs = run_teacher(teacher, waves)
    out = {k: v for k, v in batch.items() if keep_audio or k != "audio"}
    out[f"{prefix}num_frames"] = np.array([len(e) for e in embs], dtype=np.int32)
    out[f"{prefix}embeddings"] = np.array(
        [np.ascontiguousarray(e, dtype="<f2").tobytes() for e in embs], dtype=object
    )
    return out


class TeacherStage:
    """Ray Data actor: loads the teacher once, then embeds each batch (see :func:`embed_batch`)."""

    def __init__(
        self,
        cfg: TeacherConfig,
        storage: StorageConfig | None = None,
        *,
        prefix: str = "",
        keep_audio: bool = False,
    ):
        self.teacher = load_teacher(cfg, storage)
        self.prefix, self.keep_audio = prefix, keep_audio

    @property
    def checkpoint_sha256(self) -> str | None:
        return self.teacher.checkpoint_sha256

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return embed_batch(self.teacher, batch, prefix=self.prefix, keep_audio=self.keep_audio)
