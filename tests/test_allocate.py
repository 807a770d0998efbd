"""The allocate pass, its scorers, LoRA.resize and the allocation report.

Models: a small residual MLP (3 blocks of up 16->32 / down 32->16, then a head 16->16) captured with the fx
front-end, and `factories:mlp4` for the CLI. Oracles: SVD by hand (best rank-r approximation after a
resize), eager forward hooks (the graph's outputs after allocation), statistics computed directly from
the data and from autograd on the eager model (activation / fisher curves), a teacher with planted
low-rank deltas (where the ranks must go).
"""
from __future__ import annotations

import copy
import functools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors.torch import save_file
from torch import nn

from rewrite.adapters.lora import LoRA
from rewrite.capture import capture
from rewrite.cli import main
from rewrite.errors import DataError, SpecError
from rewrite.graph_edit import adapters_at
from rewrite.inputs import example_inputs
from rewrite.load import LoadedModel
from rewrite.options import CaptureOptions, DataOptions, ExportOptions, InputSpec
from rewrite.passes import REGISTRY
from rewrite.planted import ResMLP, plant
from rewrite.report import load_report, rank_grid, site_layer, spearman
from rewrite.state import state_of

from helpers import run_pass

WIDTH = 16
PLAN = {"blocks.0.up": 0, "blocks.0.down": 6, "blocks.1.up": 1, "blocks.1.down": 8, "blocks.2.up": 3,
        "blocks.2.down": 2, "head": 12}


pytestmark = pytest.mark.usefixtures("one_thread")


class Setup:
    def __init__(self, root: Path):
        torch.manual_seed(0)
        self.model = ResMLP(width=WIDTH, depth=3).eval()
        options = CaptureOptions(frontend="fx", inputs=[InputSpec(name="x", shape=[4, WIDTH], dims=["batch", ""])])
        self.inputs = example_inputs(self.model, None, options, "<test>")
        self.gm, _ = capture(LoadedModel(self.model, None, "factory", "resmlp"), self.inputs, frontend="fx")
        self.root = root
        generator = torch.Generator().manual_seed(2)
        self.x = torch.randn(1024, WIDTH, generator=generator)
        with torch.no_grad():
            self.y = plant(self.model, PLAN)(self.x)
        save_file({"x": self.x, "labels": self.y}, root / "teacher.safetensors")
        save_file({"x": self.x, "labels": self.y[:, :3].contiguous()}, root / "bad_labels.safetensors")
        save_file({"x": self.x}, root / "inputs_only.safetensors")
        self.data = DataOptions(path="teacher.safetensors", loss="mse", batch_size=128, lr=3e-2)

    def fresh(self, rank: int = 12, alpha: float = 12.0, **insert) -> torch.fx.GraphModule:
        gm = copy.deepcopy(self.gm)
        run(gm, "insert", self.root, targets=insert.pop("targets", ["*"]), rank=rank, alpha=alpha, **insert)
        return gm


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    return Setup(tmp_path_factory.mktemp("allocate"))


run = functools.partial(run_pass, where="spec.toml:9", keys=True)


def ranks_of(gm, names=PLAN, adapter: str = "default") -> dict[str, int]:
    return {n: (adapters_at(gm, n)[adapter].rank if adapter in adapters_at(gm, n) else 0) for n in names}


def randomize(gm, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for owner in PLAN:
            for module in adapters_at(gm, owner).values():
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * 0.3)


def hook_oracle(model: nn.Module, x: torch.Tensor, branches: dict[str, tuple]) -> torch.Tensor:
    handles = [model.get_submodule(path).register_forward_hook(
        lambda mod, args, out, a=a, b=b, s=s: out + args[0] @ a @ b * s) for path, (a, b, s) in branches.items()]
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------- resize


