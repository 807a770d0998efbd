"""Which tensors of an attached adapter shrink when its site loses output or input channels (METHODS.md §3.3).

    kind            output channels removed          input channels removed
    lora, dora      B columns (conv2d: B dim 0),     A rows (conv2d: A dim 1)
                    DoRA's magnitude entries
    ia3             l entries                        -
    ia3_ff          -                                l entries
    bitfit          bias_delta entries               -

(PiSSA / OLoRA LoRAs keep their initial factors A0, B0 beside A, B: they shrink alike.) Other kinds mix channels
(OFT / BOFT / HRA rotate the input, VeRA shares its projections across sites, LoHa / LoKr / FourierFT build the
update from factors that span every channel): `adapter_axes` refuses them with `NotSupported`.
"""
from __future__ import annotations

import torch
from torch import nn

from rewrite.adapters.base import NotSupported

SLICEABLE = ("lora", "dora", "ia3", "ia3_ff", "bitfit")


def adapter_axes(module: nn.Module) -> dict[str, list[tuple[str, int]]]:
    """{"out": [(tensor attribute, dim)], "in": [...]} of an adapter module (module docstring)."""
    kind = module.kind
    if kind in ("lora", "dora"):
        conv = module.op == "conv2d"
        out, inp = [("lora_B", 0 if conv else 1)], [("lora_A", 1 if conv else 0)]
        if hasattr(module, "init_lora_A"):
            out.append(("init_lora_B", 0 if conv else 1))
            inp.append(("init_lora_A", 1 if conv else 0))
        if kind == "dora":
            out.append(("magnitude", 0))
        return {"out": out, "in": inp}
    if kind == "ia3":
        return {"out": [("ia3_l", 0)], "in": []}
    if kind == "ia3_ff":
        return {"out": [], "in": [("ia3_l", 0)]}
    if kind == "bitfit":
        return {"out": [("bias_delta", 0)], "in": []}
    raise NotSupported(f"{kind} adapters cannot be sliced with the channels of their site (structural pruning slices "
                       f"{', '.join(SLICEABLE)}); merge it before the prune pass, or exempt its layer")


@torch.no_grad()
def slice_adapter(module: nn.Module, out_keep: torch.Tensor | None, in_keep: torch.Tensor | None) -> None:
    """Keep only the output channels `out_keep` and input channels `in_keep` (index tensors; None: all)."""
    axes = adapter_axes(module)
    for role, keep in (("out", out_keep), ("in", in_keep)):
        if keep is None:
            continue
        for attr, dim in axes[role]:
            old = getattr(module, attr)
            new = old.detach().index_select(dim, keep.to(old.device)).clone()
            setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad)
                    if isinstance(old, nn.Parameter) else new)
        setattr(module, "d_out" if role == "out" else "d_in", int(keep.numel()))
