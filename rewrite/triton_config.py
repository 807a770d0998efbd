"""`config.pbtxt` of a Triton model served by the ONNX Runtime backend, written as protobuf text.

Rules (Triton's model configuration; the tests parse the text with Triton's own `ModelConfig` schema):
  * `platform: "onnxruntime_onnx"`, `max_batch_size` > 0, so the batch axis is implicit: `dims` are one request's
    shape without it, -1 for a dynamic axis; Triton's dynamic batcher concatenates requests on that axis, and only
    requests whose other dims agree (a sequence length) share a batch.
  * The adapter id is one INT64 per request, `dims: [1]` with `reshape { shape: [] }`: the model sees `[batch]`, one
    id per row, so requests for different adapters share one batch.
  * `model_operations { op_library_filename }` names the custom-op library by its absolute path in the server (ONNX
    Runtime's `RegisterCustomOpsLibrary` opens it as given).
  * The adapter table (name -> slot) is in `parameters` (`rewrite.adapter.<name>`), between two marker lines, so a
    client reads it from the server (`get_model_config`) and a new version rewrites only those lines, keeping any edit
    made elsewhere in the file.
"""
from __future__ import annotations

import numpy as np

from rewrite.errors import ExportError
from rewrite.options import TritonOptions
from rewrite.runtime.model_io import TensorSpec

TABLE_START = "# rewrite: adapter table (name -> slot), rewritten with each new version"
TABLE_END = "# rewrite: end of adapter table"
ADAPTER_KEY = "rewrite.adapter."
IDS_KEY = "rewrite.ids_input"
_TYPES = {np.dtype(np.float32): "TYPE_FP32", np.dtype(np.float16): "TYPE_FP16", np.dtype(np.float64): "TYPE_FP64",
          np.dtype(np.int64): "TYPE_INT64", np.dtype(np.int32): "TYPE_INT32", np.dtype(np.int16): "TYPE_INT16",
          np.dtype(np.int8): "TYPE_INT8", np.dtype(np.uint8): "TYPE_UINT8", np.dtype(np.bool_): "TYPE_BOOL"}


def quoted(text: str) -> str:
    """A protobuf text-format string literal."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _type(spec: TensorSpec) -> str:
    if spec.dtype not in _TYPES:
        raise ExportError(f"tensor {spec.name!r}: element type {spec.dtype} has no Triton data type here")
    return _TYPES[spec.dtype]


def client_type(dtype: np.dtype) -> str:
    """The datatype name tritonclient's `InferInput` takes ("FP32", "INT64")."""
    return _TYPES[np.dtype(dtype)].removeprefix("TYPE_")


def _tensor(kind: str, spec: TensorSpec, reshape: bool = False) -> list[str]:
    dims = ", ".join(str(d) if isinstance(d, int) else "-1" for d in spec.dims[1:]) if not reshape else "1"
    lines = [f"{kind} {{", f"  name: {quoted(spec.name)}", f"  data_type: {_type(spec)}", f"  dims: [ {dims} ]"]
    if reshape:
        lines.append("  reshape { shape: [ ] }")
    return [*lines, "}"]


def _parameter(key: str, value: str) -> str:
    return f"parameters {{ key: {quoted(key)} value {{ string_value: {quoted(value)} }} }}"


def adapter_table(slots: dict[str, int]) -> str:
    """The marked block of `parameters` that maps adapter names to slots."""
    rows = [_parameter(f"{ADAPTER_KEY}{name}", str(slot)) for name, slot in sorted(slots.items(), key=lambda i: i[1])]
    return "\n".join([TABLE_START, *rows, TABLE_END])


def replace_adapter_table(text: str, slots: dict[str, int]) -> str:
    """`text` (a config.pbtxt this module wrote, maybe edited since) with a new adapter table."""
    start, end = text.find(TABLE_START), text.find(TABLE_END)
    if start < 0 or end < start:
        raise ExportError(f"config.pbtxt has no adapter table between the lines {TABLE_START!r} and {TABLE_END!r} "
                          "(was it written by rewrite triton?)")
    return text[:start] + adapter_table(slots) + text[end + len(TABLE_END):]


def config_text(name: str, inputs: list[TensorSpec], ids: TensorSpec, outputs: list[TensorSpec],
                options: TritonOptions, slots: dict[str, int], library: str | None) -> str:
    """The whole config.pbtxt: `inputs` are the model's own inputs, `ids` its adapter id input."""
    lines = ["# Written by `rewrite triton`. Triton's ONNX Runtime backend; adapters are chosen per request by id.",
             f"name: {quoted(name)}", 'platform: "onnxruntime_onnx"', f"max_batch_size: {options.max_batch_size}",
             "version_policy { latest { num_versions: 1 } }"]
    for spec in inputs:
        lines += _tensor("input", spec)
    lines += _tensor("input", ids, reshape=True)
    for spec in outputs:
        lines += _tensor("output", spec)
    lines += ["dynamic_batching {", f"  preferred_batch_size: [ {', '.join(map(str, options.preferred))} ]",
              f"  max_queue_delay_microseconds: {options.queue_delay_us}", "}",
              f"instance_group {{ kind: KIND_{options.kind.upper()} count: {options.instances} }}"]
    if library is not None:
        lines.append(f"model_operations {{ op_library_filename: {quoted(library)} }}")
    if options.intra_op_threads:
        lines.append(_parameter("intra_op_thread_count", str(options.intra_op_threads)))
    lines += [_parameter(IDS_KEY, ids.name), adapter_table(slots)]
    return "\n".join(lines) + "\n"
