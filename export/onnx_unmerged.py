"""Unmerged ONNX export: adapters stay switchable at run time.

After `lowering.lower`, the model is exported with the dynamo exporter and post-processed:

    ort-adapters  every A/B becomes a graph input named like the parameter, with an EMPTY same-name
                  initializer ([d_in, 0] / [0, d_out]) as default, so the model alone is the base model;
                  each site gets its own symbolic rank dim `rank_<i>` (one shared dim breaks per-layer
                  ranks in ORT's buffer planner); one `.onnx_adapter` file per adapter.
    bank          an `adapter_ids` input [batch] (-1 = base); the banks stay initializers holding the exported
    custom-op     adapters (zeros in free slots and reserved sites). `AdapterSession` declares them graph inputs in
                  the model it loads, so it can fill free slots without reloading, while the file stays quiet in
                  plain ONNX Runtime, which warns once per initializer that is also a graph input (the overridable
                  form ort-adapters cannot avoid: ONNX Runtime's adapter mechanism feeds graph inputs).

Elementwise kinds ((IA)^3, RoAd, BitFit; `export/lowerings/rows.py`), listed in the manifest as `row_sites`: in bank /
custom-op one bank [capacity + 1, width] per vector (of `bank_dtype` when the model is float32), its last row the
identity, gathered per row; in ort-adapters one input [1, 1, width] per vector whose initializer is the identity,
which an adapter's .onnx_adapter file (holding its vectors beside its A / B) replaces per run (such exports skip the
exporter's optimizer, see `_export`; ONNX Runtime optimizes at load).

`[export] reserve` adds zero-filled slots (export/lowering.py); the manifest records it (`reserve`).

Outputs, cache inputs and axes are named as in merged exports (`export/io_names.py`). Stale `value_info` is
dropped and shapes re-inferred (ORT trusts it when planning buffers). Every adapter tensor name is checked to have
survived export (matmul layout keeps them: ONNX.md §2.2).
"""
from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx as fx

from rewrite.errors import ExportError, RewriteError
from rewrite.export.grouped_mm import grouped_mm_translations
from rewrite.export.io_names import export_shapes, graph_io, name_io
from rewrite.export.lowering import Lowered, lower
from rewrite.export.manifest import bank_dtype_held
from rewrite.formats.manifest import ExportedAdapter, ReservedSlots, RowSite, SwitchableSite, UnmergedExport
from rewrite.formats.onnx_adapter import write_onnx_adapter
from rewrite.options import ExportOptions
from rewrite.state import state_of
from rewrite.torch_failure import summary
from rewrite.tensors import to_numpy

IDS_INPUT = "adapter_ids"


def model_signature(lowered: Lowered) -> int:
    """A 31-bit integer from the adapter tensor names and shapes; stored as the adapter files' model version."""
    text = json.dumps([(s.tensors, s.d_in, s.d_out) for s in lowered.sites]
                      + [(r.tensors, r.widths) for r in lowered.rows], sort_keys=True)
    return int(hashlib.sha256(text.encode()).hexdigest()[:7], 16)


def _example_ids(batch: int, slots: int) -> torch.Tensor:
    ids = torch.arange(batch, dtype=torch.int64) % max(slots, 1)
    ids[-1] = -1
    return ids


def _export(lowered: Lowered, gm: fx.GraphModule, config: Any, opset: int | None):
    state = state_of(gm)
    inputs = state.inputs
    shapes = export_shapes(inputs, config)
    # ort-adapters' row vectors are fed as they are: the exporter's optimizer would fold a kind's ops on them alone
    # (a reshape, a normalisation) into initializers no adapter file names; ONNX Runtime optimizes at load instead,
    # leaving overridable initializers alone
    common = dict(dynamo=True, verbose=False, opset_version=opset,
                  custom_translation_table={**grouped_mm_translations(),
                                            **(lowered.lowering.translation_table() or {})},
                  optimize=lowered.routed or not lowered.rows)
    if not lowered.routed:
        return torch.onnx.export(lowered.module, (), kwargs=inputs.kwargs, dynamic_shapes=shapes, **common)
    names = list(inputs.kwargs)
    batch = next(iter(inputs.kwargs.values())).shape[0]
    ids = _example_ids(batch, len(lowered.adapters))
    args = (*inputs.kwargs.values(), ids)
    dyn = None
    if shapes:
        batch_dim = next((d for spec in shapes.values() for axis, d in spec.items() if axis == 0), None)
        dyn = ((*[shapes.get(n, {}) for n in names], {0: batch_dim} if batch_dim is not None else {}),)
    return torch.onnx.export(lowered.module, args, dynamic_shapes=dyn, input_names=[*names, IDS_INPUT], **common)


def _distinct_placeholders(lowered: Lowered) -> dict[str, np.ndarray]:
    """Trace with distinct random adapter tensors and return the real values by tensor name.

    The exporter's optimizer deduplicates equal initializers (freshly inserted adapters all have B = 0)
    and may fold constants, which would lose the names that make adapters switchable."""
    names = {name for site in [*lowered.sites, *lowered.rows] for name in site.tensors.values()}
    prefix = "gm." if lowered.routed else ""
    generator = torch.Generator().manual_seed(0)
    real = {}
    with torch.no_grad():
        for name, param in lowered.module.named_parameters():
            if name.removeprefix(prefix) in names:
                real[name.removeprefix(prefix)] = param.detach().cpu().numpy().copy()
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return real


