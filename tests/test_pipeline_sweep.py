"""Multi-pass specs and command-line paths as a user of the README runs them, against PEFT, torch and ONNX Runtime.

1. (fast, DeepMLP) `rewrite bundle` / `rewrite combine --trust-pickle` reach every `load` pass: a PEFT directory
   holding only `adapter_model.bin` is refused without it (naming the flag) and, with it, loads as PEFT's reload of
   that directory computes. (slow, tiny LLaMA) `rewrite bundle` end to end: exit 2 without the flag, nothing written;
   with it, served per batch row as PEFT (ONNX Runtime). Errors of the specs these commands write name the command
   (`rewrite bundle: ...`), not a line of a spec the user never saw; --capacity below the adapters is refused early.
2. (fast) A PEFT LoRA config with bias = "all" / "lora_only" whose file holds no bias tensors (a bias-free model) is
   exactly bias = "none": load equals `PeftModel.from_pretrained`. With bias tensors in the file (PEFT saves the
   model's biases) it is refused, exit 2, naming the config key, the setting and a tensor.
3. (fast) The manifest's `bank_dtype` is what the exported banks hold (the ONNX initializers' type): float16 for a
   float16 model's bank export whatever `[export] bank_dtype` says, float32 for a float32 model.
4. (slow, tiny LLaMA) A custom-op export of a float16 model, which ONNX Runtime could not load (the kernel takes
   float32 activations), is refused after capture: exit 2 naming `[export] switching`, no output written.
5. Multi-pass specs of the README: (slow, DeepMLP) load, load, combine (cat), save, unmerged bank export: each row
   equals PEFT (`add_weighted_adapter` for the combination), the saved directory reloads in PEFT to the same answer,
   and running the same command again replaces the output as a whole. (fast) An unmerged export after a merge of
   every adapter is refused at `[export] mode`, naming the merged adapter. (slow, tiny LLaMA) insert, train,
   allocate, save, merge, merged ONNX: the saved directory (allocated ranks) reloaded in PEFT equals ONNX Runtime.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from rewrite.bundle import bundle_spec, combine_spec
from rewrite.errors import AdapterFileError, SpecError
from rewrite.export.onnx_unmerged import export_unmerged
from rewrite.options import ExportOptions
from rewrite.runtime.session import AdapterSession

from factories import mlp4
from helpers import capture_module, cli, diff, run_pass
from models import build

peft = pytest.importorskip("peft")

ATOL = 1e-5
MLP_TARGETS = ["layers.0", "layers.2"]

pytestmark = pytest.mark.usefixtures("one_thread")


def save_peft(model: torch.nn.Module, config, path: Path, *, seed: int = 7, safetensors: bool = True) -> Path:
    """PEFT's `config` on `model`, every trainable tensor moved off its init (seeded), saved to `path` (as
    adapter_model.bin when not `safetensors`)."""
    torch.manual_seed(seed)
    peft_model = peft.get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(path, safe_serialization=safetensors)
    return path


def peft_reload(base: torch.nn.Module, path: Path) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, path).eval()


def assert_refused(code: int, err: str, *fragments: str) -> None:
    assert code == 2 and err.splitlines()[-1].startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


# ------------------------------------------------------------------------ 1. --trust-pickle reaches `load`

def _bin_only(path: Path, seed: int) -> Path:
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=MLP_TARGETS, init_lora_weights=False)
    directory = save_peft(mlp4(), config, path, seed=seed, safetensors=False)
    assert not (directory / "adapter_model.safetensors").exists() and (directory / "adapter_model.bin").is_file()
    return directory


@pytest.mark.parametrize("make_spec", [
    lambda adapters, trust: bundle_spec(adapters, switching="bank", capacity=None, check=False, trust_pickle=trust),
    lambda adapters, trust: combine_spec(adapters, "1,1", into="ab", method="cat", options={}, trust_pickle=trust)],
    ids=["bundle", "combine"])
def test_trust_pickle_reaches_every_load_pass(tmp_path, make_spec):
    """What `rewrite bundle / combine --trust-pickle` run: each load pass of the spec reads the adapter_model.bin
    directories as PEFT does, and refuses them (naming the flag) without it."""
    a, b = _bin_only(tmp_path / "a", seed=1), _bin_only(tmp_path / "b", seed=2)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0))
    for trusted in (False, True):
        spec = make_spec([f"a={a}", f"b={b}"], trusted)
        loads = [entry.options for entry in spec.passes if entry.name == "load"]
        assert [load.trust_pickle for load in loads] == [trusted, trusted]
        for load, directory in zip(loads, (a, b)):
            gm = capture_module(mlp4(), {"x": x})
            if not trusted:
                with pytest.raises(AdapterFileError, match="rewrite bundle / combine: --trust-pickle"):
                    run_pass(gm, "load", **load.model_dump())
                continue
            run_pass(gm, "load", **load.model_dump())
            with torch.no_grad():
                want, base, got = peft_reload(mlp4(), directory)(x), mlp4()(x), gm(x=x)
            assert diff(want, base) > 1e-3 and diff(got, want) <= ATOL


def test_command_line_specs_are_refused_naming_the_command_and_flag(tmp_path):
    """A spec that `rewrite bundle / combine` wrote from flags: errors name the command, never a line of a spec the
    user never saw; a --capacity below the number of adapters is refused before the model is loaded."""
    adapters = [f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"]
    with pytest.raises(SpecError, match=r"^rewrite bundle: --capacity 1 is smaller than the 2 --adapter directories"):
        bundle_spec(adapters, switching="bank", capacity=1, check=False)
    with pytest.raises(SpecError, match=r"^invalid spec:\n  rewrite bundle: 'export': .*bank_dtype = .float16. needs"):
        bundle_spec(adapters, switching="bank", capacity=None, check=False, bank_dtype="float16")
    with pytest.raises(SpecError, match=r"^invalid spec:\n  rewrite combine: 'pass\[2\]': .*density does not go with"):
        combine_spec(adapters, "1,1", into="ab", method="svd", options=dict(density=0.5))
    assert bundle_spec(adapters, switching="bank", capacity=None, check=False).location("pass", 0) == \
        "rewrite bundle"


@pytest.mark.slow
def test_bundle_trust_pickle_serves_an_adapter_bin(tmp_path, capsys, hf_dir):
    """The command line end to end (tiny LLaMA, an HF directory: bundle has no [[capture.inputs]])."""
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    directory = save_peft(build("llama"), config, tmp_path / "a", safetensors=False)
    argv = ["bundle", hf_dir("llama"), "--adapter", f"a={directory}", "-o", tmp_path / "out", "-q"]
    assert_refused(*cli(capsys, *argv), str(directory), "adapter_model.bin", "--trust-pickle")
    assert not (tmp_path / "out").exists()
    code, err = cli(capsys, *argv, "--trust-pickle", "--check")
    assert code == 0, err
    ids = torch.tensor([[1, 5, 9, 3, 7], [2, 4, 6, 8, 10]])
    with torch.no_grad():
        want, base = peft_reload(build("llama"), directory)(input_ids=ids).logits, build("llama")(input_ids=ids).logits
    with AdapterSession(tmp_path / "out") as served:
        feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())}
        (got,) = served.run({k: v for k, v in feeds.items() if k in served.input_names}, adapter_ids=["a", None])
    assert diff(want[0], base[0]) > 1e-3
    assert max(diff(got[0], want[0]), diff(got[1], base[1])) <= 1e-4


# ------------------------------------------------------------------- 2. bias = "all" / "lora_only" in PEFT configs

class BiasFree(torch.nn.Module):
    """Two Linear(32, 32) without biases (as LLaMA's projections): PEFT's bias settings save nothing for them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = torch.nn.Linear(32, 32, bias=False), torch.nn.Linear(32, 32, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_a_bias_setting_without_bias_tensors_loads_as_peft(tmp_path, bias):
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["up", "down"], init_lora_weights=False, bias=bias)
    directory = save_peft(BiasFree().eval(), config, tmp_path / "peft")
    assert json.loads((directory / "adapter_config.json").read_text())["bias"] == bias
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(0))
    gm = capture_module(BiasFree().eval(), {"x": x})
    assert run_pass(gm, "load", path=str(directory), adapter="a").modified
    with torch.no_grad():
        want, base, got = peft_reload(BiasFree().eval(), directory)(x), BiasFree()(x), gm(x=x)
    assert diff(want, base) > 1e-3 and diff(got, want) <= ATOL


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_a_bias_setting_with_bias_tensors_is_refused(tmp_path, capsys, bias):
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=MLP_TARGETS, init_lora_weights=False, bias=bias)
    directory = save_peft(mlp4(), config, tmp_path / "peft")
    spec = tmp_path / "spec.toml"
    spec.write_text('version = 1\n[[capture.inputs]]\nname = "x"\nshape = [2, 3, 64]\n[[pass]]\nname = "load"\n'
                    f'path = {json.dumps(str(directory))}\n[export]\nformat = "none"\n')
    code, err = cli(capsys, "apply", spec, "factories:mlp4", "-o", tmp_path / "out", "-q")
    assert_refused(code, err, f"{directory / 'adapter_config.json'}: 'bias' = {bias!r}", "trained base bias",
                   "e.g. 'base_model.model.layers.", 'bias = "none"')


