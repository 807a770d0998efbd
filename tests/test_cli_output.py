"""What the CLI prints besides errors: stage lines without source paths, warnings as one line, library
deprecation noise only with --verbose, nothing but JSON under --json, progress reported for training steps.

Oracles: the printed text itself (captured), and a recording reporter that counts the steps `train` reports
against the steps it was asked to run.
"""
from __future__ import annotations

import json
import re
import warnings

import pytest
import torch

from rewrite.cli import _library_output
from rewrite.progress import reporting, tracked
from rewrite.train import train

from helpers import capture_module, run_pass
from models import build
from test_cli_errors import HEAD, NET_INPUTS, cli, tiny_net, write_spec

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_output")
    torch.save(tiny_net(), root / "net.pt")
    return root


INSERT = '[[pass]]\nname = "insert"\ntargets = ["q_proj"]\nrank = 8\n'  # rank 8 on 8 x 8: a full-rank warning


def test_stage_lines_name_no_source_file_and_json_is_alone(tmp_path, capsys, files):
    spec = write_spec(tmp_path, HEAD + NET_INPUTS + INSERT)
    code, out, err = cli(capsys, "apply", spec, files / "net.pt", "-o", tmp_path / "out", "--trust-pickle")
    assert code == 0, err
    assert "done load" in err and "done pass[0] 'insert'" in err and "cli.py" not in err
    assert "rewrite apply:" in err and out == ""
    code, out, err = cli(capsys, "apply", spec, files / "net.pt", "-o", tmp_path / "out2", "--trust-pickle", "--json")
    assert code == 0 and json.loads(out)["passes"][0]["label"] == "pass[0] 'insert'"
    assert "done" not in err and "rewrite apply:" not in err


def test_warnings_are_one_line_without_source(tmp_path, capsys, files):
    spec = write_spec(tmp_path, HEAD + NET_INPUTS + INSERT)
    code, _, err = cli(capsys, "apply", spec, files / "net.pt", "-o", tmp_path / "out", "--trust-pickle")
    lines = [line for line in err.splitlines() if "warning:" in line]
    assert code == 0 and len(lines) == 1 and "more parameters than the layer" in err
    assert "UserWarning" not in err and "warnings.warn" not in err and "insert.py" not in err


def test_library_deprecations_only_with_verbose(capsys):
    for verbose, shown in ((False, False), (True, True)):
        with _library_output(quiet=False, verbose=verbose):
            warnings.warn("torch internals moved", FutureWarning)
            warnings.warn("ours", UserWarning)
        err = capsys.readouterr().err
        assert ("torch internals moved (FutureWarning)" in err) is shown and "warning: ours" in err
    with _library_output(quiet=True, verbose=False):
        warnings.warn("ours", UserWarning)
    assert capsys.readouterr().err == ""


class Recorder:
    def __init__(self):
        self.tasks: dict[int, dict] = {}

    def start(self, description, total):
        self.tasks[len(self.tasks)] = dict(description=description, total=total, steps=0, fields=[], open=True)
        return len(self.tasks) - 1

    def advance(self, handle, fields):
        self.tasks[handle]["steps"] += 1
        self.tasks[handle]["fields"].append(fields)

    def finish(self, handle):
        self.tasks[handle]["open"] = False


def test_training_reports_every_step_with_its_loss():
    gm = capture_module(tiny_net(), {"input": torch.randn(2, 8)})
    run_pass(gm, "insert", targets=["q_proj"], rank=2)
    data = [{"input": torch.randn(2, 8), "labels": torch.randn(2, 4)} for _ in range(3)]
    recorder = Recorder()
    with reporting(recorder):
        result = train(gm, data, lambda out, batch: (out - batch["labels"]).pow(2).mean(), steps=5, lr=1e-3)
    (task,) = recorder.tasks.values()
    assert task["description"] == "train" and task["total"] == 5 and task["steps"] == result.steps == 5
    assert [float(f["loss"]) for f in task["fields"]] == [float(f"{x:.4g}") for x in result.losses]
    assert not task["open"]


