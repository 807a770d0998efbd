"""spectrum: no data; the singular-value energy of the base weight, v(r) = sum_{i<=r} sigma_i(W)^2.

Describes W, not the task update: a prior for compression and for PiSSA-style init, weak evidence for
adapter rank (METHODS.md §2.5). With normalize = "site" (the default) each site's curve is divided by
||W||_F^2, so every site is worth 1 at full rank and ranks go where the spectrum is flat.
"""
from __future__ import annotations

import torch

from rewrite.scorers import Curves, ScoreContext, Scorer, spectral_curves, weight_matrix


class SpectrumScorer(Scorer):
    name = "spectrum"

    def __call__(self, ctx: ScoreContext) -> Curves:
        return spectral_curves(ctx, lambda t: torch.linalg.svdvals(weight_matrix(t).double()), "W", "site")
