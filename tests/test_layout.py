"""The package layout the project promises: the runtime depends on nothing built on it, tools use
only its public names, and installing puts nothing but `edge_vlm` into site-packages."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
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
                private = [n for n in [*mod.split(".")[1:], *names] if n.startswith("_") and n != "__future__"]
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
