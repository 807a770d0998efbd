"""`manifest.json`, one typed definition: the exporter writes a `Manifest`, the runtime reads one back.

    {"format": "rewrite-manifest", "version": 1,
     "versions": {...}, "source": {...}, "inputs": {...}, "sites": [...], "adapters": [...], "history": [...],
     "exports": [ {"mode": "merged", ...} | {"mode": "unmerged", "switching": ..., "sites": [...], ...} ]}

`read_manifest` turns every problem of the file (missing, not JSON, NaN / Infinity, not an object, unknown
format or version, a missing, unknown or mistyped field) into a `DeploymentError` that names the file and the
field path (`out/manifest.json: 'exports[0].sites[3].d_in': expected an integer`). Types are strict (no
coercion from strings, no bool for an integer), numbers finite, and every file the manifest names is a relative
path that stays inside the manifest's directory. Torch-free: the runtime imports it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr,
                      ValidationError, model_validator)

from rewrite.errors import DeploymentError
from rewrite.names import ADAPTER_NAME, RULE

MANIFEST = "manifest.json"
FORMAT = "rewrite-manifest"
VERSION = 1


def _inside(name: str) -> str:
    """A file name from the manifest, read relative to its directory: never absolute, never through '..'."""
    path = PurePosixPath(name)
    if not name or "\\" in name or "\x00" in name or path.is_absolute() or ".." in path.parts:
        raise ValueError(f"file {name!r} must be a relative path inside the manifest's directory")
    return name


RelativeFile = Annotated[str, AfterValidator(_inside)]
AdapterName = Annotated[str, Field(pattern=ADAPTER_NAME)]
Count = Annotated[int, Field(ge=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, validate_assignment=True)


class Source(_Strict):
    model: str
    spec_sha256: str | None
    frontend: str
    device: str


class InputInfo(_Strict):
    shape: list[int]
    dtype: str
    dims: list[str | None]


class SiteInfo(_Strict):
    name: str
    op: str
    module_class: str
    weight: str
    d_in: Count
    d_out: Count


class _Adapter(_Strict):
    """An adapter at a site, as its kind describes itself (`AdapterKind.manifest_entry`)."""
    site: str
    adapter: str
    kind: str
    op: str
    rank: Count | None = None  # low-rank kinds
    alpha: float | None = None
    rslora: bool | None = None
    scaling: float | None = None


class LiveAdapter(_Adapter):
    state: Literal["live"] = "live"


class MergedAdapter(_Adapter):
    """Folded into the site's weights: what it was when merged."""
    state: Literal["merged"] = "merged"


class HistoryEntry(_Strict):
    name: str
    modified: bool
    seconds: float
    stats: dict[str, Any]


class TensorInfo(_Strict):
    """An input or output of an exported model: its name, numpy dtype name and axes (an int for a fixed size, a
    name for a dynamic one)."""
    name: str
    dtype: str
    dims: list[str | int]


class MergedExport(_Strict):
    mode: Literal["merged"] = "merged"
    file: RelativeFile
    nodes: int
    op_types: list[str]
    external_data: bool
    inputs: list[TensorInfo] | None = None  # optional: manifests before named outputs have neither
    outputs: list[TensorInfo] | None = None
    check_max_abs_diff: float | None = None


class SwitchableSite(_Strict):
    """One site of an unmerged export: its A / B model inputs (banks for bank / custom-op) and their sizes. The sites
    of a fused group (`fuse`) share one A: each one's block starts at column `A_offset` of its rank axis."""
    site: str
    op: str
    d_in: Count
    d_out: Count
    rank: Count
    A: str
    B: str
    A_offset: Annotated[int, Field(ge=0)] = 0

    def put_slot(self, a_bank, b_bank, slot: int, a, b, switching: str) -> None:
        """Write one slot's A [d_in, rank] and B [rank, d_out] into this site's banks, in place (numpy arrays):
        bank [d_in, C rank] / [C rank, d_out] (slot-major), custom-op [C, d_in, rank] / [C, rank, d_out]."""
        o, r = self.A_offset, self.rank
        if switching == "custom-op":
            a_bank[slot, :, o:o + r], b_bank[slot] = a, b
        else:
            a_bank[:, o + slot * r:o + (slot + 1) * r], b_bank[slot * r:(slot + 1) * r] = a, b


