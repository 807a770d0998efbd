"""The typed sections of a spec: what each table of `spec.toml` may hold, validated strictly.

    [model]    ModelOptions     how MODEL is loaded (trust_pickle, HF class)
    [capture]  CaptureOptions   front-end, device, dynamic dims, example inputs (InputSpec)
    [data]     DataOptions      calibration / training data (a tensor file or a batch factory)
    [export]   ExportOptions    what is written (merged / unmerged ONNX, switching, check)

Unknown keys and NaN / Inf numbers are refused, and nothing is coerced (strict: `batch = "2"`, `check = 1` and
`tolerance = true` are errors; an integer is a valid float). The layers below the spec parser (capture, data,
export) take these objects whole; `rewrite.spec` parses the file into them and names TOML locations in errors.
"""
from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_EXAMPLE_ELEMENTS = 2**31  # 8 GiB of float32: beyond, drawing the example input itself fails

DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "bool")


class Strict(BaseModel):
    # TOML has nan / inf literals
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


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
        if math.prod(shape) > MAX_EXAMPLE_ELEMENTS:
            raise ValueError(f"{math.prod(shape)} elements; an example input only has to be traced, keep it under "
                             f"{MAX_EXAMPLE_ELEMENTS} (name an axis in dims to keep it dynamic)")
        return shape

    @model_validator(mode="after")
    def _consistent(self) -> "InputSpec":
        if self.dims is not None and len(self.dims) != len(self.shape):
            raise ValueError(f"input {self.name!r}: dims has {len(self.dims)} entries for shape {self.shape} (one "
                             "per axis: a name makes the axis dynamic, \"\" keeps it static)")
        # integers are drawn from [low, high): the range must hold one
        empty = self.low >= self.high if self.dtype.startswith("int") else self.low > self.high
        if empty:
            raise ValueError(f"input {self.name!r}: low = {self.low} and high = {self.high} leave no values to draw "
                             f"(expected low {'<' if self.dtype.startswith('int') else '<='} high)")
        return self


class CaptureOptions(Strict):
    frontend: Literal["export", "fx"] = "export"
    device: Literal["cpu", "meta"] = "cpu"
    dynamic: bool | None = None  # default: dynamic batch/seq on cpu, static on meta (no ONNX from meta)

    @property
    def dynamic_axes(self) -> bool:
        return self.dynamic if self.dynamic is not None else self.device != "meta"
    use_cache: bool = False  # decoders: capture with the KV cache as flat inputs / outputs (rewrite.decoder)
    attn_implementation: Literal["eager", "sdpa", "keep"] = "eager"
    stamp: bool = True  # export 2 blocks of a stack of identical layers, stamp copies (rewrite.stamp)
    batch: int = Field(default=2, ge=2)
    seq: int = Field(default=16, ge=2)
    inputs: list[InputSpec] = []

    @field_validator("inputs")
    @classmethod
    def _one_size_per_name(cls, inputs: list[InputSpec]) -> list[InputSpec]:
        """Input names are unique, and a dynamic dim name stands for one size wherever it appears (torch.export
        would refuse the example inputs with a guard on the model's code)."""
        names = [spec.name for spec in inputs]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"input name(s) {repeated} given more than once")
        sizes: dict[str, tuple[str, int, int]] = {}
        for spec in inputs:
            for axis, (dim, size) in enumerate(zip(spec.dims or (), spec.shape)):
                first = sizes.setdefault(dim, (spec.name, axis, size)) if dim else None
                if first and first[2] != size:
                    raise ValueError(f"dim {dim!r} is {first[2]} on axis {first[1]} of input {first[0]!r} but {size} "
                                     f"on axis {axis} of input {spec.name!r}; one name is one size (use another name "
                                     "for an independent axis)")
        return inputs


class Reserve(Strict):
    """`[export] reserve`: adapter slots kept free in an unmerged export for adapters added while serving.

    rank     every selected site's slot holds adapters up to this rank (bank / custom-op; zero-filled, and adapters of
             lower rank are zero-padded, which is exact). ort-adapters' rank dims are symbolic: any rank fits there.
    targets  selectors (`rewrite.sites` rules: glob, `re:`, `class:`, exact name or dotted suffix) of further Linear /
             Conv1D sites that get a slot even though no exported adapter touches them (`lm_head`, ...).

The selected sites are those holding an exported adapter plus those `targets` selects."""
    rank: int | None = Field(default=None, ge=1)
    targets: list[str] = []

    @field_validator("targets")
    @classmethod
    def _selectors(cls, targets: list[str]) -> list[str]:
        """Malformed selectors are refused here; what they match is resolved against the model's sites at export."""
        for text in targets:
            if not text:
                raise ValueError("a selector must be a non-empty string")
            if text.startswith("re:"):
                try:
                    re.compile(text[3:])
                except re.error as err:
                    raise ValueError(f"selector {text!r} is not a valid regular expression: {err}") from None
        return targets

    @model_validator(mode="after")
    def _something(self) -> "Reserve":
        if self.rank is None and not self.targets:
            raise ValueError("give 'rank' (slot rank at every selected site), 'targets' (sites to reserve), or both")
        return self


