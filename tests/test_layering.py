"""The layering holds: every library module, imported alone in a fresh interpreter, pulls in
nothing its layer must not depend on (docs/architecture.md has the rules and why).

Each module is imported in its own child process forked from a bare interpreter (one that has
imported only torch and numpy, which every layer below may use; the modules that must not use
torch get a parent without it), so one module's imports never hide another's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# layer (module prefix) -> what it must never import, at any depth.
RULES: dict[str, tuple[str, ...]] = {
    # A pure torch library: file I/O, Ray and the config live with its callers.
    "spear.quantizer": (
        "fsspec",
        "s3fs",
        "ray",
        "pyarrow",
        "spear.storage",
        "spear.config",
        "spear.pipeline",
        "spear.stages",
        "spear.student",
        "spear.shards",
        "spear.cli",
    ),
    # Stage cores: no job, no student, no CLI.
    "spear.stages": ("ray", "spear.pipeline", "spear.student", "spear.cli", "spear.config"),
    # The student reads shards through the contract and knows no teacher.
    "spear.student": (
        "spear.stages.teachers",
        "spear.stages.wavlm",
        "spear.stages.dasheng",
        "spear.stages.tokenize",
        "spear.config",
        "spear.pipeline",
        "spear.cli",
    ),
    # The token shard contract depends on the formats and storage only.
    "spear.shards": (
        "ray",
        "spear.stages",
        "spear.pipeline",
        "spear.student",
        "spear.config",
        "spear.cli",
        "spear.quantizer",
    ),
    "spear.report": ("ray", "torch", "spear.pipeline", "spear.stages", "spear.student"),
}
# Foundations everything imports: light, no torch, no Ray, no spear layer above them.
FOUNDATIONS = (
    "spear.errors",
    "spear.formats",
    "spear.storage",
    "spear.configio",
    "spear.credentials",
)
FOUNDATION_BANS = (
    "torch",
    "ray",
    "spear.stages",
    "spear.pipeline",
    "spear.student",
    "spear.shards",
    "spear.quantizer",
    "spear.config",
    "spear.cli",
)

_CHILD = r"""
import json, os, sys
preload = sys.argv[1].split(",") if sys.argv[1] else []
for m in preload:
    __import__(m)
base = set(sys.modules)
out = {}
for line in sys.stdin:
    name = line.strip()
    if not name:
        continue
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            __import__(name)
            msg = json.dumps(sorted(set(sys.modules) - base))
        except BaseException as err:
            msg = json.dumps({"error": f"{type(err).__name__}: {err}"})
        os.write(w, msg.encode())
        os._exit(0)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 1 << 16)
        if not b:
            break
        chunks.append(b)
    os.waitpid(pid, 0)
    out[name] = json.loads(b"".join(chunks))
print(json.dumps(out))
"""


def modules_of(prefix: str) -> list[str]:
    """Every module of package ``prefix`` (``spear.x``), from the files on disk."""
    short = prefix.split(".")[1]
    pkg = ROOT / short if (ROOT / short).is_dir() else ROOT / "spear" / short
    names = []
    for f in sorted(pkg.rglob("*.py")):
        parts = [p for p in f.relative_to(pkg).with_suffix("").parts if p != "__init__"]
        names.append(".".join([prefix, *parts]))
    return names


def imports_of(names: list[str], preload: str) -> dict[str, object]:
    run = subprocess.run(
        [sys.executable, "-c", _CHILD, preload],
        input="\n".join(names),
        capture_output=True,
        text=True,
        timeout=600,
        cwd="/",  # not the repository root: `import stages` must not resolve there
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return dict(json.loads(run.stdout.strip().splitlines()[-1]))


def offenders(mods: object, banned: tuple[str, ...]) -> list[str]:
    assert isinstance(mods, list), f"the import failed: {mods}"
    return sorted(m for m in mods if any(m == b or m.startswith(b + ".") for b in banned))


@pytest.fixture(scope="module")
def layered() -> dict[str, object]:
    names = [m for prefix in RULES for m in modules_of(prefix)]
    torch_free = [m for m in names if m.startswith("spear.report")]
    got = imports_of([m for m in names if m not in torch_free], "numpy,torch")
    got |= imports_of(torch_free + list(FOUNDATIONS), "numpy")
    return got


@pytest.mark.parametrize("layer", sorted(RULES))
def test_layer_imports_nothing_forbidden(layer: str, layered: dict[str, object]) -> None:
    names = modules_of(layer)
    assert len(names) >= 3, f"found no modules of {layer}"
    problems = {n: offenders(layered[n], RULES[layer]) for n in names}
    assert {n: p for n, p in problems.items() if p} == {}


def test_foundations_are_light(layered: dict[str, object]) -> None:
    problems = {n: offenders(layered[n], FOUNDATION_BANS) for n in FOUNDATIONS}
    assert {n: p for n, p in problems.items() if p} == {}


def test_quantizer_inference_does_not_import_the_trainer(tmp_path: Path) -> None:
    code = f"""
import json, sys
from spear.checkpoints import load_quantizer
from spear.quantizer.mvq import Quantizer, QuantizerInfo
from spear.quantizer.serial import quantizer_to_bytes
import spear.stages.tokenize
from spear.storage import StorageConfig
path = {str(tmp_path / "q.safetensors")!r}
q = Quantizer(QuantizerInfo(dim=8, num_codebooks=2, codebook_size=4))
open(path, "wb").write(quantizer_to_bytes(q))
assert load_quantizer(path, StorageConfig()).id == q.id
print(json.dumps(sorted(sys.modules)))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    mods = json.loads(run.stdout.strip().splitlines()[-1])
    assert "spear.stages.tokenize" in mods
    training = ("spear.quantizer.train", "spear.quantizer.data", "spear.pipeline")
    assert offenders(mods, training) == []


@pytest.mark.parametrize("folder", ["pipeline", "stages", "quantizer", "student"])
def test_top_level_folders_cannot_shadow_the_spear_modules(folder: str) -> None:
    """From the repository root ``import stages.decode`` would load a second copy of
    ``spear.stages.decode`` (other classes, other module state): it is refused."""
    code = f"import {folder}"
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert run.returncode != 0 and f"import spear.{folder}, not {folder}" in run.stderr
    ok = subprocess.run([sys.executable, "-c", f"import spear.{folder}"], cwd=ROOT, timeout=120)
    assert ok.returncode == 0
