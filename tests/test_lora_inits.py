"""LoRA's inits that rewrite the base weight (PiSSA, OLoRA) against Hugging Face PEFT's
`LoraConfig(init_lora_weights="pissa" | "olora")` on the same models, and the strict reading of PEFT LoRA configs.

Oracle: `peft.get_peft_model` with the same init on the same tiny model: after insert our residual base weights,
our deltas s (A B)^T (sign-free: SVD signs may differ) and our factors up to the sign of each component equal PEFT's.
Then A and B are perturbed in PEFT (a training step stand-in: the adapter then changes the outputs) and copied into
ours. Models: a tiny LLaMA (GQA decoder) and BERT (encoder) on linear sites, GPT-2 on Conv1D (PiSSA only: PEFT's
OLoRA ignores Conv1D's layout). Checked: the forward; `save` as PEFT writes it (PEFT reloads it onto the ORIGINAL
model, recomputing the residual) and `convert_to_lora` (rank 2r against the original weight: PEFT and our `load`
read it, as they read PEFT's own converted save); merge against `merge_and_unload` and against W + delta;
merge / unmerge; a merged ONNX export; `allocate` resizing; and the refusals (unconverted directories on load, other
LoRA variants, sites an init cannot take). Run with `-s` to see the measured max abs differences.
"""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from rewrite.errors import AdapterFileError, SpecError
from rewrite.graph_edit import adapters_at

from helpers import edit_json, first_output, fresh_capture, merged_onnx_output
from helpers import run_pass as run
from models import build

peft = pytest.importorskip("peft")

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "dense"],
           "gpt2": ["c_attn", "c_proj"]}
CASES = [("llama", "pissa"), ("llama", "olora"), ("bert", "pissa"), ("bert", "olora"), ("gpt2", "pissa")]
RANK, ALPHA = 4, 8.0
ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


def _record(what: str, diff: float) -> float:
    print(f"\n[lora inits] {what}: max abs diff {diff:.3g}")
    return diff


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def _layers(theirs) -> dict[str, torch.nn.Module]:
    """PEFT's LoRA layers by module path."""
    return {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


def _peft_model(name: str, init: str, **config):
    lora = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=init, target_modules=TARGETS[name],
                           fan_in_fan_out=name == "gpt2", **config)
    return peft.get_peft_model(build(name), lora).eval()


def _train_step(theirs, gm) -> None:
    """Perturb PEFT's A and B as a training step would, and copy them into our adapter."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for owner, layer in _layers(theirs).items():
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            a.add_(0.3 * torch.randn(a.shape, generator=generator))
            b.add_(0.3 * torch.randn(b.shape, generator=generator))
            adapters_at(gm, owner)["default"].load_peft_state({"lora_A.weight": a, "lora_B.weight": b})


def _make_case(name: str, init: str, **config):
    """(PEFT model at its init, a copy of it after a training step, our graph at insert, our graph after the same
    step, inputs)."""
    theirs = _peft_model(name, init, **config)
    gm, kwargs = fresh_capture(name)
    run(gm, "insert", targets=TARGETS[name], rank=RANK, alpha=ALPHA, init=init,
        rslora=config.get("use_rslora", False))
    trained, tuned = copy.deepcopy(theirs), copy.deepcopy(gm)
    _train_step(trained, tuned)
    return theirs, trained, gm, tuned, kwargs


@pytest.fixture(scope="module")
def case():
    made = {}

    def get(name: str, init: str, **config):
        key = (name, init, tuple(sorted(config.items())))
        if key not in made:
            made[key] = _make_case(name, init, **config)
        theirs, trained, gm, tuned, kwargs = made[key]
        return theirs, copy.deepcopy(trained), copy.deepcopy(gm), copy.deepcopy(tuned), kwargs

    return get


def _peft_reload(directory, name: str):
    """`PeftModel.from_pretrained` onto a fresh ORIGINAL model; refuses any warning about keys or config fields."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(build(name), directory).eval()
    assert not [w for w in caught if any(s in str(w.message) for s in ("Unexpected", "missing", "unexpected"))]
    return model


