"""DoRA against Hugging Face PEFT's `LoraConfig(use_dora=True)` on the same weights.

Oracle: `peft.get_peft_model(model, LoraConfig(use_dora=True, init_lora_weights=False))` (random A and B) with its
magnitude vectors scaled away from ||W||_c, so no part of the adapter is the identity; our inserted DoRA gets PEFT's
tensors. Models: a tiny LLaMA (GQA decoder) and BERT (encoder) on linear sites, GPT-2 on Conv1D, and a small CNN
(conv2d, embedding, linear). Checked: the forward and its gradients (norm detached as PEFT does), `save` to a
directory PEFT loads, `load` of a directory PEFT saved (twice: no-op), `merge` against `merge_and_unload` and the
exact `unmerge_from`, a merged ONNX export run by ONNX Runtime, the refusals (our LoRA file, a LoRA
adapter mixed in, config options not implemented) and `allocate` resizing with m kept.
Run with `-s` to see the measured max abs differences.
"""
from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch

from rewrite.adapters.base import NotSupported
from rewrite.adapters.dora import MAGNITUDE
from rewrite.capture import flat_outputs
from rewrite.errors import AdapterFileError
from rewrite.export.onnx_merged import export_merged
from rewrite.graph_edit import adapters_at
from rewrite.options import ExportOptions
from rewrite.state import state_of

from factories import TinyCNN
from helpers import capture_hf, capture_module
from helpers import run_pass as run
from models import build

peft = pytest.importorskip("peft")

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "dense"],
           "gpt2": ["c_attn", "c_proj"]}
CNN_TARGETS = ["conv", "embed", "head"]
ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


def _record(what: str, diff: float) -> float:
    print(f"\n[dora] {what}: max abs diff {diff:.3g}")
    return diff


def first_output(model, kwargs) -> torch.Tensor:
    with torch.no_grad():
        return flat_outputs(model(**kwargs))[0]


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def _peft_model(base: torch.nn.Module, targets: list[str], rank: int = 4, **config):
    """PEFT's DoRA with random A, B (and embedding A) and magnitudes 1 + 0.3 N(0, 1) times ||W + s B A||_c."""
    torch.manual_seed(5)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, use_dora=True, init_lora_weights=False,
                             target_modules=targets, **config)
    model = peft.get_peft_model(base, config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.3 * torch.randn(param.shape, generator=generator))
            elif "lora_embedding_A" in name:  # PEFT starts it at zero even with init_lora_weights=False
                param.normal_(generator=generator)
    return model.eval()


def _peft_tensors(theirs) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {PEFT key suffix: tensor}} of the live PEFT model (its saved keys, without the adapter name)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in theirs.state_dict().items():
        if ".default" not in name:
            continue
        key = name.removeprefix("base_model.model.").replace(".default", "").replace(f"{MAGNITUDE}.weight", MAGNITUDE)
        module, _, suffix = key.partition(".lora_")
        modules.setdefault(module, {})["lora_" + suffix] = tensor
    return modules


def _load_into(gm, theirs, adapter: str = "default") -> int:
    modules = _peft_tensors(theirs)
    for owner, tensors in modules.items():
        adapters_at(gm, owner)[adapter].load_peft_state(tensors)
    return len(modules)


def _hf_case(name: str):
    """(PEFT model, our graph with the same DoRA adapter, inputs, sites)."""
    theirs = _peft_model(build(name), TARGETS[name], fan_in_fan_out=name == "gpt2")
    _, gm, kwargs = capture_hf(name)
    run(gm, "insert", kind="dora", targets=TARGETS[name], rank=4, alpha=8.0)
    sites = _load_into(gm, theirs)
    return theirs, gm, kwargs, sites


@pytest.fixture(scope="module")
def hf_case():
    made = {}

    def get(name: str):
        if name not in made:
            made[name] = _hf_case(name)
        theirs, gm, kwargs, sites = made[name]
        return theirs, copy.deepcopy(gm), kwargs, sites

    return get


def _cnn_case():
    torch.manual_seed(0)
    base = TinyCNN().eval()
    kwargs = dict(x=torch.randn(2, 3, 6, 6), ids=torch.randint(0, 32, (2, 5)))
    theirs = _peft_model(copy.deepcopy(base), CNN_TARGETS, rank=2)
    gm = capture_module(copy.deepcopy(base), kwargs)
    run(gm, "insert", kind="dora", targets=CNN_TARGETS, rank=2, alpha=4.0)
    _load_into(gm, theirs)
    return base, theirs, gm, kwargs


def _dora_calls(gm) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith("adapters.")]


# ------------------------------------------------------------------------------------------------ forward