# --------------------------------------------------------------------- 3. the manifest's bank_dtype, as held

def _bank_dtypes(path: Path, names: list[str]) -> set[str]:
    model = onnx.load(str(path), load_external_data=False)
    types = {init.name: init.data_type for init in model.graph.initializer}
    return {onnx.helper.tensor_dtype_to_np_dtype(types[n]).name for n in names}


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.float32, marks=pytest.mark.slow)])
def test_manifest_bank_dtype_is_what_the_banks_hold(tmp_path, dtype):
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    gm = capture_module(BiasFree().to(dtype).eval(), {"x": x})
    run_pass(gm, "insert", adapter="a", kind="lora", targets=["up", "down"], rank=2, init="gaussian")
    entry = export_unmerged(gm, tmp_path, ExportOptions(mode="unmerged", switching="bank"))
    held = _bank_dtypes(tmp_path / entry.file, [name for s in entry.sites for name in (s.A, s.B)])
    assert held == {str(dtype).removeprefix("torch.")} and entry.bank_dtype == held.pop()


# ------------------------------------------------------------- 4. custom-op on a float16 model (slow, tiny LLaMA)

@pytest.mark.slow
def test_custom_op_on_a_float16_model_is_refused_before_the_passes(tmp_path, capsys):
    build("llama").half().save_pretrained(tmp_path / "model")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
    directory = save_peft(build("llama").half(), config, tmp_path / "peft")
    code, err = cli(capsys, "bundle", tmp_path / "model", "--adapter", f"a={directory}", "--switching", "custom-op",
                    "-o", tmp_path / "out", "-q")
    assert_refused(code, err, 'switching = "custom-op" needs a float32 model', "float16", 'switching = "bank"')
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------- 5. multi-pass specs as a user writes them (README)

