"""AdapterSession: open an unmerged export once, switch adapters per request or per batch row.

    session = AdapterSession("out/")                       # reads out/manifest.json and the model
    session.run(feeds, adapter="support")                   # one adapter for the whole batch
    session.run(feeds, adapter_ids=["support", None, "style"])  # bank / custom-op: one per row
    session.add_adapter("new", "peft_dir/"); session.remove_adapter("style")
    session.generate([[1, 5, 9], [7, 3]], adapters=["support", None], max_new_tokens=32)  # with-past decoders

Switching strategies (see export/onnx_unmerged.py):
  ort-adapters  each adapter is an `onnxruntime.LoraAdapter` (mmap'd .onnx_adapter) with a RunOptions
                built once, so switching costs a dictionary lookup. The file holds the adapter's A / B and, for
                elementwise kinds ((IA)^3, RoAd, BitFit: the manifest's `row_sites`), its vectors; every input it
                does not name keeps the model's default (empty A / B, identity vectors: the base model).
  bank, custom-op  `adapter_ids` per row; adding an adapter fills a free slot of the bank, which the session makes
                an overridable model input when it loads the model (the file keeps banks as plain initializers, quiet
                in plain ONNX Runtime): the session feeds its own copy, the ONNX session is never rebuilt.
                Elementwise kinds are gathered per row from their own banks by the same ids; a slot holds the
                identity in every row bank its adapter has no vectors for.
Adding an adapter while serving (`add_adapter`): LoRA from any source (`rewrite.runtime.adapter_source`), an
elementwise kind from a PEFT directory (IA3, ROAD, BEFT) or an .onnx_adapter, at sites where the export holds a row
site of the same kind and layout (`AdapterSlotError` otherwise, naming what the export holds there).
Providers: without `providers=`, the CUDA EP first when onnxruntime offers it (onnxruntime-gpu), then the CPU EP; a
custom-op export registers the CUDA build of its library with the CUDA EP, the CPU build otherwise
(`rewrite.runtime.providers`). `session.providers` is what ONNX Runtime enabled, `session.library` the library.
Thread safety: adapter tables are immutable snapshots swapped under a lock; `run` reads one snapshot
and ONNX Runtime's `run` is itself thread-safe, so requests never see a half-added adapter.
Trust: the deployment directory is validated on open (`rewrite.formats.manifest`, the files it names, the model's
adapter inputs against the manifest's sizes: `DeploymentError`); a call that cannot be answered as asked is a
`RuntimeUseError`, never a silent answer from the base model. The temporary directory (added ort-adapters files)
goes with `close()`, `with`, garbage collection or interpreter exit.
"""
from __future__ import annotations

