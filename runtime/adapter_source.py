"""Read an adapter from any source into per-site factors for a switchable model.

Sources: a PEFT directory, our `.safetensors` adapter file, an `.onnx_adapter` file, or a dict
{site: (A [d_in, r], B [r, d_out])} of float arrays whose B is already scaled (integer, bool and object arrays are
refused, not cast). The result has the scale folded into B (B' = s B), which is what the exported model consumes.
Validation against the model's sites (names, d_in, d_out, rank limits, dtype, finite values) happens here, before
anything reaches ONNX Runtime, which would silently accept overlapping names.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from rewrite.errors import AdapterFileError, AdapterSlotError, nearest
from rewrite.finite import check_tensors
from rewrite.formats.adapter_file import read_adapter_file
from rewrite.formats.manifest import ReservedSlots
from rewrite.formats.onnx_adapter import read_onnx_adapter
from rewrite.formats.peft_lora import LINEAR_KEYS, lora_scale, read_lora_dir, scale_of


def read_factors(source: Any, sites: dict[str, dict[str, Any]], *, model_version: int | None = None,
                 dtype: str = "float32",
                 reserve: ReservedSlots | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{site: (A, B scaled)} as float32 numpy arrays, validated against `sites` (manifest entries).

    `model_version` (the manifest's) is checked against an `.onnx_adapter` file's own model version; `dtype` is the
    element type the model's adapter inputs take, which an `.onnx_adapter` file must match; `reserve` (the manifest's)
    is what the export reserved, named when an adapter needs a slot the model does not have (`AdapterSlotError`).
    """
    if isinstance(source, dict):
        factors = _from_dict(source)
        where = "<adapter dict>"
    elif not isinstance(source, (str, os.PathLike)):
        raise AdapterFileError(f"adapter source {type(source).__name__}: expected a path (PEFT directory, "
                               ".safetensors, .onnx_adapter) or a dict {site: (A, B)}")
    else:
        path = Path(source)
        where = str(path)
        if path.is_dir():
            factors = _from_peft(path)
        elif path.suffix == ".onnx_adapter":
            factors = _from_onnx_adapter(path, sites, model_version)
        elif path.suffix == ".safetensors":
            factors = _from_rewrite_file(path)
        elif not path.exists():
            raise AdapterFileError(f"{path}: adapter path does not exist")
        else:
            raise AdapterFileError(f"{path}: unknown adapter format (expected a PEFT directory, .safetensors or "
                                   ".onnx_adapter)")
    _validate(factors, sites, where, np.dtype(dtype), reserve)
    return {site: (a.astype(np.float32, copy=False), b.astype(np.float32, copy=False))
            for site, (a, b) in factors.items()}


