"""`insert` with kind = "svd_lora" (AdaLoRA's SVD form) and what follows it: merge, unmerge, save, load, export.

Model: conv2d -> mean -> Linear -> ReLU -> Linear, plus an Embedding, captured with torch.fx; and the same
with a GPT-2 Conv1D as the last layer, captured with torch.export (which finds Conv1D sites; its conv2d
site is not adapted there: insert reads conv settings from the module, which torch.export does not keep).
Oracle: the eager model with forward hooks adding the hand-written delta of every site,

    y = W x + c * P diag(lam) Q x,   c = alpha / (r + 1e-5)     (conv2d: the same matrix as a kernel)

and, for merge, the hand-written weights W + c P diag(lam) Q in each op's own layout; PEFT loads what `save`
writes; ONNX Runtime runs both exports.
"""
from __future__ import annotations

import copy
import functools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn
from transformers.pytorch_utils import Conv1D

from rewrite.adapters.lora import LoRA
from rewrite.adapters.svd_lora import SvdLoRA
from rewrite.capture import capture
from rewrite.errors import AdapterFileError, ExportError, SpecError
from rewrite.graph_edit import adapters_at
from rewrite.inputs import ExampleInputs
from rewrite.load import LoadedModel
from rewrite.passes import REGISTRY

from helpers import run_pass

RANK, ALPHA = 3, 6.0
CASES = {"fx": ("fx", ["conv", "fc", "proj"]), "export-conv1d": ("export", ["fc", "proj"])}

pytestmark = pytest.mark.usefixtures("one_thread")


class Mixed(nn.Module):
    def __init__(self, conv1d: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, kernel_size=3, padding=1)
        self.embed = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 16)
        self.proj = Conv1D(8, 16) if conv1d else nn.Linear(16, 8)  # Conv1D: weight [16 in, 8 out]

    def forward(self, x, ids):
        h = self.conv(x).mean(dim=(2, 3)) + self.embed(ids).mean(dim=1)
        return self.proj(torch.relu(self.fc(h)))


@pytest.fixture(scope="module", params=list(CASES))
def base(request):
    frontend, sites = CASES[request.param]
    torch.manual_seed(0)
    model = Mixed(conv1d=frontend == "export").eval()
    g = torch.Generator().manual_seed(1)
    kwargs = {"x": torch.randn(2, 3, 6, 6, generator=g), "ids": torch.randint(0, 10, (2, 5), generator=g)}
    gm, _ = capture(LoadedModel(model, None, "factory", "mixed", None),
                    ExampleInputs(kwargs, {"x": [None] * 4, "ids": [None, None]}), frontend=frontend)
    return model, gm, kwargs, sites


run = functools.partial(run_pass, where="spec.toml:4", keys=True)


def inserted(base, sites=None, seed: int = 2):
    """insert svd_lora at `sites` (default: the case's), then random P, lam, Q (lam = 0 is the identity)."""
    sites = sites or base[3]
    gm = copy.deepcopy(base[1])
    run(gm, "insert", kind="svd_lora", targets=sites, rank=RANK, alpha=ALPHA)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for owner in sites:
            module = adapters_at(gm, owner)["default"]
            for param in (module.Q[0], module.E[0], module.P[0]):
                param.copy_(torch.randn(param.shape, generator=g) * 0.5)
    return gm


def factors(gm, owner: str):
    m = adapters_at(gm, owner)["default"]
    return m.P[0].detach(), m.E[0].detach().view(-1), m.Q[0].detach(), ALPHA / (RANK + 1e-5)


def delta_matrix(gm, owner: str) -> torch.Tensor:
    """c P diag(lam) Q as [d_out, fan_in]."""
    p, lam, q, c = factors(gm, owner)
    return c * p @ torch.diag(lam) @ q


