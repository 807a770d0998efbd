"""PEFT's LoRA directories (`peft_type = "LORA"`): the config, key names and scale rule shared by the compiler's
LoRA kinds and the runtime, which switches LoRA adapters without torch.

Keys: `<module>.lora_A.weight` [r, d_in] and `<module>.lora_B.weight` [d_out, r] (Linear / Conv1D; conv2d 4-D), or
`<module>.lora_embedding_A` [r, V] and `lora_embedding_B` [d, r] (Embedding). Per-module rank and alpha come
from `rank_pattern` / `alpha_pattern`, whose keys PEFT matches as `(.*\\.)?<key>$` regexes; the branch scale is
    s = alpha / r          (use_rslora: alpha / sqrt(r))
The config is strictly typed (ranks whole numbers >= 1, alphas numbers, never a bool or a string; pattern keys
valid regexes). Config and tensors agree: A and B of one rank r per module, that r the `r` / `rank_pattern` value.
`use_dora` configs are DoRA's to read (`accepts`); `lora_bias` is refused, and so is every other LoRA variant a
config can switch on (`VARIANTS`: LoRA and DoRA refuse the same set). `bias = "all"` / `"lora_only"` is read when the
file holds no bias tensors (then it is exactly `bias = "none"`); trained base biases in the file are refused.
`init_lora_weights`: an init that leaves the base weight alone (true, false, "gaussian", "eva", "orthogonal",
"mica") is read; one that rewrote it (`BASE_REWRITING_INITS`: PiSSA's residual W - s B0 A0, OLoRA, CorDA, LoftQ,
LoRA-GA) is refused by name: those tensors only fit the residual base, which PEFT recomputes at load time from the
original weight. PEFT's converted save (`save_pretrained(path_initial_model_for_weight_conversion=...)`, rank 2r
against the original weight) writes `init_lora_weights = true` and is read as any LoRA.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, NamedTuple

from pydantic import Field, StrictBool, StrictFloat, StrictInt, StrictStr, create_model, field_validator

from rewrite.errors import AdapterFileError
from rewrite.formats.peft_dir import CONFIG, PeftAdapter, PeftConfig, PeftFormat, compiled, pattern_key, \
    pattern_value, read_peft_dir, tensor_key

LINEAR_KEYS = ("lora_A.weight", "lora_B.weight")  # Linear, Conv1D and Conv2d
EMBEDDING_KEYS = ("lora_embedding_A", "lora_embedding_B")

Rank = Annotated[StrictInt, Field(ge=1)]
Number = StrictInt | StrictFloat


def lora_keys(op: str) -> tuple[str, str]:
    """The key suffixes of A and B for a site of base op `op`."""
    return EMBEDDING_KEYS if op == "embedding" else LINEAR_KEYS


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """PEFT's branch scale s."""
    return alpha / (math.sqrt(rank) if rslora else rank)


def alpha_for_scale(scale: float, rank: int, rslora: bool) -> float:
    """The alpha that gives scale `scale` at rank `rank` (the inverse of `lora_scale`)."""
    return scale * (math.sqrt(rank) if rslora else rank)


# The other LoRA variants a LORA config can switch on (PEFT's defaults leave them null or false). None is implemented:
# any other value refuses the config, naming the option.
VARIANTS = {"use_qalora": "QA-LoRA", "alora_invocation_tokens": "activated LoRA (aLoRA)",
            "layer_replication": "layer replication", "target_parameters": "LoRA on parameters",
            "megatron_config": "Megatron layers",
            "use_bdlora": "block-diagonal LoRA", "arrow_config": "Arrow routing", "kasa_config": "KaSA",
            "monteclora_config": "MonteCLoRA", "velora_config": "VeLoRA"}
# `init_lora_weights` values (or prefixes: "pissa_niter_<k>") whose init rewrote the base weight.
BASE_REWRITING_INITS = {"pissa": "PiSSA", "olora": "OLoRA", "corda": "CorDA", "loftq": "LoftQ", "lora_ga": "LoRA-GA"}
PLAIN_BASE_INITS = ("gaussian", "eva", "orthogonal", "mica")  # inits that leave the base weight as it was
# PEFT's `bias` settings; "all" / "lora_only" add base bias tensors to the file, refused when present (peft_dir.py)
BIAS_SETTINGS = ("none", "all", "lora_only")

_WithVariants = create_model("_WithVariants", __base__=PeftConfig, **{key: (Any, None) for key in VARIANTS})


PATTERNS_EXPECTED = {"rank_pattern": "an object of module -> value", "alpha_pattern": "an object of module -> value"}
PATTERN_VALUES = {"rank_pattern": "a whole number >= 1", "alpha_pattern": "a number"}  # what each pattern maps to


