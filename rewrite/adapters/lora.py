"""LoRA: a low-rank branch added to a weight-carrying op.

    y = base(x) + s * B(A(dropout(x)))        s = alpha / r   (rsLoRA: alpha / sqrt(r))

Parameters are stored in **matmul layout** so that exported ONNX keeps their names (ONNX.md §2.2):
    linear, conv1d   A [d_in, r], B [r, d_out]          delta(x) = s * x @ A @ B
    embedding        A [V, r],    B [r, d]              delta(ids) = s * A[ids] @ B
    conv2d           A [r, c_in, kh, kw] (base stride/padding/dilation), B [c_out, r, 1, 1]

Merge (exact, in place):   linear  W += s (A B)^T    conv1d  Wc += s A B    embedding  E += s A B
                           conv2d  W += s (B_mat A_mat).view(W.shape)
Unmerge subtracts the same delta (exact up to rounding).

Inits: `zeros` (PEFT's default: A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)), B = 0; embedding: A = 0, B ~ N(0, 1)),
`gaussian` (A ~ N(0, 1/r^2), B = 0). Both start as the identity: base(x) + 0.
Inits that rewrite the base weight (`weight_inits`; PEFT's `init_lora_weights = "pissa" | "olora"`), computed in
fp32 on W in linear layout [d_out, d_in] (Conv1D: its transpose) at insert (`init_from_weight`):
    pissa   W = U S V^T (exact SVD):  A0 = V_r sqrt(S_r / s),  B0 = sqrt(S_r / s) U_r^T    s (A0 B0)^T = U_r S_r V_r^T
    olora   W = Q R (thin QR):        A0 = R_r^T,               B0 = Q_r^T                  s (A0 B0)^T = s Q_r R_r
(r leading singular triplets / columns of Q / rows of R; linear sites, PiSSA Conv1D too: PEFT's OLoRA ignores
Conv1D's layout). The base weight in the graph becomes the residual W_res = W - s (A0 B0)^T, so they start as the
identity too (up to rounding) and the forward never reads W. A0, B0 are kept (buffers `init_lora_A`, `init_lora_B`).
PEFT's fast SVD (`pissa_niter_<k>`) is not offered: its random draw cannot be repeated to match PEFT.
PEFT keys: `lora_A.weight` [r, d_in] = A^T, `lora_B.weight` [d_out, r] = B^T (embedding:
`lora_embedding_A` [r, V] = A^T, `lora_embedding_B` [d, r] = B^T; conv2d: same tensors as ours).
A PiSSA / OLoRA adapter is saved as PEFT saves it: A, B with `init_lora_weights = "pissa" | "olora"`, which
`PeftModel.from_pretrained` loads onto the ORIGINAL model by recomputing the same residual (SVD and QR are
deterministic; the residual is sign-free) at the rank of its insert (a resized one is refused). `save
convert_to_lora = true` writes `converted_form()`: the plain LoRA of the same delta against the original weight,
    W_res + s (A B)^T - W = s ([A | A0] [B; -B0])^T       rank r + r0, same s (alpha = s (r + r0), rsLoRA s sqrt(r + r0))
as PEFT's `save_pretrained(path_initial_model_for_weight_conversion=...)` (`init_lora_weights = true`). Our adapter
file has no residual: only the converted form goes there. Merge folds s (A B)^T into W_res: the trained weight.

Resizing (`resize(rank, keep)`, used by rank allocation) replaces A and B by new Parameters of the new
rank. Scaling convention: **the branch scale s is kept fixed across a resize** and alpha is rescaled to
match (alpha' = s r', rsLoRA: alpha' = s sqrt(r')), as AdaLoRA keeps c = alpha / r_init. The components
that are kept therefore contribute exactly what they did before, and every consumer that reads
`alpha` / `rank` / `scaling` (merge, save as PEFT with `alpha_pattern`, the manifest, unmerged export,
which folds s into B) sees the same s. New components are zero-delta (one factor is zero, as at insert).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rewrite.adapters.base import LowRank, NotSupported
from rewrite.formats.adapter_file import SiteInfo
from rewrite.formats.peft_lora import LINEAR_KEYS, LORA_FORMAT, LoraSettings, alpha_for_scale, alpha_of, lora_config, \
    lora_keys, lora_scale, rank_of

IDENTITY_INITS = ("zeros", "gaussian")
WEIGHT_INITS = ("pissa", "olora")
WEIGHT_INIT_OPS = {"pissa": ("linear", "conv1d"), "olora": ("linear",)}


class LoRA(LowRank):
    kind = "lora"
    ops = ("linear", "conv1d", "conv2d", "embedding")
    inits = (*IDENTITY_INITS, *WEIGHT_INITS)
    weight_inits = WEIGHT_INITS
    resizable = True
    peft_format = LORA_FORMAT

    def __init__(self, op: str, d_in: int, d_out: int, rank: int, alpha: float, *, rslora: bool = False,
                 dropout: float = 0.0, init: str = "zeros", conv: dict | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.op, self.d_in, self.d_out, self.rank, self.alpha = op, d_in, d_out, rank, float(alpha)
        self.rslora, self.init = rslora, init
        self.conv = dict(conv or {})
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = dict(dtype=dtype, device=device)
        if op == "conv2d":
            kh, kw = self.conv["kernel_size"]
            self.lora_A = nn.Parameter(torch.empty(rank, d_in, kh, kw, **factory))
            self.lora_B = nn.Parameter(torch.empty(d_out, rank, 1, 1, **factory))
        else:
            self.lora_A = nn.Parameter(torch.empty(d_in, rank, **factory))
            self.lora_B = nn.Parameter(torch.empty(rank, d_out, **factory))
        self.reset_parameters(init)

    @property
    def scaling(self) -> float:
        return lora_scale(self.alpha, self.rank, self.rslora)

    @torch.no_grad()
    def reset_parameters(self, init: str) -> None:
        if init in WEIGHT_INITS:  # `init_from_weight` sets them; what a resize adds is zero-delta as for zeros
            init = "zeros"
        if init == "zeros":
            if self.op == "embedding":
                self.lora_A.zero_()
                self.lora_B.normal_()
            else:
                fan_in = self.lora_A[0].numel() if self.op == "conv2d" else self.d_in
                bound = 1 / math.sqrt(fan_in)
                self.lora_A.uniform_(-bound, bound)
                self.lora_B.zero_()
        elif init == "gaussian":
            self.lora_A.normal_(0.0, 1.0 / self.rank)
            self.lora_B.zero_()
        else:
            raise ValueError(f"unknown LoRA init {init!r} (expected one of {LoRA.inits})")

    @torch.no_grad()
    def init_from_weight(self, weight: torch.Tensor) -> None:
        """PiSSA / OLoRA (module docstring): A0, B0 from the base weight, which becomes W_res = W - s (A0 B0)^T."""
        ops = WEIGHT_INIT_OPS[self.init]
        if self.op not in ops:
            raise ValueError(f"init = {self.init!r} adapts {' and '.join(ops)} sites (as PEFT does), not {self.op}")
        if self.rank > min(self.d_in, self.d_out):
            raise ValueError(f"init = {self.init!r} takes rank <= min(d_in, d_out) = {min(self.d_in, self.d_out)}, "
                             f"got {self.rank}")
        if self.init == "pissa" and self.scaling <= 0:
            raise ValueError(f"init = 'pissa' divides the singular values by s = {self.scaling:g}; alpha must be > 0")
        if not weight.is_meta:
            linear = (weight.T if self.op == "conv1d" else weight).to(torch.promote_types(weight.dtype, torch.float32))
            a, b = pissa_factors(linear, self.rank, self.scaling) if self.init == "pissa" else \
                olora_factors(linear, self.rank)
            self.lora_A.copy_(a)
            self.lora_B.copy_(b)
            residual = linear - self.scaling * (a @ b).T
            weight.copy_((residual.T if self.op == "conv1d" else residual).to(weight.dtype))
        self.register_buffer("init_lora_A", self.lora_A.detach().clone(), persistent=False)
        self.register_buffer("init_lora_B", self.lora_B.detach().clone(), persistent=False)

    def _matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A, B as matrices [fan_in, r] and [r, d_out] (views) with delta = s * A_mat @ B_mat (matmul layout)."""
        if self.op == "conv2d":
            return self.lora_A.flatten(1).T, self.lora_B.flatten(1).T
        return self.lora_A, self.lora_B

    @torch.no_grad()
    def resize(self, rank: int, keep: Sequence[int] | torch.Tensor | None = None) -> None:
        """Change the rank physically: new A, B Parameters of the new shape (optimizers must be rebuilt).

        `keep` lists the components (rank-1 terms A[:, i] B[i, :]) to keep, in order, or is a bool mask over
        the current rank; at most `rank` of them. They fill the first slots; the remaining slots are new
        zero-delta components initialised as at insert. With `keep=None`:
          - growing keeps every component and appends zero-delta ones;
          - shrinking an adapter whose delta is zero (freshly inserted) keeps the first `rank` components
            as they are (their init is preserved);
          - shrinking a non-zero adapter first re-factors it exactly into orthogonal components sorted by
            singular value (QR of A and B^T, SVD of the r x r core; the delta is unchanged up to rounding),
            then keeps the top `rank`: the best rank-`rank` approximation of the current delta.
        The scale s = `scaling` is unchanged (alpha is rescaled, see the module docstring). Rank 0 is not a
        LoRA: drop the branch instead (`rewrite.graph_edit.unwire` + `drop_adapter`).
        """
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}; rank 0 drops the branch (unwire + drop_adapter)")
        old = self.rank
        keep_idx = kept_components(keep, old, rank)
        if keep is None and rank == old:
            return
        scale = self.scaling
        a_mat, b_mat = (t.detach() for t in self._matrices())
        if keep is None and rank < old and not self.lora_A.is_meta and bool(a_mat.any()) and bool(b_mat.any()):
            a_mat, b_mat = orthogonal_factors(a_mat, b_mat)  # min(r, fan_in, d_out) components, best first
            keep_idx = keep_idx[:a_mat.shape[1]]
        kept_a, kept_b = a_mat[:, keep_idx], b_mat[keep_idx, :]
        grads = (self.lora_A.requires_grad, self.lora_B.requires_grad)
        factory = dict(dtype=self.lora_A.dtype, device=self.lora_A.device)
        if self.op == "conv2d":
            self.lora_A = nn.Parameter(torch.empty(rank, *self.lora_A.shape[1:], **factory))
            self.lora_B = nn.Parameter(torch.empty(self.lora_B.shape[0], rank, 1, 1, **factory))
        else:
            self.lora_A = nn.Parameter(torch.empty(self.lora_A.shape[0], rank, **factory))
            self.lora_B = nn.Parameter(torch.empty(rank, self.lora_B.shape[1], **factory))
        self.rank = rank
        self.alpha = alpha_for_scale(scale, rank, self.rslora)
        if not self.lora_A.is_meta:
            self.reset_parameters(self.init)  # zero-delta everywhere, then the kept components go back in
            new_a, new_b = self._matrices()
            new_a[:, :len(keep_idx)] = kept_a.to(new_a.dtype)
            new_b[:len(keep_idx), :] = kept_b.to(new_b.dtype)
        self.lora_A.requires_grad_(grads[0])
        self.lora_B.requires_grad_(grads[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch(x if self.op == "embedding" else self.dropout(x))  # PEFT drops no token ids

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """s * B(A(x)) of an input already through dropout."""
        if self.op == "embedding":
            return (F.embedding(x, self.lora_A) * self.scaling) @ self.lora_B
        if self.op == "conv2d":
            hidden = F.conv2d(x, self.lora_A, None, self.conv["stride"], self.conv["padding"], self.conv["dilation"])
            return F.conv2d(hidden * self.scaling, self.lora_B)
        return (x @ self.lora_A * self.scaling) @ self.lora_B  # s on the [N, r] hidden, not [N, d_out]

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The change of the base weight, in the base weight's own layout."""
        if self.op == "linear":
            return (self.lora_A @ self.lora_B).T * self.scaling
        if self.op == "conv2d":
            mat = self.lora_B.flatten(1) @ self.lora_A.flatten(1)
            return mat.view(self.d_out, *self.lora_A.shape[1:]) * self.scaling
        return self.lora_A @ self.lora_B * self.scaling

    @torch.no_grad()
    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None = None, sign: float = 1.0) -> None:
        """weight += sign * delta, in place, without materialising the delta where a fused GEMM can do it."""
        if weight.is_meta:  # nothing to compute; shapes agree by construction
            return
        a, b = self.lora_A.to(weight.dtype), self.lora_B.to(weight.dtype)
        alpha = sign * self.scaling
        if self.op == "linear":
            weight.addmm_(b.T, a.T, alpha=alpha)
        elif self.op in ("conv1d", "embedding"):
            weight.addmm_(a, b, alpha=alpha)
        else:
            weight.add_(self.delta_weight().to(weight.dtype), alpha=sign)

    @torch.no_grad()
    def converted_form(self) -> LoRA:
        """A PiSSA / OLoRA adapter as the plain LoRA of the same delta against the original weight: rank r + r0,
        A' = [A | A0], B' = [B; -B0], the same s (which a resize keeps)."""
        if self.init not in WEIGHT_INITS:
            return self
        rank = self.rank + self.init_lora_A.shape[1]
        plain = LoRA(self.op, self.d_in, self.d_out, rank, alpha_for_scale(self.scaling, rank, self.rslora),
                     rslora=self.rslora, dropout=getattr(self.dropout, "p", 0.0), dtype=self.lora_A.dtype,
                     device="meta")  # meta: no init drawn, the factors are set below
        plain.lora_A = nn.Parameter(torch.cat([self.lora_A, self.init_lora_A], dim=1))
        plain.lora_B = nn.Parameter(torch.cat([self.lora_B, -self.init_lora_B], dim=0))
        return plain

    @classmethod
    def peft_config(cls, modules) -> dict:
        config = lora_config({o: LoraSettings(m.op, m.rank, m.alpha, m.rslora, getattr(m.dropout, "p", 0.0))
                              for o, m in modules.items()})
        return {**config, "init_lora_weights": _saved_init(modules)}

    @classmethod
    def peft_module(cls, adapter, module: str) -> tuple[type[LoRA], dict]:
        return cls, dict(rank=rank_of(adapter, module), alpha=alpha_of(adapter, module),
                         rslora=adapter.config.use_rslora)

    def adapter_file_entry(self) -> tuple[SiteInfo, dict[str, torch.Tensor]]:
        if self.init in WEIGHT_INITS:
            raise NotSupported(f"our adapter file has no residual base weight for init = {self.init!r} adapters; "
                               "save with convert_to_lora = true (a plain LoRA against the original weight), or as "
                               "PEFT")
        info = SiteInfo(op=self.op, rank=self.rank, alpha=self.alpha, rslora=self.rslora, d_in=self.d_in,
                        d_out=self.d_out)
        return info, {"lora_A": self.lora_A.detach(), "lora_B": self.lora_B.detach()}

    def adapter_file_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"lora_A": tuple(self.lora_A.shape), "lora_B": tuple(self.lora_B.shape)}

    @torch.no_grad()
    def load_adapter_file_entry(self, tensors) -> None:
        self.lora_A.copy_(tensors["lora_A"].to(self.lora_A.dtype))
        self.lora_B.copy_(tensors["lora_B"].to(self.lora_B.dtype))

    def manifest_entry(self) -> dict:
        return dict(op=self.op, rank=self.rank, alpha=self.alpha, rslora=self.rslora, scaling=self.scaling)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        if self.op == "conv2d":
            return dict(zip(LINEAR_KEYS, (self.lora_A, self.lora_B)))
        return dict(zip(lora_keys(self.op), (self.lora_A.T, self.lora_B.T)))

    def extra_repr(self) -> str:
        return f"op={self.op}, d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}, scaling={self.scaling:g}"


