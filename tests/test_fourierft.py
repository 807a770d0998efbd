"""FourierFT against Hugging Face PEFT's FourierFT on the same random spectra.

Oracle: `peft.get_peft_model(model, FourierFTConfig(...))` with random coefficients c copied into ours, on a tiny
LLaMA, a tiny BERT (linear sites) and a tiny GPT-2 (Conv1D sites): the drawn positions (bit for bit), forward,
saved directories both ways, `merge_and_unload`; and the closed form of dW (a sum of cosines) for one layer.
One module per model gets another n_frequency (PEFT's `n_frequency_pattern`; two inserts of one adapter here).
"""
from __future__ import annotations

import json
import math

import pytest
import safetensors
import torch

from rewrite.adapters.fourierft import SPECTRUM
from rewrite.errors import AdapterFileError, SpecError
from rewrite.graph_edit import adapters_at
from rewrite.passes import REGISTRY

from helpers import edit_json, fill_adapter, first_output, fresh_capture, max_param_diff, merged_onnx_output, \
    peft_reloaded
from helpers import run_pass as run
from models import build

peft = pytest.importorskip("peft")

CASES = {"llama": (["q_proj", "v_proj"], "down_proj"), "bert": (["query", "value"], "intermediate.dense"),
         "gpt2": (["c_attn"], "mlp.c_proj")}
OPTIONS = dict(n_frequency=300, scaling=100.0, random_loc_seed=123)
WIDE = 500  # n_frequency of each model's last target


def _peft_model(name: str):
    narrow, wide = CASES[name]
    config = peft.FourierFTConfig(target_modules=[*narrow, wide], n_frequency_pattern={wide: WIDE},
                                  fan_in_fan_out=name == "gpt2", **OPTIONS)
    return fill_adapter(peft.get_peft_model(build(name), config), {SPECTRUM: (0.0, 0.1)})


def _spectra(theirs) -> dict[str, torch.Tensor]:
    return {n.removeprefix("base_model.model.").removesuffix(f".{SPECTRUM}.default"): p
            for n, p in theirs.named_parameters() if SPECTRUM in n}


def _ours(name: str, theirs):
    narrow, wide = CASES[name]
    gm, kwargs = fresh_capture(name)
    run(gm, "insert", kind="fourierft", targets=narrow, adapter="tuned", options=OPTIONS)
    run(gm, "insert", kind="fourierft", targets=[wide], adapter="tuned", options={**OPTIONS, "n_frequency": WIDE})
    for owner, spectrum in _spectra(theirs).items():
        adapters_at(gm, owner)["tuned"].load_peft_state({SPECTRUM: spectrum})
    return gm, kwargs


@pytest.mark.parametrize("name", list(CASES))
def test_positions_forward_save_and_merge_equal_peft(name, tmp_path):
    theirs = _peft_model(name)
    gm, kwargs = _ours(name, theirs)
    for owner in _spectra(theirs):
        layer = theirs.get_submodule(f"base_model.model.{owner}")
        assert torch.equal(adapters_at(gm, owner)["tuned"].indices, layer.indices["default"]), owner
    expected = first_output(theirs, kwargs)
    assert (expected - first_output(build(name), kwargs)).abs().max() > 1e-2  # the spectra matter
    torch.testing.assert_close(first_output(gm, kwargs), expected, rtol=0, atol=1e-5)

    run(gm, "save", root=tmp_path, path="ours", adapter="tuned")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["n_frequency"] == OPTIONS["n_frequency"] and len(config["n_frequency_pattern"]) == 2
    again, said = peft_reloaded(tmp_path / "ours", name)
    assert not [w for w in said if "nexpected" in w or "fan_in_fan_out" in w]
    torch.testing.assert_close(first_output(again, kwargs), expected, rtol=0, atol=1e-5)

    run(gm, "merge")  # merge with keep_original / unmerge: tests/test_adapter_kinds.py
    assert max_param_diff(gm, theirs.merge_and_unload()) <= 1e-5
    torch.testing.assert_close(first_output(gm, kwargs), expected, rtol=0, atol=1e-5)


def test_unmerge_from_subtracts_the_merged_delta():
    theirs = _peft_model("gpt2")
    gm, _ = _ours("gpt2", theirs)
    module = adapters_at(gm, "transformer.h.0.attn.c_attn")["tuned"]
    weight = gm.get_parameter("transformer.h.0.attn.c_attn.weight").detach().clone()
    original = weight.clone()
    module.merge_into(weight, None)
    assert (weight - original).abs().max() > 1e-2
    module.unmerge_from(weight, None)
    torch.testing.assert_close(weight, original, rtol=0, atol=1e-6)