class LoraPeftConfig(_WithVariants):
    """`adapter_config.json` of a LoRA adapter."""

    expected: ClassVar[dict[str, str]] = {
        **PeftConfig.expected, **PATTERNS_EXPECTED, "r": "a whole number >= 1", "lora_alpha": "a number",
        "use_rslora": "true or false", "bias": "a string", "use_dora": "true or false", "lora_bias": "true or false",
        "init_lora_weights": "true, false or the name of an init",
        "trainable_token_indices": "a list of token ids, or an object of embedding module -> list of token ids"}
    pattern_values: ClassVar[dict[str, str]] = PATTERN_VALUES
    unsupported: ClassVar[dict[str, str]] = {**PeftConfig.unsupported, "use_dora": "DoRA",
                                             "lora_bias": "lora_bias (a trained bias on lora_B)", **VARIANTS}

    peft_type: StrictStr = "LORA"
    r: Rank = 8
    lora_alpha: Number = 8
    use_rslora: StrictBool = False
    rank_pattern: dict[str, Rank] = {}
    alpha_pattern: dict[str, Number] = {}
    bias: StrictStr = "none"
    use_dora: StrictBool = False
    lora_bias: StrictBool = False
    init_lora_weights: StrictBool | StrictStr = True
    trainable_token_indices: list[StrictInt] | dict[str, list[StrictInt]] | None = None

    @field_validator("rank_pattern", "alpha_pattern", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _pattern_regexes(cls, value: Any) -> Any:
        return compiled(value)

    @field_validator("init_lora_weights")
    @classmethod
    def _plain_base(cls, value: bool | str) -> bool | str:
        if isinstance(value, bool) or value.lower() in PLAIN_BASE_INITS:
            return value
        method = next((name for prefix, name in BASE_REWRITING_INITS.items() if value.lower().startswith(prefix)), None)
        if method is None:
            raise ValueError(f"{value!r} is not an init this reader knows (true, false, "
                             f"{', '.join(map(repr, PLAIN_BASE_INITS))})")
        raise ValueError(f"{value!r}: a {method} adapter, trained against the residual base weight its init left "
                         "(W - s B0 A0), not this model's weight; load a converted one instead, a plain LoRA against "
                         "the original weight (PEFT: save_pretrained(path_initial_model_for_weight_conversion=...); "
                         "rewrite: save with convert_to_lora = true)")

    @field_validator("bias")
    @classmethod
    def _known_bias(cls, value: str) -> str:
        if value not in BIAS_SETTINGS:
            raise ValueError(f"bias = {value!r}; expected one of {', '.join(map(repr, BIAS_SETTINGS))}")
        return value


class LoraSettings(NamedTuple):
    """What the config says about one module."""

    op: str
    rank: int
    alpha: float
    rslora: bool
    dropout: float


def rank_of(adapter: PeftAdapter, module: str) -> int:
    tensors = adapter.modules[module]
    return int(tensors.get(LINEAR_KEYS[0], tensors.get(EMBEDDING_KEYS[0])).shape[0])


def alpha_of(adapter: PeftAdapter, module: str) -> float:
    config: LoraPeftConfig = adapter.config  # type: ignore[assignment]
    return float(pattern_value(module, config.alpha_pattern, config.lora_alpha))


def scale_of(adapter: PeftAdapter, module: str) -> float:
    return lora_scale(alpha_of(adapter, module), rank_of(adapter, module), adapter.config.use_rslora)


def _check_ranks(adapter: PeftAdapter) -> None:
    """A and B of one rank per module, and that rank the config's."""
    weights_file = adapter.path / "adapter_model.safetensors"
    config: LoraPeftConfig = adapter.config  # type: ignore[assignment]
    for module, parts in adapter.modules.items():
        key_a, key_b = LINEAR_KEYS if LINEAR_KEYS[0] in parts else EMBEDDING_KEYS
        a, b = parts[key_a], parts[key_b]
        if a.ndim not in (2, 4) or b.ndim != a.ndim or b.shape[1] != a.shape[0]:
            raise AdapterFileError(f"{weights_file}: module {module!r}: {key_a} has shape {a.shape} and {key_b} "
                                   f"{b.shape}; expected A [r, d_in] and B [d_out, r] (4-D for conv) of one rank r")
        pattern = pattern_key(module, config.rank_pattern)
        expected = config.r if pattern is None else config.rank_pattern[pattern]
        if a.shape[0] != expected:
            said = f"'r' = {config.r}" if pattern is None else f"'rank_pattern'[{pattern!r}] = {expected}"
            raise AdapterFileError(f"{weights_file}: tensor {tensor_key(module, key_a)!r} has rank {a.shape[0]}, but "
                                   f"{CONFIG} says {said} for {module!r}; the config does not describe these tensors")


LORA_FORMAT = PeftFormat("LORA", LoraPeftConfig, (LINEAR_KEYS, EMBEDDING_KEYS), check=_check_ranks,
                         accepts=lambda raw: not raw.get("use_dora"))


def read_lora_dir(path) -> PeftAdapter:
    """A PEFT LoRA directory, checked (the runtime's reader; the compiler reads every kind's format)."""
    return read_peft_dir(path, [LORA_FORMAT])


def lora_config(modules: Mapping[str, LoraSettings]) -> dict[str, Any]:
    """The config `PeftModel.from_pretrained` loads these modules with: `r` / `lora_alpha` are the most common
    values, per-module differences go to `rank_pattern` / `alpha_pattern` keyed by the full module path."""
    r = Counter(m.rank for m in modules.values()).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in modules.values()).most_common(1)[0][0]
    rslora = {m.rslora for m in modules.values()}
    if len(rslora) > 1:
        raise AdapterFileError("adapter mixes rsLoRA and plain scaling across sites; PEFT cannot express that")
    config = LoraPeftConfig(
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