def _drop_root_prefix(model: onnx.ModelProto, prefix: str = "gm.") -> None:
    """RoutedModel holds the graph as `self.gm`; strip that from tensor names so every strategy names
    the same parameter the same way (an .onnx_adapter then fits any export of the model)."""
    renamed = {i.name: i.name[len(prefix):] for i in model.graph.initializer if i.name.startswith(prefix)}
    for init in model.graph.initializer:
        init.name = renamed.get(init.name, init.name)
    for node in model.graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
    for value in model.graph.input:
        value.name = renamed.get(value.name, value.name)


def _make_inputs(model: onnx.ModelProto, lowered: Lowered) -> None:
    initializers = {init.name: init for init in model.graph.initializer}
    wanted = [(site, key, name) for site in [*lowered.sites, *lowered.rows] for key, name in site.tensors.items()]
    missing = [name for _, _, name in wanted if name not in initializers]
    if missing:
        raise ExportError(f"ONNX export lost adapter tensor names {missing[:4]} (found initializers like "
                          f"{sorted(initializers)[:4]}); cannot make them switchable")
    for index, site in enumerate(lowered.sites if not lowered.routed else []):  # banks stay initializers (above)
        for key, name in site.tensors.items():
            init = initializers[name]
            shape = lowered.lowering.adapter_input(init, key, index)
            model.graph.input.append(onnx.helper.make_tensor_value_info(name, init.data_type, shape))
    for row in lowered.rows if not lowered.routed else []:  # identity defaults, fixed widths
        for name in row.tensors.values():
            init = initializers[name]
            model.graph.input.append(onnx.helper.make_tensor_value_info(name, init.data_type, list(init.dims)))
    # Changed input dims make the exporter's shapes stale. Otherwise they stay: ONNX shape inference has no rule
    # for LoraDelta, and ONNX Runtime runs the op in place only when it sees its output shape.
    if not lowered.lowering.keeps_shapes:
        del model.graph.value_info[:]


def export_unmerged(gm: fx.GraphModule, out_dir: Path, options: ExportOptions, config: Any = None) -> UnmergedExport:
    """Write the switchable model `options.filename` (and, for ort-adapters, one .onnx_adapter per adapter) into
    out_dir; returns its manifest entry."""
    if state_of(gm).device == "meta":
        raise ExportError("cannot export ONNX from a meta-device capture (it has no weights)")
    try:
        lowered = lower(gm, options)
    except ExportError as err:  # what cannot switch names the switching asked for, beside its site and kind
        raise ExportError(f"switching = {options.switching!r}: {err}") from None
    real = _distinct_placeholders(lowered)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = _export(lowered, gm, config, options.opset)
        except RewriteError:
            raise
        except Exception as err:  # noqa: BLE001 - exporter failures are reported, not raised raw
            raise ExportError(f"ONNX export failed: {summary(err)}") from None
    name_io(program.model, gm, state_of(gm).inputs)
    model = program.model_proto
    if lowered.routed:
        _drop_root_prefix(model)
    for init in model.graph.initializer:
        if init.name in real:
            init.CopyFrom(onnx.numpy_helper.from_array(real[init.name], init.name))
    _make_inputs(model, lowered)
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    filename, path = options.filename, out_dir / options.filename
    big = model.ByteSize() > 2 * 1024**3 - 1 if options.external_data == "auto" else options.external_data == "always"
    onnx.save_model(model, str(path), save_as_external_data=big, location=f"{filename}.data" if big else None)
    version = model_signature(lowered)
    ins, outs = graph_io(model)
    if lowered.routed:
        adapters = {name: ExportedAdapter(slot=i) for i, name in enumerate(lowered.adapters)}
    else:
        adapters = {name: ExportedAdapter(file=f"adapters/{name}.onnx_adapter") for name in lowered.adapters}
        (out_dir / "adapters").mkdir(exist_ok=True)
        for name, info in adapters.items():
            tensors = {s.tensors[k]: to_numpy(s.per_adapter[name][k]) for s in lowered.sites
                       if name in s.per_adapter for k in ("A", "B")}
            tensors.update({r.tensors[p]: to_numpy(v).reshape(1, 1, -1) for r in lowered.rows if name in r.per_adapter
                            for p, v in r.per_adapter[name].items()})
            write_onnx_adapter(out_dir / info.file, tensors, version)
    return UnmergedExport(
        file=filename, switching=options.switching, model_version=version, nodes=len(model.graph.node),
        op_types=sorted({n.op_type for n in model.graph.node}), external_data=big,
        capacity=options.capacity or len(lowered.adapters) if lowered.routed else None,
        bank_dtype=bank_dtype_held(model, [*(t for s in lowered.sites for t in s.tensors.values()),
                                           *(t for r in lowered.rows for t in r.tensors.values())],
                                   options.bank_dtype) if lowered.routed else None,
        ids_input=IDS_INPUT if lowered.routed else None,
        sites=[SwitchableSite(site=s.owner, op=s.op, d_in=s.d_in, d_out=s.d_out, rank=s.rank, A_offset=s.a_offset,
                              **s.tensors)
               for s in lowered.sites],
        row_sites=[RowSite(site=r.owner, kind=r.kind, op=r.op, join=r.join, widths=r.widths, banks=r.tensors,
                           identity=r.identity, layout=r.layout) for r in lowered.rows],
        adapters=adapters,
        reserve=None if options.reserve is None else ReservedSlots(
            rank=options.reserve.rank, targets=options.reserve.targets, sites=lowered.reserved),
        inputs=ins, outputs=outs,
    )
