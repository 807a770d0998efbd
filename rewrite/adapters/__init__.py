"""Adapter kinds: one module class per kind (rewrite/adapters/base.py: `AdapterKind`), registered by its spec name.

A new kind is one file here, its test, and one line in `KINDS`.
"""
from rewrite.adapters.lora import LoRA
from rewrite.adapters.svd_lora import SvdLoRA

KINDS = {LoRA.kind: LoRA, SvdLoRA.kind: SvdLoRA}

__all__ = ["KINDS", "LoRA", "SvdLoRA"]
