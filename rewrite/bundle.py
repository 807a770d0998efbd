"""`rewrite bundle`: several PEFT adapter directories in, one switchable ONNX model out; `rewrite combine`: several
in, one combined PEFT adapter out.

The command line is turned into an ordinary spec (one `load` pass per adapter, then an unmerged
`[export]`), so it is validated and run exactly like `rewrite apply`:

    rewrite bundle MODEL --adapter support=peft/support --adapter style=peft/style --switching bank -o out/

`--reserve-rank N` / `--reserve-target SELECTOR` (repeatable) become `[export] reserve = { rank = N, targets = [...] }`:
slots kept for adapters added while serving (`AdapterSession.add_adapter`). `--trust-pickle` trusts the model and
every adapter directory: each `load` pass gets `trust_pickle = true` (a directory holding only `adapter_model.bin`
is read, tensors only).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from rewrite.errors import SpecError
from rewrite.names import check_adapter_name
from rewrite.spec import SPEC_VERSION, Spec, parse_spec


def parse_adapter_arg(text: str) -> tuple[str, Path]:
    """`name=path`, or a bare path whose folder name (made an identifier) becomes the name."""
    name, sep, path = text.partition("=")
    if not sep:
        path, name = text, re.sub(r"\W", "_", Path(text).name.rstrip("/")) or "adapter"
        if name[0].isdigit():
            name = f"a_{name}"
    return check_adapter_name(name, f"--adapter {text!r}", SpecError), Path(path).resolve()


def _named_adapters(adapters: list[str], command: str) -> list[tuple[str, Path]]:
    """--adapter arguments as (name, directory), at least one, names unique."""
    if not adapters:
        raise SpecError(f"rewrite {command}: give at least one --adapter NAME=PEFT_DIR")
    parsed = [parse_adapter_arg(a) for a in adapters]
    names = [n for n, _ in parsed]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SpecError(f"rewrite {command}: adapter names must be unique; repeated: {duplicates}")
    return parsed


def _load_lines(parsed: list[tuple[str, Path]], trust_pickle: bool) -> list[str]:
    trust = ["trust_pickle = true"] if trust_pickle else []
    return [line for name, path in parsed for line in
            ("[[pass]]", 'name = "load"', f"path = {json.dumps(str(path))}", f"adapter = {json.dumps(name)}", *trust)]


def bundle_spec(adapters: list[str], *, switching: str, capacity: int | None, check: bool,
                bank_dtype: str = "float32", reserve_rank: int | None = None,
                reserve_targets: list[str] | None = None, trust_pickle: bool = False) -> Spec:
    parsed = _named_adapters(adapters, "bundle")
    if capacity is not None and capacity < len(parsed):
        raise SpecError(f"rewrite bundle: --capacity {capacity} is smaller than the {len(parsed)} --adapter "
                        "directories (each takes a bank slot)")
    lines = [f"version = {SPEC_VERSION}", *_load_lines(parsed, trust_pickle)]
    lines += ["[export]", 'mode = "unmerged"', f"switching = {json.dumps(switching)}",
              f"check = {'true' if check else 'false'}"]
    if capacity is not None:
        lines.append(f"capacity = {capacity}")
    if bank_dtype != "float32":
        lines.append(f"bank_dtype = {json.dumps(bank_dtype)}")
    if reserve_targets and reserve_rank is None and switching != "ort-adapters":
        raise SpecError(f"rewrite bundle: --reserve-target with --switching {switching} needs --reserve-rank N (the "
                        "rank of the bank slots kept at those sites)")
    if reserve_rank is not None or reserve_targets:
        reserve = ([f"rank = {reserve_rank}"] if reserve_rank is not None else []) + \
                  ([f"targets = {json.dumps(list(reserve_targets))}"] if reserve_targets else [])
        lines.append(f"reserve = {{ {', '.join(reserve)} }}")
    return parse_spec("\n".join(lines) + "\n", None, origin="rewrite bundle")


def combine_spec(adapters: list[str], weights: str, *, into: str, method: str, options: dict[str, Any],
                 trust_pickle: bool = False) -> Spec:
    """`rewrite combine`: a `load` per --adapter, the `combine` pass, then `save` of the new adapter as a PEFT
    directory OUT/<into>/ (beside the report OUT/combine.json / .md); no model is exported."""
    parsed = _named_adapters(adapters, "combine")
    try:
        numbers = [float(w) for w in weights.split(",")]
        if not all(map(math.isfinite, numbers)):
            raise ValueError
    except ValueError:
        raise SpecError(f"rewrite combine: --weights {weights!r}: give one number per --adapter, comma-separated "
                        "(e.g. 0.7,0.3)") from None
    lines = [f"version = {SPEC_VERSION}", *_load_lines(parsed, trust_pickle), "[[pass]]", 'name = "combine"',
             f"adapters = {json.dumps([n for n, _ in parsed])}", f"weights = {json.dumps(numbers)}",
             f"into = {json.dumps(into)}", f"method = {json.dumps(method)}"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in options.items() if value is not None]
    lines += ["[[pass]]", 'name = "save"', f"path = {json.dumps(into)}", f"adapter = {json.dumps(into)}",
              "[export]", 'format = "none"']
    return parse_spec("\n".join(lines) + "\n", None, origin="rewrite combine")
