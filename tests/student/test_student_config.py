"""The typed student/training config: parses from YAML-like data, rejects bad values, is light."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from spear.configio import from_dict, to_dict
from spear.errors import ConfigError
from spear.student.config import TrainConfig

YAML = """
student:
  preset: large
  heads:
    - {name: wavlm, num_codebooks: 16}
    - {name: dasheng, num_codebooks: 8, frame_rate: 25, weight_speech: 0, weight_audio: 0.1}
mask: {time_prob: 0.65, time_span: 10}
mix: {inbatch_prob: 0.2, inbatch_snr: [-5, 5], token_mixing: true}
optim: {name: scaled_adam, lr: 0.045}
data: {batch_seconds: 350, min_seconds: 0.9}
num_workers: 8
precision: bf16
"""


def test_parses_and_round_trips() -> None:
    cfg = from_dict(TrainConfig, yaml.safe_load(YAML))
    assert cfg.student.encoder_config().encoder_dims[0] == 1024
    assert cfg.student.heads[1].weight_audio == 0.1 and cfg.mix.inbatch_snr == (-5.0, 5.0)
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "bad",
    [
        {"student": {"preset": "huge"}},
        {"mask": {"time_prob": 1.5}},
        {"mix": {"overlap": [0.6, 0.2]}},
        {"data": {"batch_seconds": 10}},
        {"optim": {"name": "sgd"}},
        {"num_wokers": 2},
    ],
)
def test_rejects_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        from_dict(TrainConfig, bad)


def test_config_does_not_import_torch() -> None:
    code = "import sys, spear.student.config; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
