"""The formats layer (`rewrite.formats`): PEFT directories, our adapter `.safetensors` and `.onnx_adapter`, each read
and written through one typed, torch-free definition.

Oracles: PEFT itself (a bfloat16 adapter PEFT saved reads back and loads bit for bit; the one we save again
loads into PEFT bit for bit), safetensors' torch reader, and scales written out by hand. Every corrupt file is an
AdapterFileError naming the file, through each format's reader and through the runtime's `read_adapter`.
"""
from __future__ import annotations

import copy
import functools
import json
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from safetensors.torch import load_file

from rewrite.capture import capture
from rewrite.errors import AdapterFileError
from rewrite.formats.adapter_file import read_adapter_file, write_adapter_file
from rewrite.formats.onnx_adapter import read_onnx_adapter, write_onnx_adapter
from rewrite.formats.peft_dir import tensor_key, write_peft_dir
from rewrite.formats.peft_lora import LoraSettings, alpha_for_scale, lora_config, lora_scale, rank_of, read_lora_dir, \
    scale_of
from rewrite.graph_edit import adapters_at
from rewrite.inputs import ExampleInputs
from rewrite.load import LoadedModel
from rewrite.runtime.adapter_source import read_adapter
from rewrite.tensors import from_numpy

import factories
from helpers import run_pass

peft = pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["layers.0", "layers.2"]
SITE_INFO = {"op": "linear", "rank": 2, "alpha": 4.0, "rslora": False, "d_in": 64, "d_out": 64}


run = functools.partial(run_pass, where="spec.toml:4", keys=True)


# ---------------------------------------------------------------------------------------------- bfloat16


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    """PEFT on factories:mlp4 in bfloat16 (random A and B, rank 3 on layers.2), saved; and our fx capture of the
    same base model."""
    root = tmp_path_factory.mktemp("bf16")
    base = factories.mlp4().to(torch.bfloat16).eval()
    torch.manual_seed(1)
    config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=TARGETS, rank_pattern={"layers.2": 3},
                             init_lora_weights=False)
    model = peft.get_peft_model(copy.deepcopy(base), config, autocast_adapter_dtype=False).eval()  # keep bf16
    model.save_pretrained(root / "theirs")
    inputs = ExampleInputs({"x": torch.randn(4, 64, dtype=torch.bfloat16)}, {"x": [None, None]})
    gm, _ = capture(LoadedModel(base, None, "factory", "mlp4", None), inputs, frontend="fx")
    return root, base, model, gm


def test_peft_bf16_dir_reads_bit_for_bit(bf16):
    root, _, model, _ = bf16
    theirs = peft.get_peft_model_state_dict(model)
    assert all(t.dtype == torch.bfloat16 for t in theirs.values())
    adapter = read_lora_dir(root / "theirs")
    keys = {tensor_key(module, suffix): array for module, parts in adapter.modules.items()
            for suffix, array in parts.items()}
    assert sorted(keys) == sorted(theirs)
    for key, array in keys.items():
        assert array.dtype == ml_dtypes.bfloat16
        assert torch.equal(from_numpy(array), theirs[key]), key
    for owner in TARGETS:
        layer = model.base_model.model.get_submodule(owner)
        assert rank_of(adapter, owner) == layer.r["default"]
        assert scale_of(adapter, owner) == layer.scaling["default"] == 6 / rank_of(adapter, owner)


