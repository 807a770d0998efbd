"""Property: `AdapterSession.add_adapter` never raises a raw exception and never gives a wrong answer.

Random adapters go into the ort-adapters and bank exports of factories:mlp4 (tests/conftest.py `deployment`): random
names (identifiers, empty, paths, non-strings, a loaded name), sites (real, unknown, non-string), ranks (0 to 6,
above the bank's), shapes (right, wrong, 1-D, 3-D, empty), dtypes (floats, integers, bool, complex) and values (NaN,
Inf, huge, beyond float32), given as a dict or written as a PEFT directory. For each case an independent rule says
whether it is valid; then:

- a valid adapter is accepted, and the session's answer for it equals a numpy oracle of the four layers with
  y_i = h W_i^T + b_i + h A_i B_i (B scaled by alpha / r for PEFT), computed in float64 from the float32 factors;
- an invalid one is refused with a RewriteError (AdapterFileError, RuntimeUseError, ...), nothing else;
- either way the adapters already loaded answer as before.
Derandomized: CI sees the same cases every run.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from factories import mlp4
from rewrite.errors import RewriteError
from rewrite.formats.manifest import read_manifest
from rewrite.runtime import AdapterSession

PROFILE = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
WIDTH, SITES = 64, [f"layers.{i}" for i in range(4)]
X = np.random.default_rng(0).standard_normal((4, 3, WIDTH)).astype(np.float32)
FLOATS = ("float32", "float64", "float16")
SPECIAL = [0.0, np.nan, np.inf, -np.inf, 1e-30, 1e4, 1e30, 1e39, 1e300]


@dataclass
class Factor:
    """One site of a random adapter: A [d_in, r] and B [r, d_out] as drawn (any shape, dtype, values)."""
    site: object
    a: np.ndarray
    b: np.ndarray


@dataclass
class Case:
    name: object
    factors: list[Factor]
    form: str        # "dict" | "peft" | "other"
    alpha: float     # PEFT: the scale is alpha / r


class Deployment:
    def __init__(self, directory: Path):
        self.session = AdapterSession(directory)
        (entry,) = read_manifest(directory).exports
        self.rank_limit = {s.site: s.rank for s in entry.sites} if entry.routed else None
        model = mlp4()
        self.weights = [(layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy())
                        for layer in model.layers]
        self.before = {name: self.session.run({"x": X}, adapter=name)[0] for name in self.session.adapters}


@pytest.fixture(scope="module", params=["ort-adapters", "bank"])
def deployed(request, deployment):
    served = Deployment(deployment(request.param))
    yield served
    served.session.close()


def mostly(usual: st.SearchStrategy, odd: st.SearchStrategy) -> st.SearchStrategy:
    """`usual` about nine times in ten, else `odd`: a case draws a dozen of these, and a valid case needs all usual
    (hypothesis favours small draws and first branches, so the mix is set here)."""
    return st.integers(0, 19).flatmap(lambda i: odd if i >= 18 else usual)


@st.composite
def arrays(draw, shape: tuple[int, ...]) -> np.ndarray:
    dtype = draw(mostly(st.sampled_from(FLOATS), st.sampled_from(["int64", "int32", "bool", "complex64"])))
    values = np.random.default_rng(draw(st.integers(0, 2**16))).standard_normal(shape)
    special = draw(mostly(st.none(), st.sampled_from(SPECIAL)))
    if values.size and special is not None:
        values.flat[draw(st.integers(0, values.size - 1))] = special
    with np.errstate(over="ignore", invalid="ignore"):
        return values.astype(dtype)


@st.composite
def factors(draw) -> Factor:
    site = draw(mostly(st.sampled_from(SITES), st.sampled_from(["layers.9", "", "layers", 3])))
    rank = draw(mostly(st.integers(1, 6), st.just(0)))
    a_shape, b_shape = (WIDTH, rank), (rank, WIDTH)
    wrong = draw(mostly(st.none(), st.sampled_from([(WIDTH - 1, rank), (WIDTH, rank + 1), (WIDTH,), (1, WIDTH, rank),
                                                    (0, rank)])))
    if wrong is not None:
        a_shape, b_shape = (wrong, b_shape) if draw(st.booleans()) else (a_shape, wrong[::-1])
    return Factor(site, draw(arrays(a_shape)), draw(arrays(b_shape)))


@st.composite
def cases(draw) -> Case:
    name = draw(mostly(st.sampled_from(["t", "tenant_1", "_x"]),
                       st.sampled_from(["", "1abc", "a-b", "../x", "a b", "a", None, 7])))
    parts = draw(st.lists(factors(), min_size=draw(mostly(st.just(1), st.just(0))), max_size=3,
                          unique_by=lambda f: repr(f.site)))
    form = draw(mostly(st.sampled_from(["dict", "dict", "peft"]), st.just("other")))
    return Case(name, parts, form, draw(st.sampled_from([1.0, 4.0, 16.0])))


def valid(case: Case, rank_limit: dict[str, int] | None) -> bool:
    """The rule, written independently of the session: what it must accept."""
    if not (isinstance(case.name, str) and case.name.isidentifier() and case.name not in ("a", "b")):
        return False
    if case.form == "other" or not case.factors:
        return False
    for f in case.factors:
        rank = f.a.shape[-1] if f.a.ndim else 0
        if f.site not in SITES or f.a.ndim != 2 or f.b.ndim != 2 or f.a.shape[0] != WIDTH or \
                f.b.shape != (rank, WIDTH) or rank < 1 or (rank_limit and rank > rank_limit[f.site]):
            return False
        for array in (f.a, f.b):
            if array.dtype.name not in FLOATS:
                return False
            with np.errstate(over="ignore", invalid="ignore"):
                if not np.isfinite(array.astype(np.float32)).all():
                    return False
    return True


def peft_dir(case: Case, root: Path) -> Path:
    """The case as a PEFT directory whose config agrees with its tensors: each site's rank (`r`, `rank_pattern`)
    from A's last axis, the sites as `target_modules`."""
    assume(all(array.dtype.kind != "c" for f in case.factors for array in (f.a, f.b)))  # safetensors has no complex
    ranks = {str(f.site): int(f.a.shape[-1]) for f in case.factors if f.a.ndim}
    config = {"peft_type": "LORA", "r": 1, "lora_alpha": case.alpha, "rank_pattern": ranks,
              "target_modules": [str(f.site) for f in case.factors]}
    (root / "adapter_config.json").write_text(json.dumps(config))
    tensors = {}
    for f in case.factors:
        tensors[f"base_model.model.{f.site}.lora_A.weight"] = np.ascontiguousarray(f.a.T)
        tensors[f"base_model.model.{f.site}.lora_B.weight"] = np.ascontiguousarray(f.b.T)
    save_file(tensors, root / "adapter_model.safetensors")
    return root


