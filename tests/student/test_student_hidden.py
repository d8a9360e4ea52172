"""Every layer's 50 Hz output (spear.student.hidden, Student.encode(layers=True))."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spear.errors import SpearError
from spear.student.config import StudentConfig
from spear.student.features import features_batch
from spear.student.hidden import select_layers, stack_layers
from spear.student.model import Student


@pytest.fixture(scope="module")
def tiny() -> Student:
    torch.manual_seed(0)
    return Student(StudentConfig(preset="tiny")).eval()


def _audio(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(seconds * 16000)) * 3000).astype(np.int16)


def test_one_state_per_layer_at_50_hz_with_the_stack_width(tiny) -> None:
    feats, lengths = tiny.frontend.waves([_audio(1.3, 0)])
    with torch.no_grad():
        out, _, hidden = tiny.encode(feats, lengths, layers=True)
        plain, _ = tiny.encode(feats, lengths)
    assert torch.equal(out, plain)  # asking for the layers does not change the output
    assert len(hidden) == tiny.num_layers == 7
    widths = tiny.encoder.cfg.encoder_dims
    assert [h.shape for h in hidden] == [(1, out.shape[1], w) for w in widths]
    # The last stack runs at 50 Hz and is the output's first channels; downsampled stacks'
    # states repeat each frame ds times.
    assert torch.equal(hidden[-1][..., : widths[-1]], out[..., : widths[-1]])
    ds = tiny.encoder.cfg.downsampling[3]
    h3 = hidden[3][0, : (out.shape[1] // ds) * ds].reshape(-1, ds, widths[3])
    assert torch.equal(h3, h3[:, :1].expand_as(h3))
    assert not torch.equal(hidden[0], hidden[1])


def test_states_of_a_padded_batch_equal_each_item_alone(tiny) -> None:
    clips = [_audio(2.0, 1), _audio(0.9, 2)]
    feats, lengths = tiny.frontend.waves(clips)
    with torch.no_grad():
        _, out_len, hidden = tiny.encode(feats, lengths, layers=True)
        for row, clip in enumerate(clips):
            f1, l1 = tiny.frontend.waves([clip])
            _, n1, alone = tiny.encode(f1, l1, layers=True)
            n = int(n1[0])
            assert int(out_len[row]) == n
            for a, b in zip(hidden, alone, strict=True):
                torch.testing.assert_close(a[row, :n], b[0], atol=1e-5, rtol=0)
                assert torch.all(a[row, n:] == 0)


def test_hooks_are_removed(tiny) -> None:
    feats, lengths = tiny.frontend.waves([_audio(0.5, 3)])
    with torch.no_grad():
        tiny.encode(feats, lengths, layers=True)
    assert all(not layer._forward_hooks for s in tiny.encoder.stacks for layer in s.layers)


def test_select_layers() -> None:
    assert select_layers(None, 11) is None
    assert select_layers("all", 3) == (0, 1, 2)
    assert select_layers("4,0,-1,4", 11) == (0, 4, 10)
    with pytest.raises(SpearError, match=r"layers 0\.\.10"):
        select_layers("11", 11)
    with pytest.raises(SpearError, match="comma-separated"):
        select_layers("first", 11)


def test_stack_layers_pads_narrow_stacks() -> None:
    hidden = [torch.ones(2, 5, 3), torch.full((2, 5, 4), 2.0)]
    got = stack_layers(hidden, (0, 1), 4)
    assert got.shape == (2, 5, 2, 4)
    assert torch.all(got[:, :, 0, 3] == 0) and torch.all(got[:, :, 1] == 2)


def test_features_batch_with_layers(tiny) -> None:
    clips = [_audio(1.0, 4), _audio(0.6, 5)]
    batch = {
        "item_id": np.array(["a", "b", "c"]),
        "audio": [clips[0].tobytes(), b"", clips[1].tobytes()],
        "error_type": np.array(["", "decode_error", ""]),
    }

    out = features_batch(tiny, batch, torch.device("cpu"), layers=(0, 6))
    dim = tiny.output_dim
    assert out["num_frames"][1] == 0 and out["features"][1] == b""
    for row, clip in zip((0, 2), clips, strict=True):
        feats, lengths = tiny.frontend.waves([clip])
        with torch.no_grad():
            _, _, hidden = tiny.encode(feats, lengths, layers=True)
        n = int(out["num_frames"][row])
        got = np.frombuffer(out["features"][row], "<f2").reshape(n, 2, dim)
        want = stack_layers(hidden, (0, 6), dim)[0].numpy()
        np.testing.assert_allclose(got, want, atol=1e-2, rtol=1e-2)
