"""A new adapter module for a site: its kind built at the site's shapes, dtype, device and conv settings."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.fx as fx

from rewrite.adapters import KINDS
from rewrite.graph_edit import conv_settings
from rewrite.sites import Site

ADAPTABLE_OPS = tuple(dict.fromkeys(op for kind in KINDS.values() for op in kind.ops))


def adapter_for_site(gm: fx.GraphModule, site: Site, kind: str, rank: int, alpha: float, *, rslora: bool,
                     dropout: float, init: str, where: str, options: Mapping[str, Any] | None = None):
    """Every kind is built as Kind(op, d_in, d_out, rank, alpha, *, rslora, dropout, init, conv, dtype, device,
    **options) and reads the settings it declares; `options` are its own (`Kind.Options`, validated)."""
    weight = gm.get_parameter(site.weight)
    return KINDS[kind](site.op, site.d_in, site.d_out, rank, alpha, rslora=rslora, dropout=dropout, init=init,
                       conv=conv_settings(gm, site, where), dtype=weight.dtype, device=weight.device,
                       **dict(options or {}))
