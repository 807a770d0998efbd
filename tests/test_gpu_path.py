"""The GPU path without a GPU: provider choice, which LoraDelta library goes with it, the CUDA build's errors.

Rules under test (runtime/providers.py, runtime/ops.py):
* `AdapterSession` without `providers=` asks for ["CUDAExecutionProvider", "CPUExecutionProvider"] when
  `onnxruntime.get_available_providers()` lists the CUDA EP, for ["CPUExecutionProvider"] otherwise; explicit
  `providers=` are passed as given. Here the provider list is monkeypatched; ONNX Runtime itself (the CPU wheel)
  then drops the CUDA EP, which `session.providers` reports.
* A custom-op export registers `library_path(cuda=True)` (the CUDA build) exactly when the providers name the CUDA EP.
* `library_path(cuda=True)` without nvcc is a `LoraCudaUnavailable` (a `LoraLibraryError`) that says what to install
  or which providers to use; the CUDA build is cached under its own name, keyed by the CUDA settings.
* With nvcc (slow): the CUDA build compiles through `library_path(cuda=True)` and, holding the CPU kernels too, serves
  a session that asked for the CUDA EP on this GPU-less machine.
Answers are checked against the numpy float64 forward pass of test_unmerged (PEFT's factors, per row).
"""
from __future__ import annotations

import importlib.metadata
import shutil
import warnings
from pathlib import Path

import onnxruntime as ort
import pytest

from rewrite.errors import RewriteError
from rewrite.runtime import ops, providers
from rewrite.runtime.session import AdapterSession

from test_unmerged import Mlp, diff, need

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
ROWS = ["support", None, "style", "support"]


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> Mlp:
    return Mlp(tmp_path_factory.mktemp("gpu_path_mlp"))


@pytest.fixture(scope="module")
def custom_op(mlp) -> Path:
    """The custom-op export (made before any test's monkeypatching: the export's own check opens sessions)."""
    need("custom-op")
    return mlp.export("custom-op")


@pytest.fixture(scope="module")
def bank(mlp) -> Path:
    return mlp.export("bank")


@pytest.fixture
def cuda_listed(monkeypatch):
    """onnxruntime claims a CUDA EP (as the onnxruntime-gpu wheel does, GPU or not)."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["TensorrtExecutionProvider", CUDA, CPU])


@pytest.fixture
def opened(monkeypatch):
    """Records every InferenceSession's requested providers and every library_path call's `cuda`."""
    seen = {"providers": [], "cuda": []}
    real_session, real_library = ort.InferenceSession, ops.library_path

    def session(model, options=None, providers=None, **kw):
        seen["providers"].append(providers)
        return real_session(model, options, providers=providers, **kw)

    def library(build=True, *, cuda=False):
        seen["cuda"].append(cuda)
        return real_library(build)  # the CPU build stands in: the CUDA one's own test is below (slow)

    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.setattr(ops, "library_path", library)
    return seen


def check_rows(mlp: Mlp, session: AdapterSession) -> None:
    for k in range(3):
        got = session.run({"x": mlp.inputs[k]}, adapter_ids=ROWS)[0]
        worst = max(diff(got[i], mlp.refs[name][k][i]) for i, name in enumerate(ROWS))
        assert worst <= 1e-5, worst


# --- the rule, alone ----------------------------------------------------------------------------------------------


def test_default_providers_follow_onnxruntime(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["AzureExecutionProvider", CPU])
    assert providers.default_providers() == [CPU]
    assert providers.choose(None) == ([CPU], False)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["TensorrtExecutionProvider", CUDA, CPU])
    assert providers.default_providers() == [CUDA, CPU]
    assert providers.choose(None) == ([CUDA, CPU], True)


def test_explicit_providers_win(cuda_listed):
    assert providers.choose([CPU]) == ([CPU], False)
    with_options = [(CUDA, {"device_id": 1}), CPU]
    assert providers.choose(with_options) == (with_options, True)
    assert providers.provider_names(with_options) == [CUDA, CPU]


@pytest.mark.parametrize("installed, warns", [({"onnxruntime": "1.31.1"}, False),
                                              ({"onnxruntime-gpu": "1.31.1"}, False),
                                              ({"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"}, True)])
def test_both_wheels_warn(monkeypatch, installed, warns):
    def version(dist):
        if dist not in installed:
            raise importlib.metadata.PackageNotFoundError(dist)
        return installed[dist]

    monkeypatch.setattr(importlib.metadata, "version", version)
    providers.check_wheels.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            providers.check_wheels()
    finally:
        providers.check_wheels.cache_clear()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert bool(messages) == warns
    if warns:
        assert "pip uninstall -y onnxruntime && pip install --force-reinstall --no-deps onnxruntime-gpu==1.31.1" \
            in messages[0]


# --- AdapterSession -----------------------------------------------------------------------------------------------


def test_session_picks_cuda_and_its_library(mlp, custom_op, cuda_listed, opened):
    with AdapterSession(custom_op) as session:
        assert opened["providers"] == [[CUDA, CPU]] and opened["cuda"] == [True]
        assert session.library == ops.library_path(build=False, cuda=False)  # what the stand-in returned
        assert session.providers == [CPU]  # the CPU wheel has no CUDA EP: ONNX Runtime dropped it
        check_rows(mlp, session)


def test_session_explicit_providers_win(mlp, custom_op, cuda_listed, opened):
    with AdapterSession(custom_op, providers=[CPU]) as session:
        assert opened["providers"] == [[CPU]] and opened["cuda"] == [False]
        check_rows(mlp, session)


def test_session_on_cpu_unchanged(mlp, custom_op, bank, monkeypatch, opened):
    """CPU onnxruntime: the CPU EP and the CPU library, as before; non-custom-op exports register no library."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["AzureExecutionProvider", CPU])
    with AdapterSession(custom_op) as session:
        assert session.providers == [CPU] and opened["cuda"] == [False]
        assert session.library is not None and "cuda" not in session.library.name
        check_rows(mlp, session)
    with AdapterSession(bank) as session:
        assert session.library is None and opened["providers"][-1] == [CPU] and opened["cuda"] == [False]
        check_rows(mlp, session)


