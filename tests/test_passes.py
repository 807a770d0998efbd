"""The pass contract for insert / load / merge / unmerge / save on tiny real models.

Per pass (ARCHITECTURE.md, "Tests look like this"): (1) `modified` and site counts, (2) node counts by kind
(call_module adapters, aten.add joins), (3) numerics against an independent oracle: eager forward hooks on
the original Hugging Face model that add `x @ A @ B * s` at the same modules, with `s` computed here by hand,
(4) a selector that matches nothing raises a SpecError naming the nearest sites, (5) idempotence,
(6) round trips: insert -> merge, merge(keep_original) -> unmerge, save -> load.
One capture per model (module scope); every test edits a deep copy.
"""
from __future__ import annotations

import copy
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors.torch import save_file
from torch import nn

from rewrite.adapters.lora import LoRA
from rewrite.errors import PassError, SpecError, VerifyError
from rewrite.graph_edit import adapters_at
from rewrite.pass_infra import GraphPass, PassContext, PassManager, PassOptions, PassResult, ScheduledPass
from rewrite.passes import REGISTRY
from rewrite.pipeline import schedule
from rewrite.sites import resolve, select
from rewrite.spec import parse_spec
from rewrite.state import AdapterTag, state_of

from helpers import capture_hf, logits
from helpers import run_pass as run
from models import build

aten = torch.ops.aten
Q0, Q1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
V0, V1 = "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"
TOL = dict(atol=1e-4, rtol=1e-4)


@dataclass
class Captured:
    model: nn.Module        # the original HF model (the oracle runs on it with hooks)
    gm: fx.GraphModule      # pristine capture: tests edit deep copies only
    inputs: dict[str, torch.Tensor]
    base: torch.Tensor      # logits without adapters

    def fresh(self) -> fx.GraphModule:
        return copy.deepcopy(self.gm)


def _capture(name: str) -> Captured:
    model, gm, kwargs = capture_hf(name)
    return Captured(model, gm, kwargs, logits(gm, kwargs))


@pytest.fixture(scope="module")
def llama() -> Captured:
    return _capture("llama")


@pytest.fixture(scope="module")
def gpt2() -> Captured:
    return _capture("gpt2")


def kinds(gm: fx.GraphModule) -> dict[str, int]:
    nodes = list(gm.graph.nodes)
    return dict(
        nodes=len(nodes),
        adapters=sum(n.op == "call_module" and str(n.target).startswith("adapters.") for n in nodes),
        joins=sum(isinstance(n.meta.get("rewrite"), AdapterTag) and n.meta["rewrite"].role == "join" for n in nodes),
        adds=sum(n.op == "call_function" and n.target is aten.add.Tensor for n in nodes),
    )


def randomize_b(gm: fx.GraphModule, adapter: str = "default", seed: int = 1, std: float = 0.5) -> None:
    """Give every B (zero at init) values, so the adapter's delta is visible in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for owner in dict.fromkeys(s.owner for s in state_of(gm).sites.values()):
            module = adapters_at(gm, owner).get(adapter)
            if module is not None:
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * std)


def branches(gm: fx.GraphModule, scaling: dict[str, float]) -> dict[str, list[tuple]]:
    """module path -> [(A, B, s)] read from the graph's adapters; s is given by the test, not read."""
    out: dict[str, list[tuple]] = {}
    for owner in dict.fromkeys(s.owner for s in state_of(gm).sites.values()):
        for name, module in adapters_at(gm, owner).items():
            out.setdefault(owner, []).append((module.lora_A.detach().clone(), module.lora_B.detach().clone(),
                                              scaling[name]))
    return out


def hook_oracle(model: nn.Module, inputs: dict, adapters: dict[str, list[tuple]]) -> torch.Tensor:
    """The eager model with forward hooks adding x @ A @ B * s (embedding: A[ids] @ B * s) per branch."""
    handles = []
    for path, parts in adapters.items():
        module = model.get_submodule(path)

        def hook(mod, args, output, parts=parts):
            x = args[0]
            for a, b, s in parts:
                output = output + (F.embedding(x, a) if isinstance(mod, nn.Embedding) else x @ a) @ b * s
            return output

        handles.append(module.register_forward_hook(hook))
    try:
        return logits(model, inputs)
    finally:
        for handle in handles:
            handle.remove()


