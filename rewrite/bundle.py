"""`rewrite bundle`: several PEFT adapter directories in, one switchable ONNX model out.

The command line is turned into an ordinary spec (one `load` pass per adapter, then an unmerged
`[export]`), so it is validated and run exactly like `rewrite apply`:

    rewrite bundle MODEL --adapter support=peft/support --adapter style=peft/style --switching bank -o out/
"""
from __future__ import annotations

import json
import re
from pathlib import Path

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


def bundle_spec(adapters: list[str], *, switching: str, capacity: int | None, check: bool,
                bank_dtype: str = "float32") -> Spec:
    if not adapters:
        raise SpecError("rewrite bundle: give at least one --adapter NAME=PEFT_DIR")
    parsed = [parse_adapter_arg(a) for a in adapters]
    names = [n for n, _ in parsed]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SpecError(f"rewrite bundle: adapter names must be unique; repeated: {duplicates}")
    lines = [f"version = {SPEC_VERSION}"]
    for name, path in parsed:
        lines += ["[[pass]]", 'name = "load"', f"path = {json.dumps(str(path))}", f"adapter = {json.dumps(name)}"]
    lines += ["[export]", 'mode = "unmerged"', f"switching = {json.dumps(switching)}",
              f"check = {'true' if check else 'false'}"]
    if capacity is not None:
        lines.append(f"capacity = {capacity}")
    if bank_dtype != "float32":
        lines.append(f"bank_dtype = {json.dumps(bank_dtype)}")
    return parse_spec("\n".join(lines) + "\n", None)