import functools
import shutil
import tempfile
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from rewrite.errors import AdapterFileError, DeploymentError, RuntimeUseError, did_you_mean, first_line
from rewrite.formats.manifest import MANIFEST, read_manifest
from rewrite.formats.onnx_adapter import write_onnx_adapter
from rewrite.names import check_adapter_name
from rewrite.runtime.adapter_source import AdapterTensors, read_adapter
from rewrite.runtime.bank_slot import bank_names, fill_slot
from rewrite.runtime.providers import choose as choose_providers
from rewrite.runtime.providers import disabled_optimizers

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


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
        manifest = read_manifest(directory)
        found = next(((i, e) for i, e in enumerate(manifest.exports) if e.mode == "unmerged"), None)
        if found is None:
            raise DeploymentError(f"{directory / MANIFEST}: no unmerged export; set [export] mode = \"unmerged\"")
        index, entry = found
        self.directory, self.entry, self.switching = directory, entry, entry.switching
        self._field = f"{directory / MANIFEST}: 'exports[{index}]"  # + ".key': ..." names a field in errors
        self.model_path = self._named_file(entry.file, ".file")
        self._sites = {s.site: dict(s.model_dump(), rank_limit=s.rank if entry.routed else None) for s in entry.sites}
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        providers, cuda = choose_providers(providers)
        self.library: Path | None = None  # the LoraDelta library registered (custom-op exports)
        if self.switching == "custom-op":
            from rewrite.runtime.ops import library_path

            self.library = library_path(cuda=cuda)
            options.register_custom_ops_library(str(self.library))
        model, banks = self._with_bank_inputs(options) if entry.routed else (str(self.model_path), None)
        try:
            self._session = ort.InferenceSession(model, options, providers=providers,
                                                 disabled_optimizers=disabled_optimizers(providers))
        except Exception as err:  # noqa: BLE001 - ONNX Runtime's own exception types; a broken file is bad input
            raise DeploymentError(f"{self.model_path}: ONNX Runtime cannot load this model: {first_line(err)}"
                                  ) from None
        del model
        self._check_model_inputs()
        # the model's, not the option's: a float16 model has float16 banks and A / B inputs
        self._dtypes = self._adapter_dtypes()
        self.bank_dtype = "float16" if np.float16 in self._dtypes.values() else "float32"  # what adapters may hold
        self._lock = threading.Lock()
        self._tmp = Path(tempfile.mkdtemp(prefix="rewrite-adapters-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._tmp, ignore_errors=True)
        self._snapshot = _Snapshot()
        if self.switching == "ort-adapters":
            for name, info in entry.adapters.items():
                self._add_file(name, self._named_file(info.file, f".adapters.{name}.file"))
        else:
            self._snapshot = _Snapshot(slots={n: i.slot for n, i in entry.adapters.items()},
                                       bank=self._initial_banks(banks))

    def _named_file(self, name: str, key: str) -> Path:
        """A file the manifest names (a relative path inside the directory: the manifest's schema checks that)."""
        file = self.directory / name
        if not file.is_file():
            raise DeploymentError(f"{self._field}{key}': {file} does not exist")
        return file

    def _expected_shapes(self) -> dict[str, tuple[int | None, ...]]:
        """{A / B input name: its shape} as the manifest describes the model (None: a rank dim of any size)."""
        capacity, out, width = self.entry.capacity, {}, {}
        for s in self.entry.sites:  # the sites of a fused group share one A: its width is the sum of theirs
            width[s.A] = width.get(s.A, 0) + s.rank
        for r in self.entry.row_sites:
            out.update({name: (capacity + 1, r.widths[p]) if self.entry.routed else (1, 1, r.widths[p])
                        for p, name in r.banks.items()})
        for s in self.entry.sites:
            if self.switching == "ort-adapters":
                out[s.A], out[s.B] = (s.d_in, None), (None, s.d_out)
            elif self.switching == "bank":
                out[s.A], out[s.B] = (s.d_in, capacity * width[s.A]), (capacity * s.rank, s.d_out)
            else:
                out[s.A], out[s.B] = (capacity, s.d_in, width[s.A]), (capacity, s.rank, s.d_out)
        return out

    def _check_model_inputs(self) -> None:
        """The adapter inputs the manifest names exist in the model, with the sizes it gives for them."""
        # inputs with a default (the banks, ort-adapters' empty A / B) are "overridable initializers" to ONNX Runtime
        args = [*self._session.get_inputs(), *self._session.get_overridable_initializers()]
        inputs = {i.name: i.shape for i in args}
        where = {name: f".sites[{i}].{key}" for i, s in enumerate(self.entry.sites)
                 for key, name in (("A", s.A), ("B", s.B))}
        where.update({name: f".row_sites[{i}].banks.{key}" for i, r in enumerate(self.entry.row_sites)
                      for key, name in r.banks.items()})
        for name, shape in self._expected_shapes().items():
            if name not in inputs:
                raise DeploymentError(f"{self._field}{where[name]}': {name!r} is not an input of {self.model_path}")
            got = [d if isinstance(d, int) else None for d in inputs[name]]
            if len(got) != len(shape) or any(e is not None and g != e for g, e in zip(got, shape)):
                raise DeploymentError(f"{self._field}{where[name].rpartition('.')[0]}': input {name!r} of "
                                      f"{self.model_path} has shape {inputs[name]}, the manifest's sizes give "
                                      f"{['rank' if e is None else e for e in shape]}")
        if self.entry.routed and self.entry.ids_input not in inputs:
            raise DeploymentError(f"{self._field}.ids_input': {self.entry.ids_input!r} is not an input of "
                                  f"{self.model_path}")

    def _adapter_dtypes(self) -> dict[str, np.dtype]:
        """{A / B / row-bank input name: the float type the model takes there} (a float16 model: float16)."""
        args = [*self._session.get_inputs(), *self._session.get_overridable_initializers()]
        types = {i.name: i.type for i in args}
        names = [n for s in self.entry.sites for n in (s.A, s.B)] + [n for r in self.entry.row_sites
                                                                      for n in r.banks.values()]
        out = {n: np.dtype(_ORT_TYPES.get(types[n], object)) for n in names}
        odd = {n: types[n] for n, t in out.items() if t not in (np.float32, np.float16)}
        if odd:
            name, kind = next(iter(odd.items()))
            raise DeploymentError(f"{self.model_path}: adapter input {name!r} takes {kind}; adapters are float32 "
                                  "or float16")
        return out

    @property
    def adapters(self) -> list[str]:
        snap = self._snapshot
        return sorted(snap.run_options if self.switching == "ort-adapters" else snap.slots)

    @property
    def providers(self) -> list[str]:
        """The execution providers ONNX Runtime enabled, in priority order (it drops a CUDA EP it cannot start)."""
        return self._session.get_providers()

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self._session.get_inputs()]

    @functools.cached_property
    def _own_inputs(self) -> dict[str, tuple[type | None, list]]:
        """{input name: (numpy dtype, shape)} of the model's own inputs (not adapter_ids, not the adapter tensors)."""
        internal = {self.entry.ids_input, *self._bank_names()}
        return {i.name: (_ORT_TYPES.get(i.type), i.shape) for i in self._session.get_inputs() if i.name not in internal}

    # ---- serving -------------------------------------------------------------------------------
    def run(self, feeds: dict[str, np.ndarray], *, adapter: str | None = None,
            adapter_ids: Sequence[str | int | None] | np.ndarray | None = None,
            output_names: list[str] | None = None) -> list[np.ndarray]:
        snap = self._snapshot
        if adapter is not None and adapter_ids is not None:
            raise RuntimeUseError("give `adapter` (one for the batch) or `adapter_ids` (one per row), not both")
        self._check_feeds(feeds)
        if self.switching == "ort-adapters":
            if adapter_ids is not None:
                adapter = self._one_adapter(adapter_ids, self._batch(feeds))
            if adapter is None:
                return self._ort_run(output_names, feeds)
            # RunOptions points at its LoraAdapter without owning it: `active` keeps both alive for this run even if
            # the adapter is removed or replaced meanwhile; once no run holds them they are freed.
            active = snap.run_options.get(adapter)
            if active is None:
                raise _unknown(adapter, snap.run_options)
            return self._ort_run(output_names, feeds, active[0])
        all_feeds = dict(feeds)
        all_feeds[self.entry.ids_input] = self._ids(snap, self._batch(feeds), adapter, adapter_ids)
        if snap.bank_dirty:
            all_feeds.update(snap.bank)
        return self._ort_run(output_names, all_feeds)

    def generate(self, prompts: Sequence[Sequence[int]], *, adapters: Sequence[str | int | None] | None = None,
                 **options: Any) -> list[list[int]]:
        """The new tokens of every prompt from a with-past export (`[capture] use_cache = true`), by
        `rewrite.runtime.generate.generate`'s rules and options (max_new_tokens, stop_tokens, do_sample, ...).

        `adapters` gives each prompt an adapter name (or a bank slot; None = the base model), fixed for the row's
        whole generation; without it every row runs on the base model. Names are checked before the first step
        (`RuntimeUseError` names the unknown one and lists the loaded ones), and the adapter set is pinned for the
        call: an adapter added or removed meanwhile counts from the next call. ort-adapters exports take one adapter
        for all rows."""
        from rewrite.runtime.generate import generate

        if "adapter_ids" in options:
            raise RuntimeUseError("AdapterSession.generate takes adapter names as adapters=[name or None per prompt]")
        if isinstance(adapters, str):
            raise RuntimeUseError(f"adapters: one name (or None) per prompt, got the string {adapters!r}; for one "
                                  "adapter on every row pass [name] * len(prompts)")
        snap, batch = self._snapshot, len(prompts)
        extra: dict[str, np.ndarray] = {}
        active = None
        if self.switching == "ort-adapters":
            name = None if adapters is None else self._one_adapter(adapters, batch)
            if name is not None:
                if name not in snap.run_options:
                    raise _unknown(name, snap.run_options)
                active = snap.run_options[name]
        else:
            extra[self.entry.ids_input] = self._ids(snap, batch, None, adapters)
            if snap.bank_dirty:
                extra.update(snap.bank)
        return generate(_Pinned(self, extra, active), prompts, **options)

    def _check_feeds(self, feeds) -> None:
        """The model's own inputs, each once, as arrays of the element type and rank the model takes."""
        if not isinstance(feeds, dict):
            raise RuntimeUseError(f"feeds: expected a dict of input name -> array, got {type(feeds).__name__}")
        own = self._own_inputs
        for name, value in feeds.items():
            if name not in own:
                raise RuntimeUseError(f"feeds: {name!r} is not an input of {self.model_path} (inputs: "
                                      f"{', '.join(own)}){did_you_mean(str(name), own)}")
            (want, shape), array = own[name], np.asarray(value)
            if want is not None and array.dtype != want:
                raise RuntimeUseError(f"feeds[{name!r}]: dtype {array.dtype}, the model takes {np.dtype(want)}")
            if array.ndim != len(shape):
                raise RuntimeUseError(f"feeds[{name!r}]: {array.ndim} dims {array.shape}, the model takes "
                                      f"{len(shape)} {shape}")
        missing = [name for name in own if name not in feeds]
        if missing:
            raise RuntimeUseError(f"feeds: give the model's inputs as arrays with a batch dimension (missing: "
                                  f"{', '.join(missing)})")

    def _ort_run(self, output_names, feeds, run_options=None) -> list[np.ndarray]:
        try:
            return self._session.run(output_names, feeds, run_options)
        except Exception as err:  # noqa: BLE001 - ONNX Runtime's own exception types; a bad call is the caller's
            raise RuntimeUseError(f"{self.model_path}: ONNX Runtime refused the call: {first_line(err)}") from None

    @staticmethod
    def _batch(feeds: dict[str, np.ndarray]) -> int:
        shape = np.shape(next(iter(feeds.values()))) if feeds else ()
        if not shape:
            raise RuntimeUseError("feeds: give the model's inputs as arrays with a batch dimension")
        return shape[0]

    @staticmethod
    def _check_length(adapter_ids, batch: int) -> None:
        count = len(adapter_ids) if np.ndim(adapter_ids) == 1 else -1
        if count != batch:
            shape = f"{count} entries" if count >= 0 else f"shape {np.shape(adapter_ids)}"
            raise RuntimeUseError(f"adapter_ids has {shape} for a batch of {batch} (one id per row)")

    def _one_adapter(self, adapter_ids, batch: int) -> str | None:
        """ort-adapters: per-row ids are accepted only when every row names the same adapter."""
        self._check_length(adapter_ids, batch)
        names = set(adapter_ids.tolist() if isinstance(adapter_ids, np.ndarray) else adapter_ids)
        if len(names) > 1:
            raise RuntimeUseError("this model switches one adapter per run (ort-adapters); export with "
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
            ids = np.array([self._row_id(snap, a) for a in adapter_ids], dtype=np.int64)
        # a slot outside the bank or without an adapter would silently answer with the base model
        capacity = self.entry.capacity
        bad = ids[(ids < -1) | (ids >= capacity)]
        if bad.size:
            raise RuntimeUseError(f"adapter_ids: slot {int(bad[0])} is neither -1 (base) nor a bank slot "
                                  f"0..{capacity - 1}")
        empty = sorted(set(ids[ids >= 0].tolist()) - set(snap.slots.values()))
        if empty:
            loaded = ", ".join(f"{n}={s}" for n, s in sorted(snap.slots.items(), key=lambda item: item[1]))
            raise RuntimeUseError(f"adapter_ids: slot {empty[0]} holds no adapter (empty or removed); loaded: "
                                  f"{loaded or 'none'}; -1 is the base model")
        return ids

    def _row_id(self, snap: _Snapshot, adapter: Any) -> int:
        if adapter is None:
            return -1
        if isinstance(adapter, (int, np.integer)) and not isinstance(adapter, (bool, np.bool_)):
            return int(adapter)
        if isinstance(adapter, str):
            return self._slot(snap, adapter)
        raise RuntimeUseError(f"adapter_ids: {adapter!r} is neither an adapter name, a slot number nor None (base)")

    @staticmethod
    def _slot(snap: _Snapshot, name: str) -> int:
        if name not in snap.slots:
            raise _unknown(name, snap.slots)
        return snap.slots[name]

    # ---- adapter management --------------------------------------------------------------------
    def add_adapter(self, name: str, source: Any, *, replace_existing: bool = False) -> None:
        """Add (or with replace_existing, replace) an adapter from a PEFT dir, our file, .onnx_adapter or dict.
        `name` is an identifier (rewrite.names): it also names a file in the session's temporary directory."""
        check_adapter_name(name, "add_adapter")
        tensors = self._read(source)
        with self._lock:
            if name in self.adapters and not replace_existing:
                raise AdapterFileError(f"adapter {name!r} is already loaded (remove it first or pass "
                                       "replace_existing=True)")
            if self.switching == "ort-adapters":
                file = self._tmp / f"{name}.onnx_adapter"
                inputs = {self._sites[s][k]: t for s, (a, b) in tensors.factors.items()
                          for k, t in (("A", a), ("B", b))}
                inputs.update({n: v.reshape(1, 1, -1) for n, v in tensors.rows.items()})  # the model's input shape
                inputs = {n: t.astype(self._dtypes[n], copy=False) for n, t in inputs.items()}
                write_onnx_adapter(file, inputs, self.entry.model_version)
                try:
                    self._add_file(name, file)
                finally:
                    file.unlink()  # loaded (mapped) already: nothing accumulates on disk
            else:
                self._add_to_bank(name, tensors)

    def _read(self, source: Any) -> AdapterTensors:
        return read_adapter(source, self._sites, self.entry.row_sites, model_version=self.entry.model_version,
                            dtype=self.bank_dtype, reserve=self.entry.reserve)

    def remove_adapter(self, name: str) -> None:
        with self._lock:
            snap = self._snapshot
            if name not in self.adapters:
                raise _unknown(name, self.adapters)
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
        self._read(file)
        adapter = ort.LoraAdapter()
        adapter.Load(str(file))
        options = ort.RunOptions()
        options.add_active_adapter(adapter)
        run_options = dict(self._snapshot.run_options)
        run_options[name] = (options, adapter)
        self._snapshot = replace(self._snapshot, run_options=run_options)

    # ---- banks ---------------------------------------------------------------------------------
    def _with_bank_inputs(self, options: ort.SessionOptions) -> tuple[bytes | str, dict[str, onnx.TensorProto] | None]:
        """The model with its banks declared graph inputs (so a run can override them), and the bank initializers.

        The file keeps the banks as plain initializers: ONNX Runtime warns about every initializer that is also a graph
        input, so a file holding that form is noisy in plain ONNX Runtime; this session logs errors only. Files that
        already list the banks as inputs (older exports) load the same way. An unreadable file goes to ONNX Runtime
        as it is, which names the problem."""
        try:
            model = onnx.load(str(self.model_path), load_external_data=False)
        except Exception:  # noqa: BLE001 - protobuf's decode errors; ONNX Runtime reports the broken file below
            return str(self.model_path), None
        names = self._bank_names()
        banks = {init.name: init for init in model.graph.initializer if init.name in names}
        declared = {value.name for value in model.graph.input}
        for name, init in banks.items():
            if name not in declared:
                model.graph.input.append(onnx.helper.make_tensor_value_info(name, init.data_type, list(init.dims)))
        # weights in external data are read from the model's directory, as when ONNX Runtime loads the file itself
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(self.model_path.parent))
        return model.SerializeToString(), banks

    def _bank_names(self) -> set[str]:
        """The model inputs holding adapters: A / B of low-rank sites, the banks of elementwise ones."""
        return {*(n for s in self.entry.sites for n in (s.A, s.B)),
                *(n for r in self.entry.row_sites for n in r.banks.values())}

    def _initial_banks(self, initializers: dict[str, onnx.TensorProto] | None) -> dict[str, np.ndarray]:
        names = self._bank_names()
        banks = {name: onnx.numpy_helper.to_array(init, base_dir=str(self.model_path.parent)).copy()
                 for name, init in (initializers or {}).items()}
        missing = sorted(names - set(banks))
        if missing:
            raise DeploymentError(f"{self.model_path}: bank input {missing[0]!r} has no initializer (the exported "
                                  "adapters); the model does not fit its manifest")
        return banks

    def _add_to_bank(self, name: str, tensors: AdapterTensors) -> None:
        snap = self._snapshot
        slots = dict(snap.slots)
        old = slots.pop(name, None)
        used = set(slots.values())
        free = old if old is not None else next((s for s in range(self.entry.capacity) if s not in used), None)
        if free is None:
            raise AdapterFileError(f"the bank is full ({self.entry.capacity} slots); remove an adapter or "
                                   "export with a larger [export] capacity")
        bank = self._write_slot(snap.bank, free, tensors)
        slots[name] = free
        self._snapshot = replace(snap, slots=slots, bank=bank, bank_dirty=True)

    def _write_slot(self, bank: dict[str, np.ndarray], slot: int,
                    tensors: AdapterTensors | None) -> dict[str, np.ndarray]:
        """A new bank dict with `slot` set to the adapter's tensors or cleared (None): `fill_slot` on copies, so a
        run holding the old snapshot keeps its banks."""
        out = dict(bank)
        out.update({name: bank[name].copy() for name in bank_names(self.entry)})
        fill_slot(self.entry, out, slot, tensors)
        return out

    def close(self) -> None:
        """Remove the session's temporary directory (also done when the session is collected or at exit)."""
        self._cleanup()

    def __enter__(self) -> "AdapterSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Pinned:
    """The ONNX session as `generate` sees it: every run adds the adapter ids and banks (and, for ort-adapters, the
    RunOptions with its LoraAdapter) fixed when the generation began. Holding them keeps a removed adapter alive
    until the generation ends."""

    def __init__(self, owner: AdapterSession, extra: dict[str, np.ndarray],
                 active: tuple[ort.RunOptions, ort.LoraAdapter] | None):
        self._owner, self._extra, self._active = owner, extra, active

    def get_inputs(self) -> list:
        return self._owner._session.get_inputs()

    def get_outputs(self) -> list:
        return self._owner._session.get_outputs()

    def run(self, output_names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        run_options = None if self._active is None else self._active[0]
        return self._owner._ort_run(output_names, {**feeds, **self._extra}, run_options)


def _unknown(name: object, loaded) -> RuntimeUseError:
    if name == "":
        return RuntimeUseError(f"the adapter name is empty: give a loaded adapter's name (loaded: {sorted(loaded)}) "
                               "or None for the base model")
    return RuntimeUseError(f"unknown adapter {name!r}; loaded: {sorted(loaded)}")
