"""insert: add a named adapter to every selected site.

    kind = "lora"       y = base(x) + s * B(A(dropout(x))),         s = alpha / r  (rsLoRA: alpha / sqrt(r))
    kind = "svd_lora"   y = base(x) + c * P (lam (.) (Q dropout(x))),  c = alpha / (r + 1e-5)
                        (AdaLoRA's SVD form, rewrite/adapters/svd_lora.py: lam = 0, P, Q ~ N(0, 0.02^2))

Rules:
1. `targets` select sites (glob, `re:`, `class:`, exact or dotted-suffix name); each must match a site.
2. `rank_pattern` / `alpha_pattern` override rank and alpha per site with the selector precedence
   exact > first glob/regex > class > the global `rank` / `alpha`.
3. One adapter module per weight owner: every call of that module gets a branch from the same adapter.
4. A site that already has an adapter of this name is left alone (a second run reports modified=False).
5. New parameters take the base weight's dtype and device (meta stays meta: no memory is allocated).
6. `svd_lora` goes on linear, Conv1D and conv2d sites (not embeddings), with init = "zeros" (its one init)
   and without rslora; anything else is an error naming the site or the key.
With an identity init (`zeros`, `gaussian`) the outputs are unchanged, which `--verify` checks.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.fx as fx
from pydantic import Field, field_validator, model_validator

from rewrite.adapters.for_site import ADAPTABLE_OPS, adapter_for_site
from rewrite.errors import SpecError
from rewrite.graph_edit import has_adapter, register_adapter, wire
from rewrite.names import ADAPTER_NAME
from rewrite.pass_infra import GraphPass, PassOptions, PassResult
from rewrite.sites import check_mapping, check_selector_syntax, resolve, select
from rewrite.state import state_of

SVD_OPS = ("linear", "conv1d", "conv2d")


class InsertOptions(PassOptions):
    adapter: str = Field(default="default", pattern=ADAPTER_NAME)
    kind: Literal["lora", "svd_lora"] = "lora"
    targets: list[str] = Field(min_length=1)
    rank: int = Field(default=8, ge=1)
    alpha: float = 8.0
    rslora: bool = False
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    init: Literal["zeros", "gaussian"] = "zeros"
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    seed: int = 0

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

    @model_validator(mode="after")
    def _svd_form(self) -> "InsertOptions":
        if self.kind == "svd_lora" and (self.rslora or self.init != "zeros"):
            raise ValueError("kind = \"svd_lora\" scales by alpha / r and starts from PEFT's AdaLoRA init (lam = 0): "
                             "rslora and init = \"gaussian\" do not apply to it")
        return self


class InsertPass(GraphPass):
    name = "insert"
    Options = InsertOptions

    def preserves_outputs(self) -> bool:
        return self.options.init in ("zeros", "gaussian")

    def call(self, gm: fx.GraphModule) -> PassResult:
        o, where = self.options, self.context.where
        table = state_of(gm).sites
        sites = select(table, o.targets, self.context.at("targets"), ops=ADAPTABLE_OPS)
        check_mapping(table, o.rank_pattern, f"{self.context.at('rank_pattern')} rank_pattern")
        check_mapping(table, o.alpha_pattern, f"{self.context.at('alpha_pattern')} alpha_pattern")
        for key, value in o.rank_pattern.items():
            if value < 1:
                raise SpecError(f"{where}: rank_pattern[{key!r}] = {value}; ranks must be >= 1")
        if o.kind == "svd_lora":
            embeddings = [s.name for s in sites if s.op not in SVD_OPS]
            if embeddings:
                raise SpecError(f"{self.context.at('targets')}: kind = \"svd_lora\" adapts linear, Conv1D and conv2d "
                                f"sites; {embeddings[:3]} are embeddings (use kind = \"lora\" there)")
        torch.manual_seed(o.seed)
        added_params, added_sites, created = 0, 0, set()
        for site in sites:
            if has_adapter(gm, site.owner, o.adapter) and site.owner not in created:
                continue
            if site.owner not in created:
                rank = resolve(site, o.rank, o.rank_pattern, where)
                alpha = resolve(site, o.alpha, o.alpha_pattern, where)
                module = adapter_for_site(gm, site, o.kind, rank, alpha, rslora=o.rslora, dropout=o.dropout,
                                      init=o.init, where=where)
                register_adapter(gm, site.owner, o.adapter, module)
                added_params += sum(p.numel() for p in module.parameters())
                created.add(site.owner)
            wire(gm, table.node_of(gm, site.name), site, o.adapter, o.kind)
            added_sites += 1
        return PassResult(gm, added_sites > 0, {"sites": added_sites, "adapters": len(created),
                                                "params_added": added_params, "adapter": o.adapter})
