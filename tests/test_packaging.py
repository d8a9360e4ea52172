"""The wheel built from the repo installs into a clean venv under one import root, `spear`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPED = ("pipeline", "stages", "quantizer", "student")


def _uv() -> str:
    uv = shutil.which("uv")
    if uv is None:
        pytest.fail("uv is not on PATH; the README's set-up installs it")
    return uv


def test_spear_links_point_at_the_top_level_folders() -> None:
    for name in MAPPED:
        link = ROOT / "spear" / name
        assert link.is_symlink() and link.resolve() == ROOT / name, name
        assert (ROOT / name / "__init__.py").is_file(), name


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [_uv(), "build", "--wheel", "-o", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (whl,) = out.glob("spear-*.whl")
    return whl


def test_wheel_has_one_import_root(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"spear", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    for name in MAPPED:
        # Real files (not links) of every mapped folder are inside.
        assert f"spear/{name}/__init__.py" in names
    assert "spear/stages/manifest.py" in names and "spear/pipeline/manifest.py" in names
    # `spear plan` reads the shipped rates from the package.
    assert any(n.startswith("spear/measured_rates/") and n.endswith(".json") for n in names)


def test_wheel_installs_into_a_clean_venv(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    uv = _uv()
    subprocess.run(
        [uv, "venv", "-q", "--python", sys.executable, str(venv)], check=True, timeout=120
    )
    # The lock's versions, so the clean install matches what the tests ran on.
    req = tmp_path / "req.txt"
    export = [uv, "export", "--frozen", "--no-dev", "--no-hashes", "--no-emit-project", "-q"]
    subprocess.run([*export, "--project", str(ROOT), "-o", str(req)], check=True, timeout=120)
    env = {**os.environ, "VIRTUAL_ENV": str(venv)}
    env.pop("PYTHONPATH", None)
    subprocess.run(
        [
            uv,
            "pip",
            "install",
            "-q",
            "--python",
            str(venv / "bin" / "python"),
            "-r",
            str(req),
            str(wheel),
        ],
        check=True,
        timeout=600,
        env=env,
    )
    r = subprocess.run(
        [str(venv / "bin" / "spear"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert "manifest" in r.stdout and "config" in r.stdout
    site = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import spear.stages.manifest as m, sysconfig; print(m.__file__); "
            "print(sysconfig.get_paths()['purelib'])",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    )
    file_, purelib = site.stdout.split()
    assert file_.startswith(purelib)  # the installed copy, not the checkout
    for name in MAPPED:
        assert not (Path(purelib) / name).exists(), f"generic top-level package {name!r}"
