"""`spear.quantizer` is a pure torch library, and inference never imports the trainer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

STORAGE_SIDE = ("fsspec", "s3fs", "ray", "pyarrow", "spear.storage", "spear.config")


def imported_after(code: str) -> set[str]:
    """Module names in sys.modules after running ``code`` in a fresh interpreter."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def offenders(mods: set[str], banned: tuple[str, ...]) -> list[str]:
    return sorted(m for m in mods if any(m == b or m.startswith(b + ".") for b in banned))


def test_the_library_imports_no_storage_ray_or_config() -> None:
    files = sorted(Path(__file__).parents[2].joinpath("quantizer").glob("*.py"))
    names = [f"spear.quantizer.{f.stem}" for f in files if f.stem != "__init__"]
    assert "spear.quantizer.train" in names and "spear.quantizer.serial" in names
    mods = imported_after("import " + ", ".join(names))
    assert set(names) <= mods  # the check ran on every module
    assert offenders(mods, STORAGE_SIDE) == []
    spear_mods = {m for m in mods if m.startswith("spear")}
    assert spear_mods <= {"spear", "spear.errors", *names, "spear.quantizer"}


def test_loading_for_inference_does_not_import_the_trainer(tmp_path: Path) -> None:
    # Save a quantiser, then load it the way the tokenize actors do, in a fresh interpreter.
    code = f"""
import torch
from spear.checkpoints import load_quantizer
from spear.quantizer.mvq import Quantizer, QuantizerInfo
from spear.quantizer.serial import quantizer_to_bytes
import spear.stages.tokenize
path = {str(tmp_path / "q.safetensors")!r}
q = Quantizer(QuantizerInfo(dim=8, num_codebooks=2, codebook_size=4))
open(path, "wb").write(quantizer_to_bytes(q))
from spear.storage import StorageConfig
assert load_quantizer(path, StorageConfig()).id == q.id
"""
    mods = imported_after(code)
    assert "spear.stages.tokenize" in mods and "spear.checkpoints" in mods
    training = ("spear.quantizer.train", "spear.quantizer.data", "spear.pipeline")
    assert offenders(mods, training) == []
