"""The CLI on bad input: one clear message, exit code 2, no traceback, nothing written.

Each class of bad input (spec, MODEL path and factories, pickles, PEFT directories, corrupt safetensors files,
data factories, output directories) is run through `rewrite.cli.main` in-process (capsys), and through
`python -m rewrite.cli` in a subprocess to prove the exit code, the absence of a traceback (library loggers
included) and a silent `--quiet`. An unexpected exception (simulated) still ends in one line naming what was read. Most cases use a tiny pickled `nn.Sequential` (q_proj, v_proj)
so a run costs milliseconds; the Hugging Face cases use the tiny llama from tests/models.py.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import save_file
from torch import nn

from rewrite.cli import main

NET_INPUTS = '[[capture.inputs]]\nname = "input"\nshape = [2, 8]\n'
HEAD = 'version = 1\n\n[export]\nformat = "none"\n\n'  # 5 lines: a [[pass]] written after it starts on line 6


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(q_proj=nn.Linear(8, 8), act=nn.ReLU(), v_proj=nn.Linear(8, 4))).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """net.pt (a pickled module), sd.pt (a state_dict), bad.pt (garbage), trunc.pt (a cut-off zip)."""
    root = tmp_path_factory.mktemp("cli_inputs")
    torch.save(tiny_net(), root / "net.pt")
    torch.save(tiny_net().state_dict(), root / "sd.pt")
    (root / "bad.pt").write_bytes(b"garbage, not a torch file")
    (root / "trunc.pt").write_bytes((root / "net.pt").read_bytes()[:300])
    return root


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def write_spec(tmp_path: Path, text: str, name: str = "spec.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was written"
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]
    assert leftovers == [], leftovers


def assert_error(code: int, err: str, *expected: str) -> None:
    """Exit 2 and one `error:` message (after any progress lines) holding every expected text."""
    assert code == 2, err
    assert "Traceback" not in err
    _, sep, message = ("\n" + err).partition("\nerror: ")
    assert sep and "\nerror: " not in message, err
    for text in expected:
        assert text in message, f"{text!r} not in:\n{message}"


# ---------------------------------------------------------------------------------------------- spec

SPEC_CASES = {
    "not_toml": ('version = 1\n[model]\ntrust_pickle = = true\n',
                 ["spec.toml:3", "not valid TOML"]),
    "missing_version": ('[export]\nformat = "none"\n',
                        ["spec.toml", "missing top-level key 'version'", "version = 1"]),
    "wrong_version": ('version = 2\n', ["spec.toml:1", "'version' is 2", "spec version 1"]),
    "unknown_top_level_key": ('version = 1\n\n[exprot]\nformat = "none"\n',
                              ["spec.toml:3", "unknown key 'exprot'", "Did you mean: 'export'",
                               "Valid keys: version, model, capture, data, export, pass"]),
    "unknown_pass": (HEAD + '[[pass]]\nname = "insrt"\ntargets = ["q_proj"]\n',
                     ["spec.toml:7", "unknown pass 'insrt'", "Did you mean: 'insert'",
                      "Registered passes: ", "insert, load, merge"]),
    "unknown_pass_option": (HEAD + '[[pass]]\nname = "insert"\ntargets = ["q_proj"]\nrnak = 4\n',
                            ["spec.toml:9", "unknown key 'pass[0].rnak'", "Did you mean: 'rank'",
                             "Valid keys: name, adapter"]),
    "wrong_type": (HEAD + '[[pass]]\nname = "insert"\ntargets = ["q_proj"]\nrank = "eight"\n',
                   ["spec.toml:9", "'pass[0].rank'", "valid integer", "'eight'"]),
    "second_pass_located": (HEAD + '[[pass]]\nname = "insert"\ntargets = ["q_proj"]\n\n'
                                   '[[pass]]\nname = "merge"\nkeep_orignal = true\n',
                            ["spec.toml:12", "unknown key 'pass[1].keep_orignal'", "'keep_original'"]),
    "pass_without_name": (HEAD + '[[pass]]\ntargets = ["q_proj"]\n',
                          ["spec.toml:6", "[[pass]] number 1 has no 'name'", "Registered passes"]),
    "bad_capture_value": ('version = 1\n[capture]\nfrontend = "jit"\n',
                          ["spec.toml:3", "'capture.frontend'", "'export' or 'fx'", "'jit'"]),
}


@pytest.mark.parametrize("case", list(SPEC_CASES))
def test_bad_spec_exits_2_with_location(case, tmp_path, capsys, files):
    text, expected = SPEC_CASES[case]
    spec, out = write_spec(tmp_path, text), tmp_path / "out"
    code, stdout, err = cli(capsys, "apply", spec, files / "net.pt", "-o", out, "--trust-pickle")
    assert_error(code, err, *expected)
    assert stdout == ""
    assert_nothing_written(out)


def test_missing_spec_file(tmp_path, capsys, files):
    out = tmp_path / "out"
    code, _, err = cli(capsys, "apply", tmp_path / "nope.toml", files / "net.pt", "-o", out)
    assert_error(code, err, "nope.toml", "spec file not found")
    assert_nothing_written(out)


# Spec problems that need the model's site table: found after capture, still nothing written.
SITE_CASES = {
    "selector_matches_nothing": ('targets = ["q_prj"]\n',
                                 ["spec.toml:8", "selector 'q_prj' matches no site", "Nearest site names: q_proj",
                                  "rewrite inspect"]),
    "class_selector_matches_nothing": ('targets = ["class:Conv2d"]\n',
                                       ["selector 'class:Conv2d' matches no site",
                                        "Module classes with sites: Linear"]),
    "rank_pattern_key_matches_nothing": ('targets = ["q_proj"]\nrank_pattern = { "v_prj" = 2 }\n',
                                         ["spec.toml:9 rank_pattern", "selector 'v_prj' matches no site",
                                          "Nearest site names: v_proj"]),
}


@pytest.mark.parametrize("case", list(SITE_CASES))
def test_selector_errors_name_the_pass_and_nearest_sites(case, tmp_path, capsys, files):
    options, expected = SITE_CASES[case]
    spec = write_spec(tmp_path, HEAD + NET_INPUTS + '\n[[pass]]\nname = "insert"\n' + options)
    # the key lines moved down by the 4 input lines
    expected = [e.replace("spec.toml:8", "spec.toml:12").replace("spec.toml:9", "spec.toml:13") for e in expected]
    out = tmp_path / "out"
    code, _, err = cli(capsys, "apply", spec, files / "net.pt", "-o", out, "--trust-pickle")
    assert_error(code, err, "while running pass[0] 'insert'", *expected)
    assert_nothing_written(out)


def test_bad_regex_is_reported_before_the_model_loads(tmp_path, capsys):
    spec = write_spec(tmp_path, HEAD + '[[pass]]\nname = "insert"\ntargets = ["re:q_(proj"]\n')
    out = tmp_path / "out"
    code, _, err = cli(capsys, "apply", spec, tmp_path / "no-model-needed.pt", "-o", out)
    assert_error(code, err, "spec.toml:8", "not a valid regular expression")
    assert "while running" not in err
    assert_nothing_written(out)


def test_selector_on_hf_model_lists_nearest_full_names(hf_dir, tmp_path, capsys):
    spec = write_spec(tmp_path, HEAD + '[[pass]]\nname = "insert"\ntargets = ["q_prj"]\n')
    out = tmp_path / "out"
    code, _, err = cli(capsys, "apply", spec, hf_dir("llama"), "-o", out)
    assert_error(code, err, "spec.toml:8", "selector 'q_prj' matches no site",
                 "Nearest site names: model.layers.0.self_attn.q_proj, model.layers.1.self_attn.q_proj",
                 "list all 16 sites")
    assert_nothing_written(out)


# ---------------------------------------------------------------------------------------------- MODEL


@pytest.fixture
def ok_spec(tmp_path) -> Path:
    return write_spec(tmp_path, HEAD + NET_INPUTS)


def test_model_path_missing(tmp_path, capsys, ok_spec):
    out = tmp_path / "out"
    code, _, err = cli(capsys, "apply", ok_spec, tmp_path / "no_such_model", "-o", out)
    assert_error(code, err, "no_such_model: no such file or directory", "HF model directory", ".pt2",
                 "package.module:function")
    assert_nothing_written(out)


def test_model_dir_without_config(tmp_path, capsys, ok_spec):
    model = tmp_path / "empty_model"
    model.mkdir()
    out = tmp_path / "out"
    code, _, err = cli(capsys, "apply", ok_spec, model, "-o", out)
    assert_error(code, err, "empty_model", "no config.json found")
    assert_nothing_written(out)


def test_model_unknown_suffix(tmp_path, capsys, ok_spec):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"\x08\x07")
    out = tmp_path / "out"
    code, _, err = cli(capsys, "apply", ok_spec, model, "-o", out)
    assert_error(code, err, "model.onnx: unknown model format '.onnx'")
    assert_nothing_written(out)


FACTORY_CASES = {
    "missing_module": ("rw_test_no_such_module:make", ["cannot import module 'rw_test_no_such_module'"]),
    # `...:X:` must reach the terminal as written (rich would render it as an emoji code)
    "not_callable": ("rw_test_factory:X", ["rw_test_factory:X: module 'rw_test_factory' has no callable 'X'"]),
    "missing_function": ("rw_test_factory:mkae", ["has no callable 'mkae'"]),
    "returns_non_module": ("rw_test_factory:number", ["the factory returned int, expected a torch.nn.Module"]),
    "raises": ("rw_test_factory:boom", ["rw_test_factory:boom: the factory raised ValueError: no weights here"]),
    "raises_without_message": ("rw_test_factory:silent", ["rw_test_factory:silent: the factory raised RuntimeError"]),
    "needs_arguments": ("rw_test_factory:sized", ["a factory is called without arguments, but this one needs some",
                                                  "'width'"]),
    "calls_sys_exit": ("rw_test_factory:leave", ["the factory raised SystemExit: 0"]),
    "module_fails_on_import": ("rw_test_broken:make", ["importing module 'rw_test_broken' failed: ZeroDivisionError"]),
}
FACTORY_MODULE = """X = 3

