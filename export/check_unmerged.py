"""`--check` for unmerged exports: ONNX Runtime through AdapterSession against the torch graph.

The reference for adapter `a` is the rewritten torch graph with every other adapter removed; the base
reference has none. For per-row strategies one batch mixes every adapter and -1 (base), and each row
is compared with its own reference. Returns the max abs difference over all comparisons.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx

from rewrite.capture import flat_outputs
from rewrite.graph_edit import adapters_at, drop_adapter, unwire
from rewrite.state import state_of


def only_adapter(gm: fx.GraphModule, keep: str | None) -> fx.GraphModule:
    """A copy of `gm` where only adapter `keep` (or none) is attached."""
    gm = copy.deepcopy(gm)
    for owner in dict.fromkeys(s.owner for s in state_of(gm).sites.values()):
        for name in list(adapters_at(gm, owner)):
            if name != keep:
                unwire(gm, name, owner)
                drop_adapter(gm, owner, name)
    gm.graph.lint()
    gm.recompile()
    return gm


def _outputs(gm: fx.GraphModule) -> list[np.ndarray]:
    with torch.no_grad():
        return [t.numpy() for t in flat_outputs(gm(**state_of(gm).inputs.kwargs))]


def check_unmerged(gm: fx.GraphModule, out_dir: Path, adapters: list[str]) -> float:
    from rewrite.runtime.session import AdapterSession

    feeds = {k: v.numpy() for k, v in state_of(gm).inputs.kwargs.items()}
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
