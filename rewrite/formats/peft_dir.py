"""Hugging Face PEFT LoRA directories: `adapter_config.json` + `adapter_model.safetensors`. Every PEFT naming rule
of the project lives here.

Keys look like `base_model.model.<module path>.lora_A.weight` (Linear / Conv1D / Conv2d) or
`...lora_embedding_A` (Embedding); PEFT strips the adapter name of its saved adapter. Per-module rank and
alpha come from `rank_pattern` / `alpha_pattern`, whose keys PEFT matches as `(.*\\.)?<key>$` regexes; the branch
scale is s = alpha / r (`use_rslora`: alpha / sqrt(r)).
Only safetensors weights are read: `adapter_model.bin` is a pickle and is refused.
PEFT also saves a full copy of a targeted embedding's base weight (`<path>.base_layer.weight`, its default
`save_embedding_layers="auto"`); those copies are returned apart, in `base_weights`, for the loader to check.
The config is a `PeftConfig`: the fields we read are strictly typed (ranks whole numbers >= 1, alphas numbers,
never a bool or a string; patterns valid regexes), nothing anywhere NaN / Infinity; PEFT's many other fields are kept
as they are. Config and tensors must agree, as PEFT itself would build them: at least one LoRA module, float tensors
only, every module's rank the `r` / `rank_pattern` value for it, and every module one that `target_modules` selects
(`targets`: PEFT's rule, a regex string matched in full, else a list of names matched exactly or as a dotted suffix,
narrowed by `exclude_modules` and `layers_to_transform`).
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError, \
    field_validator

from rewrite.errors import AdapterFileError
from rewrite.finite import nonfinite_key
from rewrite.formats.safetensors_file import read_safetensors, write_safetensors

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
LINEAR_KEYS = ("lora_A.weight", "lora_B.weight")  # Linear, Conv1D and Conv2d
EMBEDDING_KEYS = ("lora_embedding_A", "lora_embedding_B")
SUFFIXES = (*LINEAR_KEYS, *EMBEDDING_KEYS)
BASE_COPY = ".base_layer.weight"

Rank = Annotated[StrictInt, Field(ge=1)]
Number = StrictInt | StrictFloat

_EXPECTED = {"r": "a whole number >= 1", "lora_alpha": "a number", "use_rslora": "true or false",
             "rank_pattern": "an object of module -> value", "alpha_pattern": "an object of module -> value",
             "bias": "a string", "use_dora": "true or false", "lora_bias": "true or false",
             "modules_to_save": "a list of module names or null",
             "target_modules": "a list of module names or a regex string",
             "exclude_modules": "a list of module names or a regex string",
             "layers_to_transform": "a layer index or a list of them", "layers_pattern": "a name or a list of names"}
_PATTERN_VALUES = {"rank_pattern": "a whole number >= 1", "alpha_pattern": "a number"}
_UNSUPPORTED = {"use_dora": "DoRA", "modules_to_save": "modules_to_save (trained full modules)",
                "lora_bias": "lora_bias (a trained bias on lora_B)"}


def lora_keys(op: str) -> tuple[str, str]:
    """The key suffixes of A and B for a site of base op `op`."""
    return EMBEDDING_KEYS if op == "embedding" else LINEAR_KEYS


def tensor_key(module: str, suffix: str) -> str:
    return f"{PREFIX}{module}.{suffix}"


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """PEFT's branch scale s."""
    return alpha / (math.sqrt(rank) if rslora else rank)


def alpha_for_scale(scale: float, rank: int, rslora: bool) -> float:
    """The alpha that gives scale `scale` at rank `rank` (the inverse of `lora_scale`)."""
    return scale * (math.sqrt(rank) if rslora else rank)


