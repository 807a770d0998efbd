"""Several adapter kinds on one model, against PEFT's `PeftMixedModel` (LoRA, LoHa, LoKr and OFT: the tuners of ours
it mixes; its `from_pretrained` refuses OFT, so the mixed model starts from OFT's config and takes the saved weights).

Each adapter is made by PEFT itself with non-identity weights (`init_lora_weights=False` / `init_weights=False`;
OFT starts at the identity and is perturbed), saved as its own PEFT directory, and loaded twice: into one `PeftMixedModel` with every
adapter active (the oracle), and by our `load` pass, one entry per directory. The adapters overlap: q_proj carries
LoRA and LoHa, down_proj OFT (it rotates the input) and LoKr, so two kinds sit on one site as well as side by side.
PEFT nests the layers of a mixed model in the order adapters are added (each wraps the previous), so what an
input-side kind does to the others at its site depends on that order; ours is defined: it rotates the input of the
base op only, and the other adapters read the site's own x (`rewrite.graph_edit.wire`). That is PEFT's mix with OFT
added first (innermost), the order used here. Checked on the tiny LLaMA (GQA decoder) and BERT (encoder):
- the forward equals PEFT's mixed forward (fp32, <= 1e-5), and each adapter changes it (the check can fail);
- `merge` equals PEFT's `merge_and_unload()` (weights and outputs), and the merged ONNX export equals torch;
- an unmerged bank export of the switchable kinds (LoRA, LoHa), the others merged first, serves each of them
  equal to PEFT with that one and the merged ones active.
"""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

from rewrite.check import check_unmerged
from rewrite.export.manifest import build_manifest
from rewrite.export.onnx_unmerged import export_unmerged
from rewrite.formats.manifest import MANIFEST, write_manifest
from rewrite.options import ExportOptions

from helpers import first_output, fresh_capture, max_param_diff, merged_onnx_output
from helpers import run_pass as run
from models import build

peft = pytest.importorskip("peft")

ATOL = 1e-5
TARGETS = {
    "llama": dict(oft=["down_proj", "k_proj"], lora=["q_proj", "v_proj"], loha=["q_proj", "up_proj"],
                  lokr=["o_proj", "down_proj"]),
    "bert": dict(oft=["output.dense", "key"], lora=["query", "value"], loha=["query", "intermediate.dense"],
                 lokr=["attention.output.dense", "output.dense"]),
}


def configs(name: str) -> dict[str, object]:
    t = TARGETS[name]
    return {"oft": peft.OFTConfig(r=0, oft_block_size=8, target_modules=t["oft"]),
            "lora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=t["lora"], init_lora_weights=False),
            "loha": peft.LoHaConfig(r=2, alpha=3, target_modules=t["loha"], init_weights=False),
            "lokr": peft.LoKrConfig(r=2, alpha=4, target_modules=t["lokr"], init_weights=False)}


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """OFT starts at the identity rotation; move its parameters off it."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "oft_" in name:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))


@pytest.fixture(scope="module", params=list(TARGETS))
def case(request, tmp_path_factory):
    """(model name, {adapter: PEFT directory}, the PeftMixedModel with every adapter active, example inputs)."""
    name = request.param
    root = tmp_path_factory.mktemp(f"mixed-{name}")
    dirs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made = {}
        for seed, (adapter, config) in enumerate(configs(name).items()):
            torch.manual_seed(seed)
            made[adapter] = peft.get_peft_model(build(name), config)
            _perturb(made[adapter], seed)
            made[adapter].save_pretrained(root / adapter)
            dirs[adapter] = root / adapter
        mixed = peft.PeftMixedModel(build(name), configs(name)["oft"], adapter_name="oft")
        oft = {k.replace(".default.", ".oft."): v for k, v in made["oft"].state_dict().items() if "oft_" in k}
        missing, unexpected = mixed.load_state_dict(oft, strict=False)
        assert not unexpected and not [k for k in missing if "oft_" in k]
        for adapter in list(dirs)[1:]:
            mixed.load_adapter(dirs[adapter], adapter_name=adapter)
        mixed.set_adapter(list(dirs))
    _, kwargs = fresh_capture(name)
    return name, dirs, mixed.eval(), kwargs


def ours(name: str, dirs: dict) -> torch.fx.GraphModule:
    gm, _ = fresh_capture(name)
    for adapter, directory in dirs.items():
        run(gm, "load", path=str(directory), adapter=adapter)
    return gm


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def test_mixed_forward_equals_peft_mixed_model(case):
    name, dirs, mixed, kwargs = case
    gm = ours(name, dirs)
    want = first_output(mixed, kwargs)
    assert diff(first_output(gm, kwargs), want) <= ATOL
    base = first_output(build(name), kwargs)
    for adapter in dirs:  # every adapter matters: without it, the output differs
        alone = ours(name, {a: d for a, d in dirs.items() if a != adapter})
        assert diff(first_output(alone, kwargs), want) > 1e-3, adapter
    assert diff(want, base) > 1e-3


@pytest.mark.slow
def test_mixed_merge_equals_merge_and_unload_and_onnx(case, tmp_path):
    name, dirs, mixed, kwargs = case
    gm = ours(name, dirs)
    run(gm, "merge")
    folded = copy.deepcopy(mixed).merge_and_unload()
    assert max_param_diff(gm, folded) <= ATOL
    want = first_output(folded, kwargs)
    assert diff(first_output(gm, kwargs), want) <= ATOL
    assert diff(merged_onnx_output(gm, kwargs, tmp_path / "merged.onnx"), want) <= 1e-4


@pytest.mark.slow
def test_switchable_kinds_stay_switchable_beside_merged_ones(case, tmp_path):
    """OFT and LoKr merged into the weights; LoRA and LoHa exported into one bank, each per row."""
    name, dirs, mixed, kwargs = case
    gm = ours(name, dirs)
    run(gm, "merge", adapters=["oft", "lokr"])
    entry = export_unmerged(gm, tmp_path, ExportOptions(mode="unmerged", switching="bank", external_data="never"))
    assert set(entry.adapters) == {"lora", "loha"}
    write_manifest(tmp_path / MANIFEST, build_manifest(gm, source=name, exports=[entry]))
    assert check_unmerged(gm, tmp_path, ["lora", "loha"]) <= 1e-4  # ONNX Runtime per adapter vs our graph
    from rewrite.runtime.session import AdapterSession

    feeds = {k: v.numpy() for k, v in kwargs.items()}
    with AdapterSession(tmp_path) as session:
        for active in (["lora"], ["loha"]):
            mixed.set_adapter(["oft", *active, "lokr"])
            want = first_output(mixed, kwargs).numpy()
            got = session.run(feeds, adapter=active[0])[0]
            assert np.abs(got - want).max() <= 1e-4, active
    mixed.set_adapter(list(dirs))
