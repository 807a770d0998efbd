"""rewrite::LoraDelta: torch op, ONNX export (dynamo + translation table), the C++ ONNX Runtime library.

Every ORT result is compared with an independent per-row float64 reference built from the *unpadded* adapter
matrices: row n of block b gets x_n @ A[idx[b]] @ B[idx[b]], zeros for idx < 0 (plus base_n when the op is given
the base output).
"""
from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from rewrite.errors import RewriteError
from rewrite.export import lora_delta_op
from rewrite.runtime import ops

D_IN, D_OUT = 24, 40
RANKS = [2, 4, 3]  # ragged: padded to r = 4 in the banks


@pytest.fixture(scope="module")
def lib():
    try:
        return ops.library_path()
    except ops.LoraHeadersUnavailable as err:
        pytest.skip(f"ONNX Runtime headers unavailable, cannot build the LoraDelta library: {err}")


def ragged_adapters(seed: int, d_in: int = D_IN, d_out: int = D_OUT, ranks=RANKS):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(d_in, r, generator=g) * 0.3, torch.randn(r, d_out, generator=g) * 0.3) for r in ranks]


def pad_banks(adapters):
    r = max(a.shape[1] for a, _ in adapters)
    a_bank = torch.zeros(len(adapters), adapters[0][0].shape[0], r)
    b_bank = torch.zeros(len(adapters), r, adapters[0][1].shape[1])
    for k, (a, b) in enumerate(adapters):
        a_bank[k, :, : a.shape[1]] = a
        b_bank[k, : b.shape[0]] = b
    return a_bank, b_bank


