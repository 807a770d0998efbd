"""BitFit against two oracles: the same model with its biases set to b + db by hand (nn.Module edits: a layer without
a bias gets db as its bias), and Hugging Face PEFT's BEFT (`BeftConfig`, nn.Linear only) on the same deltas.

Models: a tiny LLaMA (no biases anywhere: merge adds them), a tiny BERT (biases), a tiny GPT-2 (Conv1D, biases), and
a small conv net (conv2d with and without a bias, a bias-less Linear) under both capture front-ends.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from rewrite.adapters import KINDS
from rewrite.adapters.base import NotSupported
from rewrite.adapters.bitfit import BitFit
from rewrite.errors import AdapterFileError, RewriteError
from rewrite.graph_edit import adapters_at

from helpers import capture_module, fill_adapter, first_output, merged_onnx_output
from helpers import run_pass as run
from models import build
from test_oft import TARGETS, Oracle, assert_close, check_allocate_refuses, check_forward, check_onnx, \
    check_refuses_config, check_save_and_load, oracle_fixtures, owners

peft = pytest.importorskip("peft")
NO_BIAS_WARNING = "Detected that the base layer has no bias term"  # PEFT's BEFT on a layer without a bias
report_max_diffs, captured = oracle_fixtures()
pytestmark = pytest.mark.filterwarnings(f"ignore:{NO_BIAS_WARNING}")

HAND_TARGETS = {**TARGETS, "gpt2": ["c_attn", "c_proj"]}


def with_biases(model: nn.Module, deltas: dict[str, torch.Tensor]) -> nn.Module:
    """The hand oracle: each module's bias set to b + db (db itself where it has none)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for owner, delta in deltas.items():
            layer = model.get_submodule(owner)
            if layer.bias is None:
                layer.bias = nn.Parameter(delta.clone())
            else:
                layer.bias.add_(delta)
    return model


def inserted(captured, name: str, adapter: str = "default"):
    """Our graph with BitFit on the model's targets and random deltas; (graph, inputs, {owner: db})."""
    gm, kwargs = captured(name)
    run(gm, "insert", kind="bitfit", targets=HAND_TARGETS[name], adapter=adapter)
    fill_adapter(gm, {"bias_delta": (0.0, 0.3)})
    deltas = {o: adapters_at(gm, o)[adapter].bias_delta.detach().clone() for o in owners(gm) if adapters_at(gm, o)}
    return gm, kwargs, deltas


@pytest.mark.parametrize("name", ["llama", "bert", "gpt2"])
def test_forward_equals_the_model_with_its_biases_set_by_hand(captured, name):
    gm, kwargs, deltas = inserted(captured, name)
    want = first_output(with_biases(build(name), deltas), kwargs)
    assert (want - first_output(build(name), kwargs)).abs().max() > 1e-2
    assert_close(f"bitfit {name} forward vs biases set by hand", first_output(gm, kwargs), want, atol=1e-6)


@pytest.mark.parametrize("name", ["llama", "bert", "gpt2"])
def test_merge_sets_the_biases_and_unmerge_restores_them(captured, name):
    """Merged: every parameter equals the hand-edited model's (LLaMA gains `<owner>.bias`); unmerge restores every
    weight and bias exactly (a bias that merge added stays, at zero)."""
    gm, kwargs, deltas = inserted(captured, name)
    unmerged = first_output(gm, kwargs)
    before = {n: p.detach().clone() for n, p in gm.named_parameters() if not n.startswith("adapters.")}
    oracle = with_biases(build(name), deltas)
    run(gm, "merge", keep_original=True)
    merged = dict(gm.named_parameters())
    assert merged.keys() == dict(oracle.named_parameters()).keys()
    for param_name, param in oracle.named_parameters():
        assert_close(f"bitfit {name} merged parameters vs biases set by hand", merged[param_name], param, atol=1e-6)
    assert_close(f"bitfit {name} merged forward vs biases set by hand", first_output(gm, kwargs),
                 first_output(oracle, kwargs), atol=1e-6)
    run(gm, "unmerge")
    after = dict(gm.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in before.items())
    assert all(not after[n].any() for n in after.keys() - before.keys() if not n.startswith("adapters."))
    assert_close(f"bitfit {name} unmerged again", first_output(gm, kwargs), unmerged, atol=0.0)


class ConvNet(nn.Module):
    """conv2d without a bias, conv2d with one, a Linear without one."""

    def __init__(self):
        super().__init__()
        self.plain = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.biased = nn.Conv2d(8, 8, 3, stride=2)
        self.head = nn.Linear(8 * 3 * 3, 5, bias=False)

    def forward(self, x):
        return self.head(torch.relu(self.biased(torch.relu(self.plain(x)))).flatten(1))


@pytest.mark.parametrize("frontend", ["export", "fx"])
def test_conv2d_and_bias_less_sites_per_output_channel(frontend, tmp_path):
    torch.manual_seed(0)
    model = ConvNet().eval()
    inputs = {"x": torch.randn(2, 3, 8, 8)}
    gm = capture_module(model, inputs, frontend=frontend)
    run(gm, "insert", kind="bitfit", targets=["plain", "biased", "head"])
    generator = torch.Generator().manual_seed(3)
    deltas = {o: 0.3 * torch.randn(model.get_submodule(o).weight.shape[0], generator=generator)
              for o in ("plain", "biased", "head")}
    with torch.no_grad():  # conv2d sites have no PEFT form: set the deltas directly
        for owner, delta in deltas.items():
            adapters_at(gm, owner)["default"].bias_delta.copy_(delta)
    oracle = with_biases(model, deltas)
    with torch.no_grad():
        want = oracle(**inputs)
        assert (want - model(**inputs)).abs().max() > 1e-2
        assert_close(f"bitfit conv {frontend} forward vs biases set by hand", gm(**inputs), want, atol=1e-6)
        run(gm, "merge")
        assert_close(f"bitfit conv {frontend} merged forward vs biases set by hand", gm(**inputs), want, atol=1e-6)
    merged = dict(gm.named_parameters())
    for param_name, param in oracle.named_parameters():
        assert_close(f"bitfit conv {frontend} merged parameters vs biases set by hand", merged[param_name], param,
                     atol=1e-6)
    if frontend == "export":
        assert_close("bitfit conv merged ONNX Runtime vs torch", merged_onnx_output(gm, inputs, tmp_path / "m.onnx"),
                     want, atol=1e-4)


def beft(name: str) -> Oracle:
    return Oracle("bitfit", peft.BeftConfig(target_modules=TARGETS[name]), {})


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_forward_equals_peft_beft(captured, name):
    check_forward(beft(name), captured, name, f"bitfit {name}")


def test_save_and_load_round_trip_through_peft_beft(captured, tmp_path):
    check_save_and_load(beft("bert"), captured, "bert", tmp_path, "bitfit bert")


def test_save_and_load_round_trip_through_peft_beft_without_biases(captured, tmp_path):
    """LLaMA: PEFT warns only that such a layer cannot be merged (it can here: merge adds the bias)."""
    oracle = beft("llama")
    theirs = oracle.peft_model("llama")
    gm, kwargs = oracle.ours(captured, "llama", theirs)
    want = first_output(theirs, kwargs)
    run(gm, "save", root=tmp_path, path="ours", adapter="tuned")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = peft.PeftModel.from_pretrained(build("llama"), tmp_path / "ours").eval()
    assert {str(w.message) for w in caught if "peft" in w.filename} == {
        f"{NO_BIAS_WARNING}. Note you cannot merge the BEFT adapter into the base layer."}
    assert_close("bitfit llama our save, PEFT from_pretrained", first_output(again, kwargs), want)
    theirs.save_pretrained(tmp_path / "peft")
    loaded, _ = captured("llama")
    assert run(loaded, "load", root=tmp_path, path="peft", adapter="tuned").stats["modules"] == 6
    assert_close("bitfit llama PEFT save_pretrained, our load", first_output(loaded, kwargs), want)
    assert not run(loaded, "load", root=tmp_path, path="peft", adapter="tuned").modified


def test_merge_equals_peft_merge_and_unload(captured):
    oracle = beft("bert")
    theirs = oracle.peft_model("bert")
    gm, kwargs = oracle.ours(captured, "bert", theirs)
    want = first_output(theirs, kwargs)
    run(gm, "merge")
    folded = dict(theirs.merge_and_unload().named_parameters())
    ours = dict(gm.named_parameters())
    assert ours.keys() == folded.keys()
    for param_name, param in folded.items():
        assert_close("bitfit bert merged parameters vs PEFT merge_and_unload", ours[param_name], param)
    assert_close("bitfit bert merged forward vs PEFT", first_output(gm, kwargs), want)


@pytest.mark.slow
def test_merged_onnx_of_a_model_without_biases_equals_torch(captured, tmp_path):
    check_onnx(beft("llama"), captured, tmp_path, "bitfit")  # per row: tests/test_rowwise_kinds.py


def test_allocate_refuses_by_name(captured):
    check_allocate_refuses(beft("llama"), captured)
    assert not KINDS["bitfit"].resizable and not KINDS["bitfit"].low_rank


def test_refusals_name_the_kind(captured, tmp_path):
    """No rank to allocate; PEFT's BEFT has no Conv1D layer; our adapter file holds LoRA (unmerged exports switch it:
    tests/test_rowwise_*.py)."""
    gm, _, _ = inserted(captured, "gpt2")
    with pytest.raises(RewriteError, match=r"is \['bitfit'\] at .*which cannot be: it resizes lora"):
        run(gm, "allocate", adapter="default", scorer="spectrum", budget={"params": 10}, report="")
    with pytest.raises(AdapterFileError, match=r"format = 'peft': PEFT's BEFT adapts Linear layers only; a bitfit "
                                               r"adapter on a conv1d site has no PEFT form: merge it into the bias"):
        run(gm, "save", root=tmp_path, path="peft")
    llama, _, _ = inserted(captured, "llama")
    with pytest.raises(AdapterFileError, match=r"format = 'rewrite': our adapter file holds LoRA adapters; save "
                                               r"bitfit as PEFT"):
        run(llama, "save", root=tmp_path, path="ours.safetensors", format="rewrite")


@pytest.mark.parametrize("key,value,message", [
    ("modules_to_save", ["lm_head"], r"'modules_to_save' = \['lm_head'\] names 'lm_head' of this model, "
     r"but adapter_model.safetensors has no copy"),
    ("init_weights", "yes", r"'init_weights' is 'yes'; expected true or false"),
])
def test_load_refuses_what_it_does_not_implement(captured, tmp_path, key, value, message):
    check_refuses_config(beft("llama"), captured, tmp_path, key, value, message)


def test_insert_reads_no_setting(captured):
    gm, _ = captured("llama")
    with pytest.raises(ValueError, match=r'kind = "bitfit" does not read rank \(it reads none of rank'):
        run(gm, "insert", kind="bitfit", targets=["q_proj"], rank=4)


def test_module_delta_shapes_and_merge_without_a_bias():
    linear, conv = BitFit("linear", 4, 3), BitFit("conv2d", 2, 3)
    with torch.no_grad():
        linear.bias_delta.copy_(torch.tensor([1.0, 2.0, 3.0]))
    assert linear(torch.zeros(2, 5, 4)).shape == (2, 5, 3)
    assert torch.equal(linear(torch.zeros(7, 4))[6], linear.bias_delta)
    assert (torch.zeros(2, 3, 6, 6) + conv(torch.zeros(2, 2, 8, 8))).shape == (2, 3, 6, 6)
    bias = torch.ones(3)
    linear.merge_into(torch.zeros(3, 4), bias)
    assert torch.equal(bias, torch.tensor([2.0, 3.0, 4.0]))
    linear.unmerge_from(torch.zeros(3, 4), bias)
    assert torch.equal(bias, torch.ones(3))
    with pytest.raises(NotSupported, match=r"bitfit merges into the site's bias, and this site has none"):
        linear.merge_into(torch.zeros(3, 4), None)
