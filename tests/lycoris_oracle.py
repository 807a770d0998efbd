"""PEFT's LyCORIS tuners (LoHa, LoKr) as the oracle of our kinds of the same names: the checks test_loha.py and
test_lokr.py share.

A case is a tiny model (tests/models.py "llama", "bert", or the conv model `factories.TinyCNN`) with PEFT's tuner on
some of its layers and non-identity random factors (N(0, 0.3^2)); ours is the same model captured, with the same
adapter inserted (same ranks and alphas) and PEFT's factors copied in. Each check asserts its tolerance and returns
the max abs difference it measured.
"""
from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import peft
import pytest
import torch
import torch.fx as fx

from rewrite.errors import AdapterFileError
from rewrite.graph_edit import adapters_at
from rewrite.state import state_of

from factories import TinyCNN
from helpers import capture_hf, capture_module
from helpers import run_pass as run
from models import build

ADAPTER = "tuned"
CNN_INPUTS = {"x": torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0)),
              "ids": torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(1))}


def base_model(name: str) -> torch.nn.Module:
    if name == "cnn":
        torch.manual_seed(0)
        return TinyCNN().eval()
    return build(name)


class Captures:
    """Each model captured once; `get` hands out copies."""

    def __init__(self):
        self.done: dict[str, tuple[fx.GraphModule, dict[str, torch.Tensor]]] = {}

    def get(self, name: str) -> tuple[fx.GraphModule, dict[str, torch.Tensor]]:
        if name not in self.done:
            if name == "cnn":
                self.done[name] = capture_module(base_model(name), CNN_INPUTS, name="cnn"), CNN_INPUTS
            else:
                self.done[name] = capture_hf(name)[1:]
        gm, kwargs = self.done[name]
        return copy.deepcopy(gm), kwargs


