"""AdaLoRA against its oracle, PEFT 0.21's `AdaLoraModel` / `RankAllocator`, step for step.

A 4 x Linear(64, 64) MLP gets a PEFT AdaLoRA adapter and, after capture, our SVD-form adapter with PEFT's
initial weights copied in. PEFT trains on a fixed batch sequence; at every step its weights and gradients
are copied into ours (identical gradients by construction), both allocators run, and we compare the EMA
tensors (sensitivity, uncertainty), the budget and the masks (lam zeroed, rank pattern) -- through the warm-up,
the cubic phase (masking every deltaT) and the final phase. A second run is fully independent (our own
forward, backward, AdamW): our forward matches PEFT's, so the two runs end in the same ranks. Then the
physical resize: plain LoRA of the kept rank, same outputs, rank-0 sites gone from the graph.
"""
from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from peft import AdaLoraConfig, get_peft_model
from torch import nn

from factories import DeepMLP
from rewrite.adapters.lora import LoRA
from rewrite.adapters.svd_lora import SvdLoRA, orthogonality
from rewrite.allocators.adalora import AdaLoRA
from rewrite.allocators.bounds import keep_within
from rewrite.capture import capture
from rewrite.graph_edit import adapters_at
from rewrite.inputs import ExampleInputs
from rewrite.load import LoadedModel
from rewrite.passes import REGISTRY
from rewrite.train import train

OWNERS = [f"layers.{i}" for i in range(4)]
SCHEDULE = dict(init_r=6, target_r=3, tinit=4, tfinal=8, deltaT=3, total_step=40, beta1=0.85, beta2=0.85,
                orth_reg_weight=0.5, lora_alpha=8)
FACTOR = {"Q": "lora_A", "E": "lora_E", "P": "lora_B"}


pytestmark = pytest.mark.usefixtures("one_thread")


