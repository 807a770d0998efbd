"""What LoHa and LoKr share (PEFT's LyCORIS tuners): an update delta W of the base weight, built from small factors.

    y = base(x) + x delta W^T            linear
    y = base(x) + conv2d(x, delta W)     conv2d, with the base conv's stride, padding and dilation
    delta W = s * M(factors)             s = alpha / r (no rsLoRA), M [d_out, fan_in] (fan_in = d_in, or c_in kh kw)

M is the kind's own (`delta_matrix`); for conv2d it is viewed as the kernel [c_out, c_in, kh, kw]. delta W is
materialised per call, as PEFT does. Merge adds it to the base weight in place (exact); unmerge subtracts it.
The factors are kept in PEFT's own layout under PEFT's own names (`peft_tensors`: the parameter names are the key
suffixes of a PEFT directory, `base_model.model.<module>.<name>`), so reading and writing PEFT is a plain copy.
Sites: linear and conv2d (PEFT's LyCORIS layers are torch Linear, Conv1d and Conv2d; it has none for GPT-2's Conv1D).

PEFT config (`LycorisPeftConfig`: the fields LoHaConfig and LoKrConfig share): r, alpha, rank_pattern and
alpha_pattern give each module's rank and alpha (pattern keys matched as PEFT's `(.*\\.)?key$` regexes). Refused,
naming the field: rank_dropout and module_dropout other than 0 (training-time dropout of rows of delta W / of the
whole adapter) and modules_to_save. use_effective_conv2d only changes conv2d modules whose kernel is larger than 1x1
(PEFT saves them Tucker-factored, with `hada_t1` / `hada_t2` / `lokr_t2`): its linear and 1x1 modules are read,
a module holding Tucker tensors is refused by name (`refuse_tucker`). init_weights only picks an init, which loaded
weights replace: every value PEFT allows is read.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import StrictBool, field_validator
from torch import nn

from rewrite.adapters.base import AdapterKind
from rewrite.errors import AdapterFileError
from rewrite.formats.peft_dir import CONFIG, PeftAdapter, PeftConfig, compiled, pattern_value
from rewrite.formats.peft_lora import PATTERN_VALUES, PATTERNS_EXPECTED, Number, Rank


class LycorisPeftConfig(PeftConfig):
    """`adapter_config.json` fields of PEFT's LyCORIS tuners (LoHa; LoKr adds its own)."""

    expected: ClassVar[dict[str, str]] = {
        **PeftConfig.expected, **PATTERNS_EXPECTED, "r": "a whole number >= 1", "alpha": "a number",
        "rank_dropout": "a number", "module_dropout": "a number", "use_effective_conv2d": "true or false",
        "init_weights": "true, false or \"lycoris\""}
    pattern_values: ClassVar[dict[str, str]] = PATTERN_VALUES
    unsupported: ClassVar[dict[str, str]] = {
        **PeftConfig.unsupported, "rank_dropout": "rank_dropout (training-time dropout of rows of delta W)",
        "module_dropout": "module_dropout (training-time dropout of the whole adapter)"}

    r: Rank = 8
    alpha: Number = 8
    rank_pattern: dict[str, Rank] = {}
    alpha_pattern: dict[str, Number] = {}
    rank_dropout: Number = 0.0
    module_dropout: Number = 0.0
    use_effective_conv2d: StrictBool = False
    init_weights: StrictBool | Literal["lycoris"] = True

    @field_validator("rank_pattern", "alpha_pattern", mode="before")
    @classmethod
    def _patterns(cls, value: Any) -> Any:
        return compiled({} if value is None else value)


TUCKER_KEYS = ("hada_t1", "hada_t2", "lokr_t2")  # use_effective_conv2d's core tensors (conv kernels above 1x1)


def refuse_tucker(adapter: PeftAdapter) -> None:
    """A module saved Tucker-factored (use_effective_conv2d on a conv2d kernel above 1x1) is not read."""
    for module, parts in adapter.modules.items():
        tucker = [key for key in TUCKER_KEYS if key in parts]
        if tucker:
            raise AdapterFileError(f"{adapter.path / CONFIG}: 'use_effective_conv2d' = true saved module {module!r} "
                                   f"Tucker-factored ({', '.join(tucker)}); use_effective_conv2d (Tucker-factored conv "
                                   f"kernels) is not supported for {adapter.format.peft_type} adapters: train it with "
                                   "use_effective_conv2d = false (its linear and 1x1 conv modules are read either way)")


