"""What every unmerged-export lowering provides, and the row routing the per-row ones share.

A lowering replaces each adapted site's chain of adapter branches with ONE module that computes the delta of the
adapter chosen at run time. Scales are already folded into B and the ranks of one site zero-padded to the
largest, so a lowering only decides how the chosen adapter is selected:

    routed   the exported model takes `adapter_ids` [batch] (one adapter per row; -1 = base)
    fused    the module takes the base op's output and returns base + delta itself
    module   the site's module from {adapter: {"A" [d_in, r], "B" [r, d_out]}}, the bank order and capacity
    group_module  the same for the sites of a fused group (one input, one shared A), where the lowering has one
    adapter_input  the ONNX graph input each A / B parameter becomes (shape, and its default initializer)
"""
from __future__ import annotations

from typing import Any, ClassVar

import onnx
import torch
from torch import nn

from rewrite.sites import Site


class _Router:
    ids: torch.Tensor | None = None


ROUTER = _Router()


def routed_ids() -> torch.Tensor:
    """The `adapter_ids` of the running export, set by `RoutedModel.forward` (non-strict export runs it for real,
    so the ids are traced like any other input)."""
    if ROUTER.ids is None:
        raise RuntimeError("a bank adapter ran outside RoutedModel (no adapter_ids)")
    return ROUTER.ids


class Lowering:
    name: ClassVar[str]
    routed: ClassVar[bool]
    fused: ClassVar[bool] = False
    keeps_shapes: ClassVar[bool] = True  # keep the exporter's value_info (False when input dims were changed)

    def module(self, padded: dict[str, dict[str, torch.Tensor]], names: list[str], slots: int, site: Site,
               dtype: torch.dtype) -> nn.Module:
        raise NotImplementedError

    def group_module(self, members: list[tuple[dict[str, dict[str, torch.Tensor]], Site]], names: list[str],
                     slots: int, dtype: torch.dtype) -> tuple[nn.Module, list[dict[str, str]], list[int]] | None:
        """One module for the sites of a fused group (`fuse`; `members`: (padded, site) per site, all reading one
        input) that returns their deltas as a tuple, with each site's {"A", "B"} parameter names inside it and the
        column where its block starts in the shared A. None: no grouped form, each site is lowered alone."""
        return None

    def translation_table(self) -> dict[Any, Any] | None:
        """Custom ONNX translations the exporter needs (None: standard ops only)."""
        return None

    def adapter_input(self, init: onnx.TensorProto, key: str, index: int) -> list[Any]:
        """The input shape of adapter tensor `key` ("A" / "B") of lowered site `index`; may rewrite its default."""
        return list(init.dims)


def bank_tensors(padded: dict[str, dict[str, torch.Tensor]], names: list[str], slots: int,
                 site: Site) -> tuple[torch.Tensor, torch.Tensor]:
    """A [slots, d_in, r] and B [slots, r, d_out]: adapter `names[k]` in slot k, zeros in free slots."""
    any_a = next(iter(padded.values()))["A"]
    a_bank = any_a.new_zeros(slots, site.d_in, any_a.shape[1])
    b_bank = any_a.new_zeros(slots, any_a.shape[1], site.d_out)
    for slot, name in enumerate(names):
        if name in padded:
            a_bank[slot], b_bank[slot] = padded[name]["A"], padded[name]["B"]
    return a_bank, b_bank
