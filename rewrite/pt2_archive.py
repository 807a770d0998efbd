"""Read a torch.export archive (`.pt2`) without running code from it.

`torch.export.load` trusts its file in three ways: pickled weights, constants and sample inputs are
unpickled in full (`torch.load(weights_only=False)`, `pickle.loads`, torch's object unpickler); symbolic
shape strings go through `sympy.sympify`, which is `eval`. (Graph targets are checked by torch itself: its
verifier refuses a node that calls anything but an operator.) An archive the user has not trusted is read
under three guards:

    1. every `torch.load` is weights-only: tensors and plain containers, nothing imported or called;
    2. the other unpicklers (`pickle.loads`, `torch._C._pickle_load_obj`) are refused;
    3. every symbolic expression is parsed before sympy sees it and must be arithmetic on symbols and
       numbers with sympy's integer functions: no attribute, no private name, no other call.

A trusted archive (`--trust-pickle` / `[model] trust_pickle = true`) is read by `torch.export.load` as is.
"""
from __future__ import annotations

import ast
import contextlib
import logging
import pickle
import re
from collections.abc import Iterator
from pathlib import Path

import sympy
import torch
import torch.utils._sympy.functions as torch_sympy

from rewrite.errors import ModelLoadError, first_line

_TRUST_HINT = ("Only load it as it is if you made or trust the file: pass --trust-pickle (or set [model] "
               "trust_pickle = true in the spec).")

_SYMPY_CALLS = frozenset(torch_sympy.__all__) | {
    "Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Max", "Min", "Abs", "Mod", "floor",
    "ceiling", "sqrt", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "Piecewise", "ITE",
}
_EXPR_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Call, ast.Name,
               ast.Constant, ast.keyword, ast.Load, ast.operator, ast.unaryop, ast.boolop, ast.cmpop, ast.Tuple)
_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


class _Refused(Exception):
    """Raised inside torch's loader; deliberately not a RuntimeError, which torch.export.load swallows."""


def check_sym_expr(text: str) -> None:
    """Raise `_Refused` unless `text` is sympy arithmetic on symbols and numbers (see guard 3)."""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise _Refused(f"a symbolic size that is not an expression: {text[:80]!r}") from None
    for node in ast.walk(tree):
        bad = not isinstance(node, _EXPR_NODES)
        if isinstance(node, ast.Call):
            bad = not (isinstance(node.func, ast.Name) and node.func.id in _SYMPY_CALLS)
        elif isinstance(node, ast.Name):
            bad = node.id.startswith("_")
        elif isinstance(node, ast.Constant):
            value = node.value  # strings only as symbol names: Symbol('s0', integer=True)
            bad = not (isinstance(value, (bool, int, float))
                       or (isinstance(value, str) and _IDENTIFIER.fullmatch(value)))
        if bad:
            raise _Refused(f"a symbolic size that is not plain arithmetic: {text[:80]!r}")


class _Guards:
    """Guards 1-3 while torch reads the archive; what they refused is kept even if torch catches it."""

    def __init__(self):
        self.refused: list[str] = []

    def _refuse(self, what: str) -> None:
        self.refused.append(what)
        raise _Refused(what)

    def torch_load(self, real):
        def weights_only_load(f, *args, **kwargs):
            kwargs["weights_only"] = True
            try:
                return real(f, *args, **kwargs)
            except pickle.UnpicklingError as err:
                self._refuse(f"a pickled object that is not plain tensors ({first_line(err)})")
        return weights_only_load

    def unpickler(self, name: str):
        def refuse(*_args, **_kwargs):
            self._refuse(f"a pickled object ({name})")
        return refuse

    def sympify(self, real):
        def checked(expr, *args, **kwargs):
            if isinstance(expr, str):
                try:
                    check_sym_expr(expr)
                except _Refused as err:
                    self._refuse(str(err))
            return real(expr, *args, **kwargs)
        return checked

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        # These swaps are process-wide for the duration of one load: the CLI loads one model at a time.
        swaps = [(torch, "load", self.torch_load(torch.load)), (pickle, "loads", self.unpickler("pickle.loads")),
                 (torch._C, "_pickle_load_obj", self.unpickler("torch script object")),
                 (sympy, "sympify", self.sympify(sympy.sympify))]
        saved = [(owner, name, getattr(owner, name)) for owner, name, _ in swaps]
        try:
            for owner, name, value in swaps:
                setattr(owner, name, value)
            yield
        finally:
            for owner, name, value in saved:
                setattr(owner, name, value)


@contextlib.contextmanager
def _quiet_torch_export_logs() -> Iterator[None]:
    """torch.export.load logs tracebacks on a bad archive; the user gets our one-line error instead."""
    names = [n for n in (*logging.Logger.manager.loggerDict, "torch.export", "torch._export")
             if n.startswith(("torch.export", "torch._export"))]
    loggers = [logging.getLogger(n) for n in dict.fromkeys(names)]
    before = [lg.disabled for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        yield
    finally:
        for lg, was in zip(loggers, before):
            lg.disabled = was


def load_archive(path: Path, *, trust: bool) -> torch.export.ExportedProgram:
    """The ExportedProgram in `path`; raises `ModelLoadError` for a corrupt archive, or, unless `trust`, for one
    that holds code (pickled objects, expressions that are not arithmetic)."""
    guards = _Guards()
    program = None
    try:
        with _quiet_torch_export_logs(), (contextlib.nullcontext() if trust else guards.installed()):
            program = torch.export.load(path)
    except Exception as err:  # noqa: BLE001 - any failure to read a user's archive is bad input
        if not guards.refused:
            raise ModelLoadError(f"{path}: not a readable torch.export archive: {first_line(err)}") from None
    if guards.refused:
        raise ModelLoadError(f"{path}: this archive holds {guards.refused[0]}; loading it could run code from "
                             f"the file. {_TRUST_HINT}")
    return program
