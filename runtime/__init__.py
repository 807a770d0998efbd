"""Serving: `AdapterSession` opens an unmerged export and switches adapters per request or per batch row.

    from rewrite.runtime import AdapterSession

Imports neither torch nor the compiler (only `rewrite.errors` and `rewrite.formats`): a serving container needs
onnxruntime, onnx, numpy, safetensors and pydantic.
"""
from rewrite.runtime.session import AdapterSession

__all__ = ["AdapterSession"]
