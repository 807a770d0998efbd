"""Imports point down the flow only (README "Layers"); the runtime stands beside the stack without torch.

Every module of the installed namespace is parsed with `ast`; each import (lazy ones inside functions too)
must name a module of the same layer or a lower one. The checker is tested on a planted upward import in a
temporary module tree, so this test cannot pass vacuously.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Folders of the repository and the package they install as (pyproject's package-dir).
PACKAGE_DIRS = {"rewrite": ROOT / "rewrite", "rewrite.passes": ROOT / "passes", "rewrite.export": ROOT / "export",
                "rewrite.runtime": ROOT / "runtime"}

# Lowest first. A module belongs to the layer of its longest listed prefix.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("errors", ("rewrite.errors",)),
    ("formats", ("rewrite.formats", "rewrite.options", "rewrite.names", "rewrite.finite", "rewrite.toml_locate",
                 "rewrite.factory", "rewrite.modes", "rewrite.progress")),
    ("ir", ("rewrite.load", "rewrite.pt2_archive", "rewrite.capture", "rewrite.bfloat16_islands",
            "rewrite.decoder", "rewrite.inputs", "rewrite.size_folding", "rewrite.complex_pairs",
            "rewrite.torch_failure",
            "rewrite.stamp", "rewrite.sites", "rewrite.graph_edit", "rewrite.state", "rewrite.data",
            "rewrite.tensors", "rewrite.distributed")),
    ("adapters", ("rewrite.adapters",)),
    ("analysis", ("rewrite.costmodel", "rewrite.scorers", "rewrite.solver", "rewrite.report", "rewrite.allocators",
                  "rewrite.train", "rewrite.planted", "rewrite.combine_methods", "rewrite.coupling",
                  "rewrite.prune_scorers")),
    ("passes", ("rewrite.pass_infra", "rewrite.passes")),
    ("export", ("rewrite.export",)),
    ("top", ("rewrite.spec", "rewrite.pipeline", "rewrite.publish", "rewrite.check", "rewrite.bundle", "rewrite.cli",
             "rewrite.console", "rewrite.plan", "rewrite.reference", "rewrite.streaming_merge",
             "rewrite.triton_config", "rewrite.triton_model", "rewrite.triton_readme", "rewrite.triton_repo")),
]
# The serving side: beside the stack, on these layers only.
RUNTIME = ("rewrite.runtime", ("errors", "formats"))


def layer_of(module: str, layers=LAYERS) -> str | None:
    if module == "rewrite":
        return layers[0][0]  # the package root only holds the version
    best, found = -1, None
    for name, prefixes in layers:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), name
    if module == RUNTIME[0] or module.startswith(RUNTIME[0] + "."):
        return "runtime"
    return found


def modules_in(package_dirs: dict[str, Path]) -> dict[str, Path]:
    """{dotted module name: file} for every .py file under the package folders."""
    out = {}
    for package, folder in package_dirs.items():
        for file in sorted(folder.rglob("*.py")):
            parts = [package, *file.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join(parts)
            if name.startswith(tuple(p + "." for p in package_dirs if p != package and p.startswith(package + "."))):
                continue  # a sibling folder mapped in (rewrite.passes) is walked under its own name
            out[name] = file
    return out


def _imports(module: str, file: Path) -> list[tuple[str, int]]:
    tree = ast.parse(file.read_text(), filename=str(file))
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from rewrite.x import y` may import the submodule rewrite.x.y
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return found


def _target(name: str, known: dict[str, Path]) -> str | None:
    """The module an imported name lands in (the longest known module that prefixes it)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def violations(package_dirs: dict[str, Path], layers=LAYERS, root: Path = ROOT) -> list[str]:
    known = modules_in(package_dirs)
    order = [name for name, _ in layers]
    problems = []
    for module, file in known.items():
        mine = layer_of(module, layers)
        where = f"{file.relative_to(root)}"
        if mine is None:
            problems.append(f"{where}: module {module} has no layer (add it to LAYERS in tests/test_layers.py)")
            continue
        for name, line in _imports(module, file):
            target = _target(name, known)
            if target is None or target == module:
                continue
            theirs = layer_of(target, layers)
            if mine == "runtime":
                bad = theirs != "runtime" and theirs not in RUNTIME[1]
            elif theirs == "runtime":
                bad = mine != "top"
            else:
                bad = theirs is not None and order.index(theirs) > order.index(mine)
            if bad:
                problems.append(f"{where}:{line}: {module} ({mine}) imports {target} ({theirs}), which is above it")
    return list(dict.fromkeys(problems))


def test_every_import_points_down():
    assert violations(PACKAGE_DIRS) == []


def test_the_checker_finds_a_planted_upward_import(tmp_path):
    (tmp_path / "rewrite").mkdir()
    (tmp_path / "rewrite" / "__init__.py").write_text("")
    (tmp_path / "rewrite" / "sites.py").write_text("import os\n\n\ndef f():\n    from rewrite.pipeline import apply\n")
    (tmp_path / "rewrite" / "pipeline.py").write_text("from rewrite import sites\n")
    (tmp_path / "runtime").mkdir()
    (tmp_path / "runtime" / "__init__.py").write_text("")
    (tmp_path / "runtime" / "session.py").write_text("from rewrite.sites import f\n")
    (tmp_path / "rewrite" / "mystery.py").write_text("")
    dirs = {"rewrite": tmp_path / "rewrite", "rewrite.runtime": tmp_path / "runtime"}
    found = violations(dirs, root=tmp_path)
    assert sorted(found) == sorted([
        "rewrite/sites.py:5: rewrite.sites (ir) imports rewrite.pipeline (top), which is above it",
        "runtime/session.py:1: rewrite.runtime.session (runtime) imports rewrite.sites (ir), which is above it",
        "rewrite/mystery.py: module rewrite.mystery has no layer (add it to LAYERS in tests/test_layers.py)",
    ])


@pytest.mark.parametrize("module", ["rewrite.runtime.session", "rewrite.runtime", "rewrite.formats"])
def test_serving_side_loads_without_torch_or_the_compiler(module):
    code = (f"import sys, {module}; bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(("
            "'rewrite.passes', 'rewrite.export', 'rewrite.capture', 'transformers'))); print(bad)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
