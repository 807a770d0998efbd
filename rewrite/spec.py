"""The spec: `spec.toml` parsed and validated once, up front.

    version = 1
    [model]    how MODEL is loaded (trust_pickle, HF class)
    [capture]  front-end, device, dynamic dims, example inputs
    [data]     calibration / training data for data-driven passes (a tensor file or a batch factory)
    [[pass]]   ordered passes; `name` picks the pass, the other keys are its typed options
    [export]   what is written (merged ONNX, check against ONNX Runtime)

Every problem becomes one `SpecError` naming `file:line`, the key path, what was expected and what
nearly matched. Nothing is written before the whole spec has validated.
"""
from __future__ import annotations

import hashlib
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from rewrite.errors import SpecError, did_you_mean
from rewrite.options import (CaptureOptions, DataOptions, ExportOptions, InputSpec, ModelOptions, Reserve, Strict,
                             TritonOptions)
from rewrite.toml_locate import TomlLocator

SPEC_VERSION = 1


class _Top(Strict):
    version: int
    model: ModelOptions = ModelOptions()
    capture: CaptureOptions = CaptureOptions()
    data: DataOptions | None = None
    export: ExportOptions = ExportOptions()
    pass_: list[dict[str, Any]] = Field(default=[], alias="pass")


@dataclass(frozen=True)
class PassEntry:
    name: str
    options: Any
    index: int


@dataclass(frozen=True)
class Spec:
    path: Path | None
    digest: str
    model: ModelOptions
    capture: CaptureOptions
    export: ExportOptions
    passes: list[PassEntry] = field(default_factory=list)
    data: DataOptions | None = None
    text: str = field(default="", repr=False)
    origin: str | None = None  # a spec made from a command line (`rewrite bundle`): errors name it, not a line

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path else Path.cwd()

    def location(self, *key: Any) -> str:
        return _Located(self.path, self.text, self.origin).where(key)


class _Located:
    def __init__(self, path: Path | None, text: str, origin: str | None = None):
        self.path, self.locator, self.origin = path, TomlLocator(text), origin

    def where(self, key: tuple) -> str:
        if self.origin:  # the user never saw this spec's lines
            return self.origin
        line = self.locator.line(key)
        name = str(self.path) if self.path else "<spec>"
        return f"{name}:{line}" if line else name


def _key_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _raise_validation(err: ValidationError, prefix: tuple, located: _Located, known: dict[tuple, list[str]]):
    lines = []
    for problem in err.errors():
        loc = tuple("pass" if p == "pass_" else p for p in (*prefix, *problem["loc"]))
        where = located.where(loc)
        if problem["type"] == "extra_forbidden":
            valid = known.get(tuple(p for p in loc[:-1] if not isinstance(p, int)), [])
            hint = did_you_mean(str(loc[-1]), valid)
            valid_txt = f" Valid keys: {', '.join(valid)}." if valid else ""
            lines.append(f"{where}: unknown key '{_key_path(loc)}'.{hint}{valid_txt}")
        else:
            got = problem.get("input")
            tables = isinstance(got, dict) or isinstance(got, list) and any(isinstance(g, dict) for g in got)
            got_txt = "" if tables else f" (got {got!r})"
            message = problem["msg"].removeprefix("Value error, ")  # our validators' own words, as written
            lines.append(f"{where}: '{_key_path(loc)}': {message}{got_txt}")
    raise SpecError("invalid spec:\n  " + "\n  ".join(lines))


