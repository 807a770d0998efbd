"""OFT: orthogonal finetuning (Qiu et al. 2023) as PEFT 0.21's `OFTConfig` builds it: a block-diagonal R rotates
the layer's input.

    y' = base(x R) = W R^T x + b          R = blockdiag(R_1 .. R_nb) [d_in, d_in],  R_j [b, b],  nb = d_in / b

(x a row vector: each block of b input features is multiplied by its R_j). Each R_j comes from a skew-symmetric
Q_j = U - U^T, U strictly upper triangular; its b(b-1)/2 entries (row-major, `torch.triu_indices` order) are the
parameters `oft_R` [nb, b(b-1)/2] ([1, b(b-1)/2], one Q for every block, with `block_share`):
    use_cayley_neumann = true (PEFT's default)   R = I + 2Q + 2Q^2 + ... + 2Q^(p-1) + Q^p,  p = max(t - 1, 3)
        t = num_cayley_neumann_terms (default 5: I + 2Q + 2Q^2 + 2Q^3 + Q^4; t = 2: I + 2Q; t = 1: I), a truncated
        series of (I + Q)(I - Q)^-1, so only approximately orthogonal
    use_cayley_neumann = false                   R = (I - Q)(I + Q)^-1 (exact Cayley, orthogonal)
Init Q = 0: R = I, the identity. Join "input": the module maps x to x R before the base op; the bias is untouched.
Merge (linear W [d_out, d_in]):  W <- W R^T.  Unmerge: W <- W (R^T)^-1, solved per block in float64 (the series R is
not exactly orthogonal, so R^T is not its inverse).
PEFT: key `base_model.model.<module>.oft_R.weight` = `oft_R`; config `oft_block_size` (or `r` = nb), `block_share`,
`use_cayley_neumann`, `num_cayley_neumann_terms`. PEFT 0.21 builds `module_dropout` but never applies it: it changes
nothing there and nothing here. Refused: `coft` (constrained OFT), a `bias` other than "none", OFT of PEFT < 0.14 (no
`oft_block_size`) and Cayley-Neumann OFT of PEFT < 0.18 (another series). Linear sites (PEFT's Conv2d and Embedding
OFT are not implemented).
Unmerged (`rowwise`, join "input"): the trained R is a constant, stored as the row vector q = flatten(R_1 - I .. R_nb - I)
[nb b b] (identity 0, so a row without the adapter keeps x) with layout block_size, and applied as
    x' = x + blocks(x) @ Q        (`rotate_blocks`: per row, blocks(x) [nb, tokens, b] @ Q [nb, b, b], a batched MatMul;
                                   per run (ort-adapters), the same sums as products of q with a spread x)
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, StrictBool, StrictInt, StrictStr
from torch import nn

from rewrite.adapters.base import AdapterKind, NotSupported
from rewrite.errors import AdapterFileError
from rewrite.formats.peft_dir import CONFIG, WEIGHTS, PeftAdapter, PeftConfig, PeftFormat
from rewrite.options import Strict

PEFT_VERSION = "0.21.2"  # the PEFT release whose conventions these kinds implement (written into saved configs)
NEUMANN_SINCE = (0, 18)  # PEFT changed the Cayley-Neumann series in 0.18.0
OFT_KEY = "oft_R.weight"
BLOCKS = "block size or one block count"


class OrthogonalPeftConfig(PeftConfig):
    """The fields PEFT's OFT and BOFT configs share that this reads: trained biases are refused."""

    expected: ClassVar[dict[str, str]] = {**PeftConfig.expected, "bias": '"none" (trained biases are not supported)',
                                          "init_weights": "true or false", "fan_in_fan_out": "true or false"}

    bias: Literal["none"] = "none"
    init_weights: StrictBool = True  # how PEFT starts training; the saved tensors are what counts
    fan_in_fan_out: StrictBool = False  # PEFT resets it on Linear layers, the only ones read here


class OFTPeftConfig(OrthogonalPeftConfig):
    expected: ClassVar[dict[str, str]] = {
        **OrthogonalPeftConfig.expected, "r": "a whole number >= 0", "oft_block_size": "a whole number >= 0",
        "block_share": "true or false", "coft": "true or false", "use_cayley_neumann": "true or false",
        "num_cayley_neumann_terms": "a whole number >= 1", "module_dropout": "a number in [0, 1)",
        "peft_version": "a version string"}
    unsupported: ClassVar[dict[str, str]] = {**PeftConfig.unsupported,
                                             "coft": "coft (constrained OFT, which projects Q at every forward)"}

    peft_type: StrictStr = "OFT"
    r: StrictInt = Field(default=0, ge=0)
    oft_block_size: StrictInt | None = Field(default=None, ge=0)
    block_share: StrictBool = False
    coft: StrictBool = False
    use_cayley_neumann: StrictBool = True
    num_cayley_neumann_terms: StrictInt = Field(default=5, ge=1)
    module_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    peft_version: StrictStr | None = None


