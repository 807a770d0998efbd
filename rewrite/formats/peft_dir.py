"""Hugging Face PEFT adapter directories: `adapter_config.json` + `adapter_model.safetensors`, for every tuner.

Keys look like `base_model.model.<module path>.<suffix>`; PEFT strips the adapter name of its saved adapter (a key
saved with it, `<module path>.<stem>.<name>[.weight]`, is read too). Which suffixes a module may carry, and what
the config holds besides the fields every tuner shares, is the tuner's own `PeftFormat` (LoRA's is in
`peft_lora.py`, IA3 / ROAD / BEFT in `peft_rows.py`; other tuners declare theirs in their adapter kind). This module
owns the rules every tuner shares:
- Only safetensors weights are read: `adapter_model.bin` is a pickle and is refused (a caller that the user
  told to trust it reads it and passes its tensors).
- The config is a JSON object with nothing anywhere NaN / Infinity; its `peft_type` picks the format, and the
  format's pydantic model validates it strictly (PEFT's many other fields are kept as they are).
- `targets`: PEFT's `check_target_module_exists` — a `target_modules` regex string matched in full, else a list of
  names matched exactly or as a dotted suffix, narrowed by `exclude_modules` and `layers_to_transform`.
- Tensors and config agree as PEFT would build them: at least one adapter module, float tensors only, each
  module's suffixes exactly one of the format's layouts, and every module one that `target_modules` selects.
- A config whose `bias` is "all" / "lora_only" is read only when the file holds no base bias tensors (then it is
  exactly `bias = "none"`); base biases in the file would replace the model's, and are refused.
- PEFT also saves a full copy of a targeted embedding's base weight (`<path>.base_layer.weight`, its default
  `save_embedding_layers="auto"`); those copies are returned apart, in `base_weights`, for the loader to check.
- A tuner may keep tensors once per adapter rather than per module (VeRA's frozen projections): the format names
  them (`shared`), they are stored as `base_model.<name>` and returned apart, in `shared`.
- Prompt-learning tuners keep their one tensor for the whole model under its bare name (`prompt_embeddings`): the
  format names it (`bare`), and it is read as (and written from) the tensors of the module "" (the model itself),
  which the adapter kind places on a site.
- `modules_to_save` (any tuner; PEFT's SEQ_CLS / TOKEN_CLS / QUESTION_ANS task types add the head themselves): the
  named modules are trained whole, and the file holds each one's full state under its own names
  (`base_model.model.<path>.<param>`; prompt-learning tuners: `base_model.<path>.<param>`). A module is named when a
  prefix of its path ends with a listed name (PEFT's `key.endswith(name)`). Those tensors are returned apart, in
  `copies` ({module path: {param: array}}); the loader places them on sites (the adapter kinds `full` and `ln_tuning`).
- `trainable_token_indices` (LoRA): the new rows of chosen token ids of an embedding, `<path>.` + `TOKEN_ROWS`
  [n, d], returned apart in `token_rows`; `PeftAdapter.token_indices(path)` gives their ids (a list applies to the
  embedding the file holds rows for; an object maps module names, matched as PEFT does, by suffix).
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError, field_validator

from rewrite.errors import AdapterFileError
from rewrite.finite import check_tensors, nonfinite_key
from rewrite.formats.safetensors_file import read_safetensors, write_safetensors

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
SHARED_PREFIX = "base_model."
BASE_COPY = ".base_layer.weight"
TOKEN_ROWS = "token_adapter.trainable_tokens_delta"


class PeftConfig(BaseModel):
    """The fields of `adapter_config.json` every tuner shares; a tuner's format subclasses it."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    expected: ClassVar[dict[str, str]] = {
        "modules_to_save": "a list of module names or null",
        "target_modules": "a list of module names or a regex string",
        "exclude_modules": "a list of module names or a regex string",
        "layers_to_transform": "a layer index or a list of them", "layers_pattern": "a name or a list of names"}
    unsupported: ClassVar[dict[str, str]] = {}
    remedies: ClassVar[dict[str, str]] = {}  # what works instead, for a refused key of `unsupported`

    peft_type: StrictStr
    modules_to_save: list[str] | None = None
    target_modules: list[StrictStr] | StrictStr | None = None
    exclude_modules: list[StrictStr] | StrictStr | None = None
    layers_to_transform: list[StrictInt] | StrictInt | None = None
    layers_pattern: list[StrictStr] | StrictStr | None = None

    @field_validator("target_modules", "exclude_modules", "layers_pattern")
    @classmethod
    def _regexes(cls, value: Any) -> Any:
        return compiled(value)

    def targets(self, module: str) -> bool | None:
        """Whether PEFT puts a layer on `module` (its `check_target_module_exists`); None when the config does
        not say (no target_modules, or "all-linear", which depends on the model's layer types)."""
        targets = self.target_modules
        if targets is None or (isinstance(targets, str) and targets.lower() == "all-linear"):
            return None
        if _selected(module, self.exclude_modules):
            return False
        if isinstance(targets, str) or module in targets:
            return _selected(module, targets)
        return _selected(module, targets) and _in_layers(module, self.layers_to_transform, self.layers_pattern)

    def saves(self, module: str) -> bool:
        """Whether `modules_to_save` names `module` or a module above it (PEFT's `key.endswith(name)`)."""
        parts = module.split(".")
        prefixes = (".".join(parts[:i]) for i in range(1, len(parts) + 1))
        return any(p.endswith(name) for p in prefixes for name in self.modules_to_save or [])


