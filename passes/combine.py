"""combine: a new LoRA adapter made from adapters already attached, as PEFT's `add_weighted_adapter` makes it.

    [[pass]]
    name = "combine"
    adapters = ["a", "b"]          # low-rank adapters (lora, svd_lora, loha: delta(x) = s x A B) on the same sites
    weights = [0.7, 0.3]           # one per adapter; a negative weight subtracts (task arithmetic's negation)
    into = "ab"                    # the new adapter
    method = "svd"                 # cat | linear | ties | dare_linear | dare_ties | magnitude_prune
                                   # | svd | ties_svd | dare_linear_svd | dare_ties_svd | magnitude_prune_svd
    density = 0.5                  # ties, dare_*, magnitude_prune*: the share of entries kept (required there)
    majority_sign_method = "total" # ties*, dare_ties*: "total" (default) | "frequency"
    rank = 8                       # *svd: the rank kept at every site (default: the largest input rank)
    energy = 0.99                  # *svd, instead of rank: each site keeps the least rank holding this share of the
                                   # merged update's ||D||_F^2 (per-site ranks, physically)
    seed = 0                       # dare_*: the seed of the random masks (default 0: the result is reproducible)
    report = "combine"             # <report>.json / .md in the output directory; "" writes none

The formulas are in rewrite/combine_methods.py: `cat` (the exact sum of the weighted updates, rank sum r_t),
`svd` (that sum re-compressed by SVD: the best rank-k approximation), and PEFT's approximate methods (factor methods
merge the A's and the B's separately; *_svd ones merge the updates, then re-compress).

Rules:
1. Every input is attached (a name attached nowhere is an error listing the attached ones), of a low-rank kind at every
   site, and all inputs are on the same sites; otherwise an error names the adapters, their kinds or the sites that
   differ. Factor methods (linear, ties, dare_linear, dare_ties, magnitude_prune) need equal ranks at each site.
2. The new adapter is a LoRA at each of those sites (every call of the module), with alpha = rank: scale 1, so
   delta W = B A (PEFT's new adapter has lora_alpha = r too); the inputs stay attached. Ranks: cat sum_t r_t; factor
   methods the inputs' rank; svd methods `rank` or `energy` per site, at most the number of singular values
   (min(d_out, fan_in); svd: also sum_t r_t, the rank the sum can have; PEFT pads with zero components instead).
3. DARE's masks come from a generator seeded with `seed`, drawn site by site in graph order, each as PEFT draws it
   (rewrite/combine_methods.py): PEFT draws the same masks from a generator seeded alike, for models that call
   their modules in the order they define them (PEFT goes by module order), as the tested LLaMA and BERT do.
4. The report (`report` stem): per site the input ranks and the new rank; for svd methods also ||D||_F and the
   Frobenius error ||D - B A||_F of the re-compression (absolute and relative), which the result also gives.
5. `into` belongs to the entry that made it: a second run of the same entry is a no-op (modified=False); any other
   adapter of that name is an error.

Differences from PEFT: one input runs its method as named (PEFT falls back to linear); inputs with rsLoRA give the
new adapter scale 1 (PEFT keeps `use_rslora` of the first input with alpha = r, scaling its result by sqrt(r));
the new adapter has no dropout; PEFT's `svd_clamp` is not offered.
"""
from __future__ import annotations

import json
from typing import Literal

import torch
import torch.fx as fx
from pydantic import Field, model_validator

from rewrite.adapters import KINDS
from rewrite.adapters.for_site import adapter_for_site
from rewrite.combine_methods import ELECTING, FACTOR_METHODS, METHODS, PRUNING, RANDOM, SVD_METHODS, Combined, Merge, \
    Term, combine, merge_of
from rewrite.errors import SpecError
from rewrite.formats.peft_lora import lora_keys
from rewrite.graph_edit import adapters_at, has_adapter, register_adapter, wire
from rewrite.names import ADAPTER_NAME
from rewrite.pass_infra import GraphPass, PassOptions, PassResult, real_weights
from rewrite.report import atomic_write
from rewrite.sites import Site
from rewrite.state import AdapterOrigin, state_of

REPORT_FORMAT, REPORT_VERSION = "rewrite-combine", 1
FAN_IN_FIRST = ("conv1d", "embedding")  # ops whose base weight is stored [fan_in, d_out]


