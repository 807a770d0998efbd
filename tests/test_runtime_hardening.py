"""AdapterSession refuses what it cannot answer, and cleans up after itself.

1. Bank slots (bank export of factories:mlp4, capacity 4, adapters a = slot 0, b = slot 1): a slot outside the
   bank, a slot that is empty or whose adapter was removed, an empty or unknown adapter name, an id that is
   neither a name, a slot number nor None, adapter_ids whose length is not the batch's: each a `RuntimeUseError`
   (a RewriteError: the CLI's exit 2), never an answer from the base model; the session still serves afterwards.
   A slot number is the adapter in that slot: by slot equals by name, and differs from the base model.
2. One adapter per run (ort-adapters): an empty name is refused the same way.
3. The session's temporary directory goes with `with`, `close()`, garbage collection and interpreter exit.
4. `from rewrite.runtime import AdapterSession` loads neither torch nor the compiler.
"""
from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rewrite.errors import RewriteError, RuntimeUseError
from rewrite.runtime import AdapterSession

X = np.random.default_rng(0).standard_normal((4, 3, 64)).astype(np.float32)


def tenant() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    g = np.random.default_rng(1)
    return {"layers.1": (g.standard_normal((64, 2)).astype(np.float32),
                         g.standard_normal((2, 64)).astype(np.float32))}


@pytest.fixture
def bank(deployment):
    with AdapterSession(deployment("bank")) as session:
        yield session


REFUSED = [
    (dict(adapter_ids=np.array([0, 1, 4, -1])), r"adapter_ids: slot 4 is neither -1 \(base\) nor a bank slot 0\.\.3"),
    (dict(adapter_ids=[0, -2, None, None]), r"slot -2 is neither -1"),
    (dict(adapter_ids=np.array([0, 1, 2, -1])), r"slot 2 holds no adapter \(empty or removed\); loaded: a=0, b=1"),
    (dict(adapter_ids=[3, "a", None, "b"]), "slot 3 holds no adapter"),
    (dict(adapter=""), r"the adapter name is empty: .*loaded: \['a', 'b'\]\) or None for the base model"),
    (dict(adapter_ids=["a", "", None, None]), "the adapter name is empty"),
    (dict(adapter="c"), r"unknown adapter 'c'; loaded: \['a', 'b'\]"),
    (dict(adapter_ids=["a", "c", None, None]), "unknown adapter 'c'"),
    (dict(adapter_ids=["a", None, "b"]), "adapter_ids has 3 entries for a batch of 4"),
    (dict(adapter_ids=np.array([[0, 1], [1, 0]])), r"adapter_ids has shape \(2, 2\) for a batch of 4"),
    (dict(adapter_ids=[True, 0, 0, 0]), "adapter_ids: True is neither an adapter name, a slot number nor None"),
    (dict(adapter_ids=np.array([1.0, 0.0, 0.0, 0.0])), "is neither an adapter name, a slot number nor None"),
    (dict(adapter="a", adapter_ids=["a"] * 4), "not both"),
]


@pytest.mark.parametrize("call, message", REFUSED, ids=[m[:30] for _, m in REFUSED])
def test_bank_refuses(bank, call, message):
    base, with_a = bank.run({"x": X})[0], bank.run({"x": X}, adapter="a")[0]
    with pytest.raises(RuntimeUseError, match=message) as caught:
        bank.run({"x": X}, **call)
    assert isinstance(caught.value, RewriteError)
    np.testing.assert_array_equal(bank.run({"x": X})[0], base)  # still serving, unchanged
    np.testing.assert_array_equal(bank.run({"x": X}, adapter="a")[0], with_a)


