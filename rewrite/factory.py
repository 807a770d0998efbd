"""`package.module:function` references (model and data factories), resolved against the working directory."""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rewrite.errors import RewriteError


def import_callable(text: str, error: type[RewriteError], where: str) -> Callable[..., Any]:
    """The callable named by `text`; `error(where: ...)` says what could not be imported."""
    module_name, _, fn_name = text.partition(":")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise error(f"{where}: cannot import module {module_name!r}: {err}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise error(f"{where}: module {module_name!r} has no callable {fn_name!r}")
    return fn
