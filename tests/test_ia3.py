"""(IA)^3 against Hugging Face PEFT's IA3 on the same weights: forward, merge, and saved adapters PEFT loads.

Oracle: `peft.get_peft_model(model, IA3Config(...))` with the same random vectors l. On a tiny LLaMA (linear:
k / v outputs scaled, down_proj inputs scaled) and a tiny GPT-2 (Conv1D: c_attn outputs, mlp.c_proj inputs).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from rewrite.graph_edit import adapters_at
from rewrite.passes import REGISTRY
from rewrite.state import state_of

from helpers import capture_hf, logits
from helpers import run_pass as run
from models import build

peft = pytest.importorskip("peft")

CASES = {"llama": (["k_proj", "v_proj"], ["down_proj"]), "gpt2": (["c_attn"], ["mlp.c_proj"])}


def _peft_model(name: str, outputs: list[str], inputs: list[str]):
    model = peft.get_peft_model(build(name), peft.IA3Config(target_modules=outputs + inputs,
                                                           feedforward_modules=inputs,
                                                           fan_in_fan_out=name == "gpt2"))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "ia3_l" in param_name:
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=generator))
    return model.eval()


def _ours(name: str, outputs: list[str], inputs: list[str], theirs):
    _, gm, kwargs = capture_hf(name)
    run(gm, "insert", kind="ia3", targets=outputs, adapter="tuned")
    run(gm, "insert", kind="ia3_ff", targets=inputs, adapter="tuned")
    vectors = {n.removeprefix("base_model.model.").removesuffix(".ia3_l.default"): p
               for n, p in theirs.named_parameters() if "ia3_l" in n}
    with torch.no_grad():
        for owner, l in vectors.items():
            adapters_at(gm, owner)["tuned"].load_peft_state({"ia3_l": l})
    return gm, kwargs, len(vectors)


@pytest.mark.parametrize("name", list(CASES))
def test_forward_merge_and_save_equal_peft(name, tmp_path):
    outputs, inputs = CASES[name]
    theirs = _peft_model(name, outputs, inputs)
    gm, kwargs, sites = _ours(name, outputs, inputs, theirs)
    expected = logits(theirs, kwargs)
    assert (expected - logits(build(name), kwargs)).abs().max() > 1e-2  # the vectors matter
    assert sum(n.op == "call_module" and str(n.target).startswith("adapters.") for n in gm.graph.nodes) == sites
    torch.testing.assert_close(logits(gm, kwargs), expected, rtol=1e-5, atol=1e-5)

    run(gm, "save", root=tmp_path, path="ours", adapter="tuned")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = peft.PeftModel.from_pretrained(build(name), tmp_path / "ours").eval()
    assert not [w for w in caught if "Unexpected keyword" in str(w.message)]
    torch.testing.assert_close(logits(again, kwargs), expected, rtol=1e-5, atol=1e-5)

    merged = copy.deepcopy(gm)
    run(merged, "merge")
    folded = theirs.merge_and_unload()
    ours = dict(merged.named_parameters())
    for param_name, param in folded.named_parameters():
        torch.testing.assert_close(ours[param_name], param, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits(merged, kwargs), expected, rtol=1e-5, atol=1e-5)


def test_settings_it_does_not_read_are_refused():
    with pytest.raises(ValueError, match=r"kind = \"ia3\" does not read rank \(it reads init\)"):
        REGISTRY["insert"].Options(kind="ia3", targets=["k_proj"], rank=4)
    with pytest.raises(ValueError, match=r"init = 'zeros': kind = \"ia3_ff\" starts from ones"):
        REGISTRY["insert"].Options(kind="ia3_ff", targets=["down_proj"], init="zeros")


@pytest.mark.parametrize("name", list(CASES))
def test_load_reads_a_directory_peft_saved(name, tmp_path):
    """`load` picks the kind from the directory's peft_type and each module's side from feedforward_modules."""
    outputs, inputs = CASES[name]
    theirs = _peft_model(name, outputs, inputs)
    theirs.save_pretrained(tmp_path / "peft")
    _, gm, kwargs = capture_hf(name)
    result = run(gm, "load", root=tmp_path, path="peft", adapter="tuned")
    kinds = {owner: module.kind for owner in {s.owner for s in state_of(gm).sites.values()}
             if (module := adapters_at(gm, owner).get("tuned")) is not None}
    assert result.stats["modules"] == len(kinds) and set(kinds.values()) == {"ia3", "ia3_ff"}
    assert all(kind == "ia3_ff" for owner, kind in kinds.items() if any(owner.endswith(i) for i in inputs))
    torch.testing.assert_close(logits(gm, kwargs), logits(theirs, kwargs), rtol=1e-5, atol=1e-5)
    assert not run(gm, "load", root=tmp_path, path="peft", adapter="tuned").modified
