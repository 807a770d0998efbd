"""The training driver: it learns, it is reproducible, and its callback protocol holds.

Task: 4-class classification of 64-d inputs labelled by a *different* random network (a teacher the
student's base cannot express), read through `[data]` as an `.npz` file with `cross_entropy`. The adapters
of a captured 4 x Linear(64, 64) MLP (+ a linear head inside the last layer's 4 first outputs) are trained.
"""
from __future__ import annotations

import copy
import json
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from factories import DeepMLP
from rewrite.allocators import run_training_allocator, settings_from
from rewrite.capture import capture
from rewrite.data import DataSource, make_loss
from rewrite.errors import SpecError
from rewrite.graph_edit import adapters_at
from rewrite.inputs import ExampleInputs
from rewrite.load import LoadedModel
from rewrite.pass_infra import PassContext
from rewrite.passes import REGISTRY
from rewrite.options import DataOptions
from rewrite.train import TrainCallback, evaluate, train


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    model = DeepMLP().eval()
    x = torch.randn(4, 64)
    gm, _ = capture(LoadedModel(model, None, "factory", "mlp", None), ExampleInputs({"x": x}, {"x": [None, None]}),
                    frontend="fx")
    return gm


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    g = torch.Generator().manual_seed(42)
    teacher = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        x = torch.randn(512, 64, generator=g)
        labels = teacher(x).argmax(-1)
    path = tmp_path_factory.mktemp("data") / "task.npz"
    np.savez(path, x=x.numpy(), labels=labels.numpy())
    return path



def ce4(out, batch):
    return F.cross_entropy(out[:, :4], batch["labels"].long())


def fresh(base, *, rank=4, dropout=0.0, adapter="default"):
    gm = copy.deepcopy(base)
    insert = REGISTRY["insert"]
    insert(insert.Options(targets=["layers.*"], rank=rank, alpha=8.0, dropout=dropout, adapter=adapter, seed=1))(gm)
    return gm


def source(path, **kw) -> DataSource:
    options = DataOptions(path=str(path), batch_size=32, steps=kw.pop("steps", 80), lr=kw.pop("lr", 1e-2), **kw)
    return DataSource(options, path.parent, ["x"])


def accuracy(gm, path) -> float:
    data = np.load(path)
    with torch.no_grad():
        out = gm(x=torch.from_numpy(data["x"]))
    return float((out[:, :4].argmax(-1) == torch.from_numpy(data["labels"])).float().mean())


def test_training_reduces_the_loss_on_a_real_task(base, data_file):
    gm = fresh(base)
    before = accuracy(gm, data_file)
    data = source(data_file, steps=120, lr=2e-2)
    result = train(gm, data, ce4)
    assert result.steps == 120
    assert result.final_loss < 0.6 * result.losses[0]
    assert accuracy(gm, data_file) > before + 0.2
    assert evaluate(gm, data, ce4) < result.losses[0]


def test_seeded_runs_are_identical_and_seeds_differ(base, data_file):
    runs = []
    for seed in (3, 3, 4):
        gm = fresh(base, dropout=0.1)
        runs.append(train(gm, source(data_file, steps=30, seed=seed), ce4).losses)
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_callbacks_once_per_optimizer_step_in_order(base, data_file):
    gm = fresh(base)
    calls = []

    class Recorder(TrainCallback):
        def on_train_begin(self, ctx):
            calls.append(("begin", ctx.step))

        def regularizer(self, ctx):
            calls.append(("reg", ctx.step))
            return torch.zeros(())

        def before_step(self, ctx):
            grads = [p.grad for p in ctx.optimizer.param_groups[0]["params"]]
            assert all(g is not None for g in grads)
            calls.append(("before", ctx.step))

        def on_step(self, ctx):
            assert all(p.grad is not None for p in ctx.optimizer.param_groups[0]["params"])  # before zero_grad
            calls.append(("step", ctx.step))

        def on_train_end(self, ctx):
            calls.append(("end", ctx.step))

    train(gm, source(data_file, steps=7), ce4, callbacks=[Recorder()])
    steps = [s for kind, s in calls if kind == "step"]
    assert steps == list(range(1, 8))
    assert calls[0] == ("begin", 0) and calls[-1] == ("end", 7)
    per_step = [kind for kind, s in calls if s == 3]
    assert per_step == ["reg", "before", "step"]


