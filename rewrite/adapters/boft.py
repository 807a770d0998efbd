"""BOFT: butterfly orthogonal finetuning (Liu et al. 2024) as PEFT 0.21's `BOFTConfig` builds it: a product of m
sparse orthogonal factors rotates the layer's input, and a vector s scales its output (not the bias).

    y' = s (.) (W M^T x) + b          M = F_(m-1) ... F_1 F_0 [d_in, d_in],   F_i = P_i blockdiag(R_i1 .. R_ind) P_i^T
    W' = diag(s) W M^T                (x a row vector: the base op sees x M)

m = n_butterfly_factor, nd = d_in / b blocks of size b = block_size per factor. R_ij = (I - K)(I + K)^-1 (exact Cayley,
orthogonal) of K = (Q_ij - Q_ij^T) / 2; the parameters are the full Q `boft_R` [m, nd, b, b] and s `boft_s`
[d_out, 1]. P_i is the butterfly permutation (P[k, p_i[k]] = 1): p_0 is the identity; for i >= 1 the input is cut
into groups of b 2^i features, each group into runs of b/2, and each group lists its even runs, then its odd ones.
Init Q = 0, s = 1: M = I, the identity. The module reads the site weight W ("add" join, `reads_weight`):
    delta(x, W) = x (W' - W)^T          so y + delta = x W'^T + b
Merge (linear W [d_out, d_in], in float64): W <- diag(s) W M^T, the bias unchanged; unmerge W <- diag(1/s) W M
(M orthogonal; s must have no zeros). Training (`dropout` = PEFT's boft_dropout): each forward picks one factor at
random and replaces int(p nd) random blocks of it by I.
PEFT: keys `base_model.model.<module>.boft_R` [m, nd, b, b] and `.boft_s` [d_out, 1]; config `boft_block_size` (or
`boft_block_num` = nd), `boft_n_butterfly_factor`, `boft_dropout`. m is read from boft_R: PEFT without its CUDA
extension (any CPU) builds and saves one factor whatever the config says, and then cannot load m > 1 itself.
Refused: a `bias` other than "none". Linear sites (PEFT's Conv2d BOFT is not implemented).
Unmerged (`parted`: y' = s (.) (base(x M) - b) + b, m + 1 row modules): the input rotation x -> x M, one module per
butterfly factor (`BoftRotation`, join "input", layout block_size and level i), wired so that factor m-1 meets x first:
    x <- v[..., p_i],  v = rotate_blocks(x[..., p_i^-1], q_i)      q_i = flatten(R_i - I) [nd b b], identity 0
(oft.rotate_blocks: v + blocks(v) @ (R_i - I); level 0 has no permutation), then the output scale (`BoftScale`:
g = s, h = (1 - s) (.) b; output_scale.py).
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, StrictInt, StrictStr
from torch import nn

from rewrite.adapters.base import AdapterKind, NotSupported
from rewrite.adapters.oft import (BLOCKS, PEFT_VERSION, OrthogonalPeftConfig, check_blocks, exact_cayley,
                                 rotate_blocks, shared_setting)
from rewrite.adapters.output_scale import OutputScale
from rewrite.errors import AdapterFileError
from rewrite.formats.peft_dir import CONFIG, WEIGHTS, PeftAdapter, PeftFormat
from rewrite.options import Strict


class BOFTPeftConfig(OrthogonalPeftConfig):
    expected: ClassVar[dict[str, str]] = {
        **OrthogonalPeftConfig.expected, "boft_block_size": "a whole number >= 0",
        "boft_block_num": "a whole number >= 0", "boft_n_butterfly_factor": "a whole number >= 1",
        "boft_dropout": "a number in [0, 1)"}

    peft_type: StrictStr = "BOFT"
    boft_block_size: StrictInt = Field(default=4, ge=0)
    boft_block_num: StrictInt = Field(default=0, ge=0)
    boft_n_butterfly_factor: StrictInt = Field(default=1, ge=1)
    boft_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


def _check_boft(adapter: PeftAdapter) -> None:
    config = adapter.config
    if (config.boft_block_size == 0) == (config.boft_block_num == 0):
        raise AdapterFileError(f"{adapter.path / CONFIG}: 'boft_block_size' = {config.boft_block_size} and "
                               f"'boft_block_num' = {config.boft_block_num}; PEFT sets exactly one of them")
    for module, parts in adapter.modules.items():
        rotations, scale = parts["boft_R"].shape, parts["boft_s"].shape
        if len(rotations) != 4 or rotations[2] != rotations[3] or len(scale) != 2 or scale[1] != 1:
            raise AdapterFileError(f"{adapter.path / WEIGHTS}: module {module!r}: boft_R {rotations} and boft_s "
                                   f"{scale}; expected [factors, blocks, b, b] and [d_out, 1]")


BOFT_FORMAT = PeftFormat("BOFT", BOFTPeftConfig, (("boft_R", "boft_s"),), check=_check_boft)


def butterfly_permutation(size: int, block_size: int, level: int) -> torch.Tensor:
    """p_level of the module docstring: P[k, p[k]] = 1."""
    if level == 0:
        return torch.arange(size)
    group, run = block_size * 2 ** level, block_size // 2
    runs = torch.arange(group).view(-1, run)
    order = torch.cat([runs[0::2], runs[1::2]]).flatten()
    return (torch.arange(0, size, group)[:, None] + order).flatten()


class BoftScale(OutputScale):
    """BOFT's output part in unmerged exports: g = s (module docstring)."""

    kind = "boft"