def _from_dict(source: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{site: (A, B)} given in Python: pairs of float arrays (integers, bools and objects are refused, not cast)."""
    out = {}
    for site, pair in source.items():
        if not isinstance(site, str):
            raise AdapterFileError(f"<adapter dict>: key {site!r} is not a site name")
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise AdapterFileError(f"<adapter dict>: site {site!r}: expected a pair (A [d_in, r], B [r, d_out]), "
                                   f"got {type(pair).__name__}")
        out[site] = (_float32(pair[0], f"site {site!r}: A"), _float32(pair[1], f"site {site!r}: B"))
    return out


def _float32(value: Any, what: str) -> np.ndarray:
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as err:  # ragged nested lists
        raise AdapterFileError(f"<adapter dict>: {what} is not an array: {err}") from None
    if array.dtype.kind != "f":
        raise AdapterFileError(f"<adapter dict>: {what} has dtype {array.dtype}; adapter weights are floats")
    with np.errstate(over="ignore"):
        cast = array.astype(np.float32)
    if np.isfinite(array).all() and not np.isfinite(cast).all():
        raise AdapterFileError(f"<adapter dict>: {what} has values beyond float32's range (max abs "
                               f"{float(np.abs(array).max()):.3g}); the model computes in float32")
    return cast


def _from_peft(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    adapter = read_lora_dir(path)
    key_a, key_b = LINEAR_KEYS
    out = {}
    for module, tensors in adapter.modules.items():
        if key_a not in tensors or tensors[key_a].ndim != 2:
            raise AdapterFileError(f"{path}: module {module!r}: only Linear / Conv1D LoRA can be switched at run time")
        a = tensors[key_a].astype(np.float32).T
        b = tensors[key_b].astype(np.float32).T * scale_of(adapter, module)
        out[module] = (np.ascontiguousarray(a), np.ascontiguousarray(b))
    return out


def _from_rewrite_file(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    adapter = read_adapter_file(path)
    out = {}
    for owner, info in adapter.sites.items():
        scale = lora_scale(float(info.alpha), info.rank, info.rslora)
        parts = adapter.tensors[owner]
        out[owner] = (parts["lora_A"].astype(np.float32), parts["lora_B"].astype(np.float32) * scale)
    return out


def _from_onnx_adapter(path: Path, sites: dict[str, dict[str, Any]],
                       model_version: int | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    version, params = read_onnx_adapter(path)
    if model_version is not None and version != model_version:
        raise AdapterFileError(f"{path}: adapter was written for another model (model_version {version}, this "
                               f"model's is {model_version}: tensor names or shapes differ)")
    pairs = {info[key]: (site, info["A"], info["B"]) for site, info in sites.items() for key in ("A", "B")}
    unknown = sorted(name for name in params if name not in pairs)
    if unknown:
        raise AdapterFileError(f"{path}: tensor {unknown[0]!r} is not an adapter input of this model. "
                               f"Nearest: {', '.join(nearest(unknown[0], pairs)) or '(none)'}")
    out = {}
    for name in sorted(params):
        site, a_name, b_name = pairs[name]
        missing = b_name if name == a_name else a_name
        if missing not in params:
            raise AdapterFileError(f"{path}: has {name} but not its pair {missing}")
        out[site] = (params[a_name], params[b_name])
    return out


def _reserved(reserve: ReservedSlots | None) -> str:
    """What the export reserved, and how to reserve more, for a slot error."""
    how = "[export] reserve = { rank = R, targets = [...] } (rewrite bundle --reserve-rank R --reserve-target SITE)"
    if reserve is None:
        return f"the export reserved nothing: slots are the exported adapters' sites and ranks; reserve with {how}"
    rank = f"rank {reserve.rank}" if reserve.rank is not None else "no rank"
    count = f"{len(reserve.sites)} site{'' if len(reserve.sites) == 1 else 's'}"
    targets = f"targets {reserve.targets} ({count})" if reserve.targets else "no targets"
    return f"the export reserved {rank} and {targets}; reserve more with {how}"


def _validate(factors: dict[str, tuple[np.ndarray, np.ndarray]], sites: dict[str, dict[str, Any]], where: str,
              dtype: np.dtype, reserve: ReservedSlots | None = None):
    if not factors:
        raise AdapterFileError(f"{where}: the adapter has no tensors")
    for site, (a, b) in factors.items():
        if site not in sites:
            raise AdapterSlotError(f"{where}: site {site!r} has no switchable adapter slot in this model "
                                   f"(nearest: {', '.join(nearest(site, sites)) or 'none'}); {_reserved(reserve)}")
        info = sites[site]
        if a.dtype not in (np.float32, dtype) or b.dtype not in (np.float32, dtype):
            raise AdapterFileError(f"{where}: site {site!r}: dtypes {a.dtype}/{b.dtype}, the model takes {dtype}")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != info["d_in"] or b.shape[1] != info["d_out"] \
                or a.shape[1] != b.shape[0] or a.shape[1] == 0:
            raise AdapterFileError(f"{where}: site {site!r}: shapes A {a.shape}, B {b.shape} do not fit "
                                   f"d_in={info['d_in']}, d_out={info['d_out']} (A [d_in, r], B [r, d_out], r >= 1)")
        limit = info.get("rank_limit")
        if limit is not None and a.shape[1] > limit:
            raise AdapterSlotError(f"{where}: site {site!r}: rank {a.shape[1]} exceeds the bank's rank {limit} "
                                   f"for this site ({_reserved(reserve)}; ort-adapters takes any rank)")
        check_tensors({info["A"]: a, info["B"]: b}, f"{where}: site {site!r}", AdapterFileError)
