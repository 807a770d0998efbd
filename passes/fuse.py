"""fuse: run sibling low-rank adapters through one GEMM, and fold elementwise kinds into the weights.

Siblings (`siblings = true`): the low-rank branches (LoRA and every `low_rank` kind joined by "add" on a linear /
Conv1D site) that read the same input x — q / k / v of one layer, gate / up, several adapters on one site — become
one group (rewrite/adapters/fused.py):

    before   y_i += s_i (x A_i) B_i                                   k small GEMM pairs and k scale multiplies
    after    h = x [A_1 | ... | A_k];   y_i += h[.., o_i : o_i + r_i] (s_i B_i)      one A GEMM, scales in B

Each member's join stays where it was (the chain order of every site is unchanged), so the outputs are equal up to
fp32 rounding. The adapter modules stay registered and remain the only source of truth: `save` writes the same
PEFT directory as without fuse; `merge`, `combine`, `allocate` and the unmerged-export lowering unfuse a group
before they detach any of its members (`rewrite.graph_edit.unwire`), and the per-row bank lowering turns each
group back into one A bank (export/lowerings/fused_bank.py).

Folding (`fold = [kinds]`): the adapters of those kinds are folded into the base weights — exactly what `merge`
does for them ((IA)^3 on an input or output: W <- W diag(l) / diag(l) W; BitFit: b <- b + db; RoAd: W <- R W), so
this *is* `merge` restricted to those kinds (its rules 2, 3, 7, 8 apply); adapters of other kinds are left alone.

Rules:
1. `adapters` narrows both steps to those adapter names (default: every attached one); a name attached nowhere is an
   error. Folding runs first: an input-joined kind ((IA)^3 on a feed-forward input) scales what siblings read, so
   their groups form only once it is folded.
2. A module called more than once (shared weights) keeps its own calls: its adapter serves several inputs.
3. Folding some adapters of a site is exact when they are what the site computes first: an output- or add-joined one
   with no adapter that stays before it in the site's chain (an add-joined one may follow add-joined ones), an
   input-joined one read by the op itself. Anything else is refused, naming the site (merge them all instead).
4. A second run finds nothing new and reports modified=False; a new sibling on an input that already has a group
   regroups that input.
5. Fused groups run in inference only (they hold no gradients): fuse after training.
"""
from __future__ import annotations

from collections import Counter

import torch.fx as fx
from pydantic import field_validator, model_validator
from rewrite.passes.merge import FoldPass, MergeOptions, MergePass

from rewrite.adapters import KINDS
from rewrite.adapters.fused import FusedLowRank
from rewrite.errors import SpecError
from rewrite.graph_edit import (
    FUSED_ROOT,
    adapters_at,
    fuse_branches,
    fused_groups,
    site_chain,
    unfuse,
)
from rewrite.pass_infra import AdapterChoice, PassResult
from rewrite.state import AdapterTag, adapter_path, state_of

FUSABLE_OPS = ("linear", "conv1d")


class FuseOptions(AdapterChoice):
    siblings: bool = True  # run the low-rank branches that read one input through one concatenated A
    fold: list[str] = []  # adapter kinds folded into the weights first, exactly as merge folds them

    @field_validator("fold")
    @classmethod
    def _foldable(cls, kinds: list[str]) -> list[str]:
        for kind in kinds:
            if kind not in KINDS:
                raise ValueError(f"unknown adapter kind {kind!r} (kinds: {', '.join(KINDS)})")
            if not KINDS[kind].mergeable:
                raise ValueError(f"{kind} adapters cannot be folded into the weights exactly")
        return kinds

    @model_validator(mode="after")
    def _does_something(self) -> "FuseOptions":
        if not self.siblings and not self.fold:
            raise ValueError("siblings = false and fold = []: this fuse does nothing (list kinds in fold, or fuse "
                             "siblings)")
        return self


def fusable(module) -> bool:
    """A branch x -> x A B (scale in B) that a group can run: low-rank, joined by add, reading x alone."""
    return module.low_rank and module.join == "add" and not module.reads_weight and module.op in FUSABLE_OPS


