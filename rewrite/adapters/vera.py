"""VeRA: vector-based random matrix adaptation (Kopiczko et al. 2024), as PEFT's `VeraConfig` builds it.

    y = base(x) + lambda_b (.) (B_s (lambda_d (.) (A_s dropout(x))))        no scale

A [r, max d_in] and B [max d_out, r] are frozen random matrices SHARED by every site of one adapter; a site with
d_in inputs and d_out outputs uses the slices A_s = A[:, :d_in] and B_s = B[:d_out, :]. Trained, per site:
lambda_d [r] and lambda_b [d_out].

Init (PEFT's): A, then B, drawn kaiming-uniform (bound sqrt(6 / fan_in); fan_in = max d_in for A, r for B) from one
CPU generator seeded with `projection_prng_key`, sized for the largest d_in and d_out among the adapter's sites;
lambda_d = `d_initial` (0.1), lambda_b = 0, so the branch starts as the identity.
Stored once: one `VeraProjection` (buffers in matmul layout: `vera_A` = A^T [max d_in, r], `vera_B` = B^T
[r, max d_out]) is the `projection` child of every site's module, one tensor aliased like tied weights. A module is
built without it; `share`, called by insert and load once all the adapter's modules exist, draws or loads it.

Merge (exact, additive):   linear  W += lambda_b (.) B_s (lambda_d (.) A_s)    Conv1D  Wc += its transpose
Unmerge subtracts the same delta. Low-rank: delta(x) = x A' B' with A' = (lambda_d (.) A_s)^T [d_in, r] and
B' = (lambda_b (.) B_s)^T [r, d_out] (`factors()`, per-site materialisations the unmerged exports switch like LoRA).
The rank is the shared projection's: it cannot change per site (not resizable).
PEFT ("VERA"): per site `base_model.model.<module>.vera_lambda_b` [d_out] and `.vera_lambda_d` [r]; once per adapter
`base_model.vera_A` [r, max d_in] and `base_model.vera_B` [max d_out, r] (`save_projection = true`; a directory saved
without them gets them drawn again from `projection_prng_key`, exactly as PEFT does).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal

import torch
from pydantic import Field, StrictBool, StrictInt, StrictStr
from torch import nn

from rewrite.adapters.base import AdapterKind, NotSupported
from rewrite.errors import AdapterFileError
from rewrite.formats.peft_dir import CONFIG, WEIGHTS, PeftAdapter, PeftConfig, PeftFormat
from rewrite.formats.peft_lora import Number, Rank
from rewrite.options import Strict

LAMBDAS = ("vera_lambda_b", "vera_lambda_d")
PROJECTIONS = ("vera_A", "vera_B")
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes 64-bit seeds


class VeraOptions(Strict):
    d_initial: float = 0.1
    projection_prng_key: int = Field(default=0, ge=0, lt=SEED_LIMIT)


class VeraPeftConfig(PeftConfig):
    """`adapter_config.json` of a VeRA adapter. `vera_dropout`, `fan_in_fan_out` (PEFT sets it from the layer) and
    `init_weights` change nothing in a trained adapter; trained base biases (`bias` other than "none") are refused."""

    expected: ClassVar[dict[str, str]] = {
        **PeftConfig.expected, "r": "a whole number >= 1", "projection_prng_key": "a whole number >= 0",
        "save_projection": "true or false", "d_initial": "a number",
        "bias": "\"none\" (trained base biases are not adapter tensors)"}

    peft_type: StrictStr = "VERA"
    r: Rank = 256
    projection_prng_key: StrictInt = Field(default=0, ge=0, lt=SEED_LIMIT)
    save_projection: StrictBool = True
    d_initial: Number = 0.1
    bias: Literal["none"] = "none"



def _check_projections(adapter: PeftAdapter) -> None:
    """`save_projection` says whether the directory holds the projections; when it does, both, of rank `r`."""
    config: VeraPeftConfig = adapter.config  # type: ignore[assignment]
    weights_file, held = adapter.path / WEIGHTS, sorted(adapter.shared)
    if config.save_projection and held != sorted(PROJECTIONS):
        raise AdapterFileError(f"{weights_file}: {CONFIG} says 'save_projection' = true, but the file holds "
                               f"{held or 'no'} projections; expected base_model.vera_A and base_model.vera_B")
    if not config.save_projection and held:
        raise AdapterFileError(f"{weights_file}: {CONFIG} says 'save_projection' = false, but the file holds "
                               f"{held}; the config and the file disagree")
    a, b = (adapter.shared.get(name) for name in PROJECTIONS)
    if a is not None and (a.ndim != 2 or b.ndim != 2 or a.shape[0] != config.r or b.shape[1] != config.r):
        raise AdapterFileError(f"{weights_file}: base_model.vera_A has shape {a.shape} and base_model.vera_B "
                               f"{b.shape}; expected [r, d_in] and [d_out, r] with 'r' = {config.r}")


VERA_FORMAT = PeftFormat("VERA", VeraPeftConfig, (LAMBDAS,), check=_check_projections, shared=PROJECTIONS)


class VeraProjection(nn.Module):
    """The frozen pair one VeRA adapter shares across its sites, in matmul layout: A^T [d_in, r], B^T [r, d_out]."""

    def __init__(self, vera_A: torch.Tensor, vera_B: torch.Tensor):
        super().__init__()
        self.register_buffer("vera_A", vera_A)
        self.register_buffer("vera_B", vera_B)

    @classmethod
    def drawn(cls, key: int, rank: int, d_in: int, d_out: int, dtype: torch.dtype,
              device: torch.device) -> VeraProjection:
        """PEFT's draw: A [r, d_in], then B [d_out, r], kaiming-uniform (ReLU gain) from one CPU generator."""
        if device.type == "meta":
            return cls(torch.empty(d_in, rank, dtype=dtype, device=device),
                       torch.empty(rank, d_out, dtype=dtype, device=device))
        generator = torch.Generator().manual_seed(key)
        a, b = (nn.init.kaiming_uniform_(torch.empty(shape), nonlinearity="relu", generator=generator)
                for shape in ((rank, d_in), (d_out, rank)))
        return cls.from_peft(a, b, dtype, device)

    @classmethod
    def from_peft(cls, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, device: torch.device) -> VeraProjection:
        """From PEFT's layout, A [r, d_in] and B [d_out, r]."""
        return cls(a.T.to(dtype=dtype, device=device).contiguous(), b.T.to(dtype=dtype, device=device).contiguous())

    def peft_view(self) -> dict[str, torch.Tensor]:
        return {"vera_A": self.vera_A.T, "vera_B": self.vera_B.T}

    def fits(self, rank: int, d_in: int, d_out: int) -> bool:
        return self.vera_A.shape[1] == rank and self.vera_A.shape[0] >= d_in and self.vera_B.shape[1] >= d_out

    def equals(self, other: VeraProjection) -> bool:
        return all(torch.equal(mine, theirs) for mine, theirs in zip(self.buffers(), other.buffers()))

    def extra_repr(self) -> str:
        return f"d_in={self.vera_A.shape[0]}, rank={self.vera_A.shape[1]}, d_out={self.vera_B.shape[1]}"