def test_a_loop_left_early_closes_its_task():
    recorder = Recorder()
    with reporting(recorder):
        for i in tracked(range(10), "calibration batches", 10):
            if i == 2:
                break
    (task,) = recorder.tasks.values()
    assert task["steps"] == 2 and not task["open"]
    assert list(tracked(range(3), "nothing shown")) == [0, 1, 2]  # without a reporter: the items, nothing else


def test_inspect_never_cuts_names_when_piped(hf_dir, tmp_path, capsys):
    """Not a terminal (a pipe, a file): plain columns, every name whole, whatever the width."""
    code, out, err = cli(capsys, "inspect", hf_dir("llama"))
    assert code == 0 and err == ""  # the tables are the result: stdout, for `| grep`
    assert re.search(r"\nmodel\.layers\.1\.self_attn\.q_proj +linear ", out) and "…" not in out
    assert re.search(r"\nmodel\.layers\.1\.post_attention_layernorm +rmsnorm ", out)  # the longest name, whole
    assert "inputs: input_ids int64[2, 16]" in out


def test_inspect_spec_shows_the_sites_a_load_reaches(hf_dir, tmp_path, capsys):
    """The load runs on a scratch copy: what it reaches is what `apply` would load (PEFT as the oracle)."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(build("llama"), peft.LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    model.save_pretrained(tmp_path / "lora")
    expected = sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules()
                      if isinstance(m, peft.tuners.lora.LoraLayer))
    spec = write_spec(tmp_path, HEAD + f'[[pass]]\nname = "load"\npath = "{tmp_path / "lora"}"\n')
    code, out, err = cli(capsys, "inspect", hf_dir("llama"), "--spec", spec, "--json")
    assert code == 0, err
    reaches = json.loads(out)["passes"][0]["reaches"]
    assert sorted(reaches) == expected and set(reaches.values()) == {"lora"}


def test_dry_run_shows_passes_and_files_and_writes_nothing(hf_dir, tmp_path, capsys):
    spec = write_spec(tmp_path, 'version = 1\n\n[[pass]]\nname = "insert"\ntargets = ["q_proj"]\n\n'
                                '[[pass]]\nname = "save"\npath = "adapter"\n\n[[pass]]\nname = "load"\n'
                                'path = "missing"\nadapter = "other"\n')
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, "apply", spec, hf_dir("llama"), "-o", out, "--dry-run")
    assert code == 0, err
    assert not out.exists()
    assert "targets 'q_proj' matches 2 site(s): model.layers.0.self_attn.q_proj, model.layers.1.self_attn.q_proj" \
        in err
    assert "writes adapter" in err and "would fail:" in err and "missing does not exist" in err
    assert "writes model.onnx, manifest.json" in err
    code, stdout, _ = cli(capsys, "apply", spec, hf_dir("llama"), "-o", out, "--dry-run", "--json")
    result = json.loads(stdout)
    assert result["dry_run"] and result["passes"][1]["writes"] == ["adapter"] and not out.exists()


@pytest.mark.parametrize("loss,fails", [("cross_entropy", True), ("mse", True), ("causal_lm", False)])
def test_data_without_labels_fails_before_the_model_loads(tmp_path, capsys, loss, fails):
    """The model path does not exist: an error about it would mean the model was read first."""
    from safetensors.torch import save_file
    save_file({"input_ids": torch.zeros(4, 8, dtype=torch.int64)}, tmp_path / "calib.safetensors")
    spec = write_spec(tmp_path, f'version = 1\n\n[data]\npath = "calib.safetensors"\nloss = "{loss}"\n')
    code, _, err = cli(capsys, "apply", spec, tmp_path / "no-model", "-o", tmp_path / "out")
    assert code == 2
    if fails:
        assert f"no 'labels' tensor, which loss = '{loss}' needs (tensors: ['input_ids'])" in err
    else:
        assert "no-model: no such file or directory" in err and "'labels' tensor" not in err
