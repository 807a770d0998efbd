"""Read an adapter from any source into what a switchable model consumes: per-site factors and row vectors.

Sources: a PEFT directory (LoRA, or an elementwise tuner: IA3, ROAD, BEFT), our `.safetensors` adapter file, an
`.onnx_adapter` file, or a dict {site: (A [d_in, r], B [r, d_out])} of float arrays whose B is already scaled
(integer, bool and object arrays are refused, not cast), or an `AdapterTensors` read before (checked again: Ray Serve
broadcasts what one replica read). Factors have the scale folded into B (B' = s B); an
elementwise adapter's vectors (`rewrite.formats.peft_rows.row_vectors`) go to the manifest's row site of the same
site, kind and layout, keyed by that site's input name. Validation against the model (site names, d_in, d_out, rank
limits, row-site kind / layout / width, dtype, finite values) happens here, before anything reaches ONNX Runtime,
which would silently accept overlapping names.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from rewrite.errors import AdapterFileError, AdapterSlotError, nearest
from rewrite.finite import check_tensors
from rewrite.formats.adapter_file import read_adapter_file
from rewrite.formats.manifest import ReservedSlots, RowSite
from rewrite.formats.onnx_adapter import read_onnx_adapter
from rewrite.formats.peft_dir import read_peft_dir
from rewrite.formats.peft_lora import LINEAR_KEYS, LORA_FORMAT, lora_scale, scale_of
from rewrite.formats.peft_rows import ROW_FORMATS, RowVectors, row_vectors

Factors = dict[str, tuple[np.ndarray, np.ndarray]]


class AdapterTensors(NamedTuple):
    factors: Factors                # site -> (A [d_in, r], B scaled [r, d_out]), float32
    rows: dict[str, np.ndarray]    # row-site input name -> vector [width], float32


def read_adapter(source: Any, sites: dict[str, dict[str, Any]], row_sites: Sequence[RowSite] = (), *,
                 model_version: int | None = None, dtype: str = "float32",
                 reserve: ReservedSlots | None = None) -> AdapterTensors:
    """The adapter's factors and row vectors as float32 numpy arrays, validated against `sites` (manifest entries,
    by site name) and `row_sites` (the manifest's).

    `model_version` (the manifest's) is checked against an `.onnx_adapter` file's own model version; `dtype` is the
    element type the model's adapter inputs take, which an `.onnx_adapter` file must match; `reserve` (the manifest's)
    is what the export reserved, named when an adapter needs a slot the model does not have (`AdapterSlotError`).
    """
    rows: dict[str, np.ndarray] = {}
    if isinstance(source, AdapterTensors):  # read before (one replica read it for all): checked again here
        factors, rows = dict(source.factors), dict(source.rows)
        where = "<adapter tensors>"
    elif isinstance(source, dict):
        factors = _from_dict(source)
        where = "<adapter dict>"
    elif not isinstance(source, (str, os.PathLike)):
        raise AdapterFileError(f"adapter source {type(source).__name__}: expected a path (PEFT directory, "
                               ".safetensors, .onnx_adapter) or a dict {site: (A, B)}")
    else:
        path = Path(source)
        where = str(path)
        if path.is_dir():
            factors, rows = _from_peft(path, row_sites)
        elif path.suffix == ".onnx_adapter":
            factors, rows = _from_onnx_adapter(path, sites, row_sites, model_version)
        elif path.suffix == ".safetensors":
            factors = _from_rewrite_file(path)
        elif not path.exists():
            raise AdapterFileError(f"{path}: adapter path does not exist")
        else:
            raise AdapterFileError(f"{path}: unknown adapter format (expected a PEFT directory, .safetensors or "
                                   ".onnx_adapter)")
    if not factors and not rows:
        raise AdapterFileError(f"{where}: the adapter has no tensors")
    _validate(factors, sites, where, np.dtype(dtype), reserve)
    _validate_rows(rows, row_sites, where, np.dtype(dtype))
    return AdapterTensors({site: (a.astype(np.float32, copy=False), b.astype(np.float32, copy=False))
                           for site, (a, b) in factors.items()},
                          {name: v.reshape(-1).astype(np.float32, copy=False) for name, v in rows.items()})


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


def _from_peft(path: Path, row_sites: Sequence[RowSite]) -> tuple[Factors, dict[str, np.ndarray]]:
    adapter = read_peft_dir(path, [LORA_FORMAT, *ROW_FORMATS])
    if adapter.copies:
        raise AdapterFileError(f"{path}: 'modules_to_save' copies {sorted(adapter.copies)} whole; a copy is a delta "
                               "on the base model's own weights, which a running export does not read back: export "
                               "the adapter with the model (rewrite bundle / the load pass), or merge it")
    if adapter.token_rows:
        raise AdapterFileError(f"{path}: 'trainable_token_indices' trains rows of {sorted(adapter.token_rows)}, "
                               "which a running export cannot switch (embedding rows are merged only): merge it")
    if adapter.format is not LORA_FORMAT:
        return {}, _place_rows(row_vectors(adapter), row_sites, str(path))
    key_a, key_b = LINEAR_KEYS
    out = {}
    for module, tensors in adapter.modules.items():
        if key_a not in tensors or tensors[key_a].ndim != 2:
            raise AdapterFileError(f"{path}: module {module!r}: only Linear / Conv1D LoRA can be switched at run time")
        a = tensors[key_a].astype(np.float32).T
        b = tensors[key_b].astype(np.float32).T * scale_of(adapter, module)
        out[module] = (np.ascontiguousarray(a), np.ascontiguousarray(b))
    return out, {}


def _place_rows(found: dict[str, RowVectors], row_sites: Sequence[RowSite], where: str) -> dict[str, np.ndarray]:
    """{row-site input name: vector} for each module of an elementwise adapter: the row site of its site, kind and
    layout (`AdapterSlotError` naming what the export holds there when it has none)."""
    out = {}
    for module, found_here in found.items():
        at = [r for r in row_sites if r.site == module]
        match = next((r for r in at if r.kind == found_here.kind and r.layout == found_here.layout), None)
        if match is None:
            layout = ", ".join(f"{k} {v}" for k, v in sorted(found_here.layout.items()))
            holds = "; ".join(r.describe() for r in at) or "no elementwise adapter"
            known = sorted({r.site for r in row_sites})
            hint = "" if at else f" (sites with row vectors: {', '.join(nearest(module, known)) or 'none'})"
            raise AdapterSlotError(f"{where}: site {module!r}: this {found_here.kind} adapter"
                                   f"{f' ({layout})' if layout else ''} has no slot in this export, which holds "
                                   f"{holds} there{hint}; an elementwise kind is served where the export was made "
                                   "with one of the same kind and layout at that site (export it with one, or merge)")
        if set(found_here.vectors) != set(match.banks):
            raise AdapterFileError(f"{where}: site {module!r}: {found_here.kind} vectors {sorted(found_here.vectors)},"
                                   f" the export's {match.describe()} takes {sorted(match.banks)}")
        out.update({match.banks[p]: v for p, v in found_here.vectors.items()})
    return out


def _from_rewrite_file(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    adapter = read_adapter_file(path)
    out = {}
    for owner, info in adapter.sites.items():
        scale = lora_scale(float(info.alpha), info.rank, info.rslora)
        parts = adapter.tensors[owner]
        out[owner] = (parts["lora_A"].astype(np.float32), parts["lora_B"].astype(np.float32) * scale)
    return out


def _from_onnx_adapter(path: Path, sites: dict[str, dict[str, Any]], row_sites: Sequence[RowSite],
                       model_version: int | None) -> tuple[Factors, dict[str, np.ndarray]]:
    version, params = read_onnx_adapter(path)
    if model_version is not None and version != model_version:
        raise AdapterFileError(f"{path}: adapter was written for another model (model_version {version}, this "
                               f"model's is {model_version}: tensor names or shapes differ)")
    pairs = {info[key]: (site, info["A"], info["B"]) for site, info in sites.items() for key in ("A", "B")}
    row_inputs = {name for r in row_sites for name in r.banks.values()}
    unknown = sorted(name for name in params if name not in pairs and name not in row_inputs)
    if unknown:
        known = [*pairs, *row_inputs]
        raise AdapterFileError(f"{path}: tensor {unknown[0]!r} is not an adapter input of this model. "
                               f"Nearest: {', '.join(nearest(unknown[0], known)) or '(none)'}")
    rows = {name: params.pop(name) for name in row_inputs & set(params)}
    out = {}
    for name in sorted(params):
        site, a_name, b_name = pairs[name]
        missing = b_name if name == a_name else a_name
        if missing not in params:
            raise AdapterFileError(f"{path}: has {name} but not its pair {missing}")
        out[site] = (params[a_name], params[b_name])
    return out, rows


def _reserved(reserve: ReservedSlots | None) -> str:
    """What the export reserved, and how to reserve more, for a slot error."""
    how = "[export] reserve = { rank = R, targets = [...] } (rewrite bundle --reserve-rank R --reserve-target SITE)"
    if reserve is None:
        return f"the export reserved nothing: slots are the exported adapters' sites and ranks; reserve with {how}"
    rank = f"rank {reserve.rank}" if reserve.rank is not None else "no rank"
    count = f"{len(reserve.sites)} site{'' if len(reserve.sites) == 1 else 's'}"
    targets = f"targets {reserve.targets} ({count})" if reserve.targets else "no targets"
    return f"the export reserved {rank} and {targets}; reserve more with {how}"


def _validate(factors: Factors, sites: dict[str, dict[str, Any]], where: str, dtype: np.dtype,
              reserve: ReservedSlots | None = None):
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


def _validate_rows(rows: dict[str, np.ndarray], row_sites: Sequence[RowSite], where: str, dtype: np.dtype) -> None:
    """Each vector [width] (an ort-adapters input's [1, 1, width] too) of its row site, float32 or the model's
    dtype, finite."""
    owner = {name: (r, p) for r in row_sites for p, name in r.banks.items()}
    for name, vector in rows.items():
        row_site, p = owner[name]
        if vector.dtype not in (np.float32, dtype):
            raise AdapterFileError(f"{where}: site {row_site.site!r}: {row_site.kind} vector {p} has dtype "
                                   f"{vector.dtype}, the model takes {dtype}")
        width = row_site.widths[p]
        if vector.shape not in ((width,), (1, 1, width)):
            raise AdapterFileError(f"{where}: site {row_site.site!r}: {row_site.kind} vector {p} has shape "
                                   f"{vector.shape}; the export's {row_site.describe()} takes [{width}]")
        check_tensors({name: vector}, f"{where}: site {row_site.site!r}", AdapterFileError)
