"""Sizes fixed over the served axis ranges are folded at capture (rewrite/size_folding.py), and a failed export says
which constraint failed, on which input axes, from which model line (rewrite/torch_failure.py).

The model slices a bias of its maximum length from `max(0, bias length - query length)`, as MPT's ALiBi does: the
start is 0 at every size a with-past export serves (at least one new token), which the ONNX exporter, tracing every
axis from 0, cannot decide alone. Oracle: torch on the same inputs, at sizes the capture never saw (one new token,
an empty cache)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from rewrite.capture import capture
from rewrite.errors import ExportError
from rewrite.export.onnx_merged import export_merged
from rewrite.inputs import ExampleInputs
from rewrite.load import LoadedModel
from rewrite.options import ExportOptions

# each case captures and exports (~6 s) in every run: the decoder sweep's MPT case, which covers the same fold on a
# real model, runs only with REWRITE_FULL_SWEEP=1


class _SlicedBias(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("bias", torch.randn(4, 1, 8))
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x, past_key_values_0_key):
        query = x.size(1) + past_key_values_0_key.size(2)
        start = max(0, self.bias.size(1) - query)
        return {"out": self.proj(x)[:, None] + self.bias[:, start:, :],
                "present": torch.cat([past_key_values_0_key, x[:, None]], dim=2)}


def _captured(axis: str):
    torch.manual_seed(0)
    model = _SlicedBias().eval()
    inputs = ExampleInputs({"x": torch.randn(2, 3, 8), "past_key_values_0_key": torch.randn(2, 1, 4, 8)},
                           {"x": ["batch_size", axis, None],
                            "past_key_values_0_key": ["batch_size", None, "past_sequence_length", None]})
    gm, _ = capture(LoadedModel(model, None, "factory", "sliced", None), inputs)
    return model, gm


def test_a_start_fixed_at_every_served_size_exports_and_answers_as_torch(tmp_path):
    model, gm = _captured("sequence_length")
    assert not [n for n in gm.graph.nodes if n.target is torch.sym_max]
    export_merged(gm, tmp_path / "m.onnx", ExportOptions(), None)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for batch, new, past in [(1, 1, 0), (2, 1, 5), (3, 4, 0), (2, 6, 9)]:
        x, past_keys = torch.randn(batch, new, 8), torch.randn(batch, 1, past, 8)
        with torch.no_grad():
            want = model(x, past_keys)
        got = session.run(None, {"x": x.numpy(), "past_key_values.0.key": past_keys.numpy()})
        assert np.abs(got[0] - want["out"].numpy()).max() <= 1e-6
        assert np.array_equal(got[1], want["present"].numpy())


def test_an_export_failure_names_the_constraint_its_axes_and_the_model_line(tmp_path):
    _, gm = _captured("frames")  # an axis of unknown meaning may be 0: the start is not fixed, nothing is folded
    with pytest.raises(ExportError) as caught:
        export_merged(gm, tmp_path / "m.onnx", ExportOptions(), None)
    message = str(caught.value)
    assert "Max(0, " in message  # the size torch could not decide
    assert "= x.size(1)" in message and "= past_key_values_0_key.size(2)" in message
    assert "test_size_folding.py:" in message and "self.bias[:, start:, :]" in message
    assert "\n" not in message and len(message) <= 800