def number():
    return 5

def boom():
    raise ValueError("no weights here")

def silent():
    raise RuntimeError()

def sized(width):
    return width

def leave():
    raise SystemExit(0)
"""


@pytest.mark.parametrize("case", list(FACTORY_CASES))
def test_model_factory_errors(case, tmp_path, capsys, ok_spec, monkeypatch):
    (tmp_path / "rw_test_factory.py").write_text(FACTORY_MODULE)
    (tmp_path / "rw_test_broken.py").write_text("RATIO = 1 / 0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "rw_test_factory", raising=False)
    monkeypatch.delitem(sys.modules, "rw_test_broken", raising=False)
    source, expected = FACTORY_CASES[case]
    out = tmp_path / "out"
    code, _, err = cli(capsys, "apply", ok_spec, source, "-o", out)
    assert_error(code, err, *expected)
    assert_nothing_written(out)


# ---------------------------------------------------------------------------------------------- pickles


def test_pickled_module_refused_without_trust(tmp_path, capsys, files, ok_spec):
    out = tmp_path / "out"
    code, _, err = cli(capsys, "apply", ok_spec, files / "net.pt", "-o", out)
    assert_error(code, err, "net.pt: this pickle holds Python objects", "run code",
                 "pass --trust-pickle", "(or set [model] trust_pickle = true in the spec)",
                 "GLOBAL torch.nn.modules.container.Sequential")
    assert "\x1b[" not in err  # torch's ANSI-bold advice is not passed through
    assert_nothing_written(out)


def test_pickled_module_accepted_with_trust_flag(tmp_path, capsys, files, ok_spec):
    out = tmp_path / "out"
    code, _, err = cli(capsys, "apply", ok_spec, files / "net.pt", "-o", out, "--trust-pickle")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["sites"]] == ["q_proj", "v_proj"]


def test_pickled_module_accepted_with_trust_in_spec(tmp_path, capsys, files):
    spec = write_spec(tmp_path, HEAD + "[model]\ntrust_pickle = true\n\n" + NET_INPUTS)
    out = tmp_path / "out"
    code, _, err = cli(capsys, "apply", spec, files / "net.pt", "-o", out)
    assert code == 0, err
    assert (out / "manifest.json").is_file()


@pytest.mark.parametrize("trust", [False, True])
def test_state_dict_pickle_has_no_architecture(trust, tmp_path, capsys, files, ok_spec):
    out = tmp_path / "out"
    code, _, err = cli(capsys, "apply", ok_spec, files / "sd.pt", "-o", out, *(["--trust-pickle"] if trust else []))
    assert_error(code, err, "sd.pt: holds a state_dict (4 tensors), not a module", "no architecture",
                 "package.module:function")
    assert_nothing_written(out)


@pytest.mark.parametrize("name", ["bad.pt", "trunc.pt"])
def test_corrupt_pickle(name, tmp_path, capsys, files, ok_spec):
    out = tmp_path / "out"
    code, _, err = cli(capsys, "apply", ok_spec, files / name, "-o", out)
    assert_error(code, err, name, "not a")  # "not a readable PyTorch file" / "not a PyTorch file"
    assert "--trust-pickle" not in err  # a corrupt file is not an untrusted one
    assert_nothing_written(out)


def test_empty_pickle_file(tmp_path, capsys, ok_spec):
    """An exception without a message on the way (torch's EOFError) still ends in one line naming the file."""
    model = tmp_path / "empty.pt"
    model.write_bytes(b"")
    out = tmp_path / "out"
    code, _, err = cli(capsys, "apply", ok_spec, model, "-o", out)
    assert_error(code, err, "empty.pt")
    assert_nothing_written(out)


# ---------------------------------------------------------------------------------------------- PEFT dirs


def _peft_dir(root: Path, *, config: dict | None = None, tensors: dict | None = None,
              weights: str = "adapter_model.safetensors") -> Path:
    root.mkdir()
    if config is not False:
        base = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "bias": "none"}
        (root / "adapter_config.json").write_text(json.dumps({**base, **(config or {})}))
    tensors = tensors or {"base_model.model.q_proj.lora_A.weight": torch.randn(2, 8),
                          "base_model.model.q_proj.lora_B.weight": torch.randn(8, 2)}
    if weights == "adapter_model.safetensors":
        save_file(tensors, root / weights)
    else:
        torch.save(tensors, root / weights)
    return root