def test_peft_bf16_dir_loads_and_saves_bit_for_bit(bf16):
    """PEFT (bf16) -> our load -> our save, as PEFT and as our file: the same bits everywhere."""
    root, base, model, captured = bf16
    theirs = peft.get_peft_model_state_dict(model)
    assert all(t.dtype == torch.bfloat16 for t in theirs.values())
    gm = copy.deepcopy(captured)
    assert run(gm, "load", root, path="theirs").modified
    for owner in TARGETS:
        ours = adapters_at(gm, owner)["default"]
        assert ours.lora_A.dtype == torch.bfloat16
        assert torch.equal(ours.lora_A.T, theirs[tensor_key(owner, "lora_A.weight")])
        assert torch.equal(ours.lora_B.T, theirs[tensor_key(owner, "lora_B.weight")])
        assert ours.scaling == model.base_model.model.get_submodule(owner).scaling["default"]
    run(gm, "save", root, path="ours")
    run(gm, "save", root, path="ours.safetensors", format="rewrite")
    saved = load_file(root / "ours" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(theirs)
    assert all(saved[k].dtype == torch.bfloat16 and torch.equal(saved[k], theirs[k]) for k in theirs)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), root / "ours", autocast_adapter_dtype=False).eval()
    again = peft.get_peft_model_state_dict(reloaded)
    assert all(again[k].dtype == torch.bfloat16 and torch.equal(again[k], theirs[k]) for k in theirs)
    for owner in TARGETS:
        layer, want = reloaded.base_model.model.get_submodule(owner), model.base_model.model.get_submodule(owner)
        assert (layer.r["default"], layer.scaling["default"]) == (want.r["default"], want.scaling["default"])
    file = read_adapter_file(root / "ours.safetensors")
    for owner in TARGETS:
        assert torch.equal(from_numpy(file.tensors[owner]["lora_A"]), adapters_at(gm, owner)["default"].lora_A)
        assert file.sites[owner].rank == adapters_at(gm, owner)["default"].rank


