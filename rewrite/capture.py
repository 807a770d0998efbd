"""Capture a model as a `torch.fx.GraphModule` and attach a `RewriteState`.

Default front-end: `torch.export.export(model, (), kwargs, strict=False, dynamic_shapes=...)` then
`.module()`: ATen ops, parameters as `get_attr` nodes named by their FQN, `nn_module_stack` kept.
Opt-in `fx`: `torch.fx.symbolic_trace` for plain torch models. Transformers models are switched to eager
attention before capture (`[capture] attn_implementation`): with SDPA, re-exporting the captured graph
to ONNX fails in torch's decompositions on T5 ("Cannot view a tensor ... strides"); eager exports everywhere. Dynamic axes are declared with
`torch.export.Dim` (samples must be >= 2 there: export specialises sizes 0 and 1).
A linear written out as `x @ W.T (+ b)` (Falcon) becomes `aten.linear` (`sites.canonical_linears`), so it is a site.
bfloat16 arithmetic in a model that is not bfloat16 (Falcon's ALiBi) runs in float32, rounded as torch rounds it
(`rewrite.bfloat16_islands`), so ONNX Runtime's CPU kernels can run the export. Sizes that are one number at every
size the export serves are folded (`rewrite.size_folding`: MPT's ALiBi slice start), and complex arithmetic becomes
real pairs (`rewrite.complex_pairs`: DeepSeek-V2's rotary embedding), so the ONNX exporter can re-trace the graph.
Data-dependent control flow (a branch on a tensor's values) cannot be captured: the error names the model's line.

`stamp` (`[capture] stamp`, on by default): a model whose layer stack holds identical blocks is exported with two
blocks per stack and the others are stamped as renamed copies (`rewrite.stamp`), so capture time grows with the
number of distinct blocks, not layers; the graph has the sites, targets and outputs of a full capture. When the
blocks differ, the full capture runs and one line on stderr says why.
"""
from __future__ import annotations

import contextlib
import io
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from rewrite.bfloat16_islands import widen_bfloat16_islands
from rewrite.complex_pairs import complex_to_pairs
from rewrite.errors import CaptureError
from rewrite.inputs import ExampleInputs
from rewrite.load import LoadedModel
from rewrite.sites import canonical_linears, find_sites
from rewrite.size_folding import fold_fixed_sizes
from rewrite.stamp import stamped_export
from rewrite.state import RewriteState
from rewrite.torch_failure import summary

_DEFAULT_MAX = 4096


@dataclass
class CaptureReport:
    frontend: str
    seconds: float
    nodes: int
    sites: int
    replay_max_abs_diff: float | None
    stamped: bool = False  # layer stack exported as two blocks + stamped copies (rewrite.stamp)


def _max_len(config: Any) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value >= 2:
            return value
    return _DEFAULT_MAX


def dynamic_shapes(inputs: ExampleInputs, config: Any = None) -> dict[str, dict[int, Any]] | None:
    """`torch.export.Dim` objects shared by name across inputs (so `batch` is one symbol everywhere)."""
    names = {d for dims in inputs.dims.values() for d in dims if d}
    if not names:
        return None
    limit = _max_len(config)
    made = {n: torch.export.Dim(n, min=1 if n == "batch" else 2, max=_DEFAULT_MAX if n == "batch" else limit)
            for n in sorted(names)}
    return {name: {axis: made[d] for axis, d in enumerate(dims) if d} for name, dims in inputs.dims.items()}


