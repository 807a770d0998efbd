"""Connected components of a large sparse graph of integer ids, vectorised (hooking + pointer jumping).

    roots = components(n, a, b)     roots[i] = the smallest id of the component of i; edges (a[k], b[k])

Each round hooks the larger root of every edge onto the smaller (scatter amin), then jumps pointers until every id
points at a root; rounds repeat until every edge joins one root. Millions of edges take milliseconds, where a Python
union-find (or networkx on the element graph) takes seconds.
"""
from __future__ import annotations

import torch


def components(n: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    parent = torch.arange(n, dtype=torch.long)
    if a.numel() == 0:
        return parent
    while True:
        pa, pb = parent[a], parent[b]
        if bool((pa == pb).all()):
            return parent
        low = torch.minimum(pa, pb)
        parent.scatter_reduce_(0, pa, low, reduce="amin")
        parent.scatter_reduce_(0, pb, low, reduce="amin")
        while True:
            jumped = parent[parent]
            if bool((jumped == parent).all()):
                break
            parent = jumped