class VeRA(AdapterKind):
    kind = "vera"
    ops = ("linear", "conv1d")
    settings = ("rank", "dropout")
    Options = VeraOptions
    inits = ("zeros",)  # lambda_b = 0
    mergeable = True
    low_rank = True
    peft_format = VERA_FORMAT
    projection: VeraProjection | None

    def __init__(self, op: str, d_in: int, d_out: int, rank: int, alpha: float = 0.0, *, rslora: bool = False,
                 dropout: float = 0.0, init: str = "zeros", conv: dict | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", d_initial: float = 0.1,
                 projection_prng_key: int = 0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"VeRA rank must be >= 1, got {rank}")
        self.op, self.d_in, self.d_out, self.rank = op, d_in, d_out, rank
        self.d_initial, self.projection_prng_key = d_initial, projection_prng_key
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.vera_lambda_b = nn.Parameter(torch.zeros(d_out, dtype=dtype, device=device))
        self.vera_lambda_d = nn.Parameter(torch.full((rank,), d_initial, dtype=dtype, device=device))
        self.projection = None  # the adapter's shared pair, set by `share`

    def _slices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A_s^T [d_in, r] and B_s^T [r, d_out]: views of the shared projection."""
        return self.projection.vera_A[: self.d_in], self.projection.vera_B[:, : self.d_out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self._slices()
        return (self.dropout(x) @ a * self.vera_lambda_d) @ b * self.vera_lambda_b

    @torch.no_grad()
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self._slices()
        return a * self.vera_lambda_d, b * self.vera_lambda_b

    @torch.no_grad()
    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None, sign: float = 1.0) -> None:
        if weight.is_meta:
            return
        a, b = (t.to(weight.dtype) for t in self.factors())
        if self.op == "linear":
            weight.addmm_(b.T, a.T, alpha=sign)
        else:
            weight.addmm_(a, b, alpha=sign)

    def resize(self, rank: int, keep: Sequence[int] | torch.Tensor | None = None) -> None:
        raise NotSupported(f"vera adapters share one frozen projection of rank {self.rank} across their sites; their "
                           "rank cannot change per site (insert the adapter again with another rank)")

    @classmethod
    def share(cls, modules: Mapping[str, AdapterKind], tensors: Mapping[str, torch.Tensor]) -> bool:
        """One projection for all `modules` (see `_projection_for`); every module needs the same rank and key."""
        if not modules:
            return False
        projection = _projection_for(list(modules.values()), tensors)
        changed = any(m.projection is not projection for m in modules.values())
        for module in modules.values():
            module.projection = projection
        return changed

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"vera_lambda_b": self.vera_lambda_b, "vera_lambda_d": self.vera_lambda_d}

    @classmethod
    def peft_shared_state(cls, modules) -> dict[str, torch.Tensor]:
        projection = next(iter(modules.values())).projection
        return {key: t.detach().contiguous() for key, t in projection.peft_view().items()}

    @classmethod
    def peft_module(cls, adapter, module: str) -> tuple[type[VeRA], dict]:
        config: VeraPeftConfig = adapter.config
        return cls, dict(rank=config.r, projection_prng_key=config.projection_prng_key)

    @classmethod
    def peft_config(cls, modules) -> dict:
        first = next(iter(modules.values()))
        config = VeraPeftConfig(
            peft_type="VERA", task_type=None, base_model_name_or_path=None, inference_mode=True, r=first.rank,
            target_modules=sorted(modules), projection_prng_key=first.projection_prng_key, save_projection=True,
            vera_dropout=max(getattr(m.dropout, "p", 0.0) for m in modules.values()), d_initial=first.d_initial,
            fan_in_fan_out=first.op == "conv1d", bias="none", init_weights=True, modules_to_save=None, revision=None)
        return config.model_dump(mode="json", exclude_unset=True)

    def manifest_entry(self) -> dict:
        return dict(op=self.op, rank=self.rank)

    def extra_repr(self) -> str:
        return f"op={self.op}, d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}"


def _projection_for(modules: list[VeRA], tensors: Mapping[str, torch.Tensor]) -> VeraProjection:
    """The directory's pair (`tensors`), else the one the modules already hold, else one drawn from the key for
    the largest site; checked against the sites before anything changes."""
    settings = sorted({(m.rank, m.projection_prng_key) for m in modules})
    if len(settings) > 1:
        raise NotSupported(f"a vera adapter shares one projection across its sites, so all need one rank and "
                           f"projection_prng_key; got (rank, key) {settings}")
    (rank, key), lambdas = settings[0], modules[0].vera_lambda_b
    d_in, d_out = max(m.d_in for m in modules), max(m.d_out for m in modules)
    held = list({id(m.projection): m.projection for m in modules if m.projection is not None}.values())
    if tensors:
        loaded = VeraProjection.from_peft(tensors["vera_A"], tensors["vera_B"], lambdas.dtype, lambdas.device)
        if loaded.vera_A.shape != (d_in, rank) or loaded.vera_B.shape != (rank, d_out):
            raise NotSupported(f"the vera projections have shapes vera_A {tuple(tensors['vera_A'].shape)} and vera_B "
                               f"{tuple(tensors['vera_B'].shape)}; PEFT builds them for the largest site: "
                               f"[{rank}, {d_in}] and [{d_out}, {rank}]")
        return held[0] if len(held) == 1 and held[0].equals(loaded) else loaded
    if not held:
        return VeraProjection.drawn(key, rank, d_in, d_out, lambdas.dtype, lambdas.device)
    if len(held) > 1 or not held[0].fits(rank, d_in, d_out):
        raise NotSupported(f"the adapter's shared projection ({held[0].extra_repr()}) was drawn for the sites it was "
                           f"made on; these need d_in={d_in}, d_out={d_out}: insert all its sites in one entry (or the "
                           "largest first)")
    return held[0]
