"""Teacher weights: the checkpoint layouts of each source, read into our architectures, and the
one strict loader both teachers use.

A checkpoint is first made local by :func:`spear.checkpoints.fetch` (any fsspec URL or a hub id,
once per node, sha256 recorded; weights read without unpickling objects). This module reads it:

* WavLM (:func:`read_wavlm_checkpoint`): a transformers model folder (``config.json`` +
  safetensors / bin, e.g. ``microsoft/wavlm-large``), the original unilm ``WavLM-Large.pt``
  (``{'cfg', 'model'}``) and a torchaudio ``wavlm_model`` state dict. All are converted to the
  transformers key names first (:func:`unilm_to_hf`, :func:`torchaudio_to_hf`), then to ours
  (:func:`hf_to_ours`, which drops the layers above the one kept).
* Dasheng (:func:`read_dasheng_checkpoint`): the ``dasheng`` package's ``.pt`` (``{'model':
  state_dict, 'config': kwargs}``), a hub mirror folder (``mispeech/dasheng-*``: ``config.json`` +
  weights under ``encoder.``) or a bare state dict (:func:`package_to_ours`).
* Both: a checkpoint of the other family is one line naming the option it belongs to
  (:func:`require_family`), and :func:`load_strict` copies a state into a model only when every
  key is there, none is extra and every shape fits, else one error naming the keys.

(SPEAR's released student folders are the student's layout: ``spear.student.hf``.)
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from spear.checkpoints import CheckpointError, check_state, load_weights, weights_in_dir
from spear.stages.teachers.dasheng import DashengArch, dasheng_06b, dasheng_12b, dasheng_base
from spear.stages.teachers.wavlm import WavLMArch

# -- the one strict loader ------------------------------------------------------------------------


def load_strict(model: nn.Module, state: Mapping[str, Tensor], what: str) -> nn.Module:
    """Copy ``state`` (our key names) into ``model``: every shape must fit, every key the model
    has must be there and no other (:func:`spear.checkpoints.check_state`, whose error names the
    keys; ``what`` names the model in it). On the meta device only keys and shapes are checked."""
    check_state(model.state_dict(), state, what)
    model.load_state_dict(state, strict=True)
    return model


# -- which family a checkpoint holds --------------------------------------------------------------

# Weight names only one family has (any layout: transformers, unilm, torchaudio, the dasheng
# package, spear's own), and where a checkpoint of each family is given.
_FAMILY_KEYS = {
    "WavLM": ("gru_rel_pos", "grep_linear", "rel_attn_embed", "relative_attention_bias"),
    "Dasheng": ("init_bn.", "patch_embed.", "time_pos_embed", "freq_pos_embed"),
}
_FAMILY_OPTION = {
    "WavLM": "--wavlm-checkpoint, teachers.wavlm.checkpoint or embed --teacher wavlm",
    "Dasheng": "--dasheng-checkpoint, teachers.dasheng.checkpoint or embed --teacher dasheng",
}


def checkpoint_family(keys: Iterable[str], config: dict[str, Any] | None = None) -> str | None:
    """The model family a checkpoint holds, from its config (a transformers ``model_type``,
    the dasheng package's ``encoder_kwargs``) or else its weight names: ``WavLM``,
    ``Dasheng``, another ``model_type`` (``hubert``, ...), or None when nothing tells."""
    if config:
        kind = str(config.get("model_type") or "")
        if kind.lower() == "wavlm":
            return "WavLM"
        if kind.lower().startswith("dasheng"):
            return "Dasheng"
        if kind:
            return kind
        if "encoder_kwargs" in config or str(config.get("name", "")).startswith("dasheng"):
            return "Dasheng"
    names = list(keys)
    for family, marks in _FAMILY_KEYS.items():
        if any(m in k for k in names for m in marks):
            return family
    return None


def require_family(
    path: Path, expected: str, keys: Iterable[str], config: dict[str, Any] | None = None
) -> None:
    """Fail in one line when the checkpoint at ``path`` is of another family than
    ``expected`` (a WavLM folder given as Dasheng), instead of listing missing weights."""
    found = checkpoint_family(keys, config)
    if found is None or found == expected:
        return
    where = _FAMILY_OPTION.get(found)
    raise CheckpointError(
        f"{str(path)!r} is a {found} checkpoint, not {expected}: give a {expected} checkpoint"
        + (f", or this one to the {found} teacher ({where})" if where else "")
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {str(path)!r}: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{str(path)!r} must hold a JSON object")
    return data


# -- WavLM ----------------------------------------------------------------------------------------


def _safe_eval_layers(text: str) -> list[tuple[int, int, int]]:
    """Evaluate fairseq's ``conv_feature_layers`` string (lists, tuples, ints, + and *) safely."""

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [ev(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = ev(node.left), ev(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise CheckpointError(f"unsupported conv_feature_layers expression: {text!r}")

    try:
        value = ev(ast.parse(text, mode="eval").body)
    except SyntaxError:
        raise CheckpointError(f"bad conv_feature_layers {text!r}") from None
    return [tuple(v) for v in value]


def arch_from_hf_config(cfg: dict[str, Any]) -> WavLMArch:
    """transformers ``config.json`` -> :class:`WavLMArch`."""
    try:
        return WavLMArch(
            conv_layers=tuple(
                zip(cfg["conv_dim"], cfg["conv_kernel"], cfg["conv_stride"], strict=True)
            ),
            conv_bias=bool(cfg.get("conv_bias", False)),
            extractor_norm=cfg.get("feat_extract_norm", "group"),
            dim=int(cfg["hidden_size"]),
            ffn_dim=int(cfg["intermediate_size"]),
            num_heads=int(cfg["num_attention_heads"]),
            num_layers=int(cfg["num_hidden_layers"]),
            pos_conv_kernel=int(cfg["num_conv_pos_embeddings"]),
            pos_conv_groups=int(cfg["num_conv_pos_embedding_groups"]),
            num_buckets=int(cfg.get("num_buckets", 320)),
            max_distance=int(cfg.get("max_bucket_distance", 800)),
            layer_norm_first=bool(cfg.get("do_stable_layer_norm", False)),
            layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"not a WavLM config.json: {err}") from None


def arch_from_unilm_cfg(cfg: dict[str, Any]) -> WavLMArch:
    """The original unilm checkpoint's ``cfg`` dict -> :class:`WavLMArch`."""
    if not cfg.get("relative_position_embedding", True) or not cfg.get("gru_rel_pos", True):
        raise CheckpointError(
            "only WavLM checkpoints with gated relative position bias are supported"
        )
    mode = cfg.get("extractor_mode", "default")
    try:
        layers = cfg.get("conv_feature_layers", "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2")
        return WavLMArch(
            conv_layers=tuple(_safe_eval_layers(layers) if isinstance(layers, str) else layers),
            conv_bias=bool(cfg.get("conv_bias", False)),
            extractor_norm="layer" if mode == "layer_norm" else "group",
            dim=int(cfg["encoder_embed_dim"]),
            ffn_dim=int(cfg["encoder_ffn_embed_dim"]),
            num_heads=int(cfg["encoder_attention_heads"]),
            num_layers=int(cfg["encoder_layers"]),
            pos_conv_kernel=int(cfg.get("conv_pos", 128)),
            pos_conv_groups=int(cfg.get("conv_pos_groups", 16)),
            num_buckets=int(cfg.get("num_buckets", 320)),
            max_distance=int(cfg.get("max_distance", 800)),
            layer_norm_first=bool(cfg.get("layer_norm_first", False)),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"not a WavLM unilm cfg: {err}") from None


_UNILM_LAYER = {
    "self_attn.q_proj": "attention.q_proj",
    "self_attn.k_proj": "attention.k_proj",
    "self_attn.v_proj": "attention.v_proj",
    "self_attn.out_proj": "attention.out_proj",
    "self_attn.grep_linear": "attention.gru_rel_pos_linear",
    "self_attn.grep_a": "attention.gru_rel_pos_const",
    "self_attn.relative_attention_bias": "attention.rel_attn_embed",
    "self_attn_layer_norm": "layer_norm",
    "fc1": "feed_forward.intermediate_dense",
    "fc2": "feed_forward.output_dense",
    "final_layer_norm": "final_layer_norm",
}


def unilm_to_hf(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Original unilm/fairseq WavLM keys -> transformers ``WavLMModel`` keys."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        new: str | None = None
        if key.startswith("feature_extractor.conv_layers."):
            i, rest = parts[2], ".".join(parts[3:])
            if rest.startswith("0."):  # the conv
                new = f"feature_extractor.conv_layers.{i}.conv.{parts[-1]}"
            elif rest.startswith("2.1.") or rest.startswith("2."):  # LayerNorm / GroupNorm
                new = f"feature_extractor.conv_layers.{i}.layer_norm.{parts[-1]}"
        elif parts[0] == "layer_norm":
            new = f"feature_projection.layer_norm.{parts[-1]}"
        elif parts[0] == "post_extract_proj":
            new = f"feature_projection.projection.{parts[-1]}"
        elif key.startswith("encoder.pos_conv.0."):
            new = f"encoder.pos_conv_embed.conv.{parts[-1]}"
        elif key.startswith("encoder.layer_norm."):
            new = key
        elif key.startswith("encoder.layers."):
            i, rest = parts[2], ".".join(parts[3:-1])
            if rest in _UNILM_LAYER:
                new = f"encoder.layers.{i}.{_UNILM_LAYER[rest]}.{parts[-1]}"
            elif parts[3:] == ["self_attn", "grep_a"]:  # a bare parameter, no .weight suffix
                new = f"encoder.layers.{i}.attention.gru_rel_pos_const"
        if new is not None:
            out[new] = value
    return out


def torchaudio_to_hf(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """torchaudio ``wavlm_model`` keys -> transformers ``WavLMModel`` keys."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("feature_extractor."):
            out[key] = value
        elif key.startswith("encoder.feature_projection."):
            out[key.removeprefix("encoder.")] = value
        elif key.startswith("encoder.transformer."):
            rest = key.removeprefix("encoder.transformer.")
            if ".attention.attention.in_proj_" in rest:
                prefix, kind = rest.split(".attention.attention.in_proj_")
                q, k, v = value.chunk(3, dim=0)
                for name, part in (("q", q), ("k", k), ("v", v)):
                    out[f"encoder.{prefix}.attention.{name}_proj.{kind}"] = part
            else:
                out["encoder." + rest.replace(".attention.attention.", ".attention.")] = value
    return out


def _fold_weight_norm(g: Tensor, v: Tensor) -> Tensor:
    """``weight_norm(dim=2)``: w = g * v / ||v||, the norm taken over all dims but 2."""
    return g * v / v.norm(dim=(0, 1), keepdim=True)


def hf_to_ours(state: dict[str, Tensor], arch: WavLMArch, layer: int) -> dict[str, Tensor]:
    """transformers keys -> :class:`WavLM` keys, dropping layers above ``layer``."""
    state = {k.removeprefix("wavlm."): v for k, v in state.items()}
    out: dict[str, Tensor] = {}
    for i in range(len(arch.conv_layers)):
        src = f"feature_extractor.conv_layers.{i}."
        for name in ("conv.weight", "conv.bias", "layer_norm.weight", "layer_norm.bias"):
            if src + name in state:
                out[f"convs.{i}.{name.replace('layer_norm', 'norm')}"] = state[src + name]
    for name in ("weight", "bias"):
        out[f"proj_norm.{name}"] = state.get(f"feature_projection.layer_norm.{name}")  # type: ignore[assignment]
        out[f"proj.{name}"] = state.get(f"feature_projection.projection.{name}")  # type: ignore[assignment]
        if not arch.layer_norm_first:
            out[f"input_norm.{name}"] = state.get(f"encoder.layer_norm.{name}")  # type: ignore[assignment]
    pc = "encoder.pos_conv_embed.conv."
    if pc + "weight_g" in state:
        out["pos_conv.weight"] = _fold_weight_norm(state[pc + "weight_g"], state[pc + "weight_v"])
    elif pc + "parametrizations.weight.original0" in state:
        out["pos_conv.weight"] = _fold_weight_norm(
            state[pc + "parametrizations.weight.original0"],
            state[pc + "parametrizations.weight.original1"],
        )
    elif pc + "weight" in state:
        out["pos_conv.weight"] = state[pc + "weight"]
    out["pos_conv.bias"] = state.get(pc + "bias")  # type: ignore[assignment]
    out["rel_bias.weight"] = state.get("encoder.layers.0.attention.rel_attn_embed.weight")  # type: ignore[assignment]
    for i in range(layer):
        src = f"encoder.layers.{i}."
        a = src + "attention."
        try:
            out[f"layers.{i}.attn.qkv.weight"] = torch.cat(
                [state[a + f"{p}_proj.weight"] for p in "qkv"]
            )
            out[f"layers.{i}.attn.qkv.bias"] = torch.cat(
                [state[a + f"{p}_proj.bias"] for p in "qkv"]
            )
        except KeyError as err:
            raise CheckpointError(f"WavLM checkpoint lacks {err.args[0]!r}") from None
        pairs = {
            "attn.out": "attention.out_proj",
            "attn.gate": "attention.gru_rel_pos_linear",
            "norm1": "layer_norm",
            "ff1": "feed_forward.intermediate_dense",
            "ff2": "feed_forward.output_dense",
            "norm2": "final_layer_norm",
        }
        for ours, theirs in pairs.items():
            for name in ("weight", "bias"):
                out[f"layers.{i}.{ours}.{name}"] = state.get(src + f"{theirs}.{name}")  # type: ignore[assignment]
        out[f"layers.{i}.attn.gate_const"] = state.get(a + "gru_rel_pos_const")  # type: ignore[assignment]
    missing = sorted(k for k, v in out.items() if v is None)
    if missing:
        raise CheckpointError(f"WavLM checkpoint lacks weights for {missing[:5]}")
    return out


def arch_from_state(state: dict[str, Tensor], default: WavLMArch) -> WavLMArch:
    """Infer sizes from a transformers-keyed state dict without a config (torchaudio layout).

    Strides, ``max_distance`` and pre/post-LN are not in the weights: they come from ``default``.
    """
    state = {k.removeprefix("wavlm."): v for k, v in state.items()}
    try:
        convs = []
        i = 0
        while f"feature_extractor.conv_layers.{i}.conv.weight" in state:
            c, _, k = state[f"feature_extractor.conv_layers.{i}.conv.weight"].shape
            stride = default.conv_layers[i][2] if i < len(default.conv_layers) else 2
            convs.append((int(c), int(k), stride))
            i += 1
        n_layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layers."))
        pc = "encoder.pos_conv_embed.conv."
        v = state.get(pc + "weight_v", state.get(pc + "parametrizations.weight.original1"))
        if v is None:
            v = state[pc + "weight"]
        dim = int(state["feature_projection.projection.weight"].shape[0])
        return WavLMArch(
            conv_layers=tuple(convs),
            conv_bias="feature_extractor.conv_layers.0.conv.bias" in state,
            extractor_norm=(
                "layer" if "feature_extractor.conv_layers.1.layer_norm.weight" in state else "group"
            ),
            dim=dim,
            ffn_dim=int(state["encoder.layers.0.feed_forward.intermediate_dense.weight"].shape[0]),
            num_heads=int(state["encoder.layers.0.attention.gru_rel_pos_const"].shape[1]),
            num_layers=n_layers,
            pos_conv_kernel=int(v.shape[2]),
            pos_conv_groups=dim // int(v.shape[1]),
            num_buckets=int(state["encoder.layers.0.attention.rel_attn_embed.weight"].shape[0]),
            max_distance=default.max_distance,
            layer_norm_first=default.layer_norm_first,
            layer_norm_eps=default.layer_norm_eps,
        )
    except (KeyError, ValueError, IndexError) as err:
        raise CheckpointError(
            f"cannot infer the WavLM architecture from the weights: {err}"
        ) from None


def read_wavlm_checkpoint(
    path: Path, default_arch: WavLMArch
) -> tuple[WavLMArch, dict[str, Tensor], str]:
    """Read any supported layout into (arch, transformers-keyed state, layout name).

    Architecture comes from the checkpoint's own config where it has one (transformers
    ``config.json``, unilm ``cfg``); for a bare state dict (torchaudio) sizes are read from the
    weights' shapes and the rest from ``default_arch``.
    """
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{str(path)!r} is a folder without config.json")
        hf_cfg = _read_json(cfg_file)
        require_family(path, "WavLM", (), hf_cfg)
        weights = weights_in_dir(path)
        require_family(path, "WavLM", weights)
        return arch_from_hf_config(hf_cfg), weights, "transformers"
    obj = load_weights(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{str(path)!r} does not hold a state dict")
    inner = obj.get("model")
    require_family(path, "WavLM", inner if isinstance(inner, dict) else obj)
    if "model" in obj and "cfg" in obj:
        cfg = obj["cfg"]
        if not isinstance(cfg, dict):
            raise CheckpointError("unilm checkpoint's 'cfg' is not a plain dict")
        cfg = cfg.get("model", cfg) if isinstance(cfg.get("model"), dict) else cfg
        return arch_from_unilm_cfg(cfg), unilm_to_hf(obj["model"]), "unilm"
    state = obj.get("state_dict", obj)
    if any(k.startswith("encoder.transformer.") for k in state):
        hf = torchaudio_to_hf(state)
        return arch_from_state(hf, default_arch), hf, "torchaudio"
    if any(k.startswith(("encoder.layers.", "wavlm.encoder.layers.")) for k in state):
        return arch_from_state(state, default_arch), state, "transformers"
    raise CheckpointError(
        f"{str(path)!r} is not a WavLM checkpoint layout spear knows "
        "(transformers folder, unilm {'cfg','model'}, torchaudio state dict)"
    )


# -- Dasheng --------------------------------------------------------------------------------------


_DASHENG_ARCH_KEYS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "target_length")


def dasheng_arch_from_config(cfg: dict[str, Any], default: DashengArch) -> DashengArch:
    """The package's ``config`` kwargs (or a hub ``config.json``) -> :class:`DashengArch`."""
    if "encoder_kwargs" in cfg and isinstance(cfg["encoder_kwargs"], dict):
        cfg = cfg["encoder_kwargs"]
    if cfg.get("pooling", "mean") == "token":
        raise CheckpointError(
            "Dasheng checkpoints with a CLS token (pooling='token') are not supported"
        )
    for key in ("patch_size", "patch_stride"):
        if key in cfg and [int(v) for v in cfg[key]] != [default.n_mels, default.patch_frames]:
            raise CheckpointError(f"Dasheng {key}={cfg[key]} is not supported (only 64x4 patches)")
    kwargs: dict[str, Any] = {k: cfg[k] for k in _DASHENG_ARCH_KEYS if k in cfg}
    for key, ours in (
        ("n_fft", "n_fft"),
        ("n_mels", "n_mels"),
        ("hop_size", "hop_length"),
        ("win_size", "win_length"),
        ("f_min", "f_min"),
        ("f_max", "f_max"),
        ("top_db", "top_db"),
    ):
        if key in cfg:
            kwargs[ours] = cfg[key]
    kwargs["layer_scale"] = bool(cfg.get("init_values"))
    fields = {**default.__dict__, **kwargs}
    try:
        return DashengArch(
            **{k: type(getattr(default, k))(v) for k, v in fields.items()}  # coerce JSON numbers
        )
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"bad Dasheng config: {err}") from None


def package_to_ours(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``dasheng`` package keys -> :class:`Dasheng` keys (the front end's fixed buffers dropped)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("encoder.")
        if key.startswith(("front_end.", "outputlayer.", "decoder.")):
            continue
        if key.startswith("init_bn.1."):
            key = "init_bn." + key.removeprefix("init_bn.1.")
        out[key] = value
    return out


def read_dasheng_checkpoint(
    path: Path, default: DashengArch
) -> tuple[DashengArch, dict[str, Tensor], str]:
    """Read the package ``.pt`` or a hub mirror folder into (arch, our-keyed state, layout)."""
    if path.is_dir():
        cfg_file = path / "config.json"
        cfg = _read_json(cfg_file) if cfg_file.is_file() else {}
        require_family(path, "Dasheng", (), cfg)
        weights = weights_in_dir(path)
        require_family(path, "Dasheng", weights)
        arch = dasheng_arch_from_config(cfg, _dasheng_preset(cfg.get("name"), default))
        return arch, package_to_ours(weights), "hub"
    obj = load_weights(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{str(path)!r} does not hold a state dict")
    inner = obj.get("model")
    require_family(path, "Dasheng", inner if isinstance(inner, dict) else obj)
    if isinstance(inner, dict):
        cfg = obj.get("config") or {}
        if not isinstance(cfg, dict):
            raise CheckpointError("Dasheng checkpoint's 'config' is not a plain dict")
        return dasheng_arch_from_config(cfg, default), package_to_ours(inner), "dasheng"
    if any(k.startswith(("blocks.", "encoder.blocks.")) for k in obj):
        return default, package_to_ours(obj), "state_dict"
    raise CheckpointError(
        f"{str(path)!r} is not a Dasheng checkpoint ({{'model','config'}} .pt or hub folder)"
    )


def _dasheng_preset(name: Any, default: DashengArch) -> DashengArch:
    presets = {
        "dasheng-base": dasheng_base,
        "dasheng-0.6B": dasheng_06b,
        "dasheng-1.2B": dasheng_12b,
    }
    return presets[name]() if name in presets else default
