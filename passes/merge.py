"""merge: fold adapters into the base weights, leaving a plain graph with zero overhead.

Each kind folds itself into the site's weight (and bias) in place (`AdapterKind.merge_into`); for LoRA on a
site with weight W:   W <- W + s (A B)^T   (Conv1D: Wc <- Wc + s A B), with one fused `addmm_` per site, no
materialised delta. The adapter's call and join nodes are removed.

Rules:
1. `adapters` names the adapters to fold (default: all attached); a name attached nowhere is an error.
2. Several calls of one module share its weight: the weight is updated once, every branch is removed.
3. A weight shared by two different modules (tied embeddings) is refused: merging would change both.
4. `keep_original = true` keeps a copy of W (and b) and the adapter modules so `unmerge` restores them exactly.
6. A kind that cannot be folded exactly (`mergeable = False`) is an error naming the site.
5. Nothing to fold -> modified=False (a second run is a no-op).
7. A kind that folds into the bias (`needs_bias`: BitFit) gives a site without one a zero bias parameter first
   (`<owner>.bias`, passed to the op); unmerge sets it back to zero.
8. Several adapters at one site fold in `fold_order`: kinds joined on the input first (they rewrite what W reads).
9. `streaming = true` never runs on a graph: `rewrite apply` then folds the `load`ed PEFT LoRA directory into the
   model's safetensors checkpoint shard by shard without loading the model (`rewrite.streaming_merge`; the spec's
   rules: `rewrite.pipeline.streaming_merge_source`).
"""
from __future__ import annotations

import torch.fx as fx

from rewrite.errors import SpecError
from rewrite.graph_edit import adapters_at, add_zero_bias, drop_adapter, unwire
from rewrite.pass_infra import AdapterChoice, GraphPass, PassResult
from rewrite.state import state_of


class MergeOptions(AdapterChoice):
    keep_original: bool = False
    streaming: bool = False


class FoldPass(GraphPass):
    """merge and unmerge: they move adapters between their branches and the base weights, so the outputs stay."""

    def preserves_outputs(self) -> bool:
        return True


class MergePass(FoldPass):
    name = "merge"
    Options = MergeOptions

    def call(self, gm: fx.GraphModule) -> PassResult:
        state, where = state_of(gm), self.context.where
        if self.options.streaming:
            raise SpecError(f"{where}: a streaming merge works on checkpoint files, not on a captured graph: run it "
                            "with `rewrite apply` (or `rewrite merge`)")
        owners = list(dict.fromkeys(s.owner for s in state.sites.values()))
        attached = {owner: adapters_at(gm, owner) for owner in owners}
        wanted = self.options.adapters
        if wanted is not None:
            present = {name for mods in attached.values() for name in mods}
            missing = [name for name in wanted if name not in present and not self._already_merged(state, name)]
            if missing:
                raise SpecError(f"{where}: adapters {missing} are attached to no site "
                                f"(attached: {sorted(present) or 'none'})")
        weight_owners: dict[str, set[str]] = {}
        for site in state.sites.values():
            weight_owners.setdefault(site.weight, set()).add(site.owner)
        merged_sites, merged_params = 0, 0
        for owner, modules in attached.items():
            names = self.chosen(modules)
            if not names:
                continue
            site = next(s for s in state.sites.values() if s.owner == owner)
            if len(weight_owners[site.weight]) > 1:
                raise SpecError(f"{where}: cannot merge into {owner}: its weight {site.weight} is shared with "
                                f"{sorted(weight_owners[site.weight] - {owner})} (tied weights)")
            weight = gm.get_parameter(site.weight)
            bias = gm.get_parameter(site.bias) if site.bias else None
            unmergeable = [n for n in names if not modules[n].mergeable]
            if unmergeable:
                module = modules[unmergeable[0]]
                how = "unmerged" if module.low_rank else "with [export] mode = \"merged\", which keeps it inline"
                raise SpecError(f"{where}: {owner}: {module.kind} adapter {unmergeable[0]!r} cannot be folded into "
                                f"the weights exactly; export it {how}")
            if bias is None and any(modules[n].needs_bias for n in names):
                site = add_zero_bias(gm, site)
                bias = gm.get_parameter(site.bias)
            if self.options.keep_original and owner not in state.originals:
                state.originals[owner] = {"weight": weight.detach().clone(), "adapters": {},
                                          "bias": None if bias is None else bias.detach().clone()}
            for name in fold_order(names, modules):
                module = modules[name]
                module.merge_into(weight.data, None if bias is None else bias.data)
                unwire(gm, name, owner)
                drop_adapter(gm, owner, name)
                if self.options.keep_original:
                    state.originals[owner]["adapters"][name] = module
                merged_params += sum(p.numel() for p in module.parameters())
                merged_sites += 1
            for name in names:  # in wire order: unmerge wires them again in this order
                module = modules[name]
                state.merged.setdefault(owner, {})[name] = dict(kind=module.kind, **module.manifest_entry())
        return PassResult(gm, merged_sites > 0, {"merged": merged_sites, "adapter_params_folded": merged_params})

    def chosen(self, modules: dict) -> list[str]:
        """The adapters at one site that this merge folds (`fuse` narrows them to some kinds)."""
        return self.options.chosen(modules)

    @staticmethod
    def _already_merged(state, name: str) -> bool:
        return any(name in names for names in state.merged.values())


def fold_order(names: list[str], modules: dict) -> list[str]:
    """The order that folds adapters (given in wire order) into W exactly: a kind joined on the input rewrites what
    the base op reads, so it folds first, the one next to the op (wired last) first: base(m2(m1(x))) is
    W' = W M2 M1 (HRA: W R2 R1); "add" and "output" kinds then fold in wire order (y' = l (.) (y + d1) + d2)."""
    inputs = [n for n in reversed(names) if modules[n].join == "input"]
    return inputs + [n for n in names if modules[n].join != "input"]