@pytest.mark.parametrize("name", list(TARGETS))
def test_forward_equals_peft(hf_case, name):
    theirs, gm, kwargs, sites = hf_case(name)
    want = first_output(theirs, kwargs)
    assert _diff(want, first_output(build(name), kwargs)) > 1e-2  # the adapter matters
    calls = _dora_calls(gm)
    assert len(calls) == sites and all(c.args[1].op == "get_attr" for c in calls)  # delta(x, W, y0, b)
    table = state_of(gm).sites  # the base op's own output is reused, not recomputed
    assert all(c.args[2] is table.node_of(gm, c.meta["rewrite"].site) for c in calls)
    assert _record(f"{name} forward vs PEFT", _diff(first_output(gm, kwargs), want)) <= ATOL


def test_insert_starts_at_the_identity_with_peft_magnitudes():
    """At insert B = 0, so m = ||W||_c: PEFT's init of the same layers."""
    theirs = peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, use_dora=True, target_modules=TARGETS["llama"]))
    _, gm, kwargs = capture_hf("llama")
    run(gm, "insert", kind="dora", targets=TARGETS["llama"], rank=4)
    assert _diff(first_output(gm, kwargs), first_output(build("llama"), kwargs)) <= 1e-6
    magnitudes = _peft_tensors(theirs)
    for owner, tensors in magnitudes.items():
        assert _diff(adapters_at(gm, owner)["default"].magnitude, tensors[MAGNITUDE]) <= 1e-6, owner


def test_conv2d_embedding_and_linear_equal_peft(tmp_path):
    base, theirs, gm, kwargs = _cnn_case()
    want = first_output(theirs, kwargs)
    assert _diff(want, first_output(base, kwargs)) > 1e-2
    assert _record("cnn forward vs PEFT", _diff(first_output(gm, kwargs), want)) <= ATOL
    merged = copy.deepcopy(gm)
    run(merged, "merge")
    folded = copy.deepcopy(theirs).merge_and_unload()
    ours = dict(merged.named_parameters())
    assert max(_diff(ours[k], p) for k, p in folded.named_parameters()) <= ATOL
    assert _record("cnn merge vs PEFT", _diff(first_output(merged, kwargs), want)) <= ATOL
    run(gm, "save", root=tmp_path, path="ours")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert _diff(first_output(again, kwargs), want) <= ATOL


def test_gradients_equal_peft_with_the_norm_detached():
    """Training: the same gradients for A, B and m as PEFT's, whose weight norm carries no gradient."""
    theirs, gm, kwargs, _ = _hf_case("llama")
    theirs.train()
    theirs(**kwargs).logits.pow(2).mean().backward()
    flat_outputs(gm(**kwargs))[0].pow(2).mean().backward()
    layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
              if isinstance(m, peft.tuners.lora.LoraLayer)}
    worst = 0.0
    for owner, layer in layers.items():
        ours = adapters_at(gm, owner)["default"]
        pairs = [(ours.lora_A.grad.T, layer.lora_A["default"].weight.grad),
                 (ours.lora_B.grad.T, layer.lora_B["default"].weight.grad),
                 (ours.magnitude.grad, layer.lora_magnitude_vector["default"].weight.grad)]
        for got, want in pairs:
            assert want.abs().max() > 0
            worst = max(worst, _diff(got, want) / float(want.abs().max()))
    assert _record("llama gradients vs PEFT (relative)", worst) <= 1e-4


# ------------------------------------------------------------------------------------------- save / load

@pytest.mark.parametrize("name", list(TARGETS))
def test_save_writes_a_directory_peft_loads(hf_case, name, tmp_path):
    theirs, gm, kwargs, sites = hf_case(name)
    run(gm, "save", root=tmp_path, path="ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["peft_type"] == "LORA"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = peft.PeftModel.from_pretrained(build(name), tmp_path / "ours").eval()
    assert not [w for w in caught if "Unexpected keyword" in str(w.message) or "missing" in str(w.message)]
    assert sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in again.modules()) == sites
    diff = _diff(first_output(again, kwargs), first_output(theirs, kwargs))
    assert _record(f"{name} PEFT loading our save vs PEFT", diff) <= ATOL


@pytest.mark.parametrize("name", list(TARGETS))
def test_load_reads_a_directory_peft_saved(hf_case, name, tmp_path):
    theirs, _, kwargs, sites = hf_case(name)
    theirs.save_pretrained(tmp_path / "peft")
    _, gm, _ = capture_hf(name)
    result = run(gm, "load", root=tmp_path, path="peft", adapter="tuned")
    assert result.modified and result.stats["modules"] == sites
    assert {type(m).__name__ for n in _dora_calls(gm) for m in [gm.get_submodule(n.target)]} == {"DoRA"}
    diff = _diff(first_output(gm, kwargs), first_output(theirs, kwargs))
    assert _record(f"{name} our load vs PEFT", diff) <= ATOL
    nodes = len(gm.graph.nodes)
    assert not run(gm, "load", root=tmp_path, path="peft", adapter="tuned").modified
    assert len(gm.graph.nodes) == nodes


# ------------------------------------------------------------------------------------------------- merge