PEFT_CASES = {
    "missing_adapter_config": (dict(config=False), ["not a PEFT adapter directory (no adapter_config.json)"]),
    "unsupported_tuner": (dict(config={"peft_type": "POLY"}), ["peft_type is 'POLY'; the adapters that can be loaded are LORA, ADALORA, IA3"]),
    "key_matches_no_site": (dict(config={"target_modules": ["q_prj"]},
                                 tensors={"base_model.model.q_prj.lora_A.weight": torch.randn(2, 8),
                                          "base_model.model.q_prj.lora_B.weight": torch.randn(8, 2)}),
                            ["1 adapter module(s) match no site of this model", "'q_prj'", "Nearest sites: q_proj"]),
    "shape_mismatch": (dict(tensors={"base_model.model.q_proj.lora_A.weight": torch.randn(2, 7),
                                     "base_model.model.q_proj.lora_B.weight": torch.randn(8, 2)}),
                       ["module 'q_proj': tensor shapes", "do not fit this site", "d_in=8"]),
    "only_bin_weights": (dict(weights="adapter_model.bin"),
                         ["no adapter_model.safetensors", "adapter_model.bin is a pickle and is never loaded"]),
}


def _load_spec(tmp_path: Path, adapter: Path) -> Path:
    return write_spec(tmp_path, HEAD + NET_INPUTS + f'\n[[pass]]\nname = "load"\npath = {json.dumps(str(adapter))}\n')


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_bad_peft_dir(case, tmp_path, capsys, files):
    kwargs, expected = PEFT_CASES[case]
    adapter = _peft_dir(tmp_path / "lora", **kwargs)
    out = tmp_path / "out"
    code, _, err = cli(capsys, "apply", _load_spec(tmp_path, adapter), files / "net.pt", "-o", out, "--trust-pickle")
    assert_error(code, err, "while running pass[0] 'load'", str(adapter), *expected)
    assert_nothing_written(out)