def test_slots_are_the_adapters_in_them(bank):
    base = bank.run({"x": X})[0]
    bank.add_adapter("t", tenant())
    slot = bank._snapshot.slots["t"]
    assert slot == 2
    by_name = bank.run({"x": X}, adapter_ids=["t", None, "t", "a"])[0]
    by_slot = bank.run({"x": X}, adapter_ids=np.array([slot, -1, slot, 0]))[0]
    np.testing.assert_array_equal(by_slot, by_name)
    np.testing.assert_array_equal(by_slot[1], base[1])
    assert np.abs(by_slot[0] - base[0]).max() > 1e-2  # the adapter answers, not the base model
    bank.remove_adapter("t")
    with pytest.raises(RuntimeUseError, match=r"slot 2 holds no adapter \(empty or removed\)"):
        bank.run({"x": X}, adapter_ids=np.array([slot, -1, -1, -1]))
    with pytest.raises(RuntimeUseError, match="unknown adapter 't'"):
        bank.run({"x": X}, adapter="t")
    bank.add_adapter("u", tenant())  # the freed slot is filled again
    np.testing.assert_array_equal(bank.run({"x": X}, adapter_ids=np.array([2, -1, 2, 0]))[0], by_slot)


def test_empty_feeds_are_refused(bank):
    with pytest.raises(RuntimeUseError, match="feeds: give the model's inputs"):
        bank.run({}, adapter="a")


BAD_FEEDS = [
    ({"xx": X}, r"feeds: 'xx' is not an input of .*model.onnx \(inputs: x\) Did you mean: 'x'"),
    ({"x": X.astype(np.float64)}, r"feeds\['x'\]: dtype float64, the model takes float32"),
    ({"x": X[None]}, r"feeds\['x'\]: 4 dims \(1, 4, 3, 64\), the model takes 3"),
    ({"x": X[..., :63]}, r"model.onnx: ONNX Runtime refused the call: .*"),
    ({"x": X, "adapter_ids": np.zeros(4, np.int64)}, "'adapter_ids' is not an input"),
]


@pytest.mark.parametrize("switching", ["bank", "ort-adapters"])
@pytest.mark.parametrize("feeds, message", BAD_FEEDS, ids=[m[:24] for _, m in BAD_FEEDS])
def test_bad_feeds_are_the_callers_error(deployment, switching, feeds, message):
    with AdapterSession(deployment(switching)) as session:
        with pytest.raises(RuntimeUseError, match=message):
            session.run(feeds, adapter="a")
        assert session.run({"x": X}, adapter="a")[0].shape[0] == X.shape[0]  # still serving


def test_one_adapter_per_run_refuses_an_empty_name(deployment):
    with AdapterSession(deployment("ort-adapters")) as session:
        with pytest.raises(RuntimeUseError, match="the adapter name is empty"):
            session.run({"x": X}, adapter="")
        with pytest.raises(RuntimeUseError, match="the adapter name is empty"):
            session.run({"x": X}, adapter_ids=[""] * 4)
        with pytest.raises(RuntimeUseError, match="unknown adapter 'c'"):
            session.remove_adapter("c")


# ------------------------------------------------------------------------------------- temporary directory


def test_with_closes_the_temporary_directory(deployment):
    with AdapterSession(deployment("bank")) as session:
        tmp = session._tmp
        assert tmp.is_dir()
    assert not tmp.exists()
    session.close()  # a second close is harmless


def test_garbage_collection_removes_the_temporary_directory(deployment):
    session = AdapterSession(deployment("ort-adapters"))
    session.add_adapter("t", tenant())
    tmp = session._tmp
    assert tmp.is_dir()
    del session
    gc.collect()
    assert not tmp.exists()


def test_interpreter_exit_removes_the_temporary_directory(deployment):
    script = ("from rewrite.runtime import AdapterSession\n"
              f"session = AdapterSession({str(deployment('bank'))!r})\n"  # still referenced at exit
              "print(session._tmp)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    tmp = Path(done.stdout.strip())
    assert tmp.name.startswith("rewrite-adapters-") and not tmp.exists()


def test_the_runtime_imports_without_torch():
    code = ("from rewrite.runtime import AdapterSession; import sys; "
            "assert 'torch' not in sys.modules, 'torch'; "
            "assert not [m for m in sys.modules if m.startswith(('rewrite.passes', 'rewrite.export'))]")
    subprocess.run([sys.executable, "-c", code], check=True)
