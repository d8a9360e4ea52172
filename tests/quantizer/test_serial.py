"""Content-derived quantiser ids and the bytes formats: quantiser files and training checkpoints."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from spear.quantizer.config import QuantizerTrainConfig
from spear.quantizer.mvq import FORMAT_VERSION, Quantizer, QuantizerInfo
from spear.quantizer.serial import (
    QuantizerFileError,
    quantizer_from_bytes,
    quantizer_json,
    quantizer_to_bytes,
    state_from_bytes,
    state_to_bytes,
)
from spear.quantizer.synthetic import mixture_of_low_rank_gaussians
from spear.quantizer.train import QuantizerTrainer


def make(seed: int = 0, dim: int = 16) -> Quantizer:
    torch.manual_seed(seed)
    q = Quantizer(QuantizerInfo(dim=dim, num_codebooks=2, codebook_size=16))
    with torch.no_grad():
        q.centers.normal_()
    return q


def test_id_follows_the_weights() -> None:
    a, b = make(0), make(0)
    assert a.id == b.id and a.id.startswith("mvq-") and len(a.id) == 4 + 16
    before = a.id
    with torch.no_grad():
        a.centers[1, 3, 0] += 1e-3  # one coordinate of one centre
    assert a.id != before
    with torch.no_grad():
        a.centers[1, 3, 0] -= 1e-3
    assert a.id == before  # the same bits again
    with torch.no_grad():
        b.to_logits.bias[0] += 1e-3  # only the argmax start: still other codes
    assert b.id != before
    assert make(1).id != before


def test_id_covers_normalisation_and_ignores_labels() -> None:
    a, b = make(0), make(0)
    a.info.teacher, a.info.layer, a.info.rrl = "wavlm-large", 21, 0.3
    assert a.id == b.id  # labels do not change a single code
    b.set_normalisation(torch.zeros(16), torch.ones(16))
    assert b.id != a.id  # normalised: the stats are part of the encoder
    c = make(0)
    c.set_normalisation(torch.zeros(16), torch.full((16,), 2.0))
    assert c.id != b.id


def test_id_survives_save_load_and_learned_scales() -> None:
    q = make(0)
    with torch.no_grad():  # scales are folded into the saved tensors; the id sees them too
        q.logits_scale.fill_(0.05)
        q.centers_scale.fill_(-0.02)
    q.set_normalisation(torch.randn(16), torch.rand(16) + 0.5)
    data = quantizer_to_bytes(q)
    back = quantizer_from_bytes(data)
    assert back.id == q.id
    assert quantizer_to_bytes(back) == data  # saving a loaded quantiser changes nothing
    header = json.loads(quantizer_json(q))
    assert header["id"] == q.id and header["format_version"] == FORMAT_VERSION


def _rewrite(data: bytes, tensors=None, **header: object) -> bytes:
    """The same file with some tensors or header keys replaced."""
    size = int.from_bytes(data[:8], "little")
    meta = json.loads(json.loads(data[8 : 8 + size])["__metadata__"]["spear"])
    meta.update(header)
    from safetensors.torch import load

    ts = load(data) | (tensors or {})
    return st_save(ts, metadata={"spear": json.dumps(meta)})


def test_a_file_whose_weights_were_changed_is_refused() -> None:
    q = make(0)
    data = quantizer_to_bytes(q)
    centers = q.export_tensors()["centers"]
    centers[0, 0, 0] += 0.5
    with pytest.raises(QuantizerFileError, match="changed after spear wrote it"):
        quantizer_from_bytes(_rewrite(data, {"centers": centers}), "q.safetensors")
    # A format-1 file (random ids) loads with the id of its content.
    old = quantizer_from_bytes(_rewrite(data, id="1a2b3c4d", format_version=1))
    assert old.id == q.id


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "is not a safetensors file"),
        (pickle.dumps({"centers": [1.0, 2.0]}), "never as pickles"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}", "is not a safetensors file"),
        (st_save({"x": torch.zeros(2)}), "is not a spear quantiser"),
        (state_to_bytes({"step": 3}), "is a training checkpoint, not a quantiser"),
    ],
    ids=["empty", "pickle", "garbage", "foreign", "checkpoint"],
)
def test_what_is_not_a_quantizer(data: bytes, message: str) -> None:
    with pytest.raises(QuantizerFileError, match=message) as err:
        quantizer_from_bytes(data, "some/q.safetensors")
    assert "some/q.safetensors" in str(err.value) and "\n" not in str(err.value)


def test_wrong_shapes_are_refused() -> None:
    data = quantizer_to_bytes(make(0))
    with pytest.raises(QuantizerFileError, match="'centers' has shape"):
        quantizer_from_bytes(_rewrite(data, {"centers": torch.zeros(2, 16, 15)}))
    with pytest.raises(QuantizerFileError, match="format 99"):
        quantizer_from_bytes(_rewrite(data, format_version=99))


def test_state_round_trip_keeps_types() -> None:
    state = {
        "step": 7,
        "by_int": {0: {"m": torch.arange(3.0)}, 1: {"m": torch.ones(2, 2)}},
        "betas": (0.9, 0.98),
        "lr": [0.005, None],
        "scalar": torch.tensor(4.0),
        "name": "x",
    }
    back = state_from_bytes(state_to_bytes(state))
    assert back["step"] == 7 and back["betas"] == (0.9, 0.98) and back["lr"] == [0.005, None]
    assert set(back["by_int"]) == {0, 1}
    assert torch.equal(back["by_int"][1]["m"], torch.ones(2, 2))
    assert back["scalar"].shape == () and float(back["scalar"]) == 4.0


class _Payload:
    def __reduce__(self):  # what an unpickler would run
        return (print, ("payload ran",))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (pickle.dumps(_Payload()), "never as pickles"),
        (b"PK\x03\x04 a torch.save zip", "is not a safetensors file"),
        (quantizer_to_bytes(make(0)), "is a quantiser, not a spear training checkpoint"),
        (st_save({"x": torch.zeros(1)}), "not a spear training checkpoint"),
    ],
    ids=["pickle", "torch-zip", "quantizer", "foreign"],
)
def test_what_is_not_a_checkpoint(data: bytes, message: str, capsys) -> None:
    with pytest.raises(QuantizerFileError, match=message):
        state_from_bytes(data, "out/checkpoint.safetensors")
    assert "payload ran" not in capsys.readouterr().out


def _trainer(seed: int = 0) -> QuantizerTrainer:
    torch.manual_seed(seed)
    cfg = QuantizerTrainConfig(num_codebooks=2, codebook_size=16, phase_steps=4, batch_size=64)
    info = QuantizerInfo(dim=16, num_codebooks=2, codebook_size=16)
    return QuantizerTrainer(cfg, info, torch.device("cpu"))


def test_checkpoint_resumes_bit_exactly_across_the_phase_change() -> None:
    x = torch.from_numpy(mixture_of_low_rank_gaussians(64 * 8, 16, seed=3)).view(8, 64, 16)
    straight = _trainer()
    while not straight.done():
        straight.step(x[straight.step_count])
    for stop in (3, 5):  # before and after the merge into C codebooks of K entries
        first = _trainer()
        for i in range(stop):
            first.step(x[i])
        data = first.state_bytes({"note": "kept"})
        resumed = _trainer(seed=99)  # other initial weights: all of them come from the state
        assert resumed.load_state_bytes(data) == {"note": "kept"}
        assert resumed.step_count == stop
        while not resumed.done():
            resumed.step(x[resumed.step_count])
        assert resumed.quantizer.id == straight.quantizer.id
    other = _trainer()
    while not other.done():
        other.step(x[(other.step_count + 1) % 8])  # other batches: other weights, other id
    assert other.quantizer.id != straight.quantizer.id


def test_checkpoint_of_other_shapes_does_not_fit() -> None:
    small = _trainer().state_bytes()
    cfg = QuantizerTrainConfig(num_codebooks=4, codebook_size=16, phase_steps=4, batch_size=64)
    info = QuantizerInfo(dim=16, num_codebooks=4, codebook_size=16)
    big = QuantizerTrainer(cfg, info, torch.device("cpu"))
    fits = r"ck does not fit this training: .* 4 x 4; .* 8 x 4"
    with pytest.raises(QuantizerFileError, match=fits):
        big.load_state_bytes(small, "ck")
    broken = state_from_bytes(small)
    broken["trainer"]["model"].pop("centers")
    with pytest.raises(QuantizerFileError, match="does not fit this training"):
        _trainer().load_state_bytes(state_to_bytes(broken), "ck")


def test_a_quantiser_before_format_3_says_its_teacher_weights_are_unknown() -> None:
    q = make(0)
    q.info.teacher, q.info.layer, q.info.teacher_weights = "wavlm", 21, "random"
    data = quantizer_to_bytes(q)
    now = quantizer_from_bytes(data)
    assert now.info.teacher_weights == "random"
    assert now.info.trained_on() == "wavlm, layer 21, random weights"
    size = int.from_bytes(data[:8], "little")
    header = json.loads(json.loads(data[8 : 8 + size])["__metadata__"]["spear"])
    header.pop("teacher_weights")
    header["format_version"] = 2
    old = quantizer_from_bytes(st_save(st_load(data), metadata={"spear": json.dumps(header)}))
    assert old.id == q.id and old.info.teacher_weights == ""
    assert old.info.trained_on() == "wavlm, layer 21, unknown weights"
