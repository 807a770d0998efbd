"""load: set adapter weights from a Hugging Face PEFT directory or one of our adapter files.

Rules:
1. PEFT key `base_model.model.<path>.lora_A.weight` maps to the site whose owner is `<path>`; a key that
   maps to no site is an error naming the nearest sites. Nothing is changed unless every key fits.
2. A site without this adapter gets one created with the file's rank (from the tensor shape), alpha
   (`lora_alpha` / `alpha_pattern`) and rsLoRA flag; a site that has it must agree in shape.
3. Tensors are converted to our matmul layout (A^T, B^T) and the base weight's dtype.
4. Loading the same weights twice leaves the graph unchanged (modified=False).
5. A full copy of a base weight saved beside the adapter (PEFT's `<path>.base_layer.weight`, written for
   targeted embeddings) must equal the model's weight; it is then ignored (a different one is an error:
   the base weight is never replaced).
6. A PEFT directory must hold tensors for every site of this model that its `target_modules` selects (PEFT creates
   and saves a layer on each): a selected site without them means an adapter of another model or a lost tensor.
7. An adapter name belongs to the entry that made it. Loading into an adapter that an `insert` made sets its weights
   only when the file covers exactly its sites with the same rank and scale; one that another `load` made (another
   file) is refused; both name the two spec locations. The same entry run again is a no-op (rule 4).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.fx as fx
from pydantic import Field

from rewrite.adapters.for_site import adapter_for_site
from rewrite.adapters.lora import LoRA
from rewrite.errors import AdapterFileError, nearest
from rewrite.formats.adapter_file import read_adapter_file
from rewrite.formats.peft_dir import CONFIG, WEIGHTS, PeftAdapter, lora_scale, read_peft_dir
from rewrite.graph_edit import adapters_at, register_adapter, wire
from rewrite.names import ADAPTER_NAME
from rewrite.pass_infra import GraphPass, PassOptions, PassResult
from rewrite.sites import Site, SiteTable
from rewrite.state import AdapterOrigin, state_of
from rewrite.tensors import from_numpy


class LoadOptions(PassOptions):
    path: str
    adapter: str = Field(default="default", pattern=ADAPTER_NAME)
    format: Literal["auto", "peft", "rewrite"] = "auto"


def _torch(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {key: from_numpy(array) for key, array in arrays.items()}


def _owners(table: SiteTable) -> dict[str, list[Site]]:
    owners: dict[str, list[Site]] = {}
    for site in table.values():
        owners.setdefault(site.owner, []).append(site)
    return owners


def _check_targets(adapter: PeftAdapter, table: SiteTable) -> None:
    """Rule 6."""
    owners = dict.fromkeys(s.owner for s in table.values() if s.op in LoRA.ops)
    missing = [o for o in owners if o not in adapter.modules and adapter.targets(o)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise AdapterFileError(f"{adapter.path / CONFIG}: 'target_modules' = {adapter.config.target_modules!r} selects "
                               f"{missing[0]!r}{more} of this model, but {WEIGHTS} has no tensors for it (PEFT would "
                               "have created and saved them): the adapter was made for another model, or its weights "
                               "file is incomplete")


class LoadPass(GraphPass):
    name = "load"
    Options = LoadOptions

    def _origin(self) -> AdapterOrigin:
        options = {**self.options.model_dump(), "path": str(self.context.input_path(self.options.path).resolve())}
        return AdapterOrigin(self.name, json.dumps(options, sort_keys=True), self.context.where)

    def _check_maker(self, gm: fx.GraphModule, entries: dict[str, dict]) -> AdapterOrigin:
        """Rule 7, before anything changes; returns this entry's origin, which makes the adapter once it has run."""
        name, origin = self.options.adapter, self._origin()
        first = state_of(gm).origins.get(name, origin)
        if first == origin:
            return origin
        made = {o: adapters_at(gm, o)[name] for o in _owners(state_of(gm).sites) if name in adapters_at(gm, o)}
        files = {o for o, e in entries.items() if "peft" in e or "ours" in e}
        problem = None
        if first.pass_name != "insert":
            problem = f"it holds the weights of another file ({first.differences(origin)})"
        elif files != made.keys():
            odd = sorted(files ^ made.keys())
            problem = f"the file covers {len(files)} sites, the adapter {len(made)}; they differ at {odd[:3]}"
        else:
            scales = {o: (m.scaling, lora_scale(e["alpha"], e["rank"], e["rslora"])) for o, e in entries.items()
                      if (m := made[o]).kind == "lora" and m.rank == e["rank"]}  # other ranks: _check_shapes
            odd = [f"{o} (scale {a:g} there, {b:g} in the file)" for o, (a, b) in scales.items()
                   if not math.isclose(a, b, rel_tol=1e-6)]
            problem = f"the file sets other scales: {', '.join(odd[:3])}" if odd else None
        if problem:
            raise AdapterFileError(f"{self.context.where}: adapter {name!r} was made by the {first.pass_name} at "
                                   f"{first.where}, and {problem}; load it under another adapter name")
        return origin

    def call(self, gm: fx.GraphModule) -> PassResult:
        path = self.context.input_path(self.options.path)
        if not path.exists():
            raise AdapterFileError(f"{self.context.where}: adapter path {path} does not exist")
        fmt = self.options.format
        if fmt == "auto":
            fmt = "peft" if path.is_dir() else "rewrite"
        entries = self._peft_entries(path, state_of(gm).sites) if fmt == "peft" else self._rewrite_entries(path)
        origin = self._check_maker(gm, entries)
        result = self._apply(gm, path, entries)
        state_of(gm).origins[self.options.adapter] = origin
        return result

    @staticmethod
    def _peft_entries(path: Path, table: SiteTable) -> dict[str, dict]:
        adapter = read_peft_dir(path)
        _check_targets(adapter, table)
        entries = {module: dict(peft=_torch(arrays), rank=adapter.rank_of(module), alpha=adapter.alpha_of(module),
                                rslora=adapter.rslora) for module, arrays in adapter.modules.items()}
        for module, array in adapter.base_weights.items():
            entries.setdefault(module, {})["base_copy"] = from_numpy(array)
        return entries

    @staticmethod
    def _rewrite_entries(path: Path) -> dict[str, dict]:
        adapter = read_adapter_file(path)
        return {owner: dict(ours=_torch(adapter.tensors[owner]), rank=info.rank, alpha=float(info.alpha),
                            rslora=info.rslora) for owner, info in adapter.sites.items()}

    def _apply(self, gm: fx.GraphModule, path: Path, entries: dict[str, dict]) -> PassResult:
        table, name, where = state_of(gm).sites, self.options.adapter, self.context.where
        owners = _owners(table)
        unknown = [m for m in entries if m not in owners]
        if unknown:
            near = nearest(unknown[0], owners)
            raise AdapterFileError(f"{path}: {len(unknown)} adapter module(s) match no site of this model, e.g. "
                                   f"{unknown[0]!r}. Nearest sites: {', '.join(near) or '(none)'}")
        for owner, entry in entries.items():
            if "base_copy" in entry:
                self._check_base_copy(gm, path, owner, owners[owner][0], entry.pop("base_copy"))
        entries = {owner: entry for owner, entry in entries.items() if entry}
        plan = []
        for owner, entry in entries.items():
            site = owners[owner][0]
            existing = adapters_at(gm, owner).get(name)
            if existing is not None and existing.kind != "lora":
                raise AdapterFileError(f"{where}: adapter {name!r} at {owner} is {existing.kind!r}; load writes LoRA "
                                       "weights: load under another adapter name")
            module = existing or adapter_for_site(gm, site, "lora", entry["rank"], entry["alpha"],
                                              rslora=entry["rslora"], dropout=0.0, init="zeros", where=where)
            self._check_shapes(path, owner, module, entry)
            plan.append((owner, module, existing is None, entry))
        changed, loaded = 0, 0
        for owner, module, is_new, entry in plan:
            before = [p.detach().clone() for p in module.parameters()] if not is_new else None
            scale_before = module.scaling
            module.alpha, module.rslora = float(entry["alpha"]), bool(entry["rslora"])
            if "peft" in entry:
                module.load_peft_state(entry["peft"])
            else:
                with torch.no_grad():
                    module.lora_A.copy_(entry["ours"]["lora_A"])
                    module.lora_B.copy_(entry["ours"]["lora_B"])
            if is_new:
                register_adapter(gm, owner, name, module)
                for site in owners[owner]:
                    wire(gm, table.node_of(gm, site.name), site, name, module)
                changed += 1
            elif scale_before != module.scaling or any(
                    not torch.equal(b, p) for b, p in zip(before, module.parameters())):
                changed += 1
            loaded += 1
        return PassResult(gm, changed > 0, {"adapter": name, "modules": loaded, "changed": changed,
                                            "source": str(path)})

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
    def _check_shapes(path: Path, owner: str, module, entry: dict) -> None:
        if "peft" in entry:
            expected = module.peft_shapes()
            got = {k: tuple(v.shape) for k, v in entry["peft"].items()}
        else:
            expected = {"lora_A": tuple(module.lora_A.shape), "lora_B": tuple(module.lora_B.shape)}
            got = {k: tuple(v.shape) for k, v in entry["ours"].items()}
        if expected != got:
            raise AdapterFileError(f"{path}: module {owner!r}: tensor shapes {got} do not fit this site "
                                   f"(expected {expected} for d_in={module.d_in}, d_out={module.d_out}, "
                                   f"rank={module.rank})")