class CombineOptions(PassOptions):
    adapters: list[str] = Field(min_length=1)  # the inputs: low-rank adapters on the same sites
    weights: list[float]  # one per input; negative subtracts
    into: str = Field(pattern=ADAPTER_NAME)  # the new LoRA adapter
    method: Literal[METHODS]  # cat, linear, svd, ties, dare_*, magnitude_prune, *_svd (rewrite/combine_methods.py)
    density: float | None = Field(default=None, gt=0, le=1)  # ties, dare_*, magnitude_prune*: share of entries kept
    majority_sign_method: Literal["total", "frequency"] | None = None  # ties*, dare_ties*: default "total"
    rank: int | None = Field(default=None, ge=1)  # *svd: rank kept per site (default: the largest input rank)
    energy: float | None = Field(default=None, gt=0, le=1)  # *svd: per site the least rank keeping this share of ||D||^2
    seed: int | None = Field(default=None, ge=0)  # dare_*: the masks' seed (default 0)
    report: str = "combine"  # <report>.json / .md in the output directory; "" writes none

    @model_validator(mode="after")
    def _keys_fit_the_method(self) -> "CombineOptions":
        if len(self.weights) != len(self.adapters):
            raise ValueError(f"weights has {len(self.weights)} entries for {len(self.adapters)} adapters; give one "
                             "weight per adapter")
        if len(set(self.adapters)) != len(self.adapters) or self.into in self.adapters:
            raise ValueError(f"adapters = {self.adapters} and into = {self.into!r} must be distinct names")
        merge = merge_of(self.method)
        svd = self.method in SVD_METHODS
        for key, fits in (("density", merge in PRUNING), ("majority_sign_method", merge in ELECTING),
                          ("seed", merge in RANDOM), ("rank", svd), ("energy", svd)):
            if getattr(self, key) is not None and not fits:
                raise ValueError(f"{key} does not go with method = {self.method!r}")
        if merge in PRUNING and self.density is None:
            raise ValueError(f"method = {self.method!r} needs density (the share of entries kept, 0 < density <= 1)")
        if self.rank is not None and self.energy is not None:
            raise ValueError("rank and energy both choose the kept rank; set one")
        return self

    def merge(self) -> Merge:
        seed = 0 if self.seed is None else self.seed
        return Merge(density=self.density or 1.0, sign_method=self.majority_sign_method or "total",
                     generator=torch.Generator().manual_seed(seed))


