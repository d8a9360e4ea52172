"""spear.s3prl: the s3prl upstream interface over a student.pt."""

from __future__ import annotations

import pytest
import torch

from spear.s3prl import DOWNSAMPLE_RATE, UpstreamExpert
from spear.student.config import StudentConfig
from spear.student.model import Student


@pytest.fixture(autouse=True)
def _one_thread():  # type: ignore[no-untyped-def]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_hidden_states_of_a_batch_of_any_lengths(tmp_path) -> None:
    torch.manual_seed(0)
    path = str(tmp_path / "student.pt")
    Student(StudentConfig(preset="tiny")).save(path)
    up = UpstreamExpert(path)
    assert not up.student.training and up.get_downsample_rates("hidden_states") == 320
    g = torch.Generator().manual_seed(0)
    wavs = [torch.rand(n, generator=g) * 2 - 1 for n in (32000, 20000)]
    with torch.no_grad():
        res = up(wavs)
        alone = up([wavs[1]])
    states = res["hidden_states"]
    assert len(states) == up.num_layers == 8
    t = states[0].shape[1]
    assert all(s.shape == (2, t, up.hidden_size) for s in states)
    assert abs(t - 32000 / DOWNSAMPLE_RATE) <= 5
    assert torch.equal(states[-1], res["last_hidden_state"])
    n = int(res["lengths"][1])
    for a, b in zip(states, alone["hidden_states"], strict=True):
        torch.testing.assert_close(a[1, :n], b[0], atol=1e-5, rtol=0)
        assert torch.all(a[1, n:] == 0)