def _original_weights(name: str) -> dict[str, torch.Tensor]:
    return {k: p.detach() for k, p in build(name).named_parameters()}


# ------------------------------------------------------------------------------------------------ insert

@pytest.mark.parametrize("name,init", CASES)
def test_insert_rewrites_the_base_weight_as_peft_does(case, name, init):
    theirs, _, gm, _, kwargs = case(name, init)
    base = first_output(build(name), kwargs)
    assert _record(f"{name} {init} identity at insert", _diff(first_output(gm, kwargs), base)) <= ATOL
    worst, original = dict(residual=0.0, delta=0.0, factors=0.0), _original_weights(name)
    for owner, layer in _layers(theirs).items():
        ours, weight = adapters_at(gm, owner)["default"], gm.get_parameter(f"{owner}.weight")
        assert _diff(weight, original[f"{owner}.weight"]) > 1e-2  # the base weight was rewritten
        worst["residual"] = max(worst["residual"], _diff(weight, layer.base_layer.weight))
        worst["delta"] = max(worst["delta"], _diff(ours.delta_weight(), layer.get_delta_weight("default")))
        a, b = layer.lora_A["default"].weight.T, layer.lora_B["default"].weight.T  # our layout
        sign = torch.sign((ours.lora_A * a).sum(0))  # one SVD sign per component
        worst["factors"] = max(worst["factors"], _diff(ours.lora_A * sign, a), _diff(ours.lora_B * sign[:, None], b))
    for what, diff in worst.items():
        assert _record(f"{name} {init} {what} vs PEFT's", diff) <= ATOL


def test_sites_an_init_cannot_take_are_refused_by_name():
    gpt2, _ = fresh_capture("gpt2")
    with pytest.raises(SpecError, match=r"transformer.h.0.attn.c_attn: init = 'olora' adapts linear sites .*conv1d"):
        run(copy.deepcopy(gpt2), "insert", targets=["c_attn"], init="olora")
    with pytest.raises(SpecError, match=r"lm_head: init = 'pissa' rewrites the base weight lm_head.weight, which "
                                        r"transformer.wte also reads \(tied weights\)"):
        run(copy.deepcopy(gpt2), "insert", targets=["lm_head"], init="pissa")
    llama, _ = fresh_capture("llama")
    with pytest.raises(SpecError, match=r"model.embed_tokens: init = 'pissa' adapts linear and conv1d sites"):
        run(copy.deepcopy(llama), "insert", targets=["embed_tokens"], init="pissa")
    with pytest.raises(SpecError, match=r"init = 'olora' takes rank <= min\(d_in, d_out\) = 32, got 40"):
        run(copy.deepcopy(llama), "insert", targets=["k_proj"], init="olora", rank=40, allow_large_rank=True)
    with pytest.raises(SpecError, match=r"alpha must be > 0"):
        run(copy.deepcopy(llama), "insert", targets=["q_proj"], init="pissa", alpha=0.0)
    for kind, init in (("dora", "pissa"), ("lora", "pissa_niter_4")):
        with pytest.raises(ValueError, match=rf'init = {init!r}: kind = "{kind}" starts from'):
            run(copy.deepcopy(llama), "insert", kind=kind, targets=["q_proj"], init=init)


# ------------------------------------------------------------------------------------------------ forward

@pytest.mark.parametrize("name,init", CASES)
def test_forward_after_training_equals_peft(case, name, init):
    _, trained, _, tuned, kwargs = case(name, init)
    want = first_output(trained, kwargs)
    assert _diff(want, first_output(build(name), kwargs)) > 1e-2  # the trained adapter matters
    assert _record(f"{name} {init} trained forward vs PEFT", _diff(first_output(tuned, kwargs), want)) <= ATOL


# ------------------------------------------------------------------------------------------- save / load

