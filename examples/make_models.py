"""Build the example's inputs: a tiny LLaMA (random weights, seeded) and a LoRA adapter for it.

The adapter is written in Hugging Face PEFT's on-disk format (adapter_config.json +
adapter_model.safetensors) with non-zero weights; it stands in for an adapter fine-tuned with PEFT.
Usage: python examples/make_models.py OUT_DIR
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers

from rewrite.formats.peft_dir import write_peft_dir
from rewrite.formats.peft_lora import LINEAR_KEYS


def build_model(out: Path) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                      max_position_embeddings=256, use_cache=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(out)
    return model


def build_adapter(model: torch.nn.Module, out: Path, rank: int = 8, alpha: float = 16.0) -> None:
    generator = torch.Generator().manual_seed(1)
    targets = ("q_proj", "v_proj")
    modules = {}
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in targets:
            a = torch.randn(rank, module.in_features, generator=generator) * 0.05
            b = torch.randn(module.out_features, rank, generator=generator) * 0.05
            modules[name] = dict(zip(LINEAR_KEYS, (a.numpy(), b.numpy())))
    config = dict(peft_type="LORA", r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                  bias="none", use_rslora=False, task_type="CAUSAL_LM")
    write_peft_dir(out, config, modules)


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "examples/models")
    model = build_model(root / "tiny-llama")
    build_adapter(model, root / "support-bot-lora")
    print(f"wrote {root / 'tiny-llama'} and {root / 'support-bot-lora'}")