class WithLoss(nn.Module):
    """Returns an object with `.loss`, so PEFT adds its orthogonality term to the loss itself."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, labels=None):
        out = self.net(x)
        return types.SimpleNamespace(logits=out, loss=F.mse_loss(out, labels) if labels is not None else None)


def batches(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(64, 64, generator=g) / 8
    out = []
    for _ in range(n):
        x = torch.randn(16, 64, generator=g)
        out.append({"x": x, "labels": x @ teacher})
    return out


def build_pair(seed: int = 0, **schedule):
    settings = {**SCHEDULE, **schedule}
    torch.manual_seed(seed)
    base = DeepMLP().eval()
    peft_model = get_peft_model(WithLoss(copy.deepcopy(base)),
                                AdaLoraConfig(target_modules=[f"net.{o}" for o in OWNERS], lora_dropout=0.0,
                                              **settings))
    x = torch.randn(4, 64)
    gm, _ = capture(LoadedModel(base, None, "factory", "mlp", None), ExampleInputs({"x": x}, {"x": [None, None]}),
                    frontend="fx")
    insert = REGISTRY["insert"]
    insert(insert.Options(targets=["layers.*"], rank=settings["init_r"], alpha=settings["lora_alpha"]))(gm)
    ours = AdaLoRA(gm, total_steps=settings["total_step"], init_rank=settings["init_r"],
                   target_rank=settings["target_r"], tinit=settings["tinit"], tfinal=settings["tfinal"],
                   delta_t=settings["deltaT"], beta1=settings["beta1"], beta2=settings["beta2"],
                   orth_reg_weight=settings["orth_reg_weight"])
    ours.install()
    copy_weights(peft_model, ours, grads=False)
    return peft_model, gm, ours


def peft_param(peft_model, owner: str, factor: str) -> nn.Parameter:
    layer = peft_model.base_model.model.net.get_submodule(owner)
    return getattr(layer, FACTOR[factor])["default"]


def copy_weights(peft_model, ours: AdaLoRA, *, grads: bool) -> None:
    with torch.no_grad():
        for owner, module in ours.modules.items():
            for factor in FACTOR:
                src, dst = peft_param(peft_model, owner, factor), getattr(module, factor)[0]
                dst.copy_(src)
                if grads:
                    dst.grad = src.grad.detach().clone()


def peft_key(owner: str, factor: str) -> str:
    return f"net.{owner}.{FACTOR[factor]}.default"


def test_svd_lora_matches_peft_forward_delta_and_regulariser():
    peft_model, gm, ours = build_pair()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # make lam non-zero so the branch is visible
        for owner in OWNERS:
            peft_param(peft_model, owner, "E").copy_(torch.randn(6, 1, generator=generator))
    copy_weights(peft_model, ours, grads=False)
    batch = batches(1)[0]
    expected = peft_model.base_model(**batch)
    got = gm(x=batch["x"])
    torch.testing.assert_close(got, expected.logits, rtol=0, atol=1e-6)
    reg = ours.regularizer()
    task = F.mse_loss(got, batch["labels"])
    torch.testing.assert_close(task + reg, expected.loss, rtol=1e-6, atol=1e-6)  # PEFT: loss + 0.5 * orth
    for owner in OWNERS:
        layer = peft_model.base_model.model.net.get_submodule(owner)
        torch.testing.assert_close(adapters_at(gm, owner)["default"].delta_weight(), layer.get_delta_weight("default"))
    module = ours.modules["layers.0"]
    assert module.peft_shapes() == {"lora_A": (6, 64), "lora_E": (6, 1), "lora_B": (64, 6)}
    torch.testing.assert_close(module.peft_state()["lora_E"], peft_param(peft_model, "layers.0", "E").detach())


def test_importance_budget_and_masks_equal_peft_step_for_step():
    """Identical gradients (copied from PEFT each step): EMAs, budget and masks are equal at every step."""
    peft_model, gm, ours = build_pair()
    allocator = peft_model.base_model.rankallocator
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-2)
    masked_steps, final_seen = [], False
    total = SCHEDULE["total_step"]
    for step, batch in enumerate(batches(total + 3), start=1):  # past T: the fixed final phase
        loss = peft_model.base_model(**batch).loss
        loss.backward()
        optimizer.step()
        copy_weights(peft_model, ours, grads=True)
        peft_budget, peft_mask = allocator.budget_schedule(step)
        peft_model.base_model.update_and_allocate(step)
        budget, pattern = ours.update(step)
        assert budget == peft_budget, step
        if step < total - SCHEDULE["tfinal"]:
            for owner in OWNERS:
                for factor in FACTOR:
                    key = peft_key(owner, factor)
                    assert torch.equal(ours.exp_avg_ipt[(owner, factor)], allocator.exp_avg_ipt[key]), (step, key)
                    assert torch.equal(ours.exp_avg_unc[(owner, factor)], allocator.exp_avg_unc[key]), (step, key)
        else:
            assert allocator.exp_avg_ipt == {} and ours.exp_avg_ipt == {}  # reset at T - t_final
        peft_pattern = peft_model.peft_config["default"].rank_pattern
        if pattern is not None:
            masked_steps.append(step)
            for owner in OWNERS:
                assert pattern[owner].tolist() == peft_pattern[f"net.{owner}.lora_E.default"], (step, owner)
        if step == total - SCHEDULE["tfinal"]:
            final_seen = True
            assert sum(int(p.sum()) for p in pattern.values()) <= 3 * 4
        for owner in OWNERS:  # lam after masking: the same zeros (and values) in both
            assert torch.equal(ours.modules[owner].E[0], peft_param(peft_model, owner, "E")), (step, owner)
        optimizer.zero_grad()
    # masks every deltaT in the cubic phase, plus the forced final mask
    cubic = [t for t in range(SCHEDULE["tinit"] + 1, total - SCHEDULE["tfinal"]) if t % SCHEDULE["deltaT"] == 0]
    assert masked_steps == cubic + [total - SCHEDULE["tfinal"]]
    assert final_seen
    assert ours.history["budget"][0] == 24 and ours.history["budget"][-1] == 12


def test_independent_training_runs_reach_peft_ranks():
    """Our forward/backward/AdamW vs PEFT's on the same init and batches: same masks at every step."""
    peft_model, gm, ours = build_pair(seed=1)
    data = batches(SCHEDULE["total_step"], seed=1)
    opt_peft = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-2)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=2e-2)
    for step, batch in enumerate(data, start=1):
        peft_model.base_model(**batch).loss.backward()
        opt_peft.step()
        peft_model.base_model.update_and_allocate(step)
        opt_peft.zero_grad()
        loss = F.mse_loss(gm(x=batch["x"]), batch["labels"]) + ours.regularizer()
        loss.backward()
        opt_ours.step()
        _, pattern = ours.update(step)
        opt_ours.zero_grad()
        if pattern is not None:
            peft_pattern = peft_model.peft_config["default"].rank_pattern
            assert {o: p.tolist() for o, p in pattern.items()} == \
                {o: peft_pattern[f"net.{o}.lora_E.default"] for o in OWNERS}, step
    for owner in OWNERS:
        torch.testing.assert_close(ours.modules[owner].E[0], peft_param(peft_model, owner, "E"), rtol=1e-4, atol=1e-6)


