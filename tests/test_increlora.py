"""IncreLoRA: growth decisions follow the published rule (FeiyuZhang98/IncreLoRA `RankAllocator`).

The rule, restated in METHODS.md §2.2: EMA of the module score (Ibar, Ubar with beta1, beta2; score =
Ibar * Ubar); after the warm-up, every `interval` steps while R_t < R_T, every module scoring >= the k-th
largest (k = min(h, R_T - R_t)) gets `a` ranks. The hand-computed case below uses beta = 0.5 and dyadic
scores, so every expected number is exact; the raw module scores are injected, and the score formula
S_k = sum |dW_k (.) G_k| / sqrt(numel) is checked on its own against a backward pass.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from factories import DeepMLP
from rewrite.adapters.lora import LoRA
from rewrite.adapters.svd_lora import SvdLoRA, orthogonality
from rewrite.allocators.increlora import RESERVE_LAM, IncreLoRA
from rewrite.capture import capture
from rewrite.graph_edit import adapters_at
from rewrite.inputs import ExampleInputs
from rewrite.load import LoadedModel
from rewrite.passes import REGISTRY
from rewrite.train import GroupLinearSchedule, train

A, B, C, D = (f"layers.{i}" for i in range(4))


pytestmark = pytest.mark.usefixtures("one_thread")


def captured(rank: int = 2):
    torch.manual_seed(0)
    model = DeepMLP().eval()
    x = torch.randn(4, 64)
    gm, _ = capture(LoadedModel(model, None, "factory", "mlp", None), ExampleInputs({"x": x}, {"x": [None, None]}),
                    frontend="fx")
    insert = REGISTRY["insert"]
    insert(insert.Options(targets=["layers.*"], rank=rank, alpha=4.0))(gm)
    return gm


def allocator(gm, **kw):
    settings = dict(total_steps=20, init_rank=1, target_rank=2, top_h=2, rank_step=1, warmup=1, interval=2,
                    beta1=0.5, beta2=0.5)
    settings.update(kw)
    alloc = IncreLoRA(gm, **settings)
    alloc.install()
    return alloc


def test_growth_follows_the_published_rule_on_a_hand_computed_case():
    gm = captured()
    alloc = allocator(gm)
    opt = torch.optim.AdamW(alloc.parameters(), lr=1e-3)
    assert alloc.total_rank == 4 and alloc.target_total == 8
    assert {o: m.rank for o, m in alloc.modules.items()} == {A: 1, B: 1, C: 1, D: 1}

    # step 1 (warm-up): Ibar = [2, 0, 1, .5], Ubar = [1, 0, .5, .25], score = [2, 0, .5, .125]; no growth
    assert alloc.update(1, opt, scores={A: 4.0, B: 0.0, C: 2.0, D: 1.0}) == []
    assert alloc.scores() == {A: 2.0, B: 0.0, C: 0.5, D: 0.125}
    # step 2: Ibar = [1, 4, 1.5, .75], Ubar = [1, 2, .5, .25], score = [1, 8, .75, .1875]
    # k = min(h=2, 8 - 4) = 2 -> threshold 1 -> B and A grow by a = 1
    assert alloc.update(2, opt, scores={A: 0.0, B: 8.0, C: 2.0, D: 1.0}) == [A, B]
    assert alloc.scores() == {A: 1.0, B: 8.0, C: 0.75, D: 0.1875}
    assert alloc.history["growth"][-1]["threshold"] == 1.0
    assert {o: m.rank for o, m in alloc.modules.items()} == {A: 2, B: 2, C: 1, D: 1}
    assert alloc.total_rank == 6
    # step 3: not a growth step; score = [.375, 4, 2.40625, .1171875]
    assert alloc.update(3, opt, scores={A: 0.0, B: 0.0, C: 4.0, D: 0.0}) == []
    assert alloc.scores() == {A: 0.375, B: 4.0, C: 2.40625, D: 0.1171875}
    # step 4: score = [.125, 1.5, 2.53125, .046875]; k = min(2, 8 - 6) = 2 -> C and B grow; R = 8 = R_T
    assert alloc.update(4, opt, scores={A: 0.0, B: 0.0, C: 4.0, D: 0.0}) == [B, C]
    assert alloc.scores() == {A: 0.125, B: 1.5, C: 2.53125, D: 0.046875}
    assert {o: m.rank for o, m in alloc.modules.items()} == {A: 2, B: 3, C: 2, D: 1}
    assert alloc.done and alloc.total_rank == 8
    # budget reached: no more scoring or growth, gradient tracking off, reserves disabled
    assert alloc.update(6, opt, scores={A: 100.0, B: 0.0, C: 0.0, D: 0.0}) == []
    assert all(not m.track_product_grad for m in alloc.modules.values())
    assert all(float(m.E[len(m.E) - 1].abs().sum()) == 0.0 for m in alloc.modules.values())
    assert alloc.history["budget"] == [4, 6, 6, 8, 8]
    assert alloc.history["ranks"][B] == [1, 2, 2, 3, 3]


def test_k_is_capped_by_the_remaining_budget_and_ties_add_more():
    gm = captured()
    alloc = allocator(gm, top_h=3, target_budget=5)  # R_T - R_0 = 1: k = min(3, 1) = 1
    assert alloc.update(2, scores={A: 1.0, B: 3.0, C: 3.0, D: 0.0}) == [B, C]  # tie at the threshold: both
    assert alloc.total_rank == 6 and alloc.done  # overshoot stops growth (the official only stops at ==)


def test_advance_learning_reserves_scale_and_parameter_groups():
    gm = captured()
    alloc = allocator(gm)
    m = alloc.modules[A]
    # one active triplet + one reserve: reserve P, Q train in advance, its lam is fixed at 1e-5
    assert m.rank == 1 and m.reserve == 1 and m.ranknum == 1.0
    assert [e.requires_grad for e in m.E] == [True, False] and float(m.E[1].detach()) == pytest.approx(RESERVE_LAM)
    assert m.Q[1].requires_grad and m.P[1].requires_grad
    opt = torch.optim.AdamW(alloc.parameters(), lr=1e-3)
    assert len(opt.param_groups) == 1
    assert alloc.update(2, opt, scores={A: 5.0, B: 1.0, C: 0.5, D: 0.25}) == [A, B]
    assert alloc.update(4, opt, scores={A: 5.0, B: 0.0, C: 4.0, D: 0.0}) == [A, C]
    # A grew at steps 2 and 4: its reserve lam became trainable (value kept), a new reserve was appended
    assert m.rank == 3 and m.reserve == 1 and m.ranknum == 3.0
    assert m.scaling == pytest.approx(4.0 / 3.0, rel=1e-5)
    assert [e.requires_grad for e in m.E] == [True, True, True, False]
    assert float(m.E[1].detach()) == pytest.approx(RESERVE_LAM)
    assert len(opt.param_groups) == 3  # one new group per growth event
    new = {id(p) for p in opt.param_groups[1]["params"]}
    assert id(m.E[1]) in new and id(m.Q[2]) in new and id(m.P[2]) in new


def test_without_advance_learning_the_reserve_is_frozen_until_selected():
    gm = captured()
    alloc = allocator(gm, advance_learning=False)
    m = alloc.modules[A]
    assert not m.Q[1].requires_grad and not m.P[1].requires_grad and float(m.E[1]) == 0.0
    opt = torch.optim.AdamW(alloc.parameters(), lr=1e-3)
    assert alloc.update(2, opt, scores={A: 5.0, B: 1.0, C: 0.0, D: 0.0}) == [A, B]
    assert m.Q[1].requires_grad and m.P[1].requires_grad and m.E[1].requires_grad
    n = alloc.modules[B]
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for p in (m.E[1], m.Q[1], m.P[1], n.E[1], n.Q[1],
                                                                             n.P[1])}
    assert not alloc.modules[C].Q[1].requires_grad


def test_module_score_is_taylor_saliency_of_the_product():
    torch.manual_seed(0)
    m = SvdLoRA("linear", 6, 5, 3, 2.0)
    with torch.no_grad():
        m.E[0].copy_(torch.randn(3, 1))
    m.track_product_grad = True
    x, target = torch.randn(7, 6), torch.randn(7, 5)
    F.mse_loss(m(x), target).backward()
    w = m.product().detach()
    expected_grad = torch.autograd.grad(F.mse_loss(x @ w.requires_grad_().T, target), w)[0]
    torch.testing.assert_close(m.product_grad, expected_grad)
    gm = captured()
    alloc = allocator(gm)
    alloc.modules = {"m": m}
    score = alloc.module_scores()["m"]
    torch.testing.assert_close(score, (m.product().abs() * expected_grad).abs().sum() / math.sqrt(30))
    assert m.product_grad is None  # consumed


def test_per_group_warmup_restarts():
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p1], lr=1.0)
    schedule = GroupLinearSchedule(opt, total_steps=20, warmup_steps=4)
    lrs = [schedule.apply(t)[0] for t in range(1, 11)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and lrs[4] == pytest.approx(16 / 16) and lrs[9] < lrs[4]
    opt.add_param_group({"params": [p2], "lr": 2.0})   # joins at step 11: 10 steps left, its own warm-up
    new = [schedule.apply(t)[1] for t in range(11, 21)]
    assert new[:4] == [0.5, 1.0, 1.5, 2.0]
    assert new[-1] == pytest.approx(2.0 / 6) and min(new) > 0
    assert schedule.apply(20)[0] == pytest.approx(1 / 16)


def planted(gm, ranks=(0, 1, 2, 4), batches=8, seed=0):
    """Batches labelled by the same MLP with a planted rank-r delta on layer i's weight."""
    g = torch.Generator().manual_seed(seed)
    deltas = [torch.randn(64, r, generator=g) @ torch.randn(r, 64, generator=g) / 16 for r in ranks]
    teacher = DeepMLP()
    teacher.load_state_dict({k: v for k, v in gm.state_dict().items() if not k.startswith("adapters.")})
    with torch.no_grad():
        for layer, delta in zip(teacher.layers, deltas):
            layer.weight += delta
    out = []
    for _ in range(batches):
        x = torch.randn(32, 64, generator=g)
        out.append({"x": x, "labels": teacher(x).detach()})
    return out


