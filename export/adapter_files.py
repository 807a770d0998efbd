"""Our own adapter file: one safetensors file per adapter, tensors in our (matmul) layout.

    keys      <owner module path>.lora_A, <owner module path>.lora_B
    metadata  "rewrite": JSON {"format": "rewrite-adapter", "version": 1, "adapter": name, "kind": "lora",
                               "sites": {owner: {"op", "rank", "alpha", "rslora", "d_in", "d_out"}}}
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rewrite.errors import AdapterFileError
from rewrite.finite import check_tensors, nonfinite_key

FORMAT, VERSION = "rewrite-adapter", 1


@dataclass
class AdapterFile:
    path: Path
    adapter: str
    kind: str
    sites: dict[str, dict[str, Any]]
    tensors: dict[str, dict[str, torch.Tensor]]  # owner -> {"lora_A": ..., "lora_B": ...}


def write_adapter_file(path: Path, adapter: str, kind: str, sites: dict[str, dict[str, Any]],
                       tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    flat = {f"{owner}.{name}": t.detach().contiguous().cpu() for owner, parts in tensors.items()
            for name, t in parts.items()}
    meta = {"format": FORMAT, "version": VERSION, "adapter": adapter, "kind": kind, "sites": sites}
    save_file(flat, path, metadata={"rewrite": json.dumps(meta)})


def read_adapter_file(path: Path) -> AdapterFile:
    try:
        with safe_open(path, framework="pt") as handle:
            meta_text = (handle.metadata() or {}).get("rewrite")
            flat = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # noqa: BLE001 - a corrupt file is bad input
        raise AdapterFileError(f"{path}: not a readable safetensors file: {err}") from None
    if not meta_text:
        raise AdapterFileError(f"{path}: safetensors file without rewrite adapter metadata; for PEFT adapters "
                               "give the PEFT directory (adapter_config.json + adapter_model.safetensors)")
    meta = json.loads(meta_text)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise AdapterFileError(f"{path}: adapter format {meta.get('format')!r} v{meta.get('version')!r}, "
                               f"expected {FORMAT!r} v{VERSION}")
    key = nonfinite_key(meta["sites"], "sites")
    if key is not None:
        raise AdapterFileError(f"{path}: metadata '{key}' is NaN or Infinity; ranks and alphas must be finite")
    check_tensors(flat, str(path), AdapterFileError)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        owner, _, name = key.rpartition(".")
        tensors.setdefault(owner, {})[name] = tensor
    missing = sorted(set(meta["sites"]) ^ set(tensors))
    if missing:
        raise AdapterFileError(f"{path}: metadata and tensors disagree on sites: {missing[:5]}")
    return AdapterFile(path, meta["adapter"], meta["kind"], meta["sites"], tensors)