def _saved_init(modules) -> bool | str:
    """PEFT's `init_lora_weights` for these modules of one adapter: true, or the one weight init they all share, at
    the rank of their insert (PEFT recomputes the residual from the original weight at the saved rank)."""
    inits = {m.init if m.init in WEIGHT_INITS else True for m in modules.values()}
    if len(inits) > 1:
        raise NotSupported(f"the adapter mixes inits {sorted(map(str, inits))}; a PEFT directory has one "
                           "init_lora_weights: save with convert_to_lora = true")
    resized = [o for o, m in modules.items() if m.init in WEIGHT_INITS and m.rank != m.init_lora_A.shape[1]]
    if resized:
        module = modules[resized[0]]
        raise NotSupported(f"{resized[0]}: this {module.init} adapter was resized (rank {module.init_lora_A.shape[1]} "
                           f"-> {module.rank}) since its insert, but PEFT recomputes the residual at the saved rank; "
                           "save with convert_to_lora = true")
    return inits.pop()


def pissa_factors(weight: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A0 [d_in, r], B0 [r, d_out] with scale (A0 B0)^T = U_r S_r V_r^T, the top-r SVD part of `weight` [d_out, d_in]."""
    u, singular, vh = torch.linalg.svd(weight, full_matrices=False)
    root = (singular[:rank] / scale).sqrt()
    return vh[:rank].T * root, root[:, None] * u[:, :rank].T


def olora_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A0 = R_r^T [d_in, r], B0 = Q_r^T [r, d_out] of the thin QR `weight` [d_out, d_in] = Q R."""
    q, r = torch.linalg.qr(weight)
    return r[:rank].T, q[:, :rank].T


def kept_components(keep: Sequence[int] | torch.Tensor | None, old: int, rank: int) -> list[int]:
    """`resize`'s `keep` as component indices, checked: a list or a bool mask over the current rank `old`, at most
    `rank` distinct components; None keeps the first min(rank, old)."""
    if keep is None:
        return list(range(min(rank, old)))
    keep_t = torch.as_tensor(keep)
    if keep_t.dtype == torch.bool:
        if keep_t.numel() != old:
            raise ValueError(f"keep mask has {keep_t.numel()} entries for rank {old}")
        keep_t = keep_t.nonzero().flatten()
    keep_idx = [int(i) for i in keep_t.flatten().tolist()]
    if len(keep_idx) > rank or len(set(keep_idx)) != len(keep_idx) or any(not 0 <= i < old for i in keep_idx):
        raise ValueError(f"keep must list at most {rank} distinct components in [0, {old}), got {keep_idx}")
    return keep_idx


def orthogonal_factors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact re-factorisation a @ b = a2 @ b2 with orthogonal components sorted by singular value.

    a = Qa Ra, b^T = Qb Rb, Ra Rb^T = U S V^T  =>  a @ b = (Qa U sqrt(S)) (sqrt(S) V^T Qb^T).
    """
    work = torch.float64
    qa, ra = torch.linalg.qr(a.to(work))
    qb, rb = torch.linalg.qr(b.T.to(work))
    u, s, vh = torch.linalg.svd(ra @ rb.T, full_matrices=False)
    root = s.sqrt()
    return (qa @ u * root).to(a.dtype), (root[:, None] * (vh @ qb.T)).to(b.dtype)
