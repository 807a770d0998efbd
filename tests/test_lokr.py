"""LoKr against Hugging Face PEFT's LoKr on the same random factors (tests/lycoris_oracle.py has the shared checks).

    delta W = s kron(w1, w2),  s = alpha / r;  w1, w2 full or low-rank by PEFT's rank thresholds

Cases cover every factor layout PEFT builds: on the tiny LLaMA, decompose_both with a rank_pattern (w1 split or full,
w2 split) and an alpha_pattern; on BERT, decompose_factor = 4 (w2 full on 64 x 64, split on 64 -> 128); on a conv2d
site (`factories.TinyCNN`), w2 split ([b, r] [r, e kh kw]) and full ([b, e, kh, kw]). Checked: forward, `save`
(PEFT loads it), `load` (of what PEFT saved), merge (= merge_and_unload, and unmerge restores), merged ONNX; the
split rule itself against PEFT's `factorization`; what LoKr cannot do (unmerged export of conv2d, allocate) and PEFT options
we do not implement, refused by name.
"""
from __future__ import annotations

import peft
import pytest
from peft.tuners.lokr.layer import factorization

from rewrite.adapters.lokr import kron_split
from rewrite.errors import AdapterFileError, ExportError, SpecError

from helpers import run_pass as run
from lycoris_oracle import ADAPTER, Captures, Case, Pairs, check_forward, check_merge, check_merged_onnx, \
    check_option_refused, check_save_and_load, edit_config, modules_of

LLAMA = ["q_proj", "v_proj", "down_proj"]
BERT = ["query", "value", "intermediate.dense"]
CASES = {
    "llama": Case("llama", "lokr", peft.LoKrConfig(target_modules=LLAMA, r=2, alpha=6, decompose_both=True,
                                                   rank_pattern={"down_proj": 6}, alpha_pattern={"v_proj": 3}),
                  dict(targets=LLAMA, rank=2, alpha=6, rank_pattern={"down_proj": 6}, alpha_pattern={"v_proj": 3},
                       options={"decompose_both": True})),
    "bert": Case("bert", "lokr", peft.LoKrConfig(target_modules=BERT, r=8, alpha=12, decompose_factor=4),
                 dict(targets=BERT, rank=8, alpha=12, options={"decompose_factor": 4})),
    "cnn_split": Case("cnn", "lokr", peft.LoKrConfig(target_modules=["conv"], r=1, alpha=24),
                      dict(targets=["conv"], rank=1, alpha=24)),
    "cnn_full": Case("cnn", "lokr", peft.LoKrConfig(target_modules=["conv"], r=2, alpha=24),
                     dict(targets=["conv"], rank=2, alpha=24)),
}
LAYOUTS = {  # (w1, w2) of each case's modules, PEFT's rule (module docstring of rewrite/adapters/lokr.py)
    "llama": {"q_proj": ("split", "split"), "v_proj": ("split", "split"), "down_proj": ("full", "split")},
    "bert": {"query": ("full", "full"), "value": ("full", "full"), "dense": ("full", "split")},
    "cnn_split": {"conv": ("full", "split")}, "cnn_full": {"conv": ("full", "full")},
}


@pytest.fixture(scope="module")
def pair():
    """case -> (our graph with PEFT's factors, inputs, PEFT's model); `pair.captures.get(model)`: a bare capture."""
    return Pairs(CASES, Captures())


def _layout(module) -> tuple[str, str]:
    names = module.peft_shapes()
    return tuple("full" if f"lokr_w{i}" in names else "split" for i in (1, 2))


@pytest.mark.parametrize("key", list(CASES))
def test_layouts_forward_merge_save_and_load_equal_peft(pair, key, tmp_path):
    layouts = {owner.rpartition(".")[2]: _layout(m) for owner, m in modules_of(pair(key)[0]).items()}
    assert layouts == LAYOUTS[key]
    check_forward(pair, key)
    check_merge(pair, key)
    check_save_and_load(pair, key, tmp_path)


def test_split_is_peft_factorization():
    pairs = [(d, f) for d in range(1, 300) for f in (-3, -1, 0, 1, 2, 3, 4, 5, 7, 8, 16, 64)]
    assert [kron_split(d, f) for d, f in pairs] == [factorization(d, f) for d, f in pairs]


def test_unmerged_export_of_conv2d_and_allocate_refuse_lokr_by_name(pair, tmp_path):
    """Linear sites export unmerged through exact factors (tests/test_dense_delta_unmerged.py)."""
    from rewrite.export.onnx_unmerged import export_unmerged
    from rewrite.options import ExportOptions

    cnn, _, _ = pair("cnn_split")
    with pytest.raises(ExportError, match=r"conv: unmerged export supports lokr on linear sites; conv2d sites must be "
                                          r"merged"):
        export_unmerged(cnn, tmp_path, ExportOptions(mode="unmerged", switching="bank", external_data="never"))
    gm, _, _ = pair("llama")
    with pytest.raises(SpecError, match=r"allocate resizes adapters freely; adapter 'tuned' is \['lokr'\]"):
        run(gm, "allocate", adapter=ADAPTER, budget={"fraction": 0.5}, report="")


@pytest.mark.parametrize("option,value", [("rank_dropout", 0.1), ("module_dropout", 0.2),
                                          ("rank_dropout_scale", True)])
def test_peft_options_we_do_not_implement_are_refused(pair, option, value, tmp_path):
    check_option_refused(pair, "llama", option, value, tmp_path)


def test_a_config_that_does_not_describe_the_tensors_is_refused(pair, tmp_path):
    _, _, theirs = pair("llama")
    theirs.save_pretrained(tmp_path / "peft")
    edit_config(tmp_path / "peft", decompose_both=False)  # PEFT would build full w1 where the file has w1_a, w1_b
    gm, _ = pair.captures.get("llama")
    with pytest.raises(AdapterFileError, match=r"q_proj': tensor shapes .* do not fit this site \(expected "
                                               r"\{'lokr_w1': \(8, 8\)"):
        run(gm, "load", root=tmp_path, path="peft", adapter=ADAPTER)


def test_options_are_typed_and_one_per_saved_adapter(pair, tmp_path):
    from rewrite.passes import REGISTRY

    insert = REGISTRY["insert"].Options
    assert insert(kind="lokr", targets=["q_proj"], options={"decompose_factor": 4}).options == {
        "decompose_both": False, "decompose_factor": 4}
    with pytest.raises(ValueError, match=r'kind = "lokr": options.decompose_both: Input should be a valid boolean'):
        insert(kind="lokr", targets=["q_proj"], options={"decompose_both": "yes"})
    with pytest.raises(ValueError, match=r'kind = "lokr" does not read rslora'):
        insert(kind="lokr", targets=["q_proj"], rslora=True)
    gm, _ = pair.captures.get("llama")
    run(gm, "insert", kind="lokr", adapter=ADAPTER, targets=["q_proj"], rank=2)
    run(gm, "insert", kind="lokr", adapter=ADAPTER, targets=["v_proj"], rank=2, options={"decompose_both": True})
    with pytest.raises(AdapterFileError, match=r"lokr adapter mixes \(decompose_both, decompose_factor\)"):
        run(gm, "save", root=tmp_path, path="mixed", adapter=ADAPTER)


@pytest.mark.slow
@pytest.mark.parametrize("key", ["llama", "bert"])
def test_merged_onnx_matches_torch(pair, key, tmp_path):
    check_merged_onnx(pair, key, tmp_path)
