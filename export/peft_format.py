"""Hugging Face PEFT LoRA directories: `adapter_config.json` + `adapter_model.safetensors`.

Keys look like `base_model.model.<module path>.lora_A.weight` (Linear / Conv1D / Conv2d) or
`...lora_embedding_A` (Embedding); PEFT strips the adapter name of its saved adapter. Per-module rank and
alpha come from `rank_pattern` / `alpha_pattern`, whose keys PEFT matches as `(.*\\.)?<key>$` regexes.
Only safetensors weights are read: `adapter_model.bin` is a pickle and is refused.
PEFT also saves a full copy of a targeted embedding's base weight (`<path>.base_layer.weight`, its default
`save_embedding_layers="auto"`); those copies are returned apart, in `base_weights`, for the loader to check.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rewrite.errors import AdapterFileError
from rewrite.finite import check_tensors, nonfinite_key

PREFIX = "base_model.model."
SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B")
BASE_COPY = ".base_layer.weight"
_UNSUPPORTED = {"use_dora": "DoRA", "modules_to_save": "modules_to_save (trained full modules)",
                "lora_bias": "lora_bias (a trained bias on lora_B)"}


@dataclass
class PeftAdapter:
    path: Path
    config: dict[str, Any]
    modules: dict[str, dict[str, torch.Tensor]]  # module path -> {suffix: tensor}
    base_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # module path -> saved base weight

    def rank_of(self, module: str) -> int:
        tensors = self.modules[module]
        a = tensors.get("lora_A.weight", tensors.get("lora_embedding_A"))
        return int(a.shape[0])

    def alpha_of(self, module: str) -> float:
        return float(_pattern_value(module, self.config.get("alpha_pattern") or {},
                                    self.config.get("lora_alpha", 8)))

    @property
    def rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))


def _pattern_value(module: str, patterns: dict[str, Any], default: Any) -> Any:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


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


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_config(config: dict[str, Any], config_file: Path) -> None:
    """The numbers that size and scale the adapter: ranks whole numbers >= 1, alphas numbers, nothing NaN / Inf
    anywhere (Python's json reads `NaN`, `Infinity` and `1e999`)."""
    key = nonfinite_key(config)
    if key is not None:
        raise AdapterFileError(f"{config_file}: '{key}' is NaN or Infinity; adapter settings must be finite numbers")
    for key, valid, expected in (("r", _is_rank, "a whole number >= 1"), ("lora_alpha", _is_number, "a number")):
        if key in config and not valid(config[key]):
            raise AdapterFileError(f"{config_file}: '{key}' is {config[key]!r}; expected {expected}")
    for key, valid, expected in (("rank_pattern", _is_rank, "a whole number >= 1"),
                                 ("alpha_pattern", _is_number, "a number")):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise AdapterFileError(f"{config_file}: '{key}' is {patterns!r}; expected an object of module -> value")
        for module, value in patterns.items():
            if not valid(value):
                raise AdapterFileError(f"{config_file}: '{key}[{module!r}]' is {value!r}; expected {expected}")


def read_peft_dir(path: Path) -> PeftAdapter:
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_file.is_file():
        raise AdapterFileError(f"{path}: not a PEFT adapter directory (no adapter_config.json)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{config_file}: not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterFileError(f"{config_file}: peft_type is {config.get('peft_type')!r}; only LORA adapters "
                               "can be loaded")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise AdapterFileError(f"{config_file}: '{key}' is set; {what} is not supported by the LoRA loader")
    if config.get("bias", "none") != "none":
        raise AdapterFileError(f"{config_file}: bias = {config['bias']!r}; only bias = \"none\" adapters can be "
                               "loaded (trained base biases are not adapter tensors)")
    _check_config(config, config_file)
    if not weights_file.is_file():
        extra = " (adapter_model.bin is a pickle and is never loaded)" if (path / "adapter_model.bin").exists() else ""
        raise AdapterFileError(f"{path}: no adapter_model.safetensors{extra}")
    try:
        tensors = load_file(weights_file)
    except Exception as err:  # noqa: BLE001 - a corrupt file is bad input
        raise AdapterFileError(f"{weights_file}: not a readable safetensors file: {err}") from None
    check_tensors(tensors, str(weights_file), AdapterFileError)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    base_weights: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if name.endswith(BASE_COPY):
            base_weights[name[: -len(BASE_COPY)]] = tensor
            continue
        module, suffix = _split_key(key, weights_file)
        modules.setdefault(module, {})[suffix] = tensor
    for module, parts in modules.items():
        pair = ({"lora_A.weight", "lora_B.weight"}, {"lora_embedding_A", "lora_embedding_B"})
        if set(parts) not in pair:
            raise AdapterFileError(f"{weights_file}: module {module!r} has tensors {sorted(parts)}; "
                                   "expected an A and a B")
    return PeftAdapter(path, config, modules, base_weights)


def write_peft_dir(path: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write a PEFT directory (the caller makes it atomic by writing into a temporary directory)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "adapter_model.safetensors",
              metadata={"format": "pt"})