def test_dropout_in_training_only_and_base_frozen_and_restored(base, data_file):
    gm = fresh(base, dropout=0.5)
    module = adapters_at(gm, "layers.0")["default"]
    base_before = {k: v.clone() for k, v in gm.state_dict().items() if not k.startswith("adapters.")}
    flags = {k: p.requires_grad for k, p in gm.named_parameters()}
    seen = {}

    class Probe(TrainCallback):
        def on_step(self, ctx):
            seen["training"] = module.training
            seen["base_grad"] = any(p.requires_grad for k, p in gm.named_parameters() if not k.startswith("adapters"))

    train(gm, source(data_file, steps=5), ce4, callbacks=[Probe()])
    assert seen == {"training": True, "base_grad": False}
    assert not module.training
    assert {k: p.requires_grad for k, p in gm.named_parameters()} == flags
    for k, v in gm.state_dict().items():
        if k in base_before:
            assert torch.equal(v, base_before[k]), k
    x = torch.randn(3, 64)
    assert torch.equal(gm(x=x), gm(x=x))  # eval: dropout off


def test_gradient_clipping_and_warmup(base, data_file):
    gm = fresh(base)
    norms, lrs = [], []

    class Norm(TrainCallback):
        def before_step(self, ctx):
            params = [p for g in ctx.optimizer.param_groups for p in g["params"] if p.grad is not None]
            norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in params])))

        def on_step(self, ctx):
            lrs.append(ctx.optimizer.param_groups[0]["lr"])

    train(gm, source(data_file, steps=10, lr=1.0, grad_clip=0.01, warmup=0.5), ce4, callbacks=[Norm()])
    assert max(norms) <= 0.01 + 1e-6
    assert lrs[:5] == [0.2, 0.4, 0.6, 0.8, 1.0] and lrs[-1] == pytest.approx(0.2)


def test_only_the_named_adapters_train(base, data_file):
    gm = fresh(base, adapter="a")
    insert = REGISTRY["insert"]
    insert(insert.Options(targets=["layers.*"], rank=2, adapter="b"))(gm)
    b_before = {k: v.clone() for k, v in gm.state_dict().items() if k.endswith(("b.lora_A", "b.lora_B"))}
    train(gm, source(data_file, steps=5), ce4, adapters=["a"])
    for k, v in b_before.items():
        assert torch.equal(gm.state_dict()[k], v)


def test_nothing_to_train_is_a_clear_error(base, data_file):
    with pytest.raises(SpecError, match="nothing to train"):
        train(copy.deepcopy(base), source(data_file, steps=2), ce4)


def test_run_training_allocator_from_spec_options(base, data_file):
    """The allocate pass's entry point: [data] options in, physically resized adapters and a history out."""
    gm = fresh(base, rank=6)
    data = DataOptions(path=str(data_file), batch_size=32, steps=40, lr=1e-2, loss="cross_entropy")
    options = types.SimpleNamespace(scorer="adalora", adapter="default", budget=None,
                                    adalora={"init_r": 6, "target_r": 3, "tinit": 5, "tfinal": 10, "deltaT": 5})
    context = PassContext(spec_dir=data_file.parent, where="spec.toml:7")
    # cross_entropy on the MLP's 64 outputs (labels < 4): a valid, if wide, classification
    ranks, history = run_training_allocator(gm, options, data, context)
    assert sum(ranks.values()) == 12 and set(ranks) == {f"layers.{i}" for i in range(4)}
    assert history.summary["scorer"] == "adalora" and len(history) == 40
    assert [h["step"] for h in history] == list(range(1, 41))
    assert history[0]["budget"] == 24 and history[-1]["budget"] == 12
    assert sum(history[-1]["ranks"].values()) == 12 and history[0]["ranks"]["layers.0"] == 6
    assert all("loss" in h and "lr" in h for h in history)
    assert history.summary["settings"]["delta_t"] == 5 and history.summary["final_ranks"] == ranks
    assert history.summary["params"] == 12 * 128
    for owner, rank in ranks.items():
        module = adapters_at(gm, owner).get("default")
        assert (module is None) if rank == 0 else (module.kind == "lora" and module.rank == rank)

    gm = fresh(base, rank=2)
    options = types.SimpleNamespace(scorer="increlora", adapter="default", budget=None, steps=30,
                                    settings={"init_rank": 1, "target_rank": 2, "interval": 3, "warmup": 2})
    ranks, history = run_training_allocator(gm, options, data, context)
    assert sum(ranks.values()) >= 8 and len(history) == 30 and history.summary["growth"]

    # a parameter budget (what the allocate pass passes): 4 sites of 64x64, 128 params per rank
    gm = fresh(base, rank=4)
    options = types.SimpleNamespace(scorer="adalora", adapter="default", budget={"params": 8 * 128 + 100},
                                    adalora={"tinit": 2, "tfinal": 5})
    ranks, _ = run_training_allocator(gm, options, data, context)
    assert sum(ranks.values()) == 8
    gm = fresh(base, rank=4)
    options = types.SimpleNamespace(scorer="increlora", budget={"fraction": 0.75}, settings={"interval": 2})
    ranks, _ = run_training_allocator(gm, options, data, context)
    assert sum(ranks.values()) >= 12
    with pytest.raises(SpecError, match="budget.flops is not supported"):
        run_training_allocator(fresh(base), types.SimpleNamespace(scorer="adalora", budget={"flops": 1e6}), data,
                               context)

    with pytest.raises(SpecError, match="needs training data"):
        run_training_allocator(fresh(base), types.SimpleNamespace(scorer="adalora"), None, context)


