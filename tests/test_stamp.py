"""The stamped capture (`rewrite.stamp`) against the plain full export: same sites, node targets, module paths,
state-dict names and outputs on real weights; layers that differ take the full export with a one-line notice (a
warning: the CLI prints it, -q silences it)."""
from __future__ import annotations

import collections
import dataclasses
import warnings

import pytest
import torch

from rewrite.capture import capture
from rewrite.inputs import example_inputs
from rewrite.load import LoadedModel
from rewrite.options import CaptureOptions
from rewrite.stamp import find_stacks
import models


class _Notices:
    """The warnings raised so far (capture's "full export, not stamped" notice), cleared at each read."""

    def __init__(self, caught: list):
        self.caught = caught

    def read(self) -> str:
        text = "\n".join(str(w.message) for w in self.caught)
        self.caught.clear()
        return text


@pytest.fixture
def notices():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield _Notices(caught)


def _build(name: str, layers: int = 4, **overrides) -> torch.nn.Module:
    config, cls = models._config(name)
    values = {k: v for k, v in config.to_dict().items() if k != "layer_types"}  # re-derived for the new depth
    torch.manual_seed(0)
    depth = config.attribute_map.get("num_hidden_layers", "num_hidden_layers")  # GPT-2: n_layer
    return cls(type(config)(**{**values, depth: layers, **overrides})).eval()


def _capture(model: torch.nn.Module, stamp: bool, dynamic: bool = True):
    inputs = example_inputs(model, model.config, CaptureOptions(dynamic=dynamic), "<test>")
    gm, report = capture(LoadedModel(model, None, "hf", "tiny", model.config), inputs, stamp=stamp)
    return gm, report, inputs


def _sites(gm) -> list[dict]:
    return [{**dataclasses.asdict(s), "node": None} for s in gm.meta["rewrite"].sites.values()]  # fx names differ


def _paths(gm) -> list[tuple]:
    return [(str(n.target), tuple(v[0] for v in (n.meta.get("nn_module_stack") or {}).values()))
            for n in gm.graph.nodes]


@pytest.mark.parametrize("name,dynamic", [("llama", True), ("qwen2", True), ("llama", False), ("gpt2", True),
                                          ("bert", False)])
def test_stamped_equals_full_export(name, dynamic, notices):
    model = _build(name)
    full, full_report, inputs = _capture(model, stamp=False, dynamic=dynamic)
    fast, fast_report, _ = _capture(model, stamp=True, dynamic=dynamic)
    assert fast_report.stamped and not full_report.stamped
    assert "not stamped" not in notices.read()
    assert _sites(fast) == _sites(full)
    assert collections.Counter(str(n.target) for n in fast.graph.nodes) == \
        collections.Counter(str(n.target) for n in full.graph.nodes)
    assert _paths(fast) == _paths(full)  # node kinds and module paths, in graph order
    assert list(fast.state_dict()) == list(full.state_dict())
    [(path, stack)] = find_stacks(model)
    assert all(fast.get_parameter(f"{path}.3.{k}") is p for k, p in stack[3].named_parameters())  # shared
    assert any(s["owner"].startswith(f"{path}.3.") for s in _sites(fast))
    assert fast_report.replay_max_abs_diff == 0.0
    with torch.no_grad():
        torch.testing.assert_close(fast(**inputs.kwargs)[0], full(**inputs.kwargs)[0], rtol=0, atol=0)
    assert model.config.num_hidden_layers == 4 and model.get_submodule(path) is stack  # the model is restored


def _notice(model: torch.nn.Module, notices) -> str:
    _, report, _ = _capture(model, stamp=True, dynamic=False)
    assert not report.stamped
    lines = [line for line in notices.read().splitlines() if "not stamped" in line]
    assert len(lines) == 1
    return lines[0]


def test_layers_with_different_configs_take_the_full_export(notices):
    model = _build("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=2)
    assert "model.layers.2 differs from model.layers.0" in _notice(model, notices)


def test_hooks_and_shared_weights_take_the_full_export(notices):
    model = _build("llama")
    handle = model.model.layers[2].mlp.register_forward_hook(lambda *_: None)
    assert "model.layers.2 has hooks" in _notice(model, notices)
    handle.remove()
    model.model.layers[3].mlp.up_proj.weight = model.model.layers[1].mlp.up_proj.weight
    assert "shares its tensor" in _notice(model, notices)


def test_index_dependent_block_is_refused(notices):
    """GPT-2 with `scale_attn_by_inverse_layer_idx` divides by layer_idx + 1: its blocks are not interchangeable."""
    model = _build("gpt2", n_layer=3, scale_attn_by_inverse_layer_idx=True)
    assert "transformer.h.1 differs from transformer.h.0" in _notice(model, notices)


def test_shallow_models_and_the_opt_out_are_silent(notices):
    _, report, _ = _capture(models.build("llama"), stamp=True, dynamic=False)  # 2 layers: nothing to stamp
    _, off, _ = _capture(_build("llama"), stamp=False, dynamic=False)
    assert not report.stamped and not off.stamped and "stamp" not in notices.read()
    assert CaptureOptions().stamp and not CaptureOptions(stamp=False).stamp


class _Block(torch.nn.Module):
    def __init__(self, residual: bool):
        super().__init__()
        self.ff, self.residual = torch.nn.Linear(8, 8), residual

    def forward(self, x):
        return x + torch.relu(self.ff(x)) if self.residual else torch.relu(self.ff(x))


class _Net(torch.nn.Module):
    """Five identical blocks; the residual add sits in the block or in the loop (outside every block)."""

    def __init__(self, residual_in_block: bool):
        super().__init__()
        self.blocks = torch.nn.ModuleList(_Block(residual_in_block) for _ in range(5))
        self.head = torch.nn.Linear(8, 2)
        self.residual_in_block = residual_in_block

    def forward(self, x):
        for block in self.blocks:
            x = block(x) if self.residual_in_block else x + block(x)
        return self.head(x)


def test_plain_torch_stack(notices):
    """A plain torch model with a ModuleList of identical blocks is stamped when each block's output is the next
    block's input; a residual add in the loop, outside the blocks, is a carried value stamping does not follow."""
    torch.manual_seed(0)
    inputs = example_inputs(None, None, CaptureOptions(inputs=[dict(name="x", shape=[2, 8])]), "<test>")
    stamped = LoadedModel(_Net(True).eval(), None, "torch", "net", None)
    fast, report = capture(stamped, inputs, stamp=True)
    full, _ = capture(stamped, inputs, stamp=False)
    assert report.stamped and report.replay_max_abs_diff == 0.0 and _sites(fast) == _sites(full)
    assert [s["owner"] for s in _sites(fast)] == [f"blocks.{i}.ff" for i in range(5)] + ["head"]
    _, looped = capture(LoadedModel(_Net(False).eval(), None, "torch", "net", None), inputs, stamp=True)
    assert not looped.stamped and looped.replay_max_abs_diff == 0.0
    assert "not stamped: the output of blocks.0 is used outside blocks.1" in notices.read()