def test_missing_adapter_path(tmp_path, capsys, files):
    out = tmp_path / "out"
    code, _, err = cli(capsys, "apply", _load_spec(tmp_path, tmp_path / "gone"), files / "net.pt", "-o", out,
                       "--trust-pickle")
    assert_error(code, err, "pass[0] 'load'", "spec.toml:12", "adapter path", "gone does not exist")
    assert_nothing_written(out)


def test_good_peft_dir_loads(tmp_path, capsys, files):
    """The control for the cases above: the same directory, well-formed, loads and is recorded."""
    adapter = _peft_dir(tmp_path / "lora")
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, "apply", _load_spec(tmp_path, adapter), files / "net.pt", "-o", out,
                            "--trust-pickle", "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["passes"][0]["stats"]["modules"] == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(a["site"], a["rank"], a["alpha"]) for a in manifest["adapters"]] == [("q_proj", 2, 4.0)]


# ---------------------------------------------------------------------------------------------- output modes


def test_inspect_json_lists_sites_and_selector_matches(hf_dir, tmp_path, capsys):
    spec = write_spec(tmp_path, HEAD + '[[pass]]\nname = "insert"\ntargets = ["q_proj", "class:Embedding"]\n')
    code, stdout, err = cli(capsys, "inspect", hf_dir("llama"), "--spec", spec, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    names = [s["name"] for s in result["sites"]]
    assert len(names) == 21 and names[0] == "model.embed_tokens" and names[-1] == "lm_head"  # 16 weights, 5 norms
    q0 = next(s for s in result["sites"] if s["name"] == "model.layers.0.self_attn.q_proj")
    assert (q0["op"], q0["module_class"], q0["d_in"], q0["d_out"]) == ("linear", "Linear", 64, 64)
    norm = next(s for s in result["sites"] if s["name"] == "model.norm")
    assert (norm["op"], norm["module_class"], norm["d_in"], norm["d_out"]) == ("rmsnorm", "LlamaRMSNorm", 64, 64)
    assert [(s["selector"], s["matches"]) for s in result["passes"][0]["selectors"]] == [
        ("q_proj", ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]),
        ("class:Embedding", ["model.embed_tokens"])]


