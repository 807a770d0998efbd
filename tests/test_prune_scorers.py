"""The prune scorers that train (loraprune, light-peft), the adapter targets (adapter_modules, adapter_ranks), the
report picture, and a pruned model's PEFT adapter loaded with PEFT onto the same model pruned by hand.

Oracles: LoRAPrune's importance written out by hand in the paper code's own layout (PEFT: A [r, d_in], B [d_out, r],
heads by reshaping rows) and, for G^, the true base-weight gradient G through the identity
g_B A + B g_A = s (G A^T A + B B^T G); Light-PEFT's module and rank importance recomputed from an eager forward and
the LoRA gradients; a zero unit mask against the consumer columns silenced by hand; the adapter targets against
the unpruned model with the same rank components zeroed; PEFT itself for the saved adapter.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from helpers import fresh_capture, run_pass
from models import build
from prune_models import attention_task
from rewrite.errors import SpecError
from rewrite.prune_scorers.loraprune import GroupImportance, progress, site_importance
from rewrite.prune_scorers.masks import attach

LORA_SITES = ["q", "k", "v", "o", "fc1", "fc2"]


def lora(gm, targets=LORA_SITES, rank: int = 3, seed: int = 1):
    """A LoRA 'a' whose A and B are both random (an identity adapter has no G^ from g_A)."""
    run_pass(gm, "insert", adapter="a", targets=targets, rank=rank, alpha=2 * rank, init="gaussian")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if name.endswith(("lora_A", "lora_B")):
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    return gm


def batch(n: int = 4):
    generator = torch.Generator().manual_seed(5)
    return torch.randn(n, 6, 32, generator=generator), torch.randn(n, 6, 32, generator=generator)


# --------------------------------------------------------------------------- loraprune

def test_loraprune_importance_equals_the_formula_by_hand(tmp_path):
    gm, _ = attention_task(tmp_path)
    lora(gm)
    x, y = batch()
    gm.get_parameter("o.weight").requires_grad_(True)  # for the identity check only: the true dL/dW
    F.mse_loss(gm(x=x), y).backward()
    heads = next(g for g in __import__("rewrite.coupling", fromlist=["analyze"]).analyze(gm).groups
                 if g.structure == "heads")
    got = GroupImportance(gm, {heads.name: heads.units}, "t")(site_importance(gm))[heads.name]

    expected = torch.zeros(4, dtype=torch.float64)
    for name in ("q", "k", "v", "o"):  # the paper's compute_sensitivity, PEFT layout
        m = gm.get_submodule(f"adapters.{name}.a")
        a, b = m.lora_A.detach().T.double(), m.lora_B.detach().T.double()            # [r, d_in], [d_out, r]
        ga, gb = m.lora_A.grad.T.double(), m.lora_B.grad.T.double()
        g_hat = gb @ a + b @ ga - gb @ ga
        w = gm.get_parameter(f"{name}.weight").detach().double()
        s = (g_hat * (w + m.scaling * b @ a)).abs()
        if name == "o":
            s = s.T                                                                   # fan-in: input columns
        s = s.reshape(4, -1).sum(1)                                                   # head_dim 8 rows per head
        expected += s / (s.norm() + 1e-8)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-8)

    m = gm.get_submodule("adapters.o.a")  # G^ itself against the true gradient G of W (linear layout)
    a, b = m.lora_A.detach().T.double(), m.lora_B.detach().T.double()
    g, sc = gm.get_parameter("o.weight").grad.double(), m.scaling
    g_hat = sc * (g @ a.T @ a + b @ b.T @ g) - sc * sc * (g @ a.T @ b.T @ g)
    w = gm.get_parameter("o.weight").detach().double()
    assert torch.allclose(site_importance(gm)["o.weight"].double(), (g_hat * (w + sc * b @ a)).abs(), rtol=1e-4,
                          atol=1e-7)


def test_cubic_schedule_by_hand():
    total, w, c = 100, 0.1, 0.1  # pruning between steps 10 and 90; span 80
    assert progress(10, total, w, c) == 0.0
    assert progress(11, total, w, c) == pytest.approx(1 - (1 - 1 / 80) ** 3)
    assert progress(50, total, w, c) == pytest.approx(1 - 0.5 ** 3)
    assert progress(90, total, w, c) == pytest.approx(1.0)
    assert progress(91, total, w, c) == 1.0


def test_loraprune_masks_grow_and_the_pass_removes_them_first(tmp_path):
    gm, data = attention_task(tmp_path, steps=30)
    lora(gm)
    before = {n: p.detach().clone() for n, p in gm.named_parameters() if n.startswith("adapters.")}
    result = run_pass(gm, "prune", tmp_path, data=data, method="loraprune", heads=2, ffn=0.5,
                      loraprune={"every": 2, "warmup": 0.1, "cooldown": 0.2})
    assert result.stats["steps"] == 30 and result.stats["heads_removed"] == 2
    report = json.loads((tmp_path / "prune.json").read_text())
    events = report["scorer"]["mask_events"]
    assert [e["masked"] for e in events] == sorted(e["masked"] for e in events) and events[-1]["masked"] > 0
    for row in report["groups"]:  # masked units score -1, and they are among the removed
        masked = {i for i, s in enumerate(row["scores"]) if s == -1}
        assert masked <= {int(label.split()[-1]) for label in row["removed"]}
    assert (tmp_path / "prune.png").is_file()
    assert not any(n.startswith("prune_masks") for n, _ in gm.named_modules())  # the masks are gone
    trained = [n for n, p in gm.named_parameters() if n in before and p.shape == before[n].shape
               and not torch.equal(p, before[n])]
    assert trained  # the pruning rode on a real training run
    assert gm(x=torch.randn(3, 6, 32)).shape == (3, 6, 32)
    again = run_pass(gm, "prune", tmp_path, data=data, method="loraprune", heads=2, ffn=0.5,
                     loraprune={"every": 2, "warmup": 0.1, "cooldown": 0.2})
    assert not again.modified  # the same options and data: no second training


@pytest.mark.slow
def test_loraprune_on_gqa_removes_query_heads_evenly(tmp_path):
    from rewrite.options import DataOptions
    from safetensors.torch import save_file

    gm, kwargs = fresh_capture("llama")
    lora(gm, ["q_proj", "k_proj", "v_proj", "o_proj"], rank=2)
    ids = torch.randint(0, 128, (8, kwargs["input_ids"].shape[1]), generator=torch.Generator().manual_seed(0))
    tensors = {k: (ids if k == "input_ids" else torch.ones_like(ids)) for k in kwargs}
    save_file({**tensors, "labels": ids.clone()}, tmp_path / "lm.safetensors")
    data = DataOptions(path="lm.safetensors", loss="causal_lm", batch_size=kwargs["input_ids"].shape[0], steps=6,
                       lr=1e-2)
    run_pass(gm, "prune", tmp_path, data=data, method="loraprune", heads=0.5, loraprune={"every": 1})
    cfg = build("llama").config
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    for row in json.loads((tmp_path / "prune.json").read_text())["groups"]:
        heads = [int(label.split()[-1]) for label in row["removed"]]
        assert sorted(h // group for h in heads) == list(range(cfg.num_key_value_heads))


# --------------------------------------------------------------------------- masks and light-peft

def test_a_zero_unit_mask_silences_the_unit_where_it_is_read(tmp_path):
    gm, _ = attention_task(tmp_path)
    lora(gm)
    from rewrite.coupling import analyze

    heads = next(g for g in analyze(gm).groups if g.structure == "heads")
    oracle = copy.deepcopy(gm)
    masks = attach(gm, {heads.name: heads.units}, {heads.name: heads}, trainable=False, where="t")
    with torch.no_grad():
        masks.values[heads.name][[1, 3]] = 0.0
        cols = torch.tensor([h * 8 + i for h in (1, 3) for i in range(8)])
        oracle.get_parameter("o.weight")[:, cols] = 0.0            # o reads head h at columns 8h..8h+7
        oracle.get_parameter("adapters.o.a.lora_A")[cols] = 0.0    # and so does its LoRA (A [d_in, r])
    x = torch.randn(2, 6, 32)
    assert torch.allclose(gm(x=x), oracle(x=x), atol=1e-6)
    masks.detach()
    assert len(gm.graph.nodes) == len(oracle.graph.nodes) and not hasattr(gm, "prune_masks")


def test_light_peft_importance_equals_an_eager_recomputation(tmp_path):
    from rewrite.prune_scorers.base import PruneScoreContext
    from rewrite.prune_scorers.light_peft import _Estimate
    from rewrite.prune_scorers.training import Recording
    from rewrite.state import state_of

    gm, _ = attention_task(tmp_path)
    lora(gm)
    sites = state_of(gm).sites
    paths = {f"adapters.{n}.a": n for n in LORA_SITES}
    ctx = PruneScoreContext(gm, [], adapters={p: gm.get_submodule(p) for p in paths},
                            sites={p: sites[n] for p, n in paths.items()})
    recording = Recording(type("D", (), {"options": None})())
    estimate = _Estimate(ctx, None, recording, 0.0)
    estimate.total, estimate.step = 2, 1  # the second of two steps: measured
    x, y = batch()
    inputs = {}
    hooks = [gm.get_submodule(p).register_forward_hook(lambda m, i, o, p=p: inputs.__setitem__(p, i[0]))
             for p in paths]
    for m in ctx.adapters.values():
        m.train()
    F.mse_loss(gm(x=x), y).backward()
    estimate.before_step(None)
    modules, ranks = estimate.close()
    for hook in hooks:
        hook.remove()
    for path, name in paths.items():
        m, xin = gm.get_submodule(path), inputs[path].detach()
        w, b = gm.get_parameter(f"{name}.weight").detach(), gm.get_parameter(f"{name}.bias").detach()
        with torch.no_grad():
            ratio = (m.scaling * xin @ m.lora_A @ m.lora_B).norm(dim=-1) / (xin @ w.T + b).norm(dim=-1)
        assert modules[path] == pytest.approx(float(ratio.mean()), rel=1e-4)
        a, bb = m.lora_A.detach().T, m.lora_B.detach().T                     # PEFT layout [r, d_in], [d_out, r]
        ga, gb = m.lora_A.grad.T, m.lora_B.grad.T
        expected = (a * ga).mean(1).abs() + (bb * gb).mean(0).abs()
        assert torch.allclose(ranks[path].float(), expected, rtol=1e-4, atol=1e-9)


def test_light_peft_masks_train_and_the_l1_term_pulls_them_down(tmp_path):
    values = {}
    for l1 in (0.0, 0.05):
        gm, data = attention_task(tmp_path, steps=8)
        lora(gm)
        run_pass(gm, "prune", tmp_path, data=data, method="light-peft", heads=1, ffn=0.25, light_peft={"l1": l1},
                 adapter_modules=1, adapter_ranks=1)
        report = json.loads((tmp_path / "prune.json").read_text())
        values[l1] = [s for row in report["groups"] for s in row["scores"]]
        assert report["removed"]["adapter_modules"] == 1 and report["removed"]["adapter_ranks"] == 5 * 1
        assert any(s != 1.0 for s in values[l1])  # the masks trained
    assert sum(values[0.05]) < sum(values[0.0])


# --------------------------------------------------------------------------- adapter targets

def test_adapter_ranks_and_modules_by_magnitude_equal_zeroed_components(tmp_path):
    gm, _ = attention_task(tmp_path)
    lora(gm, rank=4)
    oracle = copy.deepcopy(gm)
    x = torch.randn(2, 6, 32)
    norms = {}
    for name in LORA_SITES:  # hand-computed: ||s A[:, i] B[i, :]||_F and ||s A B||_F / ||W||_F
        m = gm.get_submodule(f"adapters.{name}.a")
        a, b = m.lora_A.detach(), m.lora_B.detach()
        norms[name] = [float((m.scaling * torch.outer(a[:, i], b[i])).norm()) for i in range(4)]
    module_score = {}
    for name in LORA_SITES:
        m = gm.get_submodule(f"adapters.{name}.a")
        module_score[name] = float((m.scaling * m.lora_A.detach() @ m.lora_B.detach()).norm()
                                   / gm.get_parameter(f"{name}.weight").detach().norm())
    dropped = sorted(LORA_SITES, key=lambda n: module_score[n])[:2]
    run_pass(gm, "prune", tmp_path, adapter_modules=2, adapter_ranks=0.5)
    with torch.no_grad():
        for name in LORA_SITES:
            a = oracle.get_parameter(f"adapters.{name}.a.lora_A")
            if name in dropped:
                a.zero_()
            else:
                a[:, sorted(range(4), key=lambda i: norms[name][i])[:2]] = 0.0
    assert torch.allclose(gm(x=x), oracle(x=x), atol=1e-5)
    for name in LORA_SITES:
        present = hasattr(gm.adapters, name) and hasattr(getattr(gm.adapters, name), "a")
        assert present == (name not in dropped)
        if present:
            assert gm.get_submodule(f"adapters.{name}.a").rank == 2
    report = json.loads((tmp_path / "prune.json").read_text())
    assert report["removed"] == {"adapter_modules": 2, "adapter_ranks": 4 * 2}  # ranks of the 4 modules left


def test_global_adapter_ranks_may_drop_a_whole_module(tmp_path):
    gm, _ = attention_task(tmp_path)
    lora(gm, rank=2)
    with torch.no_grad():
        gm.get_parameter("adapters.q.a.lora_B").mul_(1e-3)  # q's components are the smallest
    run_pass(gm, "prune", tmp_path, adapter_ranks=2, scope="global", report="")
    assert not hasattr(gm.adapters.q, "a") and gm.get_submodule("adapters.k.a").rank == 2


def test_errors_name_the_key(tmp_path):
    gm, data = attention_task(tmp_path)
    with pytest.raises(SpecError, match=r"\(method\): method = 'loraprune' trains the adapters while it scores, and "
                                        "the spec has no \\[data\\]"):
        run_pass(gm, "prune", heads=1, method="loraprune", keys=True)
    with pytest.raises(SpecError, match=r"\(adapter_ranks\): adapter_ranks cuts LoRA adapters, and none is attached"):
        run_pass(gm, "prune", adapter_ranks=1, keys=True)
    with pytest.raises(SpecError, match=r"\(method\): .* no adapter is attached"):
        run_pass(gm, "prune", tmp_path, data=data, heads=1, method="light-peft", keys=True)
    lora(gm)
    with pytest.raises(SpecError, match=r"\(adapter_modules\): method = 'loraprune' scores units, not adapter"):
        run_pass(gm, "prune", tmp_path, data=data, adapter_modules=1, method="loraprune", keys=True)
    with pytest.raises(SpecError, match=r"\(heads\): removes 4 of the 4 heads"):  # before any training
        run_pass(gm, "prune", tmp_path, data=data, heads=4, method="light-peft", keys=True)
    with pytest.raises(SpecError, match=r"\(adapter_modules\): drops 6 of the 6 LoRA modules"):
        run_pass(gm, "prune", adapter_modules=6, keys=True)
    with pytest.raises(SpecError, match=r"\(adapter_ranks\): removes 3 of the 3 rank components"):
        run_pass(gm, "prune", adapter_ranks=3, keys=True)
    from rewrite.spec import parse_spec

    with pytest.raises(SpecError, match="loraprune = { ... } sets options of method = 'loraprune', but method = "
                                        "'magnitude'"):
        parse_spec('version = 1\n[[pass]]\nname = "prune"\nheads = 1\nloraprune = { every = 2 }\n')
    with pytest.raises(SpecError, match="warmup \\+ cooldown = 1 leaves no steps"):
        parse_spec('version = 1\n[[pass]]\nname = "prune"\nmethod = "loraprune"\nheads = 1\n'
                   'loraprune = { warmup = 0.5, cooldown = 0.5 }\n')


# --------------------------------------------------------------------------- PEFT

def _prune_hf_bert_like(model, report: dict) -> None:
    """Cut the same heads and neurons out of the HF BertModel by hand (transformers' prune_linear_layer): q / k / v
    rows and attention-output columns of each removed head, intermediate rows and output columns of each neuron."""
    from transformers.pytorch_utils import prune_linear_layer

    dh = model.config.hidden_size // model.config.num_attention_heads
    for row in report["groups"]:
        removed = [int(label.split()[-1]) for label in row["removed"]]
        layer = model.get_submodule(row["group"].rpartition(".attention")[0] if row["structure"] == "heads"
                                    else row["group"])
        if row["structure"] == "heads":
            gone = {h * dh + i for h in removed for i in range(dh)}
            keep = torch.tensor([i for i in range(layer.attention.self.all_head_size) if i not in gone])
            att = layer.attention
            for name in ("query", "key", "value"):
                setattr(att.self, name, prune_linear_layer(getattr(att.self, name), keep, dim=0))
            att.output.dense = prune_linear_layer(att.output.dense, keep, dim=1)
            att.self.num_attention_heads -= len(removed)
            att.self.all_head_size = len(keep)
        else:
            keep = torch.tensor([i for i in range(layer.intermediate.dense.out_features) if i not in set(removed)])
            layer.intermediate.dense = prune_linear_layer(layer.intermediate.dense, keep, dim=0)
            layer.output.dense = prune_linear_layer(layer.output.dense, keep, dim=1)


@pytest.mark.slow
def test_saved_peft_adapter_loads_onto_the_hf_model_pruned_by_hand(tmp_path):
    """PEFT can express a pruned model: PeftModel.from_pretrained of the adapter `save` wrote after `prune` onto the
    HF BertModel with the same heads and neurons cut by hand equals our pruned graph."""
    import peft

    gm, kwargs = fresh_capture("bert")
    lora(gm, ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"], rank=2)
    run_pass(gm, "prune", tmp_path, heads=1, ffn=0.25)
    run_pass(gm, "save", tmp_path, path="peft", adapter="a")
    hf = build("bert")
    _prune_hf_bert_like(hf, json.loads((tmp_path / "prune.json").read_text()))
    model = peft.PeftModel.from_pretrained(hf, tmp_path / "peft", adapter_name="a").eval()
    with torch.no_grad():
        ours, theirs = gm(**kwargs)[0], model(**kwargs)[0]
    assert (ours - theirs).abs().max() <= 1e-4  # float32, hidden states of size ~2, matmuls in another order
