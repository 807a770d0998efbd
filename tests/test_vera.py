"""VeRA against Hugging Face PEFT's VeRA on the same weights: projections, forward, merge, saved and loaded adapters.

Oracle: `peft.get_peft_model(model, VeraConfig(r, target_modules, projection_prng_key))` with random vectors
lambda_b, lambda_d (non-zero: the adapter moves the outputs by more than 1e-2) copied into ours, on a tiny LLaMA
(GQA: v_proj has fewer outputs than q_proj, so sites use different slices), BERT (an encoder) and GPT-2 (Conv1D).
The shared frozen projections are drawn by us from the same key, bit for bit PEFT's, and held once: one tensor in the
graph, one `base_model.vera_A` / `vera_B` in a saved directory, one initializer in ONNX. ONNX Runtime is the oracle
of the exports (merged, live, unmerged bank).
"""
from __future__ import annotations

import json
import warnings

import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file

from rewrite.adapters.base import NotSupported
from rewrite.adapters.vera import VeRA
from rewrite.capture import flat_outputs
from rewrite.check import check_merged, check_unmerged
from rewrite.errors import AdapterFileError, SpecError
from rewrite.export.manifest import build_manifest
from rewrite.export.onnx_merged import export_merged
from rewrite.export.onnx_unmerged import export_unmerged
from rewrite.formats.manifest import write_manifest
from rewrite.graph_edit import adapters_at
from rewrite.options import ExportOptions
from rewrite.state import state_of

from helpers import edit_json, fill_adapter, fresh_capture, max_param_diff
from helpers import run_pass as run
from models import build

peft = pytest.importorskip("peft")

CASES = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "intermediate.dense"],
         "gpt2": ["c_attn", "mlp.c_proj"]}
RANK, KEY = 8, 7

pytestmark = pytest.mark.usefixtures("one_thread")


