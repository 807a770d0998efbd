"""`rewrite triton`: a Triton model repository from an unmerged export (rewrite/triton_repo.py), against Triton's own
schema and an independent oracle.

1. config.pbtxt parses with Triton's `ModelConfig` (tritonclient's model_config_pb2, protobuf text_format), and that
   parser is strict (a misspelt field or a wrong type fails), so the parse is a real schema check.
2. The model, run by ONNX Runtime exactly as Triton's batcher feeds it (single-row requests, each with its own
   adapter id, concatenated on the batch axis, `reshape` applied; tests/triton_batcher.py), answers every request as
   PEFT does with that request's adapter (and as `AdapterSession` does per request); bank and custom-op.
3. custom-op: the library is copied into the repository and named by its server path in `model_operations`.
4. A new version adds (then removes) an adapter: the files it writes, the adapter table, the answers, the guard that
   fails an id whose slot holds nothing in that version; what is refused writes nothing.
5. examples/triton_client.py compiles and runs unchanged against a mocked tritonclient that serves the repository.
"""
from __future__ import annotations

import json
import py_compile
import runpy
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest

from rewrite.errors import AdapterFileError, ExportError, OutputError, RuntimeUseError
from rewrite.runtime.session import AdapterSession
from rewrite.options import TritonOptions
from rewrite.triton_model import GUARD
from rewrite.triton_repo import add_version, versions, write_repository

from serving_setup import need_custom_op, setup_fixture  # noqa: F401 - the `setup` fixture

pytest.importorskip("tritonclient.grpc")
peft = pytest.importorskip("peft")
from google.protobuf import text_format  # noqa: E402
from google.protobuf.json_format import MessageToDict  # noqa: E402
from triton_batcher import TritonLike, parse_config  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

def diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def requests_for(table: dict[str, int], adapters: list[str | None], seq: int, seed: int):
    """Single-row requests as a client sends them: x [1, seq, 64], adapter_ids [1, 1] (-1: base)."""
    g = np.random.default_rng(seed)
    return [{"x": g.standard_normal((1, seq, 64)).astype(np.float32),
             "adapter_ids": np.array([[-1 if a is None else table[a]]], np.int64)} for a in adapters]


def table_of(config) -> dict[str, int]:
    return {key.removeprefix("rewrite.adapter."): int(value.string_value)
            for key, value in config.parameters.items() if key.startswith("rewrite.adapter.")}


# ============================================================================= 1. schema


def test_config_parses_with_tritons_schema(setup, tmp_path):
    model_dir = write_repository(setup.export("bank"), tmp_path, TritonOptions(name="mlp", max_batch_size=16,
                                                                               queue_delay_us=250, instances=2)).model_dir
    config = parse_config(model_dir / "config.pbtxt")
    assert (config.name, config.platform, config.max_batch_size) == ("mlp", "onnxruntime_onnx", 16)
    inputs = {i.name: i for i in config.input}
    assert list(inputs) == ["x", "adapter_ids"]
    assert (inputs["x"].data_type, list(inputs["x"].dims)) == (model_config_pb2.TYPE_FP32, [-1, 64])
    ids = inputs["adapter_ids"]
    assert (ids.data_type, list(ids.dims), list(ids.reshape.shape)) == (model_config_pb2.TYPE_INT64, [1], [])
    assert ids.HasField("reshape") and not ids.optional
    session_outputs = onnx.load(str(model_dir / "1" / "model.onnx"), load_external_data=False).graph.output
    assert [(o.name, list(o.dims)) for o in config.output] == [(o.name, [-1, 64]) for o in session_outputs]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    assert [(g.kind, g.count) for g in config.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_CPU, 2)]
    assert config.version_policy.latest.num_versions == 1
    assert not config.model_operations.op_library_filename  # bank: standard ONNX ops only
    assert table_of(config) == {"support": 0, "style": 1}
    assert config.parameters["rewrite.ids_input"].string_value == "adapter_ids"
    # each version directory is a deployment directory in its own right
    manifest = json.loads((model_dir / "1" / "manifest.json").read_text())
    assert manifest["exports"][0]["file"] == "model.onnx"
    assert {n: a["slot"] for n, a in manifest["exports"][0]["adapters"].items()} == {"support": 0, "style": 1}


@pytest.mark.parametrize("typo", [("max_batch_size: 16", "max_batch_sze: 16"),
                                  ("data_type: TYPE_FP32", "data_type: TYPE_FLOAT32"),
                                  ("max_batch_size: 16", "max_batch_size: \"16\""),
                                  ("reshape { shape: [ ] }", "reshape { shapes: [ ] }")])
