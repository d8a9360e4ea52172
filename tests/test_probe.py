"""spear probe: per-layer linear probes on labelled clips, for a student and a teacher."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from spear.cli.main import run
from spear.errors import SpearError
from spear.probe import ProbeConfig, linear_probe, read_labels, split
from spear.storage import StorageConfig
from spear.student.config import StudentConfig
from spear.student.model import Student


@pytest.fixture(autouse=True)
def _one_thread():  # type: ignore[no-untyped-def]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _clip(kind: str, seed: int, seconds: float = 1.0) -> np.ndarray:
    """Three sound classes: harmonic tones, white noise, rising chirps (varied per clip)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    if kind == "tone":
        f0 = rng.uniform(150, 400)
        x = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in (1, 2, 3))
    elif kind == "noise":
        x = rng.standard_normal(t.size)
    else:
        f0 = rng.uniform(500, 1500)
        x = np.sin(2 * np.pi * (f0 + 2000 * t) * t)
    x = x / np.abs(x).max() * rng.uniform(0.2, 0.6) + 0.01 * rng.standard_normal(t.size)
    return (x * 32767).astype(np.int16)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("probe")
    rows = []
    for kind in ("tone", "noise", "chirp"):
        for i in range(8):
            path = root / f"{kind}-{i}.wav"
            sf.write(path, _clip(kind, seed=100 * len(rows) + i), 16000, subtype="PCM_16")
            rows.append({"url": str(path), "sound": kind})
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["url", "sound"])
        w.writeheader()
        w.writerows(rows)
    return root / "labels.csv"


def test_split_is_stratified_and_seeded() -> None:
    labels = ["a"] * 8 + ["b"] * 4 + ["c"]
    train, test = split(labels, 0.25, seed=0)
    assert sorted([*train, *test]) == list(range(13))
    assert [labels[i] for i in test].count("a") == 2
    assert [labels[i] for i in test].count("b") == 1 and "c" not in [labels[i] for i in test]
    assert np.array_equal(split(labels, 0.25, seed=0)[1], test)
    assert not np.array_equal(split(labels, 0.25, seed=1)[1], test)


def test_linear_probe_learns_what_is_there_only() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    x = rng.standard_normal((120, 16))
    x_sep = x + 5.0 * np.eye(16)[y]  # class means 7 sigma apart
    cfg = ProbeConfig(steps=200)
    tr, te = split([str(v) for v in y], 0.25, 0)
    assert linear_probe(x_sep[tr], y[tr], x_sep[te], y[te], 3, cfg) > 0.95
    assert linear_probe(x[tr], y[tr], x[te], y[te], 3, cfg) < 0.7  # noise: near chance


def test_read_labels_refuses_a_table_without_labels(labelled: Path) -> None:
    with pytest.raises(SpearError, match="lack column"):
        read_labels(str(labelled), "speaker", StorageConfig())
    table = read_labels(str(labelled), "sound", StorageConfig())
    assert table.num_rows == 24 and table["start"].to_pylist()[0] == 0.0