@pytest.mark.parametrize("op", ["linear", "conv1d", "embedding", "conv2d"])
def test_resize_keeps_the_scale_and_the_best_components(op):
    conv = dict(kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1)) if op == "conv2d" else None
    torch.manual_seed(0)
    lora = LoRA(op, 6, 5, 4, alpha=8.0, conv=conv)
    with torch.no_grad():
        lora.lora_A.normal_()
        lora.lora_B.normal_()
    delta, s = lora.delta_weight().clone(), lora.scaling
    matrix = lambda d: d.flatten(1) if op == "conv2d" else d  # noqa: E731

    lora.resize(6)  # grow: the delta is unchanged, new components are zero-delta
    assert (lora.rank, lora.scaling, lora.alpha) == (6, s, 12.0)
    assert lora.lora_A.shape[0 if op == "conv2d" else 1] == 6 and lora.lora_B.shape[1 if op == "conv2d" else 0] == 6
    torch.testing.assert_close(lora.delta_weight(), delta, atol=1e-5, rtol=0)

    lora.resize(2)  # shrink: exactly the best rank-2 approximation (SVD by hand)
    u, sig, vh = torch.linalg.svd(matrix(delta))
    best = (u[:, :2] * sig[:2]) @ vh[:2]
    assert (lora.rank, lora.scaling, lora.alpha) == (2, s, 4.0)
    torch.testing.assert_close(matrix(lora.delta_weight()), best, atol=1e-4, rtol=1e-5)
    assert lora.lora_A.requires_grad and isinstance(lora.lora_A, nn.Parameter)


def test_resize_keep_indices_mask_and_fresh_adapters():
    torch.manual_seed(0)
    lora = LoRA("linear", 8, 8, 4, alpha=4.0, rslora=True)
    a0 = lora.lora_A.detach().clone()
    lora.resize(2)  # B = 0 (fresh): keep the first components as initialised
    assert torch.equal(lora.lora_A, a0[:, :2]) and lora.scaling == pytest.approx(4.0 / 2)
    assert lora.alpha == pytest.approx(2.0 * math.sqrt(2))  # rsLoRA: alpha' = s sqrt(r')
    with torch.no_grad():
        lora.lora_B.normal_()
    a, b = lora.lora_A.detach().clone(), lora.lora_B.detach().clone()
    lora.resize(3, keep=[1])  # component 1 first, then two new zero-delta ones
    assert torch.equal(lora.lora_A[:, 0], a[:, 1]) and torch.equal(lora.lora_B[0], b[1])
    assert lora.lora_B[1:].abs().sum() == 0
    lora.resize(1, keep=torch.tensor([True, False, False]))
    assert torch.equal(lora.lora_A[:, 0], a[:, 1])
    with pytest.raises(ValueError, match="rank 0 drops the branch"):
        lora.resize(0)
    with pytest.raises(ValueError, match="keep must list at most 1"):
        lora.resize(1, keep=[0, 0])


# ---------------------------------------------------------------------------------------------- pass


def test_spectrum_allocation_resizes_drops_and_matches_the_oracle(setup):
    gm = setup.fresh()
    randomize(gm)
    before = {o: adapters_at(gm, o)["default"] for o in PLAN}
    deltas = {o: m.delta_weight().clone() for o, m in before.items()}
    budget = 1500
    result = run(gm, "allocate", setup.root, scorer="spectrum", budget={"params": budget}, min_rank=0,
                 max_rank_pattern={"head": 4}, ranks=[0, 1, 2, 4, 8, 12], report="")
    ranks = ranks_of(gm)
    stats = result.stats
    assert result.modified and stats["spent"] <= budget and stats["params_after"] == stats["spent"]
    assert set(ranks.values()) <= {0, 1, 2, 4, 8, 12} and ranks["head"] <= 4
    assert stats["params_after"] == sum(r * (s.d_in + s.d_out) for n, r in ranks.items()
                                        for s in [state_of(gm).sites[n]])
    dropped = [n for n, r in ranks.items() if r == 0]
    assert stats["dropped"] == len(dropped)
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    for owner, rank in ranks.items():
        assert (f"adapters.{owner}.default" in targets) == (rank > 0)  # rank 0: gone from graph and module tree
        if rank:
            module = adapters_at(gm, owner)["default"]
            assert module.scaling == 1.0 and tuple(module.lora_A.shape) == (module.d_in, rank)
            u, sig, vh = torch.linalg.svd(deltas[owner])
            torch.testing.assert_close(module.delta_weight(), (u[:, :rank] * sig[:rank]) @ vh[:rank], atol=1e-5,
                                       rtol=0)
    branches = {o: (m.lora_A.detach(), m.lora_B.detach(), 12.0 / 12) for o in PLAN if ranks[o]
                for m in [adapters_at(gm, o)["default"]]}
    torch.testing.assert_close(gm(x=setup.x[:8]), hook_oracle(setup.model, setup.x[:8], branches), atol=1e-5,
                               rtol=1e-5)
    merged = copy.deepcopy(gm)
    run(merged, "merge", setup.root)
    torch.testing.assert_close(merged(x=setup.x[:8]), gm(x=setup.x[:8]), atol=1e-5, rtol=1e-5)


