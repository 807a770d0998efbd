"""Adapter kinds: one module class per kind, registered by its spec name."""
from rewrite.adapters.lora import LoRA
from rewrite.adapters.svd_lora import SvdLoRA

KINDS = {LoRA.kind: LoRA, SvdLoRA.kind: SvdLoRA}

__all__ = ["KINDS", "LoRA", "SvdLoRA"]
