"""The fuse pass (passes/fuse.py) on a LLaMA-shaped stack (tests/fuse_models.py): siblings through one A GEMM, folding
of elementwise kinds, and every consumer of a fused graph (merge, save, unmerged and merged ONNX exports).

Oracles: the same graph before fuse (torch), Hugging Face PEFT with the same adapters (per-row ids through the fused
bank), the unfused graph's save and merge, and counted matmuls (eager: aten.mm calls; ONNX: MatMul nodes).
"""
from __future__ import annotations

import copy
import operator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from fuse_models import stack
from helpers import capture_module, run_pass
from rewrite.export.manifest import build_manifest
from rewrite.export.onnx_merged import export_merged
from rewrite.export.onnx_unmerged import export_unmerged
from rewrite.runtime.session import AdapterSession
from torch.utils._python_dispatch import TorchDispatchMode

from rewrite.errors import SpecError
from rewrite.formats.manifest import MANIFEST, write_manifest
from rewrite.graph_edit import fused_groups, only_adapter, unfuse
from rewrite.options import ExportOptions
from rewrite.spec import parse_spec

X = torch.randn(4, 3, 32, generator=torch.Generator().manual_seed(1))
LAYERS, SITES = 2, 7  # per layer: q, k, v | o | gate, up | down  -> 4 groups


def adapted(*, filled: bool = True):
    """A capture of the stack with adapter "a" (rank 4) on every linear and "b" (rank 2, alpha 3) on q and v."""
    gm = capture_module(stack(), {"x": X})
    run_pass(gm, "insert", adapter="a", targets=["layers.*"], rank=4, init="gaussian")
    run_pass(gm, "insert", adapter="b", targets=["layers.*.q_proj", "layers.*.v_proj"], rank=2, alpha=3.0,
             init="gaussian")
    return fill(gm, {"lora_B": (0.0, 0.05)}) if filled else gm


