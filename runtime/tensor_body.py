"""A binary inference request and answer: the HTTP body is one safetensors file (`Content-Type:
application/octet-stream`), the adapter a query parameter.

    POST /v1/infer?adapter=NAME     body: the model's inputs by name, each with its leading batch axis (no `adapter`
                                    parameter: the base model)
    200                             body: the model's outputs by name, same content type

The tensors meet the JSON body's rules (rewrite.runtime.json_feeds: every input once, no other, the model's rank and
fixed dims, one row count, a dtype of the kind the input takes, finite floats). Dtypes travel with the data, so
nothing is parsed from text: reading and writing an 8192-float request costs ~0.02 ms against ~9 ms of JSON
(bench/README.md, `bench_ray_serve.py`), which on a small machine is what caps an HTTP server's requests per second.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

from rewrite.errors import RuntimeUseError, first_line

MEDIA_TYPE = "application/octet-stream"


def read_request(body: bytes, adapter: str | None) -> dict[str, Any]:
    """{"inputs": {name: array}, "adapter": adapter}: the JSON body's shape, for the same checks."""
    if not body:
        raise RuntimeUseError(f"request: an empty body; a {MEDIA_TYPE} body is one safetensors file of the inputs")
    try:
        inputs = load(body)
    except (SafetensorError, ValueError, TypeError) as err:
        raise RuntimeUseError(f"request: not a safetensors body ({first_line(err)})") from None
    if adapter == "":
        raise RuntimeUseError("adapter: an empty name; leave the parameter out for the base model")
    return {"inputs": inputs, "adapter": adapter}


def write_answer(outputs: dict[str, np.ndarray]) -> bytes:
    return save({name: np.ascontiguousarray(value) for name, value in outputs.items()})
