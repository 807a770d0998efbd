"""Structural removal on Qwen2 (GQA with q/k/v biases), Phi-3 (fused qkv_proj and gate_up_proj under GQA) and
GPT-NeoX (fused query_key_value laid out per head), real transformers models from small configs.

Oracles: the physically pruned model equals the unpruned one with the removed units silenced where they are read
(test_prune's oracle: the o-projection's input columns of a removed head, the down-projection's input columns of a
removed neuron, and the same rows of the LoRA A there; it needs neither the coupling analysis nor its cuts), <= 1e-5;
the pruned model's merged ONNX export in ONNX Runtime equals the pruned model in torch (<= 1e-4, test_prune's
export tolerance); the shapes each config implies for the fused weights (a fused tensor keeps its three / two parts
in proportion).
"""
from __future__ import annotations

import copy
import functools

import pytest

from helpers import run_pass
from prune_models import fused_decoder
from rewrite.capture import capture
from rewrite.inputs import example_inputs
from rewrite.load import LoadedModel
from rewrite.options import CaptureOptions
from test_prune import ATOL, outputs, removed, silence, with_lora

pytestmark = pytest.mark.slow  # each capture takes 6-14 s on a loaded 2-core machine

# name: (LoRA targets on every projection, the attention layer's prefix, o-projection, down-projection)
LAYOUT = {
    "qwen2": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              "model.layers.{i}.self_attn", "o_proj", "model.layers.{i}.mlp.down_proj"),
    "phi3": (["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
             "model.layers.{i}.self_attn", "o_proj", "model.layers.{i}.mlp.down_proj"),
    "gpt_neox": (["query_key_value", "attention.dense", "dense_h_to_4h", "dense_4h_to_h"],
                 "gpt_neox.layers.{i}.attention", "dense", "gpt_neox.layers.{i}.mlp.dense_4h_to_h"),
}


@functools.cache
def _captured(name: str):
    model = fused_decoder(name)
    inputs = example_inputs(model, model.config, CaptureOptions(), "<test>")
    gm, report = capture(LoadedModel(model, None, "hf", name, model.config), inputs)
    assert report.replay_max_abs_diff == 0.0
    return gm, inputs.kwargs, model.config


def captured(name: str):
    gm, kwargs, config = _captured(name)
    return copy.deepcopy(gm), kwargs, config


def head_dim(config) -> int:
    return config.hidden_size // config.num_attention_heads


def silence_heads(masked, name: str, report_dir, config) -> None:
    _, _, o_proj, _ = LAYOUT[name]
    dh = head_dim(config)
    for layer, heads in removed(report_dir, "heads").items():
        silence(masked, f"{layer}.{o_proj}.weight", 1, [h * dh + i for h in heads for i in range(dh)])


def silence_ffn(masked, report_dir) -> None:
    for layer, neurons in removed(report_dir, "ffn").items():
        down = next(n for n, _ in masked.named_parameters()
                    if n.startswith(f"{layer}.") and n.endswith(("down_proj.weight", "dense_4h_to_h.weight")))
        silence(masked, down, 1, neurons)


@pytest.mark.parametrize("name", list(LAYOUT))
def test_removal_equals_masking_and_exports(tmp_path, name):
    gm, kwargs, config = captured(name)
    with_lora(gm, LAYOUT[name][0])
    masked = copy.deepcopy(gm)
    result = run_pass(gm, "prune", tmp_path, heads=0.5, ffn=0.25, method="random", seed=7)
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    assert result.stats["heads_removed"] == layers * heads // 2
    assert result.stats["ffn_removed"] == layers * config.intermediate_size // 4
    silence_heads(masked, name, tmp_path, config)
    silence_ffn(masked, tmp_path)
    got = outputs(gm, kwargs)
    assert (got - outputs(masked, kwargs)).abs().max() <= ATOL

    from helpers import merged_onnx_output

    onnx_out = merged_onnx_output(gm, kwargs, tmp_path / "model.onnx")
    assert onnx_out.shape == got.shape and (onnx_out - got).abs().max() <= 1e-4


def test_phi3_kv_head_takes_its_query_group_through_the_fused_qkv(tmp_path):
    gm, kwargs, config = captured("phi3")
    with_lora(gm, LAYOUT["phi3"][0])
    masked = copy.deepcopy(gm)
    result = run_pass(gm, "prune", tmp_path, kv_heads=1, ffn=0.25, method="random", seed=2)
    assert result.stats["kv_heads_removed"] == config.num_hidden_layers
    dh, group = head_dim(config), config.num_attention_heads // config.num_key_value_heads
    for layer, (kv,) in removed(tmp_path, "kv_heads").items():  # the query heads of KV head kv read it
        silence(masked, f"{layer}.o_proj.weight", 1, list(range(kv * group * dh, (kv + 1) * group * dh)))
    silence_ffn(masked, tmp_path)
    got = outputs(gm, kwargs)
    assert (got - outputs(masked, kwargs)).abs().max() <= ATOL
    # one KV head left: its query group (2 heads), its k and its v, in qkv_proj's q | k | v order
    assert gm.get_parameter("model.layers.0.self_attn.qkv_proj.weight").shape == ((group + 2) * dh, 64)
    assert gm.get_parameter("model.layers.0.mlp.gate_up_proj.weight").shape == (2 * 96, 64)
    assert gm.get_submodule("adapters.model.layers.0.self_attn.qkv_proj.a").lora_B.shape == (2, (group + 2) * dh)

    from helpers import merged_onnx_output

    assert (merged_onnx_output(gm, kwargs, tmp_path / "model.onnx") - got).abs().max() <= 1e-4
