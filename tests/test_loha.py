"""LoHa against Hugging Face PEFT's LoHa on the same random factors (tests/lycoris_oracle.py has the shared checks).

    delta W = s (B1 A1) (.) (B2 A2),  s = alpha / r

On the tiny LLaMA (GQA decoder) and BERT (encoder), linear sites, per-module ranks and alphas (rank_pattern /
alpha_pattern), and on a conv2d site (`factories.TinyCNN`): forward, `save` (PEFT loads it), `load` (of what PEFT
saved), merge (= merge_and_unload, and unmerge restores), merged ONNX. LoHa's exact rank-r^2 LoRA view (Khatri-Rao
products) makes it switchable in unmerged exports (checked against the graph by ONNX Runtime); `resize` and
`allocate` (hand-written oracles: factor ranks, zero-delta new components); PEFT options we do not implement.
"""
from __future__ import annotations

import peft
import pytest
import torch

from rewrite.adapters.loha import LoHa
from rewrite.errors import RewriteError

from helpers import run_pass as run
from lycoris_oracle import ADAPTER, Captures, Case, Pairs, check_forward, check_merge, check_merged_onnx, \
    check_option_refused, check_save_and_load, max_diff, modules_of, outputs

CONV = dict(kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1))
CASES = {
    "llama": Case("llama", "loha", peft.LoHaConfig(target_modules=["q_proj", "v_proj", "down_proj"], r=4, alpha=6,
                                                   rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3}),
                  dict(targets=["q_proj", "v_proj", "down_proj"], rank=4, alpha=6, rank_pattern={"v_proj": 2},
                       alpha_pattern={"down_proj": 3})),
    "bert": Case("bert", "loha", peft.LoHaConfig(target_modules=["query", "value", "intermediate.dense"], r=3,
                                                 alpha=5), dict(targets=["query", "value", "intermediate.dense"],
                                                                rank=3, alpha=5)),
    "cnn": Case("cnn", "loha", peft.LoHaConfig(target_modules=["conv"], r=2, alpha=24),
                dict(targets=["conv"], rank=2, alpha=24)),
}


@pytest.fixture(scope="module")
def pair():
    """case -> (our graph with PEFT's factors, inputs, PEFT's model); `pair.captures.get(model)`: a bare capture."""
    return Pairs(CASES, Captures())


