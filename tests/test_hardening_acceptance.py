"""Contradictory input is refused, never silently accepted (issue 16, class 4).

1. A model directory whose tensors do not fill the model class (none match, one missing, a wrong shape, one the class
   has no weight for): a ModelLoadError naming the directory and the tensors; tied heads and a head-less class
   (`hf_class`) still load.
2. A config.json `architectures` class that transformers lacks: refused with the nearest names (never AutoModel,
   another head), unless `[model] hf_class` picks the class.
3. A PEFT directory with no tensors, integer / bool tensors, A and B of two ranks, a rank its config does not give,
   a module its `target_modules` (list of suffixes, regex string, exclude_modules, layers_to_transform) does not
   select, or a selected site of the model without tensors: an AdapterFileError naming the file, the key and both
   values.
4. One adapter name made by two different spec entries (two inserts, two loads, a load that does not fit an
   inserted adapter): refused naming both spec locations; the same entry again stays a no-op.
5. Strict types: `rank = "8"`, `alpha = true`, `batch = "2"`, ... are errors at file:line, never coerced.
6. A rank above min(fan_in, d_out) of a site: refused unless `allow_large_rank = true`; an adapter with more
   parameters than its layer: a warning naming the site.
CLI cases exit 2 with one error line and no traceback (tests/test_cli_errors.py's helpers).
"""
from __future__ import annotations

import json
import re
import shutil
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rewrite.errors import AdapterFileError, ModelLoadError, SpecError
from rewrite.formats.peft_lora import read_lora_dir
from rewrite.load import load_model
from rewrite.spec import parse_spec
from test_cli_errors import assert_error, assert_nothing_written, cli, write_spec

NET = "test_hardening_acceptance:net"
HEAD = 'version = 1\n[export]\nformat = "none"\n[[capture.inputs]]\nname = "input"\nshape = [2, 8]\n'  # 6 lines


def net() -> nn.Module:
    """q_proj (8 -> 8) and v_proj (8 -> 4): the sites of every spec below."""
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(q_proj=nn.Linear(8, 8), act=nn.ReLU(), v_proj=nn.Linear(8, 4))).eval()


def apply(capsys, tmp_path: Path, passes: str) -> tuple[int, str]:
    spec, out = write_spec(tmp_path, HEAD + passes), tmp_path / "out"
    code, _, err = cli(capsys, "apply", spec, NET, "-o", out)
    if code:
        assert_nothing_written(out)
    return code, err


# ------------------------------------------------------------------------------------- 1. model directories