def test_quiet_prints_nothing_on_success(tmp_path, capsys, files, ok_spec):
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, "apply", ok_spec, files / "net.pt", "-o", out, "--trust-pickle", "--quiet")
    assert (code, stdout, err) == (0, "", "")
    assert (out / "manifest.json").is_file()


def test_quiet_still_prints_errors(tmp_path, capsys, files, ok_spec):
    code, stdout, err = cli(capsys, "apply", ok_spec, files / "net.pt", "-o", tmp_path / "out", "-q")
    assert_error(code, err, "--trust-pickle")
    assert stdout == ""


# ---------------------------------------------------------------------------------------------- subprocess


def _run(tmp_path: Path, *argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rewrite.cli", *map(str, argv)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def test_subprocess_error_exit_code_2_without_traceback(tmp_path, files, ok_spec):
    out = tmp_path / "out"
    proc = _run(tmp_path, "apply", ok_spec, files / "net.pt", "-o", out)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and "--trust-pickle" in proc.stderr
    assert proc.stdout == ""
    assert_nothing_written(out)


def test_subprocess_quiet_success_is_silent(tmp_path, files, ok_spec):
    out = tmp_path / "out"
    proc = _run(tmp_path, "apply", ok_spec, files / "net.pt", "-o", out, "--trust-pickle", "--quiet")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert (out / "manifest.json").is_file()


# ---------------------------------------------------------------------------------------------- corrupt safetensors


TRAIN = '[[pass]]\nname = "insert"\ntargets = ["q_proj"]\nrank = 2\n[[pass]]\nname = "train"\n'


def _with_header(header: dict | bytes, data: bytes = b"\0" * 64) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


GOOD_SAFETENSORS = safetensors.torch.save({"t": torch.ones(4, 4)})
CORRUPT_SAFETENSORS = {
    "empty": b"",
    "garbage": b"garbage, not a safetensors file",
    "header_longer_than_the_file": struct.pack("<Q", 2**62) + b"{}",
    "header_not_json": _with_header(b"{not json"),
    "header_not_an_object": _with_header(b"[1, 2]"),
    "offsets_outside_the_data": _with_header({"t": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 6400]}}),
    "unknown_dtype": _with_header({"t": {"dtype": "Q9", "shape": [4, 4], "data_offsets": [0, 64]}}),
    "metadata_not_strings": _with_header({"__metadata__": {"r": 1},
                                          "t": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}),
    "truncated_data": GOOD_SAFETENSORS[:-10],
}


