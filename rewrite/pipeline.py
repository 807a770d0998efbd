"""`rewrite apply` as a plain function: load -> inputs -> capture -> passes -> export -> manifest.

Everything is written into a temporary directory beside the output directory, which replaces it as a whole
only when the whole run succeeded (`rewrite.publish`), so a failure or a kill leaves no partial or mixed output.
The input model is never modified (the pass manager works on a copy). Under torch.distributed only rank 0 writes
(rewrite.distributed rule 5): the other processes load, capture and run the passes (their share of the data-driven
ones), and stop there, writing nothing.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from rewrite.capture import CaptureReport, capture
from rewrite.check import check_merged, check_unmerged
from rewrite.data import check_data_file
from rewrite.decoder import capture_with_past
from rewrite.distributed import is_main
from rewrite.errors import ExportError, SpecError
from rewrite.export.manifest import build_manifest
from rewrite.export.onnx_merged import export_merged
from rewrite.export.onnx_unmerged import export_unmerged
from rewrite.formats.manifest import MANIFEST, ExportEntry, write_manifest
from rewrite.graph_edit import adapters_at
from rewrite.inputs import ExampleInputs, example_inputs
from rewrite.load import LoadedModel, load_model
from rewrite.pass_infra import PassContext, PassManager, PassResult, ScheduledPass
from rewrite.passes import REGISTRY
from rewrite.passes.merge import MergePass
from rewrite.publish import Staging
from rewrite.spec import Spec
from rewrite.state import state_of
from rewrite.options import TritonOptions
from rewrite.streaming_merge import merge_checkpoint
from rewrite.triton_repo import TRITON_DIR, triton_name, write_repository

Step = Callable[[str, float, dict[str, Any]], None]


@dataclass
class Summary:
    model: str
    output_dir: str | None
    sites_total: int
    stages: list[dict[str, Any]] = field(default_factory=list)
    passes: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    capture: dict[str, Any] = field(default_factory=dict)
    check_max_abs_diff: float | None = None
    exports: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _inputs_for(loaded: LoadedModel, spec: Spec) -> ExampleInputs:
    where = spec.location("capture")
    if loaded.program is not None and not spec.capture.inputs:
        args, kwargs = loaded.program.example_inputs or ((), {})
        if args or not kwargs:
            raise SpecError(f"{where}: this .pt2 archive was exported with positional inputs; name them in "
                            "[[capture.inputs]]")
        return ExampleInputs(dict(kwargs), {k: [None] * v.dim() for k, v in kwargs.items()})
    inputs = example_inputs(loaded.module, loaded.config, spec.capture, where)
    return inputs.to("meta") if spec.capture.device == "meta" else inputs


def load_and_capture(model: str, spec: Spec, *, trust_pickle: bool = False,
                     on_stage: Step | None = None) -> tuple[fx.GraphModule, LoadedModel, CaptureReport]:
    stage = on_stage or (lambda *_: None)
    start = time.perf_counter()
    loaded = load_model(model, trust_pickle=trust_pickle or spec.model.trust_pickle, hf_class=spec.model.hf_class,
                        device=spec.capture.device)
    stage("load", time.perf_counter() - start, {"kind": loaded.kind})
    if spec.capture.use_cache:  # a decoder with its cache as flat tensors (rewrite/decoder.py)
        gm, report = capture_with_past(loaded, batch=spec.capture.batch, spec_digest=spec.digest,
                                       attn_implementation=spec.capture.attn_implementation)
    else:
        gm, report = capture(loaded, _inputs_for(loaded, spec), frontend=spec.capture.frontend,
                             device=spec.capture.device, spec_digest=spec.digest,
                             attn_implementation=spec.capture.attn_implementation, use_cache=False,
                             stamp=spec.capture.stamp)
    stage("capture", report.seconds, {"nodes": report.nodes, "sites": report.sites})
    return gm, loaded, report


def schedule(spec: Spec, context: PassContext) -> list[ScheduledPass]:
    out = []
    for entry in spec.passes:
        where = spec.location("pass", entry.index)
        ctx = PassContext(spec_dir=context.spec_dir, output_dir=context.output_dir, where=where,
                          locate=lambda key, i=entry.index: spec.location("pass", i, key), data=spec.data)
        out.append(ScheduledPass(REGISTRY[entry.name](entry.options, ctx), f"pass[{entry.index}] '{entry.name}'"))
    return out


def apply(spec: Spec, model: str, out_dir: Path, *, verify: bool = False, check: bool | None = None,
          trust_pickle: bool = False, on_stage: Step | None = None) -> Summary:
    """Run the spec on MODEL and publish the result as OUT, replacing a previous rewrite output as a whole."""
    stage = on_stage or (lambda *_: None)
    adapter_dir = streaming_merge_source(spec)
    if adapter_dir is not None:  # nothing to share: rank 0 folds the checkpoint alone
        return _streaming_merge(spec, model, Path(out_dir), adapter_dir, stage) if is_main() else \
            Summary(model=model, output_dir=None, sites_total=0)
    if not is_main():
        return _apply_into(spec, model, Path(out_dir), verify, check, trust_pickle, stage, write=False)
    with Staging(Path(out_dir), str(out_dir)) as staging:
        summary = _apply_into(spec, model, staging.tmp, verify, check, trust_pickle, stage)
        if spec.export.format == "onnx" and spec.export.target == "triton":
            _triton_repository(spec, staging.tmp, Path(out_dir), stage)
        summary.files = staging.publish()
    summary.output_dir = str(out_dir)
    return summary


def _triton_repository(spec: Spec, tmp: Path, out_dir: Path, stage: Step) -> None:
    """`[export] target = "triton"`: OUT/triton/<name>/, what `rewrite triton OUT -o OUT/triton` writes, with the
    model named after OUT and the custom-op library's path the one it has once OUT is published."""
    start = time.perf_counter()
    options = spec.export.triton or TritonOptions()
    defaults = dict(name=options.name or triton_name(out_dir),
                    server_repo=options.server_repo or str((out_dir / TRITON_DIR).absolute()))
    written = write_repository(tmp, tmp / TRITON_DIR, options.model_copy(update=defaults))
    stage("triton", time.perf_counter() - start, {"model": f"{TRITON_DIR}/{written.model_dir.name}"})


