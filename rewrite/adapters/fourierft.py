"""FourierFT: a weight update learned as a few coefficients of its 2D Fourier spectrum (Gao et al. 2024), as PEFT's
`FourierFTConfig` builds it.

    y = base(x) + dW x,       dW = scaling * Re(IFFT2(S))      [d_out, d_in] (a Conv1D site adds the same dW)
    S [d_out, d_in] is zero except S[p_j, q_j] = c_j for j < n = n_frequency; c = `fourierft_spectrum` [n]
torch's ifft2 divides by d_out d_in:
    dW[u, v] = scaling / (d_out d_in) * sum_j c_j cos(2 pi (p_j u / d_out + q_j v / d_in)).

Positions, drawn as PEFT draws them (one CPU generator, one call): k = randperm(d_out d_in, generator seeded with
`random_loc_seed`)[:n], p = k // d_in, q = k % d_in. They depend only on the layer's shape, n and the seed, so PEFT
saves c alone and draws them again on load; here they are the non-persistent buffer `indices` [2, n], drawn again
the same way.
Init `zeros` (c = 0, PEFT's init_weights=True) starts as the identity. PEFT's default init_weights=False draws
c ~ N(0, 1), which does not start as the base model; insert does not offer it.
Merge (exact, additive, in the base op's layout): linear W <- W + dW, Conv1D W [d_in, d_out] <- W + dW^T; unmerge
subtracts. Unmerged exports switch it through exact factors of dW^T at its numerical rank (float64 SVD;
rewrite/adapters/dense_factors.py). The rank: with F_m the inverse DFT matrix (symmetric, conj(F_m) = F_m P_m, P_m the
index reversal k -> -k mod m), Re(F_out S F_in) = (F_out (S + P_out S P_in) F_in) / 2, so
    rank dW = rank(S + S~),   S~[p, q] = S[-p mod d_out, -q mod d_in]      <= min(2 rank S, d_out, d_in) <= min(2n, d)
(a frequency alone: cos a_u cos b_v - sin a_u sin b_v, rank 2; rank 1 where p is 0 or d_out / 2, or q is 0 or
d_in / 2, as its mirror is then in its own row or column; frequencies sharing a row share that row's pair). n above
min(d_in, d_out) / 4 can reach half the width, which warns (merging is then cheaper). The factors are an export
view: FourierFT is not `low_rank`, and has no rank to allocate (n_frequency is its size): allocate refuses it.
PEFT: key `base_model.model.<module>.fourierft_spectrum` [n]; config `n_frequency` (per module `n_frequency_pattern`),
`scaling`, `random_loc_seed` (one each per adapter), `fan_in_fan_out` (PEFT sets it from the layer type itself),
`init_weights` (only how PEFT starts); `bias` other than "none" is refused.
"""
from __future__ import annotations

import functools
import re
from collections import Counter
from typing import Annotated, ClassVar

import torch
import torch.nn.functional as F
from pydantic import AfterValidator, BeforeValidator, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from torch import nn

from rewrite.adapters.base import AdapterKind, NotSupported
from rewrite.adapters.dense_factors import dense_factors
from rewrite.errors import AdapterFileError
from rewrite.formats.peft_dir import CONFIG, WEIGHTS, PeftAdapter, PeftConfig, PeftFormat, compiled, tensor_key
from rewrite.options import Strict

SPECTRUM = "fourierft_spectrum"
Frequencies = Annotated[StrictInt, Field(ge=1)]


class FourierFTOptions(Strict):
    """insert's `options` for kind = "fourierft" (PEFT's defaults)."""

    n_frequency: int = Field(default=1000, ge=1)
    scaling: float = 150.0
    random_loc_seed: int = 777


def _untrained_bias(bias: str) -> str:
    if bias != "none":
        raise ValueError(f"bias = {bias!r} trains base biases, which a FourierFT adapter does not hold; only "
                         "bias = \"none\" is supported")
    return bias


class FourierFTPeftConfig(PeftConfig):
    """`adapter_config.json` of a FourierFT adapter."""

    expected: ClassVar[dict[str, str]] = {
        **PeftConfig.expected, "n_frequency": "a whole number >= 1", "scaling": "a number",
        "random_loc_seed": "a whole number", "n_frequency_pattern": "an object of module -> value",
        "fan_in_fan_out": "true or false", "init_weights": "true or false", "bias": "a string"}
    pattern_values: ClassVar[dict[str, str]] = {"n_frequency_pattern": "a whole number >= 1"}

    peft_type: StrictStr = "FOURIERFT"
    n_frequency: Frequencies = 1000
    scaling: StrictInt | StrictFloat = 150.0
    random_loc_seed: StrictInt = 777
    n_frequency_pattern: Annotated[dict[str, Frequencies], BeforeValidator(lambda v: {} if v is None else v),
                                   AfterValidator(compiled)] = {}
    fan_in_fan_out: StrictBool = False
    init_weights: StrictBool = False
    bias: Annotated[StrictStr, AfterValidator(_untrained_bias)] = "none"

    def frequencies(self, module: str) -> int:
        """PEFT's `n_frequency_pattern` rule: the first key that matches the path's end after a dot (as a regex),
        else the full path as a key, else `n_frequency`."""
        patterns = self.n_frequency_pattern
        matched = next((key for key in patterns if re.match(rf".*\.{key}$", module)), module)
        return patterns.get(matched, self.n_frequency)


