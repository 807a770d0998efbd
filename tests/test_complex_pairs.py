"""Complex arithmetic computed as real (re, im) pairs at capture (rewrite/complex_pairs.py), so a rotary embedding
written in complex numbers (DeepSeek-V2's) exports to ONNX. Oracle: torch's complex kernels on the same inputs; the
decoder sweep's DeepSeek-V2 case checks a real model against PEFT."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from rewrite.errors import ExportError
from rewrite.export.onnx_merged import export_merged
from rewrite.options import ExportOptions

from helpers import capture_module

# each case captures and exports (~5 s) in every run: the decoder sweep's DeepSeek-V2 case runs only with
# REWRITE_FULL_SWEEP=1


class _ComplexRotary(torch.nn.Module):
    """DeepSeek-V2's rotation: x as complex pairs times polar(scale, position * frequency), broadcast over heads."""

    def __init__(self, conjugate: bool = False):
        super().__init__()
        self.proj = torch.nn.Linear(8, 16)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8))
        self.conjugate = conjugate

    def forward(self, x, positions):
        q = self.proj(x).view(*x.shape[:2], 2, 8).transpose(1, 2)  # [batch, heads, seq, 8]
        angles = positions[..., None].float() * self.inv_freq
        freqs = torch.polar(torch.ones_like(angles), angles) * 0.5
        rotated = torch.view_as_complex(q.float().reshape(*q.shape[:-1], -1, 2)) * freqs.unsqueeze(1)
        if self.conjugate:
            rotated = rotated.conj_physical()
        return torch.view_as_real(rotated).flatten(3)


def _inputs() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"x": torch.randn(2, 5, 8), "positions": torch.arange(3, 13).reshape(2, 5)}


def test_complex_rotation_exports_and_answers_as_torch(tmp_path):
    torch.manual_seed(0)
    model, inputs = _ComplexRotary().eval(), _inputs()
    gm = capture_module(model, inputs)
    assert not [n for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].is_complex()]
    with torch.no_grad():
        want = model(**inputs)
        assert (gm(**inputs) - want).abs().max() <= 1e-6
    export_merged(gm, tmp_path / "m.onnx", ExportOptions(), None)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    assert np.abs(got - want.numpy()).max() <= 1e-5


def test_a_complex_op_not_covered_leaves_the_graph_whole_and_the_export_says_why(tmp_path):
    torch.manual_seed(0)
    model, inputs = _ComplexRotary(conjugate=True).eval(), _inputs()
    gm = capture_module(model, inputs)
    with torch.no_grad():
        assert torch.equal(gm(**inputs), model(**inputs))  # untouched: torch's own complex kernels
    with pytest.raises(ExportError, match="complex"):
        export_merged(gm, tmp_path / "m.onnx", ExportOptions(), None)