def streaming_merge_source(spec: Spec) -> Path | None:
    """The PEFT directory to fold when the spec asks for a streaming merge (a `merge` with `streaming = true`), else
    None. Such a spec holds exactly a `load` of a PEFT LoRA directory and that merge (of the loaded adapter, without
    `keep_original`), and `[export] format = "none"`: the output is the model's safetensors checkpoint, merged, and
    the model itself is never loaded or captured."""
    streaming = [e for e in spec.passes if e.name == "merge" and e.options.streaming]
    if not streaming:
        return None
    merge = streaming[0]
    where = spec.location("pass", merge.index, "streaming")
    names = [e.name for e in spec.passes]
    if names != ["load", "merge"]:
        raise SpecError(f"{where}: a streaming merge reads the checkpoint and the adapter from disk and runs alone: "
                        f"the passes must be exactly a `load` of a PEFT LoRA directory, then this merge (got {names})")
    load = spec.passes[0].options
    if load.format == "rewrite":
        raise SpecError(f"{spec.location('pass', 0, 'format')}: a streaming merge folds PEFT LoRA directories; "
                        "our adapter files go through the graph (drop `streaming`)")
    if merge.options.adapters not in (None, [load.adapter]):
        raise SpecError(f"{spec.location('pass', merge.index, 'adapters')}: a streaming merge folds the loaded "
                        f"adapter {load.adapter!r} only (got {merge.options.adapters})")
    if merge.options.keep_original:
        raise SpecError(f"{spec.location('pass', merge.index, 'keep_original')}: a streaming merge keeps nothing "
                        "to unmerge (the input checkpoint stays as it was)")
    if spec.export.format != "none":
        raise SpecError(f"{spec.location('export', 'format')}: a streaming merge writes a safetensors checkpoint, "
                        "not ONNX: set [export] format = \"none\"")
    return spec.base_dir / load.path


def _streaming_merge(spec: Spec, model: str, out_dir: Path, adapter_dir: Path, stage: Step) -> Summary:
    start = time.perf_counter()
    merged = merge_checkpoint(model, adapter_dir, out_dir)
    seconds = time.perf_counter() - start
    summary = Summary(model=model, output_dir=str(out_dir), sites_total=len(merged.merged))
    stats = dict(merged=len(merged.merged), shards=len(merged.shards), shard_bytes=merged.shard_bytes)
    label = f"pass[{spec.passes[1].index}] 'merge'"
    summary.passes.append(dict(label=label, modified=True, seconds=seconds, stats=stats))
    summary.stages.append(dict(stage=label, seconds=seconds, **stats))
    stage(label, seconds, stats)
    summary.files = [*merged.shards, *merged.copied]
    return summary


def _apply_into(spec: Spec, model: str, tmp: Path, verify: bool, check: bool | None, trust_pickle: bool,
                stage: Step, *, write: bool = True) -> Summary:
    summary = Summary(model=model, output_dir=None, sites_total=0)

    def on_stage(name: str, seconds: float, stats: dict[str, Any]) -> None:
        summary.stages.append(dict(stage=name, seconds=seconds, **stats))
        stage(name, seconds, stats)

    def on_pass(label: str, seconds: float, result: PassResult) -> None:
        summary.passes.append(dict(label=label, modified=result.modified, seconds=seconds, stats=result.stats))
        stage(label, seconds, result.stats)

    check_data_file(spec.data, spec.base_dir)
    context = PassContext(spec_dir=spec.base_dir, output_dir=tmp)
    manager = PassManager(schedule(spec, context), verify=verify, on_step=on_pass)
    manager.check_paths()
    gm, loaded, report = load_and_capture(model, spec, trust_pickle=trust_pickle, on_stage=on_stage)
    _check_custom_op_dtype(gm, spec)
    summary.sites_total = report.sites
    summary.capture = dict(frontend=report.frontend, nodes=report.nodes,
                           replay_max_abs_diff=report.replay_max_abs_diff)
    gm = manager.run(gm)
    if not write:
        return summary
    exports: list[ExportEntry] = []
    if spec.export.format == "onnx":
        exports.append(_export(gm, spec, tmp, loaded, check, on_stage, on_pass, summary, context))
    summary.exports = [entry.model_dump(mode="json") for entry in exports]
    write_manifest(tmp / MANIFEST, build_manifest(gm, source=model, exports=exports))
    return summary