@pytest.mark.parametrize("name,init", CASES)
def test_save_writes_what_peft_loads_onto_the_original_model(case, name, init, tmp_path):
    """Unconverted, as PEFT saves it: PEFT recomputes the residual from the original weight when it loads."""
    _, trained, _, tuned, kwargs = case(name, init)
    run(tuned, "save", root=tmp_path, path="ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["init_lora_weights"] == init
    again = _peft_reload(tmp_path / "ours", name)
    diff = _diff(first_output(again, kwargs), first_output(trained, kwargs))
    assert _record(f"{name} {init} PEFT loading our save onto the original", diff) <= ATOL


@pytest.mark.parametrize("name,init,rslora", [(*c, False) for c in CASES] + [("llama", "pissa", True)])
def test_converted_save_is_a_plain_lora_against_the_original_weight(case, name, init, rslora, tmp_path):
    config = dict(use_rslora=True) if rslora else {}
    theirs, trained, _, tuned, kwargs = case(name, init, **config)
    want = first_output(trained, kwargs)
    run(tuned, "save", root=tmp_path, path="ours", convert_to_lora=True)
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (saved["init_lora_weights"], saved["r"], saved["use_rslora"]) == (True, 2 * RANK, rslora)
    again = _peft_reload(tmp_path / "ours", name)
    assert sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in again.modules()) == len(_layers(trained))
    diff = _diff(first_output(again, kwargs), want)
    assert _record(f"{name} {init}{' rslora' if rslora else ''} PEFT loading our converted save", diff) <= ATOL

    # PEFT's own conversion (its initial adapter saved first, as PEFT's docs do it) reads back in ours, twice
    initial = copy.deepcopy(theirs)
    initial.peft_config["default"].init_lora_weights = True
    initial.save_pretrained(tmp_path / "init")
    trained.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    gm, _ = fresh_capture(name)
    result = run(gm, "load", root=tmp_path, path="peft", adapter="tuned")
    assert result.modified and result.stats["modules"] == len(_layers(trained))
    assert _record(f"{name} {init} our load of PEFT's converted save", _diff(first_output(gm, kwargs), want)) <= ATOL
    nodes = len(gm.graph.nodes)
    assert not run(gm, "load", root=tmp_path, path="peft", adapter="tuned").modified
    assert len(gm.graph.nodes) == nodes


def test_our_adapter_file_takes_the_converted_form_only(case, tmp_path):
    _, trained, _, tuned, kwargs = case("llama", "pissa")
    with pytest.raises(AdapterFileError, match=r"our adapter file has no residual base weight for init = 'pissa' "
                                               r"adapters; save with convert_to_lora = true"):
        run(tuned, "save", root=tmp_path, path="ours.safetensors", format="rewrite")
    run(tuned, "save", root=tmp_path, path="ours.safetensors", format="rewrite", convert_to_lora=True)
    gm, _ = fresh_capture("llama")
    run(gm, "load", root=tmp_path, path="ours.safetensors")
    assert _diff(first_output(gm, kwargs), first_output(trained, kwargs)) <= ATOL


def test_an_adapter_mixing_inits_saves_converted_only(tmp_path):
    gm, kwargs = fresh_capture("llama")
    run(gm, "insert", targets=["q_proj"], init="pissa", adapter="mixed")
    run(gm, "insert", targets=["v_proj"], init="gaussian", adapter="mixed")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param_name, param in gm.named_parameters():
            if param_name.startswith("adapters."):
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    assert _diff(first_output(gm, kwargs), first_output(build("llama"), kwargs)) > 1e-2
    with pytest.raises(AdapterFileError, match=r"the adapter mixes inits \['True', 'pissa'\]; a PEFT directory has "
                                               r"one init_lora_weights: save with convert_to_lora = true"):
        run(gm, "save", root=tmp_path, path="unconverted", adapter="mixed")
    run(gm, "save", root=tmp_path, path="ours", adapter="mixed", convert_to_lora=True)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert {config["r"], *config["rank_pattern"].values()} == {16, 8}  # pissa 2 x 8, gaussian as it was
    again = _peft_reload(tmp_path / "ours", "llama")
    assert _diff(first_output(again, kwargs), first_output(gm, kwargs)) <= ATOL


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_load_refuses_a_directory_that_fits_a_residual_base(case, init, tmp_path):
    _, trained, _, _, _ = case("llama", init)
    trained.save_pretrained(tmp_path / "peft")
    gm, _ = fresh_capture("llama")
    method = {"pissa": "PiSSA", "olora": "OLoRA"}[init]
    with pytest.raises(AdapterFileError, match=rf"'init_lora_weights': '{init}': a {method} adapter, trained against "
                                               r"the residual base weight .*save with convert_to_lora = true"):
        run(gm, "load", root=tmp_path, path="peft")


