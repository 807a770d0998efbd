"""fisher: a few batches of inputs and labels; the loss gradient at each site, read as a spectrum.

Per site (W as [d_out, fan_in]): G = mean over batches of dL/dW (from the adapters' hooks, G = sum_n g_n x_n^T),
the input factor C = E[x x^T] and the output factor Gamma = E[J^T J] (J: model output / site output,
estimated by back-propagating a random N(0, I) cotangent from the output the loss reads: exact
Gauss-Newton for `mse`). With lambda = damping * mean eigenvalue on each factor:

    whiten = "kfac"    v(r) = 1/2 sum_{i<=r} sigma_i(Gamma^{-1/2} G C^{-1/2})^2   (the default)
    whiten = "input"   v(r) = 1/2 sum_{i<=r} sigma_i(G C^{-1/2})^2                (identity output metric)
    whiten = "none"    v(r) = sum_{i<=r} sigma_i(G)^2                             (gradient spectrum, LoRA-GA)

"kfac" is the loss decrease of the best rank-r natural-gradient step under the K-FAC Gauss-Newton
approximation (Gamma (x) C) of the site's Hessian block; "input" assumes every site's output reaches the loss
with the same gain, which over-values sites whose outputs matter little (q/k projections before a softmax)
and under-values sites with small inputs (o_proj, down_proj). Values are in loss units (normalize defaults to
"none"); "kfac" needs the model output (not [data] loss = "model"; it falls back to "input" there).

`probe_steps = N > 0`: a gradient taken at one point attributes the whole output error to every site (in a
residual stream all sites see the same error, so a site with no task update still shows a large
gradient). With a probe, the adapters being allocated (insert them at the largest rank you allow) take N
Adam steps on the [data] loss (lr, grad_clip from [data]; only adapter parameters move), the fitted
update D of each site is read, and the adapters are restored exactly. Then

    v(r) = 1/2 sum_{i<=r} sigma_i(Gamma^{1/2} D C^{1/2})^2     (the K-FAC Gauss-Newton value of the rank-r
                                                             part of the site's fitted update)

the same quantity as the one-step curve above (one natural-gradient step is D = -Gamma^{-1} G C^{-1}), after
N joint steps. bench/bench_planted_ranks.py shows the difference (planted ranks found: Spearman about
+0.2 to +0.4 from one step, +1.0 with a probe). Under torch.distributed the probe's gradients are averaged over
the processes before each step (rewrite.distributed rule 2): every process fits the same update from all the rows.
"""
from __future__ import annotations

import math

import torch

from rewrite import distributed
from rewrite.errors import DataError
from rewrite.progress import tracked
from rewrite.scorers import Curves, ScoreContext, Scorer, Target, energy_curve
from rewrite.scorers.activation import _run, collect_statistics, whiten as whiten_by


def _delta_matrix(target: Target) -> torch.Tensor:
    """The adapter's current delta as [d_out, fan_in] (with its scale)."""
    delta = target.adapter.delta_weight().double()
    op = target.shape.op
    if op in ("conv1d", "embedding"):
        return delta.T
    if op == "conv2d":
        return delta.flatten(1)
    return delta


def probe_fit(ctx: ScoreContext, steps: int) -> dict[str, torch.Tensor]:
    """Train the targets' adapters for `steps` Adam steps, return each update (fitted - initial), restore."""
    modules = {t.owner: t.adapter for t in ctx.targets}
    saved = {o: {k: v.detach().clone() for k, v in m.state_dict().items()} for o, m in modules.items()}
    start = {t.owner: _delta_matrix(t) for t in ctx.targets}
    params = dict(ctx.gm.named_parameters())
    flags = {name: p.requires_grad for name, p in params.items()}
    train_params = [p for m in modules.values() for p in m.parameters()]
    ids = {id(p) for p in train_params}
    modes = {o: m.training for o, m in modules.items()}
    options = ctx.data.options
    try:
        for p in params.values():
            p.requires_grad_(id(p) in ids)
        for m in modules.values():
            m.eval()  # no dropout: the probe measures the update, not a regularised one
        optimizer = torch.optim.Adam(train_params, lr=options.lr)
        done, last = 0, {}
        for batch in tracked(ctx.data.batches(limit=steps), "probe fit", steps, lambda: last):
            part = distributed.shard(batch)
            with torch.enable_grad():
                local, loss = distributed.weighted_loss(
                    ctx.loss(_run(ctx.gm, ctx.data.model_inputs(part.batch)), part.batch), part)
                if not math.isfinite(loss):
                    raise DataError(f"probe fit: the [data] loss is {loss} at step {done}; lower [data] lr")
                optimizer.zero_grad(set_to_none=True)
                local.backward()
            distributed.all_mean([p.grad for p in train_params])
            if options.grad_clip:
                torch.nn.utils.clip_grad_norm_(train_params, options.grad_clip)
            optimizer.step()
            done += 1
            last = {"loss": f"{loss:.4g}"}
        return {t.owner: _delta_matrix(t) - start[t.owner] for t in ctx.targets}
    finally:
        with torch.no_grad():
            for owner, module in modules.items():
                module.load_state_dict(saved[owner])
                module.train(modes[owner])
                for p in module.parameters():
                    p.grad = None
        for name, flag in flags.items():
            params[name].requires_grad_(flag)


class FisherScorer(Scorer):
    name = "fisher"
    needs_data = True
    needs_labels = True

    def __call__(self, ctx: ScoreContext) -> Curves:
        mode = ctx.options.get("whiten") or "kfac"
        damping = float(ctx.options.get("damping", 1e-3))
        normalize = ctx.options.get("normalize") or "none"
        probe_steps = int(ctx.options.get("probe_steps") or 0)
        kfac = mode == "kfac" and ctx.data.options.loss != "model"
        stats = collect_statistics(ctx, gradients=probe_steps == 0, output_metric=kfac)
        updates = probe_fit(ctx, probe_steps) if probe_steps else None
        values = {}
        for t in ctx.targets:
            st = stats[t.owner]
            if updates is not None:  # the fitted update, measured in the (output, input) metric
                matrix = updates[t.owner]
                if mode != "none":
                    matrix = whiten_by(matrix, st.cov)
                if kfac:
                    matrix = whiten_by(matrix.T, st.out_metric).T
            else:                    # one (natural-)gradient step
                matrix = st.grad / st.batches if st.grad is not None else torch.zeros(
                    t.shape.d_out, t.shape.fan_in, dtype=torch.float64)
                if mode != "none":
                    matrix = whiten_by(matrix, st.cov, inverse=True, damping=damping)
                if kfac:
                    matrix = whiten_by(matrix.T, st.out_metric, inverse=True, damping=damping).T
            half = 1.0 if mode == "none" and updates is None else 0.5
            sigma = torch.linalg.svdvals(matrix)
            total = float((sigma ** 2).sum())
            scale = 1.0 / total if normalize == "site" and total > 0 else half
            values[t.owner] = energy_curve(sigma, t.max_rank, scale)
        if normalize == "site":
            unit = "share of the site's update energy"
        elif mode == "none" and updates is None:
            unit = "first-order loss decrease (x step size)"
        else:
            unit = "Gauss-Newton loss decrease" + (" (K-FAC)" if kfac else " (identity output metric)")
        settings = {"whiten": mode if kfac or mode != "kfac" else "input", "damping": damping,
                    "normalize": normalize, "batches": ctx.batches, "probe_steps": probe_steps}
        if updates is not None:
            settings.update(lr=ctx.data.options.lr, grad_clip=ctx.data.options.grad_clip)
        return Curves(values, unit, settings)
