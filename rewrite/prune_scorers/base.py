"""The scorer interface of the prune pass (see rewrite/prune_scorers/__init__.py for the scorers)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
import torch.fx as fx
from torch import nn

from rewrite.coupling.groups import Group
from rewrite.sites import Site


@dataclass
class PruneScoreContext:
    gm: fx.GraphModule
    groups: list[Group]
    seed: int = 0
    data: Any = None                                  # rewrite.data.DataSource, for data-driven scorers
    options: dict[str, Any] = field(default_factory=dict)   # the method's own table (loraprune = {...}), steps, ...
    structures: dict[str, list[Group]] = field(default_factory=dict)  # target structure -> its groups
    targets: dict[str, float | int] = field(default_factory=dict)     # structure -> fraction or count
    scope: str = "layer"
    adapters: dict[str, nn.Module] = field(default_factory=dict)      # LoRA modules the adapter targets cut
    sites: dict[str, Site] = field(default_factory=dict)              # adapter path -> its site
    at: Callable[[str], str] = lambda key: "<spec>"                   # a spec key -> where it is, for errors


@dataclass
class Scores:
    units: dict[str, torch.Tensor]    # group name -> [len(group.units)]
    blocks: dict[str, torch.Tensor]   # group name -> [len(group.blocks)]
    modules: dict[str, float] = field(default_factory=dict)         # adapter path -> module importance
    ranks: dict[str, torch.Tensor] = field(default_factory=dict)    # adapter path -> [rank] component importance
    info: dict[str, Any] = field(default_factory=dict)              # what the scorer did (steps, seconds, ...)


class PruneScorer:
    name: ClassVar[str]
    needs_data: ClassVar[bool] = False

    def __call__(self, ctx: PruneScoreContext) -> Scores:
        raise NotImplementedError