@pytest.mark.parametrize("name", list(CASES))
def test_forward_merge_save_and_load_equal_peft(pair, name, tmp_path):
    check_forward(pair, name)
    check_merge(pair, name)
    check_save_and_load(pair, name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_merged_onnx_matches_torch(pair, name, tmp_path):
    check_merged_onnx(pair, name, tmp_path)


@pytest.mark.slow
def test_unmerged_export_switches_the_khatri_rao_view(pair, tmp_path):
    """The rank-r^2 LoRA view is exact: factors() give the module's delta, and a bank export equals the graph."""
    from rewrite.check import check_unmerged
    from rewrite.export.manifest import build_manifest
    from rewrite.export.onnx_unmerged import export_unmerged
    from rewrite.formats.manifest import MANIFEST, write_manifest
    from rewrite.options import ExportOptions

    gm, _, _ = pair("llama")
    for module in modules_of(gm).values():
        a, b = module.factors()
        assert a.shape == (module.d_in, module.rank ** 2) and b.shape == (module.rank ** 2, module.d_out)
        x = torch.randn(5, module.d_in)
        assert max_diff(x @ a @ b, module(x)) <= 1e-6
    entry = export_unmerged(gm, tmp_path, ExportOptions(mode="unmerged", switching="bank", external_data="never"))
    assert {s.rank for s in entry.sites} == {16, 4}
    write_manifest(tmp_path / MANIFEST, build_manifest(gm, source="test", exports=[entry]))
    assert check_unmerged(gm, tmp_path, [ADAPTER]) <= 1e-5


def test_unmerged_export_of_a_conv2d_site_is_refused_naming_the_kind(pair, tmp_path):
    from rewrite.export.onnx_unmerged import export_unmerged
    from rewrite.options import ExportOptions

    gm, _, _ = pair("cnn")
    with pytest.raises(RewriteError, match=r"conv: unmerged export supports loha on linear .*conv2d sites must be "
                                           r"merged"):
        export_unmerged(gm, tmp_path, ExportOptions(mode="unmerged", switching="bank", external_data="never"))


def _random_loha(rank: int, factor_rank: int | None = None, op: str = "linear") -> LoHa:
    """A LoHa with random factors; with `factor_rank`, each Hadamard factor B_k A_k has that rank."""
    module = LoHa(op, 6, 10, rank, 2 * rank, conv=CONV if op == "conv2d" else None)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in module.peft_tensors().items():
            param.copy_(0.5 * torch.randn(param.shape, generator=generator))
            if factor_rank is not None and name.endswith("_a"):
                mix = torch.randn(factor_rank, rank, generator=generator)
                param.copy_(param[:, :factor_rank] @ mix)
    return module


@pytest.mark.parametrize("op", ["linear", "conv2d"])
def test_resize_keeps_the_delta_where_the_factors_allow(op):
    module = _random_loha(6, factor_rank=2, op=op)
    before, scale = module.delta_weight(), module.scaling
    module.resize(9)  # grow: new components leave both factors, hence the delta, unchanged
    assert module.hada_w1_a.shape == (10, 9) and module.hada_w2_b.shape[0] == 9 and module.rank == 9
    assert module.scaling == scale and max_diff(module.delta_weight(), before) <= 1e-6
    assert not module.hada_w1_b[6:].any() and not module.hada_w2_b[6:].any() and module.hada_w1_a[:, 6:].any()
    module.resize(2)  # shrink below the rank, not below the factors' rank 2: exact up to rounding
    assert module.hada_w1_a.shape == (10, 2) and module.alpha == pytest.approx(2 * scale)
    assert max_diff(module.delta_weight(), before) <= 1e-5
    a, b = module.factors() if op == "linear" else (None, None)
    assert a is None or a.shape == (6, 4)


def test_resize_with_keep_and_of_a_fresh_adapter():
    module = _random_loha(4)
    old = {name: p.detach().clone() for name, p in module.peft_tensors().items()}
    module.resize(2, keep=[3, 1])
    assert torch.equal(module.hada_w1_a, old["hada_w1_a"][:, [3, 1]])
    assert torch.equal(module.hada_w2_b, old["hada_w2_b"][[3, 1]])
    module.resize(3, keep=torch.tensor([True, False]))
    assert torch.equal(module.hada_w1_b[0], old["hada_w1_b"][3]) and not module.hada_w1_b[1:].any()
    fresh = LoHa("linear", 6, 10, 4, 4.0)
    first = {name: p.detach().clone() for name, p in fresh.peft_tensors().items()}
    fresh.resize(2)  # delta zero: the first components as they were
    assert torch.equal(fresh.hada_w1_a, first["hada_w1_a"][:, :2]) and torch.equal(fresh.hada_w1_b,
                                                                                   first["hada_w1_b"][:2])
    with pytest.raises(ValueError, match="keep must list at most 1"):
        fresh.resize(1, keep=[0, 1])


def test_allocate_resizes_loha_physically(pair):
    """A trained LoHa is scored by its own update (energy) and shrunk; a fresh one keeps its zero delta."""
    gm, kwargs, _ = pair("llama")
    result = run(gm, "allocate", adapter=ADAPTER, budget={"fraction": 0.5}, report="")
    modules = modules_of(gm)
    assert result.stats["scorer"] == "energy" and result.stats["resized"] > 0
    assert all(m.hada_w1_a.shape[1] == m.hada_w2_b.shape[0] == m.rank for m in modules.values())
    assert result.stats["params_after"] < result.stats["params_before"]
    fresh, kwargs, _ = pair("bert")
    for module in modules_of(fresh).values():
        module.load_peft_state({k: torch.zeros_like(v) if k == "hada_w2_b" else v
                                for k, v in module.peft_state().items()})
    before = outputs(fresh, kwargs)
    result = run(fresh, "allocate", adapter=ADAPTER, budget={"fraction": 0.5}, report="")
    assert result.stats["scorer"] == "spectrum" and result.stats["resized"] > 0
    assert max_diff(outputs(fresh, kwargs), before) == 0.0


@pytest.mark.parametrize("option,value", [("rank_dropout", 0.1), ("module_dropout", 0.2)])
def test_peft_options_we_do_not_implement_are_refused(pair, option, value, tmp_path):
    check_option_refused(pair, "llama", option, value, tmp_path)


def test_insert_refuses_settings_loha_does_not_read():
    from rewrite.passes import REGISTRY

    with pytest.raises(ValueError, match=r'kind = "loha" does not read dropout, rslora'):
        REGISTRY["insert"].Options(kind="loha", targets=["q_proj"], rslora=True, dropout=0.1)
    with pytest.raises(ValueError, match="loha adapters go on linear, conv2d sites, not 'conv1d'"):
        LoHa("conv1d", 4, 4, 2, 2.0)
