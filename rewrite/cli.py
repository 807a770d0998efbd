"""Command line: `rewrite apply SPEC MODEL -o OUT`, `rewrite bundle MODEL --adapter NAME=DIR ...`,
`rewrite combine MODEL --adapter NAME=DIR ... --weights W,... --method M`, `rewrite docs`,
`rewrite merge MODEL_DIR --adapter DIR -o OUT` (streaming, shard by shard),
`rewrite inspect MODEL [--spec SPEC] [--groups]` and `rewrite report allocation.json [-o DIR]`.

Bad input (spec, model, adapter files) prints one clear message and exits with code 2, writing nothing.
Progress goes to stderr (inspect's tables, its result, to stdout); `--json` prints a machine-readable result to
stdout; `--quiet` prints only errors.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

import rewrite
from rewrite.console import LiveProgress
from rewrite.errors import RewriteError, describe
from rewrite.progress import reporting


def _at_least(low: int):
    """An argparse type: a whole number >= low (a bad one is a usage error naming the flag, exit code 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value}: expected a whole number >= {low}")
        return value
    parse.__name__ = f"whole number >= {low}"
    return parse


def _finite(text: str) -> float:
    """An argparse type: a finite number (nan / inf are refused here, not deep inside a pass)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text}: expected a finite number")
    return value


def _port(text: str) -> int:
    value = _at_least(1)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value}: expected a port number 1..65535")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rewrite", description="A compiler for adapters.")
    parser.add_argument("--version", action="version", version=f"rewrite {rewrite.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    apply = sub.add_parser("apply", help="load MODEL, run the spec's passes, export")
    apply.add_argument("spec", help="spec.toml")
    apply.add_argument("model", help="HF model directory | model.pt2 | model.pt (pickle) | package.module:function")
    apply.add_argument("-o", "--output", default="out", help="output directory (default: out)")
    apply.add_argument("--verify", action="store_true",
                       help="after each pass that promises equivalence, check the outputs did not change")
    apply.add_argument("--check", action="store_true", help="run ONNX Runtime on the export and compare with torch")
    apply.add_argument("--dry-run", action="store_true",
                       help="resolve the spec, load and capture MODEL, show the sites each pass reaches and the files "
                            "it would write; run no pass, write nothing")
    bundle = sub.add_parser("bundle", help="several PEFT adapter directories in, one switchable ONNX model out")
    bundle.add_argument("model", help="the base model (same forms as for apply)")
    bundle.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="a PEFT adapter directory (repeat for each adapter)")
    bundle.add_argument("--switching", choices=["ort-adapters", "bank", "custom-op"], default="bank",
                        help="ort-adapters: one adapter per run; bank / custom-op: one adapter per batch row")
    bundle.add_argument("--capacity", type=_at_least(1), help="bank slots (default: the number of adapters)")
    bundle.add_argument("--bank-dtype", choices=["float32", "float16"], default="float32",
                        help="custom-op banks in float16: half the bytes per call, adapters rounded to half")
    bundle.add_argument("--reserve-rank", type=_at_least(1), metavar="N",
                        help="keep bank slots of rank >= N at every adapter site and --reserve-target site, for "
                             "adapters added while serving (bank / custom-op; ort-adapters takes any rank)")
    bundle.add_argument("--reserve-target", action="append", default=[], metavar="SELECTOR",
                        help="also give these Linear sites an adapter slot, zero until filled, e.g. lm_head "
                             "(repeat; glob, re:, class:, exact name)")
    bundle.add_argument("-o", "--output", default="out", help="output directory (default: out)")
    bundle.add_argument("--check", action="store_true", help="compare ONNX Runtime with torch per adapter")
    combine = sub.add_parser("combine", help="several PEFT LoRA adapters in, one combined PEFT adapter out "
                                              "(PEFT's add_weighted_adapter)")
    combine.add_argument("model", help="the base model (same forms as for apply)")
    combine.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                         help="a PEFT LoRA directory (repeat, in the order of --weights)")
    combine.add_argument("--weights", required=True, metavar="W,W,...",
                         help="one weight per --adapter, comma-separated; a negative one subtracts")
    combine.add_argument("--method", required=True,
                         help="cat | linear | svd | ties | dare_linear | dare_ties | magnitude_prune | ties_svd | "
                              "dare_linear_svd | dare_ties_svd | magnitude_prune_svd")
    combine.add_argument("--into", default="combined",
                         help="the new adapter, written to OUT/<into>/ (default: combined)")
    combine.add_argument("--density", type=_finite, help="ties, dare_*, magnitude_prune*: the share of entries kept")
    combine.add_argument("--majority-sign-method", choices=["total", "frequency"],
                         help="ties*, dare_ties* (default total)")
    combine.add_argument("--rank", type=_at_least(1), help="*svd: the rank kept at every site (default: the largest input rank)")
    combine.add_argument("--energy", type=_finite,
                         help="*svd: each site keeps the least rank holding this share of the merged update")
    combine.add_argument("--seed", type=int, help="dare_*: the masks' seed (default 0)")
    combine.add_argument("-o", "--output", default="out", help="output directory (default: out)")
    merge = sub.add_parser("merge", help="fold a PEFT LoRA or DoRA adapter into a safetensors checkpoint, shard by "
                                          "shard (memory: about the adapter plus a few tensors, never the model)")
    merge.add_argument("model_dir", metavar="MODEL_DIR",
                       help="a Hugging Face model directory: model.safetensors or model.safetensors.index.json + shards")
    merge.add_argument("--adapter", required=True, metavar="DIR",
                       help="a PEFT LoRA (or DoRA) adapter directory")
    merge.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="output model directory")
    merge.add_argument("--force", action="store_true", help="replace OUT_DIR when it already holds a model")
    inspect = sub.add_parser("inspect", help="list the weight sites of MODEL and what each selector matches")
    inspect.add_argument("model")
    inspect.add_argument("--spec", help="spec.toml: capture settings and selectors to resolve")
    inspect.add_argument("--groups", action="store_true",
                         help="also list the dependency groups a structural prune cuts together (heads, FFN neurons, "
                              "conv channels) and the adapter tensors that shrink with them")
    report = sub.add_parser("report", help="re-render a rank-allocation report (Markdown, heatmap) from its JSON")
    report.add_argument("report_json", metavar="JSON", help="allocation.json written by the allocate pass")
    report.add_argument("-o", "--output", help="output directory (default: the JSON file's directory)")
    report.add_argument("--no-plot", action="store_true", help="write the Markdown only")
    report.add_argument("--json", action="store_true", help="print a JSON result to stdout")
    report.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    triton = sub.add_parser("triton", help="a Triton model repository from an unmerged export (bank / custom-op)")
    triton.add_argument("export_dir", metavar="OUT", help="output directory of an unmerged bank / custom-op export")
    triton.add_argument("-o", "--output", required=True, metavar="REPO", help="model repository (REPO/NAME is written)")
    triton.add_argument("--name", help="the model's name in the repository (default: OUT's folder name)")
    triton.add_argument("--max-batch-size", type=int, default=32, help="rows per batch, at most (default: 32)")
    triton.add_argument("--preferred-batch-size", type=int, action="append", metavar="N",
                        help="a batch size the batcher dispatches at once (repeat; default: 4, 8, ... up to the max)")
    triton.add_argument("--queue-delay-us", type=int, default=500,
                        help="how long the batcher waits to fill a batch (default: 500)")
    triton.add_argument("--instances", type=int, default=1, help="model instances (default: 1)")
    triton.add_argument("--kind", choices=["cpu", "gpu"], default="cpu", help="instance kind (default: cpu)")
    triton.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads per instance")
    triton.add_argument("--server-repo", metavar="PATH",
                        help="where the server mounts REPO (e.g. /models): the custom-op library's path in config.pbtxt")
    triton.add_argument("--library", metavar="SO",
                        help="custom-op library to copy (default: this machine's build; with --kind gpu its CUDA build)")
    version = sub.add_parser("triton-version", help="a new version of a Triton model: adapters added or removed")
    version.add_argument("model_dir", metavar="REPO/NAME", help="a model directory written by rewrite triton")
    version.add_argument("--add", action="append", default=[], metavar="NAME=PATH",
                         help="an adapter to add (PEFT dir, .safetensors, .onnx_adapter; repeat)")
    version.add_argument("--remove", action="append", default=[], metavar="NAME", help="an adapter to remove (repeat)")
    serve = sub.add_parser("serve", help="serve an unmerged export with Ray Serve (pip install rewrite-adapters[serve])")
    serve.add_argument("export_dir", metavar="OUT", help="output directory of an unmerged export")
    serve.add_argument("--replicas", type=_at_least(1), default=1, help="replicas (default: 1)")
    serve.add_argument("--port", type=_port, default=8000, help="HTTP port (default: 8000)")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP host (default: 127.0.0.1)")
    serve.add_argument("--max-batch-size", type=_at_least(1), default=32, help="rows per batch, at most (default: 32)")
    serve.add_argument("--batch-wait-ms", type=_finite, default=2.0, help="how long a batch waits to fill (default: 2)")
    serve.add_argument("--threads", type=_at_least(1), default=1,
                       help="ONNX Runtime intra-op threads per replica (default: 1)")
    for p in (triton, version, serve, merge):
        p.add_argument("--json", action="store_true", help="print a JSON result to stdout")
        p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    docs = sub.add_parser("docs", help="write the spec reference (every table, pass and adapter kind) as Markdown")
    docs.add_argument("-o", "--output", default="docs/reference", help="directory (default: docs/reference)")
    docs.add_argument("--json", action="store_true", help="print a JSON result to stdout")
    docs.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    for p in (apply, bundle, inspect, combine):
        adapters = "; also read --adapter directories holding only adapter_model.bin (tensors only)" \
            if p in (bundle, combine) else ""
        p.add_argument("--trust-pickle", action="store_true",
                       help=f"allow unpickling a .pt model with code execution (only for files you trust){adapters}")
        p.add_argument("--json", action="store_true", help="print a JSON result to stdout")
        p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
        p.add_argument("-v", "--verbose", action="store_true",
                       help="also show the libraries' deprecation warnings (torch, transformers)")
    return parser


def _cmd_apply(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from rewrite.distributed import is_main, process_group
    from rewrite.pipeline import apply
    from rewrite.spec import load_spec

    if args.command == "bundle":
        from rewrite.bundle import bundle_spec

        spec = bundle_spec(args.adapter, switching=args.switching, capacity=args.capacity, check=args.check,
                           bank_dtype=args.bank_dtype, reserve_rank=args.reserve_rank,
                           reserve_targets=args.reserve_target, trust_pickle=args.trust_pickle)
        args.verify = False
    elif args.command == "combine":
        from rewrite.bundle import combine_spec

        spec = combine_spec(args.adapter, args.weights, into=args.into, method=args.method,
                            options=dict(density=args.density, majority_sign_method=args.majority_sign_method,
                                         rank=args.rank, energy=args.energy, seed=args.seed),
                            trust_pickle=args.trust_pickle)
        args.verify = args.check = False
    else:
        args.doing = f"reading the spec {args.spec}"
        spec = load_spec(args.spec)
        if args.dry_run:
            return _dry_run(args, spec, console)
    args.doing = f"loading {args.model}"
    start = time.perf_counter()
    with process_group():  # under torchrun: rank 0 reports and writes, the others run their share quietly
        if not is_main():
            args.quiet, args.json = True, False
        live = LiveProgress(console) if not (args.quiet or args.json) else None

        def on_stage(name: str, seconds: float, stats: dict[str, Any]) -> None:
            args.doing = _doing_after(name, args)
            if live:
                live.done(name, seconds, f"after {name}")

        with live or contextlib.nullcontext(), reporting(live):
            summary = apply(spec, args.model, Path(args.output), verify=args.verify, check=args.check or None,
                            trust_pickle=args.trust_pickle, on_stage=on_stage)
    if not args.quiet and not args.json:
        _print_summary(console, summary, time.perf_counter() - start, args.command)
    return summary.as_json()


def _dry_run(args: argparse.Namespace, spec, console: Console) -> dict[str, Any]:
    from rewrite.pipeline import load_and_capture
    from rewrite.plan import as_json, export_writes, plan_passes

    args.doing = f"loading and capturing {args.model}"
    gm, _, report = load_and_capture(args.model, spec, trust_pickle=args.trust_pickle)
    plans = plan_passes(spec, gm)
    files = export_writes(spec)
    if not args.quiet and not args.json:
        console.print(f"dry run: {args.model} ({report.frontend}, {report.sites} weight sites) with {args.spec}; "
                      "nothing is run or written", highlight=False, markup=False, soft_wrap=True)
        _print_plans(console, plans, writes=True)
        what = "no model" if spec.export.format == "none" else f"ONNX {spec.export.mode}"
        console.print(f"export: {what}; writes {', '.join(files)} into {args.output}", highlight=False,
                      markup=False, soft_wrap=True)
    return dict(dry_run=True, model=args.model, spec=args.spec, output_dir=args.output, sites=report.sites,
                passes=as_json(plans), export_files=files)


def _doing_after(stage: str, args: argparse.Namespace) -> str:
    """What `apply` / `bundle` does once `stage` finished, naming what it reads (for an internal error's line)."""
    if stage == "load":
        return f"capturing {args.model}"
    if stage in ("export", "check"):
        return f"checking and writing the export for {args.output}"
    source = "the --adapter directories" if args.command in ("bundle", "combine") else args.spec
    return f"running the passes of {source} on {args.model} (after {stage})"


def _print_summary(console: Console, summary, total: float, command: str) -> None:
    table = Table(title=f"rewrite {command}: {summary.model} -> {summary.output_dir}", show_lines=False)
    for column in ("stage", "seconds", "result"):
        table.add_column(column)
    seconds = {entry["stage"]: entry["seconds"] for entry in summary.stages}
    if summary.capture:  # a streaming merge loads and captures nothing
        table.add_row("load", f"{seconds.get('load', 0):.2f}", "")
        table.add_row("capture", f"{seconds.get('capture', 0):.2f}", f"{summary.capture['frontend']}, "
                      f"{summary.capture['nodes']} nodes, {summary.sites_total} weight sites")
    for entry in summary.passes:
        stats = ", ".join(f"{k}={v}" for k, v in entry["stats"].items() if not isinstance(v, (dict, list)))
        table.add_row(entry["label"], f"{entry['seconds']:.3f}", stats if entry["modified"] else f"(no change) {stats}")
    if "export" in seconds:
        entry = summary.exports[0]
        how = entry["mode"] + (f", {entry['switching']}, adapters: {', '.join(entry['adapters'])}"
                               if entry["mode"] == "unmerged" else "")
        table.add_row("export", f"{seconds['export']:.2f}", f"ONNX {how}, {entry['nodes']} nodes")
    if summary.check_max_abs_diff is not None:
        table.add_row("check", f"{seconds['check']:.2f}",
                      f"ONNX Runtime vs torch max abs diff {summary.check_max_abs_diff:.2e}")
    table.add_row("total", f"{total:.2f}", ", ".join(summary.files))
    console.print(table)


def _cmd_inspect(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from rewrite.pipeline import load_and_capture
    from rewrite.plan import as_json, plan_passes
    from rewrite.spec import default_spec, load_spec
    from rewrite.state import state_of

    args.doing = f"reading the spec {args.spec or '(default)'}"
    spec = load_spec(args.spec) if args.spec else default_spec()
    args.doing = f"loading and capturing {args.model}"
    gm, _, report = load_and_capture(args.model, spec, trust_pickle=args.trust_pickle)
    rows = [dict(name=s.name, op=s.op, module_class=s.module_class, d_in=s.d_in, d_out=s.d_out,
                 weight=s.weight) for s in state_of(gm).sites.values()]
    plans = plan_passes(spec, gm)
    inputs = {name: dict(shape=list(t.shape), dtype=str(t.dtype).removeprefix("torch."))
              for name, t in state_of(gm).inputs.kwargs.items()}
    if not args.quiet and not args.json:
        console.print("inputs: " + ", ".join(f"{n} {v['dtype']}{v['shape']}" for n, v in inputs.items()),
                      highlight=False, markup=False, soft_wrap=True)
        title = f"{args.model}: {len(rows)} weight sites ({report.frontend}, {report.nodes} nodes)"
        _print_rows(console, title, ("site", "op", "class", "d_in", "d_out"),
                    [(r["name"], r["op"], r["module_class"], str(r["d_in"]), str(r["d_out"])) for r in rows])
        _print_plans(console, plans, writes=False)
    result = dict(model=args.model, inputs=inputs, sites=rows, passes=as_json(plans))
    if args.groups:
        from rewrite.coupling.groups import analyze, summary

        args.doing = f"tracing the dependency groups of {args.model}"
        result["groups"] = [summary(g) for g in analyze(gm).groups]
        if not args.quiet and not args.json:
            _print_rows(console, f"{len(result['groups'])} dependency groups",
                        ("structure", "group", "status", "units", "shrinks", "adapters"),
                        [(g["structure"], g["group"], g["status"] + (f": {g['why']}" if g["why"] else ""),
                          f"{g['removable']}/{g['units']}" + (f" ({g['kv_heads']} kv)" if g["kv_heads"] else ""),
                          _few(g["axes"]), _few(g["adapters"]) or "-") for g in result["groups"]])
    return result


def _few(items: list[str], n: int = 8) -> str:
    return " ".join(items[:n]) + (f" ... (+{len(items) - n})" if len(items) > n else "")


def _print_rows(console: Console, title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """A table on a terminal (long names fold, never cut); plain aligned columns elsewhere (pipes, files)."""
    if console.is_terminal:
        table = Table(title=title)
        for column in columns:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    lines = [title, "  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    console.print("\n".join(lines), highlight=False, markup=False, soft_wrap=True)


def _print_plans(console: Console, plans, *, writes: bool) -> None:
    say = functools.partial(console.print, highlight=False, markup=False, soft_wrap=True)
    for plan in plans:
        say(f"pass[{plan.index}] {plan.name} ({plan.where})")
        for sel in plan.selectors:
            say(f"  targets {sel.selector!r} matches {len(sel.matches)} site(s): {', '.join(sel.matches)}")
            if sel.error:
                say(f"    {sel.error}")
        if plan.reaches:
            kinds = ", ".join(sorted(set(plan.reaches.values())))
            say(f"  loads {kinds} onto {len(plan.reaches)} module(s): {', '.join(plan.reaches)}")
        if plan.error:
            say(f"  would fail: {plan.error}")
        if writes and plan.writes:
            say(f"  writes {', '.join(plan.writes)}")


def _cmd_docs(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from rewrite.reference import write_reference

    args.doing = f"writing the reference into {args.output}"
    written = write_reference(Path(args.output))
    console.print(f"wrote {len(written)} pages into {args.output}", highlight=False, markup=False)
    return dict(output=args.output, files=[str(p) for p in written])


def _cmd_report(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from rewrite.report import rerender

    args.doing = f"reading {args.report_json}"
    written = rerender(args.report_json, args.output, plot=not args.no_plot)
    for path in written:
        console.print(f"wrote {path}", highlight=False, markup=False)
    return dict(report=args.report_json, files=[str(p) for p in written])


def _cmd_triton(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from pydantic import ValidationError

    from rewrite.errors import SpecError
    from rewrite.options import TritonOptions
    from rewrite.triton_repo import write_repository

    args.doing = f"writing a Triton model repository from {args.export_dir}"
    flags = dict(name="--name", max_batch_size="--max-batch-size", preferred_batch_sizes="--preferred-batch-size",
                 queue_delay_us="--queue-delay-us", instances="--instances", kind="--kind",
                 intra_op_threads="--threads", server_repo="--server-repo")
    try:
        options = TritonOptions(name=args.name, max_batch_size=args.max_batch_size,
                                preferred_batch_sizes=args.preferred_batch_size, queue_delay_us=args.queue_delay_us,
                                instances=args.instances, kind=args.kind, intra_op_threads=args.threads,
                                server_repo=args.server_repo)
    except ValidationError as err:
        problem = err.errors()[0]
        flag = f" {flags[str(problem['loc'][0])]}" if problem["loc"] else ""
        raise SpecError(f"rewrite triton{flag}: {problem['msg'].removeprefix('Value error, ')}") from None
    written = write_repository(args.export_dir, args.output, options, library=args.library)
    console.print(f"wrote {written.model_dir} (version 1); how to serve and call it: {written.model_dir}/README.md",
                  highlight=False, markup=False)
    return dict(model_dir=str(written.model_dir), version=written.version, files=[str(p) for p in written.files])


def _cmd_triton_version(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from rewrite.bundle import parse_adapter_arg
    from rewrite.errors import SpecError
    from rewrite.triton_repo import add_version

    args.doing = f"writing a new version of {args.model_dir}"
    added = [parse_adapter_arg(text) for text in args.add]
    names = [name for name, _ in added]
    if len(set(names)) < len(names):
        raise SpecError(f"rewrite triton-version: --add names must be unique; got {names}")
    written = add_version(args.model_dir, add=dict(added), remove=args.remove)
    name = written.model_dir.resolve().name
    console.print(f"wrote {written.model_dir / str(written.version)}; load it with the repository API: "
                  f"tritonclient.http.InferenceServerClient(url).load_model({name!r}) "
                  f"(POST v2/repository/models/{name}/load)", highlight=False, markup=False)
    return dict(model_dir=str(written.model_dir), version=written.version, files=[str(p) for p in written.files])


def _cmd_merge(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from rewrite.streaming_merge import merge_checkpoint

    args.doing = f"merging {args.adapter} into {args.model_dir}"
    start = time.perf_counter()
    live = LiveProgress(console, "reading the checkpoint and the adapter") if not (args.quiet or args.json) else None
    with live or contextlib.nullcontext(), reporting(live):
        summary = merge_checkpoint(args.model_dir, args.adapter, args.output, force=args.force)
    seconds = time.perf_counter() - start
    console.print(f"merged {len(summary.merged)} modules into {len(summary.shards)} shard(s) "
                  f"({summary.shard_bytes / 2**30:.2f} GiB, {summary.shard_bytes / 2**20 / max(seconds, 1e-9):.0f} "
                  f"MiB/s) -> {summary.out_dir}", highlight=False, markup=False, soft_wrap=True)
    if summary.left_out:
        console.print(f"left out (unmerged weights in other formats): {', '.join(summary.left_out)}",
                      highlight=False, markup=False, soft_wrap=True)
    return summary.as_json()


def _cmd_serve(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    try:
        from rewrite.runtime.ray_serve import serve_forever
    except ImportError as err:
        raise RewriteError(f"rewrite serve needs Ray Serve: pip install 'rewrite-adapters[serve]' ({err})") from None
    args.doing = f"serving {args.export_dir}"
    serve_forever(args.export_dir, replicas=args.replicas, port=args.port, host=args.host,
                  max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_ms / 1000,
                  intra_op_threads=args.threads)
    return dict(served=args.export_dir)


@contextlib.contextmanager
def _library_output(quiet: bool, verbose: bool) -> Iterator[None]:
    """Warnings print as one `warning:` line (no source line). Library log records print their line but never a
    traceback (our error line says what failed). Libraries' FutureWarning / DeprecationWarning (torch's, about
    their own internals) show only with --verbose; --quiet silences library logging and warnings altogether."""
    factory, disabled = logging.getLogRecordFactory(), logging.root.manager.disable

    def without_traceback(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        record.exc_info = record.exc_text = record.stack_info = None
        return record

    def one_line(message, category, filename, lineno, file=None, line=None) -> None:
        text = str(message).strip() + ("" if category is UserWarning else f" ({category.__name__})")
        Console(stderr=True, emoji=False).print(f"[yellow]warning:[/] {escape(text)}", highlight=False, soft_wrap=True)

    logging.setLogRecordFactory(without_traceback)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = one_line
            for category in (FutureWarning, DeprecationWarning):
                warnings.filterwarnings("default" if verbose else "ignore", category=category)
            if quiet:
                warnings.simplefilter("ignore")
                logging.disable(logging.CRITICAL)
            yield
    finally:
        logging.setLogRecordFactory(factory)
        logging.disable(disabled)


def _print_error(message: str) -> None:
    # the message is plain text: `[model]` must not be read as markup, nor `pkg:X:` as an emoji code
    Console(stderr=True, emoji=False).print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True,
                                            soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.doing = f"running rewrite {args.command}"
    # inspect's tables are its result (`rewrite inspect MODEL | grep q_proj`): stdout; everything else reports on stderr
    console = Console(stderr=args.command != "inspect", quiet=args.quiet, log_path=False)
    try:
        with _library_output(args.quiet, getattr(args, "verbose", False)):
            commands = {"inspect": _cmd_inspect, "report": _cmd_report, "docs": _cmd_docs, "triton": _cmd_triton,
                        "triton-version": _cmd_triton_version, "serve": _cmd_serve, "merge": _cmd_merge}
            result = commands.get(args.command, _cmd_apply)(args, console)
    except RewriteError as err:
        _print_error(str(err) or type(err).__name__)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # noqa: BLE001 - a bug still ends in one line that names what was being read
        _print_error(f"internal error while {args.doing}: {describe(err)}")
        return RewriteError.exit_code
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