class BoftRotation(AdapterKind):
    """One butterfly factor of BOFT's input rotation in unmerged exports (module docstring)."""

    kind = "boft"
    ops = ("linear",)
    join = "input"
    rowwise = True

    def __init__(self, op: str, d_in: int, d_out: int, level: int, q: torch.Tensor):
        """q = R_level - I [nd, b, b]."""
        super().__init__()
        self.op, self.d_in, self.d_out, self.level, self.block_size = op, d_in, d_out, level, q.shape[-1]
        self.register_buffer("q", q.flatten())

    def row_params(self) -> dict[str, tuple[torch.Tensor, float]]:
        return {"q": (self.q, 0.0)}

    def row_layout(self) -> dict:
        return {"block_size": self.block_size, "level": self.level}

    @classmethod
    def apply_rows(cls, t: torch.Tensor, params, *, block_size: int, level: int) -> torch.Tensor:
        """x' = P_i-gather(rotate_blocks(x[..., p_i^-1], q_i))"""
        if level == 0:
            return rotate_blocks(t, params["q"], block_size)
        order = butterfly_permutation(t.shape[-1], block_size, level).to(t.device)
        return rotate_blocks(t[..., order.argsort()], params["q"], block_size)[..., order]


class BOFTOptions(Strict):
    block_size: int = Field(default=4, ge=1)
    n_butterfly_factor: int = Field(default=1, ge=1)