def test_conv_site_under_torch_export_is_priced_by_its_kernel(tmp_path):
    """A conv2d site captured by torch.export (modules without conv attributes): the cost model prices the LoRA
    branch as A [r, c_in, kh, kw] + B [c_out, r] parameters, checked by hand, and the resized branch runs."""
    from rewrite.pipeline import load_and_capture
    from rewrite.spec import parse_spec

    from factories import cnn_inputs_toml

    spec = parse_spec("version = 1\n" + cnn_inputs_toml(9, 7))
    gm, _, _ = load_and_capture("factories:strided_cnn", spec)
    run(gm, "insert", tmp_path, targets=["conv", "head"], rank=4)
    with torch.no_grad():
        for owner in ("conv", "head"):
            adapters_at(gm, owner)["default"].lora_B.normal_()
    result = run(gm, "allocate", tmp_path, scorer="spectrum", budget={"params": 200}, report="")
    ranks = ranks_of(gm, names=["conv", "head"])
    per_rank = {"conv": 3 * 3 * 2 + 8, "head": 8 + 4}  # c_in kh kw + c_out; d_in + d_out
    assert result.stats["params_after"] == sum(r * per_rank[o] for o, r in ranks.items()) <= 200
    assert ranks["conv"] > 0
    with torch.no_grad():
        gm(**state_of(gm).inputs.kwargs)


