"""With-past capture of decoder-only transformers models (`[capture] use_cache = true`).

transformers 5 models take a `Cache` object, which neither torch.export nor ONNX can carry. The capture therefore
swaps the model's `forward` (on a shallow copy: parameters keep their names, so sites, selectors and PEFT files are
unchanged) for one that takes and returns flat tensors and builds a `DynamicCache` inside:

    inputs   input_ids [batch_size, sequence_length], attention_mask [batch_size, total_sequence_length],
             position_ids [batch_size, sequence_length] (models whose forward takes them),
             past_key_values.<i>.key / .value [batch_size, heads, past_sequence_length, head_dim]
    outputs  logits [batch_size, sequence_length, vocab], present.<i>.key / .value (total_sequence_length = past +
             new)

These are optimum's and onnxruntime-genai's names. In the graph (Python identifiers) the cache inputs are
`past_key_values_<i>_key` / `_value`; `onnx_name` gives the ONNX name and the exports rename them. One model serves
prefill (past length 0) and decode: every axis is exported as `Dim.DYNAMIC`, since total = past + new is a relation
between two free dims that named `Dim`s cannot state; the ONNX axes get the names above.

Each layer's `heads` and `head_dim`, for its key and its value apart, are read from the cache the model returns for a
short prompt (`cache_layout`), not from the config: GQA caches keep the KV-head count, Gemma 4's full-attention layers
their own head size, and DeepSeek-V2's compressed latent comes out as it is cached (key: the normed latent
[batch, 1, positions, kv_lora_rank], value: the rotary key part [batch, 1, positions, qk_rope_head_dim]).

Rules for which models are captured (anything else is a `CaptureError` naming the model class and the reason, never
a model that answers wrongly):
- decoder-only models whose transformers cache is a `DynamicCache` of full or sliding-window attention layers
  (LLaMA, Qwen2, Mistral, Gemma, Gemma2, Phi-3, GPT-2, GPT-NeoX, OPT, BLOOM are tested; more in
  tests/test_decoder_sweep.py). Encoder-decoder models (T5, BART: their decoder also keeps a cross-attention cache
  over the encoder's output), other layer kinds (chunked, linear or state-space attention, shared KV layers), models
  without attention heads and caches that are not one 4-D key and value tensor per layer are refused.
- every layer keeps every position, sliding-window layers too: the model's attention mask applies the window, so
  `present` = past + new on every layer (transformers' own `DynamicCache(config=...)` trims sliding layers to the
  window, a length one graph cannot serve for both prefill and decode; the answer is the same, the cache longer).
- before exporting, one eager call on the example checks the layout: as many cache layers as `num_hidden_layers`,
  each key and value `[batch, heads, past + new, head_dim]` as probed.
"""
from __future__ import annotations

import copy
import inspect
import time
import types
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from rewrite.capture import CaptureReport, capture
from rewrite.errors import CaptureError, first_line
from rewrite.inputs import ExampleInputs
from rewrite.load import LoadedModel
from rewrite.state import state_of
from rewrite.torch_failure import summary

KINDS = ("key", "value")
TOTAL = "total_sequence_length"
# an output axis the exporter names by an expression of the input axes
DERIVED = {"past_sequence_length + sequence_length": TOTAL, "sequence_length + past_sequence_length": TOTAL}


def cache_kwarg(layer: int, kind: str) -> str:
    return f"past_key_values_{layer}_{kind}"


def onnx_name(kwarg: str) -> str:
    """The ONNX input name of a graph input: `past_key_values_0_key` -> `past_key_values.0.key`; others unchanged."""
    if kwarg.startswith("past_key_values_"):
        layer, kind = kwarg.removeprefix("past_key_values_").split("_")
        return f"past_key_values.{layer}.{kind}"
    return kwarg


def kwarg_name(name: str) -> str:
    """The inverse of `onnx_name`."""
    return name.replace(".", "_") if name.startswith("past_key_values.") else name


def is_with_past(inputs: ExampleInputs) -> bool:
    return cache_kwarg(0, "key") in inputs.kwargs


# per layer, per kind ("key", "value"): the (heads, head dim) around the positions axis, read from one eager call
Layout = list[dict[str, tuple[int, int]]]
PROBE_TOKENS = 2


def _layer_count(config: Any, owner: str) -> int:
    """`num_hidden_layers` of a model with per-layer attention heads; `owner` names the model in errors."""
    if not hasattr(config, "num_hidden_layers") or not hasattr(config, "num_attention_heads"):
        raise CaptureError(f"use_cache = true: {owner} has no num_hidden_layers / num_attention_heads: a model "
                           "without per-layer attention heads keeps no key / value cache (state-space and recurrent "
                           "models are not served with use_cache)")
    return config.num_hidden_layers


