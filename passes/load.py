"""load: set adapter weights from a Hugging Face PEFT directory or one of our adapter files.

Rules:
1. PEFT key `base_model.model.<path>.<suffix>` maps to the site whose owner is `<path>`; a key that
   maps to no site is an error naming the nearest sites. Nothing is changed unless every key fits.
2. The directory's `peft_type` picks the adapter kind that reads it (the first kind registered with that PEFT
   format); the kind says which kind and settings each module gets (`peft_module`: LoRA's rank from the tensor
   shape, alpha from `lora_alpha` / `alpha_pattern`, the rsLoRA flag; (IA)^3's input or output scaling). A site
   without this adapter gets one created; a site that has it must be of that kind and agree in shape.
3. Tensors go in through the kind (`load_peft_state`: PEFT layout to ours), in the base weight's dtype.
4. Loading the same weights twice leaves the graph unchanged (modified=False).
5. A full copy of a base weight saved beside the adapter (PEFT's `<path>.base_layer.weight`, written for
   targeted embeddings) must equal the model's weight; it is then ignored (a different one is an error:
   the base weight is never replaced).
6. A PEFT directory must hold tensors for every site of this model that its `target_modules` selects (PEFT creates
   and saves a layer on each): a selected site without them means an adapter of another model or a lost tensor.
7. An adapter name belongs to the entry that made it. Loading into an adapter that an `insert` made sets its weights
   only when the file covers exactly its sites with the same kind and settings (rank, scale); one that another `load` made (another
   file) is refused; both name the two spec locations. The same entry run again is a no-op (rule 4).
8. A kind whose sites share state ties it before anything changes (`share`): VeRA's frozen projections, from the
   directory's `base_model.vera_A` / `vera_B` or drawn again from its `projection_prng_key`.
9. `modules_to_save` (PEFT's trained whole modules, beside any tuner): each saved tensor `<path>.weight` / `.bias`
   is the weight / bias of the site owned by `<path>`, which gets a trained copy: `full` on weight layers,
   `ln_tuning` on norms (the kinds' `copy_state`). Every site of this model under a named module must have its
   tensors in the file (as rule 6), a copy must cover all of its site's tensors, and a module holding both adapter
   tensors and a copy is refused; other saved tensors (a BatchNorm's statistics) are refused by name.
10. `trainable_token_indices` (LoRA: new rows of chosen token ids of an embedding, beside the LoRA modules): each
   embedding with rows gets a `trainable_tokens` module with those ids (a module with LoRA tensors too is refused).
11. A PEFT directory with `adapter_model.bin` (a pickle, which can run code) and no safetensors is read only with
   `trust_pickle = true` (tensors only: `torch.load(weights_only=True)`); otherwise it is refused, saying how to
   convert it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.fx as fx
from pydantic import Field

from rewrite.adapters import KINDS
from rewrite.adapters.base import AdapterKind, NotSupported
from rewrite.adapters.for_site import adapter_for_site
from rewrite.errors import AdapterFileError, nearest
from rewrite.formats.adapter_file import read_adapter_file
from rewrite.formats.peft_dir import CONFIG, WEIGHTS, PeftAdapter, PeftFormat, read_peft_dir
from rewrite.graph_edit import adapters_at, register_adapter, wire
from rewrite.names import ADAPTER_NAME
from rewrite.pass_infra import GraphPass, PassOptions, PassResult
from rewrite.sites import NORM_OPS, Site, SiteTable
from rewrite.state import AdapterOrigin, state_of
from rewrite.tensors import from_numpy, to_numpy

PICKLE = "adapter_model.bin"
COPY_OPS = tuple(dict.fromkeys(op for kind in KINDS.values() if kind.copies_layer for op in kind.ops))
PEFT_READERS: dict[PeftFormat, type[AdapterKind]] = {}
for _kind in KINDS.values():
    if _kind.peft_format is not None:
        PEFT_READERS.setdefault(_kind.peft_format, _kind)


class LoadOptions(PassOptions):
    path: str
    adapter: str = Field(default="default", pattern=ADAPTER_NAME)
    format: Literal["auto", "peft", "rewrite"] = "auto"
    trust_pickle: bool = False


@dataclass
class Entry:
    """What the file holds for one module: its kind and settings, and tensors in the file's layout."""

    kind: type[AdapterKind]
    settings: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    layout: Literal["peft", "copy", "file"]  # PEFT's tensors, a modules_to_save copy, or our adapter file's

    def shapes(self, module: AdapterKind) -> dict[str, tuple[int, ...]]:
        return {"peft": module.peft_shapes, "copy": module.copy_shapes,
                "file": module.adapter_file_shapes}[self.layout]()

    def copy_into(self, module: AdapterKind) -> None:
        {"peft": module.load_peft_state, "copy": module.load_copy,
         "file": module.load_adapter_file_entry}[self.layout](self.tensors)