def test_settings_accept_peft_and_official_names():
    options = types.SimpleNamespace(adalora={"init_r": 12, "deltaT": 10}, settings=None, target_rank=4)
    assert settings_from(options, "adalora") == {"init_rank": 12, "delta_t": 10, "target_rank": 4}
    options = {"increlora": {"lora_r": 1, "incre_interval": 50, "advance_learn": False}}
    assert settings_from(options, "increlora") == {"init_rank": 1, "interval": 50, "advance_learning": False}


def test_make_loss_and_datasource_drive_training(base, data_file):
    """No loss_fn: the [data] loss is used (cross_entropy over all 64 outputs)."""
    gm = fresh(base)
    data = source(data_file, steps=40, lr=2e-2)
    result = train(gm, data)
    assert result.final_loss < result.losses[0]
    assert make_loss(data.options) is not None


def _spec(data_file, passes: str, steps: int = 20):
    from rewrite.spec import parse_spec

    text = (f'version = 1\n[data]\npath = "{data_file}"\nloss = "cross_entropy"\nsteps = {steps}\nlr = 0.01\n'
            f'batch_size = 32\n[[pass]]\nname = "insert"\ntargets = ["layers.*"]\nrank = 3\n' + passes)
    return parse_spec(text, data_file.parent / "spec.toml")


def _run(spec, base, out_dir):
    from rewrite.pass_infra import PassManager
    from rewrite.pipeline import schedule
    from rewrite.state import state_of

    gm = PassManager(schedule(spec, PassContext(spec_dir=spec.base_dir, output_dir=out_dir))).run(base)
    return gm, state_of(gm).history


def test_train_pass_from_a_spec_and_idempotence(base, data_file, tmp_path):
    spec = _spec(data_file, '[[pass]]\nname = "train"\n[[pass]]\nname = "train"\n')
    gm, history = _run(spec, base, tmp_path)
    assert [r.name for r in history] == ["insert", "train", "train"]
    stats = history[1].stats
    assert history[1].modified and stats["steps"] == 20 and stats["loss_final"] < stats["loss_first"]
    assert stats["params"] == 4 * 3 * 128
    assert not history[2].modified  # same options, same data: already trained


