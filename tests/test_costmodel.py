"""The cost model (rewrite.costmodel): formulas by hand, latency measured once and cached on disk."""
from __future__ import annotations

import json

import pytest

from rewrite.costmodel import CostModel, LatencyTable, SiteShape, bytes_moved, flops, params, rank_buckets, uniform_cost

Q = SiteShape("q", "linear", 64, 32)
SHARED = SiteShape("c", "linear", 64, 32, calls=3)   # one adapter, three calls
EMB = SiteShape("e", "embedding", 1000, 16)
CONV = SiteShape("k", "conv2d", 3 * 3 * 8, 16)      # fan-in c_in kh kw


def test_formulas_by_hand():
    assert [params(Q, r) for r in (0, 1, 4)] == [0, 96, 384]
    assert params(SHARED, 4) == 384                              # parameters count once per adapter
    assert params(EMB, 2) == 2 * (1000 + 16) and params(CONV, 2) == 2 * (72 + 16)
    assert flops(Q, 4) == 2 * 4 * 96 and flops(SHARED, 4) == 3 * 2 * 4 * 96
    assert flops(EMB, 4) == 2 * 4 * 16                           # the A lookup is a gather
    # bytes: weights + [t, r] intermediate written and read + the output read and written again, fp32
    assert bytes_moved(Q, 0, tokens=10) == 0
    assert bytes_moved(Q, 4, tokens=10) == 4 * (4 * 96 + 2 * 10 * 4 + 2 * 10 * 32)
    assert bytes_moved(Q, 4, tokens=10, element_bytes=2) == 2 * (4 * 96 + 2 * 10 * 4 + 2 * 10 * 32)


def test_cost_model_curves_and_uniform_baseline():
    model = CostModel("params")
    assert model.curve(Q, [0, 1, 2]) == [0.0, 96.0, 192.0] and model.unit == "parameters"
    assert CostModel("flops").cost(SHARED, 2) == 3 * 2 * 2 * 96
    costs = CostModel("bytes", tokens=1).curve(Q, [0, 1, 2])
    assert costs[1] - costs[0] > costs[2] - costs[1]             # a fixed part at r >= 1: not linear
    assert uniform_cost(model, [Q, SiteShape("tiny", "linear", 2, 2)], 8) == 8 * 96 + 2 * 4  # capped at max rank
    breakdown = CostModel("params", tokens=10).breakdown(Q, 4)
    assert breakdown == dict(params=384, flops=768, bytes=bytes_moved(Q, 4, 10))
    with pytest.raises(ValueError, match="unknown cost metric"):
        CostModel("watts")
    with pytest.raises(ValueError, match="needs a LatencyTable"):
        CostModel("latency")


def test_latency_buckets_interpolation_and_disk_cache(tmp_path):
    calls = []

    def fake(kind, fan_in, d_out, rank, tokens):
        calls.append((kind, fan_in, d_out, rank, tokens))
        return {1: 0.10, 2: 0.12, 4: 0.11, 8: 0.30}.get(rank, 0.5)  # noisy: 4 measured below 2

    assert rank_buckets(8) == [1, 2, 4, 8] and rank_buckets(6) == [1, 2, 4, 6]
    table = LatencyTable(tmp_path, measure=fake)
    model = CostModel("latency", tokens=16, latency=table)
    curve = model.curve(Q, [0, 1, 2, 3, 4, 6, 8])
    assert curve[0] == 0.0 and curve[1] == pytest.approx(0.10)
    assert curve[3] == pytest.approx(0.12) and curve[4] == pytest.approx(0.12)  # made non-decreasing
    assert curve[5] == pytest.approx(0.12 + (0.30 - 0.12) / 2)                   # interpolated between 4 and 8
    assert len(calls) == 4 and table.measured == 4
    assert model.curve(SHARED, [8])[0] == pytest.approx(3 * 0.30)                # x calls, no new measurement
    assert len(calls) == 4

    again = LatencyTable(tmp_path, measure=fake)                                 # a new process: read from disk
    assert CostModel("latency", tokens=16, latency=again).curve(Q, [1, 8]) == pytest.approx([0.10, 0.30])
    assert again.measured == 0 and len(calls) == 4
    cached = json.loads(again.path.read_text())
    assert cached["matmul|t16|64x32|r8"] == 0.30
    CostModel("latency", tokens=16, latency=again).curve(EMB, [1])
    assert any(c[0] == "gather" for c in calls)


def test_latency_measured_on_onnxruntime(tmp_path):
    table = LatencyTable(tmp_path, repeats=5)
    ms = CostModel("latency", tokens=8, latency=table).curve(SiteShape("s", "linear", 16, 16), [0, 1, 2])
    assert ms[0] == 0.0 and 0 <= ms[1] <= ms[2] < 50 and table.measured == 2
    assert table.path.name.startswith("onnxruntime-cpu-ort") and table.path.is_file()