def weight(gm: fx.GraphModule, owner: str) -> torch.Tensor:
    return gm.get_parameter(state_of(gm).sites[owner].weight).detach()


# ---------------------------------------------------------------------------------------------- insert


def test_insert_counts_structure_and_identity(llama):
    gm = llama.fresh()
    before = kinds(gm)
    result = run(gm, "insert", targets=["q_proj", "v_proj"], rank=4, alpha=8)
    assert result.modified
    # q: A 64x4 + B 4x64, v: A 64x4 + B 4x32, two layers
    assert result.stats == {"sites": 4, "adapters": 4, "params_added": 2 * (512 + 384), "adapter": "default"}
    assert kinds(gm) == dict(nodes=before["nodes"] + 8, adapters=4, joins=4, adds=before["adds"] + 4)
    for owner in (Q0, Q1, V0, V1):
        base = state_of(gm).sites.node_of(gm, owner)
        (join,) = base.users  # every former user of the linear now reads the join
        delta = join.args[1]
        assert join.target is aten.add.Tensor and join.args[0] is base
        assert (delta.op, delta.target, delta.args[0]) == ("call_module", f"adapters.{owner}.default", base.args[0])
        assert join.meta["rewrite"] == AdapterTag(owner, "lora", "default", "join")
        module = adapters_at(gm, owner)["default"]
        assert (module.rank, module.scaling, float(module.lora_B.detach().abs().sum())) == (4, 2.0, 0.0)
    assert torch.equal(logits(gm, llama.inputs), llama.base)  # B = 0: the identity


def test_insert_matches_hook_oracle_then_merge_equals_base_plus_delta(llama):
    gm = llama.fresh()
    before = kinds(gm)
    run(gm, "insert", targets=["q_proj", "v_proj"], rank=4, alpha=8)
    randomize_b(gm)
    adapters = branches(gm, {"default": 8 / 4})
    expected = hook_oracle(llama.model, llama.inputs, adapters)
    assert (expected - llama.base).abs().max() > 1e-2  # the delta is visible
    torch.testing.assert_close(logits(gm, llama.inputs), expected, **TOL)

    result = run(gm, "merge")
    assert result.modified and result.stats == {"merged": 4, "adapter_params_folded": 2 * (512 + 384)}
    assert kinds(gm) == before  # a plain graph again: zero overhead
    assert not any(str(n.target).startswith("adapters.") for n in gm.graph.nodes)
    torch.testing.assert_close(logits(gm, llama.inputs), expected, **TOL)
    for owner, [(a, b, s)] in adapters.items():
        torch.testing.assert_close(weight(gm, owner), weight(llama.gm, owner) + s * (a @ b).T, atol=1e-6, rtol=0)
    k0 = "model.layers.0.self_attn.k_proj"
    assert torch.equal(weight(gm, k0), weight(llama.gm, k0))  # not targeted: untouched
    assert {o: list(names) for o, names in state_of(gm).merged.items()} == {o: ["default"] for o in (Q0, V0, Q1, V1)}


def test_conv1d_gpt2_insert_merge(gpt2):
    gm = gpt2.fresh()
    before = kinds(gm)
    result = run(gm, "insert", targets=["c_attn", "mlp.c_proj"], rank=2, alpha=4)
    sites = [s for s in state_of(gm).sites.values() if adapters_at(gm, s.owner)]
    assert {s.op for s in sites} == {"conv1d"} and len(sites) == 4
    assert result.stats["params_added"] == 2 * (64 * 2 + 2 * 192) + 2 * (256 * 2 + 2 * 64)
    assert kinds(gm) == dict(nodes=before["nodes"] + 8, adapters=4, joins=4, adds=before["adds"] + 4)
    randomize_b(gm)
    adapters = branches(gm, {"default": 4 / 2})
    expected = hook_oracle(gpt2.model, gpt2.inputs, adapters)
    assert (expected - gpt2.base).abs().max() > 1e-2
    torch.testing.assert_close(logits(gm, gpt2.inputs), expected, **TOL)

    assert run(gm, "merge").stats["merged"] == 4
    assert kinds(gm) == before
    torch.testing.assert_close(logits(gm, gpt2.inputs), expected, **TOL)
    for owner, [(a, b, s)] in adapters.items():  # Conv1D keeps W as [d_in, d_out]: W + s A B, no transpose
        torch.testing.assert_close(weight(gm, owner), weight(gpt2.gm, owner) + s * a @ b, atol=1e-6, rtol=0)


