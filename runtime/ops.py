"""The ONNX Runtime library of `rewrite::LoraDelta` (runtime/csrc: C++ CPU kernel, CUDA kernel), built on first use.

* `library_path()` — the CPU custom-op library, built into build/lora and rebuilt when its sources change.
* `session_options_with_library()` — an `ort.SessionOptions` with that library registered.

The op's contract, torch op and ONNX schema live with the exporter (`rewrite.export.lora_delta_op`); the
serving side needs only this file, without torch.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path

from rewrite.errors import RewriteError

CSRC = Path(__file__).resolve().parent / "csrc"
_BUILD_SCRIPT = CSRC / "build.sh"
_LIB_PREFIX = "librewrite_lora-"
_build_lock = threading.Lock()


class LoraLibraryError(RewriteError):
    """The LoraDelta library cannot be built (no compiler, no ONNX Runtime headers, compile error)."""


class LoraHeadersUnavailable(LoraLibraryError):
    """The ONNX Runtime headers could not be found or fetched (offline and no ORT_INCLUDE_DIR)."""


def build_dir() -> Path:
    """Where the library is built: $REWRITE_BUILD_DIR, else <repo>/build/lora (git-ignored) in a source
    checkout, else the user's cache ($XDG_CACHE_HOME or ~/.cache)/rewrite/lora for an installed package."""
    env = os.environ.get("REWRITE_BUILD_DIR")
    if env:
        return Path(env) / "lora"
    repo = CSRC.parents[1]
    if (repo / "pyproject.toml").is_file():
        return repo / "build" / "lora"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "rewrite" / "lora"


def _digest() -> str:
    h = hashlib.sha256()
    for f in sorted(CSRC.iterdir()):
        if f.is_file() and f.suffix in {".h", ".cc", ".inc", ".map", ".sh"}:
            h.update(f.name.encode())
            h.update(f.read_bytes())
    for var in ("CXX", "ORT_INCLUDE_DIR"):
        h.update(f"{var}={os.environ.get(var, '')}".encode())
    return h.hexdigest()[:12]


def library_path(build: bool = True) -> Path:
    """Path of the CPU custom-op library, built (once per source digest) when missing and `build` is true.

    Raises LoraHeadersUnavailable when the ONNX Runtime headers cannot be had (set ORT_INCLUDE_DIR),
    LoraLibraryError for a missing compiler or a failed compile, or when `build` is false and nothing is built.
    """
    out = build_dir()
    path = out / f"{_LIB_PREFIX}{_digest()}.so"
    if path.is_file():
        return path
    if not build:
        raise LoraLibraryError(f"the LoraDelta library is not built ({path}); call library_path(build=True)")
    if shutil.which("bash") is None:
        raise LoraLibraryError("building the LoraDelta library needs bash")
    out.mkdir(parents=True, exist_ok=True)
    with _build_lock, open(out / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time across processes (pytest-xdist, parallel runs)
        if path.is_file():
            return path
        proc = subprocess.run(
            ["bash", str(_BUILD_SCRIPT), "--lib", str(path)], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0 or not path.is_file():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            if proc.returncode == 3:
                raise LoraHeadersUnavailable(
                    "cannot build the LoraDelta library: no ONNX Runtime headers (set ORT_INCLUDE_DIR to a folder "
                    f"holding onnxruntime_cxx_api.h and onnxruntime_lite_custom_op.h)\n{tail}"
                )
            if proc.returncode == 4:
                raise LoraLibraryError(f"cannot build the LoraDelta library: no compiler\n{tail}")
            raise LoraLibraryError(f"building the LoraDelta library failed (exit {proc.returncode}):\n{tail}")
        for old in out.glob(f"{_LIB_PREFIX}*.so"):  # stale builds (a loaded copy stays mapped in its process)
            if old != path:
                old.unlink(missing_ok=True)
    return path


def session_options_with_library(options=None, build: bool = True):
    """An `onnxruntime.SessionOptions` (the given one, or a new one) with the LoraDelta library registered."""
    import onnxruntime as ort

    so = options if options is not None else ort.SessionOptions()
    so.register_custom_ops_library(str(library_path(build=build)))
    return so
