"""Adapter kinds: one module class per kind (rewrite/adapters/base.py: `AdapterKind`), registered by its spec name.

A new kind is one file here, its test, and one line in `KINDS`.
"""
from rewrite.adapters.bitfit import BitFit
from rewrite.adapters.boft import BOFT
from rewrite.adapters.bottleneck import Bottleneck
from rewrite.adapters.dora import DoRA
from rewrite.adapters.fourierft import FourierFT
from rewrite.adapters.full import Full
from rewrite.adapters.hra import HRA
from rewrite.adapters.ia3 import IA3, IA3FeedForward
from rewrite.adapters.ln_tuning import LnTuning
from rewrite.adapters.loha import LoHa
from rewrite.adapters.lokr import LoKr
from rewrite.adapters.lora import LoRA
from rewrite.adapters.oft import OFT
from rewrite.adapters.prefix_tuning import PrefixTuning
from rewrite.adapters.prompt_tuning import PromptTuning
from rewrite.adapters.road import Road
from rewrite.adapters.svd_lora import SvdLoRA
from rewrite.adapters.trainable_tokens import TrainableTokens
from rewrite.adapters.vera import VeRA

KINDS = {kind.kind: kind for kind in (LoRA, SvdLoRA, IA3, IA3FeedForward, FourierFT, Road, DoRA, OFT, BOFT, LoHa, LoKr,
                                     VeRA, HRA, BitFit, LnTuning, Bottleneck, PromptTuning,
                                     PrefixTuning, Full, TrainableTokens)}

__all__ = ["KINDS", "LoRA", "SvdLoRA"]