def test_the_schema_parse_is_strict(setup, tmp_path, typo):
    model_dir = write_repository(setup.export("bank"), tmp_path, TritonOptions(name="mlp", max_batch_size=16)).model_dir
    text = (model_dir / "config.pbtxt").read_text()
    assert typo[0] in text
    with pytest.raises(text_format.ParseError):
        text_format.Parse(text.replace(typo[0], typo[1], 1), model_config_pb2.ModelConfig())


# ============================================================================= 2. numerics as Triton feeds the model


@pytest.mark.parametrize("switching", ["bank", pytest.param("custom-op", marks=pytest.mark.slow)])
def test_batched_requests_equal_peft_and_single_requests(setup, tmp_path, switching):
    need_custom_op(switching)
    out = setup.export(switching)
    model_dir = write_repository(out, tmp_path).model_dir
    triton = TritonLike(model_dir)
    table = table_of(triton.config)
    worst = 0.0
    with AdapterSession(out) as session:
        for seed, (seq, adapters) in enumerate([(3, ["support", None, "style", "support", "style", None, "style"]),
                                                (5, ["style", "support", None])]):
            requests = requests_for(table, adapters, seq, seed)
            answers = triton.run(requests)
            for request, answer, adapter in zip(requests, answers, adapters):
                (y,) = answer.values()
                single = session.run({"x": request["x"]}, adapter=adapter)[0]
                worst = max(worst, diff(y, setup.peft(request["x"], adapter)), diff(y, single))
                others = [setup.peft(request["x"], a) for a in (None, "support", "style") if a != adapter]
                assert min(diff(y, o) for o in others) > 1e-3  # the adapters differ: the check can fail
    assert worst <= 1e-5


def test_export_target_triton_writes_the_repository_inside_out(setup, tmp_path, capsys):
    """`[export] target = "triton"`: `rewrite apply` also writes OUT/triton/<OUT's name>/, served as Triton feeds it."""
    from rewrite.cli import main
    from test_unmerged import MLP_INPUTS, load_passes

    spec = tmp_path / "spec.toml"
    dirs = {name: setup.work / "peft" / name for name in ("support", "style")}
    spec.write_text(f"version = 1\n{MLP_INPUTS}{load_passes(dirs)}[export]\nmode = \"unmerged\"\n"
                    "switching = \"bank\"\ntarget = \"triton\"\ntriton = { max_batch_size = 8, queue_delay_us = 100 }\n")
    out = tmp_path / "mlp-v2"
    assert main(["apply", str(spec), "factories:mlp4", "-o", str(out), "--json"]) == 0
    assert "triton" in json.loads(capsys.readouterr().out)["files"]
    triton = TritonLike(out / "triton" / "mlp-v2")
    assert (triton.config.name, triton.config.max_batch_size) == ("mlp-v2", 8)
    assert triton.config.dynamic_batching.max_queue_delay_microseconds == 100
    adapters = ["style", None, "support"]
    requests = requests_for(table_of(triton.config), adapters, 4, 11)
    for request, answer, adapter in zip(requests, triton.run(requests), adapters):
        assert diff(next(iter(answer.values())), setup.peft(request["x"], adapter)) <= 1e-5


@pytest.mark.parametrize("export, message", [
    ('mode = "unmerged"\nswitching = "ort-adapters"\ntarget = "triton"',
     r'target = "triton" needs mode = "unmerged" with switching = "bank" or "custom-op" \(got mode = "unmerged", '
     r'switching = "ort-adapters"\)'),
    ('mode = "unmerged"\nswitching = "bank"\ntriton = { max_batch_size = 8 }', r'a triton table needs target = "triton"'),
    ('mode = "unmerged"\nswitching = "bank"\ntarget = "triton"\ntriton = { max_batch_sise = 8 }',
     r"unknown key 'export.triton.max_batch_sise'. Did you mean: 'max_batch_size'"),
    ('mode = "unmerged"\nswitching = "bank"\ntarget = "triton"\ntriton = { preferred_batch_sizes = [64] }',
     r"preferred batch size 64: must be within 1..max_batch_size \(32\)"),
])
def test_bad_triton_export_options_are_spec_errors(export, message):
    from rewrite.errors import SpecError
    from rewrite.spec import parse_spec

    with pytest.raises(SpecError, match=message):
        parse_spec(f"version = 1\n[export]\n{export}\n")


def test_bad_triton_flags_name_the_flag(setup, tmp_path, capsys):
    from rewrite.cli import main

    assert main(["triton", str(setup.export("bank")), "-o", str(tmp_path), "--max-batch-size", "0"]) == 2
    assert "rewrite triton --max-batch-size: Input should be greater than or equal to 1" in capsys.readouterr().err
    assert main(["triton", str(setup.export("bank")), "-o", str(tmp_path), "--server-repo", "models"]) == 2
    assert "rewrite triton --server-repo: 'models' must be an absolute path" in capsys.readouterr().err


