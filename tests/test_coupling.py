"""Coupling analysis (rewrite.coupling): the dependency groups a structural prune cuts together.

Oracles: the head / neuron layout each architecture's config implies (q head h reads KV head h // (H / H_kv), as
transformers' repeat_kv; GPT-2's c_attn holds q, k, v side by side), and Torch-Pruning's DependencyGraph on the CNN
and the plain attention model (module-level members of every group, and the indices of a channel group).
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from helpers import capture_module, fresh_capture, run_pass
from models import build
from prune_models import attention, resnet_tiny
from rewrite.coupling import analyze

tp = pytest.importorskip("torch_pruning")


def by_name(groups, structure):
    return {g.name: g for g in groups if g.structure == structure}


def cuts_of(unit) -> dict[tuple[str, int], list[int]]:
    return {(c.tensor, c.dim): list(c.index) for c in unit.cuts}


def span(start: int, length: int) -> list[int]:
    return list(range(start, start + length))


def test_llama_gqa_heads_and_gated_ffn():
    gm, _ = fresh_capture("llama")
    cfg = build("llama").config
    heads, kv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    group_size = heads // kv
    coupling = analyze(gm)
    attn = by_name(coupling.groups, "heads")
    assert sorted(attn) == [f"model.layers.{i}.self_attn" for i in range(cfg.num_hidden_layers)]
    for layer, g in attn.items():
        p = f"{layer}."
        assert (len(g.units), len(g.blocks), g.status) == (heads, kv, "ok")
        assert g.block_of == [h // group_size for h in range(heads)]
        for h, unit in enumerate(g.units):  # a query head: its q rows and o columns only
            assert cuts_of(unit) == {(p + "q_proj.weight", 0): span(h * dh, dh), (p + "o_proj.weight", 1): span(h * dh, dh)}
        for j, block in enumerate(g.blocks):  # a KV head takes its whole query group
            q = span(j * group_size * dh, group_size * dh)
            assert cuts_of(block) == {(p + "q_proj.weight", 0): q, (p + "k_proj.weight", 0): span(j * dh, dh),
                                      (p + "v_proj.weight", 0): span(j * dh, dh), (p + "o_proj.weight", 1): q}
    for layer, g in by_name(coupling.groups, "ffn").items():
        if layer == "lm_head":
            assert g.status == "blocked" and "model output" in g.units[0].blocked[0]
            continue
        assert len(g.units) == cfg.intermediate_size
        j = 17
        assert cuts_of(g.units[j]) == {(f"{layer}.gate_proj.weight", 0): [j], (f"{layer}.up_proj.weight", 0): [j],
                                       (f"{layer}.down_proj.weight", 1): [j]}
    hidden = [g for g in coupling.groups if g.structure == "hidden"]
    assert len(hidden) == 1 and hidden[0].status == "tied" and "residual add" in hidden[0].tied
    assert all(u.blocked for u in hidden[0].units)  # RMSNorm's mean runs over the hidden channels too


def test_gpt2_fused_c_attn_heads():
    gm, _ = fresh_capture("gpt2")
    cfg = build("gpt2").config
    d, heads = cfg.n_embd, cfg.n_head
    dh = d // heads
    attn = by_name(analyze(gm).groups, "heads")
    assert sorted(attn) == [f"transformer.h.{i}.attn" for i in range(cfg.n_layer)]
    g = attn["transformer.h.1.attn"]
    assert (len(g.units), g.blocks) == (heads, [])
    for h, unit in enumerate(g.units):
        qkv = span(h * dh, dh) + span(d + h * dh, dh) + span(2 * d + h * dh, dh)  # its slice of each third
        assert cuts_of(unit) == {("transformer.h.1.attn.c_attn.weight", 1): qkv,
                                 ("transformer.h.1.attn.c_attn.bias", 0): qkv,
                                 ("transformer.h.1.attn.c_proj.weight", 0): span(h * dh, dh)}


def test_bert_heads_and_ffn():
    gm, _ = fresh_capture("bert")
    groups = analyze(gm).groups
    g = by_name(groups, "heads")["encoder.layer.0.attention"]
    p, dh = "encoder.layer.0.attention.", 16
    assert cuts_of(g.units[2]) == {
        **{(f"{p}self.{n}.{t}", 0): span(2 * dh, dh) for n in ("query", "key", "value") for t in ("weight", "bias")},
        (f"{p}output.dense.weight", 1): span(2 * dh, dh)}
    ffn = by_name(groups, "ffn")["encoder.layer.0"]
    assert cuts_of(ffn.units[5]) == {("encoder.layer.0.intermediate.dense.weight", 0): [5],
                                     ("encoder.layer.0.intermediate.dense.bias", 0): [5],
                                     ("encoder.layer.0.output.dense.weight", 1): [5]}


# --------------------------------------------------------------------------- Torch-Pruning as the oracle

def _role(handler) -> str:
    return "in" if "in_channels" in getattr(handler, "__name__", "") else "out"


def tp_groups(model: nn.Module, example: torch.Tensor) -> set[frozenset]:
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    names = {m: n for n, m in model.named_modules()}
    out = set()
    for group in graph.get_all_groups(root_module_types=[nn.Conv2d, nn.Linear]):
        out.add(frozenset((names[dep.target.module], _role(dep.handler)) for dep, _ in group
                          if isinstance(dep.target.module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))))
    return out


def our_members(group, model: nn.Module) -> frozenset:
    members = set()
    for axis in group.axes:
        tensor, dim = axis.rsplit(":", 1)
        module_name = tensor.rpartition(".")[0]
        module = model.get_submodule(module_name)
        role = "in" if isinstance(module, (nn.Conv2d, nn.Linear)) and tensor.endswith(".weight") and dim == "1" \
            else "out"
        members.add((module_name, role))
    return frozenset(members)


@pytest.mark.parametrize("make, example", [(resnet_tiny, lambda: torch.randn(2, 3, 8, 8)),
                                            (attention, lambda: torch.randn(2, 6, 32))], ids=["cnn", "attention"])
def test_groups_equal_torch_pruning(make, example):
    x = example()
    gm = capture_module(make(), {"x": x})
    ours = {our_members(g, make()) for g in analyze(gm).groups}
    assert ours == tp_groups(make(), x)


def test_channel_indices_equal_torch_pruning():
    model, x = resnet_tiny(), torch.randn(2, 3, 8, 8)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    names = {m: n for n, m in model.named_modules()}
    groups = {g.name: g for g in analyze(capture_module(resnet_tiny(), {"x": x})).groups}
    for root, name, index in ((model.layer2.conv1, "layer2.conv1", 11), (model.stem, "layer1.conv2+stem", 3)):
        theirs = {}
        for dep, idxs in graph.get_pruning_group(root, tp.prune_conv_out_channels, idxs=[index]):
            module = dep.target.module
            if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
                theirs[(names[module], _role(dep.handler))] = sorted(int(i) for i in idxs)
        unit = groups[name].units[index]
        mine = {}
        for cut in unit.cuts:
            module = cut.tensor.rpartition(".")[0]
            role = "in" if cut.tensor.endswith(".weight") and cut.dim == 1 else "out"
            mine[(module, role)] = list(cut.index)
        assert mine == theirs


def test_cnn_residual_channels_are_tied_and_plain_ones_are_not():
    groups = {g.name: g for g in analyze(capture_module(resnet_tiny(), {"x": torch.randn(2, 3, 8, 8)})).groups}
    assert groups["layer1.conv1"].status == groups["layer2.conv1"].status == "ok"
    for name in ("layer1.conv2+stem", "layer2"):
        assert groups[name].status == "tied" and "residual add" in groups[name].tied
    assert groups["fc"].status == "blocked"


# --------------------------------------------------------------------------- adapters

def test_groups_list_the_adapter_tensors_that_shrink():
    gm, _ = fresh_capture("llama")
    run_pass(gm, "insert", adapter="a", targets=["q_proj", "o_proj", "down_proj"], rank=2)
    run_pass(gm, "insert", adapter="b", kind="ia3", targets=["v_proj"])
    groups = analyze(gm).groups
    attn = by_name(groups, "heads")["model.layers.0.self_attn"]
    p = "adapters.model.layers.0.self_attn"
    assert {(a.adapter, a.role, a.tensor, a.dim) for a in attn.adapters} == {
        (f"{p}.q_proj.a", "out", "lora_B", 1), (f"{p}.o_proj.a", "in", "lora_A", 0), (f"{p}.v_proj.b", "out", "ia3_l", 0)}
    ffn = by_name(groups, "ffn")["model.layers.0.mlp"]
    assert {(a.role, a.tensor) for a in ffn.adapters} == {("in", "lora_A")}


def test_an_adapter_that_cannot_be_sliced_refuses_its_group():
    gm, _ = fresh_capture("llama")
    run_pass(gm, "insert", adapter="r", kind="oft", targets=["model.layers.1.self_attn.o_proj"],
             options={"block_size": 4})
    groups = by_name(analyze(gm).groups, "heads")
    assert groups["model.layers.0.self_attn"].status == "ok"
    refused = groups["model.layers.1.self_attn"]
    assert refused.status == "refused" and "oft adapters cannot be sliced" in refused.refused


def test_inspect_groups(hf_dir, capsys):
    from rewrite.cli import main

    assert main(["inspect", str(hf_dir("gpt2")), "--groups", "--json"]) == 0
    groups = {g["group"]: g for g in json.loads(capsys.readouterr().out)["groups"]}
    assert groups["transformer.h.0.attn"]["units"] == 4 and groups["transformer.h.0.attn"]["status"] == "ok"
    assert groups["transformer"]["status"] == "tied"
