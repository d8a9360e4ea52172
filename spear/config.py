"""Typed configuration: YAML files and CLI overrides parse into dataclasses, never free dicts.

One :class:`SpearConfig` holds a section per concern. A YAML file gives any subset of it::

    storage:
      endpoint_url: http://127.0.0.1:9000
    manifest:
      speech_segment_seconds: 20

Unknown keys and values of the wrong type fail at once with the key's dotted path, so a typo
never passes silently (the icefall ``enable_distiallation`` lesson).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from spear.errors import ConfigError
from spear.pipeline.settings import EmbedConfig, FeaturesConfig
from spear.quantizer.config import QuantizerConfig
from spear.ray_utils import RayConfig
from spear.stages.decode import DecodeConfig
from spear.stages.manifest import ManifestConfig
from spear.stages.teachers import TeachersConfig
from spear.stages.tokenize import TokenizeConfig
from spear.storage import StorageConfig
from spear.student.config import TrainConfig

T = TypeVar("T")


@dataclass(kw_only=True)
class SpearConfig:
    """Everything a spear command can be configured with; each command reads its sections."""

    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-storage settings, passed to every worker."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Which Ray cluster to use and how to start a local one."""
    manifest: ManifestConfig = field(default_factory=ManifestConfig)
    """Listing, probing and segmenting audio."""
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    """Decoding and resampling to 16 kHz mono int16."""
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    """The speech (WavLM) and audio (Dasheng) teachers: checkpoints and how they run."""
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    """``spear embed``: which items a teacher embeds (the quantiser's training sample)."""
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    """MVQ quantiser training, held-out split and encoding."""
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    """``spear tokenize``: quantiser per teacher, domains per teacher, shard size."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """``spear train``: the student, masking, mixing, optimiser, data and Ray Train settings."""
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    """``spear features``: output format, part size, how the student runs."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp``, converting where YAML/CLI text allows."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{path}: bad value {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        k_tp, v_tp = get_args(tp) or (Any, Any)
        return {_coerce(k, k_tp, path): _coerce(v, v_tp, f"{path}.{k}") for k, v in value.items()}
    if is_dataclass(tp):
        if isinstance(value, tp):  # type: ignore[arg-type]
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return from_dict(tp, value, path)  # type: ignore[arg-type]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys with a suggestion."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.init}  # type: ignore[arg-type]
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {where!r}{hint}")
        kwargs[key] = _coerce(value, hints[key], where)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path or cls.__name__}: {err}") from None
    return obj


def to_dict(obj: Any) -> Any:
    """A dataclass as plain data (for YAML/JSON output and run reports)."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, last = dotted.split(".")
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted!r}: {key!r} is not a section")
        node = child
    node[last] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=value`` -> (dotted key, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    sets: list[str] | None = None,
) -> SpearConfig:
    """Resolve the config: defaults <- YAML file <- ``--set key=value`` <- command options.

    ``overrides`` maps dotted keys to values; a value of ``None`` means "option not given".
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {err}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections")
        data = loaded
    for text in sets or []:
        _set_path(data, *parse_override(text))
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_path(data, dotted, value)
    return from_dict(SpearConfig, data)


def replace(obj: T, **changes: Any) -> T:
    return dataclasses.replace(obj, **changes)  # type: ignore[type-var]


def dump_yaml(cfg: SpearConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