def _corrupt_input(tmp_path: Path, where: str, blob: bytes) -> tuple[Path, Path, str]:
    """(spec, the corrupt file, the message's start) with `blob` as a PEFT dir's weights, our adapter file or the
    [data] file."""
    if where == "peft_dir":
        adapter = _peft_dir(tmp_path / "lora")
        (adapter / "adapter_model.safetensors").write_bytes(blob)
        return _load_spec(tmp_path, adapter), adapter / "adapter_model.safetensors", "not a readable safetensors file"
    file = tmp_path / "weights.safetensors"
    file.write_bytes(blob)
    if where == "adapter_file":
        return _load_spec(tmp_path, file), file, "not a readable safetensors file"
    spec = write_spec(tmp_path, HEAD + NET_INPUTS + f'[data]\npath = "{file.name}"\nloss = "mse"\nsteps = 1\n'
                      + TRAIN)
    return spec, file, "cannot read tensors"


@pytest.mark.parametrize("where", ["peft_dir", "adapter_file", "data_file"])
@pytest.mark.parametrize("case", list(CORRUPT_SAFETENSORS))
def test_corrupt_safetensors_is_a_clear_error(case, where, tmp_path, capsys, files):
    spec, file, expected = _corrupt_input(tmp_path, where, CORRUPT_SAFETENSORS[case])
    out = tmp_path / "out"
    code, _, err = cli(capsys, "apply", spec, files / "net.pt", "-o", out, "--trust-pickle")
    assert_error(code, err, str(file), expected)
    assert "internal error" not in err
    assert_nothing_written(out)


@pytest.mark.parametrize("case", ["garbage", "header_not_json", "truncated_data"])
def test_corrupt_safetensors_in_a_model_directory(case, hf_dir, tmp_path, capsys, ok_spec):
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(hf_dir("llama") / "config.json", model / "config.json")
    (model / "model.safetensors").write_bytes(CORRUPT_SAFETENSORS[case])
    out = tmp_path / "out"
    code, _, err = cli(capsys, "apply", ok_spec, model, "-o", out)
    assert_error(code, err, str(model), "deserializing header")
    assert_nothing_written(out)


# ---------------------------------------------------------------------------------------------- data factories

DATA_MODULE = """import sys
import torch

def batch():
    return {"input": torch.randn(2, 8), "labels": torch.randn(2, 4)}

def raises():
    raise KeyError()

def sized(n):
    return [batch()] * n

def number():
    return 7

def lists():
    yield [torch.randn(2, 8)]

def nested_lists():
    yield {"input": [[0.0] * 8] * 2, "labels": torch.randn(2, 4)}

def breaks_midway():
    yield batch()
    raise OSError("the data share went away")

def leaves():
    sys.exit(3)
"""
DATA_FACTORY_CASES = {
    "raises": ("the factory raised KeyError", []),
    "sized": ("a factory is called without arguments, but this one needs some", ["'n'"]),
    "number": ("the factory returned int, expected an iterable of batches", []),
    "lists": ("batch 0: expected a mapping of names to tensors, got list", []),
    "nested_lists": ("batch 0: expected a mapping of names to tensors, got 'input': list", []),
    "breaks_midway": ("batch 1: the factory raised OSError: the data share went away", []),
    "leaves": ("the factory raised SystemExit: 3", []),
}


@pytest.mark.parametrize("case", list(DATA_FACTORY_CASES))
def test_data_factory_errors(case, tmp_path, capsys, files, monkeypatch):
    (tmp_path / "rw_test_data.py").write_text(DATA_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "rw_test_data", raising=False)
    spec = write_spec(tmp_path, HEAD + NET_INPUTS + f'[data]\nfactory = "rw_test_data:{case}"\nloss = "mse"\n'
                      'steps = 3\n' + TRAIN)
    expected, more = DATA_FACTORY_CASES[case]
    out = tmp_path / "out"
    code, _, err = cli(capsys, "apply", spec, files / "net.pt", "-o", out, "--trust-pickle")
    assert_error(code, err, "while running pass[1] 'train'", f"[data] factory rw_test_data:{case}: {expected}",
                 *more)
    assert_nothing_written(out)


# ---------------------------------------------------------------------------------------------- output directories


def test_unwritable_output_directory_is_refused_before_the_model_loads(tmp_path, capsys, ok_spec, monkeypatch):
    """Simulated (root may write anywhere): the refusal comes first, so the missing model is never reported."""
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
    code, _, err = cli(capsys, "apply", ok_spec, tmp_path / "no_model.pt", "-o", out)
    assert_error(code, err, f"output directory '{out}' is not readable and writable")
    assert "no_model" not in err


