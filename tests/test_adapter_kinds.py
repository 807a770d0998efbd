"""The `AdapterKind` contract, checked for every registered kind (a new kind is tested here without new code).

On a tiny LLaMA (linear sites) and a tiny GPT-2 (Conv1D sites), for each kind and each of those ops it adapts:
  1. insert starts as the identity: the logits equal the unadapted model's own (the HF model, eager);
  2. with perturbed adapter parameters the outputs move, and the graph has one adapter call per site;
  3. mergeable kinds: merge (keep_original) gives the same outputs with no adapter left in the graph, and
     unmerge restores every weight and bias bit for bit with the same outputs again;
  4. low-rank kinds, and dense ones the unmerged exports factor exactly: `factors()` reproduce the module's own
     delta, x A B = adapter(x);
  5. what a kind cannot do raises `NotSupported` (never a silent answer).
Each kind's own file has its own test against its oracle (PEFT, a hand-written forward).
"""
from __future__ import annotations

import copy

import pytest
import torch

from rewrite.adapters import KINDS
from rewrite.adapters.base import SETTINGS, NotSupported
from rewrite.adapters.for_site import ADAPTABLE_OPS
from rewrite.graph_edit import adapters_at
from rewrite.state import state_of

from helpers import capture_hf, logits
from helpers import run_pass as run

MODELS = {"linear": ("llama", ["q_proj", "v_proj", "down_proj"]), "conv1d": ("gpt2", ["c_attn", "c_proj"])}
CASES = [(name, op) for name, kind in KINDS.items() for op in ("linear", "conv1d") if op in kind.ops]
EXPORT_FACTORS = {"lokr", "fourierft"}  # not low-rank, but given exact factors for unmerged export
SMALL_OPTIONS = {"road": {"group_size": 16}}  # kind options that fit these tiny layers (32 outputs and up)


@pytest.fixture(scope="module")
def captured():
    out = {}
    for op, (name, _) in MODELS.items():
        model, gm, kwargs = capture_hf(name)
        out[op] = (gm, kwargs, logits(model, kwargs))
    return out


def _perturb(gm, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if name.startswith("adapters."):
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)


@pytest.mark.parametrize("kind", list(KINDS))
def test_declarations(kind):
    cls = KINDS[kind]
    assert cls.kind == kind and cls.join in ("add", "output", "input", "graph")
    assert cls.ops and set(cls.ops) <= set(ADAPTABLE_OPS)
    assert cls.inits and set(cls.settings) <= set(SETTINGS)


@pytest.mark.parametrize("kind,op", CASES)
def test_identity_merge_unmerge_and_factors(captured, kind, op):
    base_gm, inputs, base = captured[op]
    gm = copy.deepcopy(base_gm)
    result = run(gm, "insert", kind=kind, targets=MODELS[op][1], options=SMALL_OPTIONS.get(kind, {}))
    state = state_of(gm)
    owners = [o for o in dict.fromkeys(s.owner for s in state.sites.values()) if adapters_at(gm, o)]
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith("adapters.")]
    assert result.modified and len(owners) >= 2 and len(calls) == result.stats["sites"]
    torch.testing.assert_close(logits(gm, inputs), base, rtol=0, atol=1e-6)

    _perturb(gm)
    adapted = logits(gm, inputs)
    assert (adapted - base).abs().max() > 1e-3
    cls = KINDS[kind]
    if cls.low_rank or kind in EXPORT_FACTORS:
        for owner in owners:
            module = adapters_at(gm, owner)["default"]
            a, b = module.factors()
            x = torch.randn(3, a.shape[0])
            torch.testing.assert_close(x @ a @ b, module(x), rtol=1e-5, atol=1e-6)
    else:
        with pytest.raises(NotSupported):
            adapters_at(gm, owners[0])["default"].factors()
    if not cls.mergeable:
        return
    before = {name: p.detach().clone() for name, p in gm.named_parameters() if not name.startswith("adapters.")}
    run(gm, "merge", keep_original=True)
    assert not any(n.op == "call_module" and str(n.target).startswith("adapters.") for n in gm.graph.nodes)
    torch.testing.assert_close(logits(gm, inputs), adapted, rtol=1e-4, atol=1e-5)
    run(gm, "unmerge")
    after = {name: p for name, p in gm.named_parameters() if not name.startswith("adapters.")}
    assert all(torch.equal(before[name], after[name]) for name in before)
    torch.testing.assert_close(logits(gm, inputs), adapted, rtol=0, atol=0)


def test_kind_options_are_the_kinds_own_and_typed():
    """`options = {...}` is validated by the kind's Options model: unknown keys are refused naming the kind."""
    from rewrite.passes import REGISTRY
    with pytest.raises(ValueError, match=r'kind = "lora": options.block_size: Extra inputs are not permitted '
                                         r"\(its options: none\)"):
        REGISTRY["insert"].Options(kind="lora", targets=["q_proj"], options={"block_size": 4})
    assert REGISTRY["insert"].Options(kind="lora", targets=["q_proj"]).options == {}
