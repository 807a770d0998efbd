"""Adapter names, one rule for the spec, `rewrite bundle` and the runtime (torch-free: the runtime imports it).

A name becomes part of module paths (`adapters.<site>.<name>`), ONNX tensor names and file names
(`adapters/<name>.onnx_adapter`, the runtime's temporary files), so it is an identifier and never a path.
"""
from __future__ import annotations

import re

from rewrite.errors import RewriteError

ADAPTER_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
RULE = "adapter names are identifiers (letters, digits, _; not starting with a digit)"


def check_adapter_name(name: object, where: str, error: type[RewriteError] = RewriteError) -> str:
    """`name` when it is a valid adapter name; otherwise `error` naming `where` (e.g. "--adapter 'x=dir'")."""
    if not isinstance(name, str) or not re.fullmatch(ADAPTER_NAME, name):
        raise error(f"{where}: {RULE}, got {name!r}")
    return name
