"""Every path the product writes stays inside the directory it belongs to, or is refused naming its key.

Bad `save` paths, allocation `report` stems, `[export] filename`s, output directories and adapter names (spec,
`rewrite bundle --adapter`, `AdapterSession.add_adapter`) each exit 2 / raise the product error with a message
naming the key or name. Around every case sit sentinels outside OUT (a file and a directory in tmp_path): they
must keep their contents, and nothing new may appear outside OUT. Runs use a pickled 2-layer net (milliseconds);
only the runtime case exports ONNX (one tiny model, once).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rewrite.cli import main
from rewrite.errors import RewriteError, SpecError
from rewrite.names import check_adapter_name
from rewrite.pass_infra import PassContext

NET_INPUTS = '[[capture.inputs]]\nname = "input"\nshape = [2, 8]\n'
INSERT = '[[pass]]\nname = "insert"\ntargets = ["q_proj", "v_proj"]\nrank = 4\ninit = "gaussian"\n'


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(q_proj=nn.Linear(8, 8), act=nn.ReLU(), v_proj=nn.Linear(8, 4))).eval()


class Sandbox:
    """tmp_path with the model, sentinels outside OUT, and a record of what existed before a run."""

    def __init__(self, root: Path):
        self.root, self.out = root, root / "out"
        torch.save(tiny_net(), root / "net.pt")
        self.victim_file = root / "victim.txt"
        self.victim_file.write_text("user data")
        self.victim_dir = root / "victim"
        self.victim_dir.mkdir()
        (self.victim_dir / "keep.txt").write_text("user data")
        self.before = self.outside()

    def outside(self) -> dict[str, bytes | None]:
        """Every path under root but outside OUT, with its contents (None for a directory)."""
        return {str(p.relative_to(self.root)): (None if p.is_dir() else p.read_bytes())
                for p in sorted(self.root.rglob("*")) if not p.is_relative_to(self.out)}

    def spec(self, text: str) -> Path:
        path = self.root / "spec.toml"
        path.write_text(f"version = 1\n{NET_INPUTS}{text}")
        self.before = self.outside()
        return path

    def assert_outside_untouched(self) -> None:
        assert self.outside() == self.before


@pytest.fixture
def box(tmp_path) -> Sandbox:
    return Sandbox(tmp_path)


def cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, *expected: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and "error: " in err, err
    for text in expected:
        assert text in err, f"{text!r} not in:\n{err}"


def apply(capsys, box: Sandbox, text: str, *extra) -> tuple[int, str]:
    spec = box.spec(text)
    return cli(capsys, "apply", spec, box.root / "net.pt", "-o", box.out, "--trust-pickle", "-q", *extra)


# ------------------------------------------------------------------------------------------ save paths

def _save(path: str, extra: str = "") -> str:
    return f'{INSERT}[[pass]]\nname = "save"\npath = {json.dumps(path)}\n{extra}[export]\nformat = "none"\n'


@pytest.mark.parametrize("path, message", [
    ("../victim", "path = '../victim' leaves the output directory"),
    ("a/../../victim.txt", "path = 'a/../../victim.txt' leaves the output directory"),
    (".", "path = '.' names the output directory itself"),
    ("sub/..", "path = 'sub/..' names the output directory itself"),
])
def test_relative_save_path_leaving_out_is_refused(box, capsys, path, message):
    code, err = apply(capsys, box, _save(path))
    assert_refused(code, err, "spec.toml:", "pass[1] 'save'", message)
    assert not box.out.exists()
    box.assert_outside_untouched()


@pytest.mark.parametrize("allow", [False, True])
@pytest.mark.parametrize("victim", ["victim", "victim.txt"])
def test_absolute_save_path_never_replaces(box, capsys, victim, allow):
    extra = "allow_outside = true\n" if allow else ""
    code, err = apply(capsys, box, _save(str(box.root / victim), extra))
    why = "already exists; a path outside the output directory is never replaced" if allow else "is an absolute path"
    assert_refused(code, err, "pass[1] 'save'", f"path = '{box.root / victim}' {why}")
    assert not box.out.exists()
    box.assert_outside_untouched()


def test_allow_outside_writes_a_new_path_only(box, capsys):
    target = box.root / "exported" / "support"
    code, err = apply(capsys, box, _save(str(target), "allow_outside = true\n"))
    assert code == 0, err
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    created = set(box.outside()) - set(box.before)
    assert created == {"exported", "exported/support", "exported/support/adapter_config.json",
                       "exported/support/adapter_model.safetensors"}
    assert box.victim_file.read_text() == "user data" and (box.victim_dir / "keep.txt").read_text() == "user data"


def test_save_through_a_symlink_out_of_the_output_directory(box, tmp_path):
    """A symlink already inside the output directory does not carry a path out of it."""
    out = tmp_path / "lib_out"
    out.mkdir()
    (out / "link").symlink_to(box.victim_dir, target_is_directory=True)
    context = PassContext(spec_dir=tmp_path, output_dir=out, where="spec.toml:9")
    with pytest.raises(SpecError, match=r"spec.toml:9: path = 'link/keep.txt' leaves the output directory"):
        context.output_path("link/keep.txt", "path")
    assert context.output_path("sub/x", "path") == (out / "sub" / "x").resolve()


def test_save_replaces_only_inside_the_output_directory(box, capsys):
    """Two saves to one path: the second replaces the first, inside OUT; the published result is the adapter."""
    text = _save("adapters/a").replace('[export]', '[[pass]]\nname = "save"\npath = "adapters/a"\nformat = "rewrite"\n'
                                                  '[export]')
    code, err = apply(capsys, box, text)
    assert code == 0, err
    assert (box.out / "adapters" / "a").is_file()
    box.assert_outside_untouched()


# ---------------------------------------------------------------------------------------- report stems

@pytest.mark.parametrize("stem, message", [
    ("../victim", "report = '../victim' leaves the output directory"),
    ("/abs/report", "report = '/abs/report' is an absolute path"),
])
def test_allocation_report_leaving_out_is_refused(box, capsys, stem, message):
    text = (f'{INSERT}[[pass]]\nname = "allocate"\nscorer = "spectrum"\nbudget = {{ fraction = 0.5 }}\n'
            f'plot = false\nreport = {json.dumps(stem)}\n[export]\nformat = "none"\n')
    code, err = apply(capsys, box, text)
    assert_refused(code, err, "pass[1] 'allocate'", message)
    assert not box.out.exists()
    box.assert_outside_untouched()


def test_allocation_report_in_a_subfolder(box, capsys):
    text = (f'{INSERT}[[pass]]\nname = "allocate"\nscorer = "spectrum"\nbudget = {{ fraction = 0.5 }}\n'
            'plot = false\nreport = "reports/alloc"\n[export]\nformat = "none"\n')
    code, err = apply(capsys, box, text)
    assert code == 0, err
    assert sorted(p.name for p in (box.out / "reports").iterdir()) == ["alloc.json", "alloc.md"]
    box.assert_outside_untouched()


# ----------------------------------------------------------------------------------- export file names

@pytest.mark.parametrize("filename", ["../victim.onnx", str(Path("/tmp/x.onnx")), "sub/model.onnx",
                                      "..\\model.onnx", ".onnx", "model.txt", ""])
def test_export_filename_must_be_a_plain_onnx_name(box, capsys, filename):
    code, err = apply(capsys, box, f'[export]\nfilename = {json.dumps(filename)}\n')
    assert_refused(code, err, "spec.toml:6", "'export.filename'", "plain file name ending in .onnx")
    assert not box.out.exists()
    box.assert_outside_untouched()


# --------------------------------------------------------------------------------- output directories

@pytest.mark.parametrize("out", ["victim.txt", "victim.txt/sub"])
def test_output_directory_that_is_a_file_is_refused(box, capsys, out):
    spec = box.spec('[export]\nformat = "none"\n')
    code, err = cli(capsys, "apply", spec, box.root / "net.pt", "-o", box.root / out, "--trust-pickle", "-q")
    assert_refused(code, err, f"{box.victim_file} exists and is not a directory")
    box.assert_outside_untouched()


def test_symlinks_in_a_previous_output_are_removed_not_followed(box, capsys):
    """A previous output holding links to user data (OUT/adapters -> a folder, OUT/notes -> a file) is replaced as
    a whole: the links go, what they point to stays."""
    assert apply(capsys, box, _save("x"))[0] == 0
    (box.out / "adapters").symlink_to(box.victim_dir, target_is_directory=True)
    (box.out / "notes").symlink_to(box.victim_file)
    code, err = apply(capsys, box, _save("adapters/support"))
    assert code == 0, err
    assert not (box.out / "adapters").is_symlink() and (box.out / "adapters" / "support").is_dir()
    assert sorted(os.listdir(box.out)) == ["adapters", "manifest.json"]
    box.assert_outside_untouched()


def test_a_directory_rewrite_did_not_write_is_never_replaced(box, capsys):
    """OUT/manifest.json -> a user file is not a manifest rewrite wrote: OUT is refused before any work."""
    box.out.mkdir()
    (box.out / "manifest.json").symlink_to(box.victim_file)
    code, err = apply(capsys, box, _save("adapters/support"))
    assert_refused(code, err, "exists, is not empty and holds no manifest.json written by rewrite")
    assert os.listdir(box.out) == ["manifest.json"] and (box.out / "manifest.json").is_symlink()
    box.assert_outside_untouched()


# --------------------------------------------------------------------------------------- adapter names

@pytest.mark.parametrize("name", ["../../victim", "/etc/x", "a/b", "..", "a.b", "1a", "", "a b", 3, None])
def test_adapter_names_are_identifiers(name):
    with pytest.raises(RewriteError, match=r"here: adapter names are identifiers .*, got "):
        check_adapter_name(name, "here")


@pytest.mark.parametrize("arg", ["../victim={dir}", "/etc/x={dir}", "a/b={dir}", "a.b={dir}", "={dir}"])
def test_bundle_refuses_path_like_adapter_names(box, capsys, arg):
    before = box.outside()
    code, err = cli(capsys, "bundle", box.root / "net.pt", "--adapter", arg.format(dir=box.victim_dir),
                    "-o", box.out, "-q")
    assert_refused(code, err, "--adapter '", "adapter names are identifiers")
    assert not box.out.exists() and box.outside() == before


def test_spec_adapter_names_are_identifiers(box, capsys):
    code, err = apply(capsys, box, _save("x", 'adapter = "../victim"\n'))
    assert_refused(code, err, "'pass[1].adapter'")
    box.assert_outside_untouched()


def test_subprocess_refusal_has_no_traceback(box):
    spec = box.spec(_save("../victim"))
    result = subprocess.run([sys.executable, "-m", "rewrite.cli", "apply", str(spec), str(box.root / "net.pt"),
                             "-o", str(box.out), "--trust-pickle"], capture_output=True, text=True, cwd=box.root)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "leaves the output directory" in result.stderr
    box.assert_outside_untouched()


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    """A tiny ort-adapters export (the one strategy whose add_adapter writes a file named after the adapter)."""
    root = tmp_path_factory.mktemp("served")
    torch.save(tiny_net(), root / "net.pt")
    (root / "spec.toml").write_text(f'version = 1\n{NET_INPUTS}{INSERT}[export]\nmode = "unmerged"\n'
                                    'switching = "ort-adapters"\n')
    assert main(["apply", str(root / "spec.toml"), str(root / "net.pt"), "-o", str(root / "out"),
                 "--trust-pickle", "-q"]) == 0
    return root / "out"


@pytest.mark.parametrize("name", ["../../victim", "../escape", "/etc/x", "a/b", "..", 7])
def test_runtime_add_adapter_refuses_path_like_names(served, tmp_path, monkeypatch, name):
    from rewrite.runtime.session import AdapterSession

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "system_tmp"))
    (tmp_path / "system_tmp").mkdir()
    factors = {"q_proj": (np.zeros((8, 2), np.float32), np.zeros((2, 8), np.float32))}
    with AdapterSession(served) as session:
        assert session._tmp.parent == tmp_path / "system_tmp"
        with pytest.raises(RewriteError, match=r"add_adapter: adapter names are identifiers"):
            session.add_adapter(name, factors)
        session.add_adapter("fine_name", factors)
        assert session.adapters == ["default", "fine_name"]
    assert sorted(os.listdir(tmp_path)) == ["system_tmp"] and os.listdir(tmp_path / "system_tmp") == []
