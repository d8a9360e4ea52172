"""SPEAR's released layout in and out (spear.student.hf), against a fixture SPEAR's own code
computed (tools/make_spear_fixture.py: a tiny SPEAR-layout checkpoint with random weights, and
the reference's fbank, output and hidden states on fixed audio, each item alone)."""

from __future__ import annotations

import json
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from spear.cli.main import run
from spear.errors import SpearError
from spear.student.config import HeadConfig, StudentConfig
from spear.student.hf import PREFIX, export_spear, import_spear, spear_name
from spear.student.model import Student

FIXTURE = Path(__file__).parent / "data" / "spear_tiny"
TOL = 1e-5
UNUSED = re.compile(r"layers\.\d+\.bypass_scale$")


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "reference.npz") as z:
        return dict(z)


@pytest.fixture(scope="module")
def imported() -> Student:
    return Student.from_hf(str(FIXTURE))


def _items(ref: dict[str, np.ndarray]) -> list[int]:
    return sorted(int(k.split("_")[1]) for k in ref if k.startswith("audio_"))


def _check_against_reference(
    out: torch.Tensor, hidden: list[torch.Tensor], ref: dict[str, np.ndarray], i: int
) -> None:
    expected = ref[f"encoder_out_{i}"]
    assert out.shape == expected.shape
    np.testing.assert_allclose(out.numpy(), expected, atol=TOL, rtol=0)
    assert len(hidden) == int(ref[f"num_hidden_{i}"]) == 8
    for k, h in enumerate(hidden):
        np.testing.assert_allclose(h.numpy(), ref[f"hidden_{i}_{k}"], atol=TOL, rtol=0)


def test_import_matches_spear_reference_from_its_features(imported, ref) -> None:
    assert not imported.training
    for i in _items(ref):
        feats = torch.from_numpy(ref[f"fbank_{i}"])[None]
        with torch.no_grad():
            out, lengths, hidden = imported.encode(
                feats, torch.tensor([feats.shape[1]]), layers=True
            )
        assert int(lengths[0]) == out.shape[1] == (feats.shape[1] - 7) // 2
        _check_against_reference(out[0], [h[0] for h in hidden], ref, i)


def test_import_matches_spear_reference_from_raw_audio(imported, ref) -> None:
    # SPEAR's front end (lhotse's Fbank defaults: snip_edges=False, high_freq=-400) on the
    # fixture's audio; the lead switches this to the student's own front end when it is SPEAR's.
    lhotse = pytest.importorskip("lhotse")
    extractor = lhotse.Fbank(lhotse.FbankConfig(num_mel_bins=128))
    for i in _items(ref):
        audio = ref[f"audio_{i}"].astype(np.float32) / 32768.0
        feats = torch.as_tensor(np.asarray(extractor.extract(audio, sampling_rate=16000)))
        np.testing.assert_allclose(feats.numpy(), ref[f"fbank_{i}"], atol=1e-4, rtol=0)
        with torch.no_grad():
            out, _, hidden = imported.encode(
                feats[None], torch.tensor([feats.shape[0]]), layers=True
            )
        _check_against_reference(out[0], [h[0] for h in hidden], ref, i)


def test_padded_batch_equals_each_item_alone(imported, ref) -> None:
    items = _items(ref)
    feats = [torch.from_numpy(ref[f"fbank_{i}"]) for i in items]
    lengths = torch.tensor([f.shape[0] for f in feats])
    batch = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True, padding_value=-23.0)
    with torch.no_grad():
        out, out_len, hidden = imported.encode(batch, lengths, layers=True)
    for row, i in enumerate(items):
        n = int(out_len[row])
        assert n == ref[f"encoder_out_{i}"].shape[0]
        _check_against_reference(out[row, :n], [h[row, :n] for h in hidden], ref, i)
        assert torch.all(out[row, n:] == 0)


def test_export_import_round_trip_is_bit_identical(imported, tmp_path) -> None:
    config = export_spear(imported, str(tmp_path / "export"))
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    original = load_file(str(FIXTURE / "model.safetensors"))
    # The same keys as SPEAR's own folder (the unused per-layer scales included), same values.
    assert set(exported) == set(original)
    for k, v in original.items():
        if not UNUSED.search(k):  # icefall's unused per-layer scale: written back as 0.5
            assert torch.equal(exported[k], v.float()), k
    assert all(v.dtype == torch.float32 for v in exported.values())
    fixture_cfg = json.loads((FIXTURE / "config.json").read_text())
    for key in ("num_encoder_layers", "encoder_dim", "feedforward_dim", "num_heads", "pos_dim"):
        assert config[key] == fixture_cfg[key]
    again = import_spear(str(tmp_path / "export"))
    a = {k: v for k, v in imported.state_dict().items() if not k.startswith("heads.")}
    b = {k: v for k, v in again.state_dict().items() if not k.startswith("heads.")}
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.endswith("_extra_state"))


def test_export_to_fsspec_url_and_back(imported) -> None:
    url = f"memory://spear-hf-{uuid.uuid4().hex}/export"
    export_spear(imported, url)
    again = Student.from_hf(url)
    x = imported.state_dict()["encoder.stacks.3.layers.1.attn_weights.linear_pos.weight"]
    y = again.state_dict()["encoder.stacks.3.layers.1.attn_weights.linear_pos.weight"]
    assert torch.equal(x, y)