def test_training_grows_to_the_budget_and_leaves_plain_lora():
    gm = captured()
    data = planted(gm)
    # orth_reg_weight = 0: on 60 steps the orthogonality term (pulling |P|, |Q| from 0.02 to 1) dominates
    alloc = IncreLoRA(gm, total_steps=60, init_rank=1, target_rank=3, top_h=2, rank_step=1, warmup=5, interval=5,
                      orth_reg_weight=0.0)
    result = train(gm, data, lambda out, b: F.mse_loss(out, b["labels"]), steps=60, lr=2e-2, seed=0,
                   callbacks=[alloc])
    assert alloc.done and sum(alloc.final_ranks.values()) >= 12
    assert result.final_loss < 0.5 * result.losses[0]
    ranks = alloc.final_ranks  # planted ranks 0, 1, 2, 4: the grown ranks follow them
    assert ranks[D] == max(ranks.values()) and ranks[A] == min(ranks.values()) and ranks[D] > ranks[A]
    for owner, rank in alloc.final_ranks.items():
        module = adapters_at(gm, owner)["default"]
        assert isinstance(module, LoRA) and module.rank == rank
    assert len(alloc.history["growth"]) >= 4


def test_finalize_drops_reserves_and_keeps_the_function():
    gm = captured()
    alloc = allocator(gm)
    alloc.update(2, scores={A: 5.0, B: 1.0, C: 0.0, D: 0.0})
    with torch.no_grad():
        for m in alloc.modules.values():
            for e in m.E:
                e.normal_()
    alloc._stop()  # reserves' lam -> 0
    x = torch.randn(3, 64)
    before = gm(x=x).detach()
    ranks = alloc.finalize()
    assert ranks == {A: 2, B: 2, C: 1, D: 1}
    torch.testing.assert_close(gm(x=x), before, rtol=1e-5, atol=1e-6)


