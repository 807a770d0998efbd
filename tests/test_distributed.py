"""Scorers and training allocators under torch.distributed (rewrite/distributed.py).

Oracle: the same runs in this process without a process group, holding all the calibration data. Two processes
(gloo, CPU, spawned on loopback) each take their rows of every batch; their curves, ranks, trained adapter weights
and the allocation reports must equal the oracle's within the float tolerance of a different reduction order, and
only rank 0 may write files. batch_size = 45 splits every batch unevenly (22 / 23 rows), so the loss weighting of
rule 2 is exercised, not only the even case.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from factories import mlp4
from rewrite import distributed
from rewrite.capture import capture
from rewrite.cli import main
from rewrite.costmodel import site_shape
from rewrite.data import DataSource, make_loss
from rewrite.graph_edit import adapters_at
from rewrite.inputs import ExampleInputs
from rewrite.load import LoadedModel
from rewrite.options import DataOptions
from rewrite.pass_infra import PassContext
from rewrite.planted import plant
from rewrite.scorers import ScoreContext, Target, get_scorer
from rewrite.state import state_of

from helpers import run_pass

BUDGET = {"fraction": 0.5}  # with plot = False below: the report's JSON and markdown, no figures
# case -> (passes after `insert` (rank 8 everywhere), scorer read directly on every process or None)
CASES = {
    "spectrum": ([("allocate", dict(scorer="spectrum", budget=BUDGET, plot=False))], "spectrum"),
    "activation": ([("allocate", dict(scorer="activation", batches=4, budget=BUDGET, plot=False))], "activation"),
    "fisher": ([("allocate", dict(scorer="fisher", batches=4, budget=BUDGET, plot=False))], "fisher"),
    "fisher_probe": ([("allocate", dict(scorer="fisher", probe_steps=3, batches=4, budget=BUDGET, plot=False))], None),
    "energy": ([("train", dict(steps=6)), ("allocate", dict(scorer="energy", budget=BUDGET, plot=False))], "energy"),
    "adalora": ([("allocate", dict(scorer="adalora", steps=16, budget=BUDGET, plot=False,
                                   adalora=dict(tinit=3, tfinal=5, delta_t=2)))], None),
    "increlora": ([("allocate", dict(scorer="increlora", steps=16, budget=BUDGET, plot=False,
                                     increlora=dict(init_rank=1, warmup=2, interval=3, top_h=2)))], None),
}
SPEC = """version = 1
[capture]
frontend = "fx"
[[capture.inputs]]
name = "x"
shape = [2, 64]
dims = ["batch", ""]
[export]
format = "none"
[data]
path = "data.safetensors"
loss = "mse"
batch_size = 45
[[pass]]
name = "insert"
targets = ["*"]
rank = 8
[[pass]]
name = "allocate"
scorer = "fisher"
batches = 4
budget = { fraction = 0.5 }
"""


def _data(root: Path) -> DataOptions:
    return DataOptions(path=str(root / "data.safetensors"), loss="mse", batch_size=45, lr=1e-2)


def _curves(gm, root: Path, scorer: str, options: dict) -> dict[str, list[float]]:
    """The scorer's value curves, read directly (the pass keeps them inside)."""
    sites = state_of(gm).sites.values()
    targets = [Target(s.owner, site_shape(s), adapters_at(gm, s.owner)["default"], gm.get_parameter(s.weight), 8)
               for s in sites]
    data = _data(root)
    ctx = ScoreContext(gm, targets, DataSource(data, root, ["x"]), make_loss(data), options.get("batches", 8),
                       {"whiten": "kfac", "probe_steps": 0})
    return get_scorer(scorer)()(ctx).values