@pytest.mark.slow
def test_custom_op_library_is_copied_and_named(setup, tmp_path):
    need_custom_op("custom-op")
    from rewrite.runtime.ops import library_path

    model_dir = write_repository(setup.export("custom-op"), tmp_path / "repo", TritonOptions(name="mlp")).model_dir
    config = parse_config(model_dir / "config.pbtxt")
    library = model_dir / "librewrite_lora.so"
    assert list(config.model_operations.op_library_filename) == [str(library.resolve())]
    assert library.read_bytes() == library_path().read_bytes()
    in_server = write_repository(setup.export("custom-op"), tmp_path / "elsewhere",
                                 TritonOptions(name="mlp", server_repo="/models")).model_dir
    config = parse_config(in_server / "config.pbtxt")
    assert list(config.model_operations.op_library_filename) == ["/models/mlp/librewrite_lora.so"]
    readme = (in_server / "README.md").read_text()
    assert "/models/mlp/librewrite_lora.so" in readme and "--model-repository=/models" in readme


# ============================================================================= 4. adapters while serving


def guard_refuses(triton: TritonLike, ids: list[int]) -> None:
    requests = requests_for({}, [None] * len(ids), 3, 0)
    for request, slot in zip(requests, ids):
        request["adapter_ids"][0, 0] = slot
    with pytest.raises(Exception, match=GUARD.split(":")[0]):
        triton.run(requests)


@pytest.mark.parametrize("switching", ["bank", pytest.param("custom-op", marks=pytest.mark.slow)])
def test_new_versions_add_and_remove_adapters(setup, tmp_path, switching):
    need_custom_op(switching)
    out = setup.export(switching)
    model_dir = write_repository(out, tmp_path, TritonOptions(name="mlp")).model_dir
    first = sorted(p.relative_to(model_dir) for p in model_dir.rglob("*") if p.is_file())
    written = add_version(model_dir, add={"tenant": setup.work / "peft" / "tenant"})
    assert written.version == 2 and versions(model_dir) == [1, 2]
    assert sorted(p.relative_to(model_dir) for p in written.files) == [
        Path("2/manifest.json"), Path("2/model.onnx"), Path("config.pbtxt")]
    assert sorted(p.relative_to(model_dir) for p in model_dir.rglob("*") if p.is_file() and p.parts[-2] != "2"
                  and p.name != ".rewrite-lock") == first  # version 1 untouched
    triton = TritonLike(model_dir)
    table = table_of(triton.config)
    assert table == {"support": 0, "style": 1, "tenant": 2}
    adapters = ["tenant", "support", None, "tenant", "style"]
    requests = requests_for(table, adapters, 3, 11)
    with AdapterSession(out) as session:
        session.add_adapter("tenant", setup.work / "peft" / "tenant")
        for request, answer, adapter in zip(requests, triton.run(requests), adapters):
            (y,) = answer.values()
            assert diff(y, setup.peft(request["x"], adapter)) <= 1e-5
            assert diff(y, session.run({"x": request["x"]}, adapter=adapter)[0]) <= 1e-5
    guard_refuses(TritonLike(model_dir, version=1), [0, 2])  # version 1 has no adapter in slot 2
    guard_refuses(triton, [3, 0])  # an empty slot
    guard_refuses(triton, [4])      # past the bank
    guard_refuses(triton, [-2])     # below -1
    # remove style: version 3 frees slot 1, a later add reuses it
    add_version(model_dir, remove=["style"])
    triton = TritonLike(model_dir)
    assert table_of(triton.config) == {"support": 0, "tenant": 2}
    guard_refuses(triton, [1])
    add_version(model_dir, add={"again": setup.work / "peft" / "style"})
    triton = TritonLike(model_dir)
    assert table_of(triton.config) == {"support": 0, "again": 1, "tenant": 2}
    request = requests_for(table_of(triton.config), ["again"], 3, 5)
    assert diff(next(iter(triton.run(request)[0].values())), setup.peft(request[0]["x"], "style")) <= 1e-5
    assert versions(model_dir) == [1, 2, 3, 4]


