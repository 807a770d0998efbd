"""A `.safetensors` file as {name: numpy array} + its text metadata: the one reader and writer of both adapter
formats built on it (PEFT's `adapter_model.safetensors`, our adapter file).

Every failure to read (missing, a corrupt or truncated header, cut-off data) and every NaN / Inf tensor becomes the
caller's error type naming the file. BF16 tensors load as `ml_dtypes.bfloat16` arrays: importing ml_dtypes
registers that dtype with numpy, which safetensors' numpy loader needs.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy (see the docstring)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from rewrite.errors import AdapterFileError, RewriteError
from rewrite.finite import check_tensors
from rewrite.modes import as_created


def read_safetensors(path: Path, error: type[RewriteError] = AdapterFileError
                     ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of `path`, every tensor finite."""
    if not path.is_file():
        raise error(f"{path}: no such file")
    try:
        with safe_open(path, framework="np") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # noqa: BLE001 - a corrupt file is bad input
        raise error(f"{path}: not a readable safetensors file: {err}") from None
    check_tensors(tensors, str(path), error)
    return tensors, metadata


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` to `path` (callers that need atomicity give a temporary path and move it)."""
    save_file({name: np.ascontiguousarray(array) for name, array in tensors.items()}, path, metadata=metadata)
    as_created(path)  # safetensors writes 0600
