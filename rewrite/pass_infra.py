"""The pass contract and the manager that runs a spec's passes in order.

A pass is a small class: `name` (its key in the spec), an `Options` pydantic model, and
`call(gm) -> PassResult`. Passes edit the graph in place and do not recompile; the manager lints and
recompiles once per modifying pass, records the history in `RewriteState`, and wraps every failure as
"while running pass N 'x' (after a, b): ...". Running a pass a second time reports `modified=False`.

With `verify=True`, after each pass that promises equivalence for its options (insert with an identity
init, merge) the outputs on the example inputs are compared with those from before the pass.
"""
from __future__ import annotations

import copy
import os
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.fx as fx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from rewrite.capture import max_abs_diff
from rewrite.distributed import is_main
from rewrite.errors import PassError, RewriteError, SpecError, VerifyError, describe
from rewrite.finite import nonfinite_key
from rewrite.state import PassRecord, RewriteState, state_of


class PassOptions(BaseModel):
    """Base of every pass's options: unknown keys and NaN / Inf numbers (TOML has `nan`, `inf`) are refused, and
    nothing is coerced (strict: `rank = "8"` or `alpha = true` is an error; an integer is a valid float)."""
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _finite_in_tables(cls, value: Any) -> Any:
        """Free-form tables (`settings`, `adalora`, ...) reach code that takes any number: refuse NaN / Inf in
        them too (`allow_inf_nan` covers only what is typed float, before this runs)."""
        key = nonfinite_key(value)
        if key is not None:
            raise ValueError(f"{key or 'the value'} is NaN or Infinity; numbers must be finite")
        return value