def test_train_pass_with_an_allocator_writes_the_report(base, data_file, tmp_path):
    spec = _spec(data_file, '[[pass]]\nname = "train"\nallocator = "adalora"\nbudget = { params = 768 }\n'
                            'adalora = { tinit = 2, tfinal = 6, deltaT = 2 }\n'
                            'min_rank_pattern = { "layers.3" = 3 }\nmax_rank_pattern = { "layers.0" = 0 }\n', steps=24)
    gm, history = _run(spec, base, tmp_path)
    stats = history[1].stats
    assert stats["scorer"] == "adalora" and stats["ranks"] == 6 and stats["params_after"] == 6 * 128
    assert sorted(stats["report"]) == ["allocation.json", "allocation.md", "allocation.png",
                                       "allocation_history.png"]
    report = json.loads((tmp_path / "allocation.json").read_text())
    assert report["scorer"]["name"] == "adalora" and len(report["history"]) == 24
    assert sum(s["rank"] for s in report["sites"]) == 6 and report["budget"]["ranks"] == 6
    bounds = {s["site"]: (s["rank"], s["min_rank"], s["max_rank"]) for s in report["sites"]}
    assert bounds["layers.3"] == (3, 3, None) and bounds["layers.0"] == (0, 0, 0)  # kept at min; dropped
    assert "adapters.layers.0.default" not in {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    assert report["history"][0]["budget"] == 12 and report["history"][-1]["budget"] == 6
    assert "Training history: 24 records" in (tmp_path / "allocation.md").read_text()

    spec = _spec(data_file, '[[pass]]\nname = "train"\nallocator = "increlora"\ntarget_rank = 2\nreport = ""\n'
                            'increlora = { interval = 2, warmup = 1 }\n', steps=24)
    gm, history = _run(spec, base, tmp_path / "b")
    assert history[1].stats["ranks"] >= 8 and history[1].stats["report"] == []


def test_train_pass_errors(base, data_file, tmp_path):
    from rewrite.spec import parse_spec

    spec = parse_spec('version = 1\n[[pass]]\nname = "insert"\ntargets = ["layers.*"]\n[[pass]]\nname = "train"\n',
                      tmp_path / "spec.toml")
    with pytest.raises(SpecError, match="needs training data"):
        _run(spec, base, tmp_path)
    with pytest.raises(SpecError, match="attached to no site"):
        _run(_spec(data_file, '[[pass]]\nname = "train"\nadapters = ["nope"]\n'), base, tmp_path)
    with pytest.raises(SpecError, match="go with allocator"):
        _spec(data_file, '[[pass]]\nname = "train"\nbudget = { params = 10 }\n')
    with pytest.raises(SpecError, match="min_rank, max_rank .and their patterns., adalora and increlora go with"):
        _spec(data_file, '[[pass]]\nname = "train"\nmax_rank_pattern = { "layers.0" = 2 }\n')
    with pytest.raises(SpecError, match="no parameter named"):
        _run(_spec(data_file, '[[pass]]\nname = "train"\nextra_params = ["head.weight"]\n'), base, tmp_path)


def test_the_documented_user_loops_run(base, data_file):
    """The two loops in rewrite/train.py's docstring, verbatim in shape: AdaLoRA after optimizer.step,
    IncreLoRA before it with the optimizer and a GroupLinearSchedule."""
    from rewrite.allocators import AdaLoRA, IncreLoRA
    from rewrite.train import GroupLinearSchedule

    data = source(data_file, steps=24)
    batches = list(data.batches(limit=24))
    gm = fresh(base, rank=4)
    gm.requires_grad_(False)
    alloc = AdaLoRA(gm, adapter="default", target_rank=2, total_steps=24, tinit=4, tfinal=8, delta_t=2)
    alloc.install()
    opt = torch.optim.AdamW(alloc.parameters(), lr=1e-2)
    for step, batch in enumerate(batches, start=1):
        loss = ce4(gm(x=batch["x"]), batch) + alloc.regularizer()
        loss.backward()
        opt.step()
        alloc.update(step)
        opt.zero_grad()
    assert sum(alloc.finalize().values()) == 8

    gm = fresh(base, rank=1)
    gm.requires_grad_(False)
    inc = IncreLoRA(gm, target_rank=2, total_steps=24, warmup=2, interval=2, top_h=2)
    inc.install()
    opt = torch.optim.AdamW(inc.parameters(), lr=1e-2)
    schedule = GroupLinearSchedule(opt, 24, warmup_steps=2)
    for step, batch in enumerate(batches, start=1):
        (ce4(gm(x=batch["x"]), batch) + inc.regularizer()).backward()
        inc.update(step, opt)
        schedule.apply(step)
        opt.step()
        opt.zero_grad()
    assert sum(inc.finalize().values()) == 8 and len(opt.param_groups) == 1 + len(inc.history["growth"])
