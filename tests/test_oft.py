"""OFT against Hugging Face PEFT's OFT on the same weights: forward, saved and loaded directories, merge, ONNX.

Oracle: `peft.get_peft_model(model, OFTConfig(...))` with random (non-identity) skew parameters, copied into our
modules. On a tiny LLaMA (GQA decoder) and a tiny BERT (encoder, biases everywhere); PEFT has no OFT for GPT-2's
Conv1D. The helpers here (`Oracle`) serve tests/test_boft.py too.
"""
from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from rewrite.adapters import KINDS
from rewrite.errors import AdapterFileError, SpecError
from rewrite.export.onnx_merged import export_merged
from rewrite.graph_edit import adapters_at
from rewrite.options import ExportOptions
from rewrite.state import state_of

from helpers import capture_hf
from helpers import run_pass as run
from models import build

peft = pytest.importorskip("peft")

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "output.dense"]}
MAX_DIFF: dict[str, float] = {}  # what the assertions measured, printed at the end of the module


def first_output(model, kwargs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits (LLaMA) or the last hidden state (BERT)."""
    with torch.no_grad():
        return model(**kwargs)[0]


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float = 1e-5) -> None:
    diff = float((got.detach().double() - want.detach().double()).abs().max())
    MAX_DIFF[name] = max(MAX_DIFF.get(name, 0.0), diff)
    assert diff <= atol, f"{name}: max abs diff {diff:.3g} > {atol:g}"


def capture_cache():
    """get(name) -> (a copy of the model's capture, its example inputs); one capture per model."""
    cache = {}

    def get(name: str):
        if name not in cache:
            _, gm, kwargs = capture_hf(name)
            cache[name] = (gm, kwargs)
        gm, kwargs = cache[name]
        return copy.deepcopy(gm), kwargs
    return get


def oracle_fixtures():
    """A PEFT-oracle test module's fixtures: `report_max_diffs` (autouse: prints what was measured) and `captured`."""
    @pytest.fixture(scope="module", autouse=True)
    def report_max_diffs():
        yield
        print("\n" + "\n".join(f"max abs diff {name}: {diff:.3g}" for name, diff in sorted(MAX_DIFF.items())))
        MAX_DIFF.clear()

    @pytest.fixture(scope="module")
    def captured():
        return capture_cache()
    return report_max_diffs, captured


report_max_diffs, captured = oracle_fixtures()


@dataclass
class Oracle:
    """A PEFT model of one kind with random adapter weights, and our graph carrying the same weights."""

    kind: str
    config: object  # a PEFT config
    options: dict  # our insert options for the same adapter

    def peft_model(self, name: str, seed: int = 3):
        model = peft.get_peft_model(build(name), copy.deepcopy(self.config))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, param in self.peft_params(model):
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
        return model.eval()

    def peft_params(self, model):
        """(owner, suffix, parameter) of every adapter tensor of a PEFT model, suffix as saved (no adapter name)."""
        for param_name, param in model.named_parameters():
            path = param_name.removeprefix("base_model.model.").replace(".default", "")
            suffix = next((s for s in KINDS[self.kind].peft_format.suffixes if path.endswith("." + s)), None)
            if suffix is not None:
                yield (path.removesuffix("." + suffix), suffix), param

    def ours(self, captured, name: str, theirs, adapter: str = "tuned"):
        """Our graph with the adapter inserted on the same targets and PEFT's tensors copied in."""
        gm, kwargs = captured(name)
        run(gm, "insert", kind=self.kind, targets=TARGETS[name], adapter=adapter, options=self.options)
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        for (owner, suffix), param in self.peft_params(theirs):
            tensors.setdefault(owner, {})[suffix] = param.detach()
        for owner, parts in tensors.items():
            adapters_at(gm, owner)[adapter].load_peft_state(parts)
        return gm, kwargs


def check_forward(oracle: Oracle, captured, name: str, label: str) -> None:
    theirs = oracle.peft_model(name)
    gm, kwargs = oracle.ours(captured, name, theirs)
    want = first_output(theirs, kwargs)
    assert (want - first_output(build(name), kwargs)).abs().max() > 1e-2  # the adapter changes the outputs
    assert_close(f"{label} forward vs PEFT", first_output(gm, kwargs), want)


def check_save_and_load(oracle: Oracle, captured, name: str, tmp_path, label: str) -> None:
    theirs = oracle.peft_model(name)
    gm, kwargs = oracle.ours(captured, name, theirs)
    want = first_output(theirs, kwargs)
    run(gm, "save", root=tmp_path, path="ours", adapter="tuned")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = peft.PeftModel.from_pretrained(build(name), tmp_path / "ours").eval()
    assert [str(w.message) for w in caught if "peft" in w.filename] == []
    assert_close(f"{label} our save, PEFT from_pretrained", first_output(again, kwargs), want)

    theirs.save_pretrained(tmp_path / "peft")
    loaded, _ = captured(name)
    result = run(loaded, "load", root=tmp_path, path="peft", adapter="tuned")
    assert result.modified and result.stats["modules"] == len(list(oracle.peft_params(theirs))) // len(
        KINDS[oracle.kind].peft_format.suffixes)
    assert_close(f"{label} PEFT save_pretrained, our load", first_output(loaded, kwargs), want)
    assert not run(loaded, "load", root=tmp_path, path="peft", adapter="tuned").modified


def check_load_then_save(oracle: Oracle, captured, tmp_path, label: str):
    """PEFT's directory -> our load -> our save -> PEFT, equal outputs throughout (configs insert cannot write)."""
    theirs = oracle.peft_model("llama")
    theirs.save_pretrained(tmp_path / "peft")
    gm, kwargs = captured("llama")
    run(gm, "load", root=tmp_path, path="peft", adapter="tuned")
    want = first_output(theirs, kwargs)
    assert_close(f"{label} PEFT save_pretrained, our load", first_output(gm, kwargs), want)
    run(gm, "save", root=tmp_path, path="ours", adapter="tuned")
    again = peft.PeftModel.from_pretrained(build("llama"), tmp_path / "ours").eval()
    assert_close(f"{label} our save, PEFT from_pretrained", first_output(again, kwargs), want)
    return gm


def check_merge(oracle: Oracle, captured, name: str, label: str) -> None:
    theirs = oracle.peft_model(name)
    gm, kwargs = oracle.ours(captured, name, theirs)
    want = first_output(theirs, kwargs)
    before = {n: p.detach().clone() for n, p in gm.named_parameters() if not n.startswith("adapters.")}
    merged = copy.deepcopy(gm)
    run(merged, "merge", keep_original=True)
    folded = dict(theirs.merge_and_unload().named_parameters())
    ours = dict(merged.named_parameters())
    assert ours.keys() == folded.keys()
    for param_name, param in folded.items():
        assert_close(f"{label} merged weights vs PEFT merge_and_unload", ours[param_name], param)
    assert_close(f"{label} merged forward vs PEFT", first_output(merged, kwargs), want)
    run(merged, "unmerge")
    for param_name, param in before.items():
        assert torch.equal(dict(merged.named_parameters())[param_name], param)
    for owner, module in ((o, m["tuned"]) for o in owners(gm) if (m := adapters_at(gm, o))):
        weight = gm.get_parameter(f"{owner}.weight").detach().clone()
        module.merge_into(weight, None)
        assert (weight - before[f"{owner}.weight"]).abs().max() > 1e-3
        module.unmerge_from(weight, None)
        assert_close(f"{label} merge_into then unmerge_from vs the original weight", weight, before[f"{owner}.weight"])


def owners(gm) -> list[str]:
    return list(dict.fromkeys(s.owner for s in state_of(gm).sites.values()))


def check_onnx(oracle: Oracle, captured, tmp_path, label: str) -> None:
    """Merged ONNX run by ONNX Runtime equals torch (and PEFT). Unmerged exports switch these kinds per row:
    tests/test_multiplicative_unmerged.py (OFT, BOFT, HRA), tests/test_rowwise_kinds.py (the elementwise kinds)."""
    import onnxruntime as ort

    theirs = oracle.peft_model("llama")
    gm, kwargs = oracle.ours(captured, "llama", theirs)
    run(gm, "merge")
    export_merged(gm, tmp_path / "merged.onnx", ExportOptions(), None)
    session = ort.InferenceSession(str(tmp_path / "merged.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    got = torch.from_numpy(np.asarray(session.run(None, {k: kwargs[k].numpy() for k in names})[0]))
    assert_close(f"{label} merged ONNX Runtime vs torch", got, first_output(gm, kwargs), atol=1e-4)
    assert_close(f"{label} merged ONNX Runtime vs PEFT", got, first_output(theirs, kwargs), atol=1e-4)


def check_allocate_refuses(oracle: Oracle, captured) -> None:
    gm, _ = oracle.ours(captured, "llama", oracle.peft_model("llama"), adapter="default")
    with pytest.raises(SpecError, match=rf"allocate resizes adapters freely; adapter 'default' is \['{oracle.kind}'\] "
                                        r"at \['model.layers.0.self_attn.q_proj'.*which cannot be: it resizes lora.* "
                                        r"adapters; kinds without a rank have none to allocate"):
        run(gm, "allocate", budget={"fraction": 0.5}, report="")


def write_config(directory, **changes) -> None:
    config_file = directory / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **changes}))


