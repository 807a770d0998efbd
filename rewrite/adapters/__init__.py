"""Adapter kinds: one module class per kind (rewrite/adapters/base.py: `AdapterKind`), registered by its spec name.

A new kind is one file here, its test, and one line in `KINDS`.
"""
from rewrite.adapters.ia3 import IA3, IA3FeedForward
from rewrite.adapters.lora import LoRA
from rewrite.adapters.svd_lora import SvdLoRA

KINDS = {kind.kind: kind for kind in (LoRA, SvdLoRA, IA3, IA3FeedForward)}

__all__ = ["KINDS", "LoRA", "SvdLoRA"]
