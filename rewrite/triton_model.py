"""The ONNX model in a Triton version directory: the export's model made fit for Triton, one slot table per version.

Rules:
  * Triton's ONNX Runtime backend counts the model's inputs against config.pbtxt, so banks that older exports list
    as graph inputs are dropped from `graph.input` (they stay initializers: the version's adapters).
  * Triton feeds the ids as they come. An id that is neither -1 (the base model) nor a slot holding an adapter would
    silently answer with the base model (bank) or another version's leftovers, so a guard runs first: the row's
    slot is looked up in `LOADED` (bool [capacity + 1], entry 0 the base model) and a bad id makes a `Gather`
    read out of bounds. ONNX Runtime then fails the whole batch with the guard's node name as the reason, which
    Triton returns to the client; the ids reach the adapter ops unchanged (+ 0) otherwise.
  * A new version writes its slots into the bank initializers (zero-padded to the site's bank rank; a cleared slot is
    all zeros) and its table into `LOADED`; the weights in external data files are copied as they are, never
    rewritten (not hard-linked: `onnx` refuses to read external data through a file with several links).
"""
from __future__ import annotations

import shutil
from pathlib import Path, PurePosixPath

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rewrite.errors import DeploymentError
from rewrite.formats.manifest import UnmergedExport
from rewrite.runtime.adapter_source import AdapterTensors
from rewrite.runtime.bank_slot import bank_names, fill_slot

LOADED = "rewrite.triton.loaded_slots"
GUARD = "adapter_ids_check: an adapter id is neither -1 (the base model) nor a slot holding an adapter"
_CHECKED = "rewrite.triton.checked_ids"


def _constants(capacity: int) -> list[TensorProto]:
    values = {"low": -1, "high": capacity, "one": 1, "zero": 0}
    out = [numpy_helper.from_array(np.array(v, np.int64), f"rewrite.triton.{k}") for k, v in values.items()]
    return [*out, numpy_helper.from_array(np.zeros(1, np.int64), "rewrite.triton.zeros")]


def add_guard(model: onnx.ModelProto, ids: str, capacity: int, slots: set[int]) -> None:
    """Route every use of the ids input through the guard (see the module's rules)."""
    for node in model.graph.node:
        node.input[:] = [_CHECKED if name == ids else name for name in node.input]
    c = "rewrite.triton."
    nodes = [helper.make_node("GreaterOrEqual", [ids, c + "low"], [c + "above"]),
             helper.make_node("Less", [ids, c + "high"], [c + "below"]),
             helper.make_node("And", [c + "above", c + "below"], [c + "in_range"]),
             helper.make_node("Add", [ids, c + "one"], [c + "shifted"]),
             helper.make_node("Where", [c + "in_range", c + "shifted", c + "zero"], [c + "index"]),
             helper.make_node("Gather", [LOADED, c + "index"], [c + "loaded"]),
             helper.make_node("And", [c + "in_range", c + "loaded"], [c + "ok"]),
             helper.make_node("Not", [c + "ok"], [c + "bad"]),
             helper.make_node("Cast", [c + "bad"], [c + "out_of_bounds"], to=TensorProto.INT64),
             helper.make_node("Gather", [c + "zeros", c + "out_of_bounds"], [c + "nothing"], name=GUARD),
             helper.make_node("Add", [ids, c + "nothing"], [_CHECKED])]
    for index, node in enumerate(nodes):
        model.graph.node.insert(index, node)
    model.graph.initializer.extend(_constants(capacity))
    model.graph.initializer.append(_loaded_table(capacity, slots))


def _loaded_table(capacity: int, slots: set[int]) -> TensorProto:
    table = np.zeros(capacity + 1, np.bool_)
    table[0] = True
    table[[s + 1 for s in slots]] = True
    return numpy_helper.from_array(table, LOADED)


def drop_weight_inputs(model: onnx.ModelProto) -> None:
    """Graph inputs that are also initializers (banks in older exports) are weights, not request tensors."""
    weights = {init.name for init in model.graph.initializer}
    kept = [value for value in model.graph.input if value.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(kept)


def write_slot(model: onnx.ModelProto, entry: UnmergedExport, slot: int, tensors: AdapterTensors | None,
               base_dir: Path) -> None:
    """Set `slot` of every bank initializer to the adapter's `tensors` or clear it (None): `fill_slot`."""
    inits = {init.name: init for init in model.graph.initializer}
    banks = {name: numpy_helper.to_array(inits[name], base_dir=str(base_dir)).copy() for name in bank_names(entry)}
    fill_slot(entry, banks, slot, tensors)
    for name, array in banks.items():
        inits[name].CopyFrom(numpy_helper.from_array(array, name))


def set_loaded(model: onnx.ModelProto, capacity: int, slots: set[int]) -> None:
    """The guard's table of slots holding an adapter in this version."""
    table = next(init for init in model.graph.initializer if init.name == LOADED)
    table.CopyFrom(_loaded_table(capacity, slots))


def external_files(model: onnx.ModelProto) -> list[str]:
    """The external data files the model's initializers name (relative paths inside its directory)."""
    names = set()
    for init in model.graph.initializer:
        if init.data_location == TensorProto.EXTERNAL:
            location = next(e.value for e in init.external_data if e.key == "location")
            if PurePosixPath(location).is_absolute() or ".." in PurePosixPath(location).parts:
                raise DeploymentError(f"initializer {init.name!r}: external data {location!r} is not a file beside "
                                      "the model")
            names.add(location)
    return sorted(names)


def save(model: onnx.ModelProto, directory: Path, source_dir: Path) -> list[Path]:
    """Write `directory`/model.onnx and copy its external data files from `source_dir`; the files written."""
    written = []
    for name in external_files(model):
        target = directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source_dir / name, target)
        written.append(target)
    onnx.save_model(model, str(directory / "model.onnx"))
    return [directory / "model.onnx", *written]