def _check_custom_op_dtype(gm: fx.GraphModule, spec: Spec) -> None:
    """The custom op (`rewrite::LoraDelta`) adds its delta into float32 activations: a model that computes in another
    float type would be exported as a graph ONNX Runtime refuses to load, so it is refused before any pass runs."""
    options = spec.export
    if (options.format, options.mode, options.switching) != ("onnx", "unmerged", "custom-op"):
        return
    dtypes = {gm.get_parameter(site.weight).dtype for site in state_of(gm).sites.values()} - {torch.float32}
    if dtypes:
        found = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        raise SpecError(f"{spec.location('export', 'switching')}: switching = \"custom-op\" needs a float32 model "
                        f"(its kernel adds into float32 activations); this model's weights are {found}: use "
                        "switching = \"bank\" (any float type, one adapter per row) or load the model in float32")


def _check_live_adapters(gm: fx.GraphModule, spec: Spec) -> None:
    """An unmerged export switches the adapters still attached; with none left, say so at `[export] mode` (and which
    adapters a merge pass folded away) rather than fail inside the export."""
    state = state_of(gm)
    if any(adapters_at(gm, owner) for owner in dict.fromkeys(s.owner for s in state.sites.values())):
        return
    merged = sorted({name for names in state.merged.values() for name in names})
    why = (f"a merge pass folded {', '.join(map(repr, merged))} into the weights (drop that merge, or export "
           'mode = "merged")') if merged else "insert or load one"
    raise SpecError(f"{spec.location('export', 'mode')}: mode = \"unmerged\" exports the adapters still attached "
                    f"after the passes, and none is: {why}")


def _export(gm, spec: Spec, tmp: Path, loaded: LoadedModel, check: bool | None, on_stage, on_pass,
            summary: Summary, context: PassContext) -> ExportEntry:
    options = spec.export
    start = time.perf_counter()
    if options.mode == "unmerged":
        _check_live_adapters(gm, spec)
        entry = export_unmerged(gm, tmp, options, loaded.config)
    else:
        gm = _fold_remaining(gm, context, on_pass)
        entry = export_merged(gm, tmp / options.filename, options, loaded.config)
    on_stage("export", time.perf_counter() - start, {"nodes": entry.nodes})
    if options.check if check is None else check:
        start = time.perf_counter()
        if options.mode == "unmerged":
            write_manifest(tmp / MANIFEST, build_manifest(gm, source=summary.model, exports=[entry]))
            diff = check_unmerged(gm, tmp, list(entry.adapters))
        else:
            diff = check_merged(gm, tmp / options.filename)
        on_stage("check", time.perf_counter() - start, {"max_abs_diff": diff})
        summary.check_max_abs_diff = diff
        if not diff <= options.check_tolerance:
            raise ExportError(f"--check: ONNX Runtime differs from torch by {diff:.3g} "
                            f"(> [export] tolerance = {options.check_tolerance:g})")
        entry.check_max_abs_diff = diff
    return entry


class _FoldWhatFolds(MergePass):
    """The merged export's final merge: at each site, the modules that fold exactly; the others stay inline."""

    def chosen(self, modules: dict) -> list[str]:
        return [name for name in super().chosen(modules) if modules[name].mergeable]


def _fold_remaining(gm: fx.GraphModule, context: PassContext, on_pass) -> fx.GraphModule:
    """Merged export folds adapters still attached, as a final `merge` pass recorded in the history. Modules of a
    kind that cannot fold (bottleneck: a non-linearity; prompt tuning) stay in the graph, also where their adapter's
    other modules fold (a SEQ_CLS prompt's head): the export computes them inline."""
    foldable = sorted({name for owner in dict.fromkeys(s.owner for s in state_of(gm).sites.values())
                       for name, module in adapters_at(gm, owner).items() if module.mergeable})
    if not foldable:
        return gm
    options = _FoldWhatFolds.Options(adapters=foldable)
    merge = _FoldWhatFolds(options, PassContext(context.spec_dir, context.output_dir, "[export] mode = \"merged\""))
    return PassManager([ScheduledPass(merge, "export 'merge'")], on_step=on_pass).run(gm, copy_model=False)
