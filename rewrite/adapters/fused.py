"""`FusedLowRank`: the low-rank branches that read one input, run through one concatenated A (the `fuse` pass).

    members m_1 .. m_k with factors (A_i [d_in, r_i], B_i [r_i, d_out_i]), scale s_i folded into B_i:
    h = x [A_1 | ... | A_k]          one GEMM  [.., sum r_i]
    delta_i = h[.., o_i : o_i + r_i] B_i       o_i = r_1 + .. + r_(i-1)

The member modules stay registered where `insert` / `load` put them and remain the adapters' only source of truth
(save, merge, combine and export read them). This module holds no parameters: it keeps references to the members
and a cache of their concatenated factors, rebuilt whenever a member's own tensors or scale changed (a resize, a
load, an optimizer step), so it does not serve stale weights. It runs in inference only: gradients do not reach the
members through the cache, so training mode is refused (fuse after training, or unfuse: `rewrite.graph_edit.unfuse`).
"""
from __future__ import annotations

import torch
from torch import nn

from rewrite.adapters.base import AdapterKind


class FusedLowRank(nn.Module):
    def __init__(self, members: list[AdapterKind]):
        super().__init__()
        self.members = list(members)  # a plain list: the modules stay registered (and owned) where they were
        self._stamp: tuple | None = None
        self.A: torch.Tensor | None = None
        self.B: list[torch.Tensor] = []
        self.ranks: list[int] = []
        self.eval()

    def _state(self) -> tuple:
        """What the factors are made of: each member's own tensors (object and version: a resize replaces them, an
        in-place update bumps the version) and its scale. Read from the modules' own tables (a recursive walk costs
        more than the GEMMs it guards at batch 1); shared frozen submodules (VeRA's projections) are not watched."""
        return tuple((id(t), t._version) for m in self.members for t in (*m._parameters.values(),
                                                                         *m._buffers.values()) if t is not None) + \
            tuple(getattr(m, "scaling", None) for m in self.members)

    @torch.no_grad()
    def refresh(self) -> None:
        """Rebuild the concatenated factors if any member changed since they were built."""
        stamp = self._state()
        if stamp == self._stamp:
            return
        factors = [m.factors() for m in self.members]
        self.A = torch.cat([a for a, _ in factors], dim=1)
        self.B = [b.contiguous() for _, b in factors]
        self.ranks = [a.shape[1] for a, _ in factors]
        self._stamp = stamp

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.training or any(m.training for m in self.members):
            raise RuntimeError("fused adapters run in inference only (their gradients would not reach the adapters); "
                               "run `fuse` after training, or train the graph before fusing")
        self.refresh()
        hidden = x @ self.A
        return tuple(h @ b for h, b in zip(hidden.split(self.ranks, dim=-1), self.B))

    def extra_repr(self) -> str:
        return f"members={len(self.members)}, ranks={self.ranks or '?'}"
