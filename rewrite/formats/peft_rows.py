"""PEFT directories of the elementwise tuners ((IA)^3, RoAd, BEFT), and their tensors read as row vectors (torch-free).

The formats (config models, key layouts, size checks) are the ones the adapter kinds read and write
(rewrite/adapters/ia3.py, road.py, bitfit.py import them); `row_vectors` turns one module's PEFT tensors into what the
kind's `row_params()` gives, so the runtime can fill a row bank without torch:

    IA3   ia3_l [d_out, 1]  -> kind "ia3",    l = ia3_l[:, 0]      (a module `feedforward_modules` does not name)
          ia3_l [1, d_in]   -> kind "ia3_ff", l = ia3_l[0]         (a module it names: the input is scaled)
    ROAD  road_theta, road_alpha (variant, group_size g) -> kind "road", layout {"group_size": g},
          c1 = alpha cos theta, c2 = alpha sin theta per channel:
              road_1  theta, alpha [d_out / 2]: each pair's value on both of its channels (i and i + g/2)
              road_2  theta, alpha [d_out]: one per channel
              road_4  theta, alpha [2 d_out]: per group of 2g entries, the first g give c1, the last g give c2
    BEFT  beft_bias [1, d_out] -> kind "bitfit", b = beft_bias[0]

Vectors are float32, identities as the kinds declare them (l = 1, c1 = 1, c2 = 0, b = 0).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import AfterValidator, Field, StrictBool, StrictInt, StrictStr, field_validator

from rewrite.errors import AdapterFileError
from rewrite.formats.peft_dir import CONFIG, WEIGHTS, PeftAdapter, PeftConfig, PeftFormat, compiled, tensor_key

# ---------------------------------------------------------------------------------------------------------- (IA)^3

IA3_KEY = "ia3_l"


class IA3PeftConfig(PeftConfig):
    """`adapter_config.json` of an IA3 adapter: `feedforward_modules` (a subset of the targets) scale inputs."""

    expected: ClassVar[dict[str, str]] = {**PeftConfig.expected,
                                          "feedforward_modules": "a list of module names or a regex string"}

    peft_type: StrictStr = "IA3"
    feedforward_modules: list[StrictStr] | StrictStr | None = None

    @field_validator("feedforward_modules")
    @classmethod
    def _regexes(cls, value):
        return compiled(value)

    def scales_input(self, module: str) -> bool:
        """PEFT's rule (`_check_target_module_feedforward`): a regex string matched in full, else any list entry
        the module path ends with (a plain string suffix, not a dotted one)."""
        names = self.feedforward_modules
        if isinstance(names, str):
            return re.fullmatch(names, module) is not None
        return any(module.endswith(n) for n in names or [])


IA3_FORMAT = PeftFormat("IA3", IA3PeftConfig, ((IA3_KEY,),))

# ------------------------------------------------------------------------------------------------------------ RoAd

THETA, ALPHA = "road_theta", "road_alpha"
VARIANTS = ("road_1", "road_2", "road_4")
Variant = Literal[VARIANTS]  # type: ignore[valid-type]
PARAMS_PER_CHANNEL = {"road_1": 0.5, "road_2": 1, "road_4": 2}  # entries of theta (and of alpha) per output channel


def _even(group_size: int) -> int:
    if group_size % 2:
        raise ValueError(f"group_size = {group_size}; it must be even (channel i pairs with i + group_size / 2)")
    return group_size


GroupSize = Annotated[StrictInt, Field(ge=2), AfterValidator(_even)]


class RoadPeftConfig(PeftConfig):
    """`adapter_config.json` of a RoAd adapter. PEFT's RoadConfig has no exclude_modules, layers_to_transform or
    layers_pattern (it ignores them when present), so a config that sets one is refused rather than read."""

    expected: ClassVar[dict[str, str]] = {**PeftConfig.expected, "variant": f"one of {', '.join(VARIANTS)}",
                                          "group_size": "an even whole number >= 2", "init_weights": "true or false"}
    unsupported: ClassVar[dict[str, str]] = {
        **PeftConfig.unsupported, **{key: f"{key} (not a RoadConfig field: PEFT ignores it)"
                                     for key in ("exclude_modules", "layers_to_transform", "layers_pattern")}}

    peft_type: StrictStr = "ROAD"
    variant: Variant = "road_1"
    group_size: GroupSize = 64
    init_weights: StrictBool = True


def _check_road_sizes(adapter: PeftAdapter) -> None:
    """theta and alpha: one vector each, of one length, whose output width is whole groups."""
    config: RoadPeftConfig = adapter.config  # type: ignore[assignment]
    per_channel, group = PARAMS_PER_CHANNEL[config.variant], config.group_size
    for module, parts in adapter.modules.items():
        theta, alpha = parts[THETA], parts[ALPHA]
        if theta.ndim != 1 or theta.shape != alpha.shape or theta.shape[0] % (group * per_channel):
            raise AdapterFileError(f"{adapter.path / WEIGHTS}: module {module!r}: {THETA} has shape "
                                   f"{tuple(theta.shape)} and {ALPHA} {tuple(alpha.shape)}; {CONFIG} says variant "
                                   f"{config.variant!r}, group_size {group}: expected two vectors of {per_channel:g} "
                                   f"x d_out entries, d_out a multiple of {group} (see {tensor_key(module, THETA)!r})")


ROAD_FORMAT = PeftFormat("ROAD", RoadPeftConfig, ((THETA, ALPHA),), check=_check_road_sizes)

# ---------------------------------------------------------------------------------------------------- BitFit (BEFT)

BEFT_KEY = "beft_bias"


class BeftPeftConfig(PeftConfig):
    expected: ClassVar[dict[str, str]] = {**PeftConfig.expected, "init_weights": "true or false"}

    peft_type: StrictStr = "BEFT"
    init_weights: StrictBool = True  # how PEFT starts training; the saved tensors are what counts


BEFT_FORMAT = PeftFormat("BEFT", BeftPeftConfig, ((BEFT_KEY,),))

# ------------------------------------------------------------------------------------------------------ row vectors

ROW_FORMATS = (IA3_FORMAT, ROAD_FORMAT, BEFT_FORMAT)


@dataclass(frozen=True)
class RowVectors:
    """One module of an elementwise adapter as its kind's `row_params()` / `row_layout()` give it."""
    kind: str
    vectors: dict[str, np.ndarray]  # vector name -> [width] float32
    layout: dict[str, Any] = field(default_factory=dict)


