"""Bottleneck adapters against a hand-written oracle: AdapterHub's equations wrapped around the HF model's own layers.

The `adapters` library itself is not installed: it pins transformers 4.57 and this project runs transformers 5. The
oracle is written here from the equations (`Oracle`: nn.Linear projections and transformers' own activations around
the HF layer, in eager mode), with random weights (non-identity) copied into ours: Houlsby (series after the
attention and feed-forward output projections), Pfeiffer (series after the feed-forward one) and parallel
adapters, on a tiny LLaMA, BERT and GPT-2 (Conv1D). What the kind cannot do is refused by name: merge, an unmerged
export, allocate, saving; a merged export keeps it inline, equal to torch in ONNX Runtime.
"""
from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn
from transformers.activations import get_activation

from rewrite import pipeline
from rewrite.errors import AdapterFileError, SpecError
from rewrite.graph_edit import adapters_at
from rewrite.passes import REGISTRY
from rewrite.spec import parse_spec
from rewrite.state import state_of

from helpers import first_output, fresh_capture, refusals
from helpers import run_pass as run
from models import build

ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "silu": "swish"}  # ours -> AdapterHub's (transformers) name
FEED_FORWARD_OUT = {"llama": ["down_proj"], "bert": [r"re:.*layer\.\d+\.output\.dense"], "gpt2": ["mlp.c_proj"]}
ATTENTION_OUT = {"llama": ["o_proj"], "bert": ["attention.output.dense"], "gpt2": ["attn.c_proj"]}
CASES = {  # name: (model, targets, options)
    "llama-houlsby": ("llama", ATTENTION_OUT["llama"] + FEED_FORWARD_OUT["llama"], {"non_linearity": "silu"}),
    "bert-houlsby": ("bert", ATTENTION_OUT["bert"] + FEED_FORWARD_OUT["bert"], {"non_linearity": "gelu"}),
    "bert-pfeiffer": ("bert", FEED_FORWARD_OUT["bert"], {}),
    "gpt2-houlsby": ("gpt2", ATTENTION_OUT["gpt2"] + FEED_FORWARD_OUT["gpt2"], {"non_linearity": "gelu"}),
    "llama-parallel": ("llama", FEED_FORWARD_OUT["llama"] + ATTENTION_OUT["llama"],
                       {"placement": "parallel", "reduction_factor": 2, "scaling": 4.0}),  # AdapterHub's ParBnConfig
    "gpt2-parallel": ("gpt2", FEED_FORWARD_OUT["gpt2"], {"placement": "parallel", "non_linearity": "silu",
                                                         "reduction_factor": 8, "scaling": 2.0}),
}