def test_embedding_insert_matches_oracle(llama):
    gm = llama.fresh()
    run(gm, "insert", targets=["class:Embedding"], rank=2, alpha=2)
    module = adapters_at(gm, "model.embed_tokens")["default"]
    assert float(module.lora_A.detach().abs().sum()) == 0.0  # PEFT's embedding init: A = 0, B random
    with torch.no_grad():
        module.lora_A.normal_(generator=torch.Generator().manual_seed(3))
    expected = hook_oracle(llama.model, llama.inputs, branches(gm, {"default": 1.0}))
    torch.testing.assert_close(logits(gm, llama.inputs), expected, **TOL)
    run(gm, "merge")
    torch.testing.assert_close(logits(gm, llama.inputs), expected, **TOL)


def test_tied_weight_merge_is_refused(gpt2):
    gm = gpt2.fresh()
    run(gm, "insert", targets=["transformer.wte"], rank=2)
    with pytest.raises(SpecError, match=r"cannot merge into transformer.wte: .*shared with \['lm_head'\] \(tied"):
        run(gm, "merge")


# ---------------------------------------------------------------------------------------------- selectors


def test_selector_matching_nothing_names_the_nearest_sites(llama):
    gm = llama.fresh()
    before = gm.code
    with pytest.raises(SpecError) as err:
        run(gm, "insert", targets=["q_proj", "q_prj"], where="spec.toml:7")
    message = str(err.value)
    assert message.startswith("spec.toml:7: selector 'q_prj' matches no site")
    assert f"Nearest site names: {Q0}, {Q1}" in message and "list all 16 sites" in message
    with pytest.raises(SpecError, match="Module classes with sites: Embedding, Linear"):
        run(gm, "insert", targets=["class:Conv2d"])
    with pytest.raises(SpecError, match=r"rank_pattern: selector 'v_prj' matches no site.*Nearest site names: " + V0):
        run(gm, "insert", targets=["q_proj"], rank_pattern={"v_prj": 2})
    with pytest.raises(ValidationError, match="not a valid regular expression"):
        run(gm, "insert", targets=["re:q_(proj"])  # refused while the options validate, before any pass runs
    assert gm.code == before and kinds(gm)["adapters"] == 0  # nothing changed before the error


def test_peft_style_suffix_names(llama):
    table = state_of(llama.gm).sites
    assert [s.name for s in select(table, ["q_proj"])] == [Q0, Q1]
    assert [s.name for s in select(table, ["self_attn.q_proj"])] == [Q0, Q1]
    assert [s.name for s in select(table, ["layers.1.self_attn.q_proj"])] == [Q1]
    assert [s.name for s in select(table, ["*.layers.0.*_proj", "lm_head"])] == [
        s.name for s in table.values() if ".layers.0." in s.name and s.op == "linear"] + ["lm_head"]
    with pytest.raises(SpecError, match="selector 'proj' matches no site"):
        select(table, ["proj"])  # a suffix matches whole dotted parts only


def test_selector_precedence_exact_over_glob_regex_over_class_over_global(llama):
    table = state_of(llama.gm).sites
    pattern = {
        "class:Linear": 2,                     # class: below every glob / regex, though listed first
        "*.q_proj": 3,                         # glob and regex: the first listed that matches wins
        r"re:model\.layers\.0\..*": 4,
        "*.self_attn.*": 5,
        Q0: 6,                                 # exact: wins though listed last
    }
    expected = {Q0: 6, Q1: 3, "model.layers.0.self_attn.k_proj": 4, "model.layers.1.self_attn.k_proj": 5,
                "model.layers.0.mlp.up_proj": 4, "model.layers.1.mlp.up_proj": 2, "lm_head": 2,
                "model.embed_tokens": 8}
    assert {name: resolve(table[name], 8, pattern) for name in expected} == expected
    # a PEFT-style short name is an exact selector: it beats a glob
    assert resolve(table[Q1], 8, {"*.q_proj": 2, "q_proj": 7}) == 7

    gm = llama.fresh()
    run(gm, "insert", targets=["*"], rank=8, rank_pattern=pattern, alpha_pattern={"class:Embedding": 16.0})
    ranks = {name: adapters_at(gm, name)["default"].rank for name in expected}
    assert ranks == expected
    assert adapters_at(gm, "model.embed_tokens")["default"].scaling == 16.0 / 8
    assert adapters_at(gm, Q0)["default"].scaling == 8.0 / 6