def row_vectors(adapter: PeftAdapter) -> dict[str, RowVectors]:
    """{module path: its row vectors} of a PEFT directory of one of `ROW_FORMATS`."""
    read = {"IA3": _ia3, "ROAD": _road, "BEFT": _beft}[adapter.format.peft_type]
    return {module: read(adapter, module, parts) for module, parts in adapter.modules.items()}


def _vector(adapter: PeftAdapter, module: str, key: str, array: np.ndarray, axis: int, what: str) -> np.ndarray:
    """array [n, 1] (axis 0) or [1, n] (axis 1) as a float32 vector [n]."""
    if array.ndim != 2 or array.shape[1 - axis] != 1:
        want = "[n, 1]" if axis == 0 else "[1, n]"
        raise AdapterFileError(f"{adapter.path / WEIGHTS}: module {module!r}: {key} has shape {tuple(array.shape)}; "
                               f"{what} expects {want}")
    return np.ascontiguousarray(array.reshape(-1), np.float32)


def _ia3(adapter: PeftAdapter, module: str, parts: dict[str, np.ndarray]) -> RowVectors:
    if adapter.config.scales_input(module):  # type: ignore[attr-defined]
        what = f"a module {CONFIG}'s feedforward_modules names (its input is scaled)"
        return RowVectors("ia3_ff", {"l": _vector(adapter, module, IA3_KEY, parts[IA3_KEY], 1, what)})
    what = f"a module {CONFIG}'s feedforward_modules does not name (its output is scaled)"
    return RowVectors("ia3", {"l": _vector(adapter, module, IA3_KEY, parts[IA3_KEY], 0, what)})


def _road(adapter: PeftAdapter, module: str, parts: dict[str, np.ndarray]) -> RowVectors:
    config: RoadPeftConfig = adapter.config  # type: ignore[assignment]
    group = config.group_size
    theta, alpha = (parts[key].astype(np.float64) for key in (THETA, ALPHA))
    if config.variant == "road_4":  # per group of 2g entries: the first g for c1, the last g for c2
        theta, alpha = (t.reshape(-1, 2, group) for t in (theta, alpha))
        c1, c2 = alpha[:, 0] * np.cos(theta[:, 0]), alpha[:, 1] * np.sin(theta[:, 1])
    else:
        if config.variant == "road_1":  # each pair's value on both of its channels
            theta, alpha = (np.repeat(t.reshape(-1, 1, group // 2), 2, axis=1) for t in (theta, alpha))
        c1, c2 = alpha * np.cos(theta), alpha * np.sin(theta)
    return RowVectors("road", {"c1": c1.reshape(-1).astype(np.float32), "c2": c2.reshape(-1).astype(np.float32)},
                      {"group_size": group})


def _beft(adapter: PeftAdapter, module: str, parts: dict[str, np.ndarray]) -> RowVectors:
    return RowVectors("bitfit", {"b": _vector(adapter, module, BEFT_KEY, parts[BEFT_KEY], 1, "BEFT")})
