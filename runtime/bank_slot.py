"""One slot of a per-row export's banks, set to an adapter's tensors or cleared: what `AdapterSession.add_adapter` /
`remove_adapter` do to the session's banks and `rewrite triton --add/--remove` to a new model version's initializers.

    row banks   [capacity + 1, width]: the slot's row is the adapter's vector, or the vector's identity
    LoRA banks  A / B of every switchable site: the adapter's factors zero-padded to the site's rank (zeros where the
                adapter has none), laid out as the switching mode lays them (`SwitchableSite.put_slot`)
"""
from __future__ import annotations

import numpy as np

from rewrite.formats.manifest import UnmergedExport
from rewrite.runtime.adapter_source import AdapterTensors


def bank_names(entry: UnmergedExport) -> list[str]:
    """Every bank `fill_slot` writes (a fused group's shared A once)."""
    names = [name for r in entry.row_sites for name in r.banks.values()]
    names += [name for s in entry.sites for name in (s.A, s.B)]
    return list(dict.fromkeys(names))


def fill_slot(entry: UnmergedExport, banks: dict[str, np.ndarray], slot: int, tensors: AdapterTensors | None) -> None:
    """Set `slot` of `banks` ({bank name: array}, every one of `bank_names`, changed in place) to `tensors`, or clear
    it (None)."""
    for row_site in entry.row_sites:
        row_site.clear_slot(banks, slot)
    for name, vector in (tensors.rows if tensors else {}).items():
        banks[name][slot] = vector  # cast to the bank's dtype (float16 banks round here, as at export)
    factors = tensors.factors if tensors else {}
    for site in entry.sites:
        a_pad = np.zeros((site.d_in, site.rank), np.float32)
        b_pad = np.zeros((site.rank, site.d_out), np.float32)
        if site.site in factors:
            a, b = factors[site.site]
            a_pad[:, : a.shape[1]], b_pad[: b.shape[0]] = a, b
        site.put_slot(banks[site.A], banks[site.B], slot, a_pad, b_pad, entry.switching)
