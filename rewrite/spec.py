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
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rewrite.errors import SpecError, did_you_mean
from rewrite.toml_locate import TomlLocator

SPEC_VERSION = 1
DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "bool")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # TOML has nan / inf literals


class ModelOptions(Strict):
    trust_pickle: bool = False
    hf_class: str | None = Field(default=None, description="transformers class for an HF directory")


class InputSpec(Strict):
    name: str
    shape: list[int]
    dtype: Literal[DTYPES] = "float32"  # type: ignore[valid-type]
    low: float = 0.0
    high: float = 1.0
    dims: list[str] | None = None

    @field_validator("shape")
    @classmethod
    def _positive(cls, shape: list[int]) -> list[int]:
        if any(s < 1 for s in shape):
            raise ValueError("every size must be >= 1")
        return shape


class CaptureOptions(Strict):
    frontend: Literal["export", "fx"] = "export"
    device: Literal["cpu", "meta"] = "cpu"
    dynamic: bool | None = None  # default: dynamic batch/seq on cpu, static on meta (no ONNX from meta)

    @property
    def dynamic_axes(self) -> bool:
        return self.dynamic if self.dynamic is not None else self.device != "meta"
    use_cache: bool = False
    attn_implementation: Literal["eager", "sdpa", "keep"] = "eager"
    batch: int = Field(default=2, ge=2)
    seq: int = Field(default=16, ge=2)
    inputs: list[InputSpec] = []


class ExportOptions(Strict):
    format: Literal["onnx", "none"] = "onnx"
    mode: Literal["merged", "unmerged"] = "merged"
    switching: Literal["ort-adapters", "bank", "custom-op"] = "ort-adapters"
    adapters: list[str] | None = None
    capacity: int | None = Field(default=None, ge=1)
    bank_dtype: Literal["float32", "float16"] = "float32"
    opset: int | None = Field(default=None, ge=17)
    check: bool = False
    tolerance: float | None = Field(default=None, gt=0)
    external_data: Literal["auto", "always", "never"] = "auto"
    filename: str = "model.onnx"

    @field_validator("filename")
    @classmethod
    def _plain_file_name(cls, name: str) -> str:
        """The export lands directly in the output directory, so its name can never be a path."""
        if not re.fullmatch(r"[^/\\\x00-\x1f.][^/\\\x00-\x1f]*\.onnx", name):
            raise ValueError("must be a plain file name ending in .onnx (no folders, no '..', not starting with "
                             "'.'); it is written into the output directory")
        return name

    @model_validator(mode="after")
    def _half_banks_need_the_custom_op(self) -> "ExportOptions":
        if self.bank_dtype == "float16" and (self.mode, self.switching) != ("unmerged", "custom-op"):
            raise ValueError("bank_dtype = \"float16\" needs mode = \"unmerged\" and switching = \"custom-op\" "
                             f"(got mode = \"{self.mode}\", switching = \"{self.switching}\")")
        return self

    @property
    def check_tolerance(self) -> float:
        """The max abs difference `check` allows: `tolerance`, else 1e-4 (2e-3 for float16 banks, whose adapters
        are rounded to half precision)."""
        if self.tolerance is not None:
            return self.tolerance
        return 2e-3 if self.bank_dtype == "float16" else 1e-4


class DataOptions(Strict):
    """Calibration / training data: a file of named tensors (model inputs + `labels`) or a batch factory."""
    path: str | None = None
    factory: str | None = Field(default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    batch_size: int = Field(default=8, ge=1)
    loss: Literal["cross_entropy", "mse", "causal_lm", "model"] = "cross_entropy"
    output: str | int = 0
    steps: int = Field(default=100, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    warmup: float = Field(default=0.1, ge=0, le=1)
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip: float | None = Field(default=1.0, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _one_source(self) -> "DataOptions":
        if (self.path is None) == (self.factory is None):
            raise ValueError("[data] needs exactly one of 'path' (a tensor file) or 'factory' (package.module:function)")
        return self


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

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path else Path.cwd()

    def location(self, *key: Any) -> str:
        return _Located(self.path, self.text).where(key)


class _Located:
    def __init__(self, path: Path | None, text: str):
        self.path, self.locator = path, TomlLocator(text)

    def where(self, key: tuple) -> str:
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
            got_txt = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{where}: '{_key_path(loc)}': {problem['msg']}{got_txt}")
    raise SpecError("invalid spec:\n  " + "\n  ".join(lines))


def _fields(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def parse_spec(text: str, path: Path | None = None) -> Spec:
    """Parse and validate a spec; raises `SpecError` naming the TOML location of the first problems."""
    from rewrite.passes import REGISTRY

    located = _Located(path, text)
    name = str(path) if path else "<spec>"
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
        if pass_name not in REGISTRY:
            raise SpecError(f"{located.where(('pass', index, 'name'))}: unknown pass {pass_name!r}."
                            f"{did_you_mean(pass_name, REGISTRY)} Registered passes: {', '.join(REGISTRY)}")
        options_type = REGISTRY[pass_name].Options
        options = {k: v for k, v in entry.items() if k != "name"}
        try:
            parsed = options_type.model_validate(options)
        except ValidationError as err:
            _raise_validation(err, ("pass", index), located, {("pass",): ["name", *_fields(options_type)]})
        passes.append(PassEntry(pass_name, parsed, index))
    return Spec(path=path, digest=hashlib.sha256(text.encode()).hexdigest(), model=top.model,
                capture=top.capture, export=top.export, passes=passes, data=top.data, text=text)


def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: spec file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"{path}: cannot read the spec: {err}") from None
    return parse_spec(text, path)


def default_spec() -> Spec:
    """The spec used by `rewrite inspect` without --spec: capture settings only."""
    return parse_spec(f"version = {SPEC_VERSION}\n")