@pytest.fixture(scope="module")
def plain_peft_dir(tmp_path_factory):
    """A plain LoRA directory PEFT saved (random A and B) and PEFT's outputs with it."""
    torch.manual_seed(5)
    model = peft.get_peft_model(build("llama"), peft.LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=False,
                                                                target_modules=TARGETS["llama"])).eval()
    path = tmp_path_factory.mktemp("plain")
    model.save_pretrained(path)
    return path, model


def _copy_dir(source, target):
    target.mkdir()
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


@pytest.mark.parametrize("value,named", [("pissa_niter_4", "PiSSA"), ("corda", "CorDA"), ("loftq", "LoftQ"),
                                         ("lora_ga", "LoRA-GA"), ("kaiming", "not an init this reader knows")])
def test_load_refuses_other_inits_that_rewrite_the_base_by_name(plain_peft_dir, tmp_path, value, named):
    path = _copy_dir(plain_peft_dir[0], tmp_path / "dir")
    edit_json(path / "adapter_config.json", init_lora_weights=value)
    gm, _ = fresh_capture("llama")
    with pytest.raises(AdapterFileError, match=rf"'init_lora_weights': '{value}'.*{named}"):
        run(gm, "load", root=tmp_path, path="dir")


@pytest.mark.parametrize("value", [True, False, "gaussian", "eva", "orthogonal", "mica"])
def test_inits_that_leave_the_base_alone_load_as_peft_loads_them(plain_peft_dir, tmp_path, value):
    path = _copy_dir(plain_peft_dir[0], tmp_path / "dir")
    edit_json(path / "adapter_config.json", init_lora_weights=value)
    gm, kwargs = fresh_capture("llama")
    run(gm, "load", root=tmp_path, path="dir")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*eva_config.*")
        want = first_output(peft.PeftModel.from_pretrained(build("llama"), path).eval(), kwargs)
    assert _diff(want, first_output(build("llama"), kwargs)) > 1e-2
    assert _diff(first_output(gm, kwargs), want) <= ATOL


@pytest.mark.parametrize("option,value", [
    ("use_qalora", True), ("layer_replication", [[0, 1]]),
    ("target_parameters", ["mlp.experts.down_proj"]), ("alora_invocation_tokens", [1]),
    ("megatron_config", {"tensor_model_parallel_size": 2})])
def test_lora_refuses_the_variants_dora_refuses_by_name(plain_peft_dir, tmp_path, option, value):
    path = _copy_dir(plain_peft_dir[0], tmp_path / "dir")
    edit_json(path / "adapter_config.json", **{option: value})
    gm, _ = fresh_capture("llama")
    with pytest.raises(AdapterFileError, match=rf"'{option}' is set; .* not supported for LORA adapters"):
        run(gm, "load", root=tmp_path, path="dir")


# ------------------------------------------------------------------------------------------------- merge

