"""ONNX Runtime fusions left off on the CPU EP (runtime/providers.py: `disabled_optimizers`).

* ONNX Runtime ignores optimizer names it does not know, so a renamed optimizer would silently stay on: checked on
  ONNX Runtime's own optimized graph (`optimized_model_filepath`) of Add -> LayerNormalization, which by default
  becomes SkipLayerNormalization and with `disabled_optimizers([CPU EP])` keeps both nodes, with the same answer.
* `AdapterSession` opens its CPU sessions with that list, and a session that names the CUDA EP without it.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from rewrite.runtime import providers, session
from rewrite.runtime.session import AdapterSession

from test_unmerged import Mlp, need

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def residual_layer_norm(tmp_path) -> str:
    h = 16
    x, skip = (helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "seq", h]) for n in ("x", "skip"))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", h])
    g = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(g.standard_normal(h).astype(np.float32), n) for n in ("gamma", "beta")]
    nodes = [helper.make_node("Add", ["x", "skip"], ["sum"]),
             helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-5)]
    model = helper.make_model(helper.make_graph(nodes, "residual_ln", [x, skip], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "residual_ln.onnx"
    onnx.save(model, path)
    return str(path)


def optimized(path: str, out, disabled: list[str]) -> tuple[list[str], np.ndarray]:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(out)
    s = ort.InferenceSession(path, options, providers=[CPU], disabled_optimizers=disabled)
    g = np.random.default_rng(1)
    feeds = {n: g.standard_normal((2, 5, 16)).astype(np.float32) for n in ("x", "skip")}
    return [n.op_type for n in onnx.load(str(out)).graph.node], s.run(None, feeds)[0]


def test_ort_honours_the_disabled_skip_layer_norm_fusion(tmp_path):
    path = residual_layer_norm(tmp_path)
    fused_ops, fused = optimized(path, tmp_path / "default.onnx", [])
    assert fused_ops == ["SkipLayerNormalization"]  # the fusion exists: disabling it below is not vacuous
    ops, y = optimized(path, tmp_path / "cpu.onnx", providers.disabled_optimizers([CPU]))
    assert ops == ["Add", "LayerNormalization"]
    np.testing.assert_allclose(y, fused, rtol=0, atol=1e-5)
    assert providers.disabled_optimizers([CUDA, CPU]) == []
    assert providers.disabled_optimizers([(CPU, {})]) == ["SkipLayerNormFusion"]


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available")  # CPU wheel
@pytest.mark.parametrize("asked, disabled", [([CPU], ["SkipLayerNormFusion"]), ([CUDA, CPU], [])])
def test_adapter_session_opens_with_them(tmp_path, monkeypatch, asked, disabled):
    need("bank")
    out = Mlp(tmp_path).export("bank")
    seen = []
    real = ort.InferenceSession

    def spy(*args, **kwargs):
        seen.append(kwargs.get("disabled_optimizers"))
        return real(*args, **kwargs)

    monkeypatch.setattr(session.ort, "InferenceSession", spy)
    AdapterSession(out, providers=asked)
    assert seen == [disabled]