class TritonOptions(Strict):
    """`[export] triton = { ... }` (with `target = "triton"`) and the flags of `rewrite triton`: what the Triton model
    repository holds besides the model: batching, instances, and where the server sees the repository."""
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # default: OUT's folder name
    max_batch_size: int = Field(default=32, ge=1)
    preferred_batch_sizes: list[int] | None = None  # default: 4, 8, 16, ... up to max_batch_size
    queue_delay_us: int = Field(default=500, ge=0)  # how long the batcher waits to fill a batch
    instances: int = Field(default=1, ge=1)
    kind: Literal["cpu", "gpu"] = "cpu"
    intra_op_threads: int | None = Field(default=None, ge=1)
    server_repo: str | None = None  # REPO's absolute path in the server (default: where it is written)

    @field_validator("server_repo")
    @classmethod
    def _absolute(cls, path: str | None) -> str | None:
        if path is not None and not path.startswith("/"):
            raise ValueError(f"{path!r} must be an absolute path (where the server mounts the repository, e.g. /models)")
        return path

    @model_validator(mode="after")
    def _preferred_within_the_max(self) -> "TritonOptions":
        bad = [s for s in self.preferred_batch_sizes or () if not 1 <= s <= self.max_batch_size]
        if bad:
            raise ValueError(f"preferred batch size {bad[0]}: must be within 1..max_batch_size ({self.max_batch_size})")
        return self

    @property
    def preferred(self) -> tuple[int, ...]:
        if self.preferred_batch_sizes is not None:
            return tuple(sorted(set(self.preferred_batch_sizes)))
        sizes = [s for s in (4, 8, 16, 32, 64, 128, 256) if s < self.max_batch_size]
        return (*sizes, self.max_batch_size)


class ExportOptions(Strict):
    """`[export]`: what is written.

    mode = "unmerged" keeps adapters switchable (`switching`, `adapters`, `capacity`, `bank_dtype`); `reserve` keeps
    slots for adapters added while serving: `reserve = { rank = 16, targets = ["q_proj", "lm_head"] }` gives every
    site holding an exported adapter, and every Linear / Conv1D site `targets` selects, a slot of rank >= 16 (see
    `Reserve`), so `AdapterSession.add_adapter` accepts any adapter of rank <= 16 on those sites."""
    format: Literal["onnx", "none"] = "onnx"
    mode: Literal["merged", "unmerged"] = "merged"
    switching: Literal["ort-adapters", "bank", "custom-op"] = "ort-adapters"
    adapters: list[str] | None = None
    capacity: int | None = Field(default=None, ge=1)
    bank_dtype: Literal["float32", "float16"] = "float32"
    reserve: Reserve | None = None
    opset: int | None = Field(default=None, ge=17)
    check: bool = False
    tolerance: float | None = Field(default=None, gt=0)
    external_data: Literal["auto", "always", "never"] = "auto"
    filename: str = "model.onnx"
    target: Literal["onnxruntime", "triton"] = "onnxruntime"  # triton: also OUT/triton/<name>/ (`rewrite triton`)
    triton: TritonOptions | None = None

    @field_validator("filename")
    @classmethod
    def _plain_file_name(cls, name: str) -> str:
        """The export lands directly in the output directory, so its name can never be a path."""
        if not re.fullmatch(r"[^/\\\x00-\x1f.][^/\\\x00-\x1f]*\.onnx", name):
            raise ValueError("must be a plain file name ending in .onnx (no folders, no '..', not starting with "
                             "'.'); it is written into the output directory")
        return name

    @field_validator("adapters")
    @classmethod
    def _each_once(cls, adapters: list[str] | None) -> list[str] | None:
        repeated = sorted({a for a in adapters or () if adapters.count(a) > 1})
        if repeated:
            raise ValueError(f"{repeated} listed more than once; each adapter is exported once")
        return adapters

    @model_validator(mode="after")
    def _half_banks_need_the_custom_op(self) -> "ExportOptions":
        if self.bank_dtype == "float16" and (self.mode, self.switching) != ("unmerged", "custom-op"):
            raise ValueError("bank_dtype = \"float16\" needs mode = \"unmerged\" and switching = \"custom-op\" "
                             f"(got mode = \"{self.mode}\", switching = \"{self.switching}\")")
        return self

    @model_validator(mode="after")
    def _triton_needs_a_routed_export(self) -> "ExportOptions":
        if self.target == "triton" and (self.mode, self.switching) not in (("unmerged", "bank"),
                                                                          ("unmerged", "custom-op")):
            raise ValueError("target = \"triton\" needs mode = \"unmerged\" with switching = \"bank\" or "
                             f"\"custom-op\" (got mode = \"{self.mode}\", switching = \"{self.switching}\"): "
                             "Triton's batcher mixes requests for different adapters in one batch only through "
                             "per-row adapter ids")
        if self.triton is not None and self.target != "triton":
            raise ValueError("a triton table needs target = \"triton\"")
        return self

    @model_validator(mode="after")
    def _reserve_fits_the_mode(self) -> "ExportOptions":
        if self.reserve is None:
            return self
        if self.mode != "unmerged":
            raise ValueError(f"reserve needs mode = \"unmerged\" (got mode = \"{self.mode}\"): a merged export has no "
                             "adapter slots")
        if self.switching != "ort-adapters" and self.reserve.targets and self.reserve.rank is None:
            raise ValueError(f"reserve.targets with switching = \"{self.switching}\" needs reserve.rank: the rank of "
                             "the bank slots kept at those sites")
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

    @field_validator("output")
    @classmethod
    def _output_index(cls, output: str | int) -> str | int:
        if isinstance(output, int) and output < 0:
            raise ValueError(f"{output}: an output index counts from 0 (the first tensor output), or give its name")
        return output

    @model_validator(mode="after")
    def _one_source(self) -> "DataOptions":
        if (self.path is None) == (self.factory is None):
            raise ValueError("[data] needs exactly one of 'path' (a tensor file) or 'factory' (package.module:function)")
        return self