@pytest.mark.parametrize("rslora", [False, True])
def test_resized_adapters_round_trip_through_peft_files(setup, tmp_path, rslora):
    """s is kept by rescaling alpha; a PEFT directory written after allocate (per-site alpha_pattern) loads
    back into a fresh capture with the same outputs."""
    gm = setup.fresh(rank=12, alpha=24.0, rslora=rslora)
    randomize(gm)
    run(gm, "allocate", tmp_path, scorer="spectrum", budget={"fraction": 0.4}, report="")
    s = 24.0 / (math.sqrt(12) if rslora else 12)
    for owner, rank in ranks_of(gm).items():
        if rank:
            module = adapters_at(gm, owner)["default"]
            assert module.scaling == pytest.approx(s)
            assert module.alpha == pytest.approx(s * (math.sqrt(rank) if rslora else rank))
    run(gm, "save", tmp_path, path="peft", format="peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["use_rslora"] is rslora and config["rank_pattern"]
    fresh = copy.deepcopy(setup.gm)
    run(fresh, "load", tmp_path, path=str(tmp_path / "peft"))
    assert ranks_of(fresh) == ranks_of(gm)
    torch.testing.assert_close(fresh(x=setup.x[:8]), gm(x=setup.x[:8]), atol=1e-6, rtol=1e-6)


def test_fresh_adapters_stay_the_identity_and_a_second_run_is_a_no_op(setup):
    gm = setup.fresh()
    base = setup.gm(x=setup.x[:8])
    options = dict(scorer="spectrum", budget={"fraction": 0.5}, report="")
    first = run(gm, "allocate", setup.root, **options)
    assert first.modified and torch.equal(gm(x=setup.x[:8]), base)
    code, ranks = gm.code, ranks_of(gm)
    second = run(gm, "allocate", setup.root, **options)
    assert (second.modified, gm.code, ranks_of(gm)) == (False, code, ranks)


def test_budget_fraction_of_uniform_rank_and_flops(setup):
    gm = setup.fresh(rank=8)
    uniform = sum(8 * (s.d_in + s.d_out) for s in state_of(gm).sites.values())
    result = run(gm, "allocate", setup.root, scorer="spectrum", budget={"fraction": 0.25}, report="")
    assert result.stats["budget"] == 0.25 * uniform and result.stats["spent"] <= 0.25 * uniform
    gm = setup.fresh(rank=8)
    result = run(gm, "allocate", setup.root, scorer="spectrum", budget={"flops": 4000}, report="")
    assert result.stats["metric"] == "flops" and result.stats["spent"] <= 4000
    assert result.stats["spent"] == sum(2 * r * (s.d_in + s.d_out) for n, r in ranks_of(gm).items()
                                        for s in [state_of(gm).sites[n]])


def test_latency_budget_uses_the_measured_table(setup, monkeypatch, tmp_path):
    from rewrite.costmodel import LatencyTable

    measured = []

    def fake(self, kind, fan_in, d_out, rank, tokens):
        measured.append(rank)
        return 0.05 + 0.01 * rank  # a fixed cost per branch: dropping a site saves 0.05 ms
    monkeypatch.setattr(LatencyTable, "_measure_ort", fake)
    gm = setup.fresh(rank=4)
    result = run(gm, "allocate", setup.root, scorer="spectrum", budget={"latency_ms": 0.3},
                 latency_cache=str(tmp_path), report="")
    ranks = ranks_of(gm)
    spent = sum(0.05 + 0.01 * r for r in ranks.values() if r)
    assert result.stats["spent"] == pytest.approx(spent) and spent <= 0.3 + 1e-12
    assert 0 < sum(1 for r in ranks.values() if r) < len(ranks) and set(measured) == {1, 2, 4}
    assert list(tmp_path.glob("onnxruntime-cpu-*.json"))  # cached on disk


def test_activation_curve_equals_the_output_energy_by_hand(setup):
    gm = setup.fresh(rank=16, targets=["blocks.0.up", "head"])  # full rank: the curve ends at E||W x||^2
    run(gm, "allocate", setup.root, data=setup.data, scorer="activation", normalize="none", batches=8,
        budget={"fraction": 1.0}, report="act")
    report = load_report(setup.root / "act.json")
    site = {s["site"]: s for s in report["sites"]}
    w = setup.model.blocks[0].up.weight.detach().double()
    x = setup.x.double()  # 8 batches of 128 = the whole file: E||W x||^2 over every row
    assert site["blocks.0.up"]["curve"][-1] == pytest.approx(float(((x @ w.T) ** 2).sum(1).mean()), rel=1e-6)
    sigma = torch.linalg.svdvals(w @ torch.linalg.cholesky(x.T @ x / len(x)))  # W L, L = chol(C): SVD-LLM
    assert site["blocks.0.up"]["curve"][:4] == pytest.approx([0.0, *(sigma[:3] ** 2).cumsum(0).tolist()], rel=1e-6)
    assert report["scorer"]["unit"] == "E||W x||^2" and report["scorer"]["settings"]["batches"] == 8
    inputs_only = DataOptions(path="inputs_only.safetensors")  # activation needs no labels
    assert run(setup.fresh(rank=4), "allocate", setup.root, data=inputs_only, scorer="activation",
               budget={"fraction": 0.5}, report="").modified


def test_fisher_gradient_spectrum_equals_autograd(setup):
    gm = setup.fresh(rank=16, targets=["blocks.1.down"])
    run(gm, "allocate", setup.root, data=setup.data, scorer="fisher", whiten="none", batches=8,
        budget={"fraction": 1.0}, report="fisher")
    curve = load_report(setup.root / "fisher.json")["sites"][0]["curve"]
    model = copy.deepcopy(setup.model)
    grads = []
    for rows in torch.randperm(1024, generator=torch.Generator().manual_seed(0)).split(128):  # DataSource order
        model.zero_grad()
        F.mse_loss(model(setup.x[rows]), setup.y[rows]).backward()
        grads.append(model.blocks[1].down.weight.grad.detach().double().clone())
    sigma = torch.linalg.svdvals(torch.stack(grads).mean(0))
    assert curve[-1] == pytest.approx(float((sigma ** 2).sum()), rel=1e-5)
    assert curve[1] == pytest.approx(float(sigma[0] ** 2), rel=1e-5)


def test_planted_teacher_has_exactly_the_planted_spectrum(setup):
    """Oracle: the singular values of W_teacher - W are r_k copies of the gain (scale, or scale ||W||_2)."""
    teacher = plant(setup.model, PLAN, scale=0.5)
    relative = plant(setup.model, PLAN, scale=0.5, relative=True)
    for name, r in PLAN.items():
        base = setup.model.get_submodule(name).weight.detach()
        for model, gain in ((teacher, 0.5), (relative, 0.5 * float(torch.linalg.matrix_norm(base, ord=2)))):
            sigma = torch.linalg.svdvals(model.get_submodule(name).weight - base)
            torch.testing.assert_close(sigma[:r], torch.full((r,), gain), rtol=1e-4, atol=1e-5)
            assert float(sigma[r:].abs().sum()) < 1e-4 * gain * len(sigma)
    assert torch.equal(plant(setup.model, PLAN)(setup.x[:4]), teacher(setup.x[:4]))  # seeded: same teacher
    with pytest.raises(TypeError, match="blocks.0 is a ModuleDict"):
        plant(setup.model, {"blocks.0": 1})


def test_planted_ranks_are_found(setup):
    """Teacher = base + planted deltas of rank 0..12; the budget is exactly the planted parameters."""
    gm = setup.fresh(rank=12)
    budget = sum(r * (s.d_in + s.d_out) for n, r in PLAN.items() for s in [state_of(gm).sites[n]])
    result = run(gm, "allocate", setup.root, data=setup.data, scorer="fisher", probe_steps=300,
                 budget={"params": budget}, report="")
    found = ranks_of(gm)
    rho = spearman(list(PLAN.values()), list(found.values()))
    assert rho >= 0.7, (found, rho)  # bench/bench_planted_ranks.py reports the full numbers (goal >= 0.8)
    assert result.stats["spent"] <= budget
    # the probe left no trace: the kept adapters are still the zero-delta ones
    assert torch.equal(gm(x=setup.x[:8]), setup.gm(x=setup.x[:8]))


def test_training_scorer_runs_through_the_pass_with_a_history(setup, tmp_path):
    """adalora inside allocate (rewrite.allocators trains): resized adapters, a report with the history."""
    gm = setup.fresh(rank=6)
    data = setup.data.model_copy(update={"path": str(setup.root / "teacher.safetensors")})
    result = run(gm, "allocate", tmp_path, data=data, scorer="adalora", budget={"fraction": 0.5}, steps=20,
                 adalora={"tinit": 4, "tfinal": 6, "deltaT": 4}, plot=False)
    ranks = ranks_of(gm)
    assert result.modified and sum(ranks.values()) == 21 and result.stats["params_after"] <= result.stats["budget"]
    report = load_report(tmp_path / "allocation.json")
    assert len(report["history"]) == 20 and report["history"][-1]["ranks"] == {o: r for o, r in ranks.items()}
    assert report["scorer"]["name"] == "adalora" and report["scorer"]["settings"]["delta_t"] == 4
    assert "Training history: 20 records" in (tmp_path / "allocation.md").read_text()
    again = run(gm, "allocate", tmp_path, data=data, scorer="adalora", budget={"fraction": 0.5}, steps=20,
                adalora={"tinit": 4, "tfinal": 6, "deltaT": 4}, plot=False)
    assert again.modified is False


def test_training_scorers_honour_the_bounds_through_the_pass(setup, tmp_path):
    """min_rank / max_rank and their patterns reach AdaLoRA and IncreLoRA (resolved per site with the usual
    precedence); a pattern that matches no site is an error; bounds that cannot fit the budget are a
    SpecError naming the pass location."""
    data = setup.data.model_copy(update={"path": str(setup.root / "teacher.safetensors")})
    gm = setup.fresh(rank=6)
    bounds = dict(max_rank=10, max_rank_pattern={"head": 2, "blocks.1.*": 0}, min_rank_pattern={"blocks.0.up": 5})
    result = run(gm, "allocate", tmp_path, data=data, scorer="adalora", budget={"fraction": 0.5}, steps=20,
                 adalora={"tinit": 4, "tfinal": 6, "deltaT": 4}, report="", **bounds)
    ranks = ranks_of(gm)
    assert ranks["head"] <= 2 and ranks["blocks.1.up"] == ranks["blocks.1.down"] == 0 and ranks["blocks.0.up"] >= 5
    assert all(r <= 6 for r in ranks.values()) and sum(ranks.values()) == 21 == result.stats["ranks"]
    calls = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    assert result.stats["dropped"] == 2
    assert not {"adapters.blocks.1.up.default", "adapters.blocks.1.down.default"} & calls
    assert "adapters.head.default" in calls
    gm = setup.fresh(rank=6)
    run(gm, "allocate", tmp_path, data=data, scorer="increlora", budget={"fraction": 0.5}, steps=30, report="",
        increlora={"interval": 2, "warmup": 1, "top_h": 7}, max_rank=3, max_rank_pattern={"head": 1},
        min_rank_pattern={"blocks.2.*": 2})
    ranks = ranks_of(gm)
    assert ranks["head"] == 1 and all(1 <= r <= 3 for r in ranks.values()), ranks
    assert ranks["blocks.2.up"] >= 2 and ranks["blocks.2.down"] >= 2
    with pytest.raises(SpecError, match=r"min_rank_pattern: selector 'blocks.9.up' matches no site"):
        run(setup.fresh(rank=6), "allocate", tmp_path, data=data, scorer="adalora", budget={"fraction": 0.5},
            steps=20, min_rank_pattern={"blocks.9.up": 5})
    with pytest.raises(SpecError, match=r"spec.toml:9 \(scorer\): scorer = 'adalora' trains the adapters and needs"):
        run(setup.fresh(rank=6), "allocate", tmp_path, scorer="adalora", budget={"fraction": 0.5})
    with pytest.raises(SpecError, match=r"spec.toml:9: adalora: .*min ranks add up to 35 triplets, above the target"):
        run(setup.fresh(rank=6), "allocate", tmp_path, data=data, scorer="adalora", budget={"fraction": 0.5},
            steps=20, min_rank=5)


# ---------------------------------------------------------------------------------------------- errors


def test_bad_input_is_a_clear_error(setup):
    gm = setup.fresh(rank=4)
    code = gm.code
    with pytest.raises(SpecError, match=r"pass 'allocate' with scorer = 'fisher' needs calibration data.*\[data\]"):
        run(gm, "allocate", setup.root, scorer="fisher", budget={"params": 100})
    with pytest.raises(SpecError, match=r"budget = \{ params = 10 \}: budget 10 is smaller than the minimum 640 \(every site at its minimum rank\)"):
        run(gm, "allocate", setup.root, scorer="spectrum", min_rank=2, budget={"params": 10})
    missing = DataOptions(path="nowhere.safetensors", loss="mse")
    with pytest.raises(SpecError, match=r"\[data\] path: .*nowhere.safetensors does not exist"):
        run(gm, "allocate", setup.root, data=missing, scorer="activation", budget={"params": 100})
    bad = DataOptions(path="bad_labels.safetensors", loss="mse", batch_size=64)
    with pytest.raises(DataError, match=r"labels of shape \(64, 3\) do not fit the output of shape \(64, 16\)"):
        run(gm, "allocate", setup.root, data=bad, scorer="fisher", budget={"params": 100})
    with pytest.raises(SpecError, match=r"no allowed rank in \[1, 4\]"):
        run(gm, "allocate", setup.root, scorer="spectrum", min_rank=1, ranks=[0, 8], budget={"params": 100})
    with pytest.raises(SpecError, match=r"adapter 'other' is attached to no site \(attached: default\); set adapter"):
        run(gm, "allocate", setup.root, adapter="other", scorer="spectrum", budget={"params": 100})
    with pytest.raises(SpecError, match=r"max_rank_pattern: selector 'hed' matches no site.*head"):
        run(gm, "allocate", setup.root, scorer="spectrum", budget={"params": 100}, max_rank_pattern={"hed": 2})
    assert gm.code == code and ranks_of(gm) == dict.fromkeys(PLAN, 4)  # nothing changed
    with pytest.raises(ValidationError, match="exactly one of params, flops"):
        REGISTRY["allocate"].Options(budget={"params": 1, "flops": 2})
    with pytest.raises(ValidationError, match="probe_steps goes with scorer = 'fisher'"):
        REGISTRY["allocate"].Options(budget={"params": 1}, probe_steps=3)
    with pytest.raises(ValidationError, match="needs a budget"):
        REGISTRY["allocate"].Options(scorer="spectrum")


def test_without_adapter_the_one_attached_adapter_is_allocated(setup):
    gm = setup.fresh(rank=4, adapter="support")
    result = run(gm, "allocate", setup.root, scorer="spectrum", budget={"params": 1000})
    assert result.stats["adapter"] == "support" and sum(ranks_of(gm, adapter="support").values()) < 4 * len(PLAN)
    run(gm, "insert", setup.root, targets=["*"], rank=2, adapter="style")
    with pytest.raises(SpecError, match=r"adapter 'default' is attached to no site \(attached: style, support\)"):
        run(gm, "allocate", setup.root, scorer="spectrum", budget={"params": 100})


# ---------------------------------------------------------------------------------------------- report


def test_report_json_markdown_heatmap_and_rerender(setup, tmp_path, capsys):
    gm = setup.fresh(rank=8)
    result = run(gm, "allocate", tmp_path, scorer="spectrum", budget={"fraction": 0.5}, min_rank_pattern={"head": 2})
    assert result.stats["report"] == ["allocation.json", "allocation.md", "allocation.png"]
    report = load_report(tmp_path / "allocation.json")
    assert report["budget"]["metric"] == "params" and report["budget"]["spent"] <= report["budget"]["value"]
    assert report["solver"]["exact"] in (True, False) and report["solver"]["upper_bound"] >= report["solver"]["value"]
    sites = {s["site"]: s for s in report["sites"]}
    assert set(sites) == set(PLAN) and sites["head"]["rank"] >= 2 and sites["blocks.1.up"]["layer"] == 1
    assert sites["blocks.1.up"]["module"] == "up" and sites["head"]["layer"] is None
    assert sum(s["share"] for s in report["sites"]) == pytest.approx(report["budget"]["spent"] / report["budget"]["value"])
    assert set(report["sensitivity"]) == {"-10%", "+10%"}
    markdown = (tmp_path / "allocation.md").read_text()
    assert "| 1 | `up` |" in markdown and "**Budget**" in markdown and "![rank by layer and module]" in markdown
    assert (tmp_path / "allocation.png").read_bytes()[:4] == b"\x89PNG"

    out = tmp_path / "again"
    assert main(["report", str(tmp_path / "allocation.json"), "-o", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == [str(out / "allocation.md"), str(out / "allocation.png")]
    assert (out / "allocation.md").read_text() == markdown
    (tmp_path / "not_a_report.json").write_text("{}")
    assert main(["report", str(tmp_path / "not_a_report.json")]) == 2
    assert "not a rank-allocation report" in capsys.readouterr().err


def test_history_hook_and_layer_names(tmp_path):
    from rewrite.report import render_history

    history = [{"step": s, "budget": 24 - s, "ranks": {"a.0.q": 6 - s // 2, "a.1.q": 6}} for s in range(10)]
    assert render_history(history, tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    assert site_layer("model.layers.3.self_attn.q_proj") == (3, "self_attn.q_proj")
    assert site_layer("lm_head") == (None, "lm_head") and site_layer("h.10.attn@1") == (10, "attn")
    rows, cols, grid = rank_grid([dict(site="l.0.q", layer=0, module="q", rank=2),
                                  dict(site="l.1.k", layer=1, module="k", rank=0)])
    assert rows == ["0", "1"] and cols == ["q", "k"] and grid[0][0] == 2 and math.isnan(grid[0][1])


# ---------------------------------------------------------------------------------------------- CLI

HEAD = '''version = 1

[capture]
frontend = "fx"

[[capture.inputs]]
name = "x"
shape = [2, 64]
dims = ["batch", ""]

[export]
format = "none"
'''


@pytest.fixture(scope="module")
def mlp4_data(tmp_path_factory) -> Path:
    from factories import mlp4

    root = tmp_path_factory.mktemp("mlp4")
    teacher = plant(mlp4(), {"layers.0": 1, "layers.1": 8, "layers.2": 2, "layers.3": 16})
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        save_file({"x": x, "labels": teacher(x)}, root / "data.safetensors")
        save_file({"x": x, "labels": teacher(x)[:, :5].contiguous()}, root / "short.safetensors")
    return root


def _spec(root: Path, body: str, data: str | None = 'path = "data.safetensors"\nloss = "mse"\nbatch_size = 64\n') -> Path:
    text = HEAD + (f"\n[data]\n{data}" if data else "") + body
    path = root / "spec.toml"
    path.write_text(text)
    return path


INSERT = '\n[[pass]]\nname = "insert"\ntargets = ["*"]\nrank = 16\nalpha = 16\n'


def test_cli_apply_with_allocate(mlp4_data, tmp_path, capsys):
    spec = _spec(mlp4_data, INSERT + '\n[[pass]]\nname = "allocate"\nscorer = "fisher"\nbatches = 4\n'
                 'budget = { fraction = 0.5 }\n')
    out = tmp_path / "out"
    assert main(["apply", str(spec), "factories:mlp4", "-o", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    allocate = summary["passes"][1]
    assert allocate["label"] == "pass[1] 'allocate'" and allocate["stats"]["spent"] <= allocate["stats"]["budget"]
    assert {"allocation.json", "allocation.md", "allocation.png", "manifest.json"} <= set(summary["files"])
    manifest = json.loads((out / "manifest.json").read_text())
    report = load_report(out / "allocation.json")
    kept = {s["site"]: s["rank"] for s in report["sites"] if s["rank"]}
    assert {a["site"]: a["rank"] for a in manifest["adapters"]} == kept


CLI_ERRORS = {
    "scorer_without_data": ('scorer = "activation"\nbudget = { params = 100 }\n', None,
                            ["pass[1] 'allocate'", "needs calibration data", "[data]"]),
    "budget_below_minimum": ('scorer = "spectrum"\nmin_rank = 1\nbudget = { params = 100 }\n', "default",
                             ["budget 100 is smaller than the minimum 512"]),
    "missing_data_file": ('scorer = "fisher"\nbudget = { params = 1000 }\n', 'path = "gone.npz"\nloss = "mse"\n',
                          ["[data] path", "gone.npz does not exist"]),
    "labels_of_the_wrong_shape": ('scorer = "fisher"\nbudget = { params = 1000 }\n',
                                  'path = "short.safetensors"\nloss = "mse"\nbatch_size = 8\n',
                                  ["labels of shape (8, 5) do not fit the output of shape (8, 64)"]),
}


@pytest.mark.parametrize("case", CLI_ERRORS)
def test_cli_bad_input_exit_2(case, mlp4_data, tmp_path, capsys):
    body, data, expected = CLI_ERRORS[case]
    kwargs = {} if data == "default" else {"data": data}
    spec = _spec(mlp4_data, INSERT + '\n[[pass]]\nname = "allocate"\n' + body, **kwargs)
    out = tmp_path / "out"
    code = main(["apply", str(spec), "factories:mlp4", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    flat = " ".join(err.split())
    for text in expected:
        assert text in flat, flat
    assert not out.exists()


@pytest.mark.slow
def test_dropped_sites_vanish_from_the_unmerged_export(setup, tmp_path):
    """ort-adapters export after allocate: kept sites have A/B inputs of their new rank, dropped ones none."""
    import onnx
    import onnxruntime as ort

    from rewrite.export.onnx_unmerged import export_unmerged

    gm = setup.fresh(rank=12)
    run(gm, "allocate", setup.root, scorer="spectrum", budget={"params": 1500}, max_rank_pattern={"blocks.0.*": 0},
        report="")
    ranks = ranks_of(gm)
    assert ranks["blocks.0.up"] == ranks["blocks.0.down"] == 0 and len(set(ranks.values())) > 2
    randomize(gm)  # distinct B values (identical all-zero initializers would be merged by the exporter)
    entry = export_unmerged(gm, tmp_path, ExportOptions(mode="unmerged", switching="ort-adapters",
                                                        external_data="never"))
    assert {s.site: s.rank for s in entry.sites} == {n: r for n, r in ranks.items() if r}
    model = onnx.load(str(tmp_path / "model.onnx"))
    names = {i.name for i in model.graph.input}
    for site, rank in ranks.items():
        assert any(site in n and "lora" in n.lower() for n in names) == (rank > 0), (site, sorted(names))
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"x": setup.x[:8].numpy()}
    for owner, rank in ranks.items():
        if rank:
            module = adapters_at(gm, owner)["default"]
            for node in model.graph.input:
                if owner in node.name and node.name.endswith("A"):
                    feeds[node.name] = module.lora_A.detach().numpy()
                elif owner in node.name and node.name.endswith("B"):
                    feeds[node.name] = (module.lora_B * module.scaling).detach().numpy()
    got = session.run(None, feeds)[0]
    torch.testing.assert_close(torch.from_numpy(got), gm(x=setup.x[:8]).detach(), atol=1e-4, rtol=1e-4)