class BOFT(AdapterKind):
    kind = "boft"
    ops = ("linear",)
    reads_weight = True
    settings = ("dropout",)
    Options = BOFTOptions
    inits = ("zeros",)
    mergeable = True
    parted = True
    peft_format = BOFT_FORMAT

    def __init__(self, op: str, d_in: int, d_out: int, rank: int = 0, alpha: float = 0.0, *, rslora: bool = False,
                 dropout: float = 0.0, init: str = "zeros", conv: dict | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 weight: torch.Tensor | None = None, **options):  # `reads_weight` kinds get W; the init needs none
        super().__init__()
        o = self.Options(**options)
        factors = o.n_butterfly_factor
        if factors > 1 and o.block_size % 2:
            raise NotSupported(f"boft: block_size = {o.block_size} with n_butterfly_factor = {factors}; butterfly "
                               "factors swap half blocks, so the block size must be even")
        tile = o.block_size * 2 ** (factors - 1)
        check_blocks(self.kind, d_in, tile, f"block_size * 2^(n_butterfly_factor - 1) = {tile}" if factors > 1 else
                     f"block_size = {o.block_size}")
        self.op, self.d_in, self.d_out, self.dropout = op, d_in, d_out, float(dropout)
        self.block_size, self.n_butterfly_factor, self.blocks = o.block_size, factors, d_in // o.block_size
        self.boft_R = nn.Parameter(torch.zeros(factors, self.blocks, o.block_size, o.block_size, dtype=dtype,
                                               device=device))
        self.boft_s = nn.Parameter(torch.ones(d_out, 1, dtype=dtype, device=device))
        permutations = torch.stack([butterfly_permutation(d_in, o.block_size, i) for i in range(factors)])
        self.register_buffer("permutations", permutations.to(device), persistent=False)
        self.register_buffer("inverses", permutations.argsort(dim=1).to(device), persistent=False)

    def rotations(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """R [m, nd, b, b], computed in `dtype` (default: the parameter's)."""
        q = self.boft_R if dtype is None else self.boft_R.to(dtype)
        flat = q.flatten(0, 1)
        return exact_cayley(0.5 * (flat - flat.transpose(-1, -2))).view(q.shape)

    def _dropped(self, rotations: torch.Tensor) -> torch.Tensor:
        count = int(self.dropout * self.blocks)
        if not self.training or count == 0:
            return rotations
        factor = int(torch.randint(self.n_butterfly_factor, ()))
        blocks = torch.randperm(self.blocks, device=rotations.device)[:count]
        rotations = rotations.clone()
        rotations[factor, blocks] = torch.eye(self.block_size, dtype=rotations.dtype, device=rotations.device)
        return rotations

    def _butterfly(self, rows: torch.Tensor, rotations: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """rows M^T (F_0^T first), or rows M (F_(m-1) first) with `inverse`, for rows [..., d_in]."""
        levels = range(self.n_butterfly_factor)
        for i in (reversed(levels) if inverse else levels):
            blocks = rows[..., self.inverses[i]].unflatten(-1, (self.blocks, self.block_size))
            blocks = torch.einsum("...dk,dkc->...dc" if inverse else "...dk,dck->...dc", blocks, rotations[i])
            rows = blocks.flatten(-2)[..., self.permutations[i]]
        return rows

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        rotations = self._dropped(self.rotations()).to(weight.dtype)
        adapted = self.boft_s.to(weight.dtype) * self._butterfly(weight, rotations)
        return F.linear(x, adapted - weight)

    @torch.no_grad()
    def unmerged_parts(self, weight: torch.Tensor, bias: torch.Tensor | None
                       ) -> tuple[None, list[AdapterKind]]:
        """No factors; the input rotation x M and the output scale s (module docstring)."""
        q = self.rotations(torch.float64) - torch.eye(self.block_size, dtype=torch.float64, device=self.boft_R.device)
        q = q.to(self.boft_R.dtype)
        return None, [*(BoftRotation(self.op, self.d_in, self.d_out, i, q[i])
                        for i in reversed(range(self.n_butterfly_factor))),
                      BoftScale(self.op, self.d_in, self.boft_s.detach()[:, 0], bias)]

    @torch.no_grad()
    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None, sign: float = 1.0) -> None:
        """W <- diag(s) W M^T (sign > 0) or W <- diag(1/s) W M (sign < 0), in float64."""
        if weight.is_meta:
            return
        rotations, scale, rows = self.rotations(torch.float64), self.boft_s.double(), weight.double()
        merged = scale * self._butterfly(rows, rotations) if sign > 0 else self._butterfly(rows / scale, rotations,
                                                                                            inverse=True)
        weight.copy_(merged)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"boft_R": self.boft_R, "boft_s": self.boft_s}  # PEFT's own layouts

    @classmethod
    def peft_module(cls, adapter, module: str) -> tuple[type[BOFT], dict]:
        factors, _, block_size, _ = adapter.modules[module]["boft_R"].shape
        return cls, dict(block_size=int(block_size), n_butterfly_factor=int(factors))

    @classmethod
    def peft_config(cls, modules) -> dict:
        sizes = {m.block_size for m in modules.values()}
        block_size, block_num = (sizes.pop(), 0) if len(sizes) == 1 else (0, shared_setting(modules, "blocks", BLOCKS))
        return {"peft_type": "BOFT", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
                "peft_version": PEFT_VERSION, "target_modules": sorted(modules), "boft_block_size": block_size,
                "boft_block_num": block_num,
                "boft_n_butterfly_factor": shared_setting(modules, "n_butterfly_factor"),
                "boft_dropout": shared_setting(modules, "dropout"), "bias": "none", "fan_in_fan_out": False,
                "init_weights": True, "modules_to_save": None, "revision": None}

    def extra_repr(self) -> str:
        return f"op={self.op}, factors={self.n_butterfly_factor}, blocks={self.blocks}x{self.block_size}"
