"""Publishing OUT as a unit (rewrite/publish.py): at every step OUT is the complete old result or the complete new one.

Kills are injected at every filesystem step of a publish, for the one-step swap (renameat2 exchange) and the
portable one (two renames): in-process, by making that step and every later one raise (the tree stays exactly as
a kill there leaves it), and in a real subprocess that SIGKILLs itself there (mid-way through removing the
previous result for the removal step). After each: OUT holds exactly the old or the new set of files (the
portable swap's one gap leaves the complete old result at .OUT.old-*), and the next run puts things right,
succeeds, and leaves nothing beside OUT. Then the rules around it: leftovers of dead runs go, a live run's and
anything rewrite did not make stay, a directory rewrite did not write is refused before any work, and the CLI
leaves no stale file of an earlier run and survives a SIGKILL.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from rewrite import publish
from rewrite.cli import main
from rewrite.errors import OutputError
from rewrite.publish import Staging

MANIFEST = '{"format": "rewrite-manifest", "run": "%s"}'
OLD = {"manifest.json": MANIFEST % "old", "model.onnx": "old model", "allocation.json": "old report",
       "adapters/a/adapter_model.safetensors": "old adapter"}
NEW = {"manifest.json": MANIFEST % "new", "model.onnx": "new model", "model.onnx.data": "new weights"}
NEXT = {"manifest.json": MANIFEST % "next", "model.onnx": "next model"}
STEPS = {"exchange": ["exchange", "rmtree"], "portable": ["rename", "rename", "rmtree"]}


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def run(out: Path, files: dict[str, str]) -> list[str]:
    with Staging(out, str(out)) as staging:
        write(staging.tmp, files)
        return staging.publish()


def beside(out: Path) -> list[str]:
    """What lies next to OUT apart from OUT itself and the test's own files."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.fixture
def out(tmp_path) -> Path:
    (tmp_path / "user.txt").write_text("user data")
    out = tmp_path / "out"
    out.mkdir()
    write(out, OLD)
    return out


class Killed(BaseException):
    """Raised by every filesystem step from the kill on: nothing after it changes the tree."""


def inject(monkeypatch, swap: str, at: int, *, once: bool = False) -> list[str]:
    """Count rewrite.publish's filesystem steps; step `at` (and, unless `once`, every later one) fails."""
    calls: list[str] = []

    def step(fn, name):
        def run_step(*args, **kwargs):
            calls.append(name)
            if len(calls) == at + 1 or (len(calls) > at and not once):
                raise OSError(5, "injected I/O error") if once else Killed()
            return fn(*args, **kwargs)
        return run_step

    exchange = publish.exchange if swap == "exchange" else (lambda a, b: False)
    monkeypatch.setattr(publish, "exchange", step(exchange, "exchange") if swap == "exchange" else exchange)
    monkeypatch.setattr(os, "rename", step(os.rename, "rename"))
    monkeypatch.setattr(shutil, "rmtree", step(shutil.rmtree, "rmtree"))
    return calls


@pytest.mark.parametrize("swap", ["exchange", "portable"])
def test_publish_without_faults_replaces_out_whole(out, monkeypatch, swap):
    calls = inject(monkeypatch, swap, at=99)
    assert run(out, NEW) == sorted(["manifest.json", "model.onnx", "model.onnx.data"])
    assert calls == STEPS[swap]
    assert tree(out) == NEW and beside(out) == []  # the old allocation.json and adapters/ are gone


