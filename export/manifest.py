"""`manifest.json`: what was built, from what, with which adapters, so tools need no graph metadata.

Fields: format/version, rewrite / torch / transformers / onnx versions, source model and spec digest,
the capture front-end, every site (name, op, shape), every adapter (site, kind, rank, alpha, scaling,
merged or live), the pass history with stats, and the exported files with their check result.
The typed definition, shared with the runtime, is `rewrite.formats.manifest`; this builds one from a graph.
"""
from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable

import onnx
import torch.fx as fx

import rewrite
from rewrite.errors import ExportError
from rewrite.formats.manifest import (ExportEntry, HistoryEntry, InputInfo, LiveAdapter, Manifest, MergedAdapter,
                                      SiteInfo, Source)
from rewrite.graph_edit import adapters_at
from rewrite.state import state_of


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def bank_dtype_held(model: onnx.ModelProto, banks: Iterable[str], option: str) -> str:
    """`bank_dtype` as the model's bank initializers hold it: a float16 model's banks are float16 whatever
    `[export] bank_dtype` says (the option only rounds a float32 model's banks); `option` when there are none."""
    types = {init.name: init.data_type for init in model.graph.initializer}
    held = {onnx.helper.tensor_dtype_to_np_dtype(types[name]).name for name in banks if name in types}
    if len(held) > 1:
        raise ExportError(f"the adapter banks of this export hold several float types ({', '.join(sorted(held))}); "
                          "a bank / custom-op export keeps them in one")
    return held.pop() if held else option


def build_manifest(gm: fx.GraphModule, *, source: str, exports: list[ExportEntry]) -> Manifest:
    state = state_of(gm)
    adapters: list[LiveAdapter | MergedAdapter] = []
    for owner in dict.fromkeys(s.owner for s in state.sites.values()):
        for name, module in adapters_at(gm, owner).items():
            adapters.append(LiveAdapter(site=owner, adapter=name, kind=module.kind, **module.manifest_entry()))
    for owner, names in state.merged.items():
        adapters += [MergedAdapter(site=owner, adapter=name, **info) for name, info in names.items()]
    return Manifest(
        versions={"rewrite": rewrite.__version__, "torch": _version("torch"),
                  "transformers": _version("transformers"), "onnx": _version("onnx"),
                  "onnxruntime": _version("onnxruntime")},
        source=Source(model=source, spec_sha256=state.spec_digest, frontend=state.frontend, device=state.device),
        inputs={name: InputInfo(shape=list(t.shape), dtype=str(t.dtype).removeprefix("torch."),
                                dims=state.inputs.dims[name]) for name, t in state.inputs.kwargs.items()},
        sites=[SiteInfo(name=s.name, op=s.op, module_class=s.module_class, weight=s.weight, d_in=s.d_in,
                        d_out=s.d_out) for s in state.sites.values()],
        adapters=adapters,
        history=[HistoryEntry(name=r.name, modified=r.modified, seconds=round(r.seconds, 4), stats=r.stats)
                 for r in state.history],
        exports=exports,
    )
