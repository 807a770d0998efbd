"""insert: add a named adapter to every selected site.

    kind = "lora"       y = base(x) + s * B(A(dropout(x))),         s = alpha / r  (rsLoRA: alpha / sqrt(r))
    kind = "svd_lora"   y = base(x) + c * P (lam (.) (Q dropout(x))),  c = alpha / (r + 1e-5)
                        (AdaLoRA's SVD form, rewrite/adapters/svd_lora.py: lam = 0, P, Q ~ N(0, 0.02^2))

Rules:
1. `targets` select sites (glob, `re:`, `class:`, exact or dotted-suffix name); each must match a site.
2. `rank_pattern` / `alpha_pattern` override rank and alpha per site with the selector precedence
   exact > first glob/regex > class > the global `rank` / `alpha`.
3. One adapter module per weight owner: every call of that module gets a branch from the same adapter. A selection
   that reaches some calls of a module but not all (`X@1`, ALBERT's shared layer) is an error: merge, PiSSA /
   OLoRA inits and PEFT directories act on the module's weight, so they would change the other calls too.
4. A site that already has an adapter of this name is left alone (a second run reports modified=False).
5. New parameters take the base weight's dtype and device (meta stays meta: no memory is allocated).
6. The kind decides (rewrite/adapters/base.py): the site ops it adapts (`svd_lora`: linear, Conv1D, conv2d), the
   inits it accepts, and the settings it reads; a site or key it cannot take is an error naming it.
7. A rank above min(fan_in, d_out) of a site is an error (a delta of that layer never has a higher rank: the
   extra rank is parameters that express nothing); a rank that gives the adapter more parameters than the layer
   (a full-rank update) is a warning naming the sites. `allow_large_rank = true` accepts both, as PEFT does.
8. An adapter name belongs to the entry that made it: a second `insert` of that name with other options that
   selects sites already holding it (or a `load` of other weights) is an error naming both spec locations; entries
   on disjoint sites build one adapter together; the same entry run again is a no-op (rule 4).
9. A kind whose sites share state ties it once all the adapter's modules are built (`share`: VeRA's one frozen
   projection pair, drawn for the largest site); a later entry must fit what the first one made.
Every kind's inits start as the identity, so the outputs are unchanged, which `--verify` checks (but prompt and
prefix tuning, whose virtual tokens change them from the start: `starts_as_identity`).
"""
from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
import torch.fx as fx
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from rewrite.adapters import KINDS
from rewrite.adapters.base import SETTINGS, NotSupported
from rewrite.adapters.for_site import adapter_for_site, selectable_ops
from rewrite.errors import SpecError
from rewrite.graph_edit import adapters_at, has_adapter, register_adapter, wire
from rewrite.names import ADAPTER_NAME
from rewrite.pass_infra import GraphPass, PassOptions, PassResult
from rewrite.sites import Site, check_mapping, check_selector_syntax, resolve, select
from rewrite.state import AdapterOrigin, state_of

