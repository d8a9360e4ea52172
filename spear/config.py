"""Typed configuration: YAML files and CLI overrides parse into dataclasses, never free dicts.

One :class:`SpearConfig` holds a section per concern. A YAML file gives any subset of it::

    storage:
      endpoint_url: http://127.0.0.1:9000
    manifest:
      speech_segment_seconds: 20

Unknown keys and values of the wrong type fail at once with the key's dotted path, so a typo
never passes silently (the icefall ``enable_distiallation`` lesson): :mod:`spear.configio`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from spear.configio import from_dict, to_dict
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


def dump_yaml(cfg: SpearConfig) -> str:
    """The config as YAML, credentials masked (:func:`spear.credentials.redact`)."""
    from spear.credentials import redact

    return yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False)