def test_cli_probe_student_and_teacher(labelled: Path, tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    pt = tmp_path / "student.pt"
    Student(StudentConfig(preset="tiny")).save(str(pt))
    args = ["probe", "--labels", str(labelled), "--label-column", "sound", "--steps", "150"]
    assert run([*args, "--checkpoint", str(pt), "--json-out", str(tmp_path / "p.json")]) == 0
    text = capsys.readouterr().out
    assert "3 classes, 18 train / 6 held-out clips" in text
    result = json.loads((tmp_path / "p.json").read_text())
    assert list(result["accuracy"]) == [*map(str, range(7)), "out"]
    assert result["chance"] == pytest.approx(1 / 3)
    # Even random features separate tones, noise and chirps: the probes must find it.
    assert max(result["accuracy"].values()) >= 0.8
    assert run([*args, "--teacher", "wavlm-tiny"]) == 0
    text = capsys.readouterr().out
    assert "probe teacher wavlm-tiny" in text and "best: layer" in text
    assert run([*args]) == 2  # neither a student nor a teacher
    assert "exactly one of --checkpoint" in capsys.readouterr().err


def test_in_loop_probe_metrics_on_a_training_student(labelled: Path) -> None:
    from spear.probe import InLoopProbe

    cfg = ProbeConfig(label_column="sound", steps=150)
    probe = InLoopProbe(str(labelled), cfg, StorageConfig(), teacher="wavlm-tiny")
    assert len(probe.clips) == 24 and probe.teacher is not None
    torch.manual_seed(0)
    student = Student(StudentConfig(preset="tiny")).train()
    first = probe.metrics(student)
    assert student.training  # the probe restores the training mode
    assert [k for k in first if k.startswith("probe_") and k[6:].isdigit()] == [
        f"probe_{i}" for i in range(7)
    ]
    assert first["probe_chance"] == pytest.approx(1 / 3)
    assert first["probe_teacher"] == probe.teacher.best()[1]
    assert max(v for k, v in first.items() if k not in ("probe_chance", "probe_teacher")) >= 0.8
    # Same split, same budget, same weights: the same figures (the curves compare over steps).
    assert probe.metrics(student) == first
    with pytest.raises(SpearError, match="no clip held out"):  # one clip per class
        InLoopProbe(str(labelled), ProbeConfig(label_column="url"), StorageConfig())


# ------------------------------------------- speech from a synthesiser (Debian's espeak-ng)

TOOLS_REQUIRED = os.environ.get("SPEAR_REQUIRE_SYSTEM_TOOLS") == "1"
SENTENCES = {
    "en": [
        "good morning to you",
        "the weather is fine today",
        "where is the station",
        "I would like some water",
        "please open the window",
        "this is a short test",
        "we are going home now",
        "the train is late again",
    ],
    "de": [
        "guten Morgen",
        "das Wetter ist heute schön",
        "wo ist der Bahnhof",
        "ich möchte etwas Wasser",
        "bitte öffne das Fenster",
        "das ist ein kurzer Test",
        "wir gehen jetzt nach Hause",
        "der Zug ist wieder spät",
    ],
    "es": [
        "buenos días",
        "hoy hace buen tiempo",
        "dónde está la estación",
        "quisiera un poco de agua",
        "abre la ventana por favor",
        "esta es una prueba corta",
        "ahora vamos a casa",
        "el tren llega tarde otra vez",
    ],
}
VOICES = ("m1", "f2", "croak")  # espeak-ng voice variants: the "speakers"


@pytest.fixture(scope="module")
def espeak_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Clips of 3 languages x 8 sentences x 3 voices (espeak-ng), labelled with both."""
    if shutil.which("espeak-ng") is None:
        why = "espeak-ng is not installed: apt-get install espeak-ng to run the speech probes"
        if TOOLS_REQUIRED:
            pytest.fail(f"SPEAR_REQUIRE_SYSTEM_TOOLS=1 and {why}")
        pytest.skip(f"SPEECH PROBE TEST SKIPPED: {why}")
    root = tmp_path_factory.mktemp("espeak")
    rows = []
    for lang, texts in SENTENCES.items():
        for i, text in enumerate(texts):
            for voice in VOICES:
                path = root / f"{lang}-{voice}-{i}.wav"
                speed = str(150 + 10 * (i % 3))
                cmd = ["espeak-ng", "-v", f"{lang}+{voice}", "-s", speed, "-w", str(path), text]
                subprocess.run(cmd, check=True, capture_output=True)
                rows.append({"url": str(path), "language": lang, "speaker": voice})
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["url", "language", "speaker"])
        w.writeheader()
        w.writerows(rows)
    return root / "labels.csv"


def test_language_and_speaker_probes_on_synthesised_speech(espeak_set: Path) -> None:
    from spear.probe import run_probe, student_pool, teacher_pool

    storage = StorageConfig()
    torch.manual_seed(0)
    pt = espeak_set.parent / "student.pt"
    Student(StudentConfig(preset="tiny")).save(str(pt))
    student = student_pool(str(pt), storage)
    results = {}
    for column in ("speaker", "language"):
        cfg = ProbeConfig(label_column=column, steps=150)
        results[column] = result = run_probe(str(espeak_set), student, cfg, storage)
        assert result.train + result.test == 72 and len(result.classes) == 3
        assert result.chance == pytest.approx(1 / 3)
    # Measured 0.944 (voice) and 0.667 (language) held out with this seed's random tiny
    # student: a voice's pitch and timbre survive random features, a language less so.
    assert results["speaker"].best()[1] >= 0.8
    assert results["language"].best()[1] >= 0.5
    cfg = ProbeConfig(label_column="speaker", steps=150)
    teacher = run_probe(str(espeak_set), teacher_pool("wavlm-tiny", None, storage), cfg, storage)
    assert list(teacher.accuracy) == ["1", "2"] and teacher.test == 18