def _fields(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _check_writes(passes: list[PassEntry], export: ExportOptions, located: _Located) -> None:
    """A pass writing one of the export's files (manifest.json, the model, its .data, adapters/*.onnx_adapter,
    triton/), or two kinds of pass, or saves of two adapters, writing one path: the later would silently replace what
    the other wrote. The same pass on the same adapter may write a path again (a re-run, another format of it)."""
    from rewrite.formats.manifest import MANIFEST
    from rewrite.passes import REGISTRY

    onnx = export.format == "onnx"
    exported = {MANIFEST} | ({export.filename, f"{export.filename}.data"} if onnx else set())
    ort_adapters = onnx and (export.mode, export.switching) == ("unmerged", "ort-adapters")
    first: dict[str, PassEntry] = {}
    for entry in passes:
        where = located.where(("pass", entry.index))
        for name in REGISTRY[entry.name](entry.options).writes():
            norm = Path(os.path.normpath(name))
            if norm.is_absolute() or norm == Path("."):  # the pass itself refuses "" and checks outside paths
                continue
            if (norm.parts[0] in exported or norm.parts[0] == "triton" and onnx and export.target == "triton"
                    or norm.parts[0] == "adapters" and norm.suffix == ".onnx_adapter" and ort_adapters):
                raise SpecError(f"{where}: pass '{entry.name}' writes {name!r}, where the export writes "
                                f"{norm.parts[0]!r}; choose another name")
            earlier = first.setdefault(str(norm), entry)
            if (earlier.name, getattr(earlier.options, "adapter", None)) != \
                    (entry.name, getattr(entry.options, "adapter", None)):
                raise SpecError(f"{where}: pass '{entry.name}' writes {name!r}, which pass '{earlier.name}' "
                                f"({located.where(('pass', earlier.index))}) writes too; the second would replace "
                                "the first: choose another name")


def parse_spec(text: str, path: Path | None = None, origin: str | None = None) -> Spec:
    """Parse and validate a spec; raises `SpecError` naming the TOML location of the first problems (or `origin`,
    the command that wrote the spec)."""
    from rewrite.passes import REGISTRY

    located = _Located(path, text, origin)
    name = origin or (str(path) if path else "<spec>")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        line = re.search(r"at line (\d+)", str(err))
        raise SpecError(f"{name}{':' + line.group(1) if line else ''}: not valid TOML: {err}") from None
    known = {
        (): _fields(_Top),
        ("model",): _fields(ModelOptions),
        ("capture",): _fields(CaptureOptions),
        ("capture", "inputs"): _fields(InputSpec),
        ("export",): _fields(ExportOptions),
        ("export", "reserve"): _fields(Reserve),
        ("export", "triton"): _fields(TritonOptions),
        ("data",): _fields(DataOptions),
    }
    if "version" not in raw:
        raise SpecError(f"{name}: missing top-level key 'version' (expected: version = {SPEC_VERSION})")
    if raw["version"] != SPEC_VERSION:
        raise SpecError(f"{located.where(('version',))}: 'version' is {raw['version']!r}; "
                        f"this rewrite reads spec version {SPEC_VERSION}")
    try:
        top = _Top.model_validate(raw)
    except ValidationError as err:
        _raise_validation(err, (), located, known)
    passes = []
    for index, entry in enumerate(top.pass_):
        where = located.where(("pass", index))
        if "name" not in entry:
            raise SpecError(f"{where}: [[pass]] number {index + 1} has no 'name'. "
                            f"Registered passes: {', '.join(REGISTRY)}")
        pass_name = entry["name"]
        if not isinstance(pass_name, str) or pass_name not in REGISTRY:
            raise SpecError(f"{located.where(('pass', index, 'name'))}: unknown pass {pass_name!r}."
                            f"{did_you_mean(str(pass_name), REGISTRY)} Registered passes: {', '.join(REGISTRY)}")
        options_type = REGISTRY[pass_name].Options
        options = {k: v for k, v in entry.items() if k != "name"}
        try:
            parsed = options_type.model_validate(options)
        except ValidationError as err:
            _raise_validation(err, ("pass", index), located, {("pass",): ["name", *_fields(options_type)]})
        passes.append(PassEntry(pass_name, parsed, index))
    _check_writes(passes, top.export, located)
    return Spec(path=path, digest=hashlib.sha256(text.encode()).hexdigest(), model=top.model,
                capture=top.capture, export=top.export, passes=passes, data=top.data, text=text, origin=origin)


def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: spec file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not TOML
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"{path}: cannot read the spec: {err}") from None
    return parse_spec(text, path)


def default_spec() -> Spec:
    """The spec used by `rewrite inspect` without --spec: capture settings only."""
    return parse_spec(f"version = {SPEC_VERSION}\n")
