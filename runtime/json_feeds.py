"""A JSON inference request as model feeds: `{"adapter": "support" | null, "inputs": {"x": [[...]]}}`.

Rules (each failure is a `RuntimeUseError` whose message names the field; the HTTP API answers it with a 4xx):
  * `inputs` holds every input the model takes, no other, each a rectangular nested list with the model's rank and a
    leading batch axis of at least one row; every input has the same number of rows.
  * JSON has no dtypes, so numbers are read by kind: a float input takes numbers (integers included), an integer
    input integers only (1.5 is refused, never truncated), a bool input true / false only.
  * Fixed dims must match; named (dynamic) dims take any size. NaN and infinities are refused (an answer holding
    them could not be sent back as JSON).
  * `adapter` is an adapter name or null (the base model); whether it is loaded is the session's to say.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from rewrite.errors import RuntimeUseError
from rewrite.runtime.model_io import TensorSpec

_KINDS = {"f": "fiu", "i": "iu", "u": "iu", "b": "b"}  # model dtype kind -> JSON array kinds it accepts


def request_adapter(body: Any) -> str | None:
    if not isinstance(body, dict):
        raise RuntimeUseError(f"request: expected a JSON object with \"inputs\" (and \"adapter\"), got "
                              f"{type(body).__name__}")
    unknown = sorted(set(body) - {"inputs", "adapter"})
    if unknown:
        raise RuntimeUseError(f"request: unknown field {unknown[0]!r} (fields: inputs, adapter)")
    adapter = body.get("adapter")
    if adapter is not None and not isinstance(adapter, str):
        raise RuntimeUseError(f"adapter: expected an adapter name or null, got {adapter!r}")
    return adapter


def _array(name: str, value: Any, spec: TensorSpec) -> np.ndarray:
    try:
        array = np.asarray(value)
    except ValueError:
        array = None
    if array is None or array.dtype == object:
        raise RuntimeUseError(f"inputs.{name}: not a rectangular array of numbers")
    if array.ndim != len(spec.dims):
        raise RuntimeUseError(f"inputs.{name}: {array.ndim} dims {list(array.shape)}, the model takes "
                              f"{len(spec.dims)} {list(spec.dims)}")
    if array.size and array.dtype.kind not in _KINDS.get(spec.dtype.kind, spec.dtype.kind):
        raise RuntimeUseError(f"inputs.{name}: {array.dtype.kind!r} values ({array.dtype}), the model takes "
                              f"{spec.dtype}")
    bad = [(i, d, s) for i, (d, s) in enumerate(zip(spec.dims, array.shape)) if isinstance(d, int) and d != s]
    if bad:
        raise RuntimeUseError(f"inputs.{name}: axis {bad[0][0]} has size {bad[0][2]}, the model takes {bad[0][1]}")
    if array.shape[0] < 1:
        raise RuntimeUseError(f"inputs.{name}: no rows (the leading axis is the batch)")
    with np.errstate(over="ignore", invalid="ignore"):
        cast = array.astype(spec.dtype)
    if cast.dtype.kind == "f" and not np.isfinite(cast).all():
        raise RuntimeUseError(f"inputs.{name}: NaN, infinite or beyond {spec.dtype}'s range")
    return cast


def request_feeds(body: dict, specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """The model's feeds from a request (its `inputs`), checked against `specs` (the model's own inputs)."""
    inputs = body.get("inputs")
    if not isinstance(inputs, dict):
        raise RuntimeUseError("inputs: expected an object {input name: nested list}")
    names = [s.name for s in specs]
    unknown = sorted(set(inputs) - set(names))
    missing = [n for n in names if n not in inputs]
    if unknown or missing:
        raise RuntimeUseError(f"inputs: {'unknown ' + repr(unknown[0]) if unknown else 'missing ' + repr(missing[0])}"
                              f"; the model takes {', '.join(names)}")
    feeds = {s.name: _array(s.name, inputs[s.name], s) for s in specs}
    rows = {name: a.shape[0] for name, a in feeds.items()}
    if len(set(rows.values())) > 1:
        raise RuntimeUseError(f"inputs: rows differ between inputs {rows} (one batch axis)")
    return feeds