class InsertOptions(PassOptions):
    adapter: str = Field(default="default", pattern=ADAPTER_NAME)
    kind: Literal[tuple(KINDS)] = "lora"  # type: ignore[valid-type]
    targets: list[str] = Field(min_length=1)
    rank: int = Field(default=8, ge=1)
    alpha: float = 8.0
    rslora: bool = False
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    init: str | None = None  # default: the kind's first init
    options: dict[str, Any] = Field(default={}, validate_default=True)  # the kind's own (its `Options` model)
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    seed: int = 0
    allow_large_rank: bool = False  # rule 7

    @field_validator("targets")
    @classmethod
    def _selectors(cls, targets: list[str]) -> list[str]:
        return [check_selector_syntax(t) for t in targets]

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _pattern_keys(cls, mapping: dict) -> dict:
        for key in mapping:
            check_selector_syntax(key)
        return mapping

    @field_validator("options")
    @classmethod
    def _kind_options(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        kind = KINDS.get(info.data.get("kind", ""))
        if kind is None:
            return options
        try:
            return kind.Options.model_validate(options).model_dump()
        except ValidationError as err:
            first = err.errors()[0]
            key = ".".join(map(str, first["loc"]))
            fields = ", ".join(kind.Options.model_fields) or "none"
            raise ValueError(f"kind = \"{kind.kind}\": options.{key}: {first['msg']} (its options: {fields})") from None

    @model_validator(mode="after")
    def _fits_the_kind(self) -> "InsertOptions":
        kind = KINDS[self.kind]
        if self.init is not None and self.init not in kind.inits:
            raise ValueError(f"init = {self.init!r}: kind = \"{self.kind}\" starts from {', '.join(kind.inits)}")
        used = {*kind.settings, *(f"{k}_pattern" for k in ("rank", "alpha") if k in kind.settings)}
        unused = sorted(k for k in self.model_fields_set & {*SETTINGS, "rank_pattern", "alpha_pattern"}
                        if k not in used and getattr(self, k) != type(self).model_fields[k].default)
        if unused:
            raise ValueError(f"kind = \"{self.kind}\" does not read {', '.join(unused)} (it reads "
                             f"{', '.join(kind.settings) or 'none of rank, alpha, rslora, dropout, init'})")
        return self


class InsertPass(GraphPass):
    name = "insert"
    Options = InsertOptions

    def preserves_outputs(self) -> bool:
        return KINDS[self.options.kind].starts_as_identity  # prompt / prefix tuning add virtual tokens

    def _check_maker(self, gm: fx.GraphModule, sites: list[Site]) -> AdapterOrigin:
        """Rule 8: refuse to reach sites where another entry made this adapter name with other options (they would
        be skipped silently); entries on disjoint sites build one adapter together (PEFT's IA3 mixes input- and
        output-scaled modules in one adapter). Returns this entry's origin, recorded once it has run."""
        name = self.options.adapter
        origin = AdapterOrigin(self.name, self.options.model_dump_json(), self.context.where)
        first = state_of(gm).origins.get(name, origin)
        if first != origin and any(has_adapter(gm, s.owner, name) for s in sites):
            raise SpecError(f"{self.context.where}: adapter {name!r} was already made by the {first.pass_name} at "
                            f"{first.where} ({first.differences(origin)}) on sites this entry selects; one adapter "
                            "has one set of settings per site: give this one another name")
        return origin

    def _check_whole_modules(self, table, sites: list[Site]) -> None:
        """Rule 3: every call of a selected module is selected."""
        chosen = {s.name for s in sites}
        for site in sites:
            rest = [s.name for s in table.values() if s.owner == site.owner and s.name not in chosen]
            if rest:
                raise SpecError(f"{self.context.at('targets')}: site {site.name} is one call of {site.owner}, and "
                                f"the calls {', '.join(rest)} use the same weight; an adapter belongs to the module "
                                "(merging it, a PiSSA / OLoRA init or a PEFT directory would change every call): "
                                f"select {site.owner!r} to adapt all of its calls")

    def _check_ranks(self, gm: fx.GraphModule, sites: list[Site]) -> None:
        """Rule 7, before anything is created."""
        o = self.options
        if o.allow_large_rank or "rank" not in KINDS[o.kind].settings:
            return
        large = []
        for site in {s.owner: s for s in sites}.values():  # one adapter per owner, whatever its calls
            rank = resolve(site, o.rank, o.rank_pattern, self.context.where)
            fan_in = gm.get_parameter(site.weight).numel() // site.d_out  # conv2d: in_channels * kh * kw
            limit = min(fan_in, site.d_out)
            if rank > limit:
                key = "rank" if rank == o.rank else "rank_pattern"
                raise SpecError(f"{self.context.at(key)}: rank {rank} at {site.name} is above {limit}, the highest "
                                f"rank a delta of this {fan_in} x {site.d_out} layer can have: the extra rank adds "
                                f"parameters that express nothing. Lower it (rank_pattern = {{ \"{site.owner}\" = "
                                f"{limit} }}) or set allow_large_rank = true to keep it as PEFT would")
            if rank * (fan_in + site.d_out) > fan_in * site.d_out:
                large.append(f"{site.name} (rank {rank}, {fan_in} x {site.d_out})")
        if large:
            warnings.warn(f"{self.context.where}: insert {o.adapter!r}: the adapter has more parameters than the layer "
                          f"it adapts at {', '.join(large[:4])}{' ...' if len(large) > 4 else ''}; set "
                          "allow_large_rank = true if you mean a full-rank update", stacklevel=2)

    def _share(self, gm: fx.GraphModule, kind) -> None:
        """Rule 9: the kind ties what the adapter's modules of this kind share, at all its sites."""
        owners = dict.fromkeys(s.owner for s in state_of(gm).sites.values())
        modules = {o: m for o in owners if type(m := adapters_at(gm, o).get(self.options.adapter)) is kind}
        try:
            kind.share(modules, {})
        except NotSupported as err:
            raise SpecError(f"{self.context.where}: insert {self.options.adapter!r}: {err}") from None

    def call(self, gm: fx.GraphModule) -> PassResult:
        o, where = self.options, self.context.where
        table = state_of(gm).sites
        kind = KINDS[o.kind]
        sites = select(table, o.targets, self.context.at("targets"), ops=selectable_ops(kind.ops))
        self._check_whole_modules(table, sites)
        origin = self._check_maker(gm, sites)
        check_mapping(table, o.rank_pattern, f"{self.context.at('rank_pattern')} rank_pattern")
        check_mapping(table, o.alpha_pattern, f"{self.context.at('alpha_pattern')} alpha_pattern")
        for key, value in o.rank_pattern.items():
            if value < 1:
                raise SpecError(f"{where}: rank_pattern[{key!r}] = {value}; ranks must be >= 1")
        misfits = [s.name for s in sites if s.op not in kind.ops]
        if misfits:
            ops = {s.op for s in sites if s.op not in kind.ops}
            raise SpecError(f"{self.context.at('targets')}: kind = \"{o.kind}\" adapts {', '.join(kind.ops)} sites; "
                            f"{misfits[:3]} are {', '.join(sorted(ops))} (use kind = \"lora\" there)")
        self._check_ranks(gm, sites)
        torch.manual_seed(o.seed)
        added_params, added_sites, created = 0, 0, set()
        for site in sites:
            if has_adapter(gm, site.owner, o.adapter) and site.owner not in created:
                continue
            if site.owner not in created:
                rank = resolve(site, o.rank, o.rank_pattern, where)
                alpha = resolve(site, o.alpha, o.alpha_pattern, where)
                module = adapter_for_site(gm, site, o.kind, rank, alpha, rslora=o.rslora, dropout=o.dropout,
                                          init=o.init or kind.inits[0], where=where, options=o.options)
                register_adapter(gm, site.owner, o.adapter, module)
                added_params += sum(p.numel() for p in module.parameters())
                created.add(site.owner)
            wire(gm, table.node_of(gm, site.name), site, o.adapter, adapters_at(gm, site.owner)[o.adapter])
            added_sites += 1
        self._share(gm, kind)
        state_of(gm).origins.setdefault(o.adapter, origin)
        return PassResult(gm, added_sites > 0, {"sites": added_sites, "adapters": len(created),
                                                "params_added": added_params, "adapter": o.adapter})