def reference_delta(x: np.ndarray, idx: np.ndarray, adapters) -> np.ndarray:
    """Per row, float64, unpadded matrices; zeros where idx < 0."""
    d_in, d_out = x.shape[-1], adapters[0][1].shape[1]
    rows = x.reshape(-1, d_in).astype(np.float64)
    per_block = rows.shape[0] // idx.size
    out = np.zeros((rows.shape[0], d_out))
    for n in range(rows.shape[0]):
        k = int(idx.reshape(-1)[n // per_block])
        if k >= 0:
            a, b = adapters[k]
            out[n] = rows[n] @ a.double().numpy() @ b.double().numpy()
    return out.reshape(*x.shape[:-1], d_out)


class TwoSites(nn.Module):
    """Two linears with per-row adapters: the first fused, lora_delta(x, ..., base(x)); the second delta-only,
    base(h) + lora_delta(h, ...)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1 = nn.Linear(D_IN, D_OUT)
        self.l2 = nn.Linear(D_OUT, D_IN)
        self.ad1 = ragged_adapters(1)
        self.ad2 = ragged_adapters(2, D_OUT, D_IN)
        a1, b1 = pad_banks(self.ad1)
        a2, b2 = pad_banks(self.ad2)
        for name, t in (("a1", a1), ("b1", b1), ("a2", a2), ("b2", b2)):
            self.register_buffer(name, t)

    def forward(self, x, idx):
        h = torch.ops.rewrite.lora_delta(x, self.a1, self.b1, idx, self.l1(x))
        return self.l2(h) + torch.ops.rewrite.lora_delta(h, self.a2, self.b2, idx)

    def reference(self, x: np.ndarray, idx: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x64 = torch.from_numpy(x).double()
            h = torch.nn.functional.linear(x64, self.l1.weight.double(), self.l1.bias.double()).numpy()
            h = h + reference_delta(x, idx, self.ad1)
            y = torch.nn.functional.linear(torch.from_numpy(h), self.l2.weight.double(), self.l2.bias.double())
            return y.numpy() + reference_delta(h, idx, self.ad2)


def export_two_sites(x, idx, dyn):
    model = TwoSites().eval()
    prog = torch.onnx.export(
        model, (x, idx), dynamo=True, dynamic_shapes=dyn, custom_translation_table=lora_delta_op.onnx_translation_table(),
        verbose=False,
    )
    return model, prog.model_proto


@pytest.fixture(scope="module")
def exported_3d():
    x, idx = torch.randn(4, 5, D_IN), torch.tensor([0, 2, -1, 1])
    dyn = {"x": {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}, "idx": {0: torch.export.Dim("blocks")}}
    return export_two_sites(x, idx, dyn)


@pytest.fixture(scope="module")
def exported_2d():
    x, idx = torch.randn(6, D_IN), torch.tensor([0, 2, -1, 1, 1, 0])
    dyn = {"x": {0: torch.export.Dim("rows")}, "idx": {0: torch.export.Dim("blocks")}}
    return export_two_sites(x, idx, dyn)


def session(model_proto, threads: int = 1):
    so = ops.session_options_with_library()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model_proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


# --- export ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["exported_2d", "exported_3d"])
def test_export_one_node_per_call_and_checker(fixture, request):
    _, proto = request.getfixturevalue(fixture)
    op_types = [n.op_type for n in proto.graph.node]
    assert op_types.count("LoraDelta") == 2, op_types  # exactly one node per call
    nodes = [n for n in proto.graph.node if n.op_type == "LoraDelta"]
    assert all(n.domain == "rewrite" for n in nodes)
    assert [len(n.input) for n in nodes] == [5, 4]  # fused (base given), delta-only
    deltas = {n.output[0] for n in nodes}
    adds_of_deltas = [n for n in proto.graph.node if n.op_type == "Add" and deltas & set(n.input)]
    assert len(adds_of_deltas) == 1  # only the delta-only call needs an Add
    assert {o.domain: o.version for o in proto.opset_import}["rewrite"] == 1
    onnx.checker.check_model(proto, full_check=True)


def test_torch_reference_op_matches_independent_reference():
    ad = ragged_adapters(3)
    a, b = pad_banks(ad)
    x = torch.randn(3, 4, D_IN)
    idx = torch.tensor([2, -1, 0])
    got = torch.ops.rewrite.lora_delta(x, a, b, idx)
    np.testing.assert_allclose(got.numpy(), reference_delta(x.numpy(), idx.numpy(), ad), atol=1e-5)
    with pytest.raises(IndexError, match="adapter index out of range"):
        torch.ops.rewrite.lora_delta(x, a, b, torch.tensor([0, 3, 1]))
    base = torch.randn(3, 4, D_OUT)
    fused = torch.ops.rewrite.lora_delta(x, a, b, idx, base)
    np.testing.assert_allclose(fused.numpy(), base.numpy() + reference_delta(x.numpy(), idx.numpy(), ad), atol=1e-5)
    with pytest.raises(RuntimeError, match="base must have the shape"):
        torch.ops.rewrite.lora_delta(x, a, b, idx, base[:, :2])


# --- ONNX Runtime with the library ---------------------------------------------------------------------------------


CASES_3D = {
    "mixed ids with -1": ((4, 5), [0, 2, -1, 1]),
    "one id broadcast to all rows": ((3, 7), [2]),
    "all rows no adapter": ((2, 3), [-1, -1]),
    "one row per block": ((6, 1), [1, 0, 2, -1, 2, 1]),
}


@pytest.mark.parametrize("case", list(CASES_3D))
def test_ort_3d_matches_reference(lib, exported_3d, case):
    model, proto = exported_3d
    (batch, seq), ids = CASES_3D[case]
    x = np.random.default_rng(0).standard_normal((batch, seq, D_IN)).astype(np.float32)
    idx = np.array(ids, np.int64)
    got = session(proto).run(None, {"x": x, "idx": idx})[0]
    np.testing.assert_allclose(got, model.reference(x, idx), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_ort_2d_matches_reference(lib, exported_2d, threads):
    model, proto = exported_2d
    x = np.random.default_rng(1).standard_normal((12, D_IN)).astype(np.float32)
    for idx in ([0, 2, -1, 1, 1, 0], [1], [2, -1, 0, 0, 1, -1, 2, 2, 1, 0, -1, 1]):
        idx = np.array(idx, np.int64)
        got = session(proto, threads).run(None, {"x": x, "idx": idx})[0]
        np.testing.assert_allclose(got, model.reference(x, idx), atol=2e-5, rtol=1e-5)


def test_ort_out_of_range_id_is_a_clean_error(lib, exported_3d):
    _, proto = exported_3d
    x = np.zeros((2, 3, D_IN), np.float32)
    with pytest.raises(Exception, match="LoraDelta: adapter index out of range"):
        session(proto).run(None, {"x": x, "idx": np.array([0, 3], np.int64)})


def test_ort_base_of_the_wrong_shape_is_an_error(lib):
    so = ops.session_options_with_library()
    sess = ort.InferenceSession(bare_model(2, 8, 4, 6, "base-input"), so, providers=["CPUExecutionProvider"])
    feeds = {"x": np.ones((3, 8), np.float32), "A": np.ones((2, 8, 4), np.float32),
             "B": np.ones((2, 4, 6), np.float32), "idx": np.array([0], np.int64), "base": np.ones((3, 5), np.float32)}
    with pytest.raises(Exception, match="base must have the shape"):
        sess.run(None, feeds)


def test_ort_rows_not_divisible_by_blocks_is_an_error(lib, exported_2d):
    _, proto = exported_2d
    with pytest.raises(Exception, match="N % B != 0"):
        session(proto).run(None, {"x": np.zeros((5, D_IN), np.float32), "idx": np.array([0, 1], np.int64)})


# --- kernel paths (a bare one-node model: no export, exercises tiles, tails, packing, threads, both ISAs) ------------


BASE_MODES = ("delta", "base-input", "base-computed")


def bare_model(k: int, d_in: int, r: int, d_out: int, mode: str = "delta", bank=TensorProto.FLOAT) -> bytes:
    """One LoraDelta node. delta: no base; base-input: base is a graph input (ORT cannot hand its buffer to y, the
    op copies it); base-computed: base = Neg(nbase) computed in the graph, its buffer free to reuse in place.
    `bank`: the element type of A and B (float or float16)."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
              helper.make_tensor_value_info("A", bank, [k, d_in, r]),
              helper.make_tensor_value_info("B", bank, [k, r, d_out]),
              helper.make_tensor_value_info("idx", TensorProto.INT64, None)]
    nodes = []
    if mode == "base-input":
        inputs.append(helper.make_tensor_value_info("base", TensorProto.FLOAT, None))
    elif mode == "base-computed":
        inputs.append(helper.make_tensor_value_info("nbase", TensorProto.FLOAT, None))
        nodes.append(helper.make_node("Neg", ["nbase"], ["base"]))
    names = ["x", "A", "B", "idx"] + ([] if mode == "delta" else ["base"])
    nodes.append(helper.make_node("LoraDelta", names, ["y"], domain="rewrite"))
    graph = helper.make_graph(nodes, "lora_delta", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid("rewrite", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


KERNEL_CASES = [  # (x shape, K, r, d_out, ids)
    ((32, 1024), 8, 16, 1024, [i % 8 if i % 5 else -1 for i in range(32)]),  # benchmark shape, per-row ids
    ((70, 200), 3, 12, 1000, [1, 0]),  # 35-row segments: macro tiles + packed panels, rank and column tails
    ((3, 40, 64), 2, 5, 17, [1, -1, 0]),  # narrow everything (scalar tails)
    ((1, 1024), 4, 16, 1024, [3]),  # batch 1
    ((8, 33), 2, 0, 9, [1, 0]),  # rank 0: zeros
    ((0, 16), 2, 4, 8, [0]),  # no rows
]


@pytest.mark.parametrize("bank", ["float32", "float16"])
@pytest.mark.parametrize("mode", BASE_MODES)
@pytest.mark.parametrize("isa", ["auto", "generic"])
@pytest.mark.parametrize("threads", [1, 2, "2, REWRITE_LORA_THREADS=1"])
def test_kernel_paths(lib, isa, threads, mode, bank, monkeypatch):
    """Float16 banks are compared with the reference on the half-rounded values (the rounding is the caller's)."""
    if isa == "generic":
        monkeypatch.setenv("REWRITE_LORA_ISA", "generic")  # read per call by the library
    if isinstance(threads, str):
        monkeypatch.setenv("REWRITE_LORA_THREADS", "1")  # caps the op's parallel batches (ORT still has 2)
        threads = 2
    rng = np.random.default_rng(2)
    so = ops.session_options_with_library()
    so.intra_op_num_threads = threads
    for shape, k, r, d_out, ids in KERNEL_CASES:
        d_in = shape[-1]
        x = rng.standard_normal(shape).astype(np.float32)
        a = (rng.standard_normal((k, d_in, r)) * 0.1).astype(bank)
        b = (rng.standard_normal((k, r, d_out)) * 0.1).astype(bank)
        if bank == "float16" and a.size:  # also widen subnormal, zero and large halves
            a.reshape(-1)[:4] = np.array([6e-8, -3e-5, 0.0, 1000.0], np.float16)
        idx = np.array(ids, np.int64)
        base = rng.standard_normal((*shape[:-1], d_out)).astype(np.float32)
        feeds = {"x": x, "A": a, "B": b, "idx": idx}
        if mode != "delta":
            feeds["base" if mode == "base-input" else "nbase"] = base if mode == "base-input" else -base
        elem = TensorProto.FLOAT16 if bank == "float16" else TensorProto.FLOAT
        sess = ort.InferenceSession(bare_model(k, d_in, r, d_out, mode, elem), so, providers=["CPUExecutionProvider"])
        got = sess.run(None, feeds)[0]
        adapters = [(torch.from_numpy(a[i].astype(np.float64)), torch.from_numpy(b[i].astype(np.float64)))
                    for i in range(k)]
        want = reference_delta(x, idx, adapters) if x.size and r else np.zeros((*shape[:-1], d_out))
        if mode != "delta":
            want = want + base
            if mode == "base-input":
                np.testing.assert_array_equal(feeds["base"], base)  # the caller's input is never written
        assert got.shape == (*shape[:-1], d_out)
        np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-5, err_msg=f"{shape} r={r} ids={ids}")


# --- library management ------------------------------------------------------------------------------------------


def test_library_path_is_cached(lib):
    assert ops.library_path(build=False) == lib
    assert lib.is_file() and lib.parent == ops.build_dir()


def test_missing_headers_is_a_rewrite_error(lib, monkeypatch, tmp_path):
    monkeypatch.setenv("ORT_INCLUDE_DIR", str(tmp_path))  # empty: no headers (a new digest, so a new build)
    monkeypatch.setenv("REWRITE_BUILD_DIR", str(tmp_path / "build"))
    with pytest.raises(ops.LoraHeadersUnavailable, match="ORT_INCLUDE_DIR") as info:
        ops.library_path()
    assert isinstance(info.value, RewriteError)
    with pytest.raises(RewriteError, match="not built"):
        ops.library_path(build=False)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
def test_builds_with_a_c_driver_as_cxx(lib, monkeypatch, tmp_path):
    """CXX=gcc (PEFT's BOFT sets it in os.environ when it tries to build its kernel): the library still links (the
    C++ runtime named explicitly), loads into ONNX Runtime and computes what the default build computes."""
    monkeypatch.setenv("CXX", "gcc")  # a new digest: a new build
    monkeypatch.setenv("REWRITE_BUILD_DIR", str(tmp_path / "build"))
    built = ops.library_path()
    assert built != lib and built.is_file()
    rng = np.random.default_rng(0)
    feed = {"x": rng.standard_normal((3, 8)).astype(np.float32), "A": rng.standard_normal((2, 8, 4)).astype(np.float32),
            "B": rng.standard_normal((2, 4, 6)).astype(np.float32), "idx": np.array([1, -1, 0], np.int64)}
    outputs = []
    for path in (lib, built):
        so = ort.SessionOptions()
        so.register_custom_ops_library(str(path))
        sess = ort.InferenceSession(bare_model(2, 8, 4, 6), so, providers=["CPUExecutionProvider"])
        outputs.append(sess.run(None, feed)[0])
    np.testing.assert_array_equal(outputs[0], outputs[1])
    np.testing.assert_allclose(outputs[1][0], feed["x"][0] @ feed["A"][1] @ feed["B"][1], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_sources_compile(lib, tmp_path):
    """The CUDA library (sm_80 + sm_90) and the ORT-free self-test compile; running them needs a GPU."""
    script = ops.CSRC / "build.sh"
    proc = subprocess.run(["bash", str(script), "--cuda", "--selftest", "--out", str(tmp_path)],
                          capture_output=True, text=True, env={**os.environ, "CUDA_ARCHS": "80 90"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "librewrite_lora_cuda.so").is_file()
    assert (tmp_path / "lora_delta_cuda_selftest").is_file()
    # The CUDA build also carries the CPU kernel: it loads into a CPU-only session and runs there.
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(tmp_path / "librewrite_lora_cuda.so"))
    sess = ort.InferenceSession(bare_model(2, 8, 4, 6), so, providers=["CPUExecutionProvider"])
    x = np.ones((2, 8), np.float32)
    a = np.ones((2, 8, 4), np.float32)
    b = np.ones((2, 4, 6), np.float32)
    got = sess.run(None, {"x": x, "A": a, "B": b, "idx": np.array([1, -1], np.int64)})[0]
    np.testing.assert_allclose(got, [[32.0] * 6, [0.0] * 6])


def test_torch_op_gradients_match_per_row_autograd():
    ad = ragged_adapters(4, 6, 5, [2, 3])
    a, b = pad_banks(ad)
    x = torch.randn(3, 2, 6, dtype=torch.float64, requires_grad=True)
    a = a.double().requires_grad_()
    b = b.double().requires_grad_()
    idx = torch.tensor([1, -1, 0])
    grad = torch.randn(3, 2, 5, dtype=torch.float64)
    gx, ga, gb = torch.autograd.grad(torch.ops.rewrite.lora_delta(x, a, b, idx), (x, a, b), grad)
    # independent: per row, with autograd through plain matmuls
    x2, a2, b2 = (t.detach().clone().requires_grad_() for t in (x, a, b))
    rows = [x2[i, j] @ a2[idx[i]] @ b2[idx[i]] if idx[i] >= 0 else x2[i, j] @ torch.zeros(6, 5, dtype=torch.float64)
            for i in range(3) for j in range(2)]
    want = torch.autograd.grad(torch.stack(rows).reshape(3, 2, 5), (x2, a2, b2), grad)
    for got, ref in zip((gx, ga, gb), want):
        torch.testing.assert_close(got, ref)
    assert torch.autograd.gradcheck(
        lambda x_, a_, b_: torch.ops.rewrite.lora_delta(x_, a_, b_, idx), (x, a, b), eps=1e-6, atol=1e-6
    )
    base = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x_, a_, base_: torch.ops.rewrite.lora_delta(x_, a_, b, idx, base_), (x, a, base), eps=1e-6, atol=1e-6
    )
