"""unmerge: undo `merge` exactly, for adapters merged with `keep_original = true`.

W <- W_0 (the copy kept at merge time, so no rounding drift) and every kept adapter is attached again
as a branch: y = W_0 x + b + s B A x. Adapters merged without keep_original cannot be unmerged: error.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from rewrite.errors import SpecError
from rewrite.graph_edit import register_adapter, wire
from rewrite.pass_infra import AdapterChoice, PassResult
from rewrite.passes.merge import FoldPass
from rewrite.state import state_of


class UnmergePass(FoldPass):
    name = "unmerge"
    Options = AdapterChoice

    def call(self, gm: fx.GraphModule) -> PassResult:
        state, where = state_of(gm), self.context.where
        restored = 0
        for owner, names in list(state.merged.items()):
            chosen = self.options.chosen(names)
            if not chosen:
                continue
            kept = state.originals.get(owner)
            if kept is None or any(n not in kept["adapters"] for n in chosen):
                raise SpecError(f"{where}: {owner} was merged without keep_original = true; it cannot be unmerged "
                                "exactly")
            if set(chosen) != set(names):
                raise SpecError(f"{where}: {owner} has {list(names)} merged; unmerge them together (got {chosen})")
            sites = [s for s in state.sites.values() if s.owner == owner]
            with torch.no_grad():
                gm.get_parameter(sites[0].weight).data.copy_(kept["weight"])
                if kept["bias"] is not None:
                    gm.get_parameter(sites[0].bias).data.copy_(kept["bias"])
            for name in chosen:
                module = kept["adapters"].pop(name)
                register_adapter(gm, owner, name, module)
                for site in sites:
                    wire(gm, state.sites.node_of(gm, site.name), site, name, module)
                restored += 1
            del state.merged[owner], state.originals[owner]
        return PassResult(gm, restored > 0, {"unmerged": restored})
