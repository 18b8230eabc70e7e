"""The package layout the project promises: the runtime depends on nothing built on it, tools use
only its public names, and installing puts nothing but `edge_vlm` into site-packages."""

from __future__ import annotations

import ast
import dataclasses
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from edge_vlm.run_spec import RunSpec

ROOT = Path(__file__).resolve().parents[2]
TOOLS = {"apps": "edge_vlm.apps", "quantize": "edge_vlm.quantize", "benchmarks": "edge_vlm.benchmarks"}


def python_files(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in TOOLS:
        parts = TOOLS[parts[0]].split(".") + parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(absolute module, imported names, line) for every import statement, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[:len(up) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found.append((base, [a.name for a in node.names], node.lineno))
    return found


def test_the_runtime_imports_nothing_built_on_it():
    banned = ("edge_vlm.apps", "edge_vlm.quantize", "edge_vlm.benchmarks", "apps", "quantize", "benchmarks",
              "tests", "PySide6")
    bad = [f"{p.relative_to(ROOT)}:{line} imports {mod}" for p in python_files("edge_vlm")
           for mod, _, line in imports(p) if any(mod == b or mod.startswith(b + ".") for b in banned)]
    assert bad == []


def test_tools_use_only_public_names_of_the_runtime():
    bad = []
    for folder in ("apps", "quantize", "benchmarks"):
        for p in python_files(folder):
            for mod, names, line in imports(p):
                if not mod.startswith("edge_vlm") or any(mod.startswith(t) for t in TOOLS.values()):
                    continue
                private = [n for n in [*mod.split(".")[1:], *names] if n.startswith("_") and not n.endswith("__")]
                if private:
                    bad.append(f"{p.relative_to(ROOT)}:{line} uses {mod}: {', '.join(private)}")
    assert bad == []


def test_benchmarks_and_apps_never_import_tests():
    bad = [f"{p.relative_to(ROOT)}:{line}" for folder in ("apps", "quantize", "benchmarks", "edge_vlm")
           for p in python_files(folder) for mod, _, line in imports(p) if mod == "tests" or mod.startswith("tests.")]
    assert bad == []


def test_every_package_folder_is_listed_for_installation():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    assert config["package-dir"] == {v: k for k, v in TOOLS.items()}
    folders = {module_name(p) for folder in ("edge_vlm", *TOOLS) for p in (ROOT / folder).rglob("__init__.py")
               if "__pycache__" not in p.parts}
    assert listed == folders


@pytest.mark.slow
def test_the_wheel_holds_only_edge_vlm(tmp_path):
    # built from a copy of the project's files: an in-place build would leave build/ in the tree
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard"], capture_output=True,
                           text=True, check=True).stdout.split()
    src = tmp_path / "src"
    for name in files:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path), str(src)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("edge_vlm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"edge_vlm"}
    for sub in ("edge_vlm/apps/media/frame_sources.py", "edge_vlm/quantize/pipeline.py",
                "edge_vlm/benchmarks/shapes.py", "edge_vlm/session.py",
                "edge_vlm/apps/server/static/index.html", "edge_vlm/apps/server/static/app.js"):  # the chat page
        assert sub in names
    assert not any("aot_check" in n for n in names)  # a developer tool, not part of the runtime


# The runtime's floors, lowest first: a unit imports only from floors below its own (anywhere in a
# module, not only at its top), so the import graph has no cycle and data flows one way.
FLOORS = [
    ["edge_vlm.errors", "edge_vlm.version", "edge_vlm.cache", "edge_vlm.contracts"],
    ["edge_vlm.formats", "edge_vlm.text"],
    ["edge_vlm.imaging"],
    ["edge_vlm.models"],
    ["edge_vlm.backends", "edge_vlm.run_spec"],
    ["edge_vlm.generate", "edge_vlm.vlm", "edge_vlm.conversation"],
    ["edge_vlm.session", "edge_vlm.loading"],
    ["edge_vlm.cli"],
    ["edge_vlm"],
]
FLOOR = {unit: level for level, units in enumerate(FLOORS) for unit in units}
# optional dependencies (pyproject's extras): imported where they are used, inside functions, so the
# runtime imports without them
OPTIONAL = {"triton", "gguf", "llama_cpp", "onnx", "onnxruntime", "onnxscript", "llguidance", "PySide6",
            "fastapi", "uvicorn", "httpx", "transformers"}


def unit_of(module: str) -> str:
    """The floor unit a runtime module belongs to: its subpackage, else the module itself."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in FLOOR:
            return ".".join(parts[:n])
    raise KeyError(module)


def test_every_runtime_module_has_a_floor():
    assert [module_name(p) for p in python_files("edge_vlm") if _no_floor(module_name(p))] == []


def _no_floor(module: str) -> bool:
    try:
        unit_of(module)
    except KeyError:
        return True
    return False


def test_the_runtime_imports_only_from_lower_floors():
    bad = []
    for p in python_files("edge_vlm"):
        here = unit_of(module_name(p))
        for mod, names, line in imports(p):
            if not mod.startswith("edge_vlm"):
                continue
            targets = [mod] + [f"{mod}.{n}" for n in names]
            there = {unit_of(t) for t in targets if not _no_floor(t)} - {here}
            for unit in there:
                if FLOOR[unit] >= FLOOR[here]:
                    bad.append(f"{p.relative_to(ROOT)}:{line} ({here}, floor {FLOOR[here]}) imports {unit} "
                               f"(floor {FLOOR[unit]})")
    assert bad == []


def _top_level_modules(path: Path) -> set[str]:
    """Modules a file imports at its top level (relative ones resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lines = {n.lineno for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))}
    return {mod for mod, names, line in imports(path) if line in lines
            for mod in [mod, *(f"{mod}.{n}" for n in names)]}