def triangle_side(elements: int) -> int | None:
    """b with b(b-1)/2 = elements, or None."""
    side = (1 + math.isqrt(1 + 8 * elements)) // 2
    return side if side * (side - 1) // 2 == elements else None


def _check_oft(adapter: PeftAdapter) -> None:
    config, where = adapter.config, adapter.path / CONFIG
    if config.oft_block_size is None:
        raise AdapterFileError(f"{where}: no 'oft_block_size': an OFT adapter of PEFT < 0.14 (another "
                               "parameterisation) is not supported")
    if (config.r == 0) == (config.oft_block_size == 0):
        raise AdapterFileError(f"{where}: 'r' = {config.r} and 'oft_block_size' = {config.oft_block_size}; PEFT "
                               "sets exactly one of them")
    if config.use_cayley_neumann and _release(config.peft_version) < NEUMANN_SINCE:
        raise AdapterFileError(f"{where}: 'peft_version' = {config.peft_version!r} with use_cayley_neumann = true: "
                               "PEFT before 0.18 used another Cayley-Neumann series, which is not supported (retrain "
                               "with PEFT >= 0.18)")
    for module, parts in adapter.modules.items():
        shape = parts[OFT_KEY].shape
        if len(shape) != 2 or triangle_side(shape[1]) is None:
            raise AdapterFileError(f"{adapter.path / WEIGHTS}: module {module!r}: {OFT_KEY} has shape {shape}; "
                                   "expected [blocks, b(b-1)/2]")


def _release(version: str | None) -> tuple[int, int]:
    found = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


OFT_FORMAT = PeftFormat("OFT", OFTPeftConfig, ((OFT_KEY,),), check=_check_oft)


def shared_setting(modules: Mapping[str, AdapterKind], name: str, what: str | None = None) -> Any:
    """The one value of setting `name` (described as `what`) that one PEFT config gives every module."""
    values = {getattr(m, name) for m in modules.values()}
    if len(values) > 1:
        kind = next(iter(modules.values())).kind
        raise NotSupported(f"one PEFT {kind.upper()} config gives all its modules one {what or name}; this adapter "
                           f"has {name} {sorted(values)}: save the sites of each value as their own adapter")
    return values.pop()


def check_blocks(kind: str, d_in: int, tile: int, what: str) -> None:
    """Blocks must tile the input, `tile` (= `what`) features at a time."""
    if d_in % tile:
        raise NotSupported(f"{kind}: {what} does not divide this site's input size {d_in}; choose a block size "
                           "that divides the input size of every site it targets")


def neumann_cayley(q: torch.Tensor, terms: int) -> torch.Tensor:
    """PEFT's Cayley-Neumann series (module docstring) of a batch of skew-symmetric q [n, b, b]."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)
    if terms == 1:
        return eye.clone()
    rotation = eye + 2 * q
    if terms == 2:
        return rotation
    power = q
    for _ in range(2, max(terms - 1, 3)):
        power = power @ q
        rotation = rotation + 2 * power
    return rotation + power @ q


def rotate_blocks(t: torch.Tensor, q: torch.Tensor, block_size: int) -> torch.Tensor:
    """t + blocks(t) @ Q, Q [nb, b, b] flattened into q: q [rows or 1, 1, nb b b] against t [rows, tokens, d] (one
    batched MatMul), or one q [nb b b] against t [..., d] (ort-adapters: q must stay the graph input an adapter file
    feeds, and the exporter folds any op on it alone into a new initializer, so it only multiplies t spread to
    [..., nb, b, b], t[j, k] at (j, k, c))"""
    blocks = t.unflatten(-1, (t.shape[-1] // block_size, block_size))
    if q.dim() == 1:
        spread = blocks.unsqueeze(-1).expand(*[-1] * blocks.dim(), block_size).flatten(-3)
        return t + (spread * q).unflatten(-1, blocks.shape[-2:] + (block_size,)).sum(-2).flatten(-2)
    q = q[:, 0].unflatten(-1, blocks.shape[-2:] + (block_size,))
    return t + (blocks.transpose(1, 2) @ q).transpose(1, 2).flatten(-2)


def exact_cayley(q: torch.Tensor) -> torch.Tensor:
    """(I - q)(I + q)^-1 for a batch of skew-symmetric q [n, b, b]."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)
    return torch.linalg.solve(eye + q, eye - q, left=False)


class OFTOptions(Strict):
    block_size: int = Field(default=32, ge=1)
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = Field(default=5, ge=1)


