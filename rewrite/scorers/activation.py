"""activation: calibration inputs; the whitened (activation-aware) spectrum of the base weight.

C = X^T X / n is the second moment of the site's inputs over the calibration tokens (X: the rows that
reach the site; conv2d: unfolded patches; embedding: one-hot tokens, so C is diagonal). The singular values
of W C^{1/2} (equal to those of W L, L = chol(C), SVD-LLM) split the mean output energy E||W x||^2:

    v(r) = sum_{i<=r} sigma_i(W C^{1/2})^2,   E||(W - W_r) x||^2 = sum_{i>r} sigma_i^2 exactly

for the best rank-r approximation W_r under the data. normalize = "site" (default) divides by E||W x||^2
(the share of the output a rank-r branch spans); "none" keeps absolute output energy.

`collect_statistics` (also used by `fisher`) runs calibration batches through the graph with hooks on the
adapter modules: a forward hook reads the site input x, a hook on the adapter's output tensor reads
dL/dy at the site (the branch is added to the base output, so both share the gradient).

Under torch.distributed each process runs its rows of every batch (rewrite.distributed rule 1); the sums of x x^T,
the token counts and the sums of J^T u u^T J are summed over the processes (rule 3) and dL/dW is averaged (rule 2),
so every process ends with the statistics of all the rows, as one process holding all of them would.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rewrite import distributed
from rewrite.errors import DataError, RewriteError, SpecError, first_line
from rewrite.progress import tracked
from rewrite.scorers import Curves, ScoreContext, Scorer, Target, energy_curve, weight_matrix


@dataclass
class SiteStats:
    second_moment: torch.Tensor | None = None   # [fan_in, fan_in] (embedding: [V] diagonal), float64 sum
    tokens: int = 0
    grad: torch.Tensor | None = None            # [d_out, fan_in] float64 sum over batches of dL/dW
    out_moment: torch.Tensor | None = None      # [d_out, d_out] sum of J^T u u^T J (u ~ N(0, I) at the output)
    batches: int = 0

    @property
    def out_metric(self) -> torch.Tensor:
        """Gauss-Newton output factor per batch: E[J^T J] summed over a batch's tokens."""
        return self.out_moment / max(self.batches, 1)

    @property
    def cov(self) -> torch.Tensor:
        return self.second_moment / max(self.tokens, 1)


def _rows(target: Target, x: torch.Tensor) -> torch.Tensor:
    op, module = target.shape.op, target.adapter
    if op == "conv2d":
        conv = module.conv
        patches = F.unfold(x, conv["kernel_size"], conv["dilation"], conv["padding"], conv["stride"])
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


def _grad_rows(target: Target, g: torch.Tensor) -> torch.Tensor:
    if target.shape.op == "conv2d":
        return g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1])
    return g.reshape(-1, g.shape[-1])


def collect_statistics(ctx: ScoreContext, *, gradients: bool, output_metric: bool = False,
                       seed: int = 0) -> dict[str, SiteStats]:
    """Over ctx.batches: second moments of every target's inputs; with `gradients` the summed dL/dW; with
    `output_metric` the Gauss-Newton output factor E[J^T J] at each site's output (J: d outputs / d site
    output), estimated by back-propagating a random N(0, I) cotangent from the model output the loss reads."""
    if ctx.data is None:
        raise SpecError("this scorer needs calibration data: add a [data] table to the spec")
    stats = {t.owner: SiteStats() for t in ctx.targets}
    handles, saved_flags, modes = [], {}, {}
    phase = {"name": ""}
    backward = gradients or output_metric

    def forward_hook(target: Target):
        st = stats[target.owner]
        op = target.shape.op

        def hook(module, args, output):
            x = args[0].detach()
            if op == "embedding":
                ids = x.reshape(-1)
                counts = torch.zeros(target.shape.fan_in, dtype=torch.float64)
                counts.index_add_(0, ids, torch.ones_like(ids, dtype=torch.float64))
                st.second_moment = counts if st.second_moment is None else st.second_moment + counts
                st.tokens += ids.numel()
                rows = ids
            else:
                rows = _rows(target, x).double()
                m = rows.T @ rows
                st.second_moment = m if st.second_moment is None else st.second_moment + m
                st.tokens += rows.shape[0]
            if backward and output.requires_grad:
                def grad_hook(g, rows=rows):
                    g_rows = _grad_rows(target, g.detach()).double()
                    if phase["name"] == "metric":
                        m = g_rows.T @ g_rows
                        st.out_moment = m if st.out_moment is None else st.out_moment + m
                        return
                    if op == "embedding":
                        contrib = torch.zeros(target.shape.d_out, target.shape.fan_in, dtype=torch.float64)
                        contrib.index_add_(1, rows, g_rows.T)
                    else:
                        contrib = g_rows.T @ rows
                    st.grad = contrib if st.grad is None else st.grad + contrib
                output.register_hook(grad_hook)
        return hook

    for t in ctx.targets:
        handles.append(t.adapter.register_forward_hook(forward_hook(t)))
        modes[t.owner] = t.adapter.training
        t.adapter.eval()  # no adapter dropout while measuring
    params = dict(ctx.gm.named_parameters())
    adapter_params = {id(p) for t in ctx.targets for p in t.adapter.parameters()}
    if backward:
        saved_flags = {name: p.requires_grad for name, p in params.items()}
        for p in params.values():
            p.requires_grad_(id(p) in adapter_params)  # only the branches carry gradients: no dL/dW buffers
    generator = torch.Generator().manual_seed(seed)
    seen = 0
    try:
        for batch in tracked(ctx.data.batches(limit=ctx.batches), "calibration batches", ctx.batches):
            part = distributed.shard(batch)
            with torch.enable_grad() if backward else torch.no_grad():
                outputs = _run(ctx.gm, ctx.data.model_inputs(part.batch))
                if gradients:
                    phase["name"] = "loss"
                    distributed.weighted_loss(ctx.loss(outputs, part.batch), part)[0].backward(
                        retain_graph=output_metric)
                if output_metric:
                    from rewrite.data import select_output

                    out = select_output(outputs, ctx.data.options.output)
                    phase["name"] = "metric"
                    out.backward(part.normal(out.shape, generator, out.dtype))
            seen += 1
    finally:
        for handle in handles:
            handle.remove()
        for t in ctx.targets:
            t.adapter.train(modes[t.owner])
            for p in t.adapter.parameters():
                p.grad = None
        for name, flag in saved_flags.items():
            params[name].requires_grad_(flag)
    if seen == 0:
        raise DataError("[data] yielded no batches")
    for owner, st in stats.items():
        st.batches = seen
        if st.second_moment is None:
            raise DataError(f"site {owner} was never reached by the calibration data")
    _combine(stats)
    return stats


