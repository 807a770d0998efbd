"""`package.module:function` references (model and data factories), resolved against the working directory.

A factory is the user's code: whatever it does wrong (its module fails to import, it needs arguments, it raises,
it calls `sys.exit`) becomes the caller's error type naming the reference, never a traceback.
"""
from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rewrite.errors import RewriteError, describe

# SystemExit too: a factory calling sys.exit() must not end a run with its exit code and nothing written
USER_FAILURES = (Exception, SystemExit)


def import_callable(text: str, error: type[RewriteError], where: str) -> Callable[..., Any]:
    """The callable named by `text`; `error(where: ...)` says what could not be imported."""
    module_name, _, fn_name = text.partition(":")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise error(f"{where}: cannot import module {module_name!r}: {err}") from None
    except USER_FAILURES as err:
        raise error(f"{where}: importing module {module_name!r} failed: {describe(err)}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise error(f"{where}: module {module_name!r} has no callable {fn_name!r}")
    return fn


def call_factory(fn: Callable[[], Any], error: type[RewriteError], where: str) -> Any:
    """`fn()`; a factory that needs arguments, or fails in any way, is `error(where: ...)`."""
    try:
        inspect.signature(fn).bind()
    except TypeError as err:
        raise error(f"{where}: a factory is called without arguments, but this one needs some ({err})") from None
    except ValueError:
        pass  # no signature to read (some builtins): calling it tells
    try:
        return fn()
    except USER_FAILURES as err:
        raise error(f"{where}: the factory raised {describe(err)}") from None
