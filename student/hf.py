"""SPEAR's released transformers folders in and out: ``marcoyang/spear-*`` <-> spear students.

The SPEAR authors publish their encoders as transformers folders (``config.json`` with the
per-stack settings as comma strings, ``model.safetensors`` with every weight under
``model.model.``, and modeling code loaded with ``trust_remote_code=True``). spear's student is
the same network up to names, so:

* :func:`import_spear` - a SPEAR folder (local path, any fsspec URL, or a hub id when
  ``huggingface_hub`` is installed) -> a :class:`~spear.student.model.Student` with fresh heads;
* :func:`export_spear` - a student -> ``config.json`` + ``model.safetensors`` in SPEAR's layout.

The mapping (icefall -> spear), applied in order (docs/student.md, "Ecosystem"):
renames of ~20 module names; the per-layer ``bypass_scale`` icefall creates but never uses is
dropped (export writes icefall's initial 0.5 back); ``attn_weights.linear_pos.weight`` has its
input columns permuted, because icefall interleaves cos/sin in its relative position embedding
where spear concatenates them. Variants spear's student cannot hold (causal / chunked models,
25 Hz output downsampling, other head sizes) are refused in one line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from spear.checkpoints import (
    CheckpointError,
    check_state,
    fetch_checkpoint,
    fetch_hub,
    is_hub_id,
    weights_in_dir,
)
from spear.errors import SpearError
from spear.storage import StorageConfig, join, write_atomic
from spear.student.config import HeadConfig, StudentConfig, ZipformerConfig, default_heads

if TYPE_CHECKING:
    from spear.student.model import Student

PREFIX = "model.model."
"""Where SPEAR's folders keep the encoder's weights (transformers wrapper -> SpearModel ->
SpearEncoder)."""
SPEAR_HEAD_DIMS = {"query_head_dim": 32, "value_head_dim": 12, "pos_head_dim": 4}
"""Fixed in SPEAR's modeling code (not in its config.json)."""
SPEAR_EMBED_CHANNELS = (8, 32, 128)
"""icefall's Conv2dSubsampling channels, which SPEAR's modeling code always builds."""
_PER_STACK = {
    "downsampling_factor": "downsampling",
    "num_encoder_layers": "num_layers",
    "encoder_dim": "encoder_dims",
    "feedforward_dim": "feedforward_dims",
    "encoder_unmasked_dim": "unmasked_dims",
    "num_heads": "num_heads",
    "cnn_module_kernel": "cnn_kernels",
}
"""SPEAR config.json key -> ZipformerConfig field."""


class SpearFormatError(SpearError):
    """A folder is not a SPEAR release spear can read, or a student cannot be written as one."""


# (icefall, spear) substitutions, applied in this order on import and reversed on export.
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^mask_emb$", "mask_embedding"),
    (r"^encoder_embed\.conv\.0\.", "encoder.embed.conv1."),
    (r"^encoder_embed\.conv\.4\.", "encoder.embed.conv2."),
    (r"^encoder_embed\.conv\.7\.", "encoder.embed.conv3."),
    (r"\.convnext\.depthwise_conv\.", ".convnext.depthwise."),
    (r"\.convnext\.pointwise_conv1\.", ".convnext.pointwise1."),
    (r"\.convnext\.pointwise_conv2\.", ".convnext.pointwise2."),
    (r"^encoder_embed\.", "encoder.embed."),
    (r"^encoder\.encoders\.(\d+)\.encoder\.layers\.", r"encoder.stacks.\1.layers."),
    (r"^encoder\.encoders\.(\d+)\.layers\.", r"encoder.stacks.\1.layers."),
    (r"^encoder\.encoders\.(\d+)\.downsample\.bias$", r"encoder.stacks.\1.downsample_bias"),
    (
        r"^encoder\.encoders\.(\d+)\.out_combiner\.bypass_scale$",
        r"encoder.stacks.\1.out_combiner.scale",
    ),
    (r"\.self_attn_weights\.", ".attn_weights."),
    (r"\.self_attn([12])\.", r".attn\1."),
    (r"\.feed_forward([123])\.", r".ff\1."),
    (r"\.nonlin_attention\.", ".nonlin_attn."),
    (r"\.conv_module([12])\.depthwise_conv\.", r".conv\1.depthwise."),
    (r"\.conv_module([12])\.", r".conv\1."),
    (r"\.(bypass|bypass_mid)\.bypass_scale$", r".\1.scale"),
)
_UNUSED = re.compile(r"^encoder\.encoders\.\d+\.(encoder\.)?layers\.\d+\.bypass_scale$")
"""icefall's per-layer scale (``Zipformer2EncoderLayer.bypass_scale``, "TODO: remove it")."""
_LINEAR_POS = re.compile(r"\.attn_weights\.linear_pos\.weight$")


