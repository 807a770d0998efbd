"""Our own adapter file: one safetensors file per adapter, tensors in our (matmul) layout.

    keys      <owner module path>.lora_A, <owner module path>.lora_B
    metadata  "rewrite": JSON {"format": "rewrite-adapter", "version": 1, "adapter": name, "kind": "lora",
                               "sites": {owner: {"op", "rank", "alpha", "rslora", "d_in", "d_out"}}}

The metadata is an `AdapterMeta`, validated strictly on both sides: ranks and sizes whole numbers >= 1, alpha a
finite number, rslora a bool, no unknown field; metadata and tensors must name the same sites.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from rewrite.errors import AdapterFileError
from rewrite.finite import nonfinite_key
from rewrite.formats.safetensors_file import read_safetensors, write_safetensors

FORMAT, VERSION = "rewrite-adapter", 1
METADATA_KEY = "rewrite"

Size = Annotated[StrictInt, Field(ge=1)]


class SiteInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    op: StrictStr
    rank: Size
    alpha: StrictInt | StrictFloat
    rslora: StrictBool
    d_in: Size
    d_out: Size


class AdapterMeta(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    format: Literal["rewrite-adapter"] = FORMAT
    version: StrictInt = VERSION  # `_meta` has checked it equals VERSION; strict refuses true and 1.0
    adapter: StrictStr
    kind: StrictStr
    sites: dict[str, SiteInfo]


@dataclass
class AdapterFile:
    path: Path
    meta: AdapterMeta
    tensors: dict[str, dict[str, np.ndarray]]  # owner -> {"lora_A": ..., "lora_B": ...}

    @property
    def sites(self) -> dict[str, SiteInfo]:
        return self.meta.sites


def write_adapter_file(path: Path, adapter: str, kind: str, sites: Mapping[str, SiteInfo | dict],
                       tensors: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    meta = AdapterMeta(adapter=adapter, kind=kind, sites=dict(sites))
    flat = {f"{owner}.{name}": array for owner, parts in tensors.items() for name, array in parts.items()}
    write_safetensors(path, flat, metadata={METADATA_KEY: meta.model_dump_json()})


def _meta(path: Path, text: str | None) -> AdapterMeta:
    if not text:
        raise AdapterFileError(f"{path}: safetensors file without rewrite adapter metadata; for PEFT adapters "
                               "give the PEFT directory (adapter_config.json + adapter_model.safetensors)")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise AdapterFileError(f"{path}: rewrite adapter metadata is not valid JSON: {err}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or raw.get("version") != VERSION:
        found = raw if not isinstance(raw, dict) else f"{raw.get('format')!r} v{raw.get('version')!r}"
        raise AdapterFileError(f"{path}: adapter format {found}, expected {FORMAT!r} v{VERSION}")
    key = nonfinite_key(raw.get("sites"), "sites")
    if key is not None:
        raise AdapterFileError(f"{path}: metadata '{key}' is NaN or Infinity; ranks and alphas must be finite")
    try:
        return AdapterMeta.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise AdapterFileError(f"{path}: metadata '{where}' is {first['input']!r}: {first['msg']}") from None


def read_adapter_file(path: Path) -> AdapterFile:
    flat, metadata = read_safetensors(path)
    meta = _meta(path, metadata.get(METADATA_KEY))
    tensors: dict[str, dict[str, np.ndarray]] = {}
    for key, array in flat.items():
        owner, _, name = key.rpartition(".")
        tensors.setdefault(owner, {})[name] = array
    missing = sorted(set(meta.sites) ^ set(tensors))
    if missing:
        raise AdapterFileError(f"{path}: metadata and tensors disagree on sites: {missing[:5]}")
    return AdapterFile(path, meta, tensors)
