"""LN tuning against Hugging Face PEFT's LNTuning on the same tuned norms, and the norm sites it adapts.

Oracle: `peft.get_peft_model(model, LNTuningConfig(...))`, whose tuned copies of the norm layers get random weights
(and biases), copied into ours. The base norms are random too (not the identity), so the conversion between PEFT's
full tensors and our deltas is exercised: a tiny LLaMA (LlamaRMSNorm: weight only), a tiny BERT and a tiny GPT-2
(nn.LayerNorm: weight and bias). Forward, saved directories both ways, `merge_and_unload`, merged ONNX.
"""
from __future__ import annotations

import copy
import functools
import re

import pytest
import torch

from rewrite.adapters.ln_tuning import BIAS, WEIGHT
from rewrite.capture import capture
from rewrite.errors import AdapterFileError, SpecError
from rewrite.graph_edit import adapters_at
from rewrite.inputs import example_inputs
from rewrite.load import LoadedModel
from rewrite.options import CaptureOptions
from rewrite.state import state_of

from helpers import edit_json, fill_adapter, first_output, max_param_diff, merged_onnx_output, peft_reloaded
from helpers import run_pass as run
from models import build

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:Unsupported layer type")  # PEFT on every norm it copies

TARGETS = {"llama": ["input_layernorm", "post_attention_layernorm", "norm"], "bert": ["LayerNorm"],
           "gpt2": ["ln_1", "ln_2", "ln_f"]}
TUNED = {"ln_tuning_layers.default.weight": (1.0, 0.3), "ln_tuning_layers.default.bias": (0.0, 0.3)}


def _base(name: str):
    """The tiny model `name` with random norm weights and biases (a fresh model's are ones and zeros)."""
    model = build(name)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith(("LayerNorm", "RMSNorm")):
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=generator))
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=generator))
    return model


@functools.cache
def _captured(name: str):
    model = _base(name)
    inputs = example_inputs(model, model.config, CaptureOptions(), "<test>")
    gm, _ = capture(LoadedModel(model, None, "hf", name, model.config), inputs)
    return gm, inputs.kwargs


def _fresh(name: str):
    gm, kwargs = _captured(name)
    return copy.deepcopy(gm), kwargs


def _peft_model(name: str):
    return fill_adapter(peft.get_peft_model(_base(name), peft.LNTuningConfig(target_modules=TARGETS[name])), TUNED)