@pytest.mark.parametrize("swap, at", [(s, k) for s, steps in STEPS.items() for k in range(len(steps))])
def test_a_kill_at_every_step_leaves_old_or_new_and_the_next_run_recovers(out, monkeypatch, swap, at):
    with monkeypatch.context() as patch:
        inject(patch, swap, at)
        with pytest.raises(Killed):
            run(out, NEW)
    old_aside = [p for p in out.parent.glob(".out.old-*")]
    if out.exists():
        assert tree(out) in (OLD, NEW)
    else:  # the portable swap's gap: the previous result waits, complete, beside OUT
        assert (swap, at) == ("portable", 1) and len(old_aside) == 1 and tree(old_aside[0]) == OLD
    # a next run that fails still puts a stranded previous result back and clears the leftovers
    with pytest.raises(RuntimeError), Staging(out, str(out)):
        raise RuntimeError("the next run fails while building")
    assert tree(out) in (OLD, NEW) and beside(out) == []
    assert run(out, NEXT) == ["manifest.json", "model.onnx"]
    assert tree(out) == NEXT and beside(out) == []
    assert (out.parent / "user.txt").read_text() == "user data"


@pytest.mark.parametrize("swap, at", [(s, k) for s, steps in STEPS.items() for k in range(len(steps))])
def test_a_failing_step_is_an_error_or_a_success_never_a_mix(out, monkeypatch, swap, at):
    """An I/O error at one step: before OUT changed, a clear OutputError and OUT untouched; after it (removing the
    previous result), success, and the next run removes what is left."""
    with monkeypatch.context() as patch:
        inject(patch, swap, at, once=True)
        try:
            run(out, NEW)
            published = True
        except OutputError as err:
            assert "cannot put the result in place: injected I/O error" in str(err)
            published = False
    assert tree(out) == (NEW if published else OLD)
    assert published == (STEPS[swap][at] == "rmtree")
    assert len(beside(out)) == published  # the previous result, when removing it failed
    run(out, NEXT)
    assert tree(out) == NEXT and beside(out) == []


DRIVER = textwrap.dedent("""
    import json, os, shutil, signal, sys
    from pathlib import Path
    from rewrite import publish

    out, swap, at, files = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
    calls = []

    def kill():
        os.kill(os.getpid(), signal.SIGKILL)

    def step(fn):
        def run_step(*args, **kwargs):
            calls.append(fn.__name__)
            if len(calls) > at:
                if fn is shutil.rmtree:  # die mid-way through removing the previous result
                    next(p for p in sorted(Path(args[0]).rglob("*")) if p.is_file()).unlink()
                kill()
            return fn(*args, **kwargs)
        return run_step

    with publish.Staging(out, str(out)) as staging:
        for name, text in files.items():
            (staging.tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (staging.tmp / name).write_text(text)
        publish.exchange = step(publish.exchange) if swap == "exchange" else (lambda a, b: False)
        os.rename, shutil.rmtree = step(os.rename), step(shutil.rmtree)
        staging.publish()
""")


@pytest.mark.parametrize("swap, at", [(s, k) for s, steps in STEPS.items() for k in range(len(steps) + 1)])
def test_sigkill_at_every_step_in_a_real_process(out, swap, at):
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(out), swap, str(at), json.dumps(NEW)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == (0 if at == len(STEPS[swap]) else -signal.SIGKILL), proc.stderr
    if out.exists():
        assert tree(out) in (OLD, NEW)
    else:
        assert (swap, at) == ("portable", 1) and tree(next(out.parent.glob(".out.old-*"))) == OLD
    run(out, NEXT)
    assert tree(out) == NEXT and beside(out) == []


def test_recovery_removes_only_dead_runs_leftovers(out, tmp_path):
    """Dead runs' directories go; a live run's (it holds its lock), files and links under our names, and other
    outputs' temporary directories stay."""
    for name in (".out.tmp-dead1", ".out.old-dead2", ".out.tmp-live", ".other.tmp-x"):
        write(tmp_path / name, {"f": "x"})
    (tmp_path / ".out.tmp-file").write_text("not ours: a file")
    (tmp_path / ".out.tmp-link").symlink_to(tmp_path / "user.txt")
    live = os.open(tmp_path / ".out.tmp-live", os.O_RDONLY)
    try:
        fcntl.flock(live, fcntl.LOCK_EX)
        run(out, NEW)
    finally:
        os.close(live)
    assert tree(out) == NEW
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-x", ".out.tmp-file", ".out.tmp-link",
                                                         ".out.tmp-live", "out", "user.txt"]
    assert (tmp_path / "user.txt").read_text() == "user data"