def weight_layout(module) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, fan_in], B [d_out, r]) of a low-rank module's view (lora_A, lora_B), as float32 (PEFT's layout)."""
    a, b = module.lora_A.detach().float(), module.lora_B.detach().float()
    if module.op == "conv2d":  # A [r, c_in, kh, kw], B [c_out, r, 1, 1]
        return a.flatten(1), b.flatten(1)
    # contiguous as PEFT's: B A then rounds as PEFT's product does (pruning compares magnitudes, TIES signs)
    return a.T.contiguous(), b.T.contiguous()


class CombinePass(GraphPass):
    name = "combine"
    Options = CombineOptions

    def writes(self) -> list[str]:
        stem = self.options.report
        return [f"{stem}.json", f"{stem}.md"] if stem else []

    def call(self, gm: fx.GraphModule) -> PassResult:
        o = self.options
        state = real_weights(gm, self.context.where, "combine reads the adapters' weights")
        origin = AdapterOrigin(self.name, o.model_dump_json(), self.context.where)
        by_owner: dict[str, list[Site]] = {}
        for site in state.sites.values():
            by_owner.setdefault(site.owner, []).append(site)
        if self._already_made(gm, by_owner, origin):
            return PassResult(gm, False, {"adapter": o.into, "note": "already combined"})
        inputs = self._inputs(gm, by_owner)
        rank = o.rank if o.rank is not None or o.energy is not None else max(  # PEFT's default svd_rank
            t.a.shape[0] for terms in inputs.values() for t in terms)
        merge, sites, totals = o.merge(), [], {"params": 0, "norm2": 0.0, "error2": 0.0}
        for owner, terms in inputs.items():
            result = combine(o.method, terms, merge, rank=rank, energy=o.energy,
                             fan_in_first=by_owner[owner][0].op in FAN_IN_FIRST)
            params = self._attach(gm, by_owner[owner], result)
            sites.append(self._site_entry(by_owner[owner][0], terms, result, params))
            totals["params"] += params
            totals["norm2"] += (result.norm or 0.0) ** 2
            totals["error2"] += (result.error or 0.0) ** 2
        state.origins[o.into] = origin
        report = self._report(sites, totals)
        return PassResult(gm, True, self._stats(report, self._write(report)))

    # ------------------------------------------------------------------------------------------ checks

    def _already_made(self, gm, by_owner, origin: AdapterOrigin) -> bool:
        """Rule 5: True when this entry already made `into`; an `into` made otherwise is an error."""
        into = self.options.into
        made = state_of(gm).origins.get(into)
        attached = any(has_adapter(gm, owner, into) for owner in by_owner)
        if made == origin and attached:
            return True
        if made is not None or attached:
            by = f" by the {made.pass_name} at {made.where}" if made else ""
            raise SpecError(f"{self.context.at('into')}: into = {into!r}: an adapter of that name was already "
                            f"made{by}; combine into a new name")
        return False

    def _inputs(self, gm, by_owner) -> dict[str, list[Term]]:
        """Rule 1: owner -> the inputs there as terms (weight layout, scale, weight), in `adapters` order."""
        o = self.options
        at = {name: [owner for owner in by_owner if name in adapters_at(gm, owner)] for name in o.adapters}
        missing = [name for name, owners in at.items() if not owners]
        if missing:
            attached = sorted({n for owner in by_owner for n in adapters_at(gm, owner)})
            raise SpecError(f"{self.context.at('adapters')}: adapters {missing} are attached to no site (attached: "
                            f"{', '.join(attached) or 'none'})")
        for name, owners in at.items():
            odd = {m.kind: owner for owner in owners if not (m := adapters_at(gm, owner)[name]).low_rank}
            if odd:
                kind, owner = next(iter(odd.items()))
                low_rank = [k for k, cls in KINDS.items() if cls.low_rank]
                raise SpecError(f"{self.context.at('adapters')}: combine builds a LoRA from low-rank adapters "
                                f"({', '.join(low_rank)}: delta(x) = s x A B); adapter {name!r} is {kind} at {owner}, "
                                f"which is not (kinds of the inputs: {self._kinds(gm, at)})")
        first = o.adapters[0]
        for name in o.adapters[1:]:
            if at[name] != at[first]:
                raise SpecError(f"{self.context.at('adapters')}: combine needs its adapters on the same sites: "
                                f"{self._differing(first, at[first], name, at[name])}")
        inputs = {owner: [Term(*weight_layout(m), m.scaling, w) for m, w in
                          zip((adapters_at(gm, owner)[name] for name in o.adapters), o.weights)] for owner in at[first]}
        if o.method in FACTOR_METHODS:
            for owner, terms in inputs.items():
                if len({t.a.shape[0] for t in terms}) > 1:
                    ranks = ", ".join(f"{n!r} rank {t.a.shape[0]}" for n, t in zip(o.adapters, terms))
                    raise SpecError(f"{self.context.at('method')}: method = {o.method!r} merges the factors A and B "
                                    f"entry by entry and needs equal ranks at each site; at {owner}: {ranks} (cat "
                                    "and the svd methods take any ranks)")
        return inputs

    @staticmethod
    def _kinds(gm, at: dict[str, list[str]]) -> str:
        return ", ".join(f"{name!r}: {sorted({adapters_at(gm, o)[name].kind for o in owners})}"
                         for name, owners in at.items())

    @staticmethod
    def _differing(first: str, mine: list[str], name: str, theirs: list[str]) -> str:
        only_first = [s for s in mine if s not in theirs]
        only_other = [s for s in theirs if s not in mine]
        parts = [f"{first!r} is at {len(mine)} sites, {name!r} at {len(theirs)}"]
        for who, only in ((first, only_first), (name, only_other)):
            if only:
                more = f" (+{len(only) - 3} more)" if len(only) > 3 else ""
                parts.append(f"only {who!r} is at {', '.join(only[:3])}{more}")
        return "; ".join(parts)

    # ------------------------------------------------------------------------------------------ building

    def _attach(self, gm, sites: list[Site], result: Combined) -> int:
        """Rule 2: the new LoRA (alpha = rank: scale 1) at the module, wired at each of its calls; its parameters."""
        rank, site = result.a.shape[0], sites[0]
        module = adapter_for_site(gm, site, "lora", rank, float(rank), rslora=False, dropout=0.0, init="zeros",
                                  where=self.context.where)
        shapes = module.peft_shapes()
        key_a, key_b = lora_keys(site.op)
        module.load_peft_state({key_a: result.a.reshape(shapes[key_a]), key_b: result.b.reshape(shapes[key_b])})
        register_adapter(gm, site.owner, self.options.into, module)
        table = state_of(gm).sites
        for call in sites:
            wire(gm, table.node_of(gm, call.name), call, self.options.into, module)
        return sum(p.numel() for p in module.parameters())

    def _site_entry(self, site: Site, terms: list[Term], result: Combined, params: int) -> dict:
        entry = dict(site=site.owner, op=site.op, d_in=site.d_in, d_out=site.d_out,
                     ranks_in={n: t.a.shape[0] for n, t in zip(self.options.adapters, terms)}, rank=result.a.shape[0],
                     params=params)
        if result.error is not None:
            entry.update(update_norm=result.norm, frobenius_error=result.error,
                         relative_error=result.error / result.norm if result.norm else None)
        return entry

    def _stats(self, report: dict, files: list[str]) -> dict:
        """The result: ranks, parameters and, for svd methods, the Frobenius errors (rule 4), per site in
        `site_errors`."""
        sites, totals = report["sites"], report["totals"]
        stats = {"adapter": self.options.into, "method": self.options.method, "sites": len(sites),
                 "rank_min": min(s["rank"] for s in sites), "rank_max": max(s["rank"] for s in sites),
                 "params": totals["params"]}
        if "frobenius_error" in totals:
            stats.update({key: None if totals[key] is None else float(f"{totals[key]:.4g}")
                          for key in ("frobenius_error", "relative_error")})
            stats["site_errors"] = {s["site"]: s["frobenius_error"] for s in sites}
        return {**stats, "report": files}

    # ------------------------------------------------------------------------------------------ report

    def _report(self, sites: list[dict], totals: dict) -> dict:
        o = self.options
        summary = {"sites": len(sites), "params": totals["params"]}
        if o.method in SVD_METHODS:
            norm, error = totals["norm2"] ** 0.5, totals["error2"] ** 0.5
            summary.update(update_norm=norm, frobenius_error=error, relative_error=error / norm if norm else None)
        return {"format": REPORT_FORMAT, "version": REPORT_VERSION, "adapter": o.into, "method": o.method,
                "inputs": [{"adapter": n, "weight": w} for n, w in zip(o.adapters, o.weights)],
                "options": o.model_dump(mode="json"), "sites": sites, "totals": summary}

    def _write(self, report: dict) -> list[str]:
        stem = self.options.report
        if not stem or not self.context.write:
            return []
        path = self.context.output_path(stem, "report")
        json_path, md_path = path.with_name(f"{path.name}.json"), path.with_name(f"{path.name}.md")
        atomic_write(json_path, json.dumps(report, indent=2) + "\n")
        atomic_write(md_path, render_markdown(report))
        return [json_path.name, md_path.name]


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def render_markdown(report: dict) -> str:
    """The report for people: what was combined, totals, and a row per site."""
    first, *rest = report["inputs"]
    terms = f"{first['weight']:g} * `{first['adapter']}`" + "".join(
        f" {'-' if i['weight'] < 0 else '+'} {abs(i['weight']):g} * `{i['adapter']}`" for i in rest)
    totals, svd = report["totals"], "frobenius_error" in report["totals"]
    lines = [f"# combine: `{report['adapter']}` = {terms} ({report['method']})", "",
             f"- **Sites**: {totals['sites']}; **parameters**: {totals['params']:,}"]
    if svd:
        lines.append(f"- **Re-compression error**: ||D - B A||_F = {_g(totals['frobenius_error'])} of ||D||_F = "
                     f"{_g(totals['update_norm'])} (relative {_g(totals['relative_error'])}) over all sites")
    head = ["site", "op", "d_in x d_out", "input ranks", "rank"] + (["‖D‖_F", "error", "relative"] if svd else [])
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in report["sites"]:
        row = [f"`{s['site']}`", s["op"], f"{s['d_in']} x {s['d_out']}",
               ", ".join(f"{n} {r}" for n, r in s["ranks_in"].items()), str(s["rank"])]
        if svd:
            row += [_g(s["update_norm"]), _g(s["frobenius_error"]), _g(s["relative_error"])]
        lines.append("| " + " | ".join(row) + " |")
    if svd:
        lines += ["", "D: the merged update of the inputs at the site; error: what the kept rank loses of it."]
    return "\n".join(lines) + "\n"


__all__ = ["CombineOptions", "CombinePass"]