def test_finalize_resizes_to_plain_lora_with_the_same_outputs():
    peft_model, gm, ours = build_pair(seed=2, target_r=2)
    data = batches(SCHEDULE["total_step"], seed=2)
    train(gm, data, lambda out, b: F.mse_loss(out, b["labels"]), steps=len(data), lr=2e-2, warmup=0.0,
          grad_clip=None, seed=0, callbacks=[ours])  # on_train_end finalizes
    ranks = ours.final_ranks
    assert sum(ranks.values()) <= 2 * 4
    # the kept triplets are exactly the final pattern, as plain LoRA modules of that rank
    for owner in OWNERS:
        module = adapters_at(gm, owner).get("default")
        if ranks[owner] == 0:
            assert module is None
            assert not any(n.op == "call_module" and n.target == f"adapters.{owner}.default" for n in gm.graph.nodes)
        else:
            assert isinstance(module, LoRA) and module.rank == ranks[owner]
            assert tuple(module.lora_A.shape) == (64, ranks[owner])


def test_resize_keeps_the_function_and_c_alpha_over_r0():
    torch.manual_seed(0)
    module = SvdLoRA("linear", 16, 12, 6, 8.0)
    with torch.no_grad():
        module.E[0].copy_(torch.randn(6, 1))
    keep = torch.tensor([True, False, True, True, False, False])
    masked = copy.deepcopy(module)
    with torch.no_grad():
        masked.E[0].masked_fill_(~keep.view(-1, 1), 0.0)
    x = torch.randn(5, 16)
    lora = module.to_lora(keep)
    assert lora.rank == 3 and lora.alpha == 8.0
    torch.testing.assert_close(lora(x), masked(x))
    torch.testing.assert_close(lora.delta_weight(), masked.delta_weight())
    module.resize(3, keep=keep)
    assert module.rank == 3 and module.ranknum == 6.0  # c = alpha / r0 is kept
    torch.testing.assert_close(module(x), masked(x))
    conv1d = SvdLoRA("conv1d", 16, 12, 4, 4.0)
    with torch.no_grad():
        conv1d.E[0].fill_(1.0)
    assert conv1d.delta_weight().shape == (16, 12)
    torch.testing.assert_close(conv1d(x), x @ conv1d.delta_weight())


def test_orthogonality_matches_the_formula():
    torch.manual_seed(0)
    modules = [SvdLoRA("linear", 8, 6, 3, 1.0), SvdLoRA("linear", 5, 7, 2, 1.0)]
    terms = []
    for m in modules:
        q, p = m.Q[0], m.P[0]
        terms += [torch.norm(q @ q.T - torch.eye(3 if m.d_in == 8 else 2)),
                  torch.norm(p.T @ p - torch.eye(3 if m.d_in == 8 else 2))]
    torch.testing.assert_close(orthogonality(modules), sum(terms) / 4)


def test_schedule_validation_and_budget_bounds():
    peft_model, gm, _ = build_pair()
    with pytest.raises(ValueError, match="no budgeting phase"):
        AdaLoRA(gm, total_steps=10, tinit=5, tfinal=5)
    bad = AdaLoRA(gm, total_steps=10, target_rank=7, init_rank=6)
    with pytest.raises(ValueError, match="target budget"):
        bad.attach(AdaLoRA(gm, total_steps=10).install())


