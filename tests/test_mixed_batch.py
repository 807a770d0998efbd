"""Serving requests with different adapters in one run (runtime/mixed_batch.py) and reading them from JSON
(runtime/json_feeds.py), without Ray: the pieces the Ray Serve deployment is made of.

The oracles are `AdapterSession.run` on each request alone and PEFT with the request's adapter (tests/serving_setup.py):
every answer of a mixed run equals both, for bank, custom-op and ort-adapters (which may only share runs per
adapter); an unknown adapter fails only its own request; JSON that does not fit the model is refused with a message
naming the field.
"""
from __future__ import annotations

import numpy as np
import pytest

from rewrite.errors import RuntimeUseError
from rewrite.runtime.json_feeds import request_adapter, request_feeds
from rewrite.runtime.mixed_batch import Request, UnknownAdapter, run_mixed
from rewrite.runtime.model_io import TensorSpec, read_io
from rewrite.runtime.session import AdapterSession

from serving_setup import need_custom_op, setup_fixture  # noqa: F401 - the `setup` fixture


def requests(adapters: list[str | None], seed: int = 0) -> list[Request]:
    g = np.random.default_rng(seed)
    shapes = [(1, 3, 64), (2, 3, 64), (1, 5, 64)]  # two shapes: two runs
    return [Request({"x": g.standard_normal(shapes[i % 3]).astype(np.float32)}, a) for i, a in enumerate(adapters)]


@pytest.mark.parametrize("switching", ["bank", pytest.param("custom-op", marks=pytest.mark.slow),
                                       pytest.param("ort-adapters", marks=pytest.mark.slow)])
def test_mixed_runs_equal_single_requests(setup, switching):
    need_custom_op(switching)
    with AdapterSession(setup.export(switching)) as session:
        _, outputs = read_io(session.model_path)
        names = [o.name for o in outputs]
        batch = requests(["support", None, "style", "support", "nope", "style", None, "support", "style"])
        answers = run_mixed(session, batch, names)
        for request, answer in zip(batch, answers):
            if request.adapter == "nope":
                assert isinstance(answer.error, UnknownAdapter) and answer.outputs is None
                continue
            single = session.run(request.feeds, adapter=request.adapter)
            assert answer.error is None and answer.outputs[names[0]].shape == single[0].shape
            np.testing.assert_allclose(answer.outputs[names[0]], single[0], rtol=0, atol=1e-5)
            np.testing.assert_allclose(answer.outputs[names[0]], setup.peft(request.feeds["x"], request.adapter),
                                       rtol=0, atol=1e-5)
        # the adapters differ, so a row answered with another adapter would fail the comparisons above
        first = batch[0].feeds["x"]
        assert np.abs(setup.peft(first, "support") - setup.peft(first, "style")).max() > 1e-2


def test_a_failing_run_falls_back_to_single_requests(setup, monkeypatch):
    with AdapterSession(setup.export("bank")) as session:
        names = [o.name for o in read_io(session.model_path)[1]]
        batch = requests(["support", "style", None])
        real = session.run

        def run(feeds, **kw):
            rows = next(iter(feeds.values())).shape[0]
            if rows > 2:
                raise RuntimeUseError("planted: a shared run failed")
            return real(feeds, **kw)

        monkeypatch.setattr(session, "run", run)
        answers = run_mixed(session, batch, names)
        assert all(a.error is None for a in answers)  # batch[0] and batch[2]'s group ran one by one
        np.testing.assert_allclose(answers[0].outputs[names[0]], real(batch[0].feeds, adapter="support")[0], atol=1e-5)


SPECS = [TensorSpec("x", np.dtype(np.float32), ("batch", "seq", 4)),
         TensorSpec("ids", np.dtype(np.int64), ("batch", "seq", 4)),
         TensorSpec("mask", np.dtype(np.bool_), ("batch", "seq", 4))]


def body(**inputs) -> dict:
    rows = {"x": [[[0.5, 1, 2, 3]]], "ids": [[[1, 2, 3, 4]]], "mask": [[[True, False, True, True]]]}
    return {"adapter": "a", "inputs": {**rows, **inputs}}


def test_json_requests_are_read_by_kind():
    feeds = request_feeds(body(), SPECS)
    assert {k: (v.dtype, v.shape) for k, v in feeds.items()} == {
        "x": (np.float32, (1, 1, 4)), "ids": (np.int64, (1, 1, 4)), "mask": (np.bool_, (1, 1, 4))}
    assert request_adapter({"inputs": {}}) is None and request_adapter(body()) == "a"


@pytest.mark.parametrize("change, message", [
    (dict(x=[[[1, 2, 3]]]), "inputs.x: axis 2 has size 3, the model takes 4"),
    (dict(x=[[1, 2, 3, 4]]), "inputs.x: 2 dims"),
    (dict(x=[[[1, 2, 3, 4]], [[1, 2]]]), "inputs.x: not a rectangular array"),
    (dict(x=[[["a", "b", "c", "d"]]]), "inputs.x: 'U' values"),
    (dict(x=[[[1e39, 0, 0, 0]]]), "beyond float32's range"),
    (dict(ids=[[[1.5, 2, 3, 4]]]), "inputs.ids: 'f' values"),
    (dict(mask=[[[1, 0, 1, 1]]]), "inputs.mask: 'i' values"),
    (dict(ids=[[[1, 2, 3, 4]], [[1, 2, 3, 4]]]), "rows differ between inputs"),
    (dict(x=[]), "inputs.x: 1 dims"),
    (dict(extra=[1]), "inputs: unknown 'extra'"),
])
def test_json_that_does_not_fit_is_refused(change, message):
    with pytest.raises(RuntimeUseError, match=message.replace("(", r"\(").replace(")", r"\)")):
        request_feeds(body(**change), SPECS)


@pytest.mark.parametrize("request_body, message", [
    ([1, 2], "expected a JSON object"), ({"inputs": {}, "adaptr": "a"}, "unknown field 'adaptr'"),
    ({"inputs": {}, "adapter": 3}, "adapter: expected an adapter name or null")])
def test_request_fields_are_checked(request_body, message):
    with pytest.raises(RuntimeUseError, match=message):
        request_adapter(request_body)