def _needs_optional(module: str, files: dict[str, Path], seen: set[str]) -> bool:
    """Whether importing `module` imports an optional dependency (through runtime modules too)."""
    if module.split(".")[0] in OPTIONAL:
        return True
    if module in seen or module not in files:
        return False
    seen.add(module)
    return any(_needs_optional(m, files, seen) for m in _top_level_modules(files[module]))


def test_imports_inside_functions_are_only_of_optional_dependencies():
    """An import inside a function hides a dependency; it is kept only where the imported module
    needs an optional dependency (or is one), so that the runtime imports without it, or inside a
    `try` that reports whether it is installed (`edge-vlm doctor`)."""
    files = {module_name(p): p for p in python_files("edge_vlm")}
    bad = []
    for p in python_files("edge_vlm"):
        tree = ast.parse(p.read_text(encoding="utf-8"))
        top = {n.lineno for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))}
        probed = {n.lineno for t in ast.walk(tree) if isinstance(t, ast.Try) for s in t.body for n in ast.walk(s)
                  if isinstance(n, (ast.Import, ast.ImportFrom))}
        for mod, names, line in imports(p):
            if line in top or line in probed:
                continue
            if not any(_needs_optional(m, files, set()) for m in [mod, *(f"{mod}.{n}" for n in names)]):
                bad.append(f"{p.relative_to(ROOT)}:{line} imports {mod} inside a function")
    assert bad == []


def test_every_import_inside_a_function_says_why():
    """A comment on the import, or above its group of imports, names the optional dependency."""
    bad = []
    for p in python_files("edge_vlm"):
        lines = p.read_text(encoding="utf-8").splitlines()
        tree = ast.parse("\n".join(lines))
        top = {n.lineno for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))}
        inner = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and n.lineno not in top]
        spans = {line for n in inner for line in range(n.lineno, n.end_lineno + 1)}
        for n in inner:
            first = n.lineno
            while first - 1 in spans:
                first -= 1
            last = n.end_lineno
            while last + 1 in spans:
                last += 1
            group = lines[first - 1:last]
            if not lines[first - 2].strip().startswith("#") and not any("#" in text for text in group):
                bad.append(f"{p.relative_to(ROOT)}:{n.lineno}")
    assert bad == []


# How a model runs is decided at load (edge_vlm/run_spec.py) and passed to its constructor: these
# names are never assigned on another object after it is built (a changed setting is a new model:
# VisionLanguageModel.with_run / replace). A self-check `report` records the cache kind it checked.
RUN_SETTINGS = {f.name for f in dataclasses.fields(RunSpec)} | {
    "spec", "encoder", "kernel_report", "template", "image_cfg", "vision", "projector", "llm",
    "kv_cache_int8", "selfcheck_report", "torch_device"}


def test_no_run_setting_is_assigned_after_construction():
    bad = []
    for folder in ("edge_vlm", "apps", "quantize", "benchmarks", "jetson", "tests"):
        for p in python_files(folder):
            for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
                targets = node.targets if isinstance(node, ast.Assign) else \
                    [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
                for target in targets:
                    for t in target.elts if isinstance(target, ast.Tuple) else [target]:
                        if isinstance(t, ast.Attribute) and t.attr in RUN_SETTINGS and not (
                                isinstance(t.value, ast.Name) and t.value.id in ("self", "cls", "report")):
                            bad.append(f"{p.relative_to(ROOT)}:{node.lineno} sets {ast.unparse(t)}")
    assert bad == []
