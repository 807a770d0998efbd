"""custom-op: a different adapter per batch row through `rewrite::LoraDelta` (export/lora_delta_op.py).

    A [C, d_in, r], B [C, r, d_out], ids [batch]:   y = LoraDelta(x, A, B, ids, base(x))

The base GEMM stays ONNX Runtime's; the op adds each row's delta into its output (in place when ORT allows),
grouping rows by adapter in C++ / CUDA. Banks are float32, or float16 to halve the bytes each call streams.

A fused group (`fuse`: sites reading one x) becomes one `rewrite::LoraDeltaGroup` call after the members' base ops:

    A = [A_1 | ... | A_m] [C, d_in, sum r_i], B_i [C, r_i, d_out_i]:
    y_1 .. y_m = LoraDeltaGroup(x, A, ids, base_1 .. base_m, B_1 .. B_m)
    y_i = base_i + (x A[k])[.., o_i : o_i + r_i] B_i[k]

so x A is computed once per row for the whole group (o_i = r_1 + .. + r_(i-1), the site's `A_offset`).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from rewrite.errors import ExportError
from rewrite.export import lora_delta_op  # registers torch.ops.rewrite.lora_delta / lora_delta_group
from rewrite.export.lowerings.base import Lowering, bank_tensors, routed_ids
from rewrite.graph_edit import adapter_input
from rewrite.sites import Site


class CustomOpBank(nn.Module):
    def __init__(self, a_bank: torch.Tensor, b_bank: torch.Tensor, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.A = nn.Parameter(a_bank.to(dtype), requires_grad=False)
        self.B = nn.Parameter(b_bank.to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return torch.ops.rewrite.lora_delta(x, self.A, self.B, routed_ids(), base)


class CustomOpGroupBank(nn.Module):
    """The banks of a fused group: one A [C, d_in, sum r_i] (the members' A side by side), B_i per member."""

    def __init__(self, banks: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype = torch.float32):
        super().__init__()
        self.A = nn.Parameter(torch.cat([a for a, _ in banks], dim=2).to(dtype), requires_grad=False)
        self.B = nn.ParameterList(nn.Parameter(b.to(dtype), requires_grad=False) for _, b in banks)
        self.ranks = [a.shape[2] for a, _ in banks]

    def forward(self, x: torch.Tensor, *bases: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(torch.ops.rewrite.lora_delta_group(x, self.A, routed_ids(), list(bases), list(self.B)))


class CustomOp(Lowering):
    name = "custom-op"
    routed = True
    fused = True

    def module(self, padded, names, slots, site, dtype) -> nn.Module:
        return CustomOpBank(*bank_tensors(padded, names, slots, site), dtype)

    def group_module(self, members, names, slots, dtype) -> tuple[nn.Module, list[dict[str, str]], list[int]] | None:
        """One `CustomOpGroupBank` called as (x, base_1 .. base_m) -> (y_1 .. y_m): see `wire_group`. A group of
        one site is lowered alone (`LoraDelta`, which ONNX Runtime may run in place on the base output)."""
        if len(members) == 1:
            return None
        module = CustomOpGroupBank([bank_tensors(padded, names, slots, site) for padded, site in members], dtype)
        offsets = [sum(module.ranks[:i]) for i in range(len(members))]
        return module, [{"A": "A", "B": f"B.{i}"} for i in range(len(members))], offsets

    def wire_group(self, gm: fx.GraphModule, members: list[tuple[fx.Node, Site]], path: str) -> None:
        """base_i -> y_i of ONE call `path`(x, base_1 .. base_m), placed after the last member's base op. Nodes
        between the first and the last base op that read an earlier member's output (q's reshape before k's
        projection) move after the call, in their order, so the graph stays topologically sorted."""
        bases = [base for base, _ in members]
        order = {node: i for i, node in enumerate(gm.graph.nodes)}
        first, last = min(bases, key=order.__getitem__), max(bases, key=order.__getitem__)
        between = list(gm.graph.nodes)[order[first]:order[last] + 1]
        users = {base: list(base.users) for base in bases}
        with gm.graph.inserting_after(last):
            call = gm.graph.call_module(path, (adapter_input(bases[0], members[0][1]), *bases))
        anchor, late = call, set()
        for index, base in enumerate(bases):
            with gm.graph.inserting_after(anchor):
                anchor = gm.graph.call_function(operator.getitem, (call, index))
            late.add(anchor)
            for user in users[base]:
                user.replace_input_with(base, anchor)
        for node in between:
            if any(i in late for i in node.all_input_nodes):
                if node in users:
                    raise ExportError(f"[export] fused group at {path}: the base op {node.name} reads another "
                                      "member's output; unfuse this group (custom-op lowers its sites alone then)")
                late.add(node)
                anchor.append(node)
                anchor = node

    def translation_table(self):
        return lora_delta_op.onnx_translation_table()