def _tuned(theirs) -> dict[str, dict[str, torch.Tensor]]:
    """{norm module: {PEFT key suffix: its tuned tensor}} of a PEFT LN tuning model."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for param_name, param in theirs.named_parameters():
        owner, _, key = param_name.removeprefix("base_model.model.").partition(".ln_tuning_layers.default.")
        if key:
            found.setdefault(owner, {})[f"ln_tuning_layers.{key}"] = param
    return found


def _ours(name: str, theirs):
    gm, kwargs = _fresh(name)
    run(gm, "insert", kind="ln_tuning", targets=TARGETS[name], adapter="tuned")
    for owner, tensors in _tuned(theirs).items():
        adapters_at(gm, owner)["tuned"].load_peft_state(tensors)
    return gm, kwargs


@pytest.mark.parametrize("name", list(TARGETS))
def test_forward_save_and_merge_equal_peft(name, tmp_path):
    theirs = _peft_model(name)
    gm, kwargs = _ours(name, theirs)
    assert len(_tuned(theirs)) == 5 and all(o in state_of(gm).sites for o in _tuned(theirs))
    expected = first_output(theirs, kwargs)
    assert (expected - first_output(_base(name), kwargs)).abs().max() > 1e-2  # the tuned norms matter
    torch.testing.assert_close(first_output(gm, kwargs), expected, rtol=0, atol=1e-5)

    run(gm, "save", root=tmp_path, path="ours", adapter="tuned")
    again, said = peft_reloaded(tmp_path / "ours", name)  # onto the plain model: the directory holds full norms
    assert not [w for w in said if "nexpected" in w]
    torch.testing.assert_close(first_output(again, kwargs), expected, rtol=0, atol=1e-5)

    run(gm, "merge")
    assert max_param_diff(gm, theirs.merge_and_unload()) <= 1e-5
    torch.testing.assert_close(first_output(gm, kwargs), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_merge_adds_the_deltas_and_unmerge_restores_the_norm(name):
    gm, kwargs = _ours(name, _peft_model(name))
    adapted = first_output(gm, kwargs)
    before = {n: p.detach().clone() for n, p in gm.named_parameters() if not n.startswith("adapters.")}
    site = next(s for s in state_of(gm).sites.values() if s.op in ("layernorm", "rmsnorm"))
    module = adapters_at(gm, site.owner)["tuned"]
    tuned = module.peft_state()
    run(gm, "merge", keep_original=True)
    torch.testing.assert_close(gm.get_parameter(site.weight), tuned[WEIGHT], rtol=0, atol=1e-6)
    if site.bias:
        torch.testing.assert_close(gm.get_parameter(site.bias), tuned[BIAS], rtol=0, atol=1e-6)
    torch.testing.assert_close(first_output(gm, kwargs), adapted, rtol=0, atol=1e-5)
    run(gm, "unmerge")
    assert max((before[n] - p).abs().max().item() for n, p in gm.named_parameters() if n in before) <= 1e-5
    weight, bias = before[site.weight].clone(), before[site.bias].clone() if site.bias else None
    module.merge_into(weight, bias)
    module.unmerge_from(weight, bias)  # the subtraction itself, without the kept copy
    torch.testing.assert_close(weight, before[site.weight], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_load_reads_a_directory_peft_saved(name, tmp_path):
    theirs = _peft_model(name)
    theirs.save_pretrained(tmp_path / "peft")
    gm, kwargs = _fresh(name)
    result = run(gm, "load", root=tmp_path, path="peft", adapter="tuned")
    assert result.modified and result.stats["modules"] == 5
    assert {adapters_at(gm, o)["tuned"].kind for o in _tuned(theirs)} == {"ln_tuning"}
    torch.testing.assert_close(first_output(gm, kwargs), first_output(theirs, kwargs), rtol=0, atol=1e-5)
    assert not run(gm, "load", root=tmp_path, path="peft", adapter="tuned").modified


@pytest.mark.slow
def test_merged_onnx_equals_torch(tmp_path):
    gm, kwargs = _ours("bert", _peft_model("bert"))
    want = first_output(gm, kwargs)
    run(gm, "merge")
    assert (merged_onnx_output(gm, kwargs, tmp_path / "merged.onnx") - want).abs().max() <= 1e-4


def test_allocate_refuses_it_by_name():
    gm, _ = _ours("llama", _peft_model("llama"))
    with pytest.raises(SpecError, match=re.escape("adapter 'tuned' is ['ln_tuning']")):
        run(gm, "allocate", adapter="tuned", scorer="spectrum", budget={"params": 10}, report="")


@pytest.mark.parametrize("name, switching", [("llama", "bank"), ("gpt2", "bank"), ("bert", "ort-adapters")])
def test_unmerged_export_equals_peft_row_by_row(name, switching, tmp_path):
    """Two LN tuning adapters (PEFT's, and a copy with other tuned norms) and the base model: per row in one batch
    (bank), or one per run through each adapter's .onnx_adapter file (ort-adapters), equal PEFT's forward with that
    adapter (and the base model) under ONNX Runtime."""
    import numpy as np
    import onnxruntime as ort

    from rewrite.export.onnx_unmerged import export_unmerged
    from rewrite.options import ExportOptions

    theirs = _peft_model(name).eval()
    other = fill_adapter(_peft_model(name), TUNED, seed=11).eval()
    gm, kwargs = _ours(name, theirs)
    run(gm, "insert", kind="ln_tuning", targets=TARGETS[name], adapter="other")
    for owner, tensors in _tuned(other).items():
        adapters_at(gm, owner)["other"].load_peft_state(tensors)
    feeds = {k: v[:1].expand(3, *v.shape[1:]).contiguous() for k, v in kwargs.items()}
    with torch.no_grad():
        want = {"tuned": first_output(theirs, feeds), "other": first_output(other, feeds)}
        with theirs.disable_adapter():
            want[None] = first_output(theirs, feeds)
    assert (want["tuned"] - want[None]).abs().max() > 1e-2 and (want["other"] - want["tuned"]).abs().max() > 1e-2
    entry = export_unmerged(gm, tmp_path, ExportOptions(mode="unmerged", switching=switching))
    assert {r.kind for r in entry.row_sites} == {"ln_tuning"}
    session = ort.InferenceSession(str(tmp_path / entry.file), providers=["CPUExecutionProvider"])
    inputs = {k: v.numpy() for k, v in feeds.items()}
    if switching == "bank":
        names = ["tuned", None, "other"]
        ids = np.array([entry.adapters[n].slot if n else -1 for n in names], np.int64)
        got = session.run(None, {**inputs, "adapter_ids": ids})[0]
        for row, n in enumerate(names):
            assert np.abs(got[row] - want[n][row].numpy()).max() <= 1e-4, n
        return
    assert np.abs(session.run(None, inputs)[0] - want[None].numpy()).max() <= 1e-4
    for n in ("tuned", "other"):
        adapter = ort.LoraAdapter()
        adapter.Load(str(tmp_path / entry.adapters[n].file))
        options = ort.RunOptions()
        options.add_active_adapter(adapter)
        assert np.abs(session.run(None, inputs, options)[0] - want[n].numpy()).max() <= 1e-4, n


def test_a_base_weight_at_zero_is_refused_unmerged(tmp_path):
    from rewrite.errors import RewriteError
    from rewrite.export.onnx_unmerged import export_unmerged
    from rewrite.options import ExportOptions

    gm, _ = _ours("llama", _peft_model("llama"))
    with torch.no_grad():
        gm.get_parameter(state_of(gm).sites["model.norm"].weight)[3] = 0.0
    with pytest.raises(RewriteError, match=r"model\.norm: ln_tuning switches unmerged .* 1 of its base weights are "
                                           r"0.*merge it"):
        export_unmerged(gm, tmp_path, ExportOptions(mode="unmerged", switching="bank"))


def test_norm_sites_are_found_and_only_norm_kinds_select_them():
    llama, _ = _fresh("llama")
    norms = {s.name: (s.op, s.module_class, s.d_in, s.bias) for s in state_of(llama).sites.values()
             if s.op in ("layernorm", "rmsnorm")}
    assert norms["model.norm"] == ("rmsnorm", "LlamaRMSNorm", 64, None) and len(norms) == 5
    bert, _ = _fresh("bert")
    layer_norm = state_of(bert).sites["embeddings.LayerNorm"]
    assert (layer_norm.op, layer_norm.module_class, layer_norm.bias) == ("layernorm", "LayerNorm",
                                                                        "embeddings.LayerNorm.bias")
    result = run(bert, "insert", kind="lora", targets=["re:.*attention.*"], adapter="weights")
    assert result.stats["adapters"] == 8  # q, k, v and the output dense of each layer: not attention.output.LayerNorm
    with pytest.raises(SpecError, match=r"'class:LayerNorm' matches no site \(only .* sites are eligible\)"):
        run(bert, "insert", kind="lora", targets=["class:LayerNorm"], adapter="other")
    with pytest.raises(SpecError, match=r"kind = \"ln_tuning\" adapts layernorm, rmsnorm sites; .*query.* are linear"):
        run(bert, "insert", kind="ln_tuning", targets=["LayerNorm", "query"], adapter="norms")
    assert run(bert, "insert", kind="ln_tuning", targets=["class:LayerNorm"], adapter="norms").stats["sites"] == 5


@pytest.mark.parametrize("change,message", [
    ({"modules_to_save": ["lm_head"]}, r"'modules_to_save' = \['lm_head'\] names 'lm_head' of this model, "
     r"but adapter_model.safetensors has no copy"),
    ({"layers_to_transform": [0]}, r"'layers_to_transform' is set; layers_to_transform \(not an LNTuningConfig field"),
    ({"layers_pattern": "layers"}, r"'layers_pattern' is set; layers_pattern \(not an LNTuningConfig field"),
])
def test_configs_it_does_not_implement_are_refused(change, message, tmp_path):
    _peft_model("llama").save_pretrained(tmp_path / "peft")
    edit_json(tmp_path / "peft" / "adapter_config.json", **change)
    gm, _ = _fresh("llama")
    with pytest.raises(AdapterFileError, match=message):
        run(gm, "load", root=tmp_path, path="peft", adapter="tuned")


def test_a_peft_copy_of_a_module_that_is_no_norm_is_refused(tmp_path):
    """PEFT's LN tuning copies any module it is given; ours tunes norm sites only."""
    model = peft.get_peft_model(build("llama"), peft.LNTuningConfig(target_modules=["norm", "lm_head"]))
    model.save_pretrained(tmp_path / "peft")
    gm, _ = _fresh("llama")
    with pytest.raises(AdapterFileError, match=r"module 'lm_head' is a linear site; ln_tuning adapters go on "
                                               r"layernorm, rmsnorm sites"):
        run(gm, "load", root=tmp_path, path="peft", adapter="tuned")
