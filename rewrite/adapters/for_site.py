"""A new adapter module for a site: its kind built at the site's shapes, dtype, device and conv settings."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch.fx as fx

from rewrite.adapters import KINDS
from rewrite.errors import SpecError
from rewrite.graph_edit import conv_settings
from rewrite.sites import NORM_OPS, Site
from rewrite.state import state_of

ADAPTABLE_OPS = tuple(dict.fromkeys(op for kind in KINDS.values() for op in kind.ops))


def selectable_ops(kind_ops: Iterable[str]) -> tuple[str, ...]:
    """The site ops the targets of an adapter of a kind adapting `kind_ops` pick among: every adaptable op but the
    norms, which only kinds that adapt norms pick (`*attention*` keeps meaning the weight layers it meant before norm
    sites existed; a weight site the kind cannot adapt is still picked, and named as a misfit)."""
    return tuple(op for op in ADAPTABLE_OPS if op in kind_ops or op not in NORM_OPS)


def adapter_for_site(gm: fx.GraphModule, site: Site, kind: str, rank: int, alpha: float, *, rslora: bool,
                     dropout: float, init: str, where: str, options: Mapping[str, Any] | None = None):
    """Every kind is built as Kind(op, d_in, d_out, rank, alpha, *, rslora, dropout, init, conv, dtype, device,
    **options) and reads the settings it declares; `options` are its own (`Kind.Options`, validated). A kind that
    `reads_weight` also gets the base weight (`weight=`), one `built_with_base` the base weight and bias
    (`base_weight=`, `base_bias=`); an init of the kind's `weight_inits` rewrites the weight in place
    (`init_from_weight`). A kind refuses options that do not fit the site with a ValueError, which becomes a
    SpecError naming the site."""
    cls, weight = KINDS[kind], gm.get_parameter(site.weight)
    site_weight = dict(weight=weight) if cls.reads_weight else {}
    if cls.built_with_base:
        site_weight.update(base_weight=weight, base_bias=gm.get_parameter(site.bias) if site.bias else None)
    try:
        module = cls(site.op, site.d_in, site.d_out, rank, alpha, rslora=rslora, dropout=dropout, init=init,
                     conv=conv_settings(gm, site, where), dtype=weight.dtype, device=weight.device, **site_weight,
                     **dict(options or {}))
        if init in cls.weight_inits:
            _check_untied(gm, site, init)
            module.init_from_weight(weight)
    except ValueError as err:
        raise SpecError(f"{where}: {site.name}: {err}") from None
    return module


def _check_untied(gm: fx.GraphModule, site: Site, init: str) -> None:
    """A weight another module also reads (tied embeddings) would change there too."""
    others = sorted({s.owner for s in state_of(gm).sites.values() if s.weight == site.weight and s.owner != site.owner})
    if others:
        raise ValueError(f"init = {init!r} rewrites the base weight {site.weight}, which {', '.join(others)} also "
                         "reads (tied weights); use another init there")