def check_refuses_config(oracle: Oracle, captured, tmp_path, key: str, value, message: str) -> None:
    oracle.peft_model("llama").save_pretrained(tmp_path / "peft")
    write_config(tmp_path / "peft", **{key: value})
    gm, _ = captured("llama")
    with pytest.raises(AdapterFileError, match=message):
        run(gm, "load", root=tmp_path, path="peft")


# ------------------------------------------------------------------------------------------------------ OFT

VARIANTS = {  # PEFT's OFTConfig fields, our insert options
    "default": ({}, {}),
    "block_16": ({"oft_block_size": 16}, {"block_size": 16}),
    "exact_cayley": ({"oft_block_size": 16, "use_cayley_neumann": False}, {"block_size": 16,
                                                                           "use_cayley_neumann": False}),
    "block_share": ({"oft_block_size": 8, "block_share": True}, {"block_size": 8, "block_share": True}),
    "3_terms": ({"oft_block_size": 8, "num_cayley_neumann_terms": 3}, {"block_size": 8,
                                                                       "num_cayley_neumann_terms": 3}),
    "r_4": ({"r": 4, "oft_block_size": 0}, None),
}


def oft(name: str, variant: str = "default") -> Oracle:
    fields, options = VARIANTS[variant]
    return Oracle("oft", peft.OFTConfig(target_modules=TARGETS[name], **fields), options)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_forward_equals_peft(captured, name):
    check_forward(oft(name), captured, name, f"oft {name}")