def source_of(case: Case, root: Path):
    if case.form == "dict":
        return {f.site: (f.a, f.b) for f in case.factors}
    if case.form == "peft":
        return peft_dir(case, root)
    return [(f.a, f.b) for f in case.factors]


def oracle(case: Case, weights) -> tuple[np.ndarray, float]:
    """The model's output with the adapter in float64, and the largest magnitude met on the way."""
    deltas = {f.site: (f.a.astype(np.float32).astype(np.float64), f.b.astype(np.float32).astype(np.float64)
                       * (case.alpha / f.a.shape[1] if case.form == "peft" else 1.0)) for f in case.factors}
    h, largest = X.astype(np.float64), 0.0
    for i, (w, b) in enumerate(weights):
        a_b = deltas.get(f"layers.{i}")
        h = h @ w.T + b + (h @ a_b[0] @ a_b[1] if a_b else 0.0)
        largest = max(largest, float(np.abs(h).max()))
        h = np.maximum(h, 0.0) if i < len(weights) - 1 else h
    return h, largest


def check_answer(got: np.ndarray, case: Case, weights) -> None:
    want, largest = oracle(case, weights)
    if np.isfinite(largest) and largest < 1e30:
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5 * (1.0 + largest))
    else:  # the true answer leaves float32's range: the session must not answer with something small and finite
        assert not np.isfinite(got).all() or np.abs(got).max() > 1e29


@PROFILE
@given(case=cases())
def test_add_adapter_refuses_cleanly_or_answers_right(deployed, case):
    session, root = deployed.session, Path(tempfile.mkdtemp(prefix="prop-adapter-"))
    try:
        expected = valid(case, deployed.rank_limit)
        try:
            session.add_adapter(case.name, source_of(case, root))
        except RewriteError as err:
            assert not expected, f"a valid adapter was refused: {err}"
        else:
            assert expected, "an invalid adapter was accepted"
            try:
                check_answer(session.run({"x": X}, adapter=case.name)[0], case, deployed.weights)
            finally:
                session.remove_adapter(case.name)
        for name, before in deployed.before.items():
            np.testing.assert_array_equal(session.run({"x": X}, adapter=name)[0], before)
    finally:
        shutil.rmtree(root, ignore_errors=True)
