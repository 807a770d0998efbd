"""What the rewriter knows about a graph, kept in `gm.meta["rewrite"]`.

`RewriteState` holds the resolved site table, the adapters attached to each site, the history of passes
and the spec digest. Per node, `node.meta["rewrite"]` is an `AdapterTag`; because node metadata does not
survive a re-export, the same facts are recoverable from module paths (`adapters.<site>.<name>`) and are
written to `manifest.json` at export.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

ADAPTER_ROOT = "adapters"


@dataclass(frozen=True)
class AdapterTag:
    site: str
    kind: str
    adapter: str
    role: str  # "delta" (the adapter's call) or "join" (the add that joins it to the base op)


@dataclass
class PassRecord:
    name: str
    modified: bool
    seconds: float
    stats: dict[str, Any]


@dataclass
class RewriteState:
    sites: Any  # rewrite.sites.SiteTable
    spec_digest: str | None = None
    frontend: str = "export"
    device: str = "cpu"
    inputs: Any = None  # rewrite.inputs.ExampleInputs used for capture, --verify and --check
    history: list[PassRecord] = field(default_factory=list)
    merged: dict[str, list[str]] = field(default_factory=dict)  # site -> adapters folded into its weight
    originals: dict[str, Any] = field(default_factory=dict)     # site -> base weight kept for unmerge

    def record(self, record: PassRecord) -> None:
        self.history.append(record)


def state_of(gm: fx.GraphModule) -> RewriteState:
    state = gm.meta.get("rewrite")
    if state is None:
        raise RuntimeError("graph was not captured by rewrite.capture (no gm.meta['rewrite'])")
    return state


def adapter_path(site: str, adapter: str) -> str:
    return f"{ADAPTER_ROOT}.{site}.{adapter}"
