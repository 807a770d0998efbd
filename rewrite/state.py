"""What the rewriter knows about a graph, kept in `gm.meta["rewrite"]`.

`RewriteState` holds the resolved site table, the adapters attached to each site, the spec entry that made each
adapter, the history of passes and the spec digest. Per node, `node.meta["rewrite"]` is an `AdapterTag`; because
node metadata does not survive a re-export, the same facts are recoverable from module paths
(`adapters.<site>.<name>`) and are written to `manifest.json` at export.
"""
from __future__ import annotations

import json
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


@dataclass(frozen=True)
class AdapterOrigin:
    """The spec entry that made an adapter: a second `insert` or `load` of that name with other options is
    refused, naming both entries; the same options again (a pass run twice, a repeated entry) are the same origin."""
    pass_name: str
    options: str  # the pass's options as JSON, input paths resolved
    where: str = field(default="<spec>", compare=False)  # the entry's spec location, for messages

    def differences(self, other: "AdapterOrigin") -> str:
        """What `other` sets differently ("rank = 8 here, 4 there"), for the refusal message."""
        if self.pass_name != other.pass_name:
            return f"{other.pass_name} here, {self.pass_name} there"
        mine, theirs = json.loads(self.options), json.loads(other.options)
        keys = [k for k in {**mine, **theirs} if mine.get(k) != theirs.get(k)]
        return "; ".join(f"{k} = {json.dumps(theirs.get(k))} here, {json.dumps(mine.get(k))} there" for k in keys)


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
    merged: dict[str, dict[str, dict]] = field(default_factory=dict)  # site -> {adapter folded in: its description}
    originals: dict[str, Any] = field(default_factory=dict)     # site -> base weight kept for unmerge
    origins: dict[str, AdapterOrigin] = field(default_factory=dict)  # adapter name -> the entry that made it

    def record(self, record: PassRecord) -> None:
        self.history.append(record)


def state_of(gm: fx.GraphModule) -> RewriteState:
    state = gm.meta.get("rewrite")
    if state is None:
        raise RuntimeError("graph was not captured by rewrite.capture (no gm.meta['rewrite'])")
    return state


def adapter_path(site: str, adapter: str) -> str:
    return f"{ADAPTER_ROOT}.{site}.{adapter}"