def oracle(model: nn.Module, gm, kwargs) -> torch.Tensor:
    """The eager model with hooks adding each site's delta, written from the formula."""
    def linear_hook(owner):
        return lambda mod, args, out: out + args[0] @ delta_matrix(gm, owner).T

    def conv_hook(mod, args, out):
        kernel = delta_matrix(gm, "conv").view_as(mod.weight)
        return out + F.conv2d(args[0], kernel, None, mod.stride, mod.padding, mod.dilation)

    hooks = {"conv": conv_hook, "fc": linear_hook("fc"), "proj": linear_hook("proj")}
    handles = [model.get_submodule(o).register_forward_hook(hook) for o, hook in hooks.items()
               if "default" in adapters_at(gm, o)]
    try:
        with torch.no_grad():
            return model(**kwargs)
    finally:
        for handle in handles:
            handle.remove()


def adapter_nodes(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith("adapters.")]


def test_insert_svd_lora_is_the_identity_then_the_formula(base):
    model, captured, kwargs, sites = base
    gm = copy.deepcopy(captured)
    result = run(gm, "insert", kind="svd_lora", targets=sites, rank=RANK, alpha=ALPHA)
    assert result.modified and result.stats["sites"] == len(sites) == result.stats["adapters"]
    assert adapter_nodes(gm) == [f"adapters.{o}.default" for o in sites]
    assert sum(n.op == "call_function" and "add" in str(n.target) for n in gm.graph.nodes) == \
        sum(n.op == "call_function" and "add" in str(n.target) for n in captured.graph.nodes) + len(sites)
    modules = {o: adapters_at(gm, o)["default"] for o in sites}
    assert all(isinstance(m, SvdLoRA) and m.rank == RANK and m.scaling == ALPHA / (RANK + 1e-5)
               for m in modules.values())
    assert torch.equal(gm(**kwargs), captured(**kwargs))  # lam = 0
    gm = inserted(base)
    torch.testing.assert_close(gm(**kwargs), oracle(model, gm, kwargs), rtol=1e-5, atol=1e-5)
    assert (gm(**kwargs) - captured(**kwargs)).abs().max() > 1e-2


def test_selectors_idempotence_and_bad_input(base):
    gm = copy.deepcopy(base[1])
    run(gm, "insert", kind="svd_lora", targets=base[3], rank=RANK)
    code = gm.code
    assert run(gm, "insert", kind="svd_lora", targets=base[3], rank=RANK).modified is False and gm.code == code
    with pytest.raises(SpecError, match=r"selector 'fcc' matches no site.*fc"):
        run(copy.deepcopy(base[1]), "insert", kind="svd_lora", targets=["fcc"])
    with pytest.raises(SpecError, match=r"spec.toml:4 \(targets\): kind = \"svd_lora\" adapts linear, conv1d, "
                                        r"conv2d sites; \['embed'\] are embedding"):
        run(copy.deepcopy(base[1]), "insert", kind="svd_lora", targets=["embed", "fc"])
    with pytest.raises(ValidationError, match="kind = \"svd_lora\" does not read rslora"):
        REGISTRY["insert"].Options(kind="svd_lora", targets=["fc"], rslora=True)
    with pytest.raises(ValidationError, match="init = 'gaussian': kind = \"svd_lora\" starts from zeros"):
        REGISTRY["insert"].Options(kind="svd_lora", targets=["fc"], init="gaussian")