def test_output_parent_without_room_is_refused_before_the_model_loads(tmp_path, capsys, ok_spec, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    out = tmp_path / "new" / "out"
    code, _, err = cli(capsys, "apply", ok_spec, tmp_path / "no_model.pt", "-o", out)
    assert_error(code, err, f"output directory '{out}': cannot write in {out.parent}: Permission denied")
    assert "no_model" not in err
    assert sorted(os.listdir(tmp_path)) == ["spec.toml"]  # the parent it made for OUT is gone again


@pytest.mark.parametrize("target", ["a_file", "a_file/sub"])
def test_report_into_a_file_is_refused(target, tmp_path, capsys):
    report = tmp_path / "allocation.json"
    report.write_text(json.dumps({"format": "rewrite-allocation", "version": 1, "sites": []}))
    (tmp_path / "a_file").write_text("user data")
    code, _, err = cli(capsys, "report", report, "-o", tmp_path / target, "--no-plot")
    assert_error(code, err, f"output directory {tmp_path / target}")
    assert (tmp_path / "a_file").read_text() == "user data"


# ---------------------------------------------------------------------------------------------- the handler itself


def test_an_error_without_a_message_still_prints_one_line(tmp_path, capsys, ok_spec, monkeypatch):
    from rewrite import spec as spec_module
    from rewrite.errors import SpecError

    def fail(path):
        raise SpecError("")

    monkeypatch.setattr(spec_module, "load_spec", fail)
    code, _, err = cli(capsys, "apply", ok_spec, "model.pt", "-o", tmp_path / "out")
    assert_error(code, err, "SpecError")


@pytest.mark.parametrize("target, activity", [("rewrite.spec.load_spec", "reading the spec {spec}"),
                                              ("rewrite.pipeline.load_model", "loading {model}")])
def test_an_unexpected_exception_is_one_line_naming_what_was_read(target, activity, tmp_path, capsys, ok_spec,
                                                                 monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError()

    monkeypatch.setattr(target, crash)
    model = tmp_path / "model.pt"
    code, _, err = cli(capsys, "apply", ok_spec, model, "-o", tmp_path / "out")
    assert_error(code, err, f"internal error while {activity.format(spec=ok_spec, model=model)}: RuntimeError")
    assert_nothing_written(tmp_path / "out")


LOGS_THEN_FAILS = """import logging

def make():
    for name in ("transformers", "torch.onnx", "onnxscript", "torch.export"):
        try:
            raise ValueError("inside " + name)
        except ValueError:
            logging.getLogger(name).exception("a library logs an error")
    raise RuntimeError("the factory gives up")
"""


def test_library_loggers_print_no_traceback(tmp_path, ok_spec):
    (tmp_path / "rw_test_logs.py").write_text(LOGS_THEN_FAILS)
    proc = _run(tmp_path, "apply", ok_spec, "rw_test_logs:make", "-o", tmp_path / "out")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout and "inside" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == ("error: rw_test_logs:make: the factory raised RuntimeError: the factory "
                                            "gives up")


DATA_DEPENDENT = """import torch
from torch import nn

class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)

    def forward(self, input):
        y = self.q_proj(input)
        return y if y.sum() > 0 else -y

def make():
    return Branchy()
"""


def test_a_failed_capture_prints_only_the_error_line(tmp_path, ok_spec):
    """torch.export prints the partial graph and logs a warning when it fails; with -q the one line is all."""
    (tmp_path / "rw_test_branchy.py").write_text(DATA_DEPENDENT)
    proc = _run(tmp_path, "apply", ok_spec, "rw_test_branchy:make", "-o", tmp_path / "out", "-q")
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: torch.export could not capture")
    assert proc.stdout == ""


def test_version_prints_the_package_version(capsys):
    import rewrite
    from rewrite.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"rewrite {rewrite.__version__}"


def test_an_error_line_that_only_announces_the_next_keeps_it():
    from rewrite.errors import first_line

    err = ValueError("The following inconsistencies were found:\n  Eq(s70, 1) is inconsistent!\n  more")
    assert first_line(err) == "The following inconsistencies were found: Eq(s70, 1) is inconsistent!"
    assert first_line(ValueError("\n  one line\nsecond")) == "one line"
    assert first_line(ValueError("")) == "ValueError"
