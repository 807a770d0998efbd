"""NaN / Inf are refused wherever numbers enter, naming the file and the key or tensor.

A non-finite spec number, adapter weight, adapter config value or calibration value raises nothing further down:
the exported model just answers NaN. Each is refused where it is read: spec numbers (any float option, pattern
values, free-form allocator tables), PEFT directories (tensors and adapter_config.json numbers), our adapter
.safetensors files, calibration data (a [data] file, a [data] factory's batches) and the runtime's
`AdapterSession.add_adapter` (dicts, .onnx_adapter files, PEFT directories). Through the CLI each is exit 2
without a traceback and no output directory. Everything runs on the 4 x Linear(64, 64) factory model.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from rewrite.cli import main
from rewrite.data import DataSource
from rewrite.errors import AdapterFileError, DataError, SpecError
from rewrite.finite import nonfinite_count, nonfinite_key
from rewrite.formats.adapter_file import read_adapter_file
from rewrite.formats.onnx_adapter import write_onnx_adapter
from rewrite.formats.peft_lora import alpha_of, read_lora_dir
from rewrite.passes import REGISTRY
from rewrite.runtime.session import AdapterSession
from rewrite.options import DataOptions
from rewrite.spec import parse_spec

MLP_INPUTS = '[[capture.inputs]]\nname = "x"\nshape = [4, 64]\n'
NAN_B = "base_model.model.layers.1.lora_B.weight"


# ---------------------------------------------------------------------------------------------- helpers


def peft_dir(root: Path, *, config_text: str | None = None, poison: str | None = None) -> Path:
    """A PEFT LoRA directory for layers.0 and layers.1 of factories:mlp4 (rank 2); `poison` gets 3 NaNs."""
    root.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["layers.0", "layers.1"],
              "bias": "none", "rank_pattern": {}, "alpha_pattern": {}}
    (root / "adapter_config.json").write_text(config_text or json.dumps(config))
    g = torch.Generator().manual_seed(0)
    tensors = {f"base_model.model.layers.{i}.lora_{ab}.weight": torch.randn(shape, generator=g)
               for i in (0, 1) for ab, shape in (("A", (2, 64)), ("B", (64, 2)))}
    if poison:
        tensors[poison][:3, 0] = torch.tensor([math.nan, math.inf, -math.inf])
    save_file(tensors, root / "adapter_model.safetensors")
    return root


def config_with(**values) -> str:
    """adapter_config.json text with `values` spliced in as raw JSON (so NaN / Infinity literals survive)."""
    base = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["layers.0", "layers.1"], "bias": "none"}
    fields = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in base.items() if k not in values]
    fields += [f"{json.dumps(k)}: {v}" for k, v in values.items()]
    return "{" + ", ".join(fields) + "}"


def cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, out: Path, *expected: str) -> None:
    """Exit 2, one message without a traceback holding every expected text, no output directory."""
    assert code == 2, err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, f"{text!r} not in:\n{err}"
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- helpers


def test_nonfinite_helpers():
    assert nonfinite_count(torch.tensor([1.0, math.nan, math.inf], dtype=torch.bfloat16)) == 2
    assert nonfinite_count(np.array([[np.nan, 1], [2, -np.inf]], np.float16)) == 2
    assert nonfinite_count(torch.arange(5)) == 0 and nonfinite_count(np.arange(5)) == 0
    assert nonfinite_key({"a": 1.0, "b": {"c.d": [1, math.inf]}}) == "b['c.d'][1]"
    assert nonfinite_key({"a": [1.0, {"x": 2}], "b": "nan", "c": True}) is None


# ---------------------------------------------------------------------------------------------- spec

INSERT = 'version = 1\n[[pass]]\nname = "insert"\ntargets = ["layers.*"]\n'  # option lines start at line 5
SPEC_CASES = {
    "alpha_nan": (INSERT + "alpha = nan\n", ["spec.toml:5", "'pass[0].alpha'", "finite number", "nan"]),
    "alpha_inf": (INSERT + "alpha = -inf\n", ["spec.toml:5", "'pass[0].alpha'", "finite number", "-inf"]),
    "alpha_pattern_nan": (INSERT + 'alpha_pattern = { "layers.1" = nan }\n',
                          ["spec.toml:5", "'pass[0].alpha_pattern.layers.1'", "finite number"]),
    "rank_pattern_inf": (INSERT + 'rank_pattern = { "layers.1" = inf }\n',
                         ["spec.toml:5", "'pass[0].rank_pattern.layers.1'", "valid integer", "inf"]),
    "dropout_nan": (INSERT + "dropout = nan\n", ["spec.toml:5", "'pass[0].dropout'", "finite number"]),
    "data_lr_inf": ('version = 1\n[data]\npath = "d.npz"\nlr = inf\n', ["spec.toml:4", "'data.lr'", "finite number"]),
    "input_high_nan": ('version = 1\n[[capture.inputs]]\nname = "x"\nshape = [2]\nhigh = nan\n',
                      ["spec.toml:5", "'capture.inputs[0].high'", "finite number"]),
    "allocator_table_nan": ('version = 1\n[[pass]]\nname = "allocate"\nscorer = "adalora"\n'
                            "adalora = { beta1 = nan }\n", ["spec.toml:5", "'pass[0].adalora'", "beta1", "NaN"]),
    "settings_list_inf": ('version = 1\n[[pass]]\nname = "train"\nallocator = "increlora"\n'
                          "increlora = { schedule = [1.0, -inf] }\n",
                          ["spec.toml:5", "'pass[0].increlora'", "schedule[1]", "NaN or Infinity"]),
}


@pytest.mark.parametrize("case", list(SPEC_CASES))
def test_spec_refuses_nonfinite_numbers(case, tmp_path):
    text, expected = SPEC_CASES[case]
    with pytest.raises(SpecError) as err:
        parse_spec(text, tmp_path / "spec.toml")
    for part in expected:
        assert part in str(err.value), f"{part!r} not in:\n{err.value}"


def test_pass_options_refuse_nonfinite_from_python():
    insert = REGISTRY["insert"]
    for bad in (dict(alpha=math.nan), dict(alpha_pattern={"layers.0": math.inf})):
        with pytest.raises(ValidationError, match="finite number"):
            insert.Options(targets=["layers.*"], **bad)
    with pytest.raises(ValidationError, match="finite number"):
        DataOptions(path="d.npz", warmup=math.nan)


def test_spec_control_finite_values_parse(tmp_path):
    spec = parse_spec(INSERT + 'alpha = 16.0\nalpha_pattern = { "layers.1" = 0.5 }\n', tmp_path / "spec.toml")
    assert spec.passes[0].options.alpha_pattern == {"layers.1": 0.5}


def test_cli_spec_with_nan_exits_2(tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text(INSERT + "alpha = nan\n")
    out = tmp_path / "out"
    code, err = cli(capsys, "apply", spec, "factories:mlp4", "-o", out)
    assert_refused(code, err, out, f"{spec}:5", "'pass[0].alpha'", "finite number")


# ---------------------------------------------------------------------------------------------- PEFT dirs


def test_peft_tensor_with_nan_names_file_and_key(tmp_path):
    adapter = peft_dir(tmp_path / "lora", poison=NAN_B)
    with pytest.raises(AdapterFileError) as err:
        read_lora_dir(adapter)
    assert str(err.value).startswith(f"{adapter / 'adapter_model.safetensors'}: tensor '{NAN_B}' has 3 NaN/Inf values")


PEFT_CONFIG_CASES = {
    "lora_alpha_nan": (dict(lora_alpha="NaN"), "'lora_alpha' is NaN or Infinity"),
    "lora_alpha_overflow": (dict(lora_alpha="1e999"), "'lora_alpha' is NaN or Infinity"),
    "alpha_pattern_inf": (dict(alpha_pattern='{"layers.1": -Infinity}'), "'alpha_pattern['layers.1']' is NaN"),
    "rank_pattern_nan": (dict(rank_pattern='{"layers.1": NaN}'), "'rank_pattern['layers.1']' is NaN"),
    "dropout_nan": (dict(lora_dropout="NaN"), "'lora_dropout' is NaN or Infinity"),
    "r_fraction": (dict(r="8.5"), "'r' is 8.5; expected a whole number >= 1"),
    "r_bool": (dict(r="true"), "'r' is True; expected a whole number >= 1"),
    "r_string": (dict(r='"8"'), "'r' is '8'; expected a whole number >= 1"),
    "r_zero": (dict(r="0"), "'r' is 0; expected a whole number >= 1"),
    "lora_alpha_string": (dict(lora_alpha='"16"'), "'lora_alpha' is '16'; expected a number"),
    "rank_pattern_float": (dict(rank_pattern='{"layers.1": 4.0}'), "'rank_pattern['layers.1']' is 4.0; expected a whole"),
    "alpha_pattern_bool": (dict(alpha_pattern='{"layers.1": false}'), "'alpha_pattern['layers.1']' is False"),
    "alpha_pattern_list": (dict(alpha_pattern="[1, 2]"), "'alpha_pattern' is [1, 2]; expected an object"),
}


@pytest.mark.parametrize("case", list(PEFT_CONFIG_CASES))
def test_peft_config_numbers(case, tmp_path):
    values, expected = PEFT_CONFIG_CASES[case]
    adapter = peft_dir(tmp_path / "lora", config_text=config_with(**values))
    with pytest.raises(AdapterFileError) as err:
        read_lora_dir(adapter)
    assert str(err.value).startswith(f"{adapter / 'adapter_config.json'}: {expected}"), str(err.value)


def test_peft_control_dir_reads(tmp_path):
    adapter = read_lora_dir(peft_dir(tmp_path / "lora", config_text=config_with(
        lora_alpha="4.5", rank_pattern='{"layers.1": 2}', alpha_pattern='{"layers.1": 8}')))
    assert alpha_of(adapter, "layers.1") == 8.0 and alpha_of(adapter, "layers.0") == 4.5


def load_spec(tmp_path: Path, adapter: Path) -> Path:
    spec = tmp_path / "spec.toml"
    spec.write_text(f'version = 1\n[export]\nformat = "none"\n{MLP_INPUTS}'
                    f'[[pass]]\nname = "load"\npath = {json.dumps(str(adapter))}\n')
    return spec


def test_cli_peft_nan_exits_2(tmp_path, capsys):
    adapter = peft_dir(tmp_path / "lora", poison=NAN_B)
    out = tmp_path / "out"
    code, err = cli(capsys, "apply", load_spec(tmp_path, adapter), "factories:mlp4", "-o", out)
    assert_refused(code, err, out, "'load'", str(adapter / "adapter_model.safetensors"), NAN_B, "NaN/Inf")


def test_cli_peft_config_nan_exits_2(tmp_path, capsys):
    adapter = peft_dir(tmp_path / "lora", config_text=config_with(lora_alpha="NaN"))
    out = tmp_path / "out"
    code, err = cli(capsys, "apply", load_spec(tmp_path, adapter), "factories:mlp4", "-o", out)
    assert_refused(code, err, out, str(adapter / "adapter_config.json"), "'lora_alpha' is NaN or Infinity")


# ---------------------------------------------------------------------------------------------- our adapter files

SITE_INFO = {"op": "linear", "rank": 2, "alpha": 4.0, "rslora": False, "d_in": 64, "d_out": 64}


def our_file(path: Path, *, info: dict | None = None, fill: float = 0.5) -> Path:
    """Our adapter file for layers.0, written by hand (our writer refuses a non-finite alpha)."""
    meta = {"format": "rewrite-adapter", "version": 1, "adapter": "ours", "kind": "lora",
            "sites": {"layers.0": info or SITE_INFO}}
    tensors = {"layers.0.lora_A": torch.full((64, 2), 0.5), "layers.0.lora_B": torch.full((2, 64), fill)}
    save_file(tensors, path, metadata={"rewrite": json.dumps(meta)})
    return path


def test_our_adapter_file_with_inf(tmp_path):
    path = our_file(tmp_path / "ours.safetensors", fill=math.inf)
    with pytest.raises(AdapterFileError) as err:
        read_adapter_file(path)
    assert str(err.value).startswith(f"{path}: tensor 'layers.0.lora_B' has 128 NaN/Inf values")


def test_our_adapter_file_with_nan_alpha(tmp_path):
    path = our_file(tmp_path / "ours.safetensors", info=dict(SITE_INFO, alpha=math.nan))
    with pytest.raises(AdapterFileError) as err:
        read_adapter_file(path)
    assert str(err.value).startswith(f"{path}: metadata 'sites['layers.0']['alpha']' is NaN or Infinity")
    assert read_adapter_file(our_file(tmp_path / "good.safetensors")).sites["layers.0"].alpha == 4.0


# ---------------------------------------------------------------------------------------------- calibration data


def data_source(path: Path) -> DataSource:
    return DataSource(DataOptions(path=str(path), batch_size=4), path.parent, ["x"])


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".pt"])
def test_data_file_with_nan(tmp_path, suffix):
    x = torch.randn(8, 64)
    x[5, 7] = math.nan
    tensors = {"x": x, "labels": torch.zeros(8, dtype=torch.long)}
    path = tmp_path / f"data{suffix}"
    if suffix == ".npz":
        np.savez(path, **{k: v.numpy() for k, v in tensors.items()})
    elif suffix == ".safetensors":
        save_file(tensors, path)
    else:
        torch.save(tensors, path)
    with pytest.raises(DataError) as err:
        data_source(path)
    assert str(err.value).startswith(f"[data] path: {path}: tensor 'x' has 1 NaN/Inf value;")


def batches_with_inf():
    """A [data] factory whose second batch holds an Inf."""
    for index in range(3):
        x = torch.randn(4, 64)
        if index == 1:
            x[0, 0] = math.inf
        yield {"x": x, "labels": torch.zeros(4, dtype=torch.long)}


def test_factory_batch_with_inf():
    factory = f"{__name__}:batches_with_inf"
    source = DataSource(DataOptions(factory=factory), Path("."), ["x"])
    batches = source.batches()
    assert next(batches)["x"].shape == (4, 64)
    with pytest.raises(DataError, match=rf"^\[data\] factory {factory}: batch 1: tensor 'x' has 1 NaN/Inf value;"):
        next(batches)


def test_cli_data_file_with_nan_exits_2(tmp_path, capsys):
    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    x[0, 0] = np.inf
    np.savez(tmp_path / "train.npz", x=x, labels=np.zeros(8, np.int64))
    spec = tmp_path / "spec.toml"
    spec.write_text(f'version = 1\n[export]\nformat = "none"\n{MLP_INPUTS}[data]\npath = "train.npz"\nsteps = 2\n'
                    '[[pass]]\nname = "insert"\ntargets = ["layers.*"]\n[[pass]]\nname = "train"\n')
    out = tmp_path / "out"
    code, err = cli(capsys, "apply", spec, "factories:mlp4", "-o", out)
    assert_refused(code, err, out, f"[data] path: {tmp_path / 'train.npz'}: tensor 'x' has 1 NaN/Inf value")


# ---------------------------------------------------------------------------------------------- runtime


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """A bank export of factories:mlp4 with one inserted adapter, rank 2 on layers.0 .. layers.3."""
    work = tmp_path_factory.mktemp("nonfinite_runtime")
    spec = work / "spec.toml"
    spec.write_text(f'version = 1\n{MLP_INPUTS}[[pass]]\nname = "insert"\ntargets = ["layers.*"]\nrank = 2\n'
                    'adapter = "base"\n[export]\nmode = "unmerged"\nswitching = "bank"\ncapacity = 2\n')
    assert main(["apply", str(spec), "factories:mlp4", "-o", str(work / "out"), "-q"]) == 0
    with AdapterSession(work / "out") as s:
        yield s


def factors(bad: float | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    a, b = np.full((64, 2), 0.01, np.float32), np.full((2, 64), 0.01, np.float32)
    if bad is not None:
        b[1, :2] = bad
    return {"layers.0": (a, b)}


def site_input(session: AdapterSession, site: str, part: str) -> str:
    return next(getattr(s, part) for s in session.entry.sites if s.site == site)


def test_add_adapter_dict_with_nan(session):
    with pytest.raises(AdapterFileError) as err:
        session.add_adapter("bad", factors(math.nan))
    name = site_input(session, "layers.0", "B")
    assert str(err.value).startswith(f"<adapter dict>: site 'layers.0': tensor '{name}' has 2 NaN/Inf values")
    assert session.adapters == ["base"]


def test_add_adapter_onnx_adapter_with_inf(session, tmp_path):
    a, b = factors(math.inf)["layers.0"]
    names = site_input(session, "layers.0", "A"), site_input(session, "layers.0", "B")
    path = tmp_path / "bad.onnx_adapter"
    write_onnx_adapter(path, dict(zip(names, (a, b))), session.entry.model_version)
    with pytest.raises(AdapterFileError) as err:
        session.add_adapter("bad", path)
    assert str(err.value).startswith(f"{path}: site 'layers.0': tensor '{names[1]}' has 2 NaN/Inf values")
    assert session.adapters == ["base"]


def test_add_adapter_peft_dir_with_nan(session, tmp_path):
    adapter = peft_dir(tmp_path / "lora", poison=NAN_B)
    with pytest.raises(AdapterFileError, match=f"tensor '{NAN_B}' has 3 NaN/Inf values"):
        session.add_adapter("bad", adapter)
    with pytest.raises(AdapterFileError, match="'lora_alpha' is NaN or Infinity"):
        session.add_adapter("bad", peft_dir(tmp_path / "lora2", config_text=config_with(lora_alpha="Infinity")))
    assert session.adapters == ["base"]


def test_add_adapter_control_finite(session):
    session.add_adapter("good", factors())
    assert session.adapters == ["base", "good"]
    session.remove_adapter("good")