MLP_INPUTS = '[[capture.inputs]]\nname = "x"\nshape = [4, 3, 64]\ndims = ["batch", "seq", ""]\n'


def _lora_dir(path: Path, seed: int) -> Path:
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=MLP_TARGETS, init_lora_weights=False)
    return save_peft(mlp4(), config, path, seed=seed)


@pytest.mark.slow
def test_load_combine_save_and_bank_export_equal_peft_and_rerun_replaces_the_output(tmp_path, capsys):
    """load a, load b, combine them (cat, weights 0.7 / 0.3), save the result, export all three unmerged in a bank:
    each batch row equals PEFT (its `add_weighted_adapter` for the combination), the saved directory reloads in PEFT
    to the same answer; the same command again replaces the output as a whole (a file added to it is gone)."""
    a, b = _lora_dir(tmp_path / "a", seed=1), _lora_dir(tmp_path / "b", seed=2)
    spec = tmp_path / "spec.toml"
    spec.write_text(f'version = 1\n{MLP_INPUTS}'
                    f'[[pass]]\nname = "load"\npath = {json.dumps(str(a))}\nadapter = "a"\n'
                    f'[[pass]]\nname = "load"\npath = {json.dumps(str(b))}\nadapter = "b"\n'
                    '[[pass]]\nname = "combine"\nadapters = ["a", "b"]\nweights = [0.7, 0.3]\nmethod = "cat"\n'
                    'into = "ab"\n[[pass]]\nname = "save"\nadapter = "ab"\npath = "saved/ab"\n'
                    '[export]\nmode = "unmerged"\nswitching = "bank"\ncheck = true\n')
    out = tmp_path / "out"
    code, err = cli(capsys, "apply", spec, "factories:mlp4", "-o", out, "-q")
    assert code == 0, err
    x = torch.randn(4, 3, 64, generator=torch.Generator().manual_seed(0))
    model = peft_reload(mlp4(), a)
    model.load_adapter(str(b), adapter_name="b")
    want = {}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        model.add_weighted_adapter(["default", "b"], [0.7, 0.3], "ab", combination_type="cat")
        for name, peft_name in (("a", "default"), ("b", "b"), ("ab", "ab")):
            model.set_adapter(peft_name)
            want[name] = model(x).double()
        saved = peft_reload(mlp4(), out / "saved" / "ab")(x).double()
        base = mlp4()(x).double()
    assert min(diff(want[n], base) for n in want) > 1e-3 and diff(saved, want["ab"]) <= ATOL
    with AdapterSession(out) as served:
        (got,) = served.run({"x": x.numpy()}, adapter_ids=["a", "b", "ab", None])
    assert max(diff(got[i], w[i]) for i, w in enumerate((want["a"], want["b"], want["ab"], base))) <= ATOL
    (out / "mine.txt").write_text("a file of mine")
    assert cli(capsys, "apply", spec, "factories:mlp4", "-o", out, "-q")[0] == 0
    assert not (out / "mine.txt").exists() and (out / "saved" / "ab" / "adapter_model.safetensors").is_file()


