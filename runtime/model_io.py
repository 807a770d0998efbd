"""What a model file takes and gives: each input's and output's name, element type and dims, from its header.

    inputs, outputs = read_io("out/model.onnx", skip={"adapter_ids"})

Rules: weights stay on disk (external data is never read); an input that is also an initializer (a bank in exports that
listed banks as inputs) is a weight, not something a caller feeds, and is left out, as is every name in `skip`. A dim
is an int (fixed size), a str (a named dynamic axis: "batch") or None (unknown size). Torch-free: serving code and
the Triton writer both read models through it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from rewrite.errors import DeploymentError, first_line


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...]

    @property
    def batched(self) -> bool:
        """The leading axis is dynamic, so requests can be stacked on it."""
        return bool(self.dims) and not isinstance(self.dims[0], int)


def _spec(value: onnx.ValueInfoProto, where: str) -> TensorSpec:
    tensor = value.type.tensor_type
    if not value.type.HasField("tensor_type") or not tensor.HasField("shape"):
        raise DeploymentError(f"{where}: {value.name!r} is not a tensor of known rank")
    dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param or None for d in tensor.shape.dim)
    return TensorSpec(value.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)), dims)


def read_io(path: str | Path, skip: set[str] | frozenset[str] = frozenset()) -> tuple[list[TensorSpec],
                                                                                       list[TensorSpec]]:
    """(inputs a caller feeds, outputs) of the ONNX model at `path`; a file ONNX cannot read is a DeploymentError."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf's decode errors: the file is not a model
        raise DeploymentError(f"{path}: not an ONNX model: {first_line(err)}") from None
    weights = {init.name for init in model.graph.initializer} | set(skip)
    inputs = [_spec(v, str(path)) for v in model.graph.input if v.name not in weights]
    return inputs, [_spec(v, str(path)) for v in model.graph.output]