def test_rslora_scaling_is_alpha_over_sqrt_rank(llama):
    gm = llama.fresh()
    run(gm, "insert", targets=["q_proj"], rank=4, alpha=8, rslora=True)
    run(gm, "insert", targets=["q_proj"], adapter="plain", rank=4, alpha=8)
    assert adapters_at(gm, Q0)["default"].scaling == 8 / math.sqrt(4) == 4.0
    assert adapters_at(gm, Q0)["plain"].scaling == 8 / 4
    randomize_b(gm)
    expected = hook_oracle(llama.model, llama.inputs, branches(gm, {"default": 8 / math.sqrt(4), "plain": 0.0}))
    torch.testing.assert_close(logits(gm, llama.inputs), expected, **TOL)
    run(gm, "merge")
    torch.testing.assert_close(logits(gm, llama.inputs), expected, **TOL)


# ---------------------------------------------------------------------------------------------- idempotence


def test_each_pass_twice_second_run_is_a_no_op(llama, tmp_path):
    gm = llama.fresh()
    options = dict(targets=["q_proj", "v_proj"], rank=4)
    assert run(gm, "insert", **options).modified
    code, counts = gm.code, kinds(gm)
    second = run(gm, "insert", **options)
    assert (second.modified, second.stats["sites"], gm.code, kinds(gm)) == (False, 0, code, counts)

    randomize_b(gm)
    assert run(gm, "save", path="a.safetensors", format="rewrite", root=tmp_path).modified is False
    loaded = run(gm, "load", path="a.safetensors", root=tmp_path)  # the same weights again
    assert (loaded.modified, loaded.stats["modules"], loaded.stats["changed"], gm.code) == (False, 4, 0, code)

    assert run(gm, "merge", keep_original=True).modified
    code, counts = gm.code, kinds(gm)
    again = run(gm, "merge", keep_original=True)
    assert (again.modified, again.stats["merged"], gm.code, kinds(gm)) == (False, 0, code, counts)

    assert run(gm, "unmerge").modified
    code = gm.code
    assert run(gm, "unmerge").modified is False and gm.code == code


# ---------------------------------------------------------------------------------------------- round trips


def test_merge_keep_original_then_unmerge_restores_weights_bit_exactly(llama):
    gm = llama.fresh()
    run(gm, "insert", targets=["q_proj", "v_proj", "mlp.down_proj"], rank=4, alpha=8)
    randomize_b(gm)
    live, counts = logits(gm, llama.inputs), kinds(gm)
    owners = [Q0, V0, Q1, V1, "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    original = {o: weight(gm, o).clone() for o in owners}

    merged = run(gm, "merge", keep_original=True)
    assert merged.stats["merged"] == 6 and kinds(gm)["adapters"] == 0
    assert all(not torch.equal(weight(gm, o), original[o]) for o in owners)
    torch.testing.assert_close(logits(gm, llama.inputs), live, **TOL)

    result = run(gm, "unmerge")
    assert result.modified and result.stats == {"unmerged": 6}
    assert all(torch.equal(weight(gm, o), original[o]) for o in owners)  # bit-exact: W_0 was kept
    assert kinds(gm) == counts and state_of(gm).merged == {} and state_of(gm).originals == {}
    torch.testing.assert_close(logits(gm, llama.inputs), live, atol=1e-6, rtol=0)


def test_unmerge_without_keep_original_is_refused(llama):
    gm = llama.fresh()
    run(gm, "insert", targets=["q_proj"])
    run(gm, "merge")
    with pytest.raises(SpecError, match=f"{Q0} was merged without keep_original = true"):
        run(gm, "unmerge")


def test_save_rewrite_then_load_into_fresh_capture(llama, tmp_path):
    gm = llama.fresh()
    run(gm, "insert", targets=["q_proj", "v_proj"], adapter="style", rank=4, alpha=8, rslora=True,
        rank_pattern={V1: 2})
    randomize_b(gm, "style")
    saved = run(gm, "save", adapter="style", path="out/style.safetensors", format="rewrite", root=tmp_path)
    assert saved.modified is False and saved.stats["modules"] == 4
    assert (tmp_path / "out" / "style.safetensors").is_file()

    fresh = llama.fresh()
    before = kinds(fresh)
    result = run(fresh, "load", adapter="style", path="out/style.safetensors", root=tmp_path)
    assert result.modified and (result.stats["modules"], result.stats["changed"]) == (4, 4)
    assert kinds(fresh) == dict(nodes=before["nodes"] + 8, adapters=4, joins=4, adds=before["adds"] + 4)
    for owner in (Q0, V0, Q1, V1):
        a, b = adapters_at(gm, owner)["style"], adapters_at(fresh, owner)["style"]
        assert (b.rank, b.alpha, b.rslora) == (a.rank, a.alpha, a.rslora)
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)
    assert adapters_at(fresh, V1)["style"].rank == 2
    assert torch.equal(logits(fresh, llama.inputs), logits(gm, llama.inputs))