class RowSite(_Strict):
    """One site of a row-switched kind ((IA)^3, RoAd, BitFit, OFT, HRA, LN tuning, DoRA's / BOFT's parts) and layout (`layout`: the kind's `row_layout()`, e.g.
    RoAd's group_size). Per vector of the kind an adapter input (`banks`: vector name -> input name) rewriting the
    base op's input or output (`join`):
        bank / custom-op  [capacity + 1, width]: row k slot k, the last row the vector's `identity` value, which ids
                          outside the slots (-1) gather
        ort-adapters      [1, 1, width], defaulting to the identity (the base model); an adapter's file feeds it per
                          run"""
    site: str
    kind: str
    op: str
    join: Literal["input", "output"]
    widths: dict[str, Count]  # vector name -> its width (HRA's vectors differ: V [r d], M [r r])
    banks: dict[str, str]
    identity: dict[str, float]
    layout: dict[str, StrictInt | StrictFloat | StrictStr | StrictBool] = {}

    @model_validator(mode="after")
    def _one_identity_per_bank(self) -> "RowSite":
        if not set(self.banks) == set(self.identity) == set(self.widths):
            raise ValueError(f"banks {sorted(self.banks)}, identity {sorted(self.identity)} and widths "
                             f"{sorted(self.widths)} name other vectors")
        return self

    def clear_slot(self, banks: dict, slot: int) -> None:
        """Set `slot` of every bank of this site (numpy arrays, in place) to the identity."""
        for vector, name in self.banks.items():
            banks[name][slot] = self.identity[vector]

    def describe(self) -> str:
        """What this site holds, for errors: `ia3 on the output (widths l 32)`, `road on the output (group_size 8)`."""
        layout = ", ".join(f"{k} {v}" for k, v in sorted(self.layout.items()))
        widths = ", ".join(f"{k} {v}" for k, v in sorted(self.widths.items()))
        return f"{self.kind} on the {self.join} ({layout or f'widths {widths}'})"


class ReservedSlots(_Strict):
    """`[export] reserve` as exported: `rank` (bank / custom-op: the least slot rank of every site, so an adapter
    added later may have any rank up to it), `targets` as written and the `sites` they selected, which have a slot
    whether or not an exported adapter touches them."""
    rank: Count | None
    targets: list[str]
    sites: list[str]


class ExportedAdapter(_Strict):
    slot: int | None = None          # bank / custom-op: its slot in the banks
    file: RelativeFile | None = None  # ort-adapters: its .onnx_adapter file


class UnmergedExport(_Strict):
    mode: Literal["unmerged"] = "unmerged"
    file: RelativeFile
    switching: Literal["ort-adapters", "bank", "custom-op"]
    model_version: int
    nodes: int
    op_types: list[str]
    external_data: bool
    capacity: Count | None
    bank_dtype: Literal["float32", "float16"] | None
    ids_input: str | None
    sites: list[SwitchableSite]
    row_sites: list[RowSite] = []  # elementwise kinds: gathered per row (bank / custom-op), fed per run
    adapters: dict[AdapterName, ExportedAdapter]
    reserve: ReservedSlots | None = None
    inputs: list[TensorInfo] | None = None  # optional, as in MergedExport
    outputs: list[TensorInfo] | None = None
    check_max_abs_diff: float | None = None

    @property
    def routed(self) -> bool:
        """Per-row switching: banks inside the model and an ids input."""
        return self.switching != "ort-adapters"

    @model_validator(mode="after")
    def _fits_its_switching(self) -> "UnmergedExport":
        if self.routed:
            for key in ("capacity", "bank_dtype", "ids_input"):
                if getattr(self, key) is None:
                    raise ValueError(f"switching {self.switching!r} needs '{key}'")
            slots = [(name, info.slot) for name, info in self.adapters.items()]
            for name, slot in slots:
                if slot is None or not 0 <= slot < self.capacity:
                    raise ValueError(f"adapters.{name}.slot: {slot!r} is not a bank slot 0..{self.capacity - 1}")
            if len({slot for _, slot in slots}) < len(slots):
                raise ValueError(f"two adapters share a bank slot: {dict(slots)}")
        else:
            missing = [name for name, info in self.adapters.items() if info.file is None]
            if missing:
                raise ValueError(f"adapters.{missing[0]}.file: ort-adapters needs each adapter's .onnx_adapter file")
        return self


ExportEntry = Annotated[Union[MergedExport, UnmergedExport], Field(discriminator="mode")]
MODES = ("merged", "unmerged")


