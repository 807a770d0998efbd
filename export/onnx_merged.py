"""Merged ONNX export: the rewritten graph with every adapter folded in, through the dynamo exporter.

`torch.onnx.export(gm, (), kwargs=example_inputs, dynamo=True, dynamic_shapes=...)` re-exports the edited
GraphModule; dynamic axes keep their names (`batch`, `seq`). Weights go to external data when the model
is over 2 GB (protobuf's limit) or when asked. The file is written into a temporary directory by the
caller and renamed into place, so a failed export leaves nothing behind.
`check_onnx` runs ONNX Runtime on the example inputs and reports the max abs difference against torch.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.fx as fx

from rewrite.capture import dynamic_shapes, flat_outputs
from rewrite.errors import RewriteError
from rewrite.spec import ExportOptions
from rewrite.state import state_of

TWO_GB = 2 * 1024**3


@dataclass
class ExportReport:
    path: Path
    nodes: int
    op_types: list[str]
    external_data: bool
    check_max_abs_diff: float | None = None


def _param_bytes(gm: fx.GraphModule) -> int:
    return sum(t.numel() * t.element_size() for t in gm.state_dict().values())


def export_merged(gm: fx.GraphModule, path: Path, options: ExportOptions, config=None) -> ExportReport:
    state = state_of(gm)
    if state.device == "meta":
        raise RewriteError("cannot export ONNX from a meta-device capture (it has no weights); "
                           "set [export] format = \"none\" or capture on cpu")
    external = options.external_data == "always" or (options.external_data == "auto"
                                                      and _param_bytes(gm) > TWO_GB)
    inputs = state.inputs
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(gm, (), kwargs=inputs.kwargs, dynamo=True, verbose=False,
                                        dynamic_shapes=dynamic_shapes(inputs, config),
                                        opset_version=options.opset)
        except Exception as err:  # noqa: BLE001 - exporter failures are reported, not raised raw
            raise RewriteError(f"ONNX export failed: {type(err).__name__}: {str(err).splitlines()[0]}") from None
    program.save(str(path), external_data=external)
    model = onnx.load(str(path), load_external_data=False)
    return ExportReport(path, len(model.graph.node), sorted({n.op_type for n in model.graph.node}), external)


def check_onnx(gm: fx.GraphModule, path: Path) -> float:
    """Max abs difference between ONNX Runtime (CPU) and the torch graph on the example inputs."""
    import onnxruntime as ort

    inputs = state_of(gm).inputs
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = {name: inputs.kwargs[name].numpy() for name in names}
    got = session.run(None, feeds)
    with torch.no_grad():
        want = flat_outputs(gm(**inputs.kwargs))
    if len(got) != len(want):
        raise RewriteError(f"--check: ONNX model has {len(got)} outputs, torch graph has {len(want)}")
    return max(float(np.abs(g.astype(np.float64) - w.double().numpy()).max()) for g, w in zip(got, want))