def test_session_without_nvcc_is_a_clear_error(custom_op, cuda_listed, monkeypatch, tmp_path):
    monkeypatch.setenv("NVCC", str(tmp_path / "no-nvcc"))
    monkeypatch.setenv("REWRITE_BUILD_DIR", str(tmp_path / "build"))
    with pytest.raises(ops.LoraCudaUnavailable, match=r"no CUDA toolkit.*CPUExecutionProvider") as info:
        AdapterSession(custom_op)
    assert "nvcc not found" in str(info.value)


# --- the CUDA build -----------------------------------------------------------------------------------------------


def test_cuda_build_without_nvcc(monkeypatch, tmp_path):
    monkeypatch.setenv("NVCC", str(tmp_path / "no-nvcc"))
    monkeypatch.setenv("REWRITE_BUILD_DIR", str(tmp_path / "build"))
    with pytest.raises(ops.LoraCudaUnavailable, match="no CUDA toolkit") as info:
        ops.library_path(cuda=True)
    assert isinstance(info.value, ops.LoraLibraryError) and isinstance(info.value, RewriteError)
    with pytest.raises(ops.LoraLibraryError, match=r"CUDA LoraDelta library is not built .*cuda=True"):
        ops.library_path(build=False, cuda=True)


def test_cuda_build_is_cached_apart(monkeypatch, tmp_path):
    """Its own file name; CUDA settings key the CUDA build only."""
    monkeypatch.setenv("REWRITE_BUILD_DIR", str(tmp_path))

    def names():
        found = {}
        for cuda in (False, True):
            with pytest.raises(ops.LoraLibraryError, match="not built") as info:
                ops.library_path(build=False, cuda=cuda)
            found[cuda] = str(info.value).split("(")[1].split(")")[0]
        return found

    before = names()
    assert "/librewrite_lora-" in before[False] and "/librewrite_lora_cuda-" in before[True]
    monkeypatch.setenv("CUDA_ARCHS", "75")
    after = names()
    assert after[False] == before[False] and after[True] != before[True]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_library_serves_a_cuda_session_on_cpu(mlp, custom_op, cuda_listed, monkeypatch, tmp_path):
    """library_path(cuda=True) compiles (one arch, to keep it short); a session that asked for the CUDA EP loads it
    and, ONNX Runtime having dropped the CUDA EP here, answers with its CPU kernels."""
    monkeypatch.setenv("CUDA_ARCHS", "90")
    monkeypatch.setenv("REWRITE_BUILD_DIR", str(tmp_path))
    lib = ops.library_path(cuda=True)
    assert lib.name.startswith("librewrite_lora_cuda-") and lib.parent == tmp_path / "lora"
    assert ops.library_path(build=False, cuda=True) == lib
    with AdapterSession(custom_op) as session:
        assert session.library == lib and session.providers == [CPU]
        check_rows(mlp, session)