def compiled(value: Any) -> Any:
    """What PEFT reads as a regex (a string, list items, or mapping keys) must compile (a pydantic validator body)."""
    for text in ([value] if isinstance(value, str) else value or []):
        try:
            re.compile(text)
        except re.error as err:
            raise ValueError(f"{text!r} is not a valid regular expression ({err})") from None
    return value


@dataclass
class PeftAdapter:
    path: Path
    config: PeftConfig
    format: PeftFormat
    modules: dict[str, dict[str, np.ndarray]]  # module path -> {suffix: array}
    base_weights: dict[str, np.ndarray] = field(default_factory=dict)  # module path -> saved base weight
    shared: dict[str, np.ndarray] = field(default_factory=dict)  # name -> the adapter's tensor kept once
    copies: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # modules_to_save: path -> {param: array}
    token_rows: dict[str, np.ndarray] = field(default_factory=dict)  # trainable_token_indices: path -> rows [n, d]

    def targets(self, module: str) -> bool | None:
        return self.config.targets(module)

    def token_indices(self, module: str) -> list[int] | None:
        """The token ids whose rows `trainable_token_indices` trains in `module` (None: not named)."""
        ids = getattr(self.config, "trainable_token_indices", None)
        if isinstance(ids, dict):
            return next((v for k, v in ids.items() if module.endswith(k)), None)
        return ids


@dataclass(frozen=True)
class PeftFormat:
    """One PEFT tuner's directory: its `peft_type`, config model, the key-suffix sets (layouts) one module may
    carry, which configs of that peft_type it reads (`accepts`: e.g. LoRA leaves `use_dora` to DoRA), its own
    agreement rules between config and tensors (`check`, raising AdapterFileError), the tensors it keeps once
    per adapter (`shared`, keys `base_model.<name>`), and its whole-model tensors stored under their bare names
    (`bare`: module "")."""

    peft_type: str
    config: type[PeftConfig]
    layouts: tuple[tuple[str, ...], ...]
    check: Callable[[PeftAdapter], None] = lambda adapter: None
    accepts: Callable[[dict[str, Any]], bool] = lambda raw: True
    shared: tuple[str, ...] = ()
    bare: tuple[str, ...] = ()

    @property
    def suffixes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s for layout in self.layouts for s in layout))


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


def pattern_key(module: str, patterns: Mapping[str, Any]) -> str | None:
    """PEFT's `get_pattern_key`: the first key that matches `module` as the regex `(.*\\.)?(key)$`."""
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", module)), None)


def pattern_value(module: str, patterns: Mapping[str, Any], default: Any) -> Any:
    key = pattern_key(module, patterns)
    return default if key is None else patterns[key]


def tensor_key(module: str, suffix: str) -> str:
    return f"{PREFIX}{module}.{suffix}" if module else suffix