def copy_with_tensors(src: Path, dst: Path, change) -> Path:
    """A copy of the HF directory `src` whose model.safetensors is `change(tensors)`."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    save_file(change(dict(tensors)), dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def renamed(tensors: dict) -> dict:
    return {f"backbone.{k}": v for k, v in tensors.items()}


def without_up_proj(tensors: dict) -> dict:
    tensors.pop("model.layers.0.mlp.up_proj.weight")
    return tensors


def narrow_norm(tensors: dict) -> dict:
    tensors["model.norm.weight"] = torch.ones(32)
    return tensors


def with_extra(tensors: dict) -> dict:
    tensors["model.layers.0.extra.weight"] = torch.ones(4)
    return tensors


WEIGHT_CASES = {
    "none_match": (renamed, ["21 model weights missing from the files", "model.embed_tokens.weight",
                             "21 tensors the model has no weight for", "backbone.lm_head.weight"]),
    "one_missing": (without_up_proj, ["1 model weights missing", "model.layers.0.mlp.up_proj.weight"]),
    "wrong_shape": (narrow_norm, ["tensors of the wrong shape", "model.norm.weight (file (32,), model (64,))"]),
    "unused_tensor": (with_extra, ["1 tensors the model has no weight for", "model.layers.0.extra.weight"]),
}


@pytest.mark.parametrize("case", list(WEIGHT_CASES))
def test_weights_that_do_not_fill_the_model_are_refused(case, hf_dir, tmp_path, capsys):
    change, expected = WEIGHT_CASES[case]
    model = copy_with_tensors(hf_dir("llama"), tmp_path / "model", change)
    with pytest.raises(ModelLoadError, match="would initialise the rest at random") as caught:
        load_model(str(model))
    for text in (str(model), *expected):
        assert text in str(caught.value)
    code, _, err = cli(capsys, "inspect", model)
    assert_error(code, err, str(model), expected[0])


def test_tied_heads_and_a_headless_class_still_load(hf_dir, tmp_path):
    assert "lm_head.weight" not in load_file(hf_dir("gpt2") / "model.safetensors")  # tied to wte: not saved
    assert load_model(str(hf_dir("gpt2"))).module.lm_head.weight is not None
    config = json.loads((hf_dir("llama") / "config.json").read_text())
    tied = tmp_path / "tied"
    shutil.copytree(hf_dir("llama"), tied)
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    save_file({k: v for k, v in load_file(tied / "model.safetensors").items() if k != "lm_head.weight"},
              tied / "model.safetensors", metadata={"format": "pt"})
    model = load_model(str(tied)).module
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # a checkpoint with a head into the class without one: lm_head.weight is legitimately unused
    assert type(load_model(str(hf_dir("llama")), hf_class="LlamaModel").module).__name__ == "LlamaModel"


# --------------------------------------------------------------------------------- 2. architectures class


def with_architectures(src: Path, dst: Path, architectures) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "architectures": architectures}))
    return dst


@pytest.mark.parametrize("name", ["LlamaForCasualLM", "AutoConfig", "logging"])
def test_unknown_architectures_class_is_refused_with_nearest(name, hf_dir, tmp_path, capsys):
    model = with_architectures(hf_dir("llama"), tmp_path / "model", [name])
    with pytest.raises(ModelLoadError) as caught:
        load_model(str(model))
    message = str(caught.value)
    assert f"{model}/config.json 'architectures': transformers has no model class {name!r}" in message
    assert "[model] hf_class" in message
    if name == "LlamaForCasualLM":
        assert "Did you mean: 'LlamaForCausalLM'" in message
    code, _, err = cli(capsys, "inspect", model)
    assert_error(code, err, repr(name))


def test_explicit_hf_class_overrides_a_bad_architectures(hf_dir, tmp_path, capsys):
    model = with_architectures(hf_dir("llama"), tmp_path / "model", ["LlamaForCasualLM"])
    assert type(load_model(str(model), hf_class="LlamaForCausalLM").module).__name__ == "LlamaForCausalLM"
    with pytest.raises(ModelLoadError, match=r"\[model\] hf_class: transformers has no model class 'LamaModel'.*"
                                             r"Did you mean: 'LlamaModel'"):
        load_model(str(model), hf_class="LamaModel")


# ------------------------------------------------------------------------------------------ 3. PEFT dirs


def peft_dir(root: Path, tensors: dict[str, torch.Tensor] | None = None, **config) -> Path:
    """A PEFT directory for `net` (q_proj and v_proj at rank 2 unless told otherwise)."""
    root.mkdir()
    base = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}
    (root / "adapter_config.json").write_text(json.dumps({**base, **config}))
    if tensors is None:
        tensors = {**lora("q_proj", 8, 8), **lora("v_proj", 8, 4)}
    save_file(tensors, root / "adapter_model.safetensors")
    return root


def lora(module: str, d_in: int, d_out: int, rank: int = 2, dtype=torch.float32) -> dict[str, torch.Tensor]:
    return {f"base_model.model.{module}.lora_A.weight": torch.randn(rank, d_in).to(dtype),
            f"base_model.model.{module}.lora_B.weight": torch.randn(d_out, rank).to(dtype)}


PEFT_CASES = {
    "no_tensors": (dict(tensors={}), ["adapter_model.safetensors: holds no LORA tensors"]),
    "integer_tensors": (dict(tensors=lora("q_proj", 8, 8, dtype=torch.int64)),
                        ["tensor 'base_model.model.q_proj.lora_A.weight' is int64", "floats"]),
    "bool_tensors": (dict(tensors=lora("q_proj", 8, 8, dtype=torch.bool)), ["is bool"]),
    "a_and_b_of_two_ranks": (dict(tensors={**lora("q_proj", 8, 8), "base_model.model.q_proj.lora_B.weight":
                                           torch.randn(8, 3)}),
                             ["module 'q_proj': lora_A.weight has shape (2, 8) and lora_B.weight (8, 3)"]),
    "rank_not_the_configs": (dict(r=8), ["tensor 'base_model.model.q_proj.lora_A.weight' has rank 2",
                                         "adapter_config.json says 'r' = 8 for 'q_proj'"]),
    "rank_pattern_not_the_tensors": (dict(rank_pattern={"v_proj": 4}),
                                     ["'base_model.model.v_proj.lora_A.weight' has rank 2",
                                      "says 'rank_pattern'['v_proj'] = 4 for 'v_proj'"]),
    "module_not_targeted": (dict(target_modules=["q_proj"]),
                            ["adapter_config.json: 'target_modules' = ['q_proj'] does not select 'v_proj'",
                             "adapter_model.safetensors holds its tensors"]),
    "regex_target_is_a_full_match": (dict(target_modules=r".*\.q_proj|v_proj"),
                                     ["'target_modules' = '.*\\\\.q_proj|v_proj' does not select 'q_proj'"]),
    "excluded_module": (dict(exclude_modules=["v_proj"]),
                        ["does not select 'v_proj'", "(exclude_modules = ['v_proj'])"]),
    "bad_pattern_regex": (dict(rank_pattern={"q_proj(": 2}),
                          ["adapter_config.json: 'rank_pattern': 'q_proj(' is not a valid regular expression"]),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_dir_whose_config_and_tensors_disagree(case, tmp_path):
    kwargs, expected = PEFT_CASES[case]
    adapter = peft_dir(tmp_path / "lora", **kwargs)
    with pytest.raises(AdapterFileError) as caught:
        read_lora_dir(adapter)
    for text in (str(adapter), *expected):
        assert text in str(caught.value)


def test_peft_targeting_rules_as_peft_applies_them(tmp_path):
    """Suffix match on dotted paths, a regex matched in full, and layers_to_transform."""
    tensors = {**lora("model.layers.0.q_proj", 8, 8), **lora("model.layers.1.q_proj", 8, 8)}
    adapter = read_lora_dir(peft_dir(tmp_path / "suffix", tensors, target_modules=["q_proj"]))
    assert adapter.targets("model.layers.1.q_proj") and not adapter.targets("model.layers.1.xq_proj")
    adapter = read_lora_dir(peft_dir(tmp_path / "regex", tensors, target_modules=r"model\.layers\.\d\.q_proj"))
    assert adapter.targets("model.layers.3.q_proj") and not adapter.targets("q_proj")
    with pytest.raises(AdapterFileError, match="does not select 'model.layers.1.q_proj'"):
        read_lora_dir(peft_dir(tmp_path / "layers", tensors, target_modules=["q_proj"], layers_to_transform=[0]))


def test_selected_site_without_tensors_is_refused(tmp_path, capsys):
    """target_modules names v_proj, the model has it, the file has nothing for it (PEFT would have saved it)."""
    adapter = peft_dir(tmp_path / "lora", lora("q_proj", 8, 8))
    code, err = apply(capsys, tmp_path, f'[[pass]]\nname = "load"\npath = {json.dumps(str(adapter))}\n')
    assert_error(code, err, "while running pass[0] 'load'", f"{adapter}/adapter_config.json",
                 "'target_modules' = ['q_proj', 'v_proj'] selects 'v_proj'", "has no tensors for it")


def test_consistent_peft_dir_loads(tmp_path, capsys):
    adapter = peft_dir(tmp_path / "lora", rank_pattern={"v_proj": 1},
                       tensors={**lora("q_proj", 8, 8), **lora("v_proj", 8, 4, rank=1)})
    code, err = apply(capsys, tmp_path, f'[[pass]]\nname = "load"\npath = {json.dumps(str(adapter))}\n')
    assert code == 0, err


# ---------------------------------------------------------------------------------- 4. one name, one maker


INSERT = '[[pass]]\nname = "insert"\nadapter = "a"\ntargets = ["q_proj"]\nrank = {rank}\n'


def test_second_insert_with_other_settings_names_both_entries(tmp_path, capsys):
    code, err = apply(capsys, tmp_path, INSERT.format(rank=2) + INSERT.format(rank=4))
    assert_error(code, err, "while running pass[1] 'insert'", f"{tmp_path / 'spec.toml'}:12: adapter 'a' was "
                 f"already made by the insert at {tmp_path / 'spec.toml'}:7", "rank = 4 here, 2 there",
                 "give this one another name")


def test_the_same_insert_twice_is_a_no_op(tmp_path, capsys):
    code, err = apply(capsys, tmp_path, INSERT.format(rank=2) * 2)
    assert code == 0, err


def saved(tmp_path: Path, capsys, name: str, rank: int = 2, targets: str = '["q_proj"]', alpha: float = 8.0) -> Path:
    """An adapter file (ours) made by `insert` + `save` on `net`."""
    out = tmp_path / f"made_{name}"
    spec = write_spec(tmp_path, HEAD + f'[[pass]]\nname = "insert"\ntargets = {targets}\nrank = {rank}\n'
                      f'alpha = {alpha}\ninit = "gaussian"\n[[pass]]\nname = "save"\npath = "{name}.safetensors"\n'
                      'format = "rewrite"\n', name=f"make_{name}.toml")
    assert cli(capsys, "apply", spec, NET, "-o", out)[0] == 0
    return out / f"{name}.safetensors"


def load(path: Path, adapter: str = "a") -> str:
    return f'[[pass]]\nname = "load"\nadapter = "{adapter}"\npath = {json.dumps(str(path))}\n'


def test_two_files_loaded_under_one_name_are_refused(tmp_path, capsys):
    first, second = saved(tmp_path, capsys, "one"), saved(tmp_path, capsys, "two", alpha=4.0)
    code, err = apply(capsys, tmp_path, load(first) + load(second))
    assert_error(code, err, "while running pass[1] 'load'", "adapter 'a' was made by the load at",
                 "spec.toml:7", "it holds the weights of another file", "two.safetensors")
    assert apply(capsys, tmp_path, load(first) + load(first))[0] == 0  # the same file again: a no-op


def test_load_into_an_inserted_adapter_must_fit_it(tmp_path, capsys):
    both = saved(tmp_path, capsys, "both", targets='["q_proj", "v_proj"]')
    code, err = apply(capsys, tmp_path, INSERT.format(rank=2) + load(both))
    assert_error(code, err, "while running pass[1] 'load'", "adapter 'a' was made by the insert at",
                 "spec.toml:7", "the file covers 2 sites, the adapter 1; they differ at ['v_proj']")
    other_scale = saved(tmp_path, capsys, "scaled", alpha=3.0)
    code, err = apply(capsys, tmp_path, INSERT.format(rank=2) + load(other_scale))
    assert_error(code, err, "the file sets other settings: q_proj (alpha 8.0 there, 3.0 in the file)")
    fits = saved(tmp_path, capsys, "fits")  # same site, rank and scale: the insert's adapter gets these weights
    assert apply(capsys, tmp_path, INSERT.format(rank=2) + load(fits))[0] == 0


# ---------------------------------------------------------------------------------------- 5. strict types


STRICT_CASES = {
    "rank_from_string": ('[[pass]]\nname = "insert"\ntargets = ["q_proj"]\nrank = "8"\n',
                         ["spec.toml:10", "'pass[0].rank'", "valid integer", "'8'"]),
    "alpha_from_bool": ('[[pass]]\nname = "insert"\ntargets = ["q_proj"]\nalpha = true\n',
                        ["spec.toml:10", "'pass[0].alpha'", "valid number", "True"]),
    "rank_from_float": ('[[pass]]\nname = "insert"\ntargets = ["q_proj"]\nrank = 8.0\n',
                        ["spec.toml:10", "'pass[0].rank'", "valid integer", "8.0"]),
    "rank_pattern_value_from_string": ('[[pass]]\nname = "insert"\ntargets = ["q_proj"]\n'
                                       'rank_pattern = { q_proj = "2" }\n',
                                       ["spec.toml:10", "'pass[0].rank_pattern.q_proj'", "valid integer"]),
    "flag_from_int": ('[[pass]]\nname = "merge"\nkeep_original = 1\n',
                      ["spec.toml:9", "'pass[0].keep_original'", "valid boolean", "1"]),
    "capture_batch_from_string": ('[capture]\nbatch = "2"\n', ["spec.toml:8", "'capture.batch'", "valid integer"]),
    "data_steps_from_string": ('[data]\npath = "d.npz"\nsteps = "3"\n',
                               ["spec.toml:9", "'data.steps'", "valid integer"]),
    "trust_pickle_from_string": ('[model]\ntrust_pickle = "yes"\n',
                                 ["spec.toml:8", "'model.trust_pickle'", "valid boolean", "'yes'"]),
}


@pytest.mark.parametrize("case", list(STRICT_CASES))
def test_values_are_never_coerced(case, tmp_path, capsys):
    text, expected = STRICT_CASES[case]
    spec, out = write_spec(tmp_path, HEAD + text), tmp_path / "out"
    with pytest.raises(SpecError) as caught:
        parse_spec(spec.read_text(), spec)
    for item in expected:
        assert item in str(caught.value)
    code, _, err = cli(capsys, "apply", spec, NET, "-o", out)
    assert_error(code, err, *expected)
    assert_nothing_written(out)


def test_an_integer_is_still_a_valid_float(tmp_path):
    spec = parse_spec(HEAD + '[[pass]]\nname = "insert"\ntargets = ["q_proj"]\nalpha = 16\ndropout = 0\n')
    assert spec.passes[0].options.alpha == 16.0


# ------------------------------------------------------------------------------------------- 6. rank limits


def test_rank_above_the_layer_is_refused_unless_allowed(tmp_path, capsys):
    code, err = apply(capsys, tmp_path, '[[pass]]\nname = "insert"\ntargets = ["v_proj"]\nrank = 6\n')
    assert_error(code, err, "spec.toml:10: rank 6 at v_proj is above 4", "8 x 4 layer",
                 'rank_pattern = { "v_proj" = 4 }', "allow_large_rank = true")
    code, err = apply(capsys, tmp_path, '[[pass]]\nname = "insert"\ntargets = ["q_proj", "v_proj"]\nrank = 2\n'
                                        'rank_pattern = { v_proj = 5 }\n')
    assert_error(code, err, "spec.toml:11: rank 5 at v_proj is above 4")  # the rank_pattern line
    with warnings.catch_warnings(record=True):
        code, err = apply(capsys, tmp_path, '[[pass]]\nname = "insert"\ntargets = ["v_proj"]\nrank = 6\n'
                                            'allow_large_rank = true\n')
    assert code == 0, err


def test_adapter_larger_than_its_layer_is_a_warning(tmp_path, capsys):
    """The CLI prints the warning as one `warning:` line on stderr (rewrite.cli)."""
    code, err = apply(capsys, tmp_path, '[[pass]]\nname = "insert"\ntargets = ["v_proj"]\nrank = 3\n')
    assert code == 0
    assert re.search(r"warning: \S*spec\.toml:\d+: insert 'default': the adapter has more parameters than the layer it "
                     r"adapts at v_proj \(rank 3, 8 x 4\).*allow_large_rank = true", err), err
    code, err = apply(capsys, tmp_path, '[[pass]]\nname = "insert"\ntargets = ["v_proj"]\nrank = 2\n')
    assert code == 0 and "warning" not in err  # rank 2: 2 * (8 + 4) = 24 parameters < 32, no warning
