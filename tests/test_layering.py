"""The layering holds: every import of every library module (``import x`` and ``from x import
y``, at module level and inside functions, relative ones resolved) obeys the rules of
docs/architecture.md, read from the source with ``ast``; every rule is shown to catch a planted
violation. One subprocess check adds what ``ast`` cannot see: the third-party packages a layer
must not pull in at import time, at any depth.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("pipeline", "stages", "quantizer", "student")
"""Top-level folders that ``spear/<folder>`` links to: imported only as ``spear.<folder>``."""


@dataclass(frozen=True)
class Layer:
    name: str
    members: tuple[str, ...]
    """Module names or packages (``spear.x`` covers ``spear.x.*``; ``spear`` alone is the
    package's ``__init__``). A module belongs to the layer with its longest matching member."""
    may: tuple[str, ...]
    """The only spear modules (or packages) it may import, anywhere in the file."""
    never: tuple[str, ...] = ()
    """Modules it must not import anywhere (third-party, or a part of an allowed package)."""
    never_at_import: tuple[str, ...] = ()
    """Modules it must not import at module level (inside a function is fine)."""
    at_import: tuple[str, ...] | None = None
    """When set, the only spear modules it may import at module level."""


FOUNDATIONS = (
    "spear",
    "spear.errors",
    "spear.formats",
    "spear.storage",
    "spear.configio",
    "spear.credentials",
    "spear.commit",
    "spear.units",
    "spear.record",
)
TOOLS = (
    "spear.console",
    "spear.plan",
    "spear.rates",
    "spear.ray_utils",
    "spear.synth",
    "spear.testing",
    "spear.submit",
    "spear.lhotse_export",
    "spear.hear",
    "spear.s3prl",
    "spear.probe",
)
BOXES = ("spear.quantizer", "spear.checkpoints", "spear.shards", "spear.stages", "spear.student")
TRAINER = ("spear.quantizer.train", "spear.quantizer.data")
TEACHERS = ("spear.stages.teachers", "spear.stages.tokenize")
"""The teacher package (registry, architectures, weights) and the actor that runs one."""

# Bottom to top; docs/architecture.md "Layering" states the same rules in words.
LAYERS = (
    Layer("foundations", FOUNDATIONS, may=FOUNDATIONS, never=("torch", "ray")),
    # The package's own __init__ is in "foundations" (exact name only).
    Layer(
        "quantizer",
        ("spear.quantizer",),
        may=("spear.errors", "spear.quantizer"),
        never=("fsspec", "s3fs", "ray", "pyarrow"),
    ),
    # Generic fetching: it knows no model and no quantiser (those load in stages/).
    Layer("checkpoints", ("spear.checkpoints",), may=FOUNDATIONS, never=("ray",)),
    Layer(
        "shards",
        ("spear.shards",),
        may=(*FOUNDATIONS, "spear.shards"),
        never_at_import=("ray",),  # the Ray Data reader imports it when called
    ),
    Layer(
        "stages",
        ("spear.stages",),
        may=(*FOUNDATIONS, "spear.quantizer", "spear.checkpoints", "spear.shards", "spear.stages"),
        never=TRAINER,
        never_at_import=("ray",),
    ),
    Layer(
        "student",
        ("spear.student",),
        may=(*FOUNDATIONS, "spear.checkpoints", "spear.shards", "spear.stages", "spear.student"),
        never=TEACHERS,
    ),
    Layer(
        "report",
        ("spear.report",),
        may=(*FOUNDATIONS, "spear.shards", "spear.report"),
        never=("ray", "torch"),
    ),
    Layer("tools", TOOLS, may=(*FOUNDATIONS, *BOXES, *TOOLS, "spear.report")),
    Layer("job settings", ("spear.pipeline.settings",), may=FOUNDATIONS),
    Layer(
        "config",
        ("spear.config",),
        may=(*FOUNDATIONS, *BOXES, *TOOLS, "spear.pipeline.settings"),
    ),
    Layer(
        "pipeline",
        ("spear.pipeline",),
        may=(*FOUNDATIONS, *BOXES, *TOOLS, "spear.report", "spear.pipeline"),
    ),
    Layer(
        "cli",
        ("spear.cli",),
        may=("spear", "spear."),  # everything, inside its commands
        at_import=(*FOUNDATIONS, "spear.cli", "spear.config", "spear.console", "spear.plan"),
    ),
)


def _under(name: str, prefix: str) -> bool:
    if prefix.endswith("."):
        return name.startswith(prefix)
    return name == prefix or (prefix != "spear" and name.startswith(prefix + "."))


def library_modules() -> dict[str, Path]:
    """Every library module by its ``spear.*`` name; the linked folders walked once, as their
    real top-level folders."""
    out: dict[str, Path] = {}
    for top, prefix in [("spear", "spear"), *((f, f"spear.{f}") for f in FOLDERS)]:
        base = ROOT / top
        for f in sorted(base.rglob("*.py")):
            rel = f.relative_to(base)
            if top == "spear" and rel.parts[0] in FOLDERS:
                continue  # the symlinks: the same files as the top-level folders
            parts = [p for p in rel.with_suffix("").parts if p != "__init__"]
            out[".".join([prefix, *parts])] = f
    return out


@dataclass(frozen=True)
class Edge:
    target: str
    line: int
    at_import: bool
    """Module level (run when the module is imported), not inside a function."""


def imports_in(name: str, source: str, is_package: bool, known: set[str]) -> list[Edge]:
    """Every import in ``source`` (module ``name``), relative ones resolved; ``from P import
    n`` names ``P.n`` when that is a module."""
    tree = ast.parse(source)
    in_function: set[int] = set()  # and under ``if TYPE_CHECKING:``: not run on import either
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or (
            isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        ):
            in_function |= {id(n) for n in ast.walk(node) if n is not node}
    edges = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = name.split(".") if is_package else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join([*pkg, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        else:
            continue
        for t in dict.fromkeys(targets):
            edges.append(Edge(t, node.lineno, id(node) not in in_function))
    return edges


def layer_of(name: str) -> Layer | None:
    best: tuple[int, Layer] | None = None
    for layer in LAYERS:
        for m in layer.members:
            if _under(name, m) and (best is None or len(m) > best[0]):
                best = (len(m), layer)
    return best[1] if best else None


def check(name: str, source: str, *, is_package: bool = False, known: set[str]) -> list[str]:
    """The layering problems of module ``name`` with ``source``: one line each."""
    layer = layer_of(name)
    if layer is None:
        return [f"{name}: in no layer"]
    problems = []
    for e in imports_in(name, source, is_package, known):
        where = f"{name}:{e.line} imports {e.target}"
        internal = e.target == "spear" or e.target.startswith("spear.")
        if internal and not any(_under(e.target, p) for p in layer.may):
            problems.append(f"{where}: {layer.name} may not import it")
        elif any(_under(e.target, p) for p in layer.never):
            problems.append(f"{where}: {layer.name} must never import it")
        elif e.at_import and any(_under(e.target, p) for p in layer.never_at_import):
            problems.append(f"{where}: {layer.name} must not import it at module level")
        elif (
            e.at_import
            and internal
            and layer.at_import is not None
            and not any(_under(e.target, p) for p in layer.at_import)
        ):
            problems.append(f"{where}: {layer.name} imports it only inside a function")
    return problems


MODULES = library_modules()
KNOWN = set(MODULES)


def test_every_library_module_is_found_and_in_a_layer() -> None:
    for folder in FOLDERS:
        assert (ROOT / "spear" / folder).resolve() == (ROOT / folder).resolve()
    packages = ("pipeline", "stages", "quantizer", "student", "shards", "cli", "report", "formats")
    for name in packages:
        assert sum(_under(m, f"spear.{name}") for m in MODULES) >= 3, name
    assert {"spear", "spear.config", "spear.plan", "spear.cli.main"} <= KNOWN
    assert [m for m in MODULES if layer_of(m) is None] == []
    formats = [m for m in MODULES if _under(m, "spear.formats")]
    assert {layer_of(m).name for m in formats} == {"foundations"}  # type: ignore[union-attr]
    assert {layer_of(m).name for m in MODULES} == {x.name for x in LAYERS}  # type: ignore[union-attr]


def test_no_module_imports_against_the_layers() -> None:
    problems = []
    for name, path in MODULES.items():
        is_pkg = path.name == "__init__.py"
        problems += check(name, path.read_text(), is_package=is_pkg, known=KNOWN)
    assert problems == []


def test_the_parser_sees_every_kind_of_import() -> None:
    src = (
        "import spear.errors\n"
        "from spear import formats\n"
        "from . import sibling\n"
        "from ..shards.schema import X\n"
        "def f():\n"
        "    import ray\n"
        "    from spear.pipeline import job\n"
        "class C:\n"
        "    def m(self):\n"
        "        from .. import config\n"
    )
    known = {"spear.formats", "spear.stages.sibling", "spear.pipeline.job", "spear.config"}
    got = [(e.target, e.at_import) for e in imports_in("spear.stages.x", src, False, known)]
    assert got == [
        ("spear.errors", True),
        ("spear.formats", True),
        ("spear.stages.sibling", True),
        ("spear.shards.schema", True),
        ("ray", False),
        ("spear.pipeline.job", False),
        ("spear.config", False),
    ]
    pkg = imports_in("spear.shards", "from .index import open_run\n", True, KNOWN)
    assert [e.target for e in pkg] == ["spear.shards.index"]


# (module, an import its layer forbids): one per rule of docs/architecture.md.
PLANTED = [
    ("spear.quantizer.mvq", "spear.storage"),  # quantizer: torch, numpy, safetensors only
    ("spear.quantizer.mvq", "fsspec"),
    ("spear.quantizer.mvq", "spear.config"),
    ("spear.checkpoints", "spear.quantizer.train"),  # checkpoints: generic, foundations only
    ("spear.checkpoints", "spear.quantizer.serial"),
    ("spear.checkpoints", "spear.stages.teachers.weights"),
    ("spear.stages.tokenize", "spear.quantizer.train"),  # inference never imports the trainer
    ("spear.stages.quantizers", "spear.quantizer.train"),
    ("spear.stages.decode", "spear.pipeline.job"),  # stages: no job, student, CLI, config
    ("spear.stages.decode", "spear.student.model"),
    ("spear.stages.decode", "spear.cli.main"),
    ("spear.stages.decode", "spear.config"),
    ("spear.student.data", "spear.stages.teachers"),  # student: no teacher, config or job
    ("spear.student.data", "spear.stages.tokenize"),
    ("spear.student.data", "spear.stages.teachers.weights"),
    ("spear.student.data", "spear.config"),
    ("spear.student.data", "spear.pipeline.job"),
    ("spear.shards.index", "spear.stages.decode"),  # shards: formats and storage only
    ("spear.shards.index", "spear.student.model"),
    ("spear.errors", "torch"),  # foundations: no torch, no Ray, nothing above them
    ("spear.storage", "ray"),
    ("spear.formats", "spear.shards.schema"),
    ("spear.formats.embeddings", "spear.pipeline.quantize"),  # a format owes nothing to a job
    ("spear.formats.manifest", "spear.pipeline.manifest"),
    ("spear.formats.audio", "torch"),
    ("spear.configio", "spear.config"),
    ("spear.report.load", "torch"),  # report: no torch, Ray, job, stage or student
    ("spear.report.load", "spear.pipeline.job"),
    ("spear.console", "spear.pipeline.progress"),  # tools: no job, config or CLI
    ("spear.plan", "spear.pipeline.job"),
    ("spear.testing", "spear.pipeline.commit"),
    ("spear.pipeline.settings", "spear.pipeline.job"),  # job settings: foundations only
    ("spear.config", "spear.pipeline.job"),  # config: the sections, no job, no CLI
    ("spear.config", "spear.cli.common"),
    ("spear.pipeline.demo", "spear.config"),  # jobs take their sections, never the config
    ("spear.pipeline.job", "spear.cli.main"),
]


@pytest.mark.parametrize(("module", "banned"), PLANTED)
@pytest.mark.parametrize("inside", [False, True], ids=["module-level", "in-function"])
def test_a_planted_violation_is_reported(module: str, banned: str, inside: bool) -> None:
    path = MODULES[module]
    source = path.read_text()
    is_pkg = path.name == "__init__.py"
    assert check(module, source, is_package=is_pkg, known=KNOWN) == []
    line = f"import {banned}\n"
    planted = source + (f"\n\ndef _planted():\n    {line}" if inside else f"\n{line}")
    problems = check(module, planted, is_package=is_pkg, known=KNOWN | {banned})
    assert len(problems) == 1 and f"imports {banned}:" in problems[0], problems


@pytest.mark.parametrize("inside", [False, True], ids=["module-level", "in-function"])
def test_a_planted_relative_import_is_reported(inside: bool) -> None:
    line = "from ..pipeline import job\n"  # from spear.stages.decode
    src = f"def f():\n    {line}" if inside else line
    assert check("spear.stages.decode", src, known=KNOWN) != []


@pytest.mark.parametrize("module", ["spear.stages.decode", "spear.shards.dataset"])
def test_stages_and_shards_import_ray_only_inside_functions(module: str) -> None:
    ok = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import ray.data\n"
    ok += "def f():\n    import ray.data\n"
    assert check(module, ok, known=KNOWN) == []
    assert check(module, "import ray.data\n", known=KNOWN) != []


def test_the_cli_imports_the_library_inside_its_commands() -> None:
    ok = "from spear.cli.common import resolve\ndef cmd():\n    from spear.pipeline import job\n"
    assert check("spear.cli.embed", ok, known=KNOWN) == []
    bad = "from spear.pipeline.job import run_units\n"
    assert check("spear.cli.embed", bad, known=KNOWN) != []


def test_a_module_in_no_layer_is_reported() -> None:
    assert check("spear.newthing", "", known=KNOWN) == ["spear.newthing: in no layer"]


# ---------------------------------------------------------------------------------------------
# What ast cannot see: third-party packages pulled in at import time, at any depth.

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


def imports_at_runtime(names: list[str], preload: str) -> dict[str, object]:
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
    return sorted(m for m in mods if any(_under(m, b) for b in banned))


def test_no_layer_pulls_in_a_banned_package_at_import_time() -> None:
    """Each module imported alone in a child forked from a bare interpreter (torch and numpy
    preloaded, except for the layers that must not use torch)."""
    third = {
        x.name: tuple(b for b in (*x.never, *x.never_at_import) if not b.startswith("spear."))
        for x in LAYERS
    }
    names = [m for m in MODULES if third[layer_of(m).name]]  # type: ignore[union-attr]
    torch_free = [m for m in names if "torch" in third[layer_of(m).name]]  # type: ignore[union-attr]
    got = imports_at_runtime([m for m in names if m not in torch_free], "numpy,torch")
    got |= imports_at_runtime(torch_free, "numpy")
    problems = {n: offenders(got[n], third[layer_of(n).name]) for n in names}  # type: ignore[union-attr]
    assert {n: p for n, p in problems.items() if p} == {}


def test_quantizer_inference_does_not_import_the_trainer(tmp_path: Path) -> None:
    code = f"""
import json, sys
from spear.stages.quantizers import load_quantizer
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
    training = (*TRAINER, "spear.pipeline")
    assert offenders(mods, training) == []


@pytest.mark.parametrize("folder", FOLDERS)
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
