"""Elementwise kinds ((IA)^3, RoAd, BitFit) in ort-adapters exports: vectors fed per run from `.onnx_adapter` files.

A tiny LLaMA holds one adapter of each elementwise kind (random, far from the identity) and a LoRA adapter at sites an
(IA)^3 adapter shares. Exported with switching = "ort-adapters" and served by `AdapterSession`, each adapter's run
equals our torch graph with only that adapter (<= 1e-5) and the bank export's row of that adapter, and the run
without an adapter equals the base model: each vector input defaults to its identity. The slow case does the same
against PEFT (`PeftModel` with that adapter) on the PEFT-made adapters of tests/test_rowwise_kinds.py.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from rewrite.export.manifest import build_manifest
from rewrite.export.onnx_unmerged import export_unmerged
from rewrite.formats.manifest import MANIFEST, write_manifest
from rewrite.graph_edit import only_adapter
from rewrite.options import ExportOptions
from rewrite.runtime.session import AdapterSession

from helpers import fresh_capture
from helpers import run_pass as run

INSERTS = {  # adapter -> the inserts that make it
    "ia3": [dict(kind="ia3", targets=["k_proj", "v_proj"]), dict(kind="ia3_ff", targets=["down_proj"])],
    "road": [dict(kind="road", targets=["q_proj"], options={"group_size": 8})],
    "bitfit": [dict(kind="bitfit", targets=["up_proj"])],
    "lora": [dict(kind="lora", targets=["q_proj", "k_proj"], rank=4, init="gaussian")],  # beside road / (IA)^3
}
NAMES = list(INSERTS)


class Tiny:
    """The tiny LLaMA capture with every adapter of INSERTS (randomised), its exports by switching, its outputs."""

    def __init__(self, work):
        self.work = work
        self.gm, self.kwargs = fresh_capture("llama")
        for name, inserts in INSERTS.items():
            for insert in inserts:
                run(self.gm, "insert", adapter=name, **insert)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for key, param in self.gm.named_parameters():
                if key.startswith("adapters."):
                    param.add_(0.3 * torch.randn(param.shape, generator=generator))
        self.feeds = {k: v.numpy() for k, v in self.kwargs.items()}
        self.exports = {}

    def export(self, switching: str, **options) -> Path:
        key = json.dumps([switching, options], sort_keys=True)
        if key not in self.exports:
            out = self.work / f"out-{len(self.exports)}"
            out.mkdir()
            entry = export_unmerged(self.gm, out, ExportOptions(mode="unmerged", switching=switching, **options))
            write_manifest(out / MANIFEST, build_manifest(self.gm, source="llama", exports=[entry]))
            self.exports[key] = out
        return self.exports[key]

    def torch_output(self, name: str | None) -> np.ndarray:
        with torch.no_grad():
            return only_adapter(copy.deepcopy(self.gm), name)(**self.kwargs).logits.numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    return Tiny(tmp_path_factory.mktemp("rows_ort"))


def test_vector_inputs_default_to_the_identity(tiny):
    out = tiny.export("ort-adapters")
    entry = json.loads((out / MANIFEST).read_text())["exports"][0]
    assert {r["kind"] for r in entry["row_sites"]} == {"ia3", "ia3_ff", "road", "bitfit"}
    model = onnx.load(str(out / entry["file"]))
    inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    defaults = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for row_site in entry["row_sites"]:
        assert row_site["layout"] == ({"group_size": 8} if row_site["kind"] == "road" else {})
        for vector, name in row_site["banks"].items():
            assert inputs[name] == [1, 1, row_site["widths"][vector]]
            identity = np.full((1, 1, row_site["widths"][vector]), row_site["identity"][vector], np.float32)
            assert np.array_equal(defaults[name], identity)


def test_each_run_equals_torch_and_the_bank_row(tiny):
    """Per adapter: ORT with its .onnx_adapter == our graph with only it == the bank export's rows with its slot;
    no adapter == the base model."""
    ort_dir, bank_dir = tiny.export("ort-adapters"), tiny.export("bank")
    batch = next(iter(tiny.feeds.values())).shape[0]
    with AdapterSession(ort_dir) as per_run, AdapterSession(bank_dir) as per_row:
        for name in [*NAMES, None]:
            got = per_run.run(tiny.feeds, adapter=name)[0]
            want = tiny.torch_output(name)
            assert np.abs(got - want).max() <= 1e-5, (name, float(np.abs(got - want).max()))
            rows = per_row.run(tiny.feeds, adapter_ids=[name] * batch)[0]
            assert np.abs(got - rows).max() <= 1e-5, name
            if name is not None:  # the adapter matters
                assert np.abs(want - tiny.torch_output(None)).max() > 1e-3, name


@pytest.mark.slow
def test_peft_adapters_per_run_equal_peft(tmp_path_factory):
    """The PEFT-made (IA)^3 / RoAd / BEFT / LoRA adapters of test_rowwise_kinds, exported ort-adapters, each run
    equals PEFT with that adapter (<= 1e-5) and the bank export's row."""
    from test_rowwise_kinds import NAMES as PEFT_NAMES
    from test_rowwise_kinds import Setup, _feeds

    setup = Setup(tmp_path_factory.mktemp("rows_ort_peft"))
    feeds = _feeds(2)
    with AdapterSession(setup.export("ort-adapters")) as per_run, AdapterSession(setup.export("bank")) as per_row:
        for name in [*PEFT_NAMES, None]:
            got = per_run.run(feeds, adapter=name)[0]
            want = setup.oracle(name, feeds)
            assert np.abs(got - want).max() <= 1e-5, (name, float(np.abs(got - want).max()))
            assert np.abs(got - per_row.run(feeds, adapter_ids=[name] * 2)[0]).max() <= 1e-5, name
