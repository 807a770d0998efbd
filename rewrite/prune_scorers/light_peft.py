"""light-peft: masked early estimation ("Light-PEFT: Lightening Parameter-Efficient Fine-Tuning via Early Pruning",
gccnlp/Light-PEFT; METHODS.md §3.1, phase 1; the pass does phase 2's pruning, a later `train` pass the retraining).

A scalar mask per unit of every targeted group (a head: its attention output, which equals Light-PEFT's m_att on the
attention probabilities; a neuron: its activation before the down-projection, m_ffn; KV heads for a kv_heads target;
rewrite.prune_scorers.masks), initialised to 1, trains with the adapters for `steps` steps (rewrite.train: the same
optimizer, learning rate and schedule) on

    loss = task + l1 * sum |m|                                             (l1 = 1e-4, the paper's lambda1)

Unit scores: |m| at the end of the run (the last mask values). Measured over the second half of the steps
(t > T / 2), for every LoRA module k the adapter targets may cut (x: the module's input rows, token positions whose
attention_mask is 0 left out when the batch has one of x's leading shape; g_X = dL/dX after the clip):

    module importance  M_k   = mean over steps and tokens of ||s A B x||_2 / ||W x + b||_2          (its share)
    rank importance    R_k,i = mean over steps of |mean_j(A[j, i] g_A[j, i])| + |mean_o(B[i, o] g_B[i, o])|

(matmul layout A [fan_in, r], B [r, d_out]; PEFT's layout transposes both: the same numbers). Non-finite values
count as 0. The masks are removed afterwards (phase 2 resets them to 1 and freezes them: the same graph), and the
adapters keep what they learned: the pass slices them with the units and prunes modules and ranks by M and R.
Under torch.distributed the token sums are summed over the processes (rewrite.distributed rule 3); gradients and
masks are already the same on every process.

Options (`light_peft = { ... }`): l1 = 1e-4.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from rewrite import distributed
from rewrite.prune_scorers.base import PruneScoreContext, PruneScorer, Scores
from rewrite.prune_scorers.masks import Masks, attach
from rewrite.prune_scorers.training import Recording, entries, factors, run_training
from rewrite.train import TrainCallback

DEFAULTS = {"l1": 1e-4}


def base_output(module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """W x + b of the LoRA's site, channels last (conv2d: moved last)."""
    if module.op == "linear":
        return F.linear(x, weight, bias)
    if module.op == "conv1d":
        return x @ weight + (bias if bias is not None else 0)
    if module.op == "embedding":
        return F.embedding(x, weight)
    conv = module.conv
    return F.conv2d(x, weight, bias, conv["stride"], conv["padding"], conv["dilation"]).movedim(1, -1)


