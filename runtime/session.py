"""AdapterSession: open an unmerged export once, switch adapters per request or per batch row.

    session = AdapterSession("out/")                       # reads out/manifest.json and the model
    session.run(feeds, adapter="support")                   # one adapter for the whole batch
    session.run(feeds, adapter_ids=["support", None, "style"])  # bank / custom-op: one per row
    session.add_adapter("new", "peft_dir/"); session.remove_adapter("style")

Switching strategies (see export/onnx_unmerged.py):
  ort-adapters  each adapter is an `onnxruntime.LoraAdapter` (mmap'd .onnx_adapter) with a RunOptions
                built once, so switching costs a dictionary lookup.
  bank, custom-op  `adapter_ids` per row; adding an adapter fills a free slot of the bank, which is an
                overridable model input: the session feeds its own copy, the ONNX session is never rebuilt.
Thread safety: adapter tables are immutable snapshots swapped under a lock; `run` reads one snapshot
and ONNX Runtime's `run` is itself thread-safe, so requests never see a half-added adapter.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from rewrite.errors import AdapterFileError, RewriteError
from rewrite.names import check_adapter_name
from rewrite.runtime.adapter_source import read_factors


@dataclass(frozen=True)
class _Snapshot:
    run_options: dict[str, tuple[ort.RunOptions, ort.LoraAdapter]] = field(default_factory=dict)  # ort-adapters
    slots: dict[str, int] = field(default_factory=dict)                   # bank / custom-op
    bank: dict[str, np.ndarray] = field(default_factory=dict)             # input name -> current bank
    bank_dirty: bool = False


class AdapterSession:
    def __init__(self, path: str | Path, *, providers: Sequence[str] | None = None,
                 intra_op_threads: int | None = None):
        path = Path(path)
        directory = path if path.is_dir() else path.parent
        manifest_file = directory / "manifest.json"
        if not manifest_file.is_file():
            raise RewriteError(f"{directory}: no manifest.json (was this written by `rewrite apply`?)")
        manifest = json.loads(manifest_file.read_text())
        entry = next((e for e in manifest.get("exports", []) if e.get("mode") == "unmerged"), None)
        if entry is None:
            raise RewriteError(f"{manifest_file}: no unmerged export; set [export] mode = \"unmerged\"")
        self.directory, self.entry, self.switching = directory, entry, entry["switching"]
        self.bank_dtype = entry.get("bank_dtype") or "float32"
        self.model_path = directory / entry["file"]
        self._sites = {s["site"]: dict(s, rank_limit=s["rank"] if self.switching != "ort-adapters" else None)
                       for s in entry["sites"]}
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        if self.switching == "custom-op":
            from rewrite.runtime.ops import library_path

            options.register_custom_ops_library(str(library_path()))
        self._session = ort.InferenceSession(str(self.model_path), options,
                                             providers=list(providers or ["CPUExecutionProvider"]))
        self._lock = threading.Lock()
        self._tmp = Path(tempfile.mkdtemp(prefix="rewrite-adapters-"))
        self._snapshot = _Snapshot()
        if self.switching == "ort-adapters":
            for name, info in entry["adapters"].items():
                self._add_file(name, directory / info["file"])
        else:
            self._snapshot = _Snapshot(slots={n: i["slot"] for n, i in entry["adapters"].items()},
                                       bank=self._initial_banks())

    @property
    def adapters(self) -> list[str]:
        snap = self._snapshot
        return sorted(snap.run_options if self.switching == "ort-adapters" else snap.slots)

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self._session.get_inputs()]

    # ---- serving -------------------------------------------------------------------------------
    def run(self, feeds: dict[str, np.ndarray], *, adapter: str | None = None,
            adapter_ids: Sequence[str | int | None] | np.ndarray | None = None,
            output_names: list[str] | None = None) -> list[np.ndarray]:
        snap = self._snapshot
        if adapter is not None and adapter_ids is not None:
            raise RewriteError("give `adapter` (one for the batch) or `adapter_ids` (one per row), not both")
        if self.switching == "ort-adapters":
            if adapter_ids is not None:
                adapter = self._one_adapter(adapter_ids, self._batch(feeds))
            if adapter is None:
                return self._session.run(output_names, feeds)
            # RunOptions points at its LoraAdapter without owning it: `active` keeps both alive for this run even if
            # the adapter is removed or replaced meanwhile; once no run holds them they are freed.
            active = snap.run_options.get(adapter)
            if active is None:
                raise RewriteError(f"unknown adapter {adapter!r}; loaded: {sorted(snap.run_options)}")
            return self._session.run(output_names, feeds, active[0])
        all_feeds = dict(feeds)
        all_feeds[self.entry["ids_input"]] = self._ids(snap, self._batch(feeds), adapter, adapter_ids)
        if snap.bank_dirty:
            all_feeds.update(snap.bank)
        return self._session.run(output_names, all_feeds)

    @staticmethod
    def _batch(feeds: dict[str, np.ndarray]) -> int:
        return next(iter(feeds.values())).shape[0]

    @staticmethod
    def _check_length(adapter_ids, batch: int) -> None:
        count = len(adapter_ids) if np.ndim(adapter_ids) == 1 else -1
        if count != batch:
            shape = f"{count} entries" if count >= 0 else f"shape {np.shape(adapter_ids)}"
            raise RewriteError(f"adapter_ids has {shape} for a batch of {batch} (one id per row)")

    def _one_adapter(self, adapter_ids, batch: int) -> str | None:
        """ort-adapters: per-row ids are accepted only when every row names the same adapter."""
        self._check_length(adapter_ids, batch)
        names = set(adapter_ids.tolist() if isinstance(adapter_ids, np.ndarray) else adapter_ids)
        if len(names) > 1:
            raise RewriteError("this model switches one adapter per run (ort-adapters); export with "
                               "switching = \"bank\" or \"custom-op\" for a different adapter per row")
        return names.pop() if names else None

    def _ids(self, snap: _Snapshot, batch: int, adapter: str | None, adapter_ids) -> np.ndarray:
        if adapter_ids is None:
            slot = -1 if adapter is None else self._slot(snap, adapter)
            return np.full(batch, slot, dtype=np.int64)
        self._check_length(adapter_ids, batch)
        if isinstance(adapter_ids, np.ndarray) and adapter_ids.dtype.kind in "iu":
            ids = adapter_ids.astype(np.int64)
        else:
            ids = np.array([-1 if a is None else a if isinstance(a, (int, np.integer)) else self._slot(snap, a)
                            for a in adapter_ids], dtype=np.int64)
        capacity = self.entry["capacity"]
        bad = ids[(ids < -1) | (ids >= capacity)]
        if bad.size:  # the one-hot bank would silently answer with the base model, LoraDelta would fail
            raise RewriteError(f"adapter_ids: slot {int(bad[0])} is neither -1 (base) nor a bank slot "
                               f"0..{capacity - 1}")
        return ids

    @staticmethod
    def _slot(snap: _Snapshot, name: str) -> int:
        try:
            return snap.slots[name]
        except KeyError:
            raise RewriteError(f"unknown adapter {name!r}; loaded: {sorted(snap.slots)}") from None

    # ---- adapter management --------------------------------------------------------------------
    def add_adapter(self, name: str, source: Any, *, replace_existing: bool = False) -> None:
        """Add (or with replace_existing, replace) an adapter from a PEFT dir, our file, .onnx_adapter or dict.
        `name` is an identifier (rewrite.names): it also names a file in the session's temporary directory."""
        check_adapter_name(name, "add_adapter")
        factors = read_factors(source, self._sites, model_version=self.entry["model_version"], dtype=self.bank_dtype)
        with self._lock:
            if name in self.adapters and not replace_existing:
                raise AdapterFileError(f"adapter {name!r} is already loaded (remove it first or pass "
                                       "replace_existing=True)")
            if self.switching == "ort-adapters":
                from rewrite.export.onnx_unmerged import write_onnx_adapter

                file = self._tmp / f"{name}.onnx_adapter"
                tensors = {self._sites[s][k]: t for s, (a, b) in factors.items() for k, t in (("A", a), ("B", b))}
                write_onnx_adapter(file, tensors, self.entry["model_version"])
                try:
                    self._add_file(name, file)
                finally:
                    file.unlink()  # loaded (mapped) already: nothing accumulates on disk
            else:
                self._add_to_bank(name, factors)

    def remove_adapter(self, name: str) -> None:
        with self._lock:
            snap = self._snapshot
            if name not in self.adapters:
                raise RewriteError(f"unknown adapter {name!r}; loaded: {self.adapters}")
            if self.switching == "ort-adapters":
                options = dict(snap.run_options)
                del options[name]
                self._snapshot = replace(snap, run_options=options)
                return
            slot = snap.slots[name]
            slots = {n: s for n, s in snap.slots.items() if n != name}
            self._snapshot = replace(snap, slots=slots, bank=self._write_slot(snap.bank, slot, None), bank_dirty=True)

    def _add_file(self, name: str, file: Path) -> None:
        """Activate an .onnx_adapter (validated: model version, names, shapes, dtype); the caller holds the lock
        or is __init__."""
        read_factors(file, self._sites, model_version=self.entry["model_version"], dtype=self.bank_dtype)
        adapter = ort.LoraAdapter()
        adapter.Load(str(file))
        options = ort.RunOptions()
        options.add_active_adapter(adapter)
        run_options = dict(self._snapshot.run_options)
        run_options[name] = (options, adapter)
        self._snapshot = replace(self._snapshot, run_options=run_options)

    # ---- banks ---------------------------------------------------------------------------------
    def _initial_banks(self) -> dict[str, np.ndarray]:
        model = onnx.load(str(self.model_path))
        names = {info[k] for info in self._sites.values() for k in ("A", "B")}
        return {init.name: onnx.numpy_helper.to_array(init).copy() for init in model.graph.initializer
                if init.name in names}

    def _add_to_bank(self, name: str, factors) -> None:
        snap = self._snapshot
        slots = dict(snap.slots)
        old = slots.pop(name, None)
        used = set(slots.values())
        free = old if old is not None else next((s for s in range(self.entry["capacity"]) if s not in used), None)
        if free is None:
            raise AdapterFileError(f"the bank is full ({self.entry['capacity']} slots); remove an adapter or "
                                   "export with a larger [export] capacity")
        bank = self._write_slot(snap.bank, free, factors)
        slots[name] = free
        self._snapshot = replace(snap, slots=slots, bank=bank, bank_dirty=True)

    def _write_slot(self, bank: dict[str, np.ndarray], slot: int, factors) -> dict[str, np.ndarray]:
        """A new bank dict with `slot` set to `factors` (zero-padded to the site rank) or cleared."""
        out = dict(bank)
        for site, info in self._sites.items():
            rank = info["rank"]
            a_pad = np.zeros((info["d_in"], rank), np.float32)
            b_pad = np.zeros((rank, info["d_out"]), np.float32)
            if factors and site in factors:
                a, b = factors[site]
                a_pad[:, : a.shape[1]], b_pad[: b.shape[0]] = a, b
            a_bank, b_bank = bank[info["A"]].copy(), bank[info["B"]].copy()
            if self.switching == "custom-op":
                a_bank[slot], b_bank[slot] = a_pad, b_pad
            else:
                a_bank[:, slot * rank:(slot + 1) * rank] = a_pad
                b_bank[slot * rank:(slot + 1) * rank] = b_pad
            out[info["A"]], out[info["B"]] = a_bank, b_bank
        return out

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "AdapterSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