def cache_layout(model: nn.Module) -> Layout:
    """Each layer's key and value (heads, head dim), read from the cache the model returns for a prompt of
    `PROBE_TOKENS` tokens (no config arithmetic: head sizes that vary by layer and latent caches come out as they
    are); refused, naming the class, when that cache is not one 4-D key and value tensor per layer."""
    name = type(model).__name__
    layers = _layer_count(model.config, name)
    ids = torch.ones(1, PROBE_TOKENS, dtype=torch.int64)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    except Exception as err:  # noqa: BLE001 - a model that cannot run with a cache is refused, whatever it raises
        raise CaptureError(f"use_cache = true: {name} failed on a {PROBE_TOKENS}-token prompt with use_cache, which "
                           f"the capture runs to read its cache layout: {first_line(err)}") from None
    cache = getattr(out, "cache", None)
    cache = getattr(out, "past_key_values", None) if cache is None else cache
    found = [[getattr(layer, f"{kind}s", None) for kind in KINDS] for layer in getattr(cache, "layers", None) or []]
    odd = next((i for i, pair in enumerate(found) if not all(isinstance(t, torch.Tensor) and t.dim() == 4
                                                              and t.shape[0] == 1 for t in pair)), None)
    if len(found) != layers or odd is not None:
        what = (f"layer {odd} holds {[None if t is None else list(getattr(t, 'shape', [])) for t in found[odd]]}"
                if odd is not None else f"{len(found)} cache layers for num_hidden_layers = {layers}")
        raise CaptureError(f"use_cache = true: {name}'s cache is not one [batch, heads, positions, head_dim] key and "
                           f"value per layer ({what}); the with-past capture serves such caches only")
    return [{kind: (int(t.shape[1]), int(t.shape[3])) for kind, t in zip(KINDS, pair)} for pair in found]


# cache layer kinds whose cache is the plain [batch, kv_heads, positions, head_dim] pair (see the module docstring)
LAYER_KINDS = ("full_attention", "sliding_attention")


def _layer_kinds(config: Any) -> set[str]:
    """The cache layer kinds of a transformers config, as transformers' own cache construction reads them."""
    text = config.get_text_config(decoder=True)
    kinds = set(getattr(text, "layer_types", None) or [
        "sliding_attention" if getattr(text, "sliding_window", None) is not None else
        "chunked_attention" if getattr(text, "attention_chunk_size", None) is not None else "full_attention"])
    if "reuse" in (getattr(text, "kv_sharing_modes", None) or ()):
        kinds.add("shared-KV")
    return kinds


def check_decoder(model: nn.Module) -> None:
    """Refuse, naming the class and why, a model whose cache the with-past capture cannot lay out."""
    config, name = model.config, type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise CaptureError(f"use_cache = true captures decoder-only models; {name} is an encoder-decoder model (its "
                           "decoder also caches cross-attention over the encoder's output, which this capture does "
                           "not lay out). Capture it without use_cache.")
    other = sorted(_layer_kinds(config) - set(LAYER_KINDS))
    if other:
        raise CaptureError(f"use_cache = true: {name} has {', '.join(other)} layers; the with-past capture serves "
                           f"{' and '.join(LAYER_KINDS)} layers only (a cache of every position per layer)")
    _layer_count(config, name)


def _check_layout(wrapped: nn.Module, inputs: ExampleInputs, layout: Layout) -> None:
    """One eager call on the example: every layer returns a `[batch, heads, past + new, head_dim]` key and value of
    the probed `layout`, and there are as many as probed."""
    batch, new = inputs.kwargs["input_ids"].shape
    past = inputs.kwargs[cache_kwarg(0, "key")].shape[2]
    want = {f"present.{i}.{kind}": (batch, heads, past + new, dim)
            for i, kinds in enumerate(layout) for kind, (heads, dim) in kinds.items()}
    try:
        with torch.no_grad():
            present = {k: v for k, v in wrapped(**inputs.kwargs).items() if k.startswith("present.")}
    except Exception as err:  # noqa: BLE001 - a model that cannot take this cache is refused, whatever it raises
        raise CaptureError(f"use_cache = true: {type(wrapped).__name__} cannot take back the cache it returned "
                           f"({len(layout)} layers of [batch, heads, past, head_dim], layer 0 key "
                           f"{[batch, *layout[0]['key']]} with past {past}): {first_line(err)}") from None
    wrong = next(((k, tuple(v.shape)) for k, v in present.items() if tuple(v.shape) != want.get(k)), None)
    if len(present) != len(want) or wrong:
        found = f"{wrong[0]} has shape {list(wrong[1])}" if wrong else f"{len(present) // 2} cache layers"
        expected = list(want[wrong[0]]) if wrong and wrong[0] in want else f"{len(layout)} layers"
        raise CaptureError(f"use_cache = true: {type(wrapped).__name__}'s cache does not have the layout the "
                           f"with-past export serves: {found}; expected [batch, heads, past + new, head_dim] = "
                           f"{expected} (every position kept, on every layer)")


