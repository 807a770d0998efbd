"""Lower live adapters to switchable forms for unmerged export.

Every site's chain of adapter branches is replaced by ONE lowered module computing the delta of the
adapter selected at run time. Scales are folded into B; ranks of one site are zero-padded to the largest.

    ort-adapters  A [d_in, r], B [r, d_out]                  delta = x A B
                  (become ONNX inputs with empty defaults: no adapter fed = base model)
    bank          A [d_in, C r], B [C r, d_out], ids [batch]  delta = ((x A) * onehot(ids)) B
                  (standard ops; C slots; id -1 = no adapter; rows of one batch may differ)
    custom-op     A [C, d_in, r], B [C, r, d_out], ids        y = rewrite::LoraDelta(x, A, B, ids, base(x))
                  (the add is fused into the op: it takes the base output and may run in place on it;
                  banks float32, or float16 to halve the bytes each call streams)

Batch-row ids reach the lowered modules through `ROUTER`, set by `RoutedModel.forward`: non-strict
export runs this Python for real, so the ids tensor is traced like any other input. A row id covers the
block of N / batch consecutive flattened rows of x, which is that row's tokens for [B, T, d] and for
GPT-2's flattened [B*T, d] alike.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from rewrite.errors import RewriteError
from rewrite.graph_edit import adapters_at, drop_adapter, unwire
from rewrite.sites import Site
from rewrite.state import state_of

aten = torch.ops.aten
STRATEGIES = ("ort-adapters", "bank", "custom-op")


class _Router:
    ids: torch.Tensor | None = None


ROUTER = _Router()


def _routed_ids() -> torch.Tensor:
    if ROUTER.ids is None:
        raise RuntimeError("a bank adapter ran outside RoutedModel (no adapter_ids)")
    return ROUTER.ids


class SwitchableLora(nn.Module):
    """One adapter per run; A and B are replaced per run by ONNX Runtime adapter inputs."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.A = nn.Parameter(a.clone(), requires_grad=False)
        self.B = nn.Parameter(b.clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.A @ self.B


class OneHotBank(nn.Module):
    """C adapters side by side; a one-hot mask of the row's id keeps only its own rank slots."""

    def __init__(self, a_bank: torch.Tensor, b_bank: torch.Tensor):
        super().__init__()
        self.slots, _, self.rank = a_bank.shape
        self.A = nn.Parameter(a_bank.permute(1, 0, 2).reshape(a_bank.shape[1], -1).contiguous(), requires_grad=False)
        self.B = nn.Parameter(b_bank.reshape(-1, b_bank.shape[2]).contiguous(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = _routed_ids()
        mask = (ids[:, None] == torch.arange(self.slots, device=x.device)).to(x.dtype)
        hidden = (x.reshape(-1, x.shape[-1]) @ self.A).reshape(ids.shape[0], -1, self.slots, self.rank)
        hidden = (hidden * mask[:, None, :, None]).reshape(-1, self.slots * self.rank)
        return (hidden @ self.B).reshape(*x.shape[:-1], self.B.shape[1])


class CustomOpBank(nn.Module):
    """base + delta in one custom op (segmented per adapter in C++/CUDA); the base GEMM stays ONNX Runtime's."""

    def __init__(self, a_bank: torch.Tensor, b_bank: torch.Tensor, dtype: torch.dtype = torch.float32):
        super().__init__()
        from rewrite.runtime import ops  # noqa: F401 - registers torch.ops.rewrite.lora_delta

        self.A = nn.Parameter(a_bank.to(dtype), requires_grad=False)
        self.B = nn.Parameter(b_bank.to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return torch.ops.rewrite.lora_delta(x, self.A, self.B, _routed_ids(), base)


class RoutedModel(nn.Module):
    """The export root: the model's own inputs plus `adapter_ids` (one id per batch row)."""

    def __init__(self, gm: fx.GraphModule, input_names: list[str]):
        super().__init__()
        self.gm, self.input_names = gm, input_names

    def forward(self, *args: torch.Tensor) -> Any:
        *inputs, ids = args
        ROUTER.ids = ids
        try:
            return self.gm(**dict(zip(self.input_names, inputs)))
        finally:
            ROUTER.ids = None


@dataclass
class SiteLowering:
    owner: str
    op: str
    d_in: int
    d_out: int
    rank: int
    tensors: dict[str, str]  # "A" / "B" -> module path of the parameter (its ONNX initializer name)
    per_adapter: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # name -> {"A", "B"} scaled


@dataclass
class Lowered:
    module: nn.Module
    strategy: str
    adapters: list[str]
    sites: list[SiteLowering]
    routed: bool


def _factors(module) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [d_in, r], B [r, d_out]) with the scale folded into B; linear-layout sites only."""
    if module.op not in ("linear", "conv1d"):
        raise RewriteError(f"unmerged export supports LoRA on linear and Conv1D sites; {module.op} sites must be "
                           "merged")
    return module.lora_A.detach().clone(), (module.lora_B.detach() * module.scaling).clone()


def _pad(t: torch.Tensor, rank: int, axis: int) -> torch.Tensor:
    pad = [0, 0] * t.dim()
    pad[2 * (t.dim() - 1 - axis) + 1] = rank - t.shape[axis]
    return torch.nn.functional.pad(t, pad)


BANK_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def lower(gm: fx.GraphModule, strategy: str, adapters: list[str] | None = None,
          capacity: int | None = None, bank_dtype: str = "float32") -> Lowered:
    """A copy of `gm` with each adapted site's branches replaced by one switchable module."""
    if strategy not in STRATEGIES:
        raise RewriteError(f"unknown switching strategy {strategy!r}; expected one of {STRATEGIES}")
    if bank_dtype not in BANK_DTYPES or (bank_dtype != "float32" and strategy != "custom-op"):
        raise RewriteError(f"[export] bank_dtype = {bank_dtype!r}: float16 banks need switching = \"custom-op\"; "
                           f"expected one of {sorted(BANK_DTYPES)}")
    gm = copy.deepcopy(gm)
    state = state_of(gm)
    owners = list(dict.fromkeys(s.owner for s in state.sites.values()))
    live = {o: adapters_at(gm, o) for o in owners}
    names = list(dict.fromkeys(n for mods in live.values() for n in mods))
    if adapters is not None:
        missing = [n for n in adapters if n not in names]
        if missing:
            raise RewriteError(f"[export] adapters {missing} are not attached (attached: {names or 'none'})")
        names = list(adapters)
    if not names:
        raise RewriteError("unmerged export needs at least one live adapter (insert or load one; do not merge it)")
    slots = capacity or len(names)
    if slots < len(names):
        raise RewriteError(f"[export] capacity = {slots} is smaller than the {len(names)} adapters exported")
    routed = strategy != "ort-adapters"
    lowered_sites = []
    for owner, modules in live.items():
        chosen = {n: m for n, m in modules.items() if n in names}
        for name in list(modules):
            unwire(gm, name, owner)
            drop_adapter(gm, owner, name)
        if not chosen:
            continue
        sites = [s for s in state.sites.values() if s.owner == owner]
        factors = {n: _factors(m) for n, m in chosen.items()}
        rank = max(a.shape[1] for a, _ in factors.values())
        padded = {n: {"A": _pad(a, rank, 1), "B": _pad(b, rank, 0)} for n, (a, b) in factors.items()}
        module = _lowered_module(strategy, padded, names, slots, sites[0], BANK_DTYPES[bank_dtype])
        path = f"lora.{owner}"
        gm.add_submodule(path, module)
        for site in sites:
            _wire_lowered(gm, state.sites.node_of(gm, site.name), site, path, fused=strategy == "custom-op")
        lowered_sites.append(SiteLowering(owner, sites[0].op, sites[0].d_in, sites[0].d_out, rank,
                                          {"A": f"{path}.A", "B": f"{path}.B"}, padded))
    gm.graph.lint()
    gm.recompile()
    root = RoutedModel(gm, list(state.inputs.kwargs)) if routed else gm
    return Lowered(root, strategy, names, lowered_sites, routed)


def _lowered_module(strategy: str, padded: dict, names: list[str], slots: int, site: Site,
                    dtype: torch.dtype) -> nn.Module:
    if strategy == "ort-adapters":
        first = padded[next(iter(padded))]
        return SwitchableLora(first["A"], first["B"])
    any_a = next(iter(padded.values()))["A"]
    a_bank = any_a.new_zeros(slots, site.d_in, any_a.shape[1])
    b_bank = any_a.new_zeros(slots, any_a.shape[1], site.d_out)
    for slot, name in enumerate(names):
        if name in padded:
            a_bank[slot], b_bank[slot] = padded[name]["A"], padded[name]["B"]
    return OneHotBank(a_bank, b_bank) if strategy == "bank" else CustomOpBank(a_bank, b_bank, dtype)


def _wire_lowered(gm: fx.GraphModule, base: fx.Node, site: Site, path: str, fused: bool) -> None:
    """base -> base + lowered(x), or lowered(x, base) when the module adds base itself."""
    from rewrite.graph_edit import site_input

    users = list(base.users)
    with gm.graph.inserting_before(base.next):
        if fused:
            join = gm.graph.call_module(path, (site_input(base, site), base))
        else:
            delta = gm.graph.call_module(path, (site_input(base, site),))
            join = gm.graph.call_function(aten.add.Tensor, (base, delta))
    for user in users:
        user.replace_input_with(base, join)