class Manifest(_Strict):
    format: Literal["rewrite-manifest"] = FORMAT
    version: Literal[1] = VERSION
    versions: dict[str, str | None]
    source: Source
    inputs: dict[str, InputInfo]
    sites: list[SiteInfo]
    adapters: list[Annotated[Union[LiveAdapter, MergedAdapter], Field(discriminator="state")]]
    history: list[HistoryEntry]
    exports: list[ExportEntry]


def write_manifest(path: Path, manifest: Manifest) -> None:
    # pass stats are free-form: a value JSON cannot hold is written as its str(), as it is shown
    path.write_text(manifest.model_dump_json(indent=2, fallback=str) + "\n")


def read_manifest(directory: Path) -> Manifest:
    """The manifest of a deployment directory, validated; any problem is a `DeploymentError` naming the field."""
    file = Path(directory) / MANIFEST
    if not file.is_file():
        raise DeploymentError(f"{directory}: no {MANIFEST} (was this written by `rewrite apply`?)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"), parse_constant=_no_constant, parse_float=_finite)
    except OSError as err:
        raise DeploymentError(f"{file}: cannot be read: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise DeploymentError(f"{file}: not a UTF-8 text file") from None
    except json.JSONDecodeError as err:
        raise DeploymentError(f"{file}: not JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except ValueError as err:  # NaN / Infinity from the hooks below
        raise DeploymentError(f"{file}: {err}") from None
    except RecursionError:
        raise DeploymentError(f"{file}: nested too deeply to be a manifest") from None
    if not isinstance(data, dict):
        raise DeploymentError(f"{file}: expected a JSON object, got {_json_type(data)}")
    for key in ("format", "version"):
        if key not in data:
            raise DeploymentError(f"{file}: '{key}': missing")
    if data["format"] != FORMAT:
        raise DeploymentError(f"{file}: 'format': expected {FORMAT!r}, got {_shown(data['format'])}")
    if type(data["version"]) is not int or data["version"] != VERSION:
        raise DeploymentError(f"{file}: 'version': unknown manifest version {_shown(data['version'])}; this "
                              f"rewrite reads version {VERSION}")
    try:
        return Manifest.model_validate(data)
    except ValidationError as err:
        problems = [_problem(p) for p in err.errors(include_url=False)]
        more = f"\n({len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DeploymentError("\n".join(f"{file}: {p}" for p in problems[:5]) + more) from None


def _no_constant(word: str) -> float:
    raise ValueError(f"{word} is not a number here (NaN / Infinity are refused)")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    return value


_EXPECTED = {"int_type": "an integer", "int_from_float": "an integer", "float_type": "a number",
             "finite_number": "a finite number", "string_type": "a string", "bool_type": "true or false",
             "list_type": "a list", "dict_type": "an object", "model_type": "an object", "model_attributes_type":
             "an object", "none_required": "null"}


def _problem(problem: dict[str, Any]) -> str:
    """One validation problem as `'exports[0].sites[3].d_in': expected an integer, got "64"`."""
    loc, kind = list(problem["loc"]), problem["type"]
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        loc.append(problem["ctx"]["discriminator"].strip("'"))
    if loc and loc[-1] == "[key]":  # a dict key (an adapter name) failed its pattern
        return f"'{_field_path(loc[:-2])}': adapter name {_shown(problem['input'])}: {RULE}"
    path = _field_path(loc)
    if kind in ("missing", "union_tag_not_found"):
        return f"'{path}': missing"
    if kind == "extra_forbidden":
        return f"'{path}': unknown field"
    if kind == "union_tag_invalid":
        return f"'{path}': expected one of {problem['ctx']['expected_tags']}, got {_shown(problem['ctx']['tag'])}"
    if kind in _EXPECTED:
        text = f"expected {_EXPECTED[kind]}"
    else:
        text = problem["msg"].removeprefix("Value error, ").replace("Input should be", "expected", 1)
    return f"'{path}': {text}, got {_shown(problem['input'])}" if kind != "value_error" else f"'{path}': {text}"


def _field_path(loc: list[Any]) -> str:
    out = ""
    for index, part in enumerate(loc):
        # a tagged union adds the tag it chose to the path: exports[0].unmerged.sites -> exports[0].sites
        if index >= 2 and loc[index - 2] in ("exports", "adapters") and isinstance(loc[index - 1], int) \
                and part in (*MODES, "live", "merged"):
            continue
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or "(top level)"


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}[type(value)]


def _shown(value: Any) -> str:
    text = _json_type(value) if isinstance(value, (dict, list)) else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