def spear_name(icefall_name: str) -> str:
    """An encoder weight's name in spear's student (without SPEAR's ``model.model.``)."""
    name = icefall_name
    for pattern, repl in _RENAMES:
        name = re.sub(pattern, repl, name)
    return name


def icefall_name(spear: str, downsampling: tuple[int, ...]) -> str:
    """The inverse of :func:`spear_name` for an encoder of these stack rates."""
    name = spear
    m = re.match(r"^encoder\.stacks\.(\d+)\.", name)
    if m:
        n = int(m.group(1))
        inner = "encoder.layers." if downsampling[n] > 1 else "layers."
        rest = name[m.end() :]
        if rest == "downsample_bias":
            name = f"encoder.encoders.{n}.downsample.bias"
        elif rest == "out_combiner.scale":
            name = f"encoder.encoders.{n}.out_combiner.bypass_scale"
        else:
            name = f"encoder.encoders.{n}.{inner}" + rest.removeprefix("layers.")
    inverse = (
        (r"^mask_embedding$", "mask_emb"),
        (r"^encoder\.embed\.conv1\.", "encoder_embed.conv.0."),
        (r"^encoder\.embed\.conv2\.", "encoder_embed.conv.4."),
        (r"^encoder\.embed\.conv3\.", "encoder_embed.conv.7."),
        (r"\.convnext\.depthwise\.", ".convnext.depthwise_conv."),
        (r"\.convnext\.pointwise([12])\.", r".convnext.pointwise_conv\1."),
        (r"^encoder\.embed\.", "encoder_embed."),
        (r"\.attn_weights\.", ".self_attn_weights."),
        (r"\.attn([12])\.", r".self_attn\1."),
        (r"\.ff([123])\.", r".feed_forward\1."),
        (r"\.nonlin_attn\.", ".nonlin_attention."),
        (r"\.conv([12])\.depthwise\.", r".conv_module\1.depthwise_conv."),
        (r"\.conv([12])\.", r".conv_module\1."),
        (r"\.(bypass|bypass_mid)\.scale$", r".\1.bypass_scale"),
    )
    for pattern, repl in inverse:
        name = re.sub(pattern, repl, name)
    return name


def _pos_permutation(pos_dim: int) -> Tensor:
    """spear column j <- icefall column perm[j]: icefall's embedding is (cos f1, sin f1, cos f2,
    ...), spear's (cos f1 .. cos fn, sin f1 .. sin fn)."""
    return torch.cat([torch.arange(0, pos_dim, 2), torch.arange(1, pos_dim, 2)])


def _ints(cfg: dict[str, Any], key: str, n: int | None) -> tuple[int, ...]:
    raw = cfg.get(key)
    if raw is None:
        raise SpearFormatError(f"SPEAR config.json lacks {key!r}")
    try:
        values = tuple(int(v) for v in str(raw).split(",")) if not isinstance(raw, int) else (raw,)
    except ValueError:
        raise SpearFormatError(
            f"SPEAR config.json: {key} {raw!r} is not comma-separated integers"
        ) from None
    if n is not None and len(values) == 1:
        values = values * n  # icefall broadcasts a single value to every stack
    return values


def encoder_config_from_spear(cfg: dict[str, Any]) -> ZipformerConfig:
    """SPEAR's ``config.json`` -> spear's encoder settings; refuses what spear cannot hold."""
    if cfg.get("causal", False):
        raise SpearFormatError(
            "SPEAR config.json: causal (streaming, chunked-attention) models are not supported; "
            "spear's student is non-causal"
        )
    ods = int(cfg.get("output_downsampling_factor", 1))
    if ods != 1:
        raise SpearFormatError(
            f"SPEAR config.json: output_downsampling_factor {ods} ({50 // ods} Hz output) is not "
            "supported; spear's student outputs 50 Hz (factor 1)"
        )
    bins = int(cfg.get("num_mel_bins", 128))
    if bins != 128:
        raise SpearFormatError(f"SPEAR config.json: num_mel_bins {bins}; spear takes 128")
    downsampling = _ints(cfg, "downsampling_factor", None)
    fields: dict[str, Any] = {
        field: _ints(cfg, key, len(downsampling)) for key, field in _PER_STACK.items()
    }
    try:
        return ZipformerConfig(
            num_features=bins,
            pos_dim=int(cfg.get("pos_dim", 48)),
            query_head_dim=SPEAR_HEAD_DIMS["query_head_dim"],
            value_head_dim=SPEAR_HEAD_DIMS["value_head_dim"],
            pos_head_dim=SPEAR_HEAD_DIMS["pos_head_dim"],
            **fields,
        )
    except SpearError as err:
        raise SpearFormatError(f"SPEAR config.json: {err}") from None