def with_past_module(model: nn.Module, layers: int) -> nn.Module:
    """A shallow copy of `model` (same parameters, same names) whose forward takes and returns flat cache tensors
    for `layers` layers."""
    from transformers import DynamicCache

    cls = type(model)
    params = inspect.signature(cls.forward).parameters
    takes_positions = "position_ids" in params
    cache_arg = "cache" if "cache" in params else "past_key_values"  # transformers renames it model by model
    names = ["input_ids", "attention_mask", *(["position_ids"] if takes_positions else []),
             *(cache_kwarg(i, kind) for i in range(layers) for kind in KINDS)]

    def forward(self, **feeds: torch.Tensor) -> dict[str, torch.Tensor]:
        # no config: every layer a full DynamicLayer, sliding-window layers too (module docstring)
        cache = DynamicCache([(feeds[cache_kwarg(i, "key")], feeds[cache_kwarg(i, "value")]) for i in range(layers)])
        extra = {"position_ids": feeds["position_ids"]} if takes_positions else {}
        out = cls.forward(self, input_ids=feeds["input_ids"], attention_mask=feeds["attention_mask"],
                          use_cache=True, **{cache_arg: cache}, **extra)
        present = {f"present.{i}.{kind}": getattr(layer, f"{kind}s") for i, layer in
                   enumerate(out.cache.layers) for kind in KINDS}
        return {"logits": out.logits, **present}

    param = inspect.Parameter
    # torch.export binds kwargs by the forward's signature: list every input by name
    forward.__signature__ = inspect.Signature([param(n, param.POSITIONAL_OR_KEYWORD) for n in ["self", *names]])
    wrapped = copy.copy(model)
    wrapped.forward = types.MethodType(forward, wrapped)
    return wrapped


def with_past_inputs(model: nn.Module, layout: Layout, batch: int, seq: int, past: int,
                     seed: int = 0) -> ExampleInputs:
    """Seeded example inputs: `seq` new tokens after a random cache of `past` positions laid out as `layout`."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    kwargs = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=generator),
              "attention_mask": torch.ones(batch, past + seq, dtype=torch.int64)}
    dims: dict[str, list[str | None]] = {"input_ids": ["batch_size", "sequence_length"],
                                         "attention_mask": ["batch_size", TOTAL]}
    if "position_ids" in inspect.signature(model.forward).parameters:
        kwargs["position_ids"] = torch.arange(past, past + seq).expand(batch, seq).contiguous()
        dims["position_ids"] = ["batch_size", "sequence_length"]
    for i, kinds in enumerate(layout):
        for kind, (heads, dim) in kinds.items():
            kwargs[cache_kwarg(i, kind)] = torch.randn(batch, heads, past, dim, generator=generator)
            dims[cache_kwarg(i, kind)] = ["batch_size", None, "past_sequence_length", None]
    return ExampleInputs(kwargs, dims)


def with_past_shapes(inputs: ExampleInputs) -> dict[str, dict[int, Any]]:
    """torch.export dynamic shapes: every named axis `Dim.DYNAMIC` (the exporter finds total = past + new)."""
    return {name: {axis: torch.export.Dim.DYNAMIC for axis, d in enumerate(dims) if d}
            for name, dims in inputs.dims.items()}


def capture_with_past(loaded: LoadedModel, *, batch: int = 2, seq: int = 3, past: int = 4,
                      spec_digest: str | None = None,
                      attn_implementation: str = "eager") -> tuple[fx.GraphModule, CaptureReport]:
    """Capture `loaded` (a transformers decoder) with its cache as flat tensors; the example has `past` cached
    positions (>= 2, as torch.export specialises sizes 0 and 1; the ONNX model takes 0 as well)."""
    model = loaded.module
    if model is None or not hasattr(model, "config"):
        raise CaptureError("use_cache = true needs a transformers decoder model (an HF directory or a factory "
                           "returning one)")
    if attn_implementation != "keep":
        model.set_attn_implementation(attn_implementation)
    check_decoder(model)
    model.config.use_cache = True
    layout = cache_layout(model)
    wrapped = with_past_module(model, len(layout))
    inputs = with_past_inputs(wrapped, layout, batch, seq, past)
    _check_layout(wrapped, inputs, layout)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            program = torch.export.export(wrapped, (), kwargs=inputs.kwargs, strict=False,
                                          dynamic_shapes=with_past_shapes(inputs))
    except Exception as err:  # noqa: BLE001 - every export failure is reported the same way
        raise CaptureError(f"torch.export could not capture {type(model).__name__} with its cache: "
                           f"{summary(err)}") from None
    gm, report = capture(LoadedModel(wrapped, program, loaded.kind, loaded.source, loaded.config), inputs,
                         device="cpu", spec_digest=spec_digest, attn_implementation="keep", use_cache=True)
    state_of(gm).frontend = report.frontend = "export"
    report.seconds = time.perf_counter() - start  # the whole capture, torch.export included
    return gm, report