def fill(gm, rules: dict[str, tuple[float, float]]):
    """`helpers.fill_adapter` for a capture (torch.export's modules refuse `.eval()`; adapters already are)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in gm.named_parameters():
            for key, (mean, std) in rules.items():
                if key in name:
                    param.copy_(mean + std * torch.randn(param.shape, generator=generator))
    return gm


def out(gm) -> torch.Tensor:
    with torch.no_grad():
        return gm(x=X)


class CountMM(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.mm = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.mm += func in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default)
        return func(*args, **(kwargs or {}))


def mm_calls(gm) -> int:
    with CountMM() as counter:
        out(gm)
    return counter.mm


def test_siblings_share_one_gemm():
    gm = adapted()
    before, mm_before = out(gm), mm_calls(gm)
    result = run_pass(gm, "fuse")
    assert result.modified
    assert result.stats == {"folded": 0, "groups": 4 * LAYERS, "fused": 9 * LAYERS, "gemms_saved": 5 * LAYERS}
    nodes = list(gm.graph.nodes)
    assert sum(n.op == "call_module" and n.target.startswith("adapters.") for n in nodes) == 0
    assert len(fused_groups(gm)) == 4 * LAYERS
    assert sum(n.target is operator.getitem and n.args[0] in fused_groups(gm) for n in nodes) == 9 * LAYERS
    assert (out(gm) - before).abs().max() <= 1e-6
    assert mm_before - mm_calls(gm) == 5 * LAYERS  # one A GEMM per group where each branch ran its own
    assert not run_pass(gm, "fuse").modified  # idempotent


def test_group_follows_its_members_and_refuses_training():
    gm = adapted()
    run_pass(gm, "fuse")
    gm.recompile()
    q = gm.get_submodule("adapters.layers.0.q_proj.a")
    with torch.no_grad():
        q.lora_B.mul_(3.0)  # in place: the group's cache must notice
    q.alpha *= 2.0
    reference = copy.deepcopy(gm)
    for group in fused_groups(reference):
        unfuse(reference, group)
    reference.recompile()
    assert (out(gm) - out(reference)).abs().max() <= 1e-6
    q.train()
    with pytest.raises(RuntimeError, match="inference only"):
        out(gm)


def test_new_sibling_regroups_its_input():
    gm = adapted()
    run_pass(gm, "fuse")
    run_pass(gm, "insert", adapter="c", targets=["layers.0.k_proj"], rank=3, init="gaussian")
    fill(gm, {"c.lora_B": (0.0, 0.05)})
    before = out(gm)
    result = run_pass(gm, "fuse")
    assert result.stats["groups"] == 1 and result.stats["fused"] == 6  # layer 0: a on q, k, v; b on q, v; c
    assert (out(gm) - before).abs().max() <= 1e-6


def test_merge_and_save_after_fuse_equal_without(tmp_path):
    plain, fused = adapted(), adapted()
    run_pass(fused, "fuse")
    for gm, where in ((plain, "plain"), (fused, "fused")):
        run_pass(gm, "save", tmp_path, path=where, adapter="a")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "fused" / name).read_bytes()
    for gm in (plain, fused):
        run_pass(gm, "merge")
    assert not fused_groups(fused)
    assert not [n for n, _ in fused.named_parameters() if "lora_" in n]
    weights = dict(plain.named_parameters())
    assert max(float((weights[n] - p).abs().max()) for n, p in fused.named_parameters()) <= 1e-6


def test_fold_elementwise_kinds_leaves_lora_fused():
    gm = capture_module(stack(), {"x": X})
    run_pass(gm, "insert", adapter="s", kind="ia3", targets=["layers.*.k_proj"])
    run_pass(gm, "insert", adapter="u", kind="ia3_ff", targets=["layers.*.down_proj"])
    run_pass(gm, "insert", adapter="t", kind="bitfit", targets=["layers.*.o_proj"])
    run_pass(gm, "insert", adapter="a", targets=["layers.*"], rank=4, init="gaussian")
    fill(gm, {".s.": (1.0, 0.1), ".u.": (1.0, 0.1), ".t.": (0.0, 0.1), "lora_B": (0.0, 0.05)})
    before = out(gm)
    result = run_pass(gm, "fuse", fold=["ia3", "ia3_ff", "bitfit"])
    assert result.stats["folded"] == 3 * LAYERS and result.stats["groups"] == 4 * LAYERS
    assert sorted({n for names in gm.meta["rewrite"].merged.values() for n in names}) == ["s", "t", "u"]
    assert (out(gm) - before).abs().max() <= 1e-6


@pytest.mark.parametrize("kind, why", [("ia3", "joins after adapters that stay"),
                                       ("ia3_ff", "scales an input that another adapter rewrites")])
def test_fold_refuses_what_the_site_does_not_compute_first(kind, why):
    gm = adapted()
    run_pass(gm, "insert", adapter="f", kind=kind, targets=["layers.0.gate_proj"])
    if kind == "ia3_ff":
        run_pass(gm, "insert", adapter="h", kind="oft", targets=["layers.0.gate_proj"])
    with pytest.raises(SpecError, match=f"spec.toml:3 \\(fold\\): layers.0.gate_proj: the {kind} adapter 'f' {why}"):
        run_pass(gm, "fuse", keys=True, fold=[kind])


@pytest.mark.parametrize("options, message", [
    ('fold = ["nope"]', r"<spec>:4: 'pass\[0\].fold': unknown adapter kind 'nope' \(kinds: lora, "),
    ('fold = ["bottleneck"]', r"<spec>:4: 'pass\[0\].fold': bottleneck adapters cannot be folded"),
    ("siblings = false", r"<spec>:2: 'pass\[0\]': siblings = false and fold = \[\]: this fuse does "),
    ("sibling = true", r"<spec>:4: unknown key 'pass\[0\].sibling'. Did you mean: 'siblings'\?"),
])
def test_bad_options_name_their_key(options, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(f'version = 1\n[[pass]]\nname = "fuse"\n{options}\n')


def test_adapters_attached_nowhere_is_an_error():
    with pytest.raises(SpecError, match=r"\['zz'\] are attached to no site"):
        run_pass(adapted(filled=False), "fuse", fold=["ia3"], adapters=["zz"])


# ---- ONNX ----------------------------------------------------------------------------------------------------------

def exported(gm, out_dir: Path, switching: str) -> onnx.ModelProto:
    out_dir.mkdir()
    entry = export_unmerged(gm, out_dir, ExportOptions(mode="unmerged", switching=switching,
                                                       capacity=None if switching == "ort-adapters" else 3))
    write_manifest(out_dir / MANIFEST, build_manifest(gm, source="fuse_models:stack", exports=[entry]))
    return onnx.load(out_dir / "model.onnx")


def matmuls(model: onnx.ModelProto) -> int:
    return sum(n.op_type in ("MatMul", "Gemm") for n in model.graph.node)


@pytest.mark.slow
@pytest.mark.parametrize("switching", ["bank", "custom-op", "ort-adapters"])
def test_unmerged_export_of_a_fused_graph(tmp_path, switching):
    if switching == "custom-op":
        from test_unmerged import need
        need(switching)
    gm = adapted()
    refs = {name: out(only_adapter(gm, name)).numpy() for name in (None, "a", "b")}
    plain = exported(gm, tmp_path / "plain", switching)
    run_pass(gm, "fuse")
    gm.recompile()
    fused = exported(gm, tmp_path / "fused", switching)
    onnx.checker.check_model(fused, full_check=switching != "custom-op")
    # bank: one A MatMul per group instead of per site; the others lower each site alone (no grouped form yet)
    assert matmuls(plain) - matmuls(fused) == (3 * LAYERS if switching == "bank" else 0)
    with AdapterSession(tmp_path / "fused") as session:
        for name, want in refs.items():
            assert np.abs(session.run({"x": X.numpy()}, adapter=name)[0] - want).max() <= 1e-6
        if switching != "ort-adapters":
            rows = ["a", None, "b", "a"]
            got = session.run({"x": X.numpy()}, adapter_ids=rows)[0]
            assert max(np.abs(got[i] - refs[n][i]).max() for i, n in enumerate(rows)) <= 1e-6
            # a slot filled while serving lands in each site's block of the shared A bank
            a = gm.get_submodule("adapters")
            factors = {s.site: tuple(t.numpy() for t in a.get_submodule(f"{s.site}.a").factors())
                       for s in session.entry.sites}
            session.add_adapter("copy_of_a", factors)
            got = session.run({"x": X.numpy()}, adapter_ids=["copy_of_a"] * 4)[0]
            assert np.abs(got - refs["a"]).max() <= 1e-6


@pytest.mark.slow
def test_merged_export_of_a_fused_graph(tmp_path):
    import onnxruntime as ort

    gm = adapted()
    before = out(gm).numpy()
    run_pass(gm, "fuse")
    run_pass(gm, "merge")
    gm.recompile()
    export_merged(gm, tmp_path / "m.onnx", ExportOptions(), None)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {"x": X.numpy()})[0] - before).max() <= 1e-6


@pytest.mark.slow
def test_per_row_ids_through_the_fused_bank_equal_peft(tmp_path):
    peft = pytest.importorskip("peft")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    configs = {"a": peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False),
               "b": peft.LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"], init_lora_weights=False)}
    torch.manual_seed(7)
    model = peft.get_peft_model(stack(), configs["a"], adapter_name="a")
    model.add_adapter("b", configs["b"])
    model.eval()
    want = {}
    for name in configs:
        model.save_pretrained(tmp_path / "peft", selected_adapters=[name])
        model.set_adapter(name)
        want[name] = out(model).numpy()
    with model.disable_adapter():
        want[None] = out(model).numpy()
    gm = capture_module(stack(), {"x": X})
    for name in configs:
        run_pass(gm, "load", tmp_path, path=str(tmp_path / "peft" / name), adapter=name)
    run_pass(gm, "fuse")
    gm.recompile()
    exported(gm, tmp_path / "out", "bank")
    rows = ["b", "a", None, "b"]
    with AdapterSession(tmp_path / "out") as session:
        got = session.run({"x": X.numpy()}, adapter_ids=rows)[0]
    assert max(np.abs(got[i] - want[n][i]).max() for i, n in enumerate(rows)) <= 1e-5
