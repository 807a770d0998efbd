"""Example inputs for capture, verification and the ONNX check.

From the spec's `[[capture.inputs]]` (name, shape, dtype, low/high, dims naming dynamic axes), or, for a
transformers model, from its config: `input_ids` drawn from the vocabulary, an all-ones `attention_mask`,
`decoder_input_ids` for encoder-decoders, `pixel_values` for vision models. Values are seeded.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rewrite.errors import SpecError
from rewrite.options import CaptureOptions, InputSpec

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}


@dataclass
class ExampleInputs:
    kwargs: dict[str, torch.Tensor]
    dims: dict[str, list[str | None]]  # per input, per axis: a dynamic dim name or None (static)

    def to(self, device: str) -> "ExampleInputs":
        return ExampleInputs({k: v.to(device) for k, v in self.kwargs.items()}, self.dims)


def _draw(spec: InputSpec, generator: torch.Generator) -> torch.Tensor:
    dtype = _DTYPES[spec.dtype]
    if dtype.is_floating_point:
        return torch.rand(spec.shape, generator=generator).mul(spec.high - spec.low).add(spec.low).to(dtype)
    if dtype == torch.bool:
        return torch.ones(spec.shape, dtype=torch.bool)
    return torch.randint(int(spec.low), max(int(spec.high), int(spec.low) + 1), spec.shape,
                         generator=generator, dtype=dtype)


def _forward_params(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _hf_defaults(model: nn.Module, config: Any, options: CaptureOptions) -> list[InputSpec]:
    params = _forward_params(model)
    b, s = options.batch, options.seq
    dyn = ["batch", "seq"] if options.dynamic_axes else None
    specs: list[InputSpec] = []
    if "input_ids" in params:
        vocab = getattr(config, "vocab_size", None) or 1000
        specs.append(InputSpec(name="input_ids", shape=[b, s], dtype="int64", low=0, high=vocab, dims=dyn))
        if "attention_mask" in params:
            specs.append(InputSpec(name="attention_mask", shape=[b, s], dtype="int64", low=1, high=2, dims=dyn))
        if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
            dec = ["batch", "dec_seq"] if options.dynamic_axes else None
            specs.append(InputSpec(name="decoder_input_ids", shape=[b, s], dtype="int64", low=0, high=vocab,
                                   dims=dec))
    elif "pixel_values" in params:
        size = getattr(config, "image_size", 32)
        size = size if isinstance(size, int) else size[0]
        channels = getattr(config, "num_channels", 3)
        specs.append(InputSpec(name="pixel_values", shape=[b, channels, size, size], dtype="float32",
                               dims=["batch", "", "", ""] if options.dynamic_axes else None))
    return specs


def example_inputs(model: nn.Module | None, config: Any, options: CaptureOptions, where: str,
                   seed: int = 0) -> ExampleInputs:
    """Inputs named as the model's forward expects them; dims are None where the spec asks for static."""
    specs = list(options.inputs)
    if not specs and config is not None and model is not None:
        specs = _hf_defaults(model, config, options)
    if not specs:
        raise SpecError(f"{where}: cannot guess example inputs for this model; add [[capture.inputs]] entries "
                        "(name, shape, dtype, low, high, dims) to the spec")
    generator = torch.Generator().manual_seed(seed)
    kwargs, dims = {}, {}
    for spec in specs:
        kwargs[spec.name] = _draw(spec, generator)
        dims[spec.name] = [d or None for d in spec.dims] if spec.dims and options.dynamic_axes else [None] * len(spec.shape)
    if model is not None:
        params = _forward_params(model)
        unknown = [k for k in kwargs if params and k not in params and "kwargs" not in params]
        if unknown:
            raise SpecError(f"{where}: input(s) {unknown} are not parameters of {type(model).__name__}.forward "
                            f"(which takes: {', '.join(sorted(params))})")
    return ExampleInputs(kwargs, dims)