def observe(root: Path, out: Path) -> dict:
    """Every case on a fresh capture of factories:mlp4: curves, ranks, adapter weights, the report (rank 0)."""
    torch.manual_seed(0)
    model = mlp4()
    base, _ = capture(LoadedModel(model, None, "factory", "mlp4", None),
                      ExampleInputs({"x": torch.randn(2, 64)}, {"x": [None, None]}), frontend="fx")
    results = {}
    for case, (passes, scorer) in CASES.items():
        gm = copy.deepcopy(base)
        where = out / case
        run_pass(gm, "insert", where, targets=["*"], rank=8, alpha=8.0)
        for name, options in passes:
            if name == "allocate" and scorer is not None:
                results[f"{case}/curves"] = _curves(gm, root, scorer, options)
            run_pass(gm, name, where, data=_data(root), **options)
        owners = dict.fromkeys(s.owner for s in state_of(gm).sites.values())
        modules = {o: adapters_at(gm, o).get("default") for o in owners}
        results[f"{case}/ranks"] = {o: m.rank if m is not None else 0 for o, m in modules.items()}
        results[f"{case}/weights"] = {o: m.delta_weight().detach() for o, m in modules.items() if m is not None}
        report = where / "allocation.json"
        results[f"{case}/report"] = json.loads(report.read_text()) if report.exists() else None
    code = main(["apply", str(root / "spec.toml"), "factories:mlp4", "-o", str(out / "cli"), "-q"])
    results["cli/code"] = code
    report = out / "cli" / "allocation.json"
    results["cli/report"] = json.loads(report.read_text()) if report.exists() else None
    return results


def _worker(rank: int, root: Path) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{root / 'rendezvous'}", rank=rank,
                                         world_size=2)
    try:
        torch.save(observe(root, root / f"rank{rank}"), root / f"result{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def assert_close(got, want, where: str = "") -> None:
    """Same structure; numbers equal within reduction-order tolerance; wall times ignored."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (where, set(got) ^ set(want))
        for key in want:
            if key != "seconds":
                assert_close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, f"{where}[{i}]")
    elif isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=where)
    elif isinstance(want, float) and not isinstance(got, bool):
        assert math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-9) or (math.isnan(got) and math.isnan(want)), \
            (where, got, want)
    else:
        assert got == want, (where, got, want)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distributed")
    teacher = plant(mlp4(), {"layers.0": 1, "layers.1": 6, "layers.2": 2, "layers.3": 8})
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        save_file({"x": x, "labels": teacher(x)}, root / "data.safetensors")
    (root / "spec.toml").write_text(SPEC)
    return root


@pytest.mark.slow
def test_two_processes_with_half_the_rows_each_equal_one_with_all(root):
    torch.multiprocessing.spawn(_worker, args=(root,), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = observe(root, root / "single")
    finally:
        torch.set_num_threads(threads)
    ranks = [torch.load(root / f"result{r}.pt", weights_only=False) for r in range(2)]
    assert single["cli/code"] == ranks[0]["cli/code"] == ranks[1]["cli/code"] == 0
    for key, want in single.items():
        if key.endswith("/report"):   # rank 0 wrote the report, rank 1 nothing
            assert want is not None and ranks[1][key] is None, key
            assert_close(ranks[0][key], want, key)
        else:
            for rank, got in enumerate(ranks):
                assert_close(got[key], want, f"rank {rank}: {key}")
    assert len(set(map(str, (single[f"{c}/ranks"].values() for c in CASES)))) > 1  # the cases allocate differently
    written = [p for p in (root / "rank1").rglob("*")]
    assert written == [], written
    assert {"manifest.json", "allocation.json"} <= {p.name for p in (root / "rank0" / "cli").iterdir()}


def test_without_a_process_group_nothing_changes():
    """The helpers are the identity: the same objects, scale 1, no copies; the main process writes."""
    assert not distributed.active() and distributed.world() == (0, 1) and distributed.is_main()
    batch = {"x": torch.randn(5, 3), "labels": torch.randn(5), "note": ["a user's batch may hold anything"]}
    part = distributed.shard(batch)
    assert part.batch is batch and (part.offset, part.rows, part.total, part.scale) == (0, 5, 5, 1.0)
    tensors = [torch.randn(3), None, torch.randn(2, 2)]
    before = [t.clone() if t is not None else None for t in tensors]
    distributed.all_sum(tensors)
    distributed.all_mean(tensors)
    assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(tensors, before))
    loss = torch.tensor(2.5, requires_grad=True)
    local, value = distributed.weighted_loss(loss, part)
    assert local is loss and value == 2.5
    decision = {"a": 1}
    assert distributed.agree(decision) is decision
    generator = torch.Generator().manual_seed(3)
    drawn = part.normal((5, 4), generator, torch.float32)
    assert torch.equal(drawn, torch.randn((5, 4), generator=torch.Generator().manual_seed(3)))
    assert PassContext().write