def test_refusals_write_nothing(setup, tmp_path):
    out = setup.export("bank")
    model_dir = write_repository(out, tmp_path, TritonOptions(name="mlp")).model_dir
    config = (model_dir / "config.pbtxt").read_text()
    with pytest.raises(OutputError, match="never replaced"):
        write_repository(out, tmp_path, TritonOptions(name="mlp"))
    with pytest.raises(RuntimeUseError, match="no such adapter"):
        add_version(model_dir, remove=["nope"])
    with pytest.raises(AdapterFileError, match="already holds"):
        add_version(model_dir, add={"style": setup.work / "peft" / "style"})
    with pytest.raises(AdapterFileError, match="do not fit"):
        add_version(model_dir, add={"bad": {"layers.0": (np.ones((32, 2), np.float32), np.ones((2, 64), np.float32))}})
    with pytest.raises(AdapterFileError, match="bank is full"):
        add_version(model_dir, add={f"t{i}": setup.work / "peft" / "tenant" for i in range(3)})
    assert versions(model_dir) == [1] and (model_dir / "config.pbtxt").read_text() == config
    assert sorted(p.name for p in model_dir.iterdir()) == [".rewrite-lock", "1", "README.md", "config.pbtxt"]


def test_exports_triton_cannot_batch_are_refused(setup, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(setup.export("bank"), out)
    manifest = json.loads((out / "manifest.json").read_text())
    model = onnx.load(str(out / "model.onnx"))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4  # a fixed batch
    onnx.save(model, str(out / "static.onnx"))
    manifest["exports"][0]["file"] = "static.onnx"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="dynamic leading"):
        write_repository(out, tmp_path / "repo")
    manifest["exports"] = [dict(mode="merged", file="model.onnx", nodes=1, op_types=[], external_data=False)]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="switching \"bank\" or \"custom-op\""):
        write_repository(out, tmp_path / "repo")
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def test_external_data_is_copied_into_each_version(setup, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(setup.export("bank"), out)
    model = onnx.load(str(out / "model.onnx"))
    onnx.save_model(model, str(out / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    assert {i.name for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL} >= {
        "lora.layers.0.A", "lora.layers.0.B"}  # the banks too
    model_dir = write_repository(out, tmp_path / "repo", TritonOptions(name="mlp")).model_dir
    add_version(model_dir, add={"tenant": setup.work / "peft" / "tenant"})
    for version in ("1", "2"):
        data = model_dir / version / "model.onnx.data"
        assert data.read_bytes() == (out / "model.onnx.data").read_bytes()
    triton = TritonLike(model_dir)
    request = requests_for(table_of(triton.config), ["tenant"], 3, 2)
    assert diff(next(iter(triton.run(request)[0].values())), setup.peft(request[0]["x"], "tenant")) <= 1e-5


# ============================================================================= 5. the example client


class FakeClient:
    """tritonclient.http.InferenceServerClient over TritonLike: async requests queue and run as one dynamic batch."""

    def __init__(self, url: str, **_):
        self.url, self.queue, self.loads = url, [], []

    def get_model_config(self, model_name: str) -> dict:
        return MessageToDict(FakeClient.triton.config, preserving_proto_field_name=True)

    def load_model(self, model_name: str) -> None:
        self.loads.append(model_name)

    def async_infer(self, model_name, inputs, outputs=None, **_):
        self.queue.append({i.name(): i._array for i in inputs})
        return types.SimpleNamespace(get_result=lambda index=len(self.queue) - 1: self._result(index))

    def _result(self, index: int):
        if self.queue:
            batch, self.queue = self.queue, []
            FakeClient.batches.append(len(batch))
            self.answers = FakeClient.triton.run(batch)
        return types.SimpleNamespace(as_numpy=lambda name: self.answers[index][name])


class FakeInput:
    def __init__(self, name, shape, datatype):
        self._name, self.shape, self.datatype = name, list(shape), datatype

    def name(self):
        return self._name

    def set_data_from_numpy(self, array):
        assert list(array.shape) == self.shape and array.dtype.name == {"FP32": "float32", "INT64": "int64"}[
            self.datatype]
        self._array = array


def test_example_client(setup, tmp_path, monkeypatch, capsys):
    script = ROOT / "examples" / "triton_client.py"
    py_compile.compile(str(script), doraise=True)
    model_dir = write_repository(setup.export("bank"), tmp_path, TritonOptions(name="mlp")).model_dir
    FakeClient.triton, FakeClient.batches = TritonLike(model_dir), []
    http = types.ModuleType("tritonclient.http")
    http.InferenceServerClient, http.InferInput = FakeClient, FakeInput
    monkeypatch.setitem(sys.modules, "tritonclient.http", http)
    monkeypatch.setattr(sys, "argv", ["triton_client.py", "--model", "mlp", "--requests", "6", "--load"])
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out
    print(printed)
    assert FakeClient.batches == [6]  # sent at once, run as one batch, adapters mixed
    assert "loaded mlp" in printed and "6 requests to mlp (2 adapters: support, style)" in printed
    for adapter in ("base", "support", "style"):
        assert f"adapter {adapter}" in printed
