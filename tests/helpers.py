"""The steps tests repeat: capture a model, run one pass directly (the pass contract itself, no manager), read logits.

Oracles stay in the tests; these helpers only set things up.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.fx as fx

from rewrite.capture import capture
from rewrite.cli import main
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


@functools.cache
def _captured_once(name: str) -> tuple[fx.GraphModule, dict[str, torch.Tensor]]:
    return capture_hf(name)[1:]


def fresh_capture(name: str) -> tuple[fx.GraphModule, dict[str, torch.Tensor]]:
    """(a capture of the tiny model `name` of its own, its example inputs); each model is captured once per session."""
    gm, kwargs = _captured_once(name)
    return copy.deepcopy(gm), kwargs


def first_output(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """logits (decoders), last_hidden_state (encoders)."""
    with torch.no_grad():
        return model(**inputs)[0]


def peft_reloaded(directory: Path, name: str) -> tuple[torch.nn.Module, list[str]]:
    """`PeftModel.from_pretrained` of a PEFT directory onto a fresh tiny `name` (eval mode), and its warnings."""
    import peft

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(build(name), directory).eval()
    return model, [str(w.message) for w in caught]


def merged_onnx_output(gm: fx.GraphModule, inputs: dict[str, torch.Tensor], path: Path) -> torch.Tensor:
    """Export `gm` (its adapters merged) to ONNX at `path` and run it in ONNX Runtime: its first output."""
    import onnxruntime as ort

    from rewrite.export.onnx_merged import export_merged
    from rewrite.options import ExportOptions

    export_merged(gm, path, ExportOptions(), None)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {i.name: inputs[i.name].numpy() for i in session.get_inputs()})[0])


def max_param_diff(ours: torch.nn.Module, theirs: torch.nn.Module) -> float:
    """The max abs difference over every parameter of `theirs`, by name (`ours` holds each of them)."""
    mine = dict(ours.named_parameters())
    return max(float((mine[name] - param).detach().abs().max()) for name, param in theirs.named_parameters())


def edit_json(path: Path, **fields) -> None:
    """Set `fields` in the JSON object at `path` (a PEFT adapter_config.json a test breaks on purpose)."""
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def refusals(gm: fx.GraphModule, adapter: str, out: Path, switching: str = "bank") -> tuple[str, str]:
    """The messages with which an unmerged export (`switching`) and an `allocate` refuse `adapter` of a kind that
    is neither low-rank nor resizable; each must fail."""
    from rewrite.errors import RewriteError
    from rewrite.export.onnx_unmerged import export_unmerged
    from rewrite.options import ExportOptions

    messages = []
    for attempt in (lambda: export_unmerged(gm, out, ExportOptions(mode="unmerged", switching=switching)),
                    lambda: run_pass(gm, "allocate", adapter=adapter, scorer="spectrum", budget={"params": 10},
                                     report="")):
        try:
            attempt()
        except RewriteError as err:
            messages.append(str(err))
        else:
            raise AssertionError(f"adapter {adapter!r} was not refused")
    return messages[0], messages[1]


def fill_adapter(model: torch.nn.Module, rules: dict[str, tuple[float, float]], seed: int = 3) -> torch.nn.Module:
    """Set every parameter whose name contains a key of `rules` (mean, std) to mean + std * N(0, 1), seeded: an
    adapter that is not the identity (one that is proves nothing). Returns the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            for key, (mean, std) in rules.items():
                if key in name:
                    param.copy_(mean + std * torch.randn(param.shape, generator=generator))
    return model.eval()


def diff(a, b) -> float:
    """max |a - b| in float64."""
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def cli(capsys, *argv) -> tuple[int, str]:
    """`rewrite ARGV` in this process: (exit code, what it printed to stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


FULL_SWEEP = os.environ.get("REWRITE_FULL_SWEEP") == "1"


def sweep_params(cases, every_run) -> list:
    """Parametrize values of a sweep: the cases in `every_run` always run, the others only with REWRITE_FULL_SWEEP=1
    (each costs a capture and an ONNX export or more: the whole sweep would double the CI run)."""
    skip = pytest.mark.skip(reason="part of the full sweep: REWRITE_FULL_SWEEP=1 runs it")
    return [case if FULL_SWEEP or case in every_run else pytest.param(*(case if isinstance(case, tuple) else (case,)),
                                                                        marks=skip) for case in cases]


def save_peft(model: torch.nn.Module, config, path: Path, *, adapter_name: str = "default", seed: int = 1234,
              rank_pattern: dict | None = None) -> Path:
    """PEFT's `config` on `model` with every trainable tensor moved off its init (seeded), saved to `path`; an
    AdaLoRA `rank_pattern` ({lora_E parameter name: mask}, as its allocator stores it) is set before the save."""
    import peft

    torch.manual_seed(seed)
    peft_model = peft.get_peft_model(model, config, adapter_name=adapter_name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in peft_model.named_parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    if rank_pattern is not None:
        peft_model.peft_config[adapter_name].rank_pattern = rank_pattern
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(path)
    return path if adapter_name == "default" else path / adapter_name


def peft_reload(base: torch.nn.Module, path: Path) -> torch.nn.Module:
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, path).eval()
