"""Refusing NaN / Inf where numbers enter: adapter weights, adapter configs, calibration data, spec tables.

Nothing downstream fails on a non-finite weight, scale or input: the model just answers NaN. So each reader
refuses them once, where it reads them, naming the file and the tensor or key. Torch-free (the runtime uses
it): a torch tensor is checked through its own methods.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from rewrite.errors import RewriteError

# ml_dtypes' floats (bfloat16 from a BF16 safetensors file) are not np.inexact: without this set they would pass
# unchecked.
_ML_FLOATS = frozenset(np.dtype(t) for t in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2))


def nonfinite_count(array: Any) -> int:
    """How many NaN / Inf elements a torch tensor or numpy array holds (0 for integer and bool ones)."""
    if hasattr(array, "is_floating_point"):  # a torch.Tensor
        if not (array.is_floating_point() or array.is_complex()):
            return 0
        return int(array.numel() - array.isfinite().sum().item())
    array = np.asarray(array)
    if not (np.issubdtype(array.dtype, np.inexact) or array.dtype in _ML_FLOATS):
        return 0
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def check_tensors(tensors: Mapping[str, Any], where: str, error: type[RewriteError]) -> None:
    """Raise `error` naming `where` and the first tensor that holds NaN / Inf values."""
    for name, array in tensors.items():
        bad = nonfinite_count(array)
        if bad:
            raise error(f"{where}: tensor {name!r} has {bad} NaN/Inf value{'s' if bad > 1 else ''}; "
                        "weights and data must be finite numbers")


def nonfinite_key(value: Any, path: str = "") -> str | None:
    """The key path (`alpha_pattern['q_proj']`, `steps[2]`) of the first NaN / Inf float inside nested dicts and
    lists (`path` for `value` itself), or None when every number is finite."""
    if isinstance(value, float):
        return None if math.isfinite(value) else path
    if isinstance(value, dict):
        items = ((f"{path}[{k!r}]" if path else str(k), v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for key, item in items:
        found = nonfinite_key(item, key)
        if found is not None:
            return found
    return None