def test_an_unmerged_export_after_merging_everything_names_the_spec_and_the_merge(tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text(f'version = 1\n{MLP_INPUTS}[[pass]]\nname = "load"\n'
                    f'path = {json.dumps(str(_lora_dir(tmp_path / "a", seed=1)))}\nadapter = "a"\n'
                    '[[pass]]\nname = "merge"\n[export]\nmode = "unmerged"\nswitching = "bank"\n')
    line = spec.read_text().splitlines().index('mode = "unmerged"') + 1
    code, err = cli(capsys, "apply", spec, "factories:mlp4", "-o", tmp_path / "out", "-q")
    assert_refused(code, err, f"{spec}:{line}: mode = \"unmerged\"", "a merge pass folded 'a'", 'mode = "merged"')
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["load", "save"])
def test_bad_pass_paths_fail_before_the_model_is_read(tmp_path, capsys, case):
    """The model path does not exist either: the error names the pass's path, so it was checked first."""
    outside = tmp_path / "taken"
    outside.mkdir()
    passes = ('[[pass]]\nname = "load"\npath = "no_such_adapter"\nadapter = "a"\n' if case == "load" else
              f'[[pass]]\nname = "insert"\ntargets = ["*"]\n[[pass]]\nname = "save"\n'
              f'path = {json.dumps(str(outside))}\nallow_outside = true\n')
    spec = tmp_path / "spec.toml"
    spec.write_text(f"version = 1\n{passes}")
    line = spec.read_text().splitlines().index("path = " + ('"no_such_adapter"' if case == "load" else
                                                             json.dumps(str(outside)))) + 1
    code, err = cli(capsys, "apply", spec, str(tmp_path / "no_such_model"), "-o", tmp_path / "out", "-q")
    why = "no_such_adapter" if case == "load" else "already exists"
    assert_refused(code, err, f"{spec}:{line}", why)
    assert "no_such_model" not in err and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_insert_train_allocate_save_merge_export_equals_peft_reload(tmp_path, capsys, hf_dir):
    """insert -> train -> allocate (half the parameters) -> save -> merge -> merged ONNX (tiny LLaMA): the saved PEFT
    directory, with the allocated per-module ranks, reloaded in PEFT answers as the merged model under ONNX Runtime."""
    from safetensors.torch import save_file
    import onnxruntime as ort

    generator = torch.Generator().manual_seed(0)
    save_file({"input_ids": torch.randint(0, 128, (8, 12), generator=generator),
               "attention_mask": torch.ones(8, 12, dtype=torch.int64)}, tmp_path / "data.safetensors")
    spec = tmp_path / "spec.toml"
    spec.write_text('version = 1\n[data]\npath = "data.safetensors"\nloss = "causal_lm"\nbatch_size = 4\nsteps = 3\n'
                    '[[pass]]\nname = "insert"\nadapter = "t"\nkind = "lora"\ntargets = ["*.q_proj", "*.v_proj"]\n'
                    'rank = 8\ninit = "gaussian"\n[[pass]]\nname = "train"\nadapters = ["t"]\nlr = 0.01\n'
                    '[[pass]]\nname = "allocate"\nadapter = "t"\nbudget = { fraction = 0.5 }\n'
                    '[[pass]]\nname = "save"\nadapter = "t"\npath = "adapters/t"\n[[pass]]\nname = "merge"\n'
                    '[export]\ncheck = true\n')
    out = tmp_path / "out"
    code, err = cli(capsys, "apply", spec, hf_dir("llama"), "-o", out, "-q")
    assert code == 0, err
    config = json.loads((out / "adapters" / "t" / "adapter_config.json").read_text())
    assert config["rank_pattern"] or config["r"] < 8  # the allocation changed ranks
    ids = torch.tensor([[1, 5, 9, 3, 7], [2, 4, 6, 8, 10]])
    with torch.no_grad():
        want = peft_reload(build("llama"), out / "adapters" / "t")(input_ids=ids).logits.numpy()
        base = build("llama")(input_ids=ids).logits.numpy()
    session = ort.InferenceSession(str(out / "model.onnx"))
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())}
    (got,) = session.run(["logits"], {i.name: feeds[i.name] for i in session.get_inputs()})
    assert diff(want, base) > 1e-3 and diff(got, want) <= 1e-4