def test_missing_parents_are_created_and_removed_again_on_failure(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError), Staging(out, str(out)):
        raise RuntimeError("build failed")
    assert list(tmp_path.iterdir()) == []
    run(out, NEW)
    assert tree(out) == NEW


@pytest.mark.parametrize("make", ["user_dir", "foreign_manifest", "manifest_link"])
def test_a_directory_rewrite_did_not_write_is_refused(tmp_path, make):
    out = tmp_path / "out"
    out.mkdir()
    if make == "user_dir":
        write(out, {"thesis.tex": "user data"})
    elif make == "foreign_manifest":
        write(out, {"manifest.json": '{"name": "my web app"}', "index.html": "user data"})
    else:
        (tmp_path / "elsewhere.json").write_text(MANIFEST % "old")
        (out / "manifest.json").symlink_to(tmp_path / "elsewhere.json")
    before = sorted(os.listdir(out))
    with pytest.raises(OutputError, match=r"exists, is not empty and holds no manifest.json written by rewrite"):
        Staging(out, "out")
    assert sorted(os.listdir(out)) == before and beside(out) == []


def test_an_empty_directory_or_a_link_to_an_output_is_used(tmp_path):
    (tmp_path / "empty").mkdir()
    run(tmp_path / "empty", NEW)
    assert tree(tmp_path / "empty") == NEW
    (tmp_path / "link").symlink_to(tmp_path / "empty", target_is_directory=True)
    run(tmp_path / "link", NEXT)  # published where the link points; the link stays
    assert (tmp_path / "link").is_symlink() and tree(tmp_path / "empty") == NEXT


def test_unwritable_places_are_refused_before_any_work(tmp_path, monkeypatch):
    """Simulated (the suite may run as root, for whom every directory is writable): an OUT the user cannot write,
    and a parent where no directory can be made."""
    out = tmp_path / "out"
    out.mkdir()
    with monkeypatch.context() as patch:
        patch.setattr(os, "access", lambda *a, **k: False)
        with pytest.raises(OutputError, match=r"output directory 'out' is not readable and writable"):
            Staging(out, "out")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(publish.tempfile, "mkdtemp", refuse)
    with pytest.raises(OutputError, match=rf"output directory 'out': cannot write in {tmp_path}: Permission denied"):
        Staging(out, "out").__enter__()


def test_a_mount_point_is_refused(tmp_path, monkeypatch):
    """A mount point cannot be renamed, so it cannot be swapped: refused before any work (simulated)."""
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == tmp_path / "volume")
    with pytest.raises(OutputError, match=r"'volume' is a mount point, .* use a folder inside it"):
        Staging(tmp_path / "volume", "volume")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_parent_is_refused(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="cannot write in"):
            Staging(parent / "out", "out").__enter__()
    finally:
        parent.chmod(0o755)


# ------------------------------------------------------------------------------------------------ the CLI

NET_INPUTS = '[[capture.inputs]]\nname = "input"\nshape = [2, 8]\n'
INSERT = '[[pass]]\nname = "insert"\ntargets = ["q_proj", "v_proj"]\nrank = 4\ninit = "gaussian"\n'
ALLOCATE = ('[[pass]]\nname = "allocate"\nscorer = "spectrum"\nbudget = { fraction = 0.5 }\nplot = false\n')