def _split_key(key: str, peft_format: PeftFormat, where: Path) -> tuple[str, str]:
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    for suffix in peft_format.suffixes:
        if name.endswith("." + suffix):
            return name[: -len(suffix) - 1], suffix
        stem = suffix.rpartition(".")[0] or suffix
        match = re.fullmatch(rf"(.+)\.{re.escape(stem)}\.[A-Za-z0-9_\-]+(\.weight)?", name)
        if match and (suffix.endswith(".weight")) == bool(match.group(2)):
            return match.group(1), suffix
    raise AdapterFileError(f"{where}: tensor {key!r} is not a {peft_format.peft_type} tensor (expected keys ending "
                           f"in {', '.join(peft_format.suffixes)})")


def _config_error(err: ValidationError, config_file: Path, model: type[PeftConfig]) -> AdapterFileError:
    first = err.errors()[0]
    loc = first["loc"]
    name = str(loc[0])
    if first["type"] == "value_error":  # our own validators say what is wrong
        return AdapterFileError(f"{config_file}: '{name}': {first['msg'].removeprefix('Value error, ')}")
    values = getattr(model, "pattern_values", {})
    if name in values and len(loc) > 1:  # a value inside a pattern (a union adds the member to `loc`)
        where, expected = f"{name}[{loc[1]!r}]", values[name]
    else:
        where, expected = name, model.expected.get(name, first["msg"])
    return AdapterFileError(f"{config_file}: '{where}' is {first['input']!r}; expected {expected}")


def _raw_config(config_file: Path) -> dict[str, Any]:
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{config_file}: not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{config_file}: expected a JSON object, got {type(raw).__name__}")
    key = nonfinite_key(raw)  # Python's json reads `NaN`, `Infinity` and `1e999`, under any key
    if key is not None:
        raise AdapterFileError(f"{config_file}: '{key}' is NaN or Infinity; adapter settings must be finite numbers")
    return raw


def _pick_format(raw: dict[str, Any], formats: Sequence[PeftFormat], config_file: Path) -> PeftFormat:
    """The format that reads this config; with none, the first of its peft_type validates it and says why."""
    peft_type = str(raw.get("peft_type", "")).upper()
    of_type = [f for f in formats if f.peft_type == peft_type]
    if not of_type:
        known = ", ".join(dict.fromkeys(f.peft_type for f in formats))
        raise AdapterFileError(f"{config_file}: peft_type is {raw.get('peft_type')!r}; the adapters that can be "
                               f"loaded are {known}")
    return next((f for f in of_type if f.accepts(raw)), of_type[0])


def _validated(raw: dict[str, Any], peft_format: PeftFormat, config_file: Path) -> PeftConfig:
    model = peft_format.config
    try:
        config = model.model_validate({**raw, "peft_type": peft_format.peft_type})
    except ValidationError as err:
        raise _config_error(err, config_file, model) from None
    for key, what in model.unsupported.items():
        if value := getattr(config, key):
            remedy = model.remedies.get(key, "")
            raise AdapterFileError(f"{config_file}: '{key}' is set; {what} is not supported for "
                                   f"{peft_format.peft_type} adapters ({key} = {value!r}){remedy and ': ' + remedy}")
    if not peft_format.accepts(raw):
        raise AdapterFileError(f"{config_file}: this {peft_format.peft_type} configuration is not supported")
    return config


