"""Which ONNX Runtime execution providers an `AdapterSession` runs on, and which LoraDelta library goes with them.

Rule: without `providers=`, the CUDA EP first when this onnxruntime offers it (it is in
`onnxruntime.get_available_providers()`, i.e. the onnxruntime-gpu wheel is the installed one), then the CPU EP;
explicit `providers=` (names, or (name, options) pairs as `InferenceSession` takes them) are used as given. A custom-op
export registers the CUDA build of the LoraDelta library (CPU and CUDA kernels in one file) when the providers name the
CUDA EP, the CPU build otherwise. ONNX Runtime may still drop the CUDA EP when it cannot start it (no GPU, CUDA or cuDNN
libraries missing): `AdapterSession.providers` reports what the session really runs on.

On the CPU EP alone, ONNX Runtime's SkipLayerNormFusion is left off (`disabled_optimizers`): ONNX Runtime 1.32's CPU
kernels of the SkipLayerNormalization / SkipSimplifiedLayerNormalization it writes measured 4-7x / 1.4-2.1x slower
than the Add + (Simplified)LayerNormalization pair they replace (bench/README.md, "ONNX Runtime's skip-LayerNorm
fusion on the CPU"); the CUDA EP keeps it.

The CPU wheel `onnxruntime` and the GPU wheel `onnxruntime-gpu` install the same `onnxruntime` package; with both
installed, the files of the one installed last win (partly, when their versions differ), so `check_wheels` warns.
"""
from __future__ import annotations

import functools
import importlib.metadata
import warnings
from collections.abc import Sequence
from typing import Any

import onnxruntime as ort

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
SLOW_ON_CPU = ("SkipLayerNormFusion",)  # ONNX Runtime ignores unknown names: tests/test_cpu_fusions.py


def default_providers() -> list[str]:
    """[CUDA EP, CPU EP] when this onnxruntime offers the CUDA EP, else [CPU EP]."""
    return [CUDA, CPU] if CUDA in ort.get_available_providers() else [CPU]


def provider_names(providers: Sequence[Any]) -> list[str]:
    """The names in a providers list of names and (name, options) pairs."""
    return [p if isinstance(p, str) else p[0] for p in providers]


def choose(providers: Sequence[Any] | None) -> tuple[list[Any], bool]:
    """(the providers to open a session with, whether a custom-op export needs the CUDA build of the library)."""
    check_wheels()
    chosen = list(providers) if providers else default_providers()
    return chosen, CUDA in provider_names(chosen)


def disabled_optimizers(providers: Sequence[Any]) -> list[str]:
    """The ONNX Runtime graph optimizers to leave off for a session on these providers: SLOW_ON_CPU on the CPU EP
    alone (module docstring), none otherwise."""
    return list(SLOW_ON_CPU) if provider_names(providers) == [CPU] else []


@functools.cache
def check_wheels() -> None:
    """Warn (once per process) when both onnxruntime wheels are installed, naming the fix."""
    versions = {}
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    if len(versions) == 2:
        active = "onnxruntime-gpu's" if CUDA in ort.get_available_providers() else "the CPU wheel's"
        warnings.warn(
            f"both onnxruntime {versions['onnxruntime']} and onnxruntime-gpu {versions['onnxruntime-gpu']} are "
            f"installed: they share the `onnxruntime` package, whose files are now mostly {active}. Keep one: for the "
            "GPU, `pip uninstall -y onnxruntime && pip install --force-reinstall --no-deps "
            f"onnxruntime-gpu=={versions['onnxruntime-gpu']}`; for the CPU, `pip uninstall -y onnxruntime-gpu && "
            f"pip install --force-reinstall --no-deps onnxruntime=={versions['onnxruntime']}`",
            RuntimeWarning, stacklevel=4)  # the caller of AdapterSession(...)