def _combine(stats: dict[str, SiteStats]) -> None:
    """The statistics of every process's rows (rewrite.distributed rules 2 and 3)."""
    tokens = torch.tensor([st.tokens for st in stats.values()], dtype=torch.float64)
    distributed.all_sum([tokens, *(t for st in stats.values() for t in (st.second_moment, st.out_moment))])
    distributed.all_mean([st.grad for st in stats.values()])
    for st, count in zip(stats.values(), tokens.tolist()):
        st.tokens = int(count)


def _run(gm, inputs: dict[str, torch.Tensor]):
    try:
        return gm(**inputs)
    except RewriteError:
        raise
    except Exception as err:  # noqa: BLE001 - data that does not fit the captured graph is bad input
        shapes = {k: tuple(v.shape) for k, v in inputs.items()}
        raise DataError(f"the captured graph cannot run on a [data] batch with shapes {shapes}: {first_line(err)} "
                        "(a graph captured with static sizes needs batches of exactly those sizes: set [data] "
                        "batch_size, or capture with dynamic dims)") from None


def whiten(w: torch.Tensor, cov: torch.Tensor, *, inverse: bool = False, damping: float = 0.0) -> torch.Tensor:
    """w @ C^{1/2} (or w @ (C + lambda I)^{-1/2}, lambda = damping * mean eigenvalue of C).

    A vector `cov` is a diagonal C (embedding sites): the product is a column scaling, never a V x V matrix.
    """
    if cov.dim() == 1:
        d = cov.clamp(min=0)
        d = d + damping * float(d.mean())
        d = torch.where(d > 0, d.rsqrt(), torch.zeros_like(d)) if inverse else d.sqrt()
        return w * d
    evals, evecs = torch.linalg.eigh(cov)
    d = evals.clamp(min=0)
    d = d + damping * float(d.mean())
    d = torch.where(d > 0, d.rsqrt(), torch.zeros_like(d)) if inverse else d.sqrt()
    return ((w @ evecs) * d) @ evecs.T


class ActivationScorer(Scorer):
    name = "activation"
    needs_data = True

    def __call__(self, ctx: ScoreContext) -> Curves:
        normalize = ctx.options.get("normalize") or "site"
        stats = collect_statistics(ctx, gradients=False)
        values = {}
        for t in ctx.targets:
            w = weight_matrix(t).double()
            sigma = torch.linalg.svdvals(whiten(w, stats[t.owner].cov))
            total = float((sigma ** 2).sum())
            scale = 1.0 / total if normalize == "site" and total > 0 else 1.0
            values[t.owner] = energy_curve(sigma, t.max_rank, scale)
        unit = "share of E||W x||^2" if normalize == "site" else "E||W x||^2"
        return Curves(values, unit, {"normalize": normalize, "batches": ctx.batches,
                                     "tokens": {o: s.tokens for o, s in stats.items()}})