class OFT(AdapterKind):
    kind = "oft"
    ops = ("linear",)
    join = "input"
    settings = ()
    Options = OFTOptions
    inits = ("zeros",)
    mergeable = True
    rowwise = True
    peft_format = OFT_FORMAT

    def __init__(self, op: str, d_in: int, d_out: int, rank: int = 0, alpha: float = 0.0, *, rslora: bool = False,
                 dropout: float = 0.0, init: str = "zeros", conv: dict | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", **options):
        super().__init__()
        o = self.Options(**options)
        check_blocks(self.kind, d_in, o.block_size, f"block_size = {o.block_size}")
        self.op, self.d_in, self.d_out = op, d_in, d_out
        self.block_size, self.block_share = o.block_size, o.block_share
        self.use_cayley_neumann, self.num_cayley_neumann_terms = o.use_cayley_neumann, o.num_cayley_neumann_terms
        self.blocks = d_in // o.block_size
        elements = o.block_size * (o.block_size - 1) // 2
        self.oft_R = nn.Parameter(torch.zeros(1 if o.block_share else self.blocks, elements, dtype=dtype,
                                              device=device))
        rows, cols = torch.triu_indices(o.block_size, o.block_size, 1, device=device)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def rotations(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """R_1 .. R_nb [nb, b, b], computed in `dtype` (default: the parameter's)."""
        params = self.oft_R if dtype is None else self.oft_R.to(dtype)
        upper = params.new_zeros(params.shape[0], self.block_size, self.block_size)
        upper[:, self.rows, self.cols] = params
        q = upper - upper.transpose(-1, -2)
        rotation = neumann_cayley(q, self.num_cayley_neumann_terms) if self.use_cayley_neumann else exact_cayley(q)
        return rotation.expand(self.blocks, -1, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = x.reshape(*x.shape[:-1], self.blocks, self.block_size)
        rotated = torch.einsum("...rk,rkc->...rc", blocks, self.rotations().to(x.dtype))
        return rotated.reshape(x.shape)

    @torch.no_grad()
    def row_params(self) -> dict[str, tuple[torch.Tensor, float]]:
        eye = torch.eye(self.block_size, dtype=torch.float64, device=self.oft_R.device)
        return {"q": ((self.rotations(torch.float64) - eye).flatten().to(self.oft_R.dtype), 0.0)}

    def row_layout(self) -> dict:
        return {"block_size": self.block_size}

    @classmethod
    def apply_rows(cls, t: torch.Tensor, params, *, block_size: int) -> torch.Tensor:
        """x' = x + blocks(x) @ (R - I)"""
        return rotate_blocks(t, params["q"], block_size)

    @torch.no_grad()
    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None, sign: float = 1.0) -> None:
        """W <- W R^T (sign > 0) or W <- W (R^T)^-1 (sign < 0), per block, in float64."""
        if weight.is_meta:
            return
        transposed = self.rotations(torch.float64).transpose(-1, -2)
        blocks = weight.to(torch.float64).view(self.d_out, self.blocks, self.block_size).transpose(0, 1)
        if sign > 0:
            blocks = blocks @ transposed
        else:
            blocks = torch.linalg.solve(transposed, blocks, left=False)
        weight.copy_(blocks.transpose(0, 1).reshape(weight.shape))

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {OFT_KEY: self.oft_R}

    @classmethod
    def peft_module(cls, adapter, module: str) -> tuple[type[OFT], dict]:
        config = adapter.config
        return cls, dict(block_size=triangle_side(adapter.modules[module][OFT_KEY].shape[1]),
                         block_share=config.block_share, use_cayley_neumann=config.use_cayley_neumann,
                         num_cayley_neumann_terms=config.num_cayley_neumann_terms)

    @classmethod
    def peft_config(cls, modules) -> dict:
        sizes = {m.block_size for m in modules.values()}
        r, block_size = (0, sizes.pop()) if len(sizes) == 1 else (shared_setting(modules, "blocks", BLOCKS), 0)
        return {"peft_type": "OFT", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
                "peft_version": PEFT_VERSION, "target_modules": sorted(modules), "r": r, "oft_block_size": block_size,
                "block_share": shared_setting(modules, "block_share"),
                "use_cayley_neumann": shared_setting(modules, "use_cayley_neumann"),
                "num_cayley_neumann_terms": shared_setting(modules, "num_cayley_neumann_terms"),
                "coft": False, "eps": 6e-5, "module_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
                "init_weights": True, "modules_to_save": None, "revision": None}

    def extra_repr(self) -> str:
        return f"op={self.op}, blocks={self.blocks}x{self.block_size}, shared={self.block_share}"