def _check_sizes(adapter: PeftAdapter) -> None:
    """Each module's spectrum is one vector of the config's n_frequency for it."""
    config: FourierFTPeftConfig = adapter.config  # type: ignore[assignment]
    for module, parts in adapter.modules.items():
        spectrum, expected = parts[SPECTRUM], config.frequencies(module)
        if spectrum.shape != (expected,):
            raise AdapterFileError(f"{adapter.path / WEIGHTS}: tensor "
                                   f"{tensor_key(module, SPECTRUM)!r} has shape {tuple(spectrum.shape)}, but {CONFIG} "
                                   f"says n_frequency = {expected} for {module!r}; the config does not describe it")


FOURIERFT_FORMAT = PeftFormat("FOURIERFT", FourierFTPeftConfig, ((SPECTRUM,),), check=_check_sizes)


@functools.lru_cache(maxsize=32)
def _positions(d_out: int, d_in: int, n_frequency: int, seed: int) -> torch.Tensor:
    """(rows, cols) [2, n] of the spectrum's non-zero entries; shared by every layer of one shape (read-only)."""
    flat = torch.randperm(d_out * d_in, generator=torch.Generator().manual_seed(seed))[:n_frequency]
    return torch.stack([flat // d_in, flat % d_in])


class FourierFT(AdapterKind):
    kind = "fourierft"
    factored = True
    ops = ("linear", "conv1d")
    settings = ("init",)
    Options = FourierFTOptions
    inits = ("zeros",)
    mergeable = True
    peft_format = FOURIERFT_FORMAT

    def __init__(self, op: str, d_in: int, d_out: int, rank: int = 0, alpha: float = 0.0, *, rslora: bool = False,
                 dropout: float = 0.0, init: str = "zeros", conv: dict | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", n_frequency: int = 1000,
                 scaling: float = 150.0, random_loc_seed: int = 777):
        super().__init__()
        if n_frequency > d_out * d_in:
            raise ValueError(f"fourierft: n_frequency = {n_frequency} is above the {d_out} x {d_in} = "
                             f"{d_out * d_in} entries of this layer's spectrum")
        self.op, self.d_in, self.d_out = op, d_in, d_out
        self.n_frequency, self.scaling, self.random_loc_seed = n_frequency, float(scaling), random_loc_seed
        self.fourierft_spectrum = nn.Parameter(torch.zeros(n_frequency, dtype=dtype, device=device))
        indices = (torch.empty(2, n_frequency, dtype=torch.long, device=device) if torch.device(device).type == "meta"
                   else _positions(d_out, d_in, n_frequency, random_loc_seed).to(device, copy=True))
        self.register_buffer("indices", indices, persistent=False)

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """dW [d_out, d_in] in `dtype` (default: the spectrum's), computed in float64 for float64 and in float32
        otherwise (ifft2 has no half-precision kernels)."""
        spectrum = self.fourierft_spectrum
        dtype = dtype or spectrum.dtype
        dense = torch.zeros(self.d_out, self.d_in, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                            device=spectrum.device)
        dense[self.indices[0], self.indices[1]] = spectrum.to(dense.dtype)
        return (torch.fft.ifft2(dense).real * self.scaling).to(dtype)

    @torch.no_grad()
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [d_in, k], B [k, d_out]) with A B = dW^T, k its numerical rank (module docstring), scaling included."""
        return dense_factors(self.kind, self.delta_weight(torch.float64).T, self.fourierft_spectrum.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.delta_weight()
        return F.linear(x.to(delta.dtype), delta)

    @torch.no_grad()
    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None, sign: float = 1.0) -> None:
        if weight.is_meta:
            return
        delta = self.delta_weight().to(weight.dtype)
        weight.add_(delta if self.op == "linear" else delta.T, alpha=sign)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {SPECTRUM: self.fourierft_spectrum}

    @classmethod
    def peft_module(cls, adapter, module: str) -> tuple[type[FourierFT], dict]:
        config: FourierFTPeftConfig = adapter.config  # type: ignore[assignment]
        return cls, {"n_frequency": config.frequencies(module), "scaling": float(config.scaling),
                     "random_loc_seed": config.random_loc_seed}

    @classmethod
    def peft_config(cls, modules) -> dict:
        shared = {key: {getattr(m, key) for m in modules.values()} for key in ("scaling", "random_loc_seed")}
        mixed = [key for key, values in shared.items() if len(values) > 1]
        if mixed:
            raise NotSupported(f"PEFT's FourierFT config holds one {mixed[0]} for all modules; this adapter has "
                               f"{sorted(shared[mixed[0]])}: save its parts as separate adapters")
        n = Counter(m.n_frequency for m in modules.values()).most_common(1)[0][0]
        return {"peft_type": "FOURIERFT", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
                "target_modules": sorted(modules), "n_frequency": n,
                "n_frequency_pattern": {o: m.n_frequency for o, m in sorted(modules.items()) if m.n_frequency != n},
                "scaling": shared["scaling"].pop(), "random_loc_seed": shared["random_loc_seed"].pop(),
                "fan_in_fan_out": any(m.op == "conv1d" for m in modules.values()), "bias": "none",
                "init_weights": True, "modules_to_save": None, "revision": None}

    def manifest_entry(self) -> dict:
        return dict(op=self.op, scaling=self.scaling)

    def extra_repr(self) -> str:
        return (f"op={self.op}, d_in={self.d_in}, d_out={self.d_out}, n_frequency={self.n_frequency}, "
                f"scaling={self.scaling:g}, random_loc_seed={self.random_loc_seed}")
