"""HRA against Hugging Face PEFT's HRA on the same weights: forward, saved and loaded directories, merge, ONNX.

Oracle: `peft.get_peft_model(model, HRAConfig(...))` with random (non-identity) Householder vectors hra_u, copied into
our modules, on a tiny LLaMA and a tiny BERT (PEFT has no HRA for GPT-2's Conv1D). Gram-Schmidt HRA (`apply_GS`) and
other ranks come in through PEFT directories (an insert starts from the identity, which apply_GS never is). The
checks are tests/test_oft.py's (`Oracle`).
"""
from __future__ import annotations

import json

import pytest
import torch

from rewrite.adapters import KINDS
from rewrite.adapters.hra import HRA
from rewrite.errors import AdapterFileError, SpecError

from helpers import fill_adapter, first_output, fresh_capture
from helpers import run_pass as run
from models import build
from test_oft import TARGETS, Oracle, assert_close, check_allocate_refuses, check_forward, check_load_then_save, \
    check_merge, check_onnx, check_refuses_config, check_save_and_load, oracle_fixtures

peft = pytest.importorskip("peft")
report_max_diffs, captured = oracle_fixtures()


def hra(name: str, **fields) -> Oracle:
    """PEFT's HRAConfig with `fields`; our insert (rank 8, as PEFT's default r) fits only the default config."""
    return Oracle("hra", peft.HRAConfig(target_modules=TARGETS[name], **fields), None if fields else {})


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_forward_equals_peft(captured, name):
    check_forward(hra(name), captured, name, f"hra {name}")


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_save_and_load_round_trip_through_peft(captured, name, tmp_path):
    check_save_and_load(hra(name), captured, name, tmp_path, f"hra {name}")


@pytest.mark.parametrize("fields", [{"r": 4}, {"apply_GS": True}, {"r": 6, "apply_GS": True}])
def test_load_reads_other_ranks_and_gram_schmidt(captured, tmp_path, fields):
    """PEFT's directory -> our load (outputs equal PEFT's) -> our save -> PEFT (equal again), then merged."""
    label = "hra " + " ".join(f"{k}={v}" for k, v in fields.items())
    gm = check_load_then_save(hra("llama", **fields), captured, tmp_path, label)
    modules = [m for m in gm.modules() if isinstance(m, HRA)]
    assert {(m.rank, m.apply_GS) for m in modules} == {(fields.get("r", 8), fields.get("apply_GS", False))}
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (saved["r"], saved["apply_GS"]) == (fields.get("r", 8), fields.get("apply_GS", False))
    unmerged = first_output(gm, captured("llama")[1])
    run(gm, "merge")
    assert_close(f"{label} merged vs unmerged forward", first_output(gm, captured("llama")[1]), unmerged)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_merge_equals_merge_and_unload_and_unmerge_restores(captured, name):
    check_merge(hra(name), captured, name, f"hra {name}")


def test_gram_schmidt_merge_equals_merge_and_unload(captured, tmp_path):
    oracle = hra("bert", apply_GS=True)
    theirs = oracle.peft_model("bert")
    theirs.save_pretrained(tmp_path)
    gm, kwargs = captured("bert")
    run(gm, "load", root=tmp_path, path=".")
    run(gm, "merge")
    folded = dict(theirs.merge_and_unload().named_parameters())
    ours = dict(gm.named_parameters())
    assert ours.keys() == folded.keys()
    for param_name, param in folded.items():
        assert_close("hra apply_GS merged weights vs PEFT merge_and_unload", ours[param_name], param)


@pytest.mark.slow
def test_merged_onnx_equals_torch(captured, tmp_path):
    check_onnx(hra("llama"), captured, tmp_path, "hra")


def test_allocate_refuses_by_name(captured):
    check_allocate_refuses(hra("llama"), captured)
    assert not KINDS["hra"].resizable and not KINDS["hra"].low_rank