def test_merge_folds_the_hand_written_delta_and_unmerge_restores(base):
    model, captured, kwargs, sites = base
    gm = inserted(base)
    want = oracle(model, gm, kwargs)
    deltas = {o: delta_matrix(gm, o) for o in sites}
    result = run(gm, "merge", keep_original=True)
    assert result.modified and result.stats["merged"] == len(sites) and adapter_nodes(gm) == []
    w = {o: gm.get_parameter(f"{o}.weight").detach() for o in sites}
    torch.testing.assert_close(w["fc"], model.fc.weight + deltas["fc"], rtol=1e-5, atol=1e-6)
    layout = deltas["proj"].T if isinstance(model.proj, Conv1D) else deltas["proj"]  # Conv1D: [in, out]
    torch.testing.assert_close(w["proj"], model.proj.weight + layout, rtol=1e-5, atol=1e-6)
    if "conv" in sites:
        torch.testing.assert_close(w["conv"], model.conv.weight + deltas["conv"].view_as(model.conv.weight),
                                   rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gm(**kwargs), want, rtol=1e-5, atol=1e-5)
    assert run(gm, "merge").modified is False
    assert run(gm, "unmerge").modified
    assert all(torch.equal(gm.get_parameter(f"{o}.weight"), model.get_submodule(o).weight) for o in sites)
    assert adapter_nodes(gm) == [f"adapters.{o}.default" for o in sites]
    torch.testing.assert_close(gm(**kwargs), want, rtol=1e-5, atol=1e-5)


def test_save_writes_the_same_delta_as_plain_lora_for_peft_and_for_us(base, tmp_path):
    import peft

    model, captured, kwargs, sites = base
    gm = inserted(base)
    want = oracle(model, gm, kwargs)
    run(gm, "save", tmp_path, path="peft_dir")
    run(gm, "save", tmp_path, path="ours.safetensors", format="rewrite")
    config = json.loads((tmp_path / "peft_dir" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == RANK and config["lora_alpha"] == ALPHA
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "peft_dir").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**kwargs), want, rtol=1e-4, atol=1e-5)
    for source in ("peft_dir", "ours.safetensors"):
        fresh = copy.deepcopy(captured)
        assert run(fresh, "load", tmp_path, path=source).modified
        assert all(isinstance(adapters_at(fresh, o)["default"], LoRA) for o in sites)
        torch.testing.assert_close(fresh(**kwargs), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(AdapterFileError, match=f"{sites[0]} \\(kind 'svd_lora' there, 'lora' in the file\\)"):
        run(gm, "load", tmp_path, path="peft_dir")


def test_merged_and_unmerged_onnx_match_the_graph(base, tmp_path):
    import onnxruntime as ort

    from rewrite.check import check_unmerged
    from rewrite.export.manifest import build_manifest
    from rewrite.export.onnx_merged import export_merged
    from rewrite.export.onnx_unmerged import export_unmerged
    from rewrite.formats.manifest import MANIFEST, write_manifest
    from rewrite.options import ExportOptions

    model, captured, kwargs, sites = base
    gm = inserted(base)
    want = oracle(model, gm, kwargs).numpy()
    out = tmp_path / "unmerged"
    out.mkdir()
    if "conv" in sites:
        with pytest.raises(ExportError, match="conv2d sites must be merged"):  # as for LoRA
            export_unmerged(gm, out, ExportOptions(mode="unmerged", switching="bank", external_data="never"))
    linear = inserted(base, sites=["fc", "proj"])
    entry = export_unmerged(linear, out, ExportOptions(mode="unmerged", switching="bank", external_data="never"))
    assert [(s.site, s.rank) for s in entry.sites] == [("fc", RANK), ("proj", RANK)]
    write_manifest(out / MANIFEST, build_manifest(linear, source="test", exports=[entry]))
    assert check_unmerged(linear, out, ["default"]) <= 1e-5
    merged = copy.deepcopy(gm)
    run(merged, "merge")
    export_merged(merged, tmp_path / "merged.onnx", ExportOptions(), None)
    session = ort.InferenceSession(str(tmp_path / "merged.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in kwargs.items()})[0]
    assert np.abs(got - want).max() <= 1e-4


def test_allocate_refuses_svd_form_for_training_free_scorers(base):
    gm = inserted(base)
    with pytest.raises(SpecError, match=r"scorer = 'spectrum' resizes adapters freely; adapter 'default' is "
                                        r"\['svd_lora'\]"):
        run(gm, "allocate", scorer="spectrum", targets=["fc", "proj"], budget={"params": 10}, report="")
    assert all(isinstance(adapters_at(gm, o)["default"], SvdLoRA) for o in base[3])
