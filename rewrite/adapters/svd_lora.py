"""SVD-form LoRA (AdaLoRA, IncreLoRA): a low-rank branch whose rank can shrink or grow while training.

    y = base(x) + c * P (lam (.) (Q drop(x)))        c = alpha / (ranknum + 1e-5)     (METHODS.md §2.1)

One rank is a *triplet* i = (P[:, i], lam_i, Q[i, :]). Layout is PEFT's AdaLoRA layout, so importance
scores are computed on the very same tensors as PEFT's `RankAllocator` (bit for bit):

    Q   [r, d_in]   (conv2d: [r, c_in * kh * kw])      PEFT `lora_A`
    lam [r, 1]                                          PEFT `lora_E`
    P   [d_out, r]                                      PEFT `lora_B`

Parameters are kept as *blocks* (`ParameterList`s): AdaLoRA uses one block of r0 triplets; IncreLoRA
appends blocks as it grows, so the optimizer keeps the state of old parameters and new ones join as new
parameter groups (with their own warm-up). The last `reserve` triplets are IncreLoRA's reserve ("advance
learning") triplets: trained, but not counted in `rank`.

`ranknum` sets the scale: AdaLoRA keeps it at r0 for the whole run (also after pruning: PEFT's resize
keeps it); IncreLoRA raises it as ranks are added (every existing component is rescaled by
ranknum_old / ranknum_new). Init (PEFT's): lam = 0, P, Q ~ N(0, 0.02^2): the branch starts as the identity.

Merge: linear W += c P diag(lam) Q; Conv1D Wc += (c P diag(lam) Q)^T; conv2d W += (c P diag(lam) Q).view(W).
`to_lora(keep)` turns the kept triplets into a plain `LoRA` of exactly that rank with the same delta
(A = (diag(lam) Q)^T, B = P^T * c / s_lora, alpha unchanged) -- what training allocators leave in the graph,
and what the `save` pass writes. `lora_A` / `lora_B` (read-only) are the same factors in LoRA's layout with
`scaling` = c: delta(x) = c * x A B, which the unmerged-export lowering reads.
Embedding sites are not supported (PEFT's AdaLoRA does not support them either).

`insert` with `kind = "svd_lora"` puts this module in from a spec (PEFT's AdaLoRA init, identity at start).

`load` reads PEFT's AdaLoRA directories (`peft_type = "ADALORA"`, keys `lora_A` / `lora_E` / `lora_B`, no `.weight`):
the rank is the tensors' (PEFT saves each module cut to the triplets its `rank_pattern` mask keeps), and
c = lora_alpha / (init_r + 1e-5), as PEFT's reload keeps `ranknum` at `init_r` after that cut.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import StrictBool, field_validator
from torch import nn

from rewrite.adapters.base import LowRank
from rewrite.adapters.lora import LoRA
from rewrite.errors import AdapterFileError
from rewrite.formats.peft_dir import CONFIG, WEIGHTS, PeftAdapter, PeftFormat, tensor_key
from rewrite.formats.peft_lora import LoraPeftConfig, Rank

SVD_INITS = ("zeros", "gaussian", "adalora")
INIT_STD = 0.02
ADALORA_KEYS = ("lora_A", "lora_E", "lora_B")


class AdaLoraPeftConfig(LoraPeftConfig):
    """`adapter_config.json` of an AdaLoRA adapter: LoRA's fields (the same variants refused), `init_r` the rank it
    was made with, `rank_pattern` {saved name of lora_E: the mask of the triplets kept} after its budget steps."""

    expected: ClassVar[dict[str, str]] = {**LoraPeftConfig.expected, "init_r": "a whole number >= 1",
                                          "rank_pattern": "an object of module -> list of true / false"}
    pattern_values: ClassVar[dict[str, str]] = {"alpha_pattern": "a number", "rank_pattern": "a list of true / false"}

    peft_type: str = "ADALORA"
    init_r: Rank = 12
    rank_pattern: dict[str, list[StrictBool]] = {}

    @field_validator("rank_pattern")
    @classmethod
    def _pattern_regexes(cls, value: Any) -> Any:  # LoRA's regex keys; AdaLoRA's are saved parameter names
        return value


def _kept(adapter: PeftAdapter, module: str) -> list[bool] | None:
    """The `rank_pattern` mask of `module` (PEFT names it by its lora_E parameter, with or without the adapter's
    name), or None."""
    for name, mask in adapter.config.rank_pattern.items():
        if name.removeprefix("base_model.model.").split(".lora_E")[0] == module:
            return mask
    return None


def _check_adalora(adapter: PeftAdapter) -> None:
    """Q [r, d_in], lam [r, 1], P [d_out, r] of one rank r per module: `init_r`, or the mask's count of kept
    triplets where `rank_pattern` names the module."""
    weights_file = adapter.path / WEIGHTS
    for module, parts in adapter.modules.items():
        q, e, p = (parts[key] for key in ADALORA_KEYS)
        r = q.shape[0]
        if q.ndim != 2 or e.shape != (r, 1) or p.ndim != 2 or p.shape[1] != r:
            raise AdapterFileError(f"{weights_file}: module {module!r}: lora_A {q.shape}, lora_E {e.shape}, lora_B "
                                   f"{p.shape}; expected Q [r, d_in], lam [r, 1] and P [d_out, r] of one rank r")
        mask = _kept(adapter, module)
        expected = adapter.config.init_r if mask is None else sum(mask)
        if r != expected:
            said = f"'init_r' = {expected}" if mask is None else f"'rank_pattern' keeps {expected} triplets"
            raise AdapterFileError(f"{weights_file}: tensor {tensor_key(module, 'lora_A')!r} has rank {r}, but "
                                   f"{CONFIG} says {said} for {module!r}; the config does not describe these tensors")
        if r == 0:
            raise AdapterFileError(f"{weights_file}: module {module!r}: AdaLoRA's budget kept none of its triplets "
                                   "(rank 0, a no-op); rank-0 modules are not loaded: drop its tensors and its "
                                   "target_modules entry, or load the adapter before that budget step")


ADALORA_FORMAT = PeftFormat("ADALORA", AdaLoraPeftConfig, (ADALORA_KEYS,), check=_check_adalora)


class SvdLoRA(LowRank):
    kind = "svd_lora"
    ops = ("linear", "conv1d", "conv2d")
    settings = ("rank", "alpha", "dropout", "init")
    inits = ("zeros",)  # from a spec: PEFT's AdaLoRA init (lam = 0); the allocators use the others
    peft_format = ADALORA_FORMAT

    def __init__(self, op: str, d_in: int, d_out: int, rank: int, alpha: float, *, rslora: bool = False,
                 dropout: float = 0.0, init: str = "zeros", conv: dict | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", ranknum: float | None = None):
        super().__init__()
        if op not in ("linear", "conv1d", "conv2d"):
            raise ValueError(f"SVD-form LoRA supports linear, Conv1D and conv2d sites, not {op!r}")
        if rank < 1:
            raise ValueError(f"SVD-form LoRA rank must be >= 1, got {rank}")
        if rslora:
            raise ValueError("SVD-form LoRA scales by alpha / ranknum (AdaLoRA); rslora does not apply")
        if init not in SVD_INITS:
            raise ValueError(f"unknown SVD-form LoRA init {init!r} (expected one of {SVD_INITS})")
        self.op, self.d_in, self.d_out, self.alpha = op, d_in, d_out, float(alpha)
        self.rslora, self.init = False, init
        self.conv = dict(conv or {})
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.ranknum = float(rank if ranknum is None else ranknum)
        self.reserve = 0
        self.track_product_grad = False        # IncreLoRA: materialise c P diag(lam) Q and keep dL/d(that)
        self.product_grad: torch.Tensor | None = None
        self.Q, self.E, self.P = nn.ParameterList(), nn.ParameterList(), nn.ParameterList()
        self._factory = dict(dtype=dtype, device=device)
        self.add_block(rank)

    # --- shape -------------------------------------------------------------------------------------------
    @property
    def q_width(self) -> int:
        if self.op == "conv2d":
            kh, kw = self.conv["kernel_size"]
            return self.d_in * kh * kw
        return self.d_in

    @property
    def slots(self) -> int:
        """Triplets held, reserves included."""
        return sum(e.shape[0] for e in self.E)

    @property
    def rank(self) -> int:
        """Triplets that count (reserves excluded); AdaLoRA's masked triplets still count until resized."""
        return self.slots - self.reserve

    @rank.setter
    def rank(self, value: int) -> None:
        """`load` sets each setting it reads; the rank follows the triplets held (`resize` changes it)."""
        if value != self.rank:
            raise ValueError(f"SVD-form LoRA holds {self.rank} triplets; resize it to change its rank to {value}")

    @property
    def scaling(self) -> float:
        return self.alpha / (self.ranknum + 1e-5)

    def add_block(self, rank: int, *, lam: float = 0.0, train_lam: bool = True) -> tuple[nn.Parameter, ...]:
        """Append `rank` fresh triplets (P, Q ~ N(0, 0.02^2), lam = `lam`); returns (Q, E, P) of the block."""
        q = nn.Parameter(torch.empty(rank, self.q_width, **self._factory))
        e = nn.Parameter(torch.full((rank, 1), float(lam), **self._factory), requires_grad=train_lam)
        p = nn.Parameter(torch.empty(self.d_out, rank, **self._factory))
        if q.device.type != "meta":
            with torch.no_grad():
                q.normal_(0.0, INIT_STD)
                p.normal_(0.0, INIT_STD)
        self.Q.append(q)
        self.E.append(e)
        self.P.append(p)
        return q, e, p

    # --- the three factors as single tensors ---------------------------------------------------------------
    def q(self) -> torch.Tensor:
        return self.Q[0] if len(self.Q) == 1 else torch.cat(list(self.Q), 0)

    def e(self) -> torch.Tensor:
        return self.E[0] if len(self.E) == 1 else torch.cat(list(self.E), 0)

    def p(self) -> torch.Tensor:
        return self.P[0] if len(self.P) == 1 else torch.cat(list(self.P), 1)

    def product(self) -> torch.Tensor:
        """c P diag(lam) Q as a [d_out, q_width] matrix (differentiable)."""
        return self.p() @ (self.q() * self.e()) * self.alpha / (self.ranknum + 1e-5)

    # --- the LoRA view: delta(x) = scaling * x A B (every slot, as the forward) ------------------------------
    @property
    def lora_A(self) -> torch.Tensor:
        """(diag(lam) Q)^T [q_width, slots] (conv2d: diag(lam) Q as [slots, c_in, kh, kw]), computed."""
        a = self.q() * self.e()
        if self.op == "conv2d":
            kh, kw = self.conv["kernel_size"]
            return a.view(-1, self.d_in, kh, kw)
        return a.T

    @property
    def lora_B(self) -> torch.Tensor:
        """P^T [slots, d_out] (conv2d: P as [d_out, slots, 1, 1]), computed."""
        p = self.p()
        return p.view(self.d_out, -1, 1, 1) if self.op == "conv2d" else p.T

    # --- forward / merge -----------------------------------------------------------------------------------
    def _accumulate_product_grad(self, grad: torch.Tensor) -> None:
        grad = grad.detach()
        self.product_grad = grad.clone() if self.product_grad is None else self.product_grad + grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.track_product_grad and torch.is_grad_enabled():
            weight = self.product()
            weight.register_hook(self._accumulate_product_grad)
            if self.op != "conv2d":
                return F.linear(self.dropout(x), weight)
        elif self.op == "conv2d":
            weight = self.product()
        if self.op == "conv2d":
            kh, kw = self.conv["kernel_size"]
            weight = weight.view(self.d_out, self.d_in, kh, kw)
            return F.conv2d(self.dropout(x), weight, None, self.conv["stride"], self.conv["padding"],
                            self.conv["dilation"])
        # c P diag(lam) Q x with lam and c folded into the small factors: two GEMMs, nothing elementwise on
        # the activations (PEFT scales the [.., d_out] output twice; same value up to rounding)
        return F.linear(F.linear(self.dropout(x), self.q() * self.e()), self.p() * self.scaling)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The change of the base weight, in the base weight's own layout."""
        mat = self.product()
        if self.op == "conv1d":
            return mat.T
        if self.op == "conv2d":
            kh, kw = self.conv["kernel_size"]
            return mat.view(self.d_out, self.d_in, kh, kw)
        return mat

    @torch.no_grad()
    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None = None, sign: float = 1.0) -> None:
        weight.add_(self.delta_weight().to(weight.dtype), alpha=sign)

    def saved_form(self) -> LoRA:
        return self.to_lora()

    def manifest_entry(self) -> dict:
        return dict(op=self.op, rank=self.rank, alpha=self.alpha, rslora=False, scaling=self.scaling)

    # --- resizing ------------------------------------------------------------------------------------------
    def _keep_index(self, keep: torch.Tensor | list[bool] | None) -> torch.Tensor:
        if keep is None:
            return torch.arange(self.rank)
        keep = torch.as_tensor(keep).reshape(-1)
        if keep.dtype == torch.bool:
            if keep.numel() not in (self.rank, self.slots):
                raise ValueError(f"keep mask has {keep.numel()} entries; this adapter holds {self.rank} ranks")
            keep = keep[:self.rank].nonzero().reshape(-1)
        return keep.long()

    @torch.no_grad()
    def resize(self, rank: int, keep: torch.Tensor | list[bool] | None = None, *, ranknum: float | None = None) -> None:
        """Keep `rank` triplets as one block: those of `keep` (bool mask over ranks, or indices, `rank` of them),
        else the first `rank`; reserves are dropped. The SVD form only shrinks (new triplets come from
        `add_block`). `ranknum` stays as it is unless given (AdaLoRA keeps c = alpha / r0 after pruning)."""
        index = self._keep_index(keep) if keep is not None else torch.arange(min(rank, self.rank))
        if index.numel() != rank:
            raise ValueError(f"resize to rank {rank} with {index.numel()} triplets kept (this adapter holds "
                             f"{self.rank})")
        if index.numel() == 0:
            raise ValueError("resize would leave rank 0; drop the adapter instead")
        q, e, p = self.q()[index].clone(), self.e()[index].clone(), self.p()[:, index].clone()
        self.Q, self.E, self.P = (nn.ParameterList([nn.Parameter(q)]), nn.ParameterList([nn.Parameter(e)]),
                                  nn.ParameterList([nn.Parameter(p)]))
        self.reserve = 0
        if ranknum is not None:
            self.ranknum = float(ranknum)

    @torch.no_grad()
    def to_lora(self, keep: torch.Tensor | list[bool] | None = None, *, alpha: float | None = None,
                rslora: bool = False) -> LoRA:
        """A plain LoRA holding exactly the kept triplets, with the same delta (rank = number kept)."""
        index = self._keep_index(keep)
        rank = int(index.numel())
        if rank == 0:
            raise ValueError("no triplet kept: the site loses its branch (drop the adapter)")
        q, e, p = self.q()[index], self.e()[index], self.p()[:, index]
        lora = LoRA(self.op, self.d_in, self.d_out, rank, self.alpha if alpha is None else alpha, rslora=rslora,
                    dropout=getattr(self.dropout, "p", 0.0), init="zeros", conv=self.conv,
                    dtype=q.dtype, device=q.device)
        factor = self.scaling / lora.scaling
        a = q * e                                   # [r, q_width]
        if self.op == "conv2d":
            lora.lora_A.copy_(a.view_as(lora.lora_A))
            lora.lora_B.copy_((p * factor).view_as(lora.lora_B))
        else:
            lora.lora_A.copy_(a.T)
            lora.lora_B.copy_(p.T * factor)
        lora.train(self.training)
        return lora

    # --- PEFT ----------------------------------------------------------------------------------------------
    def peft_state(self) -> dict[str, torch.Tensor]:
        """Tensors under PEFT AdaLoRA's key suffixes: lora_A = Q, lora_E = lam, lora_B = P (reserves dropped)."""
        r = self.rank
        return {"lora_A": self.q()[:r].detach().clone(), "lora_E": self.e()[:r].detach().clone(),
                "lora_B": self.p()[:, :r].detach().clone()}

    def peft_shapes(self) -> dict[str, tuple[int, ...]]:
        r = self.rank
        return {"lora_A": (r, self.q_width), "lora_E": (r, 1), "lora_B": (self.d_out, r)}

    @torch.no_grad()
    def load_peft_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy PEFT AdaLoRA tensors in (one block of the given rank; reserves dropped)."""
        q, e, p = tensors["lora_A"], tensors["lora_E"].reshape(-1, 1), tensors["lora_B"]
        dtype = self.E[0].dtype
        self.Q = nn.ParameterList([nn.Parameter(q.detach().to(dtype).clone())])
        self.E = nn.ParameterList([nn.Parameter(e.detach().to(dtype).clone())])
        self.P = nn.ParameterList([nn.Parameter(p.detach().to(dtype).clone())])
        self.reserve = 0

    @classmethod
    def peft_module(cls, adapter: PeftAdapter, module: str) -> tuple[type[SvdLoRA], dict]:
        """PEFT's AdaLoRA reads `lora_alpha` alone (no alpha_pattern, no rsLoRA)."""
        config: AdaLoraPeftConfig = adapter.config  # type: ignore[assignment]
        return cls, dict(rank=int(adapter.modules[module]["lora_A"].shape[0]), alpha=float(config.lora_alpha),
                         ranknum=float(config.init_r))

    def extra_repr(self) -> str:
        return (f"op={self.op}, d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}, reserve={self.reserve}, "
                f"ranknum={self.ranknum:g}, scaling={self.scaling:g}")


