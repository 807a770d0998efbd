"""The names an export gives its inputs, outputs and axes, and what the manifest records of them.

Outputs are named after the model's own output fields, read from the graph's output pytree: a `ModelOutput`'s or a
dict's keys (`logits`, `last_hidden_state`, `pooler_output`, `present.0.key`), joined by "." when nested;
`output_<i>` for the items of a tuple, `output` for a single tensor (should the exporter's outputs not match the
tree one to one, its own names stay). Inputs keep their forward-argument names,
except a with-past capture's cache inputs, which take optimum's names (`rewrite.decoder.onnx_name`). Dynamic axes
are named after the capture's dims (`batch`, `seq`; with past: `batch_size`, `sequence_length`,
`past_sequence_length`, `total_sequence_length`), an output axis by the same names (`rewrite.decoder.DERIVED` for a
sum of two).
"""
from __future__ import annotations

from typing import Any

import onnx
import onnx_ir as ir
import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from rewrite.capture import dynamic_shapes
from rewrite.decoder import DERIVED, is_with_past, onnx_name, with_past_shapes
from rewrite.formats.manifest import TensorInfo
from rewrite.inputs import ExampleInputs


def _key(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def output_names(gm: fx.GraphModule, inputs: ExampleInputs) -> list[str]:
    """One name per tensor output of `gm`, in the exporter's (pytree) order."""
    spec = getattr(gm, "_out_spec", None)
    if spec is not None:
        tree = pytree.tree_unflatten([torch.empty(0)] * spec.num_leaves, spec)
    else:
        with torch.no_grad():
            tree = gm(**inputs.kwargs)
    names = []
    for path, leaf in pytree.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, torch.Tensor):
            parts = [_key(entry) for entry in path]
            name = ".".join(parts) or "output"
            names.append(f"output_{name}" if name[0].isdigit() else name)
    return names


def export_shapes(inputs: ExampleInputs, config: Any) -> dict[str, dict[int, Any]] | None:
    """The `dynamic_shapes` for re-exporting a capture made with `inputs`."""
    return with_past_shapes(inputs) if is_with_past(inputs) else dynamic_shapes(inputs, config)


def name_io(model: ir.Model, gm: fx.GraphModule, inputs: ExampleInputs) -> None:
    """Rename the exported `model`'s outputs, cache inputs and dynamic axes as the module docstring says."""
    graph = model.graph
    axes: dict[str, str] = {}
    for value in graph.inputs:
        for dim, name in zip(value.shape or [], inputs.dims.get(value.name, [])):
            if name and isinstance(dim, ir.SymbolicDim) and dim.value is not None:
                axes[dim.value] = name
    for value in graph.inputs:
        value.name = onnx_name(value.name)
    names = output_names(gm, inputs)
    outputs = list(graph.outputs)
    if len(names) == len(outputs):
        for value, name in zip(outputs, names):
            value.name = name
    for value in [*graph.inputs, *outputs]:
        if value.shape is not None:
            value.shape = ir.Shape([_axis(dim, axes) for dim in value.shape])


def _axis(dim: Any, axes: dict[str, str]) -> Any:
    if not isinstance(dim, ir.SymbolicDim) or dim.value is None:
        return dim
    text = " ".join(axes.get(part, part) for part in dim.value.split(" "))  # "s15 + s70": symbols between spaces
    return ir.SymbolicDim(DERIVED.get(text, text))


def graph_io(model: onnx.ModelProto) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """The model's inputs (those without a default) and outputs, each with its dtype and axes."""
    defaults = {init.name for init in model.graph.initializer}

    def info(value: onnx.ValueInfoProto) -> TensorInfo:
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        dims = [d.dim_param if d.dim_param else d.dim_value for d in tensor.shape.dim]
        return TensorInfo(name=value.name, dtype=dtype, dims=dims)

    return ([info(v) for v in model.graph.input if v.name not in defaults], [info(v) for v in model.graph.output])
