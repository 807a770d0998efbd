"""Adapter kinds: one module class per kind, registered by its spec name."""
from rewrite.adapters.lora import LoRA

KINDS = {LoRA.kind: LoRA}

__all__ = ["KINDS", "LoRA"]
