"""What a failed torch.export / ONNX export says, in one bounded line: the failure, its symbols, the model's line.

torch's shape-check failures name sizes by symbols (`Eq(s70 + Max(0, -s17 - 2*s70 + 1), 1) is inconsistent!`) and
list the violated guards below a header line. The summary keeps

    Type: the first line [+ the lines it announces (a trailing colon) or lists ("- ...")]
          [while deciding <the size expression torch failed to decide>]
          (where s70 = input_ids.size(1), s17 = past_key_values_0_key.size(2); Max(0, ...) comes from
           modeling_mpt.py:118 in forward: position_bias_query_index = max(0, ...))

The symbols, the expression and the model line are read from the failing trace itself (its ShapeEnv and traced
graph, locals of the frames that checked the shapes), so they name what that trace saw; without a traced graph the
model line is the last frame of torch's "Original traceback" note, and a failure with neither keeps the first part
only. At most `LIMIT` characters; never a traceback.
"""
from __future__ import annotations

import re
import traceback
from pathlib import Path
from typing import Any

import torch

from rewrite.errors import describe, innermost, plain

LIMIT = 700
_SYMBOL = re.compile(r"\bs\d+\b")
_SOURCE = re.compile(r"^L\['([^']+)'\]\.size\(\)\[(\d+)\]$")


def _listed_lines(err: BaseException) -> list[str]:
    """The lines after the first that list what failed ("- Not all values of seq ... satisfy the generated guard
    ..."); `describe` already keeps a line that the first announces with a colon."""
    lines = [line.strip() for line in plain(str(err)).splitlines() if line.strip()]
    return [line for line in lines[1:] if line.startswith("- ")]


def _trace_locals(err: BaseException) -> tuple[Any, Any, Any]:
    """(ShapeEnv, traced GraphModule, the size expression being decided when it failed) from the frames of the
    failing trace, each None when absent."""
    shape_env = gm = deciding = None
    for frame, _ in traceback.walk_tb(err.__traceback__):
        names = frame.f_locals
        for env in (names.get("shape_env"), getattr(names.get("fake_mode"), "shape_env", None), names.get("self")):
            if type(env).__name__ == "ShapeEnv":
                shape_env = env
        if isinstance(names.get("gm"), torch.fx.GraphModule):
            gm = names["gm"]
        if frame.f_code.co_name == "_evaluate_expr" and names.get("orig_expr") is not None:
            deciding = names["orig_expr"]
    return shape_env, gm, deciding


def _axis(source: str) -> str:
    match = _SOURCE.match(source)
    return f"{match[1]}.size({match[2]})" if match else source


def _symbols(text: str, shape_env: Any) -> list[str]:
    by_name = {str(symbol): sources for symbol, sources in shape_env.var_to_sources.items() if sources}
    return [f"{s} = {_axis(by_name[s][0].name)}" for s in dict.fromkeys(_SYMBOL.findall(text)) if s in by_name]


def _model_line(stack: str) -> str:
    """`file:line in function: code` of the last frame of a node's recorded stack trace."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', stack or "")
    if not frames:
        return ""
    file, line, function, code = frames[-1]
    return f"{Path(file).name}:{line} in {function}: {code.strip()}"


def _origin(text: str, gm: Any) -> str:
    """`expr comes from <model line>` for the longest symbolic size of the traced graph that the message quotes."""
    found = []
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        if isinstance(value, torch.SymInt) and not value.node.expr.is_Symbol and str(value.node.expr) in text:
            line = _model_line(node.meta.get("stack_trace", ""))
            if line:
                found.append((len(str(value.node.expr)), str(value.node.expr), line))
    if not found:
        return ""
    _, expr, line = max(found)
    return f"{expr} comes from {line}"


def summary(err: BaseException, limit: int = LIMIT) -> str:
    """`Type: message` of the innermost exception of `err`, with what the module docstring adds, at most `limit`
    characters."""
    inner = innermost(err)
    text = " ".join([describe(inner), *_listed_lines(inner)])
    shape_env, gm, deciding = _trace_locals(inner)
    if deciding is not None and str(deciding) not in text:
        text += f" while deciding {deciding}"
    notes = _symbols(text, shape_env) if shape_env is not None else []
    origin = _origin(text, gm) if gm is not None else ""
    if not origin and "Original traceback:" in str(inner):  # torch's note on the model line an op came from
        line = _model_line(str(inner).split("Original traceback:", 1)[1])
        origin = f"at {line}" if line else ""
    where = "; ".join(part for part in (f"where {', '.join(notes)}" if notes else "", origin) if part)
    if where:
        text += f" ({where})"
    return text if len(text) <= limit else text[:limit - 3] + "..."