def test_imported_heads_are_new_and_configurable(imported) -> None:
    assert set(imported.heads) == {"wavlm", "dasheng"}
    heads = (HeadConfig(name="wavlm", num_codebooks=4),)
    other = Student.from_hf(str(FIXTURE), heads=heads)
    assert set(other.heads) == {"wavlm"}
    assert other.heads["wavlm"].proj.out_features == 4 * 256  # type: ignore[union-attr]
    enc_a = {k: v for k, v in imported.named_parameters() if k.startswith("encoder.")}
    enc_b = {k: v for k, v in other.named_parameters() if k.startswith("encoder.")}
    assert all(torch.equal(enc_a[k], enc_b[k]) for k in enc_a)


def test_linear_pos_permutation_is_needed(ref) -> None:
    """Without the column permutation the outputs are off: the test above is not vacuous."""
    student = Student.from_hf(str(FIXTURE))
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name.endswith("linear_pos.weight"):
                d = p.shape[1]
                perm = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])
                p.copy_(p[:, torch.argsort(perm)])  # back to icefall's column order
        feats = torch.from_numpy(ref["fbank_0"])[None]
        out, _ = student.encode(feats, torch.tensor([feats.shape[1]]))
    assert np.abs(out[0].numpy() - ref["encoder_out_0"]).max() > 100 * TOL


def _variant(tmp_path: Path, **changes: object) -> str:
    folder = tmp_path / uuid.uuid4().hex
    shutil.copytree(FIXTURE, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"causal": True}, "causal"),
        ({"output_downsampling_factor": 2}, "output_downsampling_factor 2"),
        ({"architectures": ["WavLMModel"]}, "not a SPEAR release"),
        ({"encoder_dim": "16,16,32,32,32,16,24"}, "has shape"),
        ({"num_encoder_layers": "1,1,1,3,1,1,1"}, "do not fit: missing"),
        ({"num_heads": "1,x"}, "not comma-separated integers"),
    ],
)
def test_refuses_what_spear_cannot_hold_in_one_line(tmp_path, changes, message) -> None:
    with pytest.raises(SpearError, match=message) as err:
        import_spear(_variant(tmp_path, **changes))
    assert "\n" not in str(err.value)


def test_export_refuses_layouts_spear_code_cannot_build() -> None:
    with pytest.raises(SpearError, match="head dims"):
        export_spear(Student(StudentConfig(preset="tiny")), "memory://never")


def test_names_map_one_to_one(imported) -> None:
    original = load_file(str(FIXTURE / "model.safetensors"))
    mapped = {spear_name(k.removeprefix(PREFIX)) for k in original}
    ours = {k for k in imported.state_dict() if not k.startswith("heads.")}
    ours = {k for k in ours if not k.endswith("_extra_state")}
    assert ours <= mapped
    assert len(ours) == len(original) - sum(1 for k in original if UNUSED.search(k)) == 379 - 8


def test_cli_import_and_export(tmp_path, ref, capsys) -> None:
    pt = tmp_path / "student.pt"
    assert run(["student", "import-hf", str(FIXTURE), "--out", str(pt)]) == 0
    assert "heads wavlm, dasheng are new" in capsys.readouterr().out
    student = Student.from_checkpoint(str(pt))
    assert not student.training
    feats = torch.from_numpy(ref["fbank_1"])[None]
    with torch.no_grad():
        out, _ = student.encode(feats, torch.tensor([feats.shape[1]]))
    np.testing.assert_allclose(out[0].numpy(), ref["encoder_out_1"], atol=TOL, rtol=0)
    out_dir = tmp_path / "hf"
    assert run(["student", "export-hf", str(pt), "--out", str(out_dir)]) == 0
    assert (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file()
    bad = tmp_path / "bad"
    assert run(["student", "import-hf", _variant(tmp_path, causal=True), "--out", str(bad)]) == 2
    assert "error:" in capsys.readouterr().err


def test_export_copies_spear_code_from_a_release_folder(imported, tmp_path) -> None:
    from spear.student.hf import SPEAR_CODE_FILES, copy_spear_code

    release = tmp_path / "release"
    release.mkdir()
    for name in SPEAR_CODE_FILES:  # stand-ins: the copy is byte for byte, whatever they hold
        (release / name).write_text(f"# {name}\n")
    out = tmp_path / "export"
    export_spear(imported, str(out))
    assert copy_spear_code(str(release), str(out)) == list(SPEAR_CODE_FILES)
    assert all((out / n).read_text() == f"# {n}\n" for n in SPEAR_CODE_FILES)
    (release / "zipformer.py").unlink()
    with pytest.raises(SpearError, match=r"lacks SPEAR's modeling code: zipformer\.py"):
        copy_spear_code(str(release), str(out))


def test_continued_pre_training_starts_new_heads(imported) -> None:
    heads = (HeadConfig(name="wavlm", num_codebooks=4),)
    torch.manual_seed(5)
    fresh = Student(StudentConfig(encoder=imported.encoder.cfg, heads=heads))
    before = fresh.heads["wavlm"].proj.weight.clone()  # type: ignore[union-attr]
    fresh.init_encoder_from(imported)
    ours = dict(fresh.named_parameters())
    for name, p in imported.named_parameters():
        if not name.startswith("heads."):
            assert torch.equal(ours[name], p), name
    assert torch.equal(fresh.heads["wavlm"].proj.weight, before)  # type: ignore[union-attr]
    with pytest.raises(SpearError, match="encoder differs"):
        Student(StudentConfig(preset="tiny")).init_encoder_from(imported)