def _peft_model(name: str, *, save_projection: bool = True, targets: list[str] | None = None):
    config = peft.VeraConfig(r=RANK, target_modules=targets or CASES[name], projection_prng_key=KEY,
                             save_projection=save_projection, fan_in_fan_out=name == "gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # save_projection = false warns that the key must restore the projections
        model = peft.get_peft_model(build(name), config)
    return fill_adapter(model, {"vera_lambda_b": (0.0, 0.3), "vera_lambda_d": (0.0, 1.0)})


def _out(model, kwargs) -> torch.Tensor:
    """Every output tensor, flattened into one (logits; BERT's hidden states and pooler output)."""
    with torch.no_grad():
        return torch.cat([t.flatten() for t in flat_outputs(model(**kwargs))])


def _peft_lambdas(theirs) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for param_name, param in theirs.named_parameters():
        if "vera_lambda" in param_name:
            owner, _, rest = param_name.removeprefix("base_model.model.").partition(".vera_")
            out.setdefault(owner, {})["vera_" + rest.removesuffix(".default")] = param.detach()
    return out


def _modules(gm, adapter: str = "tuned") -> dict:
    owners = dict.fromkeys(s.owner for s in state_of(gm).sites.values())
    return {o: m for o in owners if (m := adapters_at(gm, o).get(adapter)) is not None}


def _ours(name: str, theirs):
    gm, kwargs = fresh_capture(name)
    run(gm, "insert", kind="vera", targets=CASES[name], rank=RANK, options={"projection_prng_key": KEY},
        adapter="tuned")
    modules = _modules(gm)
    for owner, tensors in _peft_lambdas(theirs).items():
        modules[owner].load_peft_state(tensors)
    return gm, kwargs


def _record(label: str, diff: float) -> float:
    print(f"\n[vera] {label}: max abs diff {diff:.3g}")  # shown with -s, for the record
    return diff


def _close(label: str, got: torch.Tensor, want: torch.Tensor, atol: float = 1e-5) -> None:
    diff = _record(label, float((got - want).abs().max()))
    assert diff <= atol, f"{label}: {diff}"


def _close_all(label: str, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    """Every tensor of `want` against the same-named one of `got`."""
    diff = _record(label, max(float((got[key] - tensor).detach().abs().max()) for key, tensor in want.items()))
    assert diff <= atol, f"{label}: {diff}"


def _assert_one_projection(gm, theirs) -> None:
    """Every site's module holds the same pair, equal bit for bit to PEFT's, listed once among the graph's buffers."""
    projections = {id(m.projection): m.projection for m in _modules(gm).values()}
    assert len(projections) == 1
    (projection,) = projections.values()
    assert torch.equal(projection.vera_A.T, theirs.base_model.vera_A["default"])
    assert torch.equal(projection.vera_B.T, theirs.base_model.vera_B["default"])
    names = [n.rpartition(".")[2] for n, _ in gm.named_buffers() if ".projection." in n]
    assert sorted(names) == ["vera_A", "vera_B"]


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_save_equal_peft(name, tmp_path):
    theirs = _peft_model(name)
    gm, kwargs = _ours(name, theirs)
    _assert_one_projection(gm, theirs)
    expected = _out(theirs, kwargs)
    assert (expected - _out(build(name), kwargs)).abs().max() > 1e-2  # the adapter matters
    _close(f"{name} forward vs PEFT", _out(gm, kwargs), expected)

    run(gm, "save", root=tmp_path, path="ours", adapter="tuned")
    theirs.save_pretrained(tmp_path / "theirs")
    saved, peft_saved = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
    assert saved.keys() == peft_saved.keys()  # the projections once, base_model.vera_A / vera_B, as PEFT keeps them
    assert sorted(k for k in saved if not k.startswith("base_model.model.")) == ["base_model.vera_A",
                                                                                "base_model.vera_B"]
    assert all(torch.equal(saved[k], peft_saved[k]) for k in saved)
    base = build(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    assert [str(w.message) for w in caught if "is_gradient_checkpointing" not in str(w.message)] == []
    _close(f"{name} PEFT loading our save vs PEFT", _out(again, kwargs), expected)


@pytest.mark.parametrize("name", list(CASES))
def test_merge_equals_merge_and_unload(name):
    theirs = _peft_model(name)
    gm, kwargs = _ours(name, theirs)
    expected = _out(theirs, kwargs)
    original = {n: p.detach().clone() for n, p in gm.named_parameters() if not n.startswith("adapters.")}
    run(gm, "merge", keep_original=True)
    assert _record(f"{name} merged weights vs merge_and_unload", max_param_diff(gm, theirs.merge_and_unload())) <= 1e-5
    _close(f"{name} merged forward vs PEFT", _out(gm, kwargs), expected)
    run(gm, "unmerge")
    _close_all(f"{name} weights after merge + unmerge", dict(gm.named_parameters()), original, atol=0.0)


def test_unmerge_subtracts_the_same_delta():
    theirs = _peft_model("llama")
    gm, _ = _ours("llama", theirs)
    weights = {owner: gm.get_parameter(f"{owner}.weight").detach().clone() for owner in _modules(gm)}
    work = {owner: weight.clone() for owner, weight in weights.items()}
    for owner, module in _modules(gm).items():
        module.merge_into(work[owner], None)
        assert (work[owner] - weights[owner]).abs().max() > 1e-3
        module.unmerge_from(work[owner], None)
    _close_all("llama merge_into then unmerge_from", work, weights)


@pytest.mark.filterwarnings("ignore:Specified to not save vera_A")
@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("name", list(CASES))
def test_load_reads_a_directory_peft_saved(name, save_projection, tmp_path):
    """With `save_projection = false` the directory has no projections: they are drawn from the key, as PEFT does."""
    theirs = _peft_model(name, save_projection=save_projection)
    theirs.save_pretrained(tmp_path / "peft")
    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    held = [k for k in saved if not k.startswith("base_model.model.")]
    assert len(held) == (2 if save_projection else 0)
    gm, kwargs = fresh_capture(name)
    result = run(gm, "load", root=tmp_path, path="peft", adapter="tuned")
    assert result.modified and result.stats["modules"] == len(_peft_lambdas(theirs))
    _assert_one_projection(gm, theirs)
    _close(f"{name} load vs PEFT", _out(gm, kwargs), _out(theirs, kwargs))
    assert not run(gm, "load", root=tmp_path, path="peft", adapter="tuned").modified


def test_load_into_an_inserted_adapter_takes_the_files_projections(tmp_path):
    theirs = _peft_model("llama")
    with torch.no_grad():
        theirs.base_model.vera_A["default"].mul_(2.0)  # no longer the key's draw: the file's tensors must win
    theirs.save_pretrained(tmp_path / "peft")
    gm, kwargs = fresh_capture("llama")
    run(gm, "insert", kind="vera", targets=CASES["llama"], rank=RANK, options={"projection_prng_key": KEY},
        adapter="tuned")
    assert run(gm, "load", root=tmp_path, path="peft", adapter="tuned").modified
    _assert_one_projection(gm, theirs)
    _close("llama load into insert vs PEFT", _out(gm, kwargs), _out(theirs, kwargs))


def _export_ready(targets: list[str], rank: int = RANK):
    gm, kwargs = fresh_capture("llama")
    run(gm, "insert", kind="vera", targets=targets, rank=rank, adapter="tuned", allow_large_rank=True)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in _modules(gm).values():
            module.vera_lambda_b.copy_(0.3 * torch.randn(module.vera_lambda_b.shape, generator=generator))
    return gm, kwargs


@pytest.mark.slow
def test_merged_onnx_equals_torch(tmp_path):
    gm, _ = _export_ready(CASES["llama"])
    run(gm, "merge")
    export_merged(gm, tmp_path / "model.onnx", ExportOptions())
    names = [t.name for t in onnx.load(str(tmp_path / "model.onnx")).graph.initializer]
    assert not [n for n in names if "vera" in n or "adapters." in n]
    assert _record("llama merged ONNX Runtime vs torch", check_merged(gm, tmp_path / "model.onnx")) <= 1e-4


@pytest.mark.slow
def test_live_onnx_holds_the_projections_once(tmp_path):
    """The graph exported with its VeRA branches live: one vera_A and one vera_B initializer for four sites.
    Rank 80 makes each projection larger than the 8192 elements under which ONNX's optimizer folds the constant
    slices of every site into constants of their own (real models' projections are far larger)."""
    gm, kwargs = _export_ready(["q_proj", "v_proj", "up_proj", "down_proj"], rank=80)
    assert (_out(gm, kwargs) - _out(build("llama"), kwargs)).abs().max() > 1e-2
    export_merged(gm, tmp_path / "model.onnx", ExportOptions())
    names = [t.name for t in onnx.load(str(tmp_path / "model.onnx")).graph.initializer]
    assert [n.rpartition(".")[2] for n in names if "projection" in n] == ["vera_A", "vera_B"]
    assert _record("llama live ONNX Runtime vs torch", check_merged(gm, tmp_path / "model.onnx")) <= 1e-4


@pytest.mark.slow
def test_unmerged_bank_export_equals_torch(tmp_path):
    gm, _ = _export_ready(CASES["llama"])
    entry = export_unmerged(gm, tmp_path, ExportOptions(mode="unmerged", switching="bank"))
    write_manifest(tmp_path / "manifest.json", build_manifest(gm, source="llama", exports=[entry]))
    sites = json.loads((tmp_path / "manifest.json").read_text())["adapters"]
    assert {a["kind"] for a in sites} == {"vera"} and {a["rank"] for a in sites} == {RANK}
    assert _record("llama unmerged bank ONNX Runtime vs torch", check_unmerged(gm, tmp_path, ["tuned"])) <= 1e-4


def test_rank_is_fixed():
    gm, _ = fresh_capture("llama")
    run(gm, "insert", kind="vera", targets=CASES["llama"], rank=RANK)
    with pytest.raises(SpecError, match=r"\['vera'\]"):
        run(gm, "allocate", budget={"fraction": 0.5})
    with pytest.raises(NotSupported, match="vera adapters share one frozen projection of rank 8"):
        next(iter(_modules(gm, "default").values())).resize(4)


def test_insert_shares_one_projection_across_entries():
    """A later entry of the same adapter must fit the projection the first drew; rank and key are one per adapter."""
    gm, _ = fresh_capture("llama")
    run(gm, "insert", kind="vera", targets=["down_proj"], rank=RANK, adapter="tuned")
    run(gm, "insert", kind="vera", targets=["q_proj"], rank=RANK, adapter="tuned", where="spec.toml:9")
    assert len({id(m.projection) for m in _modules(gm).values()}) == 1
    assert not run(gm, "insert", kind="vera", targets=["down_proj"], rank=RANK, adapter="tuned").modified
    gm, _ = fresh_capture("llama")
    run(gm, "insert", kind="vera", targets=["q_proj"], rank=RANK, adapter="tuned")
    with pytest.raises(SpecError, match=r"drawn for the sites it was made on; these need d_in=128"):
        run(gm, "insert", kind="vera", targets=["down_proj"], rank=RANK, adapter="tuned", where="spec.toml:9")
    gm, _ = fresh_capture("llama")
    with pytest.raises(SpecError, match=r"all need one rank and projection_prng_key; got \(rank, key\) \[\(4, 0\), "
                                        r"\(8, 0\)\]"):
        run(gm, "insert", kind="vera", targets=CASES["llama"], rank=RANK, rank_pattern={"*.v_proj": 4})


def test_meta_sites_share_a_meta_projection():
    """A meta-device capture (no weights) gets the projection's shapes without drawing anything."""
    modules = {name: VeRA("linear", d_in, d_out, RANK, device="meta") for name, d_in, d_out in
               (("q_proj", 64, 64), ("v_proj", 64, 32), ("down_proj", 128, 64))}
    assert VeRA.share(modules, {}) and not VeRA.share(modules, {})
    projection = modules["q_proj"].projection
    assert projection.vera_A.is_meta and tuple(projection.vera_A.shape) == (128, RANK)
    assert tuple(projection.vera_B.shape) == (RANK, 64)
    assert all(m.projection is projection for m in modules.values())


def _edited(directory, config: dict | None = None, drop: tuple[str, ...] = (), scale_a: bool = False) -> None:
    edit_json(directory / "adapter_config.json", **(config or {}))
    weights = directory / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(weights).items() if k not in drop}
    if scale_a:
        tensors["base_model.vera_A"] = tensors["base_model.vera_A"][:, :64].contiguous()
    save_file(tensors, weights)


@pytest.mark.parametrize("edit,message", [
    (dict(config={"bias": "all"}), r"'bias' is 'all'; expected \"none\" \(trained base biases"),
    (dict(config={"modules_to_save": ["lm_head"]}), r"'modules_to_save' = \['lm_head'\] names 'lm_head' of this model, "
     r"but adapter_model.safetensors has no copy"),
    (dict(config={"projection_prng_key": -1}), r"'projection_prng_key' is -1; expected a whole number >= 0"),
    (dict(drop=("base_model.vera_B",)), r"'save_projection' = true, but the file holds \['vera_A'\] projections"),
    (dict(config={"save_projection": False}), r"'save_projection' = false, but the file holds \['vera_A', 'vera_B'\]"),
    (dict(scale_a=True), r"vera_A \(8, 64\).*PEFT builds them for the largest site: \[8, 128\] and \[64, 8\]"),
])
def test_bad_directories_are_refused_by_name(tmp_path, edit, message):
    _peft_model("llama").save_pretrained(tmp_path / "peft")
    _edited(tmp_path / "peft", **edit)
    gm, _ = fresh_capture("llama")
    with pytest.raises(AdapterFileError, match=message):
        run(gm, "load", root=tmp_path, path="peft", adapter="tuned")
    assert not _modules(gm)
