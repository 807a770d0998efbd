"""ONNX Runtime's `.onnx_adapter` file: {model input name: array} plus the model version it was written for.

The unmerged ort-adapters export writes one per adapter (names are the model's A/B inputs, the version is the
model's signature); the runtime reads them back and checks both against the manifest. onnxruntime is imported
only when a file is read or written.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

from rewrite.errors import AdapterFileError

ADAPTER_VERSION = 1


class OnnxAdapter(NamedTuple):
    model_version: int
    tensors: dict[str, np.ndarray]


def write_onnx_adapter(path: Path, tensors: Mapping[str, np.ndarray], model_version: int) -> None:
    import onnxruntime as ort

    # OrtValue.ortvalue_from_numpy does not copy: keep the arrays alive until export_adapter returns.
    arrays = {name: np.ascontiguousarray(array) for name, array in tensors.items()}
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(ADAPTER_VERSION)
    fmt.set_model_version(model_version)
    fmt.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in arrays.items()})
    fmt.export_adapter(str(path))
    del arrays


def read_onnx_adapter(path: Path) -> OnnxAdapter:
    """The arrays are copies: `OrtValue.numpy()` views memory owned by the AdapterFormat object, which is freed (and
    reused: garbage weights) once that object is collected."""
    import onnxruntime as ort

    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
    except Exception as err:  # noqa: BLE001 - a corrupt file is bad input
        raise AdapterFileError(f"{path}: not a readable .onnx_adapter file: {err}") from None
    tensors = {name: np.array(value.numpy(), copy=True) for name, value in fmt.get_parameters().items()}
    return OnnxAdapter(fmt.get_model_version(), tensors)