class Oracle(nn.Module):
    """A bottleneck adapter around one HF layer (nn.Linear or GPT-2's Conv1D), from AdapterHub's equations:
    series y + s (U phi(D y + b_D) + b_U), parallel y + s (U phi(D x + b_D) + b_U), y = layer(x)."""

    def __init__(self, layer: nn.Module, reduction_factor: int = 16, non_linearity: str = "relu",
                 placement: str = "series", scaling: float = 1.0):
        super().__init__()
        conv1d = hasattr(layer, "nf")
        d_in, d_out = (layer.weight.shape[0], layer.nf) if conv1d else (layer.in_features, layer.out_features)
        width = d_in if placement == "parallel" else d_out
        self.layer, self.placement, self.scaling = layer, placement, scaling
        self.adapter_down = nn.Sequential(nn.Linear(width, width // reduction_factor),
                                          get_activation(ACTIVATIONS[non_linearity]))
        self.adapter_up = nn.Linear(width // reduction_factor, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        return y + self.adapter_up(self.adapter_down(x if self.placement == "parallel" else y)) * self.scaling


def _adapted_owners(gm) -> list[str]:
    return [o for o in dict.fromkeys(s.owner for s in state_of(gm).sites.values()) if "tuned" in adapters_at(gm, o)]


def _case(case: str):
    """(ours, the oracle model, the example inputs): the same random adapter weights at the same layers."""
    name, targets, options = CASES[case]
    gm, kwargs = fresh_capture(name)
    run(gm, "insert", kind="bottleneck", targets=targets, options=options, adapter="tuned")
    theirs = build(name)
    generator = torch.Generator().manual_seed(5)
    for owner in _adapted_owners(gm):
        parent, _, child = owner.rpartition(".")
        oracle = Oracle(theirs.get_submodule(owner), **options)
        theirs.get_submodule(parent).add_module(child, oracle)
        ours = adapters_at(gm, owner)["tuned"]
        pairs = [(ours.down_weight, oracle.adapter_down[0].weight), (ours.down_bias, oracle.adapter_down[0].bias),
                 (ours.up_weight, oracle.adapter_up.weight), (ours.up_bias, oracle.adapter_up.bias)]
        with torch.no_grad():
            for mine, its in pairs:
                its.copy_(0.3 * torch.randn(its.shape, generator=generator))
                mine.copy_(its)
    return gm, theirs.eval(), kwargs


@pytest.mark.parametrize("case", list(CASES))
def test_forward_equals_the_oracle(case):
    gm, theirs, kwargs = _case(case)
    owners = _adapted_owners(gm)
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith("adapters.")]
    assert len(calls) == len(owners) == sum(isinstance(m, Oracle) for m in theirs.modules()) >= 2
    expected = first_output(theirs, kwargs)
    assert (expected - first_output(build(CASES[case][0]), kwargs)).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(first_output(gm, kwargs), expected, rtol=0, atol=1e-5)


def test_widths_follow_the_reduction_factor_and_the_placement():
    gm, _, _ = _case("llama-parallel")
    down = adapters_at(gm, "model.layers.0.mlp.down_proj")["tuned"]  # parallel: reads the 128 inputs
    assert (down.width, tuple(down.down_weight.shape), tuple(down.up_weight.shape), down.join) == (
        64, (64, 128), (64, 64), "add")
    gm, _, _ = _case("llama-houlsby")
    down = adapters_at(gm, "model.layers.0.mlp.down_proj")["tuned"]  # series: reads the 64 outputs
    assert (down.width, tuple(down.down_weight.shape), down.join) == (4, (4, 64), "output")


def test_merge_refuses_it_by_name():
    gm, _, _ = _case("llama-houlsby")
    with pytest.raises(SpecError, match=r"o_proj: bottleneck adapter 'tuned' cannot be folded into the weights "
                                        r"exactly; export it with \[export\] mode = \"merged\", which keeps it inline"):
        run(gm, "merge")


def test_unmerged_export_and_allocate_refuse_it_by_name(tmp_path):
    gm, _, _ = _case("llama-houlsby")
    export_error, allocate_error = refusals(gm, "tuned", tmp_path)
    assert re.search(r"o_proj: bottleneck adapters have a non-linearity .*\(not low-rank\).*mode = \"merged\"",
                     export_error), export_error
    assert "adapter 'tuned' is ['bottleneck']" in allocate_error, allocate_error


@pytest.mark.parametrize("fmt,message", [("peft", r"format = 'peft': bottleneck adapters have no PEFT form"),
                                         ("rewrite", r"format = 'rewrite': bottleneck adapters have no saved form")])
def test_saving_it_is_refused_clearly(fmt, message, tmp_path):
    gm, _, _ = _case("bert-pfeiffer")
    with pytest.raises(AdapterFileError, match=message):
        run(gm, "save", root=tmp_path, path="saved", adapter="tuned", format=fmt)
    assert not (tmp_path / "saved").exists()


def test_options_are_typed_and_checked():
    insert = REGISTRY["insert"].Options
    with pytest.raises(ValueError, match=r"options.non_linearity: Input should be 'relu', 'gelu' or 'silu'"):
        insert(kind="bottleneck", targets=["o_proj"], options={"non_linearity": "tanh"})
    with pytest.raises(ValueError, match=r"options.reduction_factor: Input should be greater than or equal to 1"):
        insert(kind="bottleneck", targets=["o_proj"], options={"reduction_factor": 0})
    with pytest.raises(ValueError, match=r"options.placement: Input should be 'series' or 'parallel'"):
        insert(kind="bottleneck", targets=["o_proj"], options={"placement": "beside"})
    with pytest.raises(ValueError, match=r"kind = \"bottleneck\" does not read rank \(it reads dropout\)"):
        insert(kind="bottleneck", targets=["o_proj"], rank=4)


@pytest.mark.slow
def test_a_merged_export_folds_the_others_and_computes_it_inline(hf_dir, monkeypatch, tmp_path):
    """`[export] mode = "merged"` folds a LoRA beside it and keeps the bottleneck adapter as graph ops: ONNX Runtime
    equals torch, and the manifest lists it live."""
    spec = parse_spec('version = 1\n[export]\ncheck = true\n', tmp_path / "spec.toml")
    gm, loaded, report = pipeline.load_and_capture(str(hf_dir("llama")), spec)
    run(gm, "insert", kind="bottleneck", targets=["o_proj"], adapter="tuned", options={"non_linearity": "gelu"})
    run(gm, "insert", kind="lora", targets=["q_proj"], adapter="low_rank")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if name.startswith("adapters."):
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    monkeypatch.setattr(pipeline, "load_and_capture", lambda *args, **kwargs: (gm, loaded, report))
    summary = pipeline.apply(spec, str(hf_dir("llama")), tmp_path / "out")
    assert summary.check_max_abs_diff is not None and summary.check_max_abs_diff <= 1e-4
    assert [(p["label"], p["stats"].get("merged")) for p in summary.passes] == [("export 'merge'", 2)]
    adapters = json.loads((tmp_path / "out" / "manifest.json").read_text())["adapters"]
    assert sorted((a["adapter"], a["state"]) for a in adapters) == [("low_rank", "merged")] * 2 + [("tuned", "live")] * 2