class PeftConfig(BaseModel):
    """`adapter_config.json` of a LoRA adapter."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    peft_type: StrictStr = "LORA"
    r: Rank = 8
    lora_alpha: Number = 8
    use_rslora: StrictBool = False
    rank_pattern: dict[str, Rank] = {}
    alpha_pattern: dict[str, Number] = {}
    bias: StrictStr = "none"
    use_dora: StrictBool = False
    lora_bias: StrictBool = False
    modules_to_save: list[str] | None = None
    target_modules: list[StrictStr] | StrictStr | None = None
    exclude_modules: list[StrictStr] | StrictStr | None = None
    layers_to_transform: list[StrictInt] | StrictInt | None = None
    layers_pattern: list[StrictStr] | StrictStr | None = None

    @field_validator("rank_pattern", "alpha_pattern", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("rank_pattern", "alpha_pattern", "target_modules", "exclude_modules", "layers_pattern")
    @classmethod
    def _regexes(cls, value: Any) -> Any:
        """What PEFT reads as a regex (pattern keys, a target / exclude string, layer patterns) must compile."""
        for text in ([value] if isinstance(value, str) else value or []):
            try:
                re.compile(text)
            except re.error as err:
                raise ValueError(f"{text!r} is not a valid regular expression ({err})") from None
        return value


class LoraSettings(NamedTuple):
    """What the config says about one module."""

    op: str
    rank: int
    alpha: float
    rslora: bool
    dropout: float


def lora_config(modules: Mapping[str, LoraSettings]) -> dict[str, Any]:
    """The config `PeftModel.from_pretrained` loads these modules with: `r` / `lora_alpha` are the most common
    values, per-module differences go to `rank_pattern` / `alpha_pattern` keyed by the full module path."""
    r = Counter(m.rank for m in modules.values()).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in modules.values()).most_common(1)[0][0]
    rslora = {m.rslora for m in modules.values()}
    if len(rslora) > 1:
        raise AdapterFileError("adapter mixes rsLoRA and plain scaling across sites; PEFT cannot express that")
    config = PeftConfig(
        peft_type="LORA", task_type=None, base_model_name_or_path=None, inference_mode=True,
        r=r, lora_alpha=alpha, use_rslora=rslora.pop(), lora_dropout=max(m.dropout for m in modules.values()),
        target_modules=sorted(modules), bias="none", init_lora_weights=True,
        fan_in_fan_out=any(m.op == "conv1d" for m in modules.values()),
        rank_pattern={o: m.rank for o, m in modules.items() if m.rank != r},
        alpha_pattern={o: m.alpha for o, m in modules.items() if m.alpha != alpha},
        modules_to_save=None, use_dora=False,
        revision=None,  # no keys of our own: PEFT warns "upgrade PEFT" about any key it does not know
    )
    return config.model_dump(mode="json", exclude_unset=True)


@dataclass
class PeftAdapter:
    path: Path
    config: PeftConfig
    modules: dict[str, dict[str, np.ndarray]]  # module path -> {suffix: array}
    base_weights: dict[str, np.ndarray] = field(default_factory=dict)  # module path -> saved base weight

    def rank_of(self, module: str) -> int:
        tensors = self.modules[module]
        a = tensors.get(LINEAR_KEYS[0], tensors.get(EMBEDDING_KEYS[0]))
        return int(a.shape[0])

    def alpha_of(self, module: str) -> float:
        return float(_pattern_value(module, self.config.alpha_pattern, self.config.lora_alpha))

    @property
    def rslora(self) -> bool:
        return self.config.use_rslora

    def scale_of(self, module: str) -> float:
        return lora_scale(self.alpha_of(module), self.rank_of(module), self.rslora)

    def targets(self, module: str) -> bool | None:
        """Whether PEFT puts a LoRA layer on `module` (its `check_target_module_exists`); None when the config does
        not say (no target_modules, or "all-linear", which depends on the model's layer types)."""
        config = self.config
        targets = config.target_modules
        if targets is None or (isinstance(targets, str) and targets.lower() == "all-linear"):
            return None
        if _selected(module, config.exclude_modules):
            return False
        if isinstance(targets, str) or module in targets:
            return _selected(module, targets)
        return _selected(module, targets) and _in_layers(module, config.layers_to_transform, config.layers_pattern)


def _selected(module: str, names: list[str] | str | None) -> bool:
    """PEFT's module match: a string is a regex matched in full; a list matches exactly or as a dotted suffix."""
    if isinstance(names, str):
        return re.fullmatch(names, module) is not None
    return any(module == n or module.endswith("." + n) for n in names or [])


def _in_layers(module: str, layers: list[int] | int | None, patterns: list[str] | str | None) -> bool:
    """PEFT's `layers_to_transform`: the first numbered path segment (after a `layers_pattern`) is in `layers`."""
    if layers is None or layers == []:
        return True
    found = None
    for pattern in ([patterns] if isinstance(patterns, str) else patterns) or [None]:
        found = re.match(r".*?\.[^.]*\.(\d+)\." if pattern is None else rf"(?:^|.*?\.){pattern}\.(\d+)\.", module)
        if found:
            break
    if found is None:
        return False
    return int(found.group(1)) in (layers if isinstance(layers, list) else [layers])


def _pattern_key(module: str, patterns: dict[str, Any]) -> str | None:
    """PEFT's `get_pattern_key`: the first key that matches `module` as the regex `(.*\.)?(key)$`."""
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", module)), None)


def _pattern_value(module: str, patterns: dict[str, Any], default: Any) -> Any:
    key = _pattern_key(module, patterns)
    return default if key is None else patterns[key]


def _split_key(key: str, where: Path) -> tuple[str, str]:
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    for suffix in SUFFIXES:
        if name.endswith("." + suffix):
            return name[: -len(suffix) - 1], suffix
        stem = suffix.rpartition(".")[0] or suffix
        # keys saved with an explicit adapter name: <path>.lora_A.<name>.weight
        match = re.fullmatch(rf"(.+)\.{re.escape(stem)}\.[A-Za-z0-9_\-]+(\.weight)?", name)
        if match and (suffix.endswith(".weight")) == bool(match.group(2)):
            return match.group(1), suffix
    raise AdapterFileError(f"{where}: tensor {key!r} is not a LoRA tensor (expected keys ending in "
                           f"{', '.join(SUFFIXES)})")


def _config_error(err: ValidationError, config_file: Path) -> AdapterFileError:
    first = err.errors()[0]
    loc = first["loc"]
    name = str(loc[0])
    if first["type"] == "value_error":  # our own validators say what is wrong
        return AdapterFileError(f"{config_file}: '{name}': {first['msg'].removeprefix('Value error, ')}")
    if name in _PATTERN_VALUES and len(loc) > 1:  # a value inside a pattern (a union adds the member to `loc`)
        where, expected = f"{name}[{loc[1]!r}]", _PATTERN_VALUES[name]
    else:
        where, expected = name, _EXPECTED.get(name, first["msg"])
    return AdapterFileError(f"{config_file}: '{where}' is {first['input']!r}; expected {expected}")


def _read_config(config_file: Path) -> PeftConfig:
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{config_file}: not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{config_file}: expected a JSON object, got {type(raw).__name__}")
    if str(raw.get("peft_type", "")).upper() != "LORA":
        raise AdapterFileError(f"{config_file}: peft_type is {raw.get('peft_type')!r}; only LORA adapters "
                               "can be loaded")
    key = nonfinite_key(raw)  # Python's json reads `NaN`, `Infinity` and `1e999`, under any key
    if key is not None:
        raise AdapterFileError(f"{config_file}: '{key}' is NaN or Infinity; adapter settings must be finite numbers")
    try:
        config = PeftConfig.model_validate(raw)
    except ValidationError as err:
        raise _config_error(err, config_file) from None
    for key, what in _UNSUPPORTED.items():
        if getattr(config, key):
            raise AdapterFileError(f"{config_file}: '{key}' is set; {what} is not supported by the LoRA loader")
    if config.bias != "none":
        raise AdapterFileError(f"{config_file}: bias = {config.bias!r}; only bias = \"none\" adapters can be "
                               "loaded (trained base biases are not adapter tensors)")
    return config


def read_peft_dir(path: Path) -> PeftAdapter:
    config_file, weights_file = path / CONFIG, path / WEIGHTS
    if not config_file.is_file():
        raise AdapterFileError(f"{path}: not a PEFT adapter directory (no {CONFIG})")
    config = _read_config(config_file)
    if not weights_file.is_file():
        extra = " (adapter_model.bin is a pickle and is never loaded)" if (path / "adapter_model.bin").exists() else ""
        raise AdapterFileError(f"{path}: no {WEIGHTS}{extra}")
    tensors, _ = read_safetensors(weights_file)
    modules: dict[str, dict[str, np.ndarray]] = {}
    base_weights: dict[str, np.ndarray] = {}
    for key, tensor in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if name.endswith(BASE_COPY):
            base_weights[name[: -len(BASE_COPY)]] = tensor
            continue
        module, suffix = _split_key(key, weights_file)
        modules.setdefault(module, {})[suffix] = tensor
    for module, parts in modules.items():
        if set(parts) not in (set(LINEAR_KEYS), set(EMBEDDING_KEYS)):
            raise AdapterFileError(f"{weights_file}: module {module!r} has tensors {sorted(parts)}; "
                                   "expected an A and a B")
    adapter = PeftAdapter(path, config, modules, base_weights)
    _check_agreement(adapter, tensors, weights_file)
    return adapter


def _check_agreement(adapter: PeftAdapter, tensors: Mapping[str, np.ndarray], weights_file: Path) -> None:
    """Tensors and config describe the adapter PEFT would build: some LoRA tensors, floats only, A and B of one
    rank, that rank the config's, and only modules the config targets."""
    if not adapter.modules:
        raise AdapterFileError(f"{weights_file}: holds no LoRA tensors (keys ending in {', '.join(SUFFIXES)}); "
                               "an adapter with nothing in it is not loaded")
    for key, tensor in tensors.items():
        if tensor.dtype.kind in "biu":
            raise AdapterFileError(f"{weights_file}: tensor {key!r} is {tensor.dtype}; adapter weights are floats")
    for module, parts in adapter.modules.items():
        key_a, key_b = LINEAR_KEYS if LINEAR_KEYS[0] in parts else EMBEDDING_KEYS
        a, b = parts[key_a], parts[key_b]
        if a.ndim not in (2, 4) or b.ndim != a.ndim or b.shape[1] != a.shape[0]:
            raise AdapterFileError(f"{weights_file}: module {module!r}: {key_a} has shape {a.shape} and {key_b} "
                                   f"{b.shape}; expected A [r, d_in] and B [d_out, r] (4-D for conv) of one rank r")
        _check_rank(adapter.config, module, tensor_key(module, key_a), a.shape[0], weights_file)
        if adapter.targets(module) is False:
            raise AdapterFileError(f"{adapter.path / CONFIG}: 'target_modules' = {adapter.config.target_modules!r}"
                                   f"{_excluding(adapter.config)} does not select {module!r}, but "
                                   f"{weights_file.name} holds its tensors; PEFT would not load them there")


def _check_rank(config: PeftConfig, module: str, key: str, rank: int, weights_file: Path) -> None:
    pattern = _pattern_key(module, config.rank_pattern)
    expected = config.r if pattern is None else config.rank_pattern[pattern]
    if rank != expected:
        said = f"'r' = {config.r}" if pattern is None else f"'rank_pattern'[{pattern!r}] = {expected}"
        raise AdapterFileError(f"{weights_file}: tensor {key!r} has rank {rank}, but {CONFIG} says {said} for "
                               f"{module!r}; the config does not describe these tensors")


def _excluding(config: PeftConfig) -> str:
    return f" (exclude_modules = {config.exclude_modules!r})" if config.exclude_modules else ""


def write_peft_dir(path: Path, config: Mapping[str, Any], modules: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Write a PEFT directory from its config (the adapter kind's `peft_config`) and {module path: {suffix: array}}
    (the caller makes it atomic by writing into a temporary directory)."""
    path.mkdir(parents=True, exist_ok=True)
    text = json.dumps(dict(config), indent=2, sort_keys=True)
    (path / CONFIG).write_text(text + "\n")
    write_safetensors(path / WEIGHTS, {tensor_key(module, suffix): array for module, parts in modules.items()
                                       for suffix, array in parts.items()}, metadata={"format": "pt"})
