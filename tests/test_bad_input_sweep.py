"""Bad input the other CLI tests do not hold: each is refused with exit code 2, one `error:` line naming the file,
key or flag and what was expected, and OUT is never written.

Spec: [[capture.inputs]] that contradict themselves (repeated names, one dim name for two sizes, dims of the wrong
length, an empty [low, high) range, a shape too large to draw), a negative `[data] output` index, an adapter
exported twice, a pass writing a file another pass or the export writes (it would be replaced silently), a
byte-order mark (accepted). MODEL: a config.json value of the wrong type, a weight holding NaN. [data]: a file with
no examples (it used to loop forever), tensors whose dtype, rank or static sizes do not fit the captured inputs
(they used to fail inside the graph as an internal error), class labels out of range (an IndexError inside the
loss) or fractional (truncated silently), a .pt data file holding pickled objects (refused naming the class,
without torch's advice on how to unpickle it anyway). Flags: NaN / out-of-range numbers for `bundle`, `combine`
and `serve` (refused before Ray starts). The oracle is the input itself: each message must name what was wrong in
it; a control next to each group (fitting data, a re-run save, ignored labels) still runs.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from rewrite.cli import main

MODEL = "tests.factories:mlp"  # Linear(16, 32) -> ReLU -> Linear(32, 8); forward(input)
INPUT = '[[capture.inputs]]\nname = "input"\nshape = [2, 16]\n'
HEAD = 'version = 1\n[export]\nformat = "none"\n'
TRAIN = '[[pass]]\nname = "insert"\ntargets = ["0"]\nrank = 2\n[[pass]]\nname = "train"\n'


def nan_net() -> nn.Module:
    """A factory whose module holds a NaN weight."""
    net = nn.Sequential(nn.Linear(16, 8))
    with torch.no_grad():
        net[0].weight[0, 0] = float("nan")
    return net


def drifting_batches():
    """A [data] factory whose second batch no longer fits: float64 inputs, then no inputs at all."""
    yield dict(input=torch.randn(4, 16), labels=torch.randn(4, 8))
    yield dict(input=torch.randn(4, 16, dtype=torch.float64), labels=torch.randn(4, 8))


def run(capsys, spec_text: str | bytes | None, tmp_path: Path, *argv, model: str = MODEL) -> str:
    """`rewrite apply` (or `argv` as given when spec_text is None): exit code 2, one error line, OUT not written;
    returns that line."""
    out = tmp_path / "out"
    if spec_text is not None:
        spec = tmp_path / "spec.toml"
        spec.write_bytes(spec_text if isinstance(spec_text, bytes) else spec_text.encode())
        argv = ("apply", spec, model, "-o", out, *argv)
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "internal error" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
    return err[err.index("error:"):]


TWO = ('[[pass]]\nname = "insert"\ntargets = ["0"]\nadapter = "a"\n'
       '[[pass]]\nname = "insert"\ntargets = ["0"]\nadapter = "b"\n')
SAVE = '[[pass]]\nname = "save"\nadapter = "{}"\npath = "{}"\n'
SPEC_CASES = {
    "repeated input name": (HEAD + INPUT + INPUT,
                            ["spec.toml:4", "'capture.inputs'", "['input'] given more than once"]),
    "one dim name, two sizes": (HEAD + INPUT + 'dims = ["b", "b"]\n',
                                ["spec.toml:4", "dim 'b' is 2 on axis 0", "but 16 on axis 1"]),
    "dims of the wrong length": (HEAD + INPUT + 'dims = ["batch"]\n',
                                 ["spec.toml:4", "dims has 1 entries for shape [2, 16]"]),
    "float range reversed": (HEAD + INPUT + 'low = 5.0\nhigh = 1.0\n',
                             ["spec.toml:4", "low = 5.0 and high = 1.0", "expected low <= high"]),
    "empty integer range": (HEAD + INPUT + 'dtype = "int64"\nlow = 3\nhigh = 3\n',
                            ["spec.toml:4", "leave no values", "expected low < high"]),
    "an example input too large to draw": (HEAD + INPUT.replace("[2, 16]", "[2, 100000000000]"),
                                           ["spec.toml:6", "200000000000 elements", "keep it under"]),
    "negative output index": (HEAD + INPUT + '[data]\nfactory = "a.b:c"\noutput = -1\n',
                              ["spec.toml:9", "'data.output'", "counts from 0"]),
    "an adapter exported twice": ('version = 1\n[export]\nmode = "unmerged"\nadapters = ["a", "a"]\n',
                                  ["spec.toml:4", "['a'] listed more than once"]),
    "two saves into one path": (HEAD + INPUT + TWO + SAVE.format("a", "p") + SAVE.format("b", "p"),
                                ["spec.toml:19", "writes 'p', which pass 'save' (", "spec.toml:15) writes too"]),
    "a save onto the manifest": (HEAD + INPUT + TWO + SAVE.format("a", "./manifest.json"),
                                 ["spec.toml:15", "where the export writes 'manifest.json'"]),
    "a save into the model's data": ('version = 1\n' + INPUT + TWO + SAVE.format("a", "model.onnx.data"),
                                     ["spec.toml:13", "where the export writes 'model.onnx.data'"]),
    "a save onto an exported adapter": ('version = 1\n[export]\nmode = "unmerged"\n' + INPUT + TWO
                                        + SAVE.format("a", "adapters/a.onnx_adapter"),
                                        ["spec.toml:15", "where the export writes 'adapters'"]),
    "a merge of no adapters": (HEAD + INPUT + TWO + '[[pass]]\nname = "merge"\nadapters = []\n',
                               ["spec.toml:17", "'pass[2].adapters'", "at least 1 item"]),
}


@pytest.mark.parametrize("case", list(SPEC_CASES))
def test_contradictory_spec_is_refused_with_its_line(case, tmp_path, capsys):
    text, expected = SPEC_CASES[case]
    message = run(capsys, text, tmp_path)
    for part in expected:
        assert part in message, message


def test_the_same_save_twice_is_an_idempotent_rerun(tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text(HEAD + INPUT + TWO + SAVE.format("a", "p") + SAVE.format("a", "p"))
    assert main(["apply", str(spec), MODEL, "-o", str(tmp_path / "out"), "-q"]) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "p" / "adapter_config.json").is_file()


def test_a_save_beside_the_exported_adapters_is_fine(tmp_path):
    from rewrite.spec import parse_spec

    text = 'version = 1\n[export]\nmode = "unmerged"\n' + INPUT + TWO + SAVE.format("a", "adapters/a")
    assert [p.name for p in parse_spec(text).passes] == ["insert", "insert", "save"]


def test_a_byte_order_mark_is_not_a_toml_error(tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_bytes(b"\xef\xbb\xbf" + (HEAD + INPUT).encode())
    assert main(["apply", str(spec), MODEL, "-o", str(tmp_path / "out"), "-q"]) == 0, capsys.readouterr().err


def test_config_value_of_the_wrong_type(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                   "hidden_size": "64"}))
    message = run(capsys, HEAD, tmp_path, model=str(model))
    assert f"{model}/config.json" in message and "hidden_size" in message, message


def test_a_nan_weight_in_the_model_is_refused(tmp_path, capsys):
    message = run(capsys, HEAD + INPUT, tmp_path, model="tests.test_bad_input_sweep:nan_net")
    assert "tensor '0.weight' has 1 NaN/Inf value" in message, message


def _data(tmp_path: Path, tensors: dict[str, torch.Tensor], dims: str = "", loss: str = "mse") -> str:
    save_file(tensors, tmp_path / "data.safetensors")
    return HEAD + INPUT + dims + f'[data]\npath = "data.safetensors"\nloss = "{loss}"\nsteps = 1\n' + TRAIN


DYNAMIC = 'dims = ["batch", ""]\n'
DATA_CASES = {
    "no examples": (dict(input=torch.randn(0, 16), labels=torch.randn(0, 8)), DYNAMIC, ["holds no examples"]),
    "wrong dtype": (dict(input=torch.randn(4, 16, dtype=torch.float64), labels=torch.randn(4, 8)), DYNAMIC,
                    ["tensor 'input' is float64; the model was captured with float32"]),
    "wrong rank": (dict(input=torch.randn(4, 16, 1), labels=torch.randn(4, 8)), DYNAMIC,
                   ["tensor 'input' has 3 axes", "captured with 2"]),
    "wrong static size": (dict(input=torch.randn(4, 7), labels=torch.randn(4, 8)), DYNAMIC,
                          ["size 7 on axis 1", "static size 16"]),
    "batch on a static axis": (dict(input=torch.randn(4, 16), labels=torch.randn(4, 8)), "",
                               ["batches of 4 on axis 0", "static size 2", "dims"]),
}


LABEL_CASES = {
    "a class index out of range": (torch.tensor([0, 1, 9, 2]),
                                   "label 9 is not a class index of the output's 8 classes"),
    "a negative class index": (torch.tensor([0, -3, 1, 2]), "label -3 is not a class index"),
    "a fractional label": (torch.tensor([0.0, 0.7, 1.0, 2.0]), "got the fraction 0.7"),
}


@pytest.mark.parametrize("case", list(LABEL_CASES))
def test_class_labels_that_are_not_class_indices(case, tmp_path, capsys):
    labels, expected = LABEL_CASES[case]
    text = _data(tmp_path, dict(input=torch.randn(4, 16), labels=labels), DYNAMIC, loss="cross_entropy")
    message = run(capsys, text, tmp_path)
    assert "[data] loss = 'cross_entropy'" in message and expected in message, message


def test_ignored_labels_still_train(tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    labels = torch.tensor([0, -100, 7, 2])  # -100: F.cross_entropy's ignore_index (padding)
    spec.write_text(_data(tmp_path, dict(input=torch.randn(4, 16), labels=labels), DYNAMIC, loss="cross_entropy"))
    assert main(["apply", str(spec), MODEL, "-o", str(tmp_path / "out"), "-q"]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_data_that_does_not_fit_the_captured_inputs(case, tmp_path, capsys):
    tensors, dims, expected = DATA_CASES[case]
    message = run(capsys, _data(tmp_path, tensors, dims), tmp_path)
    assert "data.safetensors" in message
    for part in expected:
        assert part in message, message


def test_a_factory_batch_that_stops_fitting(tmp_path, capsys):
    text = (HEAD + INPUT + DYNAMIC + '[data]\nfactory = "tests.test_bad_input_sweep:drifting_batches"\nloss = "mse"\n'
            'steps = 2\n' + TRAIN)
    message = run(capsys, text, tmp_path)
    assert "drifting_batches: batch 1: tensor 'input' is float64; the model was captured with float32" in message


def test_a_data_pickle_holding_objects_is_never_unpickled(tmp_path, capsys):
    torch.save({"input": nn.Linear(2, 2), "labels": torch.randn(4, 8)}, tmp_path / "data.pt")
    message = run(capsys, HEAD + INPUT + '[data]\npath = "data.pt"\nloss = "mse"\n', tmp_path)
    assert "data.pt: holds Python objects besides tensors, which are never unpickled" in message, message
    assert "it needs torch.nn.modules.linear.Linear" in message and "safe_globals" not in message, message


def test_data_that_fits_still_trains(tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text(_data(tmp_path, dict(input=torch.randn(4, 16), labels=torch.randn(4, 8)), DYNAMIC))
    assert main(["apply", str(spec), MODEL, "-o", str(tmp_path / "out"), "-q"]) == 0, capsys.readouterr().err


FLAG_CASES = {
    "combine --density nan": (["combine", MODEL, "--adapter", "a=x", "--weights", "1", "--method", "ties",
                               "--density", "nan"], "--density: nan: expected a finite number"),
    "combine --weights nan": (["combine", MODEL, "--adapter", "a=x", "--weights", "nan", "--method", "linear"],
                              "--weights 'nan': give one number per --adapter"),
    "bundle --capacity 0": (["bundle", MODEL, "--adapter", "a=x", "--capacity", "0"],
                            "--capacity: 0: expected a whole number >= 1"),
    "combine --rank x": (["combine", MODEL, "--adapter", "a=x", "--weights", "1", "--method", "svd", "--rank", "x"],
                         "--rank: 'x' is not a whole number"),
    "serve --threads 0": (["serve", "missing", "--threads", "0"], "--threads: 0: expected a whole number >= 1"),
    "serve --port 70000": (["serve", "missing", "--port", "70000"], "--port: 70000: expected a port number"),
    "serve --batch-wait-ms inf": (["serve", "missing", "--batch-wait-ms", "inf"], "--batch-wait-ms: inf"),
}


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_bad_numbers_in_flags(case, tmp_path, capsys):
    argv, expected = FLAG_CASES[case]
    capsys.readouterr()
    try:
        code = main(argv + ["-o", str(tmp_path / "out")] if argv[0] in ("bundle", "combine") else argv)
    except SystemExit as exit_:  # argparse's usage error
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_subprocess_contradictory_inputs_exit_2_without_traceback(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(HEAD + INPUT + INPUT)
    done = subprocess.run([sys.executable, "-m", "rewrite.cli", "apply", str(spec), MODEL, "-o", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "given more than once" in done.stderr
    assert not (tmp_path / "o").exists()