def encoder_config_to_spear(enc: ZipformerConfig) -> dict[str, Any]:
    """spear's encoder settings -> SPEAR's ``config.json`` (as its release folders write it)."""
    heads = {k: getattr(enc, k) for k in SPEAR_HEAD_DIMS}
    if heads != SPEAR_HEAD_DIMS or enc.embed_channels != SPEAR_EMBED_CHANNELS:
        raise SpearFormatError(
            f"SPEAR's modeling code builds head dims {SPEAR_HEAD_DIMS} and subsampling channels "
            f"{SPEAR_EMBED_CHANNELS}; this student has {heads} and {enc.embed_channels} (the "
            "base/large/xlarge presets match, tiny does not)"
        )
    if enc.num_features != 128:
        raise SpearFormatError(f"SPEAR's modeling code takes 128 mel bins, not {enc.num_features}")
    out: dict[str, Any] = {
        "architectures": ["SpearModel"],
        "auto_map": {
            "AutoConfig": "configuration_spear.SpearConfig",
            "AutoModel": "modeling_spear.SpearModel",
        },
        "model_type": "spear",
        "num_mel_bins": enc.num_features,
        "output_downsampling_factor": 1,
    }
    for key, field in _PER_STACK.items():
        out[key] = ",".join(str(v) for v in getattr(enc, field))
    # SPEAR's defaults; unused by a non-causal model.
    out.update(pos_dim=enc.pos_dim, causal=False, chunk_size=8, left_context_frames=128)
    return out


def encoder_state_from_spear(tensors: dict[str, Tensor], enc: ZipformerConfig) -> dict[str, Tensor]:
    """SPEAR's weights (with or without the ``model.model.`` prefix) -> spear's names, float32,
    with the unused per-layer scales dropped and ``linear_pos`` columns permuted."""
    perm = _pos_permutation(enc.pos_dim)
    out: dict[str, Tensor] = {}
    for key, value in tensors.items():
        name = key.removeprefix(PREFIX)
        if name.startswith("codebook_loss_net."):
            continue  # training-only heads a legacy checkpoint may carry
        if _UNUSED.match(name):
            continue
        new = spear_name(name)
        if not value.is_floating_point():
            raise SpearFormatError(f"SPEAR weight {key!r} is {value.dtype}, not floating point")
        value = value.float()
        if _LINEAR_POS.search(new):
            value = value[:, perm]
        out[new] = value.contiguous()
    return out


def encoder_state_to_spear(state: dict[str, Tensor], enc: ZipformerConfig) -> dict[str, Tensor]:
    """The reverse of :func:`encoder_state_from_spear`: spear's encoder + mask embedding ->
    SPEAR's names under ``model.model.``, float32, with the per-layer scale icefall expects."""
    inverse = torch.argsort(_pos_permutation(enc.pos_dim))
    out: dict[str, Tensor] = {}
    for name, value in state.items():
        if name.startswith("heads.") or name.endswith("._extra_state"):
            continue
        if not (name.startswith("encoder.") or name == "mask_embedding"):
            raise SpearFormatError(f"unexpected student weight {name!r}")
        value = value.detach().float().cpu()
        if _LINEAR_POS.search(name):
            value = value[:, inverse]
        out[PREFIX + icefall_name(name, enc.downsampling)] = value.contiguous()
    for n, (layers, dim, ds) in enumerate(
        zip(enc.num_layers, enc.encoder_dims, enc.downsampling, strict=True)
    ):
        inner = "encoder.layers" if ds > 1 else "layers"
        for i in range(layers):
            out[f"{PREFIX}encoder.encoders.{n}.{inner}.{i}.bypass_scale"] = torch.full((dim,), 0.5)
    return out


@dataclass(frozen=True)
class SpearFolder:
    """A SPEAR release read into memory."""

    config: dict[str, Any]
    """Its ``config.json``."""
    tensors: dict[str, Tensor]
    """Its weights, as stored."""
    source: str
    sha256: str
    """Digest of its weight files (spear.checkpoints)."""


def read_spear_folder(src: str, storage: StorageConfig | None = None) -> SpearFolder:
    """A SPEAR transformers folder from a local path, any fsspec URL or a hub id."""
    storage = storage or StorageConfig()
    local = fetch_hub(src) if is_hub_id(src) else fetch_checkpoint(src, storage)
    path = Path(local.path)
    if not path.is_dir():
        raise SpearFormatError(f"{src!r} is a file; give the SPEAR folder (config.json + weights)")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise SpearFormatError(f"{src!r} has no config.json: not a transformers model folder")
    try:
        config = json.loads(cfg_file.read_text())
    except ValueError as err:
        raise SpearFormatError(f"{src!r}: config.json is not JSON ({err})") from None
    arch = config.get("architectures") or []
    if "SpearModel" not in arch:
        raise SpearFormatError(
            f"{src!r} is not a SPEAR release (config.json architectures {arch}, expected "
            "['SpearModel'])"
        )
    try:
        tensors = weights_in_dir(path)
    except CheckpointError as err:
        raise SpearFormatError(str(err)) from None
    return SpearFolder(config=config, tensors=tensors, source=src, sha256=local.sha256)