def _torch(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {key: from_numpy(array) for key, array in arrays.items()}


def _unpickled(path: Path) -> dict[str, np.ndarray]:
    """Rule 9: the tensors of a trusted `adapter_model.bin` ({key: tensor} and nothing else)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a corrupt or non-tensor pickle is bad input
        raise AdapterFileError(f"{path}: not a readable tensor pickle: {err}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise AdapterFileError(f"{path}: expected a dict of named tensors (PEFT's state dict)")
    return {key: to_numpy(tensor) for key, tensor in state.items()}


def _owners(table: SiteTable) -> dict[str, list[Site]]:
    owners: dict[str, list[Site]] = {}
    for site in table.values():
        owners.setdefault(site.owner, []).append(site)
    return owners


def _check_targets(adapter: PeftAdapter, table: SiteTable) -> None:
    """Rule 6."""
    ops = {op for kind in KINDS.values() if kind.peft_format == adapter.format for op in kind.ops}
    owners = dict.fromkeys(s.owner for s in table.values() if s.op in ops)
    missing = [o for o in owners if o not in adapter.modules and o not in adapter.copies and adapter.targets(o)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise AdapterFileError(f"{adapter.path / CONFIG}: 'target_modules' = {adapter.config.target_modules!r} selects "
                               f"{missing[0]!r}{more} of this model, but {WEIGHTS} has no tensors for it (PEFT would "
                               "have created and saved them): the adapter was made for another model, or its weights "
                               "file is incomplete")


def _copy_entries(adapter: PeftAdapter, table: SiteTable, adapted: dict[str, Entry]) -> dict[str, Entry]:
    """Rule 9: an entry per module of `adapter.copies`, a `full` or `ln_tuning` copy of its site."""
    owners, where = _owners(table), adapter.path / WEIGHTS
    missing = [o for o, sites in owners.items() if adapter.config.saves(o) and o not in adapter.copies
               and o not in adapted and sites[0].op in COPY_OPS]
    if missing:
        raise AdapterFileError(f"{adapter.path / CONFIG}: 'modules_to_save' = {adapter.config.modules_to_save!r} "
                               f"names {missing[0]!r} of this model, but {WEIGHTS} has no copy of it (PEFT saves "
                               "each named module whole): the adapter was made for another model, or its weights "
                               "file is incomplete")
    entries = {}
    for module, arrays in adapter.copies.items():
        sites = owners.get(module)
        if module in adapted:
            raise AdapterFileError(f"{where}: module {module!r} holds both {adapter.format.peft_type} tensors and a "
                                   "modules_to_save copy; PEFT trains a module one way or the other")
        if sites is None or sites[0].op not in COPY_OPS:
            what = f"a {sites[0].op} site" if sites else "no layer with a weight this compiler adapts"
            params = ", ".join(f"{module}.{p}" for p in arrays)
            raise AdapterFileError(f"{where}: modules_to_save tensor(s) {params}: {module!r} is {what}; a saved copy "
                                   f"is placed on a {', '.join(COPY_OPS)} site's weight and bias (nearest: "
                                   f"{', '.join(nearest(module, owners)) or '(none)'})")
        site = sites[0]
        names = {site.weight.rpartition(".")[2]: "weight", **({site.bias.rpartition(".")[2]: "bias"} if site.bias
                                                              else {})}
        odd = [p for p in arrays if p not in names]
        if odd:
            raise AdapterFileError(f"{where}: modules_to_save tensor {module}.{odd[0]}: the {site.op} layer "
                                   f"{module!r} has {' and '.join(names)} only")
        kind = KINDS["ln_tuning" if site.op in NORM_OPS else "full"]
        entries[module] = Entry(kind, {}, _torch({names[p]: a for p, a in arrays.items()}), "copy")
    return entries


def _token_entries(adapter: PeftAdapter, adapted: dict[str, Entry]) -> dict[str, Entry]:
    """Rule 10: a `trainable_tokens` entry per embedding the directory holds trained token rows for."""
    kind = KINDS["trainable_tokens"]
    entries = {}
    for module, rows in adapter.token_rows.items():
        if module in adapted:
            raise AdapterFileError(f"{adapter.path / WEIGHTS}: module {module!r} holds both {adapter.format.peft_type} "
                                   "tensors and trainable token rows; one module is adapted one way")
        (key,) = kind.peft_format.layouts[0]
        entries[module] = Entry(kind, {"token_indices": list(adapter.token_indices(module))},
                                _torch({key: rows}), "peft")
    return entries


def _differences(module: AdapterKind, entry: Entry) -> list[str]:
    """The settings in which an existing adapter module differs from what the file says (rule 7)."""
    if type(module) is not entry.kind:
        return [f"kind {module.kind!r} there, {entry.kind.kind!r} in the file"]
    odd = []
    for key, value in entry.settings.items():
        have = getattr(module, key)
        same = math.isclose(have, value, rel_tol=1e-6) if isinstance(value, float) else have == value
        if not same:
            odd.append(f"{key} {have!r} there, {value!r} in the file")
    return odd


class LoadPass(GraphPass):
    name = "load"
    Options = LoadOptions

    def _origin(self) -> AdapterOrigin:
        options = {**self.options.model_dump(), "path": str(self.context.input_path(self.options.path).resolve())}
        return AdapterOrigin(self.name, json.dumps(options, sort_keys=True), self.context.where)

    def _check_maker(self, gm: fx.GraphModule, entries: dict[str, Entry]) -> AdapterOrigin:
        """Rule 7, before anything changes; returns this entry's origin, which makes the adapter once it has run."""
        name, origin = self.options.adapter, self._origin()
        first = state_of(gm).origins.get(name, origin)
        if first == origin:
            return origin
        made = {o: adapters_at(gm, o)[name] for o in _owners(state_of(gm).sites) if name in adapters_at(gm, o)}
        problem = None
        if first.pass_name != "insert":
            problem = f"it holds the weights of another file ({first.differences(origin)})"
        elif entries.keys() != made.keys():
            odd = sorted(entries.keys() ^ made.keys())
            problem = f"the file covers {len(entries)} sites, the adapter {len(made)}; they differ at {odd[:3]}"
        else:
            odd = [f"{o} ({', '.join(d)})" for o, e in entries.items() if (d := _differences(made[o], e))]
            problem = f"the file sets other settings: {'; '.join(odd[:3])}" if odd else None
        if problem:
            raise AdapterFileError(f"{self.context.where}: adapter {name!r} was made by the {first.pass_name} at "
                                   f"{first.where}, and {problem}; load it under another adapter name")
        return origin

    def check_paths(self) -> None:
        self._existing_path()

    def _existing_path(self) -> Path:
        path = self.context.input_path(self.options.path)
        if not path.exists():
            raise AdapterFileError(f"{self.context.at('path')}: adapter path {path} does not exist")
        return path

    def call(self, gm: fx.GraphModule) -> PassResult:
        path = self._existing_path()
        fmt = self.options.format
        if fmt == "auto":
            fmt = "peft" if path.is_dir() else "rewrite"
        table = state_of(gm).sites
        if fmt == "peft":
            entries, base_copies, shared = self._peft_entries(path, gm, table, self.options.trust_pickle)
        else:
            entries, base_copies, shared = self._rewrite_entries(path), {}, {}
        self._check_known(path, table, [*entries, *base_copies])
        for owner, saved in base_copies.items():
            self._check_base_copy(gm, path, owner, _owners(table)[owner][0], saved)
        origin = self._check_maker(gm, entries)
        result = self._apply(gm, path, entries, shared)
        state_of(gm).origins[self.options.adapter] = origin
        return result

    @staticmethod
    def _peft_entries(path: Path, gm: fx.GraphModule, table: SiteTable, trust_pickle: bool) -> tuple[
            dict[str, Entry], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        pickled = path / PICKLE
        if (path / WEIGHTS).is_file() or not pickled.is_file() or not (path / CONFIG).is_file():
            adapter = read_peft_dir(path, list(PEFT_READERS))
        elif trust_pickle:
            adapter = read_peft_dir(path, list(PEFT_READERS), _unpickled(pickled), pickled)
        else:
            raise AdapterFileError(f"{path}: no {WEIGHTS} ({PICKLE} is a pickle and is never loaded unless trusted: "
                                   "it can run code); for a file you trust set trust_pickle = true on this load pass "
                                   "(rewrite bundle / combine: --trust-pickle), "
                                   f"or convert it once: safetensors.torch.save_file(torch.load('{PICKLE}'), "
                                   f"'{WEIGHTS}')")
        _check_targets(adapter, table)
        reader = PEFT_READERS[adapter.format]
        entries = {}
        for module, arrays in adapter.modules.items():
            kind, settings = reader.peft_module(adapter, module)
            if not module:  # whole-model tensors (prompt learning): the kind says which site holds them
                try:
                    module = reader.peft_owner(gm, table)
                except ValueError as err:
                    raise AdapterFileError(f"{path}: {err}") from None
            entries[module] = Entry(kind, settings, _torch(arrays), "peft")
        entries |= _copy_entries(adapter, table, entries)
        entries |= _token_entries(adapter, entries)
        return entries, _torch(adapter.base_weights), _torch(adapter.shared)

    @staticmethod
    def _rewrite_entries(path: Path) -> dict[str, Entry]:
        adapter = read_adapter_file(path)
        kind = KINDS.get(adapter.meta.kind)
        if kind is None:
            raise AdapterFileError(f"{path}: adapter kind {adapter.meta.kind!r} is unknown (known: "
                                   f"{', '.join(KINDS)})")
        return {owner: Entry(kind, dict(rank=info.rank, alpha=float(info.alpha), rslora=info.rslora),
                             _torch(adapter.tensors[owner]), "file") for owner, info in adapter.sites.items()}

    @staticmethod
    def _check_known(path: Path, table: SiteTable, modules: list[str]) -> None:
        owners = _owners(table)
        unknown = [m for m in modules if m not in owners]
        if unknown:
            near = nearest(unknown[0], owners)
            raise AdapterFileError(f"{path}: {len(unknown)} adapter module(s) match no site of this model, e.g. "
                                   f"{unknown[0]!r}. Nearest sites: {', '.join(near) or '(none)'}")

    def _apply(self, gm: fx.GraphModule, path: Path, entries: dict[str, Entry],
               shared: dict[str, torch.Tensor]) -> PassResult:
        table, name, where = state_of(gm).sites, self.options.adapter, self.context.where
        owners = _owners(table)
        plan = []
        for owner, entry in entries.items():
            site = owners[owner][0]
            existing = adapters_at(gm, owner).get(name)
            if existing is not None and type(existing) is not entry.kind:
                raise AdapterFileError(f"{where}: adapter {name!r} at {owner} is {existing.kind!r}; the file holds "
                                       f"{entry.kind.kind!r} weights: load under another adapter name")
            if site.op not in entry.kind.ops:
                raise AdapterFileError(f"{path}: module {owner!r} is a {site.op} site; {entry.kind.kind} adapters "
                                       f"go on {', '.join(entry.kind.ops)} sites")
            module = existing or self._new_module(gm, site, entry)
            self._check_shapes(path, owner, module, entry)
            plan.append((owner, module, existing is None, entry))
        shared_changed = self._share(path, {owner: module for owner, module, _, _ in plan}, shared)
        changed = 0
        for owner, module, is_new, entry in plan:
            before = [p.detach().clone() for p in module.parameters()] if not is_new else None
            settings_before = {key: getattr(module, key) for key in entry.settings}
            for key, value in entry.settings.items():
                setattr(module, key, value)
            entry.copy_into(module)
            if is_new:
                register_adapter(gm, owner, name, module)
                for site in owners[owner]:
                    wire(gm, table.node_of(gm, site.name), site, name, module)
                changed += 1
            elif settings_before != entry.settings or any(
                    not torch.equal(b, p) for b, p in zip(before, module.parameters())):
                changed += 1
        stats = {"adapter": name, "modules": len(plan), "changed": changed, "source": str(path)}
        return PassResult(gm, changed > 0 or shared_changed, stats)

    @staticmethod
    def _share(path: Path, modules: dict[str, AdapterKind], shared: dict[str, torch.Tensor]) -> bool:
        """Rule 8: each kind ties what its modules of this adapter share; whether that changed anything."""
        changed = False
        for kind in dict.fromkeys(type(m) for m in modules.values()):
            try:
                changed |= kind.share({o: m for o, m in modules.items() if type(m) is kind}, shared)
            except NotSupported as err:
                raise AdapterFileError(f"{path}: {err}") from None
        return changed

    def _new_module(self, gm: fx.GraphModule, site: Site, entry: Entry) -> AdapterKind:
        settings = {"rank": 0, "alpha": 0.0, "rslora": False, **entry.settings}
        return adapter_for_site(gm, site, entry.kind.kind, settings.pop("rank"), settings.pop("alpha"),
                                rslora=settings.pop("rslora"), dropout=0.0, init=entry.kind.inits[0],
                                where=self.context.where, options=settings)

    @staticmethod
    def _check_base_copy(gm: fx.GraphModule, path: Path, owner: str, site: Site, saved: torch.Tensor) -> None:
        weight = gm.get_parameter(site.weight)
        same = tuple(saved.shape) == tuple(weight.shape) and (
            weight.is_meta or torch.equal(saved.to(device=weight.device, dtype=weight.dtype), weight))
        if not same:
            raise AdapterFileError(f"{path}: module {owner!r}: the directory carries a full base weight "
                                   f"({owner}.base_layer.weight, shape {tuple(saved.shape)}) that differs from this "
                                   f"model's {site.weight} (shape {tuple(weight.shape)}): resized or retrained "
                                   "embeddings are not an adapter; load the model they were trained with")

    @staticmethod
    def _check_shapes(path: Path, owner: str, module: AdapterKind, entry: Entry) -> None:
        expected = entry.shapes(module)
        got = {k: tuple(v.shape) for k, v in entry.tensors.items()}
        if expected != got:
            size = f", rank={module.rank}" if "rank" in entry.settings else ""
            copy = (" (a modules_to_save copy has the shapes of the layer it was trained as: a classifier built "
                    "with another num_labels, or resized embeddings, do not fit)" if entry.layout == "copy" else "")
            raise AdapterFileError(f"{path}: module {owner!r}: tensor shapes {got} do not fit this site "
                                   f"(expected {expected} for d_in={module.d_in}, d_out={module.d_out}{size}){copy}")