@pytest.fixture
def box(tmp_path) -> Path:
    torch.manual_seed(0)
    net = nn.Sequential(OrderedDict(q_proj=nn.Linear(8, 8), act=nn.ReLU(), v_proj=nn.Linear(8, 4))).eval()
    torch.save(net, tmp_path / "net.pt")
    (tmp_path / "plain.toml").write_text(f'version = 1\n{NET_INPUTS}[export]\nformat = "none"\n')
    (tmp_path / "alloc.toml").write_text(f'version = 1\n{NET_INPUTS}{INSERT}{ALLOCATE}[export]\nformat = "none"\n')
    return tmp_path


def apply(box: Path, spec: str, *extra) -> int:
    return main(["apply", str(box / spec), str(box / "net.pt"), "-o", str(box / "out"), "--trust-pickle", "-q",
                 *extra])


def test_no_stale_file_of_an_earlier_run_survives(box):
    assert apply(box, "alloc.toml") == 0
    assert sorted(os.listdir(box / "out")) == ["allocation.json", "allocation.md", "manifest.json"]
    assert apply(box, "plain.toml") == 0
    assert os.listdir(box / "out") == ["manifest.json"] and beside(box / "out") == []


SAVE = '[[pass]]\nname = "save"\npath = "adapters/tuned"\n'


@pytest.fixture
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


@pytest.mark.parametrize("umask", [0o022, 0o027], indirect=True)
def test_everything_written_has_the_mode_the_umask_gives(box, umask):
    """OUT, a saved PEFT directory and the reports are as readable as any file the user creates (tempfile's
    0700 / 0600 would hide them from a server running as another user)."""
    (box / "save.toml").write_text(f'version = 1\n{NET_INPUTS}{INSERT}{ALLOCATE}{SAVE}[export]\nformat = "none"\n')
    assert apply(box, "save.toml") == 0
    out = box / "out"
    made = [out, *out.rglob("*")]
    assert {p.relative_to(out).as_posix() for p in made if p.is_file()} >= {
        "manifest.json", "allocation.json", "allocation.md", "adapters/tuned/adapter_config.json",
        "adapters/tuned/adapter_model.safetensors"}
    for path in made:
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert path.stat().st_mode & 0o777 == want, (path, oct(path.stat().st_mode & 0o777))


def test_cli_refuses_a_user_directory_before_loading_anything(box, capsys):
    (box / "out").mkdir()
    (box / "out" / "notes.txt").write_text("user data")
    code = main(["apply", str(box / "plain.toml"), str(box / "no_such_model.pt"), "-o", str(box / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "no_such_model" not in err
    assert "error: output directory" in err and "is never replaced" in err
    assert tree(box / "out") == {"notes.txt": "user data"}


KILL_CLI = textwrap.dedent("""
    import os, signal, sys
    from rewrite import pipeline, publish
    from rewrite.cli import main

    where = sys.argv[1]
    if where == "after_build":
        build = pipeline._apply_into
        def _apply_into(*args):
            build(*args)
            os.kill(os.getpid(), signal.SIGKILL)
        pipeline._apply_into = _apply_into
    else:
        swap = publish.swap
        def after_swap(*args):
            swap(*args)
            os.kill(os.getpid(), signal.SIGKILL)
        publish.swap = after_swap
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.parametrize("where, published", [("after_build", False), ("after_swap", True)])
def test_cli_killed_while_publishing_then_rerun(box, where, published):
    assert apply(box, "alloc.toml") == 0
    old = tree(box / "out")
    argv = ["apply", str(box / "plain.toml"), str(box / "net.pt"), "-o", str(box / "out"), "--trust-pickle", "-q"]
    proc = subprocess.run([sys.executable, "-c", KILL_CLI, where, *argv], capture_output=True, text=True,
                          cwd=box, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (os.listdir(box / "out") == ["manifest.json"]) if published else tree(box / "out") == old
    assert beside(box / "out") != []  # what the killed run left
    assert apply(box, "plain.toml") == 0
    assert os.listdir(box / "out") == ["manifest.json"] and beside(box / "out") == []
    assert json.loads((box / "out" / "manifest.json").read_text())["format"] == "rewrite-manifest"