def import_spear(
    src: str,
    storage: StorageConfig | None = None,
    heads: tuple[HeadConfig, ...] | None = None,
) -> Student:
    """A SPEAR release -> an eval-mode :class:`~spear.student.model.Student` whose encoder (and
    mask embedding) are the release's; the prediction heads are new (``heads``, default
    :func:`~spear.student.config.default_heads`), randomly initialised: SPEAR's releases carry
    no heads, so continued pre-training starts them from scratch."""
    from spear.student.model import Student

    folder = read_spear_folder(src, storage)
    enc = encoder_config_from_spear(folder.config)
    # SPEAR's config cannot say the subsampling widths; its weights can.
    widths = []
    for i in (0, 4, 7):
        w = folder.tensors.get(f"{PREFIX}encoder_embed.conv.{i}.weight")
        if w is None:
            raise SpearFormatError(f"{src!r} lacks {PREFIX}encoder_embed.conv.{i}.weight")
        widths.append(int(w.shape[0]))
    enc = _replace(enc, embed_channels=(widths[0], widths[1], widths[2]))
    student = Student(StudentConfig(encoder=enc, heads=heads or default_heads()))
    state = encoder_state_from_spear(folder.tensors, enc)
    # Heads are new; Whiten's `_extra_state` (when to check next) is training-only state.
    expected = {
        k: v
        for k, v in student.state_dict().items()
        if not k.startswith("heads.") and not k.endswith("._extra_state")
    }
    try:
        check_state(expected, state, f"{src!r} does not match its config.json:")
    except CheckpointError as err:
        raise SpearFormatError(str(err)) from None
    student.load_state_dict(state, strict=False)
    return student.eval()


def _replace(enc: ZipformerConfig, **changes: Any) -> ZipformerConfig:
    import dataclasses

    return dataclasses.replace(enc, **changes)


def export_spear(
    student: Student, out_url: str, storage: StorageConfig | None = None
) -> dict[str, Any]:
    """Write ``config.json`` + ``model.safetensors`` (float32) in SPEAR's release layout to the
    folder ``out_url`` (any fsspec URL). The heads are not written (SPEAR's layout has none).
    Returns the config written."""
    from safetensors.torch import save

    storage = storage or StorageConfig()
    enc = student.encoder.cfg
    config = encoder_config_to_spear(enc)
    tensors = encoder_state_to_spear(student.state_dict(), enc)
    write_atomic(join(out_url, "model.safetensors"), save(tensors, {"format": "pt"}), storage)
    text = json.dumps(config, indent=2) + "\n"
    write_atomic(join(out_url, "config.json"), text.encode(), storage)
    return config


SPEAR_CODE_FILES = (
    "configuration_spear.py",
    "modeling_spear.py",
    "spear_model.py",
    "spear_modules.py",
    "zipformer.py",
)
"""The modeling code a SPEAR release folder carries (``trust_remote_code=True`` loads it)."""


def copy_spear_code(src: str, out_url: str, storage: StorageConfig | None = None) -> list[str]:
    """Copy SPEAR's modeling code files from a release folder (path, URL or hub id) next to an
    export, so ``AutoModel.from_pretrained(out, trust_remote_code=True)`` loads it. spear ships
    none of SPEAR's code; this copies the user's own download."""
    storage = storage or StorageConfig()
    if is_hub_id(src):
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise SpearFormatError(
                f"fetching {src!r} needs huggingface_hub (pip install 'spear[hf]')"
            ) from None
        path = Path(snapshot_download(src, allow_patterns=["*.py"]))
    elif "://" not in src or src.startswith("file://"):
        path = Path(src.removeprefix("file://")).expanduser()
    else:
        # A remote folder: fetched into the checkpoint cache (it must hold weights too).
        path = Path(fetch_checkpoint(src, storage).path)
    missing = [f for f in SPEAR_CODE_FILES if not (path / f).is_file()]
    if missing:
        raise SpearFormatError(f"{src!r} lacks SPEAR's modeling code: {', '.join(missing)}")
    for f in SPEAR_CODE_FILES:
        write_atomic(join(out_url, f), (path / f).read_bytes(), storage)
    return list(SPEAR_CODE_FILES)