def outputs(model, kwargs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The first output: logits (llama), last_hidden_state (bert), the tensor itself (cnn)."""
    with torch.no_grad():
        out = model(**kwargs)
    return out if torch.is_tensor(out) else out[0]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


@dataclass
class Case:
    name: str                   # the model
    kind: str                   # ours
    config: Any                 # PEFT's (LoHaConfig / LoKrConfig)
    insert: dict[str, Any]      # our insert options giving the same ranks, alphas and kind options

    def peft_model(self) -> torch.nn.Module:
        """PEFT's tuner on the model, its factors random (the identity would prove nothing)."""
        model = peft.get_peft_model(base_model(self.name), copy.deepcopy(self.config))
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if self.prefix in param_name:
                    param.copy_(0.3 * torch.randn(param.shape, generator=generator))
        return model.eval()

    @property
    def prefix(self) -> str:
        return "hada_" if self.kind == "loha" else "lokr_"

    def ours(self, captures: Captures, theirs) -> tuple[fx.GraphModule, dict[str, torch.Tensor]]:
        """Our capture with the adapter inserted and PEFT's factors copied in (through `load_peft_state`)."""
        gm, kwargs = captures.get(self.name)
        run(gm, "insert", kind=self.kind, adapter=ADAPTER, **self.insert)
        factors: dict[str, dict[str, torch.Tensor]] = {}
        for param_name, param in theirs.named_parameters():
            if self.prefix in param_name:
                module, _, rest = param_name.removeprefix("base_model.model.").partition(f".{self.prefix}")
                factors.setdefault(module, {})[self.prefix + rest.removesuffix(".default")] = param.detach()
        assert set(factors) == set(modules_of(gm)), "PEFT and our insert adapt the same modules"
        for owner, tensors in factors.items():
            module = adapters_at(gm, owner)[ADAPTER]
            assert module.peft_shapes() == {k: tuple(v.shape) for k, v in tensors.items()}, owner
            module.load_peft_state(tensors)
        return gm, kwargs


class Pairs:
    """case key -> (our graph with PEFT's factors, its inputs, PEFT's model), built once per case (a module fixture
    holds one); each call hands out a copy of our graph."""

    def __init__(self, cases: dict[str, Case], captures: Captures):
        self.cases, self.captures, self.made = cases, captures, {}

    def __call__(self, key: str):
        if key not in self.made:
            theirs = self.cases[key].peft_model()
            self.made[key] = (*self.cases[key].ours(self.captures, theirs), theirs)
        gm, kwargs, theirs = self.made[key]
        return copy.deepcopy(gm), kwargs, theirs


def modules_of(gm: fx.GraphModule, adapter: str = ADAPTER) -> dict[str, torch.nn.Module]:
    owners = dict.fromkeys(s.owner for s in state_of(gm).sites.values())
    return {o: adapters_at(gm, o)[adapter] for o in owners if adapter in adapters_at(gm, o)}


def check_forward(pairs: Pairs, key: str) -> float:
    gm, kwargs, theirs = pairs(key)
    want = outputs(theirs, kwargs)
    assert max_diff(want, outputs(base_model(pairs.cases[key].name), kwargs)) > 1e-2, "the adapter changes outputs"
    diff = max_diff(outputs(gm, kwargs), want)
    assert diff <= 1e-5
    return diff


def check_save_and_load(pairs: Pairs, key: str, root: Path) -> tuple[float, float]:
    """`save` writes a directory `PeftModel.from_pretrained` loads (without warnings about its config); `load` reads
    what PEFT's `save_pretrained` wrote, and loading it again changes nothing. Returns both max diffs."""
    gm, kwargs, theirs = pairs(key)
    case, want = pairs.cases[key], outputs(theirs, kwargs)
    run(gm, "save", root=root, path="ours", adapter=ADAPTER)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = peft.PeftModel.from_pretrained(base_model(case.name), root / "ours").eval()
    assert not [w for w in caught if "Unexpected keyword" in str(w.message) or "config" in str(w.message).lower()]
    saved = max_diff(outputs(again, kwargs), want)
    theirs.save_pretrained(root / "peft")
    gm, _ = pairs.captures.get(case.name)
    result = run(gm, "load", root=root, path="peft", adapter=ADAPTER)
    assert result.modified and {m.kind for m in modules_of(gm).values()} == {case.kind}
    loaded = max_diff(outputs(gm, kwargs), want)
    assert not run(gm, "load", root=root, path="peft", adapter=ADAPTER).modified
    assert saved <= 1e-5 and loaded <= 1e-5
    return saved, loaded


def check_merge(pairs: Pairs, key: str) -> tuple[float, float, float]:
    """merge = PEFT's merge_and_unload (weights and outputs); merge_into then unmerge_from restores the weights.
    Returns (weights, outputs, round trip) max diffs."""
    gm, kwargs, theirs = pairs(key)
    merged = copy.deepcopy(gm)
    run(merged, "merge")
    folded = dict(copy.deepcopy(theirs).merge_and_unload().named_parameters())
    ours = dict(merged.named_parameters())
    weights = max(max_diff(ours[f"{owner}.weight"], folded[f"{owner}.weight"]) for owner in modules_of(gm))
    out = max_diff(outputs(merged, kwargs), outputs(theirs, kwargs))
    round_trip = 0.0
    for owner, module in modules_of(gm).items():
        original = gm.get_parameter(f"{owner}.weight").detach()
        weight = original.clone()
        module.merge_into(weight, None)
        assert max_diff(weight, original) > 1e-4, owner
        module.unmerge_from(weight, None)
        round_trip = max(round_trip, max_diff(weight, original))
    assert weights <= 1e-5 and out <= 1e-5 and round_trip <= 1e-5
    return weights, out, round_trip


def check_merged_onnx(pairs: Pairs, key: str, root: Path) -> float:
    """The merged model exported to ONNX and run by ONNX Runtime equals our graph."""
    import onnxruntime as ort

    from rewrite.export.onnx_merged import export_merged
    from rewrite.options import ExportOptions

    gm, kwargs, _ = pairs(key)
    merged = copy.deepcopy(gm)
    run(merged, "merge")
    export_merged(merged, root / "merged.onnx", ExportOptions(), None)
    session = ort.InferenceSession(str(root / "merged.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, {k: kwargs[k].numpy() for k in names})[0]
    diff = float(np.abs(got - outputs(gm, kwargs).numpy()).max())
    assert diff <= 1e-4
    return diff


def edit_config(directory: Path, **fields) -> None:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def check_option_refused(pairs: Pairs, key: str, option: str, value: Any, root: Path) -> None:
    """A directory PEFT saved, with a config option we do not implement: `load` refuses it naming the option, and
    the graph is left alone."""
    pairs(key)[2].save_pretrained(root / "peft")
    edit_config(root / "peft", **{option: value})
    gm, _ = pairs.captures.get(pairs.cases[key].name)
    peft_type = pairs.cases[key].kind.upper()
    with pytest.raises(AdapterFileError, match=rf"'{option}' is set; {option} \(.*\) is not supported for {peft_type}"):
        run(gm, "load", root=root, path="peft", adapter=ADAPTER)
    assert not modules_of(gm)
