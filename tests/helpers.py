"""The steps tests repeat: capture a model, run one pass directly (the pass contract itself, no manager), read logits.

Oracles stay in the tests; these helpers only set things up.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from rewrite.capture import capture
from rewrite.inputs import ExampleInputs, example_inputs
from rewrite.load import LoadedModel
from rewrite.options import CaptureOptions
from rewrite.pass_infra import PassContext, PassResult
from rewrite.passes import REGISTRY

from models import build


def run_pass(gm: fx.GraphModule, name: str, root: Path | str | None = None, *, where: str = "spec.toml:3",
             keys: bool = False, data: Any = None, **options) -> PassResult:
    """Run the registered pass `name` with `options` on `gm`; errors name `where` (with `keys`: "where (key)")."""
    cls = REGISTRY[name]
    context = PassContext(spec_dir=Path(root or "."), output_dir=Path(root) if root else None, where=where, data=data,
                          locate=(lambda key: f"{where} ({key})") if keys else None)
    return cls(cls.Options(**options), context)(gm)


def capture_hf(name: str) -> tuple[torch.nn.Module, fx.GraphModule, dict[str, torch.Tensor]]:
    """(the tiny HF model `name`, its capture, the example inputs) with the default capture settings."""
    model = build(name)
    inputs = example_inputs(model, model.config, CaptureOptions(), "<test>")
    gm, report = capture(LoadedModel(model, None, "hf", name, model.config), inputs)
    assert report.replay_max_abs_diff == 0.0
    return model, gm, inputs.kwargs


def capture_module(model: torch.nn.Module, inputs: dict[str, torch.Tensor], *, name: str = "model",
                   frontend: str = "export") -> fx.GraphModule:
    """Capture a plain torch module with static example inputs."""
    example = ExampleInputs(inputs, {k: [None] * v.dim() for k, v in inputs.items()})
    gm, _ = capture(LoadedModel(model, None, "factory", name, None), example, frontend=frontend)
    return gm


def logits(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits
