"""RoAd against Hugging Face PEFT's RoAd on the same random angles and scales.

Oracle: `peft.get_peft_model(model, RoadConfig(...))` with random theta, alpha copied into ours, on a tiny LLaMA (no
biases) and a tiny BERT (biases: R b), for each variant (road_1, PEFT's default; road_2; road_4): forward, saved
directories both ways, `merge_and_unload`; and the 2x2 blocks of R written out by hand for one layer.
PEFT's RoAd adapts Linear layers only, so no Conv1D (GPT-2) case.
"""
from __future__ import annotations

import re

import pytest
import torch

from rewrite.adapters.base import NotSupported
from rewrite.adapters.road import ALPHA, THETA
from rewrite.errors import AdapterFileError, RewriteError, SpecError
from rewrite.graph_edit import adapters_at
from rewrite.passes import REGISTRY

from helpers import edit_json, fill_adapter, first_output, fresh_capture, max_param_diff, merged_onnx_output, \
    peft_reloaded
from helpers import run_pass as run
from models import build

peft = pytest.importorskip("peft")

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "attention.output.dense"]}
GROUP = 16  # the tiny layers have 32 or 64 outputs; PEFT's default 64 does not divide 32
CASES = [("llama", "road_1"), ("llama", "road_2"), ("llama", "road_4"), ("bert", "road_1"), ("bert", "road_4")]


def _peft_model(name: str, variant: str):
    config = peft.RoadConfig(target_modules=TARGETS[name], variant=variant, group_size=GROUP)
    return fill_adapter(peft.get_peft_model(build(name), config), {THETA: (0.0, 0.5), ALPHA: (1.0, 0.3)})


def _vectors(theirs) -> dict[str, dict[str, torch.Tensor]]:
    found: dict[str, dict[str, torch.Tensor]] = {}
    for param_name, param in theirs.named_parameters():
        for key in (THETA, ALPHA):
            if f".{key}." in param_name:
                owner = param_name.removeprefix("base_model.model.").removesuffix(f".{key}.default")
                found.setdefault(owner, {})[key] = param
    return found


def _ours(name: str, variant: str, theirs):
    gm, kwargs = fresh_capture(name)
    run(gm, "insert", kind="road", targets=TARGETS[name], adapter="tuned",
        options={"variant": variant, "group_size": GROUP})
    for owner, tensors in _vectors(theirs).items():
        adapters_at(gm, owner)["tuned"].load_peft_state(tensors)
    return gm, kwargs