def module_settings(adapter: PeftAdapter, module: str) -> dict[str, Any]:
    """The rank and alpha PEFT gives `module` of this directory."""
    config: LycorisPeftConfig = adapter.config  # type: ignore[assignment]
    return dict(rank=pattern_value(module, config.rank_pattern, config.r),
                alpha=float(pattern_value(module, config.alpha_pattern, config.alpha)))


def lycoris_config(peft_type: str, modules: Mapping[str, "LycorisDelta"], **fields: Any) -> dict[str, Any]:
    """The config `PeftModel.from_pretrained` loads these modules with: `r` / `alpha` the most common values, the
    others in `rank_pattern` / `alpha_pattern` keyed by the full module path; `fields` are the tuner's own."""
    r = Counter(m.rank for m in modules.values()).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in modules.values()).most_common(1)[0][0]
    return {"peft_type": peft_type, "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
            "target_modules": sorted(modules), "r": r, "alpha": alpha,
            "rank_pattern": {o: m.rank for o, m in modules.items() if m.rank != r},
            "alpha_pattern": {o: m.alpha for o, m in modules.items() if m.alpha != alpha},
            "rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False, "init_weights": True,
            "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None, "modules_to_save": None,
            "revision": None, **fields}


class LycorisDelta(AdapterKind):
    """A kind whose module adds x delta W^T, delta W = s M (the module docstring); subclasses give M and the factors."""

    ops = ("linear", "conv2d")
    settings = ("rank", "alpha", "init")
    mergeable = True

    def __init__(self, op: str, d_in: int, d_out: int, rank: int, alpha: float, *, rslora: bool = False,
                 dropout: float = 0.0, init: str = "zeros", conv: dict | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", **options: Any):
        super().__init__()
        if op not in self.ops:
            raise ValueError(f"{self.kind} adapters go on {', '.join(self.ops)} sites, not {op!r}")
        if rank < 1:
            raise ValueError(f"{self.kind} rank must be >= 1, got {rank}")
        self.op, self.d_in, self.d_out, self.rank, self.alpha = op, d_in, d_out, rank, float(alpha)
        self.conv = dict(conv or {})
        for key, value in self.Options(**options).model_dump().items():
            setattr(self, key, value)
        self._make_factors(dtype=dtype, device=device)
        self.reset_parameters()

    def _make_factors(self, **factory: Any) -> None:
        """New (uninitialised) factor Parameters of the shapes `factor_shapes` gives for the current rank."""
        shapes = self.factor_shapes()
        for name, shape in shapes.items():
            setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
        self.factor_names = tuple(shapes)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def kernel(self) -> tuple[int, ...]:
        """The conv kernel size (empty for linear sites)."""
        return tuple(self.conv["kernel_size"]) if self.op == "conv2d" else ()

    @property
    def fan_in(self) -> int:
        return self.d_in * math.prod(self.kernel)

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        """The factors' PEFT key suffixes (also their parameter names) and shapes at this site and rank."""
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """PEFT's default init (delta W = 0)."""
        raise NotImplementedError

    def delta_matrix(self) -> torch.Tensor:
        """M [d_out, fan_in] (unscaled), differentiable."""
        raise NotImplementedError

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """The factor parameters by PEFT key suffix."""
        return {name: getattr(self, name) for name in self.factor_names}

    def _delta(self) -> torch.Tensor:
        return (self.delta_matrix() * self.scaling).view(self.d_out, self.d_in, *self.kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = self._delta()
        if self.op == "conv2d":
            return F.conv2d(x, delta, None, self.conv["stride"], self.conv["padding"], self.conv["dilation"])
        return F.linear(x, delta)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The change of the base weight, in the base weight's own layout."""
        return self._delta()

    @torch.no_grad()
    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None = None, sign: float = 1.0) -> None:
        if weight.is_meta:  # nothing to compute; shapes agree by construction
            return
        weight.add_(self._delta().to(weight.dtype), alpha=sign)

    @classmethod
    def peft_module(cls, adapter: PeftAdapter, module: str) -> tuple[type[LycorisDelta], dict[str, Any]]:
        return cls, module_settings(adapter, module)

    def manifest_entry(self) -> dict[str, Any]:
        return dict(op=self.op, rank=self.rank, alpha=self.alpha, scaling=self.scaling)

    def extra_repr(self) -> str:
        return f"op={self.op}, d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}, scaling={self.scaling:g}"