def captured_mlp() -> tuple:
    """(fx capture of a seeded DeepMLP, its example input x [4, 64])."""
    torch.manual_seed(0)
    base = DeepMLP().eval()
    x = torch.randn(4, 64)
    gm, _ = capture(LoadedModel(base, None, "factory", "mlp", None), ExampleInputs({"x": x}, {"x": [None, None]}),
                    frontend="fx")
    return gm, x


def test_install_carries_an_existing_delta_over():
    """A LoRA that already has a delta (loaded or trained) keeps its function when it becomes SVD-form."""
    gm, x = captured_mlp()
    insert = REGISTRY["insert"]
    insert(insert.Options(targets=["layers.*"], rank=2, alpha=4.0))(gm)
    with torch.no_grad():
        for owner in OWNERS:
            adapters_at(gm, owner)["default"].lora_B.normal_()
    before = gm(x=x).detach()
    allocator = AdaLoRA(gm, total_steps=10, init_rank=4, target_rank=2)
    allocator.install()
    assert all(isinstance(adapters_at(gm, o)["default"], SvdLoRA) for o in OWNERS)
    torch.testing.assert_close(gm(x=x), before, rtol=1e-4, atol=1e-5)
    module = allocator.modules["layers.0"]
    assert int((module.E[0] != 0).sum()) == 2  # the rank-2 delta in two triplets, the other two start at lam = 0


def test_targets_select_exactly_the_sites_to_convert_or_create():
    gm, x = captured_mlp()
    insert = REGISTRY["insert"]
    insert(insert.Options(targets=["layers.0", "layers.1", "layers.2"], rank=2))(gm)
    allocator = AdaLoRA(gm, total_steps=10, init_rank=3, target_rank=2, targets=["layers.1", "layers.3"])
    modules = allocator.install()
    assert sorted(modules) == ["layers.1", "layers.3"]
    kinds = {o: type(adapters_at(gm, o).get("default")).__name__ for o in OWNERS}
    assert kinds == {"layers.0": "LoRA", "layers.1": "SvdLoRA", "layers.2": "LoRA", "layers.3": "SvdLoRA"}
    assert sum(n.op == "call_module" and n.target == "adapters.layers.3.default" for n in gm.graph.nodes) == 1
    assert gm(x=x).shape == (4, 64)


# ------------------------------------------------------------------------------------- per-site bounds


def test_masking_within_bounds_on_a_hand_checked_table():
    """Budget 4 over 9 triplets. Without bounds (PEFT's rule): tau = the 5th smallest = 0.3, keep > 0.3.
    With A <= 1, C >= 2: C keeps its best two (0.6, 0.05), A's 0.5 and 0.1 are beyond its max, and the
    free triplets {A .9, B .8, .3, .2, C .04} compete for the 2 places left: tau = 0.3 again."""
    scores = {"A": torch.tensor([0.9, 0.1, 0.5]), "B": torch.tensor([0.2, 0.8, 0.3]),
              "C": torch.tensor([0.05, 0.04, 0.6])}
    free, tau = keep_within(scores, 4, {o: (0, 3) for o in scores})
    assert tau == pytest.approx(0.3)
    assert {o: m.tolist() for o, m in free.items()} == {"A": [True, False, True], "B": [False, True, False],
                                                       "C": [False, False, True]}
    bounded, tau = keep_within(scores, 4, {"A": (0, 1), "B": (0, 3), "C": (2, 3)})
    assert tau == pytest.approx(0.3)
    assert {o: m.tolist() for o, m in bounded.items()} == {"A": [True, False, False], "B": [False, True, False],
                                                          "C": [True, False, True]}
    # a budget the free triplets cannot fill: every free one is kept, the caps still hold
    everything, tau = keep_within(scores, 9, {"A": (0, 1), "B": (0, 3), "C": (2, 3)})
    assert tau is None and [int(m.sum()) for m in everything.values()] == [1, 3, 3]


