"""Merged ONNX export: the rewritten graph with every adapter folded in, through the dynamo exporter.

`torch.onnx.export(gm, (), kwargs=example_inputs, dynamo=True, dynamic_shapes=...)` re-exports the edited
GraphModule; dynamic axes keep their names (`batch`, `seq`), outputs are named after the model's output fields
(`logits`; `export/io_names.py`, which also names a with-past capture's cache inputs and outputs). Weights go to
external data when the model is over 2 GB (protobuf's limit) or when asked. The file is written into a temporary directory by the
caller and renamed into place, so a failed export leaves nothing behind.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import torch
import torch.fx as fx

from rewrite.errors import ExportError
from rewrite.formats.manifest import MergedExport
from rewrite.options import ExportOptions
from rewrite.export.grouped_mm import grouped_mm_translations
from rewrite.export.io_names import export_shapes, graph_io, name_io
from rewrite.state import state_of
from rewrite.torch_failure import summary

TWO_GB = 2 * 1024**3


def _param_bytes(gm: fx.GraphModule) -> int:
    return sum(t.numel() * t.element_size() for t in gm.state_dict().values())


def export_merged(gm: fx.GraphModule, path: Path, options: ExportOptions, config=None) -> MergedExport:
    """Write the merged model to `path`; returns its manifest entry."""
    state = state_of(gm)
    if state.device == "meta":
        raise ExportError("cannot export ONNX from a meta-device capture (it has no weights); "
                          "set [export] format = \"none\" or capture on cpu")
    external = options.external_data == "always" or (options.external_data == "auto"
                                                      and _param_bytes(gm) > TWO_GB)
    inputs = state.inputs
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(gm, (), kwargs=inputs.kwargs, dynamo=True, verbose=False,
                                        dynamic_shapes=export_shapes(inputs, config),
                                        opset_version=options.opset,
                                        custom_translation_table=grouped_mm_translations())
            name_io(program.model, gm, inputs)
            program.save(str(path), external_data=external)
        except Exception as err:  # noqa: BLE001 - exporter failures are reported, not raised raw
            raise ExportError(f"ONNX export failed: {summary(err)}") from None
    model = onnx.load(str(path), load_external_data=False)
    ins, outs = graph_io(model)
    return MergedExport(file=path.name, nodes=len(model.graph.node),
                        op_types=sorted({n.op_type for n in model.graph.node}), external_data=external,
                        inputs=ins, outputs=outs)