class _Estimate(TrainCallback):
    def __init__(self, ctx: PruneScoreContext, masks: Masks | None, data: Recording, l1: float):
        self.ctx, self.masks, self.data, self.l1 = ctx, masks, data, l1
        self.step = 0
        self.total = 1
        params = dict(ctx.gm.named_parameters())
        self.sites = {path: (params[site.weight], params.get(site.bias) if site.bias else None)
                      for path, site in ctx.sites.items()}
        self.ratio = {p: torch.zeros(2, dtype=torch.float64) for p in ctx.adapters}  # (sum of ratios, tokens)
        self.rank = {p: torch.zeros(m.rank, dtype=torch.float64) for p, m in ctx.adapters.items()}
        self.rank_steps = 0
        self.seconds = 0.0
        self.hooks = [m.register_forward_hook(self._hook(p)) for p, m in ctx.adapters.items()]

    def on_train_begin(self, ctx) -> None:
        self.total = ctx.total_steps

    def _measuring(self) -> bool:
        return self.step + 1 > self.total // 2  # the step being run is in the second half

    def _hook(self, path: str):
        def hook(module, inputs, output):
            if not (module.training and self._measuring()):
                return
            start = time.perf_counter()
            with torch.no_grad():
                x = inputs[0]
                weight, bias = self.sites[path]
                base = base_output(module, x, weight, bias)
                delta = output.movedim(1, -1) if module.op == "conv2d" else output
                ratio = delta.float().norm(dim=-1) / base.float().norm(dim=-1).clamp(min=1e-12)
                ratio = torch.nan_to_num(ratio, nan=0.0, posinf=0.0, neginf=0.0)
                keep = self._real_tokens(ratio.shape)
                if keep is not None:
                    ratio = ratio[keep]
                self.ratio[path] += torch.tensor([float(ratio.double().sum()), ratio.numel()], dtype=torch.float64)
            self.seconds += time.perf_counter() - start
        return hook

    def _real_tokens(self, shape: torch.Size) -> torch.Tensor | None:
        batch = self.data.current
        if batch is None or "attention_mask" not in batch:
            return None
        mask = distributed.shard(batch).batch["attention_mask"]
        return mask.bool() if tuple(mask.shape) == tuple(shape) else None

    def regularizer(self, ctx) -> torch.Tensor | None:
        if self.masks is None:
            return None
        return self.l1 * sum(v.abs().sum() for v in self.masks.values.values())

    def before_step(self, ctx) -> None:
        if not self._measuring():
            return
        start = time.perf_counter()
        with torch.no_grad():
            for path, module in self.ctx.adapters.items():
                a, b, ga, gb = factors(module)
                if ga is None or gb is None:
                    continue
                score = (a * ga).mean(0).abs() + (b * gb).mean(1).abs()
                self.rank[path] += torch.nan_to_num(score.double(), nan=0.0, posinf=0.0, neginf=0.0)
        self.rank_steps += 1
        self.seconds += time.perf_counter() - start

    def on_step(self, ctx) -> None:
        self.step = ctx.step

    def close(self) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        for hook in self.hooks:
            hook.remove()
        sums = list(self.ratio.values())
        distributed.all_sum(sums)
        modules = {p: float(s[0] / s[1]) if s[1] > 0 else 0.0 for p, s in self.ratio.items()}
        ranks = {p: r / max(1, self.rank_steps) for p, r in self.rank.items()}
        return modules, ranks


class LightPEFT(PruneScorer):
    name = "light-peft"
    needs_data = True

    def __call__(self, ctx: PruneScoreContext) -> Scores:
        options = {**DEFAULTS, **(ctx.options.get("light_peft") or {})}
        mine = entries(ctx)
        masks = attach(ctx.gm, mine, {g.name: g for g in ctx.groups}, trainable=True, where=ctx.at("method")) \
            if mine else None
        data = Recording(ctx.data)
        estimate = None
        try:
            estimate = _Estimate(ctx, masks, data, float(options["l1"]))
            result = run_training(ctx, data, [estimate], masks.parameter_names() if masks else [])
            values = {name: v.detach().double().abs() for name, v in (masks.values.items() if masks else [])}
        finally:
            if estimate is not None:
                modules, ranks = estimate.close()
            if masks is not None:
                masks.detach()
        kv = {g.name for g in ctx.structures.get("kv_heads", [])}
        units, blocks = {}, {}
        for structure, groups in ctx.structures.items():
            for g in groups:
                if g.name in kv:  # a mask per KV head: each query head carries its KV head's value
                    blocks[g.name] = values[g.name]
                    units[g.name] = values[g.name][torch.tensor(g.block_of, dtype=torch.long)]
                else:
                    units[g.name] = values[g.name]
                    blocks[g.name] = torch.stack([values[g.name][[i for i, b in enumerate(g.block_of) if b == k]].sum()
                                                  for k in range(len(g.blocks))]) if g.blocks else \
                        torch.zeros(0, dtype=torch.float64)
        info = {"steps": result.steps, "train_seconds": round(result.seconds, 3),
                "scoring_seconds": round(estimate.seconds, 3), "loss_first": result.losses[0],
                "loss_final": result.final_loss, **options}
        return Scores(units, blocks, modules, ranks, info)
