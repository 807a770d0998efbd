"""The ONNX Runtime library of `rewrite::LoraDelta` (runtime/csrc: C++ CPU kernel, CUDA kernel), built on first use.

* `library_path()` — the CPU custom-op library, built into build/lora and rebuilt when its sources change.
* `library_path(cuda=True)` — the CUDA build (`build.sh --cuda`: the CPU and the CUDA kernels in one library, for a
  session whose providers include "CUDAExecutionProvider"), built and cached the same way; it needs nvcc (the CUDA
  toolkit of onnxruntime-gpu's CUDA major).
* `session_options_with_library()` — an `ort.SessionOptions` with that library registered.

The op's contract, torch op and ONNX schema live with the exporter (`rewrite.export.lora_delta_op`); the
serving side needs only this file, without torch.
"""
from __future__ import annotations

import fcntl
import functools
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
_CUDA_LIB_PREFIX = "librewrite_lora_cuda-"
_build_lock = threading.Lock()


class LoraLibraryError(RewriteError):
    """The LoraDelta library cannot be built (no compiler, no ONNX Runtime headers, compile error)."""


class LoraHeadersUnavailable(LoraLibraryError):
    """The ONNX Runtime headers could not be found or fetched (offline and no ORT_INCLUDE_DIR)."""


class LoraCudaUnavailable(LoraLibraryError):
    """The CUDA build needs a CUDA toolkit that is not there (no nvcc, no libcudart_static.a)."""


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


def _digest(cuda: bool) -> str:
    """Hash of what the library is built from: sources, build scripts, compilers and their settings; for the CUDA
    build also the CUDA sources, toolkit settings and, when CUDA_ARCHS is unset, the GPUs build.sh adds targets for."""
    suffixes = {".h", ".cc", ".inc", ".map", ".sh"} | ({".cu"} if cuda else set())
    h = hashlib.sha256()
    for f in sorted(CSRC.iterdir()):
        if f.is_file() and f.suffix in suffixes:
            h.update(f.name.encode())
            h.update(f.read_bytes())
    for var in ("CXX", "ORT_INCLUDE_DIR", *(("NVCC", "CUDA_HOME", "CUDA_ARCHS") if cuda else ())):
        h.update(f"{var}={os.environ.get(var, '')}".encode())
    if cuda and not os.environ.get("CUDA_ARCHS"):
        h.update(_gpu_compute_caps().encode())
    return h.hexdigest()[:12]


@functools.cache
def _gpu_compute_caps() -> str:
    """The compute capabilities nvidia-smi lists ("" without nvidia-smi): build.sh adds them to its CUDA targets."""
    if shutil.which("nvidia-smi") is None:
        return ""
    proc = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                          capture_output=True, text=True, check=False)
    return " ".join(sorted(set(proc.stdout.split()))) if proc.returncode == 0 else ""


def library_path(build: bool = True, *, cuda: bool = False) -> Path:
    """Path of the custom-op library, built (once per source digest) when missing and `build` is true: the CPU
    library, or with `cuda` the CUDA build (CPU and CUDA kernels in one file, for sessions on the CUDA EP).

    Raises LoraHeadersUnavailable when the ONNX Runtime headers cannot be had (set ORT_INCLUDE_DIR),
    LoraCudaUnavailable when `cuda` and there is no CUDA toolkit (nvcc, libcudart_static.a), LoraLibraryError for a
    missing compiler or a failed compile, or when `build` is false and nothing is built.
    """
    out = build_dir()
    prefix = _CUDA_LIB_PREFIX if cuda else _LIB_PREFIX
    path = out / f"{prefix}{_digest(cuda)}.so"
    if path.is_file():
        return path
    what = "the CUDA LoraDelta library" if cuda else "the LoraDelta library"
    if not build:
        raise LoraLibraryError(f"{what} is not built ({path}); call library_path(build=True"
                               f"{', cuda=True' if cuda else ''})")
    if shutil.which("bash") is None:
        raise LoraLibraryError("building the LoraDelta library needs bash")
    out.mkdir(parents=True, exist_ok=True)
    with _build_lock, open(out / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time across processes (pytest-xdist, parallel runs)
        if path.is_file():
            return path
        command = ["bash", str(_BUILD_SCRIPT), "--lib", str(path), *(["--cuda"] if cuda else [])]
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not path.is_file():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            if proc.returncode == 3:
                raise LoraHeadersUnavailable(
                    f"cannot build {what}: no ONNX Runtime headers (set ORT_INCLUDE_DIR to a folder "
                    f"holding onnxruntime_cxx_api.h and onnxruntime_lite_custom_op.h)\n{tail}"
                )
            if proc.returncode == 4:
                raise LoraLibraryError(f"cannot build {what}: no C++ compiler (set CXX)\n{tail}")
            if proc.returncode == 5:
                raise LoraCudaUnavailable(
                    f"cannot build {what}: no CUDA toolkit (install nvcc of the CUDA major onnxruntime-gpu was built "
                    f"for, or set NVCC / CUDA_HOME; without it, run on providers=['CPUExecutionProvider'])\n{tail}"
                )
            raise LoraLibraryError(f"building {what} failed (exit {proc.returncode}):\n{tail}")
        for old in out.glob(f"{prefix}*.so"):  # stale builds (a loaded copy stays mapped in its process)
            if old != path:
                old.unlink(missing_ok=True)
    return path


def session_options_with_library(options=None, build: bool = True, *, cuda: bool = False):
    """An `onnxruntime.SessionOptions` (the given one, or a new one) with the LoraDelta library registered: the CUDA
    build with `cuda` (for sessions on "CUDAExecutionProvider"), the CPU one otherwise."""
    import onnxruntime as ort

    so = options if options is not None else ort.SessionOptions()
    so.register_custom_ops_library(str(library_path(build=build, cuda=cuda)))
    return so
