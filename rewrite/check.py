"""`--check`: ONNX Runtime against the torch graph on the example inputs, as the max abs difference.

Merged exports run in a plain ONNX Runtime session. Unmerged ones run through `AdapterSession`: the reference
for adapter `a` is the rewritten torch graph with every other adapter removed, the base reference has none;
for per-row strategies one batch mixes every adapter and -1 (base), and each row is compared with its own
reference.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.fx as fx

from rewrite.capture import flat_outputs
from rewrite.decoder import kwarg_name, onnx_name
from rewrite.errors import ExportError
from rewrite.graph_edit import only_adapter
from rewrite.runtime.session import AdapterSession
from rewrite.state import state_of


def check_merged(gm: fx.GraphModule, path: Path) -> float:
    """Max abs difference between ONNX Runtime (CPU) and the torch graph on the example inputs."""
    import onnxruntime as ort

    inputs = state_of(gm).inputs
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = {name: inputs.kwargs[kwarg_name(name)].numpy() for name in names}
    got = session.run(None, feeds)
    with torch.no_grad():
        want = flat_outputs(gm(**inputs.kwargs))
    if len(got) != len(want):
        raise ExportError(f"--check: ONNX model has {len(got)} outputs, torch graph has {len(want)}")
    return max(float(np.abs(g.astype(np.float64) - w.double().numpy()).max()) for g, w in zip(got, want))


def _outputs(gm: fx.GraphModule) -> list[np.ndarray]:
    with torch.no_grad():
        return [t.numpy() for t in flat_outputs(gm(**state_of(gm).inputs.kwargs))]


def check_unmerged(gm: fx.GraphModule, out_dir: Path, adapters: list[str]) -> float:
    feeds = {onnx_name(k): v.numpy() for k, v in state_of(gm).inputs.kwargs.items()}
    references = {name: _outputs(only_adapter(gm, name)) for name in [None, *adapters]}
    worst = 0.0
    with AdapterSession(out_dir) as session:
        for name, want in references.items():
            got = session.run(feeds, adapter=name)
            worst = max(worst, *(float(np.abs(g - w).max()) for g, w in zip(got, want)))
        if session.switching != "ort-adapters":
            batch = next(iter(feeds.values())).shape[0]
            cycle = [None, *adapters]
            ids = [cycle[(i + 1) % len(cycle)] for i in range(batch)]
            got = session.run(feeds, adapter_ids=ids)
            for row, name in enumerate(ids):
                for g, w in zip(got, references[name]):
                    if g.shape and g.shape[0] == batch:
                        worst = max(worst, float(np.abs(g[row] - w[row]).max()))
    return worst
