"""rewrite::LoraDeltaGroup: the custom-op lowering of a fused group (`fuse`) in one op call.

Oracles: a float64 per-row reference from the unpadded members' matrices (op level), the per-site custom-op export of
the same graph before fuse, and the torch graph with one adapter active (`only_adapter`), on mixed batches with base
rows (-1); out-of-range ids fail as in the single op.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from test_fuse import LAYERS, X, adapted, exported, out
from test_unmerged import need
from helpers import run_pass
from rewrite.export.onnx_unmerged import export_unmerged

from rewrite.export import lora_delta_op
from rewrite.graph_edit import only_adapter
from rewrite.options import ExportOptions
from rewrite.runtime import ops

D_IN, K = 24, 3
MEMBERS = [(4, 40), (2, 16), (3, 24)]  # (rank, d_out) per member: ragged ranks, different widths


@pytest.fixture(scope="module")
def lib():
    need("custom-op")
    return ops.library_path()


def group_graph(bank_type: int, x_shape: list[int], members=MEMBERS) -> onnx.ModelProto:
    """One LoraDeltaGroup node: inputs x, A and base_i (last dim left open: the op checks it), idx, B_i; outputs y_i."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape),
              helper.make_tensor_value_info("A", bank_type, [K, D_IN, None]),
              helper.make_tensor_value_info("idx", TensorProto.INT64, [None])]
    inputs += [helper.make_tensor_value_info(f"base{i}", TensorProto.FLOAT, [*x_shape[:-1], None])
               for i in range(len(members))]
    inputs += [helper.make_tensor_value_info(f"B{i}", bank_type, [K, r, d]) for i, (r, d) in enumerate(members)]
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(len(members))]
    node = helper.make_node("LoraDeltaGroup", [i.name for i in inputs], [o.name for o in outputs], domain="rewrite")
    graph = helper.make_graph([node], "group", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("rewrite", 1)])