def test_load_hand_written_peft_dir_matches_oracle(llama, tmp_path):
    """PEFT's layout written by hand: lora_A.weight = A^T [r, d_in], lora_B.weight = B^T [d_out, r]."""
    generator = torch.Generator().manual_seed(5)
    tensors, adapters = {}, {}
    for owner, d_out, r in ((Q0, 64, 4), (V1, 32, 2)):
        a, b = torch.randn(64, r, generator=generator), torch.randn(r, d_out, generator=generator)
        tensors[f"base_model.model.{owner}.lora_A.weight"] = a.T.contiguous()
        tensors[f"base_model.model.{owner}.lora_B.weight"] = b.T.contiguous()
        adapters[owner] = [(a, b, (16.0 if owner == V1 else 8.0) / r)]
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    save_file(tensors, peft_dir / "adapter_model.safetensors")
    (peft_dir / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": [Q0, V1],
         "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"layers.1.self_attn.v_proj": 16}}))

    gm = llama.fresh()
    result = run(gm, "load", path=str(peft_dir))
    assert result.modified and result.stats["modules"] == 2 and kinds(gm)["adapters"] == 2
    assert adapters_at(gm, V1)["default"].scaling == 16.0 / 2
    expected = hook_oracle(llama.model, llama.inputs, adapters)
    torch.testing.assert_close(logits(gm, llama.inputs), expected, **TOL)


@pytest.mark.slow
def test_peft_library_round_trip(llama, tmp_path):
    """Hugging Face PEFT itself as the oracle: its adapter loads into the graph, ours loads into PEFT."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                                 rank_pattern={"v_proj": 2}))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator))
    model.save_pretrained(tmp_path / "theirs")
    expected = logits(model.eval(), llama.inputs)

    gm = llama.fresh()
    run(gm, "load", path=str(tmp_path / "theirs"))
    torch.testing.assert_close(logits(gm, llama.inputs), expected, **TOL)

    run(gm, "save", path="ours", format="peft", root=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = peft.PeftModel.from_pretrained(build("llama"), tmp_path / "ours").eval()
    assert not [w for w in caught if "Unexpected keyword" in str(w.message)]  # our config holds only PEFT's keys
    torch.testing.assert_close(logits(again, llama.inputs), expected, **TOL)


# ---------------------------------------------------------------------------------------------- adapters


def test_several_named_adapters_coexist_on_one_site(llama):
    gm = llama.fresh()
    before = kinds(gm)
    run(gm, "insert", adapter="a", targets=["q_proj"], rank=2, alpha=2)
    run(gm, "insert", adapter="b", targets=[Q0, "v_proj"], rank=4, alpha=2)
    assert set(adapters_at(gm, Q0)) == {"a", "b"}
    assert kinds(gm) == dict(nodes=before["nodes"] + 10, adapters=5, joins=5, adds=before["adds"] + 5)
    base = state_of(gm).sites.node_of(gm, Q0)
    (join_a,) = base.users
    (join_b,) = join_a.users  # a chain: base -> + a -> + b
    assert (join_a.meta["rewrite"].adapter, join_b.meta["rewrite"].adapter) == ("a", "b")
    randomize_b(gm, "a", seed=1)
    randomize_b(gm, "b", seed=2)
    scaling = {"a": 2 / 2, "b": 2 / 4}
    expected = hook_oracle(llama.model, llama.inputs, branches(gm, scaling))
    torch.testing.assert_close(logits(gm, llama.inputs), expected, **TOL)

    assert run(gm, "merge", adapters=["a"]).stats["merged"] == 2
    assert set(adapters_at(gm, Q0)) == {"b"} and kinds(gm)["adapters"] == 3
    torch.testing.assert_close(logits(gm, llama.inputs), expected, **TOL)
    run(gm, "merge")
    assert kinds(gm) == before
    torch.testing.assert_close(logits(gm, llama.inputs), expected, **TOL)
    with pytest.raises(SpecError, match=r"adapters \['c'\] are attached to no site"):
        run(gm, "merge", adapters=["c"])


# ---------------------------------------------------------------------------------------------- manager


class Perturb(GraphPass):
    """Claims to preserve outputs but changes lm_head: what --verify is there to catch."""
    name = "perturb"
    Options = PassOptions

    def preserves_outputs(self) -> bool:
        return True

    def call(self, gm):
        with torch.no_grad():
            gm.get_parameter("lm_head.weight").add_(0.1)
        return PassResult(gm, True, {})


class RandomizeB(GraphPass):
    """Changes outputs and says so (no verification across it)."""
    name = "randomize_b"
    Options = PassOptions

    def call(self, gm):
        randomize_b(gm)
        return PassResult(gm, True, {})


def _scheduled(*passes: GraphPass) -> list[ScheduledPass]:
    return [ScheduledPass(p, f"pass[{i}] '{p.name}'") for i, p in enumerate(passes)]


def _pass(name: str, **options) -> GraphPass:
    return REGISTRY[name](REGISTRY[name].Options(**options))


def test_verify_catches_a_non_equivalent_change(llama):
    gm = llama.gm
    with pytest.raises(VerifyError, match=r"pass\[1\] 'perturb' promises unchanged outputs, but the max abs "):
        PassManager(_scheduled(_pass("insert", targets=["q_proj"]), Perturb()), verify=True).run(gm)
    assert torch.equal(logits(llama.gm, llama.inputs), llama.base)  # the manager worked on a copy

    good = PassManager(_scheduled(_pass("insert", targets=["q_proj"]), RandomizeB(), _pass("merge")),
                       verify=True).run(gm)
    history = state_of(good).history
    assert [r.name for r in history] == ["insert", "randomize_b", "merge"]
    assert history[0].stats["verify_max_abs_diff"] == 0.0 and history[2].stats["verify_max_abs_diff"] < 1e-5
    assert state_of(llama.gm).history == []


def test_verify_catches_a_wrong_merge(llama, monkeypatch):
    real = LoRA.merge_into
    monkeypatch.setattr(LoRA, "merge_into", lambda self, w, b=None, sign=1.0: real(self, w, b, sign=2 * sign))
    passes = _scheduled(_pass("insert", targets=["q_proj"]), RandomizeB(), _pass("merge"))
    with pytest.raises(VerifyError, match=r"pass\[2\] 'merge' promises unchanged outputs"):
        PassManager(passes, verify=True).run(llama.gm)


def test_manager_wraps_errors_with_pass_and_history(llama):
    spec = parse_spec('version = 1\n\n[[pass]]\nname = "insert"\ntargets = ["q_proj"]\n\n'
                      '[[pass]]\nname = "merge"\nadapters = ["nope"]\n', Path("spec.toml"))
    with pytest.raises(SpecError) as err:
        PassManager(schedule(spec, PassContext())).run(llama.gm)
    assert str(err.value) == ("while running pass[1] 'merge' (after insert): spec.toml:7: adapters ['nope'] are "
                              "attached to no site (attached: ['default'])")

    class Boom(GraphPass):
        name = "boom"
        Options = PassOptions

        def call(self, gm):
            raise ValueError("kaboom")

    with pytest.raises(PassError, match=r"^while running pass\[0\] 'boom': internal error ValueError: kaboom$"):
        PassManager(_scheduled(Boom())).run(llama.gm)