def test_blockwise_orthogonality_has_no_cross_rank_term():
    torch.manual_seed(0)
    m = SvdLoRA("linear", 4, 4, 1, 1.0)
    m.add_block(1)
    terms = [torch.norm(q @ q.T - torch.eye(1)) for q in m.Q] + [torch.norm(p.T @ p - torch.eye(1)) for p in m.P]
    torch.testing.assert_close(orthogonality([m], blockwise=True), sum(terms) / 4)


def test_growth_skips_sites_at_their_max_rank_on_a_hand_computed_case():
    """The published case above with bounds: B may not grow (max 1), C stops at 2, D starts at its min 2.
    The EMA scores are the same as above (they do not depend on the ranks); only the picks change:
    step 2: k = min(h = 2, R_T - R_t = 8 - 5) = 2 among the sites that can grow {A: 1, C: .75, D: .1875}
    (B, the best, is skipped) -> A and C; step 4: k = min(2, 8 - 7) = 1 among {A: .125, D: .046875}
    (C is at its max) -> A."""
    gm = captured()
    alloc = allocator(gm, min_rank={D: 2}, max_rank={B: 1, C: 2})
    assert {o: m.rank for o, m in alloc.modules.items()} == {A: 1, B: 1, C: 1, D: 2}
    assert alloc.total_rank == 5 and alloc.target_total == 8
    assert alloc.update(1, scores={A: 4.0, B: 0.0, C: 2.0, D: 1.0}) == []
    assert alloc.update(2, scores={A: 0.0, B: 8.0, C: 2.0, D: 1.0}) == [A, C]
    assert alloc.scores() == {A: 1.0, B: 8.0, C: 0.75, D: 0.1875}
    assert alloc.update(3, scores={A: 0.0, B: 0.0, C: 4.0, D: 0.0}) == []
    assert alloc.update(4, scores={A: 0.0, B: 0.0, C: 4.0, D: 0.0}) == [A]
    assert {o: m.rank for o, m in alloc.modules.items()} == {A: 3, B: 1, C: 2, D: 2}
    assert alloc.done and alloc.finalize() == {A: 3, B: 1, C: 2, D: 2}


def test_growth_stops_when_every_site_is_at_its_max_and_max_zero_drops_the_site():
    gm = captured()
    x = torch.randn(4, 64)
    alloc = allocator(gm, max_rank={A: 0, B: 1, C: 1, D: 1})
    assert sorted(alloc.modules) == [B, C, D] and "default" not in adapters_at(gm, A)
    assert gm(x=x).shape == (4, 64)  # A's branch is gone from the graph
    assert alloc.update(2, scores={B: 1.0, C: 2.0, D: 3.0}) == []
    assert alloc.done and alloc.total_rank == 3  # below R_T = 2 x 3 sites: nothing may grow
    assert alloc.finalize() == {A: 0, B: 1, C: 1, D: 1}
    with pytest.raises(ValueError, match="min rank 3 is above its max rank 2"):
        allocator(captured(), min_rank=3, max_rank=2)