def test_delta_is_the_closed_form_sum_of_cosines():
    """dW[u, v] = scaling / (d_out d_in) * sum_j c_j cos(2 pi (p_j u / d_out + q_j v / d_in)), in float64."""
    theirs = _peft_model("llama")
    gm, _ = _ours("llama", theirs)
    module = adapters_at(gm, "model.layers.0.self_attn.v_proj")["tuned"]
    d_out, d_in = module.d_out, module.d_in
    p, q = (i.double() for i in module.indices)
    u, v = torch.arange(d_out, dtype=torch.float64), torch.arange(d_in, dtype=torch.float64)
    phase = 2 * math.pi * (p[:, None, None] * u[None, :, None] / d_out + q[:, None, None] * v[None, None, :] / d_in)
    closed = module.scaling / (d_out * d_in) * (module.fourierft_spectrum.double()[:, None, None] * phase.cos()).sum(0)
    assert (d_out, d_in) == (32, 64) and closed.abs().max() > 1e-2
    torch.testing.assert_close(module.delta_weight().double(), closed, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_load_reads_a_directory_peft_saved(name, tmp_path):
    theirs = _peft_model(name)
    theirs.save_pretrained(tmp_path / "peft")
    saved = safetensors.safe_open(tmp_path / "peft" / "adapter_model.safetensors", "pt").keys()
    assert all(key.endswith(f".{SPECTRUM}") for key in saved)  # PEFT draws the positions again from the seed
    gm, kwargs = fresh_capture(name)
    result = run(gm, "load", root=tmp_path, path="peft", adapter="tuned")
    assert result.modified and result.stats["modules"] == len(_spectra(theirs))
    assert {adapters_at(gm, o)["tuned"].n_frequency for o in _spectra(theirs)} == {OPTIONS["n_frequency"], WIDE}
    torch.testing.assert_close(first_output(gm, kwargs), first_output(theirs, kwargs), rtol=0, atol=1e-5)
    assert not run(gm, "load", root=tmp_path, path="peft", adapter="tuned").modified


@pytest.mark.slow
def test_merged_onnx_equals_torch(tmp_path):
    gm, kwargs = _ours("llama", _peft_model("llama"))
    want = first_output(gm, kwargs)
    run(gm, "merge")
    assert (merged_onnx_output(gm, kwargs, tmp_path / "merged.onnx") - want).abs().max() <= 1e-4


def test_allocate_refuses_it_by_name():
    """It has no rank to allocate; unmerged exports switch it through exact factors (test_dense_delta_unmerged.py)."""
    gm, _ = _ours("llama", _peft_model("llama"))
    with pytest.raises(SpecError, match=r"adapter 'tuned' is \['fourierft'\]"):
        run(gm, "allocate", adapter="tuned", scorer="spectrum", budget={"params": 10}, report="")


def test_insert_checks_its_options_against_each_site():
    gm, _ = fresh_capture("llama")
    with pytest.raises(SpecError, match=r"v_proj: fourierft: n_frequency = 3000 is above the 32 x 64 = 2048"):
        run(gm, "insert", kind="fourierft", targets=["v_proj"], options={"n_frequency": 3000})
    with pytest.raises(ValueError, match=r"kind = \"fourierft\" does not read rank \(it reads init\)"):
        REGISTRY["insert"].Options(kind="fourierft", targets=["q_proj"], rank=4)
    with pytest.raises(ValueError, match=r"options.n_frequency: Input should be greater than or equal to 1"):
        REGISTRY["insert"].Options(kind="fourierft", targets=["q_proj"], options={"n_frequency": 0})


@pytest.mark.parametrize("change,message", [
    ({"bias": "all"}, r"'bias': bias = 'all' trains base biases.*only bias = \"none\""),
    ({"modules_to_save": ["lm_head"]}, r"'modules_to_save' = \['lm_head'\] names 'lm_head' of this model, "
     r"but adapter_model.safetensors has no copy"),
    ({"random_loc_seed": None}, r"'random_loc_seed' is None; expected a whole number"),
    ({"n_frequency_pattern": {"down_proj": 7}}, r"has shape \(500,\), but adapter_config.json says n_frequency = 7"),
])
def test_configs_it_does_not_implement_are_refused(change, message, tmp_path):
    _peft_model("llama").save_pretrained(tmp_path / "peft")
    edit_json(tmp_path / "peft" / "adapter_config.json", **change)
    gm, _ = fresh_capture("llama")
    with pytest.raises(AdapterFileError, match=message):
        run(gm, "load", root=tmp_path, path="peft", adapter="tuned")