@pytest.mark.parametrize("name", list(TARGETS))
def test_merge_equals_merge_and_unload_and_unmerges_exactly(hf_case, name):
    theirs, gm, kwargs, _ = hf_case(name)
    want = first_output(theirs, kwargs)
    merged = copy.deepcopy(gm)
    run(merged, "merge")
    weight_reads = sum(n.op == "get_attr" for n in gm.graph.nodes) - sum(
        isinstance(a, torch.fx.Node) and a.op == "get_attr" for c in _dora_calls(gm) for a in c.args)
    assert _dora_calls(merged) == [] and sum(n.op == "get_attr" for n in merged.graph.nodes) == weight_reads
    folded = copy.deepcopy(theirs).merge_and_unload()
    ours = dict(merged.named_parameters())
    weights = _record(f"{name} merged weights vs PEFT", max(_diff(ours[k], p) for k, p in folded.named_parameters()))
    assert weights <= ATOL
    assert _record(f"{name} merged outputs vs PEFT", _diff(first_output(merged, kwargs), want)) <= ATOL

    owner = next(iter(_peft_tensors(theirs)))
    module = adapters_at(gm, owner)["default"]
    original = gm.get_parameter(f"{owner}.weight").detach().clone()
    weight = original.clone()
    module.merge_into(weight, None)
    assert _diff(weight, original) > 1e-3
    module.unmerge_from(weight, None)
    assert _record(f"{name} unmerge_from vs the original weight", _diff(weight, original)) <= ATOL
    with pytest.raises(NotSupported, match=r"dora adapters unmerge only from a weight they merged into"):
        module.unmerge_from(weight, None)


@pytest.mark.slow
def test_merged_onnx_equals_torch(hf_case, tmp_path):
    import onnxruntime as ort

    _, gm, kwargs, _ = hf_case("llama")
    want = first_output(gm, kwargs).numpy()
    run(gm, "merge")
    export_merged(gm, tmp_path / "merged.onnx", ExportOptions(), None)
    session = ort.InferenceSession(str(tmp_path / "merged.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: kwargs[i.name].numpy() for i in session.get_inputs()})[0]
    assert _record("llama merged ONNX Runtime vs torch", float(np.abs(got - want).max())) <= 1e-4


# --------------------------------------------------------------------------------------------- refusals

def test_our_adapter_file_refuses_it_by_name(hf_case, tmp_path):
    """(Unmerged exports switch DoRA as LoRA factors and an output scale: tests/test_multiplicative_unmerged.py.)"""
    _, gm, _, _ = hf_case("llama")
    with pytest.raises(AdapterFileError, match=r"our adapter file holds LoRA adapters; save dora as PEFT"):
        run(gm, "save", root=tmp_path, path="ours.safetensors", format="rewrite")


def test_an_adapter_mixing_lora_and_dora_is_not_saved_as_one_directory(hf_case, tmp_path):
    _, gm, _, _ = hf_case("llama")
    run(gm, "insert", kind="lora", targets=["q_proj"], adapter="mixed")
    run(gm, "insert", kind="dora", targets=["v_proj"], adapter="mixed")
    with pytest.raises(AdapterFileError, match=r"adapter 'mixed' mixes \['dora', 'lora'\]; one PEFT directory"):
        run(gm, "save", root=tmp_path, path="mixed", adapter="mixed")


@pytest.mark.parametrize("option,value", [
    ("use_qalora", True), ("layer_replication", [[0, 1]]),
    ("target_parameters", ["mlp.experts.down_proj"]), ("lora_bias", True)])
def test_config_options_it_does_not_implement_are_refused_by_name(hf_case, tmp_path, option, value):
    theirs, gm, _, _ = hf_case("llama")
    theirs.save_pretrained(tmp_path / "peft")
    config_file = tmp_path / "peft" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), option: value}))
    with pytest.raises(AdapterFileError, match=rf"'{option}' is set; .* not supported"):
        run(gm, "load", root=tmp_path, path="peft", adapter="other")


# --------------------------------------------------------------------------------------------- allocate

def test_resize_keeps_the_magnitude_and_allocate_resizes_physically(hf_case):
    _, gm, kwargs, _ = hf_case("llama")
    before = first_output(gm, kwargs)
    modules = {n.target: gm.get_submodule(n.target) for n in _dora_calls(gm)}
    magnitudes = {t: m.magnitude.detach().clone() for t, m in modules.items()}
    for module in modules.values():
        module.resize(8)  # new components are zero-delta: the same adapter
    assert all(m.lora_A.shape[1] == 8 for m in modules.values())
    assert _record("llama after growing rank 4 -> 8", _diff(first_output(gm, kwargs), before)) <= 1e-6
    result = run(gm, "allocate", scorer="energy", budget={"fraction": 0.5}, min_rank=1, report="")
    assert result.modified and result.stats["resized"] == len(modules)
    ranks = {t: m.rank for t, m in modules.items()}
    assert all(1 <= r < 8 and modules[t].lora_A.shape[1] == r for t, r in ranks.items())
    assert all(torch.equal(m.magnitude, magnitudes[t]) for t, m in modules.items())
    assert _diff(first_output(gm, kwargs), before) > 0  # truncated, still a DoRA adapter
