"""Triton's dynamic batcher and ONNX Runtime backend, as far as the tests need them, driven by the parsed config.pbtxt.

`parse_config(path)` parses with Triton's own schema (tritonclient's `model_config_pb2` through protobuf's
`text_format`, which refuses unknown fields and wrong types). `TritonLike(model_dir)` serves the latest version:
each request is checked against the config (its inputs, their data types, dims with -1 wildcards, a batch of 1 per
request), requests are concatenated on the batch axis, `reshape` applied (the adapter id [n, 1] -> [n]), the model
run by ONNX Runtime with the config's `model_operations` libraries registered, and the outputs split per request.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

NUMPY = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_INT64": np.int64, "TYPE_INT32": np.int32,
         "TYPE_BOOL": np.bool_}


def parse_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())


class TritonLike:
    def __init__(self, model_dir: Path, version: int | None = None):
        self.config = parse_config(model_dir / "config.pbtxt")
        assert self.config.platform == "onnxruntime_onnx" and self.config.max_batch_size > 0
        version = version or max(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
        options = ort.SessionOptions()
        options.log_severity_level = 3
        for library in self.config.model_operations.op_library_filename:
            options.register_custom_ops_library(library)
        self.session = ort.InferenceSession(str(model_dir / str(version) / "model.onnx"), options,
                                            providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.config.input}

    def _check(self, request: dict[str, np.ndarray]) -> None:
        assert set(request) == set(self.inputs), f"request inputs {sorted(request)} != config {sorted(self.inputs)}"
        for name, array in request.items():
            spec = self.inputs[name]
            assert array.dtype == NUMPY[model_config_pb2.DataType.Name(spec.data_type)], (name, array.dtype)
            assert array.shape[0] == 1 and len(array.shape) == len(spec.dims) + 1, (name, array.shape, spec.dims)
            assert all(d == -1 or d == s for d, s in zip(spec.dims, array.shape[1:])), (name, array.shape, spec.dims)

    def run(self, requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """One dynamic batch of single-row requests (their shapes agree, as the batcher requires)."""
        assert 1 <= len(requests) <= self.config.max_batch_size
        for request in requests:
            self._check(request)
        feeds = {}
        for name, spec in self.inputs.items():
            batch = np.concatenate([r[name] for r in requests], axis=0)
            feeds[name] = batch.reshape(len(requests), *spec.reshape.shape) if spec.HasField("reshape") else batch
        outputs = self.session.run([o.name for o in self.config.output], feeds)
        return [{o.name: out[i:i + 1] for o, out in zip(self.config.output, outputs)} for i in range(len(requests))]