def test_merge_folds_input_rotations_before_other_adapters():
    """LoRA then HRA then HRA on one site: base(R2^T R1^T x) + s B A x folds into W R2 R1 + s (A B)^T, whatever the
    insert order (an input-side kind rewrites what W reads); unmerge wires them back in the same order."""
    gm, kwargs = fresh_capture("llama")
    for adapter, kind in (("low", "lora"), ("first", "hra"), ("second", "hra")):
        run(gm, "insert", kind=kind, targets=["down_proj"], adapter=adapter)
    fill_adapter(gm, {"adapters.": (0.0, 0.3)})
    unmerged = first_output(gm, kwargs)
    assert (unmerged - first_output(build("llama"), kwargs)).abs().max() > 1e-2
    run(gm, "merge", keep_original=True)
    assert_close("hra + hra + lora merged vs unmerged", first_output(gm, kwargs), unmerged)
    run(gm, "unmerge")
    assert_close("hra + hra + lora unmerged again", first_output(gm, kwargs), unmerged, atol=0.0)


@pytest.mark.parametrize("key,value,message", [
    ("bias", "hra_only", r"'bias' is 'hra_only'; expected \"none\""),
    ("r", 3, r"'r' = 3 is odd; HRA adapters start from the identity with reflections in pairs"),
    ("r", 4, r"module 'model.layers.0.mlp.down_proj': hra_u has shape \(128, 8\); expected \[d_in, r\] with r = 4"),
    ("modules_to_save", ["lm_head"], r"'modules_to_save' = \['lm_head'\] names 'lm_head' of this model, "
     r"but adapter_model.safetensors has no copy"),
    ("apply_GS", "yes", r"'apply_GS' is 'yes'; expected true or false"),
])
def test_load_refuses_what_it_does_not_implement(captured, tmp_path, key, value, message):
    check_refuses_config(hra("llama"), captured, tmp_path, key, value, message)


def test_insert_refuses_what_cannot_start_from_the_identity(captured):
    gm, _ = captured("llama")
    with pytest.raises(SpecError, match=r"spec.toml:3: model.layers.0.self_attn.q_proj: hra: rank = 3; its "
                                        r"reflections start in equal pairs"):
        run(gm, "insert", kind="hra", targets=["q_proj"], rank=3)
    with pytest.raises(ValueError, match=r'kind = "hra": options.apply_GS: Extra inputs are not permitted'):
        run(gm, "insert", kind="hra", targets=["q_proj"], options={"apply_GS": True})
    with pytest.raises(ValueError, match=r'kind = "hra" does not read alpha'):
        run(gm, "insert", kind="hra", targets=["q_proj"], alpha=16.0)
    gpt2, _ = captured("gpt2")
    with pytest.raises(SpecError, match=r'kind = "hra" adapts linear sites'):
        run(gpt2, "insert", kind="hra", targets=["c_attn"])


def test_save_refuses_ranks_one_peft_config_cannot_hold(captured, tmp_path):
    gm, _ = captured("llama")
    run(gm, "insert", kind="hra", targets=["q_proj"], adapter="mixed", rank=4, where="spec.toml:3")
    run(gm, "insert", kind="hra", targets=["down_proj"], adapter="mixed", where="spec.toml:7")
    with pytest.raises(AdapterFileError, match=r"one PEFT HRA config gives all its modules one rank; this adapter "
                                               r"has rank \[4, 8\]"):
        run(gm, "save", root=tmp_path, path="mixed", adapter="mixed")


def test_reflections_are_an_orthogonal_rotation_of_the_input():
    """x R^T with R = H_0 .. H_(r-1): norms kept; the paired init is the identity; merge then unmerge restores W."""
    module = HRA("linear", 16, 8, rank=4)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(module(x), x, rtol=0, atol=1e-6)
    with torch.no_grad():
        module.hra_u.normal_()
    rotated = module(x)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    assert (rotated - x).abs().max() > 1e-2
    weight = torch.randn(8, 16)
    merged = weight.clone()
    module.merge_into(merged, None)
    torch.testing.assert_close(x @ merged.T, rotated @ weight.T, rtol=1e-5, atol=1e-5)
    module.unmerge_from(merged, None)
    torch.testing.assert_close(merged, weight, rtol=0, atol=1e-6)