class _FoldKinds(MergePass):
    """`merge` of the adapters of some kinds only (rule 3 checked first)."""

    def __init__(self, kinds: list[str], options: MergeOptions, context):
        super().__init__(options, context)
        self.kinds = set(kinds)

    def chosen(self, modules: dict) -> list[str]:
        return [n for n in super().chosen(modules) if modules[n].kind in self.kinds]

    def call(self, gm: fx.GraphModule) -> PassResult:
        self._check_exact(gm)
        return super().call(gm)

    def _check_exact(self, gm: fx.GraphModule) -> None:
        """Rule 3: each folded adapter, with the others folded here, must be what its site computes first."""
        table = state_of(gm).sites
        for site in table.values():
            modules = adapters_at(gm, site.owner)
            folded = set(self.chosen(modules))
            if not folded:
                continue
            base = table.node_of(gm, site.name)
            live: list[str] = []  # the joins, in chain order, of adapters that stay
            for node in site_chain(base, site.name):
                tag = node.meta["rewrite"]
                join = modules[tag.adapter].join
                if tag.adapter not in folded:
                    live.append(join)
                elif live and (join == "output" or "output" in live):
                    self._refuse(tag, f"joins after adapters that stay ({', '.join(live)} joins)")
            for node in gm.graph.nodes:
                tag = node.meta.get("rewrite")
                if isinstance(tag, AdapterTag) and tag.site == site.name and tag.role == "input" and \
                        tag.adapter in folded and any(u is not base and u.meta.get("rewrite", None) is not None and
                                                      u.meta["rewrite"].adapter not in folded for u in node.users):
                    self._refuse(tag, "scales an input that another adapter rewrites again before the op")

    def _refuse(self, tag: AdapterTag, why: str) -> None:
        raise SpecError(f"{self.context.at('fold')}: {tag.site}: the {tag.kind} adapter {tag.adapter!r} {why}; "
                        "folding it alone into the weights would change the outputs (merge them all instead)")


class FusePass(FoldPass):
    name = "fuse"
    Options = FuseOptions

    def call(self, gm: fx.GraphModule) -> PassResult:
        stats = {"folded": 0, "groups": 0, "fused": 0}
        if self.options.fold:
            merge = _FoldKinds(self.options.fold, MergeOptions(adapters=self.options.adapters), self.context)
            stats["folded"] = merge.call(gm).stats["merged"]
        if self.options.siblings:
            stats["groups"], stats["fused"] = self._fuse_siblings(gm)
        stats["gemms_saved"] = stats["fused"] - stats["groups"]
        return PassResult(gm, stats["folded"] + stats["fused"] > 0, stats)

    def _candidates(self, gm: fx.GraphModule) -> dict[fx.Node, list[fx.Node]]:
        """{input x: the unfused adapter calls reading it that a group can take}, in graph order."""
        table = state_of(gm).sites
        calls = Counter(s.owner for s in table.values())
        wanted = {}
        for owner in (o for o, n in calls.items() if n == 1):  # rule 2
            modules = adapters_at(gm, owner)
            for name in self.options.chosen(modules):
                if fusable(modules[name]):
                    wanted[adapter_path(owner, name)] = modules[name]
        by_input: dict[fx.Node, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module" and node.target in wanted and node.meta["rewrite"].role == "delta":
                by_input.setdefault(node.args[0], []).append(node)
        return by_input

    def _fuse_siblings(self, gm: fx.GraphModule) -> tuple[int, int]:
        by_input = self._candidates(gm)
        if not by_input:
            return 0, 0
        for group in fused_groups(gm):  # rule 4: a new sibling regroups its input
            if group.args[0] in by_input:
                unfuse(gm, group)
        by_input = self._candidates(gm)
        taken = {int(n.rpartition(".g")[2]) for n, _ in gm.named_modules() if n.startswith(f"{FUSED_ROOT}.g")}
        free = (i for i in range(len(taken) + len(by_input) + 1) if i not in taken)
        fused = 0
        for calls in by_input.values():
            members = [gm.get_submodule(c.target) for c in calls]
            fuse_branches(gm, calls, f"{FUSED_ROOT}.g{next(free)}", FusedLowRank(members))
            fused += len(calls)
        return len(by_input), fused

