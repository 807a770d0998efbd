"""Options shared by the passes that decide ranks (`allocate`, and `train` with an allocator).

    budget = { params = N }          # or flops = N, bytes = N, latency_ms = x (absolute),
                                     # or { fraction = f, metric = "params", rank = r }: f times the cost of
                                     #    uniform rank r (default: each adapter's current rank)
    min_rank = 0                     # lo_k <= r_k <= hi_k at every site; 0 lets a site lose its branch
    max_rank = 16
    min_rank_pattern = { "*.q_proj" = 2 }    # per site: exact > glob/regex > class > the global value
    max_rank_pattern = { "*.mlp.*" = 32 }    # a pattern value 0 drops those sites

The training scorers (adalora, increlora) count their budget in ranks (`rewrite.allocators.budget_in_ranks`)
and accept params and fraction (metric params) only.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from rewrite.pass_infra import PassOptions
from rewrite.sites import check_selector_syntax

ABSOLUTE = {"params": "params", "flops": "flops", "bytes": "bytes", "latency_ms": "latency"}


class BudgetOptions(PassOptions):
    params: float | None = Field(default=None, ge=0)
    flops: float | None = Field(default=None, ge=0)
    bytes: float | None = Field(default=None, ge=0)
    latency_ms: float | None = Field(default=None, ge=0)
    fraction: float | None = Field(default=None, gt=0)
    metric: Literal["params", "flops", "bytes", "latency"] | None = None
    rank: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one(self) -> "BudgetOptions":
        given = [k for k in (*ABSOLUTE, "fraction") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("budget needs exactly one of params, flops, bytes, latency_ms (absolute) or fraction "
                             f"(of a uniform-rank baseline); got {given or 'none'}")
        if given[0] != "fraction" and (self.metric is not None or self.rank is not None):
            raise ValueError("budget: 'metric' and 'rank' go with 'fraction' only")
        return self

    @property
    def metric_name(self) -> str:
        for key, metric in ABSOLUTE.items():
            if getattr(self, key) is not None:
                return metric
        return self.metric or "params"

    def text(self) -> str:
        parts = [f"{k} = {getattr(self, k):g}" if isinstance(getattr(self, k), float) else f"{k} = {getattr(self, k)!r}"
                 for k in ("params", "flops", "bytes", "latency_ms", "fraction", "metric", "rank")
                 if getattr(self, k) is not None]
        return "{ " + ", ".join(parts) + " }"


class RankBoundsOptions(PassOptions):
    """Per-site rank bounds; what a pass that has them resolves with `rewrite.sites.resolve`."""
    min_rank: int = Field(default=0, ge=0)
    max_rank: int | None = Field(default=None, ge=1)
    min_rank_pattern: dict[str, int] = {}
    max_rank_pattern: dict[str, int] = {}

    @field_validator("min_rank_pattern", "max_rank_pattern")
    @classmethod
    def _pattern_keys(cls, mapping: dict[str, int]) -> dict[str, int]:
        for key, value in mapping.items():
            check_selector_syntax(key)
            if value < 0:
                raise ValueError(f"{key!r}: ranks must be >= 0, got {value}")
        return mapping

    @model_validator(mode="after")
    def _bounds(self) -> "RankBoundsOptions":
        if self.max_rank is not None and self.min_rank > self.max_rank:
            raise ValueError(f"min_rank = {self.min_rank} is above max_rank = {self.max_rank}")
        return self

    def has_bounds(self) -> bool:
        return bool(self.min_rank or self.max_rank is not None or self.min_rank_pattern or self.max_rank_pattern)


__all__ = ["ABSOLUTE", "BudgetOptions", "RankBoundsOptions"]