def read_peft_dir(path: Path, formats: Sequence[PeftFormat], tensors: Mapping[str, np.ndarray] | None = None,
                  weights_file: Path | None = None) -> PeftAdapter:
    """Read and check a PEFT directory of one of `formats`; `tensors` (read by the caller from `weights_file`, e.g. a
    trusted pickle) stand for its adapter_model.safetensors."""
    config_file, weights_file = path / CONFIG, weights_file or path / WEIGHTS
    if not config_file.is_file():
        raise AdapterFileError(f"{path}: not a PEFT adapter directory (no {CONFIG})")
    raw = _raw_config(config_file)
    peft_format = _pick_format(raw, formats, config_file)
    config = _validated(raw, peft_format, config_file)
    if tensors is not None:
        check_tensors(tensors, str(weights_file), AdapterFileError)
    elif not weights_file.is_file():
        extra = (" (adapter_model.bin is a pickle and is never loaded: it can run code; convert it once where you "
                 "trust it: safetensors.torch.save_file(torch.load('adapter_model.bin'), 'adapter_model.safetensors'))"
                 if (path / "adapter_model.bin").exists() else "")
        raise AdapterFileError(f"{path}: no {WEIGHTS}{extra}")
    else:
        tensors, _ = read_safetensors(weights_file)
    every = tensors
    copied = _copied_keys(tensors, config, peft_format)
    copies: dict[str, dict[str, np.ndarray]] = {}
    for key, (module, param) in copied.items():
        copies.setdefault(module, {})[param] = tensors[key]
    tensors = {key: t for key, t in tensors.items() if key not in copied}
    _refuse_trained_biases(config, tensors, peft_format, config_file, weights_file)
    modules: dict[str, dict[str, np.ndarray]] = {}
    base_weights: dict[str, np.ndarray] = {}
    shared: dict[str, np.ndarray] = {}
    token_rows: dict[str, np.ndarray] = {}
    for key, tensor in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if name.endswith("." + TOKEN_ROWS) and getattr(config, "trainable_token_indices", None) is not None:
            token_rows[name[: -len(TOKEN_ROWS) - 1]] = tensor
            continue
        if name.endswith(BASE_COPY):
            base_weights[name[: -len(BASE_COPY)]] = tensor
            continue
        if key in peft_format.bare:
            modules.setdefault("", {})[key] = tensor
            continue
        if key.startswith(SHARED_PREFIX) and key[len(SHARED_PREFIX):] in peft_format.shared:
            shared[key[len(SHARED_PREFIX):]] = tensor
            continue
        module, suffix = _split_key(key, peft_format, weights_file)
        modules.setdefault(module, {})[suffix] = tensor
    adapter = PeftAdapter(path, config, peft_format, modules, base_weights, shared, copies, token_rows)
    _check_agreement(adapter, every, weights_file)
    peft_format.check(adapter)
    return adapter


def _copied_keys(tensors: Mapping[str, np.ndarray], config: PeftConfig, peft_format: PeftFormat
                 ) -> dict[str, tuple[str, str]]:
    """{key: (module path, param)} of the tensors of modules that `modules_to_save` names: keys under a named module
    that are none of the format's own (a module's adapter tensors keep their suffixes)."""
    found = {}
    for key in tensors:
        name = next((key[len(p):] for p in (PREFIX, SHARED_PREFIX) if key.startswith(p)), None)
        if name is None or "." not in name or name.endswith((BASE_COPY, TOKEN_ROWS)) or _format_key(name, peft_format):
            continue
        module, _, param = name.rpartition(".")
        if config.saves(module):
            found[key] = (module, param)
    return found


def _format_key(name: str, peft_format: PeftFormat) -> bool:
    try:
        _split_key(name, peft_format, Path())
    except AdapterFileError:
        return False
    return True


def _refuse_trained_biases(config: PeftConfig, tensors: Mapping[str, np.ndarray], peft_format: PeftFormat,
                           config_file: Path, weights_file: Path) -> None:
    """PEFT's `bias = "all"` / `"lora_only"` saves the base model's biases beside the adapter (`<path>.bias`, or
    `<path>.base_layer.bias`), and loading puts them into the model. A file without such tensors is exactly a
    `bias = "none"` adapter; one with them replaces base weights, which an adapter never does, so it is refused."""
    bias = getattr(config, "bias", "none")
    if bias == "none":
        return
    biases = [key for key in tensors if key.endswith(".bias") and
              not any(key.endswith("." + suffix) for suffix in peft_format.suffixes)]
    if biases:
        raise AdapterFileError(
            f"{config_file}: 'bias' = {bias!r} and {weights_file.name} holds {len(biases)} trained base bias "
            f"tensor(s), e.g. {biases[0]!r}; loading would replace the model's own biases, which an adapter never "
            'does: only bias = "none" adapters (or a bias setting whose file holds no bias tensors) can be loaded: '
            "merge it in PEFT (PeftModel.from_pretrained(base, dir).merge_and_unload()) and export that model, "
            "or retrain with bias = \"none\"")