def run_group(lib, model, feeds):
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(lib))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def group_feeds(x_shape, idx, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    a = [(rng.standard_normal((K, D_IN, r)) * 0.3).astype(dtype) for r, _ in MEMBERS]
    feeds = {"x": rng.standard_normal(x_shape).astype(np.float32), "A": np.concatenate(a, axis=2),
             "idx": np.asarray(idx, np.int64)}
    for i, (r, d) in enumerate(MEMBERS):
        feeds[f"base{i}"] = rng.standard_normal((*x_shape[:-1], d)).astype(np.float32)
        feeds[f"B{i}"] = (rng.standard_normal((K, r, d)) * 0.3).astype(dtype)
    return feeds, a


def reference(feeds, a_members) -> list[np.ndarray]:
    """Per row, float64, each member's own A_i and B_i: base_i + x A_i[k] B_i[k], base_i where k < 0."""
    x = feeds["x"].reshape(-1, D_IN).astype(np.float64)
    idx = feeds["idx"].reshape(-1)
    per_block = x.shape[0] // idx.size
    outs = []
    for i, a in enumerate(a_members):
        b = feeds[f"B{i}"].astype(np.float64)
        y = feeds[f"base{i}"].reshape(x.shape[0], -1).astype(np.float64).copy()
        for n in range(x.shape[0]):
            k = int(idx[n // per_block])
            if k >= 0:
                y[n] += x[n] @ a[k].astype(np.float64) @ b[k]
        outs.append(y.reshape(feeds[f"base{i}"].shape))
    return outs


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("x_shape, idx", [([6, 24], [0, -1, 2, 1, 0, -1]),  # one row per block
                                          ([4, 5, 24], [2, -1, 0, 2]),  # blocks of 5 rows (a sequence per id)
                                          ([64, 24], [1] * 30 + [-1] * 4 + [0] * 30)])  # segments of 30 rows
def test_group_op_equals_per_row_reference(lib, dtype, x_shape, idx):
    bank_type = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    feeds, a_members = group_feeds(x_shape, idx, dtype)
    got = run_group(lib, group_graph(bank_type, x_shape), feeds)
    for y, want in zip(got, reference(feeds, a_members), strict=True):
        assert y.shape == want.shape
        assert np.abs(y - want).max() <= 1e-5


def test_group_op_refuses_bad_ids_and_shapes(lib):
    feeds, _ = group_feeds([6, 24], [0, 3, 1, 1, 0, -1])
    with pytest.raises(Exception, match="LoraDelta: adapter index out of range"):
        run_group(lib, group_graph(TensorProto.FLOAT, [6, 24]), feeds)
    feeds["idx"] = np.zeros(6, np.int64)
    feeds["B1"] = np.zeros((K, 3, 16), np.float32)  # ranks 4 + 3 + 3 != A's 9
    with pytest.raises(Exception, match="LoraDeltaGroup: the members' ranks add up to 10, A_bank's is 9"):
        run_group(lib, group_graph(TensorProto.FLOAT, [6, 24], [(4, 40), (3, 16), (3, 24)]), feeds)
    feeds["B1"] = np.zeros((K, 2, 16), np.float32)
    feeds["base2"] = np.zeros((6, 23), np.float32)
    with pytest.raises(Exception, match="LoraDeltaGroup: member 2: base's last dim .23. must equal B_bank's d_out"):
        run_group(lib, group_graph(TensorProto.FLOAT, [6, 24]), feeds)


def raw_session(folder):
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(ops.library_path()))
    return ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bank_dtype", ["float32", "float16"])
def test_fused_group_lowers_to_one_call_equal_to_per_site(lib, tmp_path, bank_dtype):
    gm = adapted()
    refs = {name: out(only_adapter(gm, name)).numpy() for name in (None, "a", "b")}  # slots: a = 0, b = 1
    options = ExportOptions(mode="unmerged", switching="custom-op", capacity=3, bank_dtype=bank_dtype)
    (tmp_path / "plain").mkdir()
    export_unmerged(gm, tmp_path / "plain", options)
    run_pass(gm, "fuse")
    gm.recompile()
    (tmp_path / "fused").mkdir()
    export_unmerged(gm, tmp_path / "fused", options)
    nodes = [n.op_type for n in onnx.load(tmp_path / "fused" / "model.onnx").graph.node]
    # per layer: q / k / v and gate / up one group call each; o and down alone
    assert (nodes.count("LoraDeltaGroup"), nodes.count("LoraDelta")) == (2 * LAYERS, 2 * LAYERS)
    ids = np.array([0, -1, 1, 0], np.int64)  # rows: a, base, b, a
    plain, fused = (raw_session(tmp_path / d).run(None, {"x": X.numpy(), "adapter_ids": ids})[0]
                    for d in ("plain", "fused"))
    assert np.abs(fused - plain).max() <= 1e-5
    if bank_dtype == "float32":
        want = np.stack([refs[{0: "a", 1: "b", -1: None}[int(k)]][i] for i, k in enumerate(ids)])
        assert np.abs(fused - want).max() <= 1e-5
    with pytest.raises(Exception, match="adapter index out of range"):
        raw_session(tmp_path / "fused").run(None, {"x": X.numpy(), "adapter_ids": np.array([0, 3, -1, 1])})


def test_group_call_keeps_the_graph_sorted_and_serves_added_adapters(lib, tmp_path):
    """q's consumer (q * sigmoid(k)) precedes v's projection: it moves after the group call; a slot filled while
    serving lands in each member's block of the shared A bank (`A_offset`)."""
    from rewrite.runtime.session import AdapterSession

    gm = adapted()
    want = out(only_adapter(gm, "a")).numpy()
    run_pass(gm, "fuse")
    gm.recompile()
    exported(gm, tmp_path / "fused", "custom-op")
    with AdapterSession(tmp_path / "fused") as session:
        a = gm.get_submodule("adapters")
        factors = {s.site: tuple(t.numpy() for t in a.get_submodule(f"{s.site}.a").factors())
                   for s in session.entry.sites}
        assert sorted(s.A_offset for s in session.entry.sites)[-1] > 0
        session.add_adapter("copy_of_a", factors)
        got = session.run({"x": X.numpy()}, adapter_ids=["copy_of_a", None, "a", "copy_of_a"])[0]
    assert np.abs(got[[0, 2, 3]] - want[[0, 2, 3]]).max() <= 1e-5


def test_torch_group_op_matches_single_ops():
    """The torch reference of the group op is the single op on each member's block of A (what ORT is tested against
    above through the exported graphs)."""
    g = torch.Generator().manual_seed(0)
    x, ids = torch.randn(4, 2, D_IN, generator=g), torch.tensor([1, -1, 0, 2])
    a = torch.randn(K, D_IN, 6, generator=g)
    bs = [torch.randn(K, 4, 8, generator=g), torch.randn(K, 2, 5, generator=g)]
    bases = [torch.randn(4, 2, 8, generator=g), torch.randn(4, 2, 5, generator=g)]
    got = torch.ops.rewrite.lora_delta_group(x, a, ids, bases, bs)
    for y, want in zip(got, [torch.ops.rewrite.lora_delta(x, a[..., :4], bs[0], ids, bases[0]),
                             torch.ops.rewrite.lora_delta(x, a[..., 4:], bs[1], ids, bases[1])], strict=True):
        assert torch.equal(y, want)
    assert lora_delta_op.GROUP_OP_TYPE == "LoraDeltaGroup"