@pytest.mark.parametrize("name,init", CASES)
def test_merge_gives_the_trained_weight_and_equals_merge_and_unload(case, name, init):
    _, trained, gm, tuned, kwargs = case(name, init)
    want = first_output(trained, kwargs)
    merged = copy.deepcopy(tuned)
    run(merged, "merge")
    folded = copy.deepcopy(trained).merge_and_unload()
    ours = dict(merged.named_parameters())
    weights = _record(f"{name} {init} merged weights vs PEFT",
                      max(_diff(ours[k], p) for k, p in folded.named_parameters()))
    assert weights <= ATOL
    assert _record(f"{name} {init} merged outputs vs PEFT", _diff(first_output(merged, kwargs), want)) <= ATOL

    worst_trained, worst_unmerge, original = 0.0, 0.0, _original_weights(name)
    for owner in _layers(trained):
        module = adapters_at(tuned, owner)["default"]
        a0, b0, s = module.init_lora_A, module.init_lora_B, module.scaling
        delta = s * (module.lora_A @ module.lora_B - a0 @ b0)  # matmul layout: the update against the original
        expected = original[f"{owner}.weight"] + (delta if module.op == "conv1d" else delta.T)
        worst_trained = max(worst_trained, _diff(ours[f"{owner}.weight"], expected))
        residual = tuned.get_parameter(f"{owner}.weight").detach().clone()
        weight = residual.clone()
        module.merge_into(weight, None)
        module.unmerge_from(weight, None)
        worst_unmerge = max(worst_unmerge, _diff(weight, residual))
    assert _record(f"{name} {init} merged vs W + s (A B - A0 B0)", worst_trained) <= ATOL
    assert _record(f"{name} {init} merge then unmerge vs the residual", worst_unmerge) <= ATOL


def test_merge_keep_original_then_unmerge_restores_the_residual(case):
    _, _, _, tuned, kwargs = case("bert", "olora")
    before = {k: p.detach().clone() for k, p in tuned.named_parameters() if not k.startswith("adapters.")}
    outputs = first_output(tuned, kwargs)
    run(tuned, "merge", keep_original=True)
    run(tuned, "unmerge")
    assert all(torch.equal(p, before[k]) for k, p in tuned.named_parameters() if not k.startswith("adapters."))
    assert _diff(first_output(tuned, kwargs), outputs) == 0


@pytest.mark.slow
def test_merged_onnx_equals_torch(case, tmp_path):
    _, _, _, tuned, kwargs = case("llama", "pissa")
    want = first_output(tuned, kwargs)
    got = merged_onnx_output(tuned, kwargs, tmp_path / "merged.onnx")
    assert _record("llama pissa merged ONNX Runtime vs torch", _diff(got, want)) <= 1e-4


# --------------------------------------------------------------------------------------------- allocate

def test_allocate_resizes_it_and_only_the_converted_form_saves_then(case, tmp_path):
    _, trained, _, tuned, kwargs = case("llama", "pissa")
    modules = {o: adapters_at(tuned, o)["default"] for o in _layers(trained)}
    before = first_output(tuned, kwargs)
    result = run(tuned, "allocate", scorer="energy", budget={"fraction": 0.5}, min_rank=1, report="")
    assert result.modified and result.stats["resized"] == len(modules)
    assert all(1 <= m.rank < RANK and m.lora_A.shape[1] == m.rank == m.lora_B.shape[0] for m in modules.values())
    after = first_output(tuned, kwargs)
    assert _diff(after, before) > 0  # truncated
    with pytest.raises(AdapterFileError, match=r"this pissa adapter was resized \(rank 4 -> \d\) since its insert, "
                                               r"but PEFT recomputes the residual at the saved rank; save with "
                                               r"convert_to_lora = true"):
        run(tuned, "save", root=tmp_path, path="unconverted")
    run(tuned, "save", root=tmp_path, path="ours", convert_to_lora=True)
    again = _peft_reload(tmp_path / "ours", "llama")
    diff = _diff(first_output(again, kwargs), after)
    assert _record("llama pissa resized, converted, loaded by PEFT", diff) <= ATOL


def test_unmerged_export_refuses_a_rewritten_base(tmp_path):
    """PiSSA rewrote W to its residual: a switchable export would serve the residual as the base model."""
    from rewrite.errors import ExportError
    from rewrite.export.onnx_unmerged import export_unmerged
    from rewrite.options import ExportOptions
    from helpers import capture_hf, run_pass
    _, gm, _ = capture_hf("llama")
    run_pass(gm, "insert", targets=["q_proj"], rank=2, alpha=4.0, init="pissa")
    with pytest.raises(ExportError, match=r"q_proj: the lora adapter was inserted with init = 'pissa', which rewrote "
                                          r"the base weight"):
        export_unmerged(gm, tmp_path, ExportOptions(mode="unmerged", switching="bank"))