def _peft_mask(scores: dict[str, torch.Tensor], budget: int) -> dict[str, torch.Tensor]:
    """PEFT's RankAllocator.mask_to_budget, restated: kthvalue over all scores, keep S > tau."""
    total = sum(s.numel() for s in scores.values())
    tau = torch.kthvalue(torch.cat([s.view(-1) for s in scores.values()]), k=total - budget)[0].item()
    return {o: ~(s <= tau) for o, s in scores.items()}


@pytest.mark.parametrize("seed", range(6))
def test_bounded_mask_is_the_best_feasible_set_by_brute_force(seed):
    """Oracle: over every subset of 9 triplets, the feasible one (lo <= kept_k <= hi, |kept| = budget) with
    the largest total score. Without bounds the mask is PEFT's, ties included (scores on a coarse grid)."""
    import itertools

    g = torch.Generator().manual_seed(seed)
    scores = {o: torch.rand(3, generator=g) for o in "ABC"}
    bounds = {o: (int(lo), int(lo + torch.randint(0, 4 - lo, (1,), generator=g)))
              for o, lo in zip("ABC", torch.randint(0, 3, (3,), generator=g))}
    floor, ceiling = sum(lo for lo, _ in bounds.values()), sum(hi for _, hi in bounds.values())
    budget = int(torch.randint(floor, ceiling + 1, (1,), generator=g))
    got, _ = keep_within(scores, budget, bounds)
    flat = [(o, i) for o in "ABC" for i in range(3)]
    best, best_value = None, -1.0
    for chosen in itertools.combinations(flat, budget):
        counts = {o: sum(1 for c, _ in chosen if c == o) for o in "ABC"}
        if all(bounds[o][0] <= counts[o] <= bounds[o][1] for o in "ABC"):
            value = sum(float(scores[o][i]) for o, i in chosen)
            if value > best_value:
                best, best_value = set(chosen), value
    assert {(o, i) for o in "ABC" for i in range(3) if got[o][i]} == best

    grid = {o: torch.randint(0, 4, (3,), generator=g).float() / 4 for o in "ABC"}  # ties
    for b in range(1, 9):
        peft = _peft_mask(grid, b)
        ours, _ = keep_within(grid, b, {o: (0, 3) for o in "ABC"})
        assert all(torch.equal(ours[o], peft[o]) for o in "ABC")


def test_training_with_bounds_keeps_every_mask_within_them():
    """AdaLoRA trained with min / max ranks: every mask of the run and the final ranks stay within the
    bounds; max above r0 is capped at r0; a site with max 0 ends without a branch."""
    _, gm, _ = build_pair()
    alloc = AdaLoRA(gm, total_steps=40, init_rank=6, target_rank=3, tinit=4, tfinal=8, delta_t=3,
                    min_rank={"layers.0": 5}, max_rank={"layers.1": 1, "layers.2": 0, "layers.3": 10})
    alloc.install()
    assert alloc.bounds == {"layers.0": (5, 6), "layers.1": (0, 1), "layers.2": (0, 0), "layers.3": (0, 6)}
    opt = torch.optim.AdamW(alloc.parameters(), lr=2e-2)
    for step, batch in enumerate(batches(40), start=1):
        (F.mse_loss(gm(x=batch["x"]), batch["labels"]) + alloc.regularizer()).backward()
        opt.step()
        alloc.update(step)
        opt.zero_grad()
    history = alloc.history["ranks"]
    assert alloc.history["masked_at"]
    for owner, (lo, hi) in alloc.bounds.items():
        first = alloc.history["masked_at"][0]
        masked = [r for r, step in zip(history[owner], alloc.history["step"]) if step >= first]
        assert all(lo <= r <= hi for r in masked), (owner, masked)
    ranks = alloc.finalize()
    assert ranks["layers.0"] >= 5 and ranks["layers.1"] <= 1 and ranks["layers.2"] == 0
    assert sum(ranks.values()) == 12
    assert "default" not in adapters_at(gm, "layers.2")
    with pytest.raises(ValueError, match="min rank 7 is above its max rank 6"):
        AdaLoRA(build_pair()[1], total_steps=40, init_rank=6, target_rank=3, min_rank=7).install()
    with pytest.raises(ValueError, match="min ranks add up to 20"):
        AdaLoRA(build_pair()[1], total_steps=40, init_rank=6, target_rank=3, min_rank=5).install()