def test_bf16_nan_is_refused(tmp_path):
    """ml_dtypes' bfloat16 is not a numpy float type: the finite check must still see it."""
    root = tmp_path / "lora"
    root.mkdir()
    (root / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    b = np.zeros((64, 2), ml_dtypes.bfloat16)
    b[3, 1] = np.nan
    save_file({tensor_key("layers.0", "lora_A.weight"): np.ones((2, 64), ml_dtypes.bfloat16),
               tensor_key("layers.0", "lora_B.weight"): b}, root / "adapter_model.safetensors")
    with pytest.raises(AdapterFileError) as err:
        read_lora_dir(root)
    assert str(err.value).startswith(f"{root / 'adapter_model.safetensors'}: tensor "
                                     f"'{tensor_key('layers.0', 'lora_B.weight')}' has 1 NaN/Inf value;")


# ---------------------------------------------------------------------------------------------- corrupt files


def _good_files(root: Path) -> dict[str, tuple[Path, Path]]:
    """{format: (what to read, the file inside it to corrupt)}, each written by our writer."""
    a, b = np.full((64, 2), 0.5, np.float32), np.full((2, 64), 0.25, np.float32)
    write_peft_dir(root / "peft", lora_config({"layers.0": LoraSettings("linear", 2, 4.0, False, 0.0)}),
                   {"layers.0": {"lora_A.weight": a.T, "lora_B.weight": b.T}})
    write_adapter_file(root / "ours.safetensors", "ours", "lora", {"layers.0": SITE_INFO},
                       {"layers.0": {"lora_A": a, "lora_B": b}})
    write_onnx_adapter(root / "ours.onnx_adapter", {"layers.0.A": a, "layers.0.B": b}, 7)
    return {"peft": (root / "peft", root / "peft" / "adapter_model.safetensors"),
            "rewrite": (root / "ours.safetensors", root / "ours.safetensors"),
            "onnx_adapter": (root / "ours.onnx_adapter", root / "ours.onnx_adapter")}


READERS = {"peft": read_lora_dir, "rewrite": read_adapter_file, "onnx_adapter": read_onnx_adapter}
KIND = {"peft": "safetensors file", "rewrite": "safetensors file", "onnx_adapter": ".onnx_adapter file"}
CORRUPTIONS = {
    "random_bytes": lambda good: np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes(),
    "truncated": lambda good: good[: len(good) // 2],
    "header_only": lambda good: good[:24],
    "empty": lambda good: b"",
}


@pytest.mark.parametrize("fmt", list(READERS))
def test_good_files_read_back(fmt, tmp_path):
    """The control for the corrupt cases: what our writers wrote reads back as written."""
    source, _ = _good_files(tmp_path)[fmt]
    read = READERS[fmt](source)
    if fmt == "onnx_adapter":
        assert read.model_version == 7 and np.array_equal(read.tensors["layers.0.B"], np.full((2, 64), 0.25))
    elif fmt == "peft":
        assert scale_of(read, "layers.0") == 2.0 and read.modules["layers.0"]["lora_A.weight"].shape == (2, 64)
    else:
        assert read.sites["layers.0"].alpha == 4.0 and read.tensors["layers.0"]["lora_B"][0, 0] == 0.25


@pytest.mark.parametrize("how", list(CORRUPTIONS))
@pytest.mark.parametrize("fmt", list(READERS))
def test_corrupt_file_names_the_file(fmt, how, tmp_path):
    source, file = _good_files(tmp_path)[fmt]
    file.write_bytes(CORRUPTIONS[how](file.read_bytes()))
    expected = f"{file}: not a readable {KIND[fmt]}"
    with pytest.raises(AdapterFileError) as err:
        READERS[fmt](source)
    assert str(err.value).startswith(expected), str(err.value)
    with pytest.raises(AdapterFileError) as err:  # the runtime reads every format through the same reader
        read_adapter(source, {})
    assert str(err.value).startswith(expected), str(err.value)


@pytest.mark.parametrize("fmt", ["rewrite", "onnx_adapter"])
def test_missing_file_names_the_file(fmt, tmp_path):
    missing = tmp_path / ("gone.safetensors" if fmt == "rewrite" else "gone.onnx_adapter")
    with pytest.raises(AdapterFileError, match=f"^{missing}: "):
        READERS[fmt](missing)


# ---------------------------------------------------------------------------------------------- typed metadata

BAD_SITE_INFO = {
    "rank_string": (dict(rank="2"), "'sites.layers.0.rank' is '2'"),
    "rank_zero": (dict(rank=0), "'sites.layers.0.rank' is 0"),
    "alpha_bool": (dict(alpha=True), "'sites.layers.0.alpha.int' is True"),
    "rslora_int": (dict(rslora=1), "'sites.layers.0.rslora' is 1"),
    "d_in_float": (dict(d_in=64.0), "'sites.layers.0.d_in' is 64.0"),
    "unknown_field": (dict(bias=True), "'sites.layers.0.bias' is True"),
}


@pytest.mark.parametrize("case", list(BAD_SITE_INFO))
def test_our_metadata_is_strictly_typed(case, tmp_path):
    change, expected = BAD_SITE_INFO[case]
    meta = {"format": "rewrite-adapter", "version": 1, "adapter": "ours", "kind": "lora",
            "sites": {"layers.0": {**SITE_INFO, **change}}}
    path = tmp_path / "ours.safetensors"
    save_file({"layers.0.lora_A": np.zeros((64, 2), np.float32), "layers.0.lora_B": np.zeros((2, 64), np.float32)},
              path, metadata={"rewrite": json.dumps(meta)})
    with pytest.raises(AdapterFileError) as err:
        read_adapter_file(path)
    assert str(err.value).startswith(f"{path}: metadata {expected}"), str(err.value)


def test_our_metadata_version_and_json(tmp_path):
    path = tmp_path / "ours.safetensors"
    tensors = {"layers.0.lora_A": np.zeros((64, 2), np.float32), "layers.0.lora_B": np.zeros((2, 64), np.float32)}
    for text, expected in [("{not json", "rewrite adapter metadata is not valid JSON"),
                           (json.dumps({"format": "rewrite-adapter", "version": 2}),
                            "adapter format 'rewrite-adapter' v2, expected 'rewrite-adapter' v1")]:
        save_file(tensors, path, metadata={"rewrite": text})
        with pytest.raises(AdapterFileError, match=f"^{path}: {expected}"):
            read_adapter_file(path)


# ---------------------------------------------------------------------------------------------- one scale, no torch


def test_lora_scale_is_peft_convention():
    assert lora_scale(6, 3, False) == 2.0 and lora_scale(6, 4, True) == 3.0
    assert alpha_for_scale(2.0, 3, False) == 6.0 and alpha_for_scale(3.0, 4, True) == 6.0


def test_formats_load_without_torch():
    code = ("import sys, rewrite.formats.peft_dir, rewrite.formats.peft_lora, rewrite.formats.adapter_file, rewrite.formats.onnx_adapter; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    run_ = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run_.returncode == 0, run_.stderr