def flat_outputs(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def max_abs_diff(a: Any, b: Any) -> float:
    fa, fb = flat_outputs(a), flat_outputs(b)
    if len(fa) != len(fb):
        return float("inf")
    return max((float((x.float() - y.float()).abs().max()) for x, y in zip(fa, fb) if x.numel()), default=0.0)


@contextlib.contextmanager
def _stderr_shown_on_success() -> Iterator[None]:
    """Hold what is printed to stderr; show it only if the block succeeds (a failing torch.export prints its partial
    graph there, ahead of the one error line that says what failed)."""
    held = io.StringIO()
    with contextlib.redirect_stderr(held):
        yield
    sys.stderr.write(held.getvalue())


def _export(model: torch.nn.Module, inputs: ExampleInputs, config: Any) -> fx.GraphModule:
    try:
        with torch.no_grad(), _stderr_shown_on_success():
            program = torch.export.export(model, (), kwargs=inputs.kwargs, strict=False,
                                          dynamic_shapes=dynamic_shapes(inputs, config))
    except Exception as err:  # noqa: BLE001 - every export failure is reported the same way
        text = str(err)
        hint = ""
        if "data-dependent" in text:
            hint = (f" The model branches on the values of a tensor{_model_line(err)}: torch.export cannot capture "
                    "data-dependent control flow at any input size. Write that step with tensor ops (torch.where, "
                    "a mask) or torch.cond, or load the model in a form that avoids it.")
        elif "Cache" in text:
            hint = " Hint: decoder models must be captured without KV cache (use_cache = false)."
        elif "dynamic" in text.lower() or "specializ" in text.lower() or "constraint" in text.lower():
            hint = " Hint: try [capture] dynamic = false, or fix the dims of [[capture.inputs]]."
        raise CaptureError(f"torch.export could not capture {type(model).__name__}: "
                           f"{summary(err)}.{hint}") from None
    return program.module()


def _model_line(err: BaseException) -> str:
    """` (file:line in function: code)` of the innermost traceback frame outside torch and this package: the model's
    line that failed; empty when there is none."""
    skip = (str(Path(torch.__file__).parent), str(Path(__file__).parent))
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith(skip)]
    if not frames:
        return ""
    f = frames[-1]
    return f" ({Path(f.filename).name}:{f.lineno} in {f.name}: {(f.line or '').strip()})"


def _symbolic_trace(model: torch.nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as err:  # noqa: BLE001
        raise CaptureError(f"torch.fx.symbolic_trace could not trace {type(model).__name__}: {err}. "
                           "Use [capture] frontend = \"export\" (the default) for transformers models.") from None


def capture(loaded: LoadedModel, inputs: ExampleInputs, *, frontend: str = "export", device: str = "cpu",
            spec_digest: str | None = None, check_replay: bool = True,
            attn_implementation: str = "eager", use_cache: bool = False,
            stamp: bool = True) -> tuple[fx.GraphModule, CaptureReport]:
    """Capture `loaded` into a GraphModule carrying `gm.meta["rewrite"]`.

    The graph shares its parameters with the model: `PassManager.run` copies it before any pass edits
    weights, so only direct pass calls on a fresh capture (tests, benchmarks) touch the user's tensors.
    """
    start = time.perf_counter()
    stamped = False
    if attn_implementation != "keep" and hasattr(loaded.module, "set_attn_implementation"):
        loaded.module.set_attn_implementation(attn_implementation)
    config = getattr(loaded.module, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = use_cache  # a KV cache in the outputs cannot be exported (CAPTURE.md §4.1)
    if loaded.program is not None:
        gm = loaded.program.module()
        frontend = "pt2"
    elif frontend == "fx":
        gm = _symbolic_trace(loaded.module)
    elif stamp:
        gm, reason = stamped_export(loaded.module, config, lambda model: _export(model, inputs, loaded.config))
        stamped = gm is not None
        if reason:
            warnings.warn(f"capture: full export, not stamped: {reason}", stacklevel=2)  # the CLI: -q silences it
        if gm is None:
            gm = _export(loaded.module, inputs, loaded.config)
    else:
        gm = _export(loaded.module, inputs, loaded.config)
    canonical_linears(gm)
    widen_bfloat16_islands(gm)
    fold_fixed_sizes(gm, inputs)
    complex_to_pairs(gm)
    seconds = time.perf_counter() - start
    diff = None
    if check_replay and device != "meta" and loaded.module is not None:
        with torch.no_grad():
            diff = max_abs_diff(gm(**inputs.kwargs), loaded.module(**inputs.kwargs))
    sites = find_sites(gm)
    gm.meta["rewrite"] = RewriteState(sites=sites, spec_digest=spec_digest, frontend=frontend, device=device,
                                      inputs=inputs)
    return gm, CaptureReport(frontend, seconds, len(gm.graph.nodes), len(sites), diff, stamped)
