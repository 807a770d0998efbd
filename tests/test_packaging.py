"""A normal (non-editable) install carries every module: the wheel is built and compared with the source tree.

The oracle is the file system: every `.py` file under rewrite/, passes/, export/, runtime/ must appear in the
wheel under its installed name (`passes/load.py` -> `rewrite/passes/load.py`), with the custom-op sources, and
no generic top-level package (`export`, `runtime`, `passes`, `tests`) may land in site-packages.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"rewrite": "rewrite", "passes": "rewrite/passes", "export": "rewrite/export", "runtime": "rewrite/runtime"}


def _expected() -> set[str]:
    out = set()
    for folder, installed in FOLDERS.items():
        for file in (ROOT / folder).rglob("*.py"):
            relative = file.relative_to(ROOT / folder).as_posix()
            if folder == "rewrite" and relative.split("/")[0] in ("passes", "export", "runtime"):
                continue
            out.add(f"{installed}/{relative}")
    out |= {f"rewrite/runtime/csrc/{f.name}" for f in (ROOT / "runtime" / "csrc").iterdir() if f.is_file()}
    return out


def test_wheel_holds_every_module_under_one_namespace(tmp_path):
    source = tmp_path / "src"  # a copy: setuptools leaves build/ beside the sources it builds
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__",
                                                                 "out"))
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                          "-q", "-w", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    wheel = next(tmp_path.glob("*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(_expected() - names)
    assert not missing, f"not in the wheel: {missing}"
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"rewrite"}