@pytest.mark.parametrize("name,variant", CASES)
def test_forward_save_and_merge_equal_peft(name, variant, tmp_path):
    theirs = _peft_model(name, variant)
    gm, kwargs = _ours(name, variant, theirs)
    expected = first_output(theirs, kwargs)
    assert (expected - first_output(build(name), kwargs)).abs().max() > 1e-2  # the rotations matter
    torch.testing.assert_close(first_output(gm, kwargs), expected, rtol=0, atol=1e-5)

    run(gm, "save", root=tmp_path, path="ours", adapter="tuned")
    again, said = peft_reloaded(tmp_path / "ours", name)
    assert not [w for w in said if "nexpected" in w]
    torch.testing.assert_close(first_output(again, kwargs), expected, rtol=0, atol=1e-5)

    run(gm, "merge")  # merge with keep_original / unmerge: tests/test_adapter_kinds.py
    assert max_param_diff(gm, theirs.merge_and_unload()) <= 1e-5
    torch.testing.assert_close(first_output(gm, kwargs), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_merge_is_the_block_rotation_and_unmerge_its_inverse(variant):
    """R written out pair by pair: rows i and j = i + g/2 of each group of g get [[c1_i, -c2_i], [c2_j, c1_j]]."""
    gm, _ = _ours("bert", variant, _peft_model("bert", variant))
    owner = "encoder.layer.0.attention.self.query"
    module = adapters_at(gm, owner)["tuned"]
    c1, c2 = module.coefficients()
    rotation = torch.zeros(module.d_out, module.d_out)
    for start in range(0, module.d_out, GROUP):
        for i in range(start, start + GROUP // 2):
            j = i + GROUP // 2
            rotation[i, i], rotation[i, j], rotation[j, i], rotation[j, j] = c1[i], -c2[i], c2[j], c1[j]
    weight = gm.get_parameter(f"{owner}.weight").detach().clone()
    bias = gm.get_parameter(f"{owner}.bias").detach().clone()
    original = weight.clone(), bias.clone()
    module.merge_into(weight, bias)
    torch.testing.assert_close(weight, rotation @ original[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(bias, rotation @ original[1], rtol=0, atol=1e-6)
    module.unmerge_from(weight, bias)
    torch.testing.assert_close((weight, bias), original, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(TARGETS))
def test_load_reads_a_directory_peft_saved(name, tmp_path):
    theirs = _peft_model(name, "road_2")
    theirs.save_pretrained(tmp_path / "peft")
    gm, kwargs = fresh_capture(name)
    result = run(gm, "load", root=tmp_path, path="peft", adapter="tuned")
    assert result.modified and result.stats["modules"] == len(_vectors(theirs))
    assert {(m.variant, m.group_size) for o in _vectors(theirs) if (m := adapters_at(gm, o)["tuned"])} == {
        ("road_2", GROUP)}
    torch.testing.assert_close(first_output(gm, kwargs), first_output(theirs, kwargs), rtol=0, atol=1e-5)
    assert not run(gm, "load", root=tmp_path, path="peft", adapter="tuned").modified


@pytest.mark.slow
def test_merged_onnx_equals_torch(tmp_path):
    gm, kwargs = _ours("bert", "road_1", _peft_model("bert", "road_1"))
    want = first_output(gm, kwargs)
    run(gm, "merge")
    assert (merged_onnx_output(gm, kwargs, tmp_path / "merged.onnx") - want).abs().max() <= 1e-4


def test_allocate_refuses_it_by_name():  # unmerged exports switch it: tests/test_rowwise_*.py
    gm, _ = _ours("llama", "road_1", _peft_model("llama", "road_1"))
    with pytest.raises(RewriteError, match=re.escape("adapter 'tuned' is ['road']")):
        run(gm, "allocate", adapter="tuned", scorer="spectrum", budget={"params": 10}, report="")


def test_insert_checks_its_options_against_each_site():
    gm, _ = fresh_capture("llama")
    with pytest.raises(SpecError, match=r"v_proj: road: this layer's 32 outputs are not whole groups of group_size "
                                        r"= 64"):
        run(gm, "insert", kind="road", targets=["v_proj"])
    with pytest.raises(ValueError, match=r"options.group_size: Value error, group_size = 7; it must be even"):
        REGISTRY["insert"].Options(kind="road", targets=["q_proj"], options={"group_size": 7})
    with pytest.raises(ValueError, match=r"options.variant: Input should be 'road_1', 'road_2' or 'road_4'"):
        REGISTRY["insert"].Options(kind="road", targets=["q_proj"], options={"variant": "road_3"})
    with pytest.raises(ValueError, match=r"kind = \"road\" does not read alpha \(it reads init\)"):
        REGISTRY["insert"].Options(kind="road", targets=["q_proj"], alpha=2.0)


def test_unmerge_by_the_inverse_needs_regular_blocks():
    gm, _ = _ours("llama", "road_1", _peft_model("llama", "road_1"))
    module = adapters_at(gm, "model.layers.0.self_attn.q_proj")["tuned"]
    with torch.no_grad():
        module.road_alpha[3] = 0.0
    with pytest.raises(NotSupported, match=r"road adapter has 1 channel pair"):
        module.unmerge_from(torch.ones(module.d_out, module.d_in), None)


@pytest.mark.parametrize("change,message", [
    ({"variant": "road_3"}, r"'variant' is 'road_3'; expected one of road_1, road_2, road_4"),
    ({"group_size": 12}, r"group_size 12: expected two vectors of 0.5 x d_out entries"),
    ({"group_size": 7}, r"'group_size': group_size = 7; it must be even"),
    ({"exclude_modules": ["down_proj"]}, r"'exclude_modules' is set; exclude_modules \(not a RoadConfig field"),
    ({"layers_to_transform": [0]}, r"'layers_to_transform' is set; layers_to_transform \(not a RoadConfig field"),
    ({"modules_to_save": ["lm_head"]}, r"'modules_to_save' = \['lm_head'\] names 'lm_head' of this model, "
     r"but adapter_model.safetensors has no copy"),
])
def test_configs_it_does_not_implement_are_refused(change, message, tmp_path):
    _peft_model("llama", "road_1").save_pretrained(tmp_path / "peft")
    edit_json(tmp_path / "peft" / "adapter_config.json", **change)
    gm, _ = fresh_capture("llama")
    with pytest.raises(AdapterFileError, match=message):
        run(gm, "load", root=tmp_path, path="peft", adapter="tuned")