def _check_agreement(adapter: PeftAdapter, tensors: Mapping[str, np.ndarray], weights_file: Path) -> None:
    peft_format = adapter.format
    if not adapter.modules:
        raise AdapterFileError(f"{weights_file}: holds no {peft_format.peft_type} tensors (keys ending in "
                               f"{', '.join(peft_format.suffixes)}); an adapter with nothing in it is not loaded")
    for key, tensor in tensors.items():
        if tensor.dtype.kind in "biu":
            raise AdapterFileError(f"{weights_file}: tensor {key!r} is {tensor.dtype}; adapter weights are floats")
    _check_token_rows(adapter, weights_file)
    layouts = {frozenset(layout) for layout in peft_format.layouts}
    for module, parts in adapter.modules.items():
        if frozenset(parts) not in layouts:
            expected = " or ".join(str(list(layout)) for layout in peft_format.layouts)
            raise AdapterFileError(f"{weights_file}: module {module!r} has tensors {sorted(parts)}; expected "
                                   f"{expected}")
        if adapter.targets(module) is False:
            config = adapter.config
            excluding = f" (exclude_modules = {config.exclude_modules!r})" if config.exclude_modules else ""
            raise AdapterFileError(f"{adapter.path / CONFIG}: 'target_modules' = {config.target_modules!r}"
                                   f"{excluding} does not select {module!r}, but {weights_file.name} holds its "
                                   "tensors; PEFT would not load them there")


def _check_token_rows(adapter: PeftAdapter, weights_file: Path) -> None:
    """`trainable_token_indices` and the rows the file holds agree: every module named has its rows, and every module
    with rows is named, with one row per id."""
    ids = getattr(adapter.config, "trainable_token_indices", None)
    if ids is None:
        return
    named = list(ids) if isinstance(ids, dict) else []
    missing = [n for n in named if not any(m.endswith(n) for m in adapter.token_rows)]
    if missing or not adapter.token_rows:
        raise AdapterFileError(f"{adapter.path / CONFIG}: 'trainable_token_indices' = {ids!r}, but {weights_file.name} "
                               f"has no rows ({TOKEN_ROWS}) for {missing[0] if missing else 'any embedding'}: its "
                               "weights file is incomplete")
    for module, rows in adapter.token_rows.items():
        wanted = adapter.token_indices(module)
        if wanted is None:
            raise AdapterFileError(f"{weights_file}: {module}.{TOKEN_ROWS} holds trained token rows, but "
                                   f"'trainable_token_indices' = {ids!r} names no module it ends with")
        if rows.ndim != 2 or rows.shape[0] != len(wanted):
            raise AdapterFileError(f"{weights_file}: {module}.{TOKEN_ROWS} has shape {list(rows.shape)}; "
                                   f"'trainable_token_indices' gives {len(wanted)} token ids: [{len(wanted)}, width]")


def write_peft_dir(path: Path, config: Mapping[str, Any], modules: Mapping[str, Mapping[str, np.ndarray]],
                   shared: Mapping[str, np.ndarray] | None = None,
                   copies: Mapping[str, Mapping[str, np.ndarray]] | None = None, copies_prefix: str = PREFIX) -> None:
    """Write a PEFT directory from its config (the adapter kind's `peft_config`), {module path: {suffix: array}},
    the adapter's tensors kept once ({name: array}, `PeftFormat.shared`) and the `modules_to_save` copies ({module
    path: {param: array}}, under `copies_prefix`: `base_model.` for prompt-learning tuners), which the config must
    name (the caller makes it atomic by writing into a temporary directory)."""
    path.mkdir(parents=True, exist_ok=True)
    text = json.dumps(dict(config), indent=2, sort_keys=True)
    (path / CONFIG).write_text(text + "\n")
    tensors = {SHARED_PREFIX + name: array for name, array in (shared or {}).items()}
    tensors.update({tensor_key(module, suffix): array for module, parts in modules.items()
                    for suffix, array in parts.items()})
    tensors.update({f"{copies_prefix}{module}.{param}": array for module, parts in (copies or {}).items()
                    for param, array in parts.items()})
    write_safetensors(path / WEIGHTS, tensors, metadata={"format": "pt"})