class AdapterChoice(PassOptions):
    """`adapters`: the adapters a pass acts on (default: every attached one; an empty list would act on none)."""
    adapters: list[str] | None = Field(default=None, min_length=1)

    def chosen(self, names: Iterable[str]) -> list[str]:
        """The names in `names` the pass acts on: all of them, or those listed in `adapters`."""
        return [n for n in names if self.adapters is None or n in self.adapters]


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """Where a pass resolves relative paths and how it names its spec location in errors. `write` False: the pass
    computes everything and writes no file (the processes other than rank 0 of a torch.distributed run, which is
    the default there: rewrite.distributed rule 5)."""
    spec_dir: Path = Path(".")
    output_dir: Path | None = None
    where: str = "<spec>"
    locate: Callable[[str], str] | None = None  # key -> "spec.toml:LINE" of that key in this pass
    data: Any = None  # rewrite.options.DataOptions from [data], for data-driven passes
    write: bool = field(default_factory=is_main)

    def at(self, key: str) -> str:
        return self.locate(key) if self.locate else self.where

    def input_path(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else self.spec_dir / p

    def output_path(self, path: str, key: str, *, outside: bool = False) -> Path:
        """Where the spec key `key` = `path` is written: every path the passes write passes through here.

        A relative path must resolve (following the symlinks that already exist) strictly inside the output
        directory; the resolved path is returned. An absolute path is accepted only with `outside` (an explicit
        spec option) and only while nothing exists there: outside the output directory nothing is ever replaced.
        Anything else is a SpecError naming the key.
        """
        p = Path(path)
        if p.is_absolute():
            if not outside:
                raise SpecError(f"{self.at(key)}: {key} = {path!r} is an absolute path; paths are relative to the "
                                "output directory (only an explicit option such as save's allow_outside = true "
                                "writes elsewhere)")
            if os.path.lexists(p):
                raise SpecError(f"{self.at(key)}: {key} = {path!r} already exists; a path outside the output "
                                "directory is never replaced")
            return p
        root = (self.output_dir or Path(".")).resolve()
        target = (root / p).resolve()
        if target == root:
            raise SpecError(f"{self.at(key)}: {key} = {path!r} names the output directory itself; name a file "
                            "or folder inside it")
        if not target.is_relative_to(root):
            raise SpecError(f"{self.at(key)}: {key} = {path!r} leaves the output directory")
        return target


def real_weights(gm: fx.GraphModule, where: str, needs: str) -> RewriteState:
    """The graph's state, once it is known to hold real weights (not a meta-device capture)."""
    state = state_of(gm)
    if state.device == "meta":
        raise SpecError(f"{where}: {needs}: capture on a real device, not meta")
    return state


class GraphPass:
    name: ClassVar[str]
    Options: ClassVar[type[PassOptions]]

    def __init__(self, options: PassOptions | None = None, context: PassContext | None = None):
        self.options = options if options is not None else self.Options()
        self.context = context or PassContext()

    def preserves_outputs(self) -> bool:
        """True when this pass, with these options, must leave the outputs unchanged."""
        return False

    def writes(self) -> list[str]:
        """The files this pass writes, relative to the output directory as its options name them (`--dry-run`)."""
        return []

    def check_paths(self) -> None:
        """Before the model is loaded: the files this pass reads exist and the paths it writes are allowed (a
        SpecError naming the key otherwise), so a typo fails in a second, not after the capture."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        raise NotImplementedError

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        result = self.call(gm)
        if result.modified:
            result.graph_module.graph.lint()
            result.graph_module.recompile()
        return result


@dataclass
class ScheduledPass:
    graph_pass: GraphPass
    label: str  # "pass[2] 'merge'" as the user wrote it


class PassManager:
    def __init__(self, passes: list[ScheduledPass], *, verify: bool = False, tolerance: float = 1e-5,
                 on_step: Callable[[str, float, PassResult], None] | None = None):
        self.passes, self.verify, self.tolerance, self.on_step = passes, verify, tolerance, on_step

    def check_paths(self) -> None:
        """Every pass's `check_paths`, before the model is loaded; errors name the pass as `run`'s do."""
        for scheduled in self.passes:
            try:
                scheduled.graph_pass.check_paths()
            except RewriteError as err:
                raise type(err)(f"checking {scheduled.label}: {err}") from None

    def run(self, gm: fx.GraphModule, *, copy_model: bool = True) -> fx.GraphModule:
        """Run every pass in order on a copy of `gm` (the user's weights are never modified)."""
        if copy_model and state_of(gm).device != "meta":  # meta tensors hold no user weights to protect
            with warnings.catch_warnings():  # torch's own pytree specs warn about themselves when copied
                warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
                gm = copy.deepcopy(gm)
        state = state_of(gm)
        reference = None
        done: list[str] = []
        for scheduled in self.passes:
            graph_pass = scheduled.graph_pass
            check = self.verify and graph_pass.preserves_outputs() and state.device != "meta"
            if check and reference is None:
                reference = self._outputs(gm)
            start = time.perf_counter()
            try:
                result = graph_pass(gm)
            except RewriteError as err:
                raise type(err)(f"while running {scheduled.label}{self._after(done)}: {err}") from None
            except Exception as err:  # noqa: BLE001 - an internal failure still names the pass
                raise PassError(f"while running {scheduled.label}{self._after(done)}: internal error "
                                f"{describe(err)}") from err
            seconds = time.perf_counter() - start
            gm = result.graph_module
            if check:
                diff = max_abs_diff(reference, self._outputs(gm))
                result.stats["verify_max_abs_diff"] = diff
                if not diff <= self.tolerance:
                    raise VerifyError(f"--verify: {scheduled.label} promises unchanged outputs, but the max abs "
                                      f"difference on the example inputs is {diff:.3g} (> {self.tolerance:g})")
            elif self.verify and state.device != "meta":
                reference = None
            state.record(PassRecord(graph_pass.name, result.modified, seconds, result.stats))
            if self.on_step:
                self.on_step(scheduled.label, seconds, result)
            done.append(graph_pass.name)
        return gm

    @staticmethod
    def _after(done: list[str]) -> str:
        return f" (after {', '.join(done)})" if done else ""

    @staticmethod
    def _outputs(gm: fx.GraphModule) -> Any:
        inputs = state_of(gm).inputs
        with torch.no_grad():
            return gm(**inputs.kwargs)