def orthogonality(modules, *, blockwise: bool = False) -> torch.Tensor:
    """Mean over every P and Q of ||P^T P - I||_F and ||Q Q^T - I||_F (PEFT / official AdaLoRA).

    `blockwise=True` applies it per parameter block (IncreLoRA's rank-1 blocks: each vector is normalised,
    there is no cross-rank term), as IncreLoRA's `compute_orth_regu` does on its ParameterLists.
    Factors of the same shape are stacked and reduced with one batched matmul (same value as the loop)."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for module in modules:
        pairs = ([(q, "q") for q in module.Q] + [(p.T, "p") for p in module.P]) if blockwise else \
            [(module.q(), "q"), (module.p().T, "p")]
        for tensor, _ in pairs:  # P^T P = (P^T)(P^T)^T: both are "rows times rows^T"
            groups.setdefault((tuple(tensor.shape), tensor.dtype, tensor.device), []).append(tensor)
    total, count = None, 0
    for (shape, dtype, device), tensors in groups.items():
        stacked = tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)
        cov = stacked @ stacked.transpose(1, 2)
        eye = torch.eye(shape[0], dtype=dtype, device=device)
        term = torch.linalg.matrix_norm(cov - eye, ord="fro").sum()
        total = term if total is None else total + term
        count += len(tensors)
    if total is None:
        return torch.zeros(())
    return total / count


__all__ = ["SvdLoRA", "orthogonality"]