@pytest.mark.parametrize("variant", ["block_16", "exact_cayley", "block_share", "3_terms"])
def test_forward_equals_peft_for_each_option(captured, variant):
    check_forward(oft("llama", variant), captured, "llama", f"oft {variant}")


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_save_and_load_round_trip_through_peft(captured, name, tmp_path):
    check_save_and_load(oft(name), captured, name, tmp_path, f"oft {name}")


def test_load_reads_block_counts_and_shared_blocks(captured, tmp_path):
    """PEFT's `r` (blocks per layer) instead of a block size, and one block shared, both saved and loaded."""
    gm = check_load_then_save(oft("llama", "r_4"), captured, tmp_path, "oft r = 4")
    sizes = {adapters_at(gm, o)["tuned"].block_size for o in owners(gm) if adapters_at(gm, o)}
    assert sizes == {16, 32}  # 64 / 4 (q_proj, v_proj), 128 / 4 (down_proj)
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (saved["r"], saved["oft_block_size"]) == (4, 0)
    check_save_and_load(oft("llama", "block_share"), captured, "llama", tmp_path / "shared", "oft block_share")


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_merge_equals_merge_and_unload_and_unmerge_restores(captured, name):
    check_merge(oft(name), captured, name, f"oft {name}")


def test_merged_onnx_equals_torch(captured, tmp_path):
    check_onnx(oft("llama", "block_16"), captured, tmp_path, "oft")


def test_allocate_refuses_by_name(captured):
    check_allocate_refuses(oft("llama"), captured)
    assert not KINDS["oft"].resizable


@pytest.mark.parametrize("key,value,message", [
    ("coft", True, r"'coft' is set; coft \(constrained OFT.*\) is not supported for OFT adapters"),
    ("bias", "all", r"'bias' is 'all'; expected \"none\""),
    ("peft_version", "0.17.0", r"'peft_version' = '0.17.0' with use_cayley_neumann = true: PEFT before 0.18"),
    ("oft_block_size", None, r"no 'oft_block_size': an OFT adapter of PEFT < 0.14"),
    ("r", 2, r"'r' = 2 and 'oft_block_size' = 32; PEFT sets exactly one of them"),
])
def test_load_refuses_what_it_does_not_implement(captured, tmp_path, key, value, message):
    check_refuses_config(oft("llama"), captured, tmp_path, key, value, message)


def test_insert_refuses_a_block_size_that_does_not_tile_the_input(captured):
    gm, _ = captured("llama")
    with pytest.raises(SpecError, match=r"spec.toml:3: model.layers.0.self_attn.q_proj: oft: block_size = 48 does "
                                        r"not divide this site's input size 64"):
        run(gm, "insert", kind="oft", targets=["q_proj"], options={"block_size": 48})
    with pytest.raises(ValueError, match=r'kind = "oft" does not read dropout'):
        run(gm, "insert", kind="oft", targets=["q_proj"], dropout=0.1)


def test_save_refuses_what_one_peft_config_cannot_hold(captured, tmp_path):
    gm, _ = captured("llama")
    run(gm, "insert", kind="oft", targets=["q_proj"], adapter="mixed", options={"block_size": 8}, where="spec.toml:3")
    run(gm, "insert", kind="oft", targets=["down_proj"], adapter="mixed", where="spec.toml:7")
    with pytest.raises(AdapterFileError, match=r"one PEFT OFT config gives all its modules one block size or one "
                                               r"block count; this adapter has blocks \[4, 8\]"):
        run(gm, "save", root=tmp_path, path="mixed", adapter="mixed")
