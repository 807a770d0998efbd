"""The with-past decoder capture (`[capture] use_cache = true`) over decoder architectures beyond
tests/test_decoder_export.py's, against transformers and PEFT on the same weights.

For every architecture of `SWEEP` (tiny seeded configs: rotary with partial / interleaved rotation, ALiBi (Falcon's
computed in bfloat16), sinusoidal positions, multi-query attention, mixture-of-experts feed-forwards, QK norms, sliding
windows, attention sinks, NoPE layers, scaled rope, tied embeddings, attention biases, logit and residual multipliers):
- merged with a PEFT LoRA, greedy `NEW_TOKENS` tokens from the with-past ONNX model on a left-padded batch of three
  prompt lengths equal PEFT `generate()` with that adapter on each prompt alone, token for token, and every step's
  logits are within 1e-4 of `generate`'s `output_logits`;
- on `MIXED`, an unmerged bank or custom-op export serving a mixed batch (a different adapter per row and a row
  without one) through `AdapterSession.generate` gives each row what it gives alone and what PEFT generates with its
  adapter.
Every CI run covers `EVERY_RUN` / `EVERY_RUN_MIXED` (the most distinct caches and attentions); REWRITE_FULL_SWEEP=1
runs every architecture (all passed in session 8).
Models whose cache the capture cannot lay out (`REFUSED`: linear-attention, convolution, state-space and recurrent
layers, shared-KV layers, per-layer head sizes, a compressed latent cache) are refused with a `CaptureError` naming the
class and the reason. bfloat16 arithmetic in a float32 model runs in ONNX Runtime and equals torch bit for bit.
"""
from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import peft
import pytest
import torch
import transformers as tf

from rewrite.bfloat16_islands import ARITHMETIC
from rewrite.decoder import capture_with_past
from rewrite.errors import CaptureError
from rewrite.export.onnx_merged import export_merged
from rewrite.load import LoadedModel
from rewrite.options import ExportOptions
from rewrite.pipeline import apply
from rewrite.runtime.generate import decode_steps
from rewrite.runtime.session import AdapterSession
from rewrite.spec import parse_spec

from helpers import capture_module, run_pass, sweep_params
from test_decoder_export import peft_steps
from test_unmerged import load_passes, need, peft_adapter

NEW_TOKENS = 16
PROMPTS = [[5, 17, 3, 99, 42, 7], [64, 1, 12, 33], [9, 30, 2, 77, 15]]  # left-padded: each row its own past length
_SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128, max_position_embeddings=64)
_GQA = dict(intermediate_size=128, num_key_value_heads=2, **_SMALL)
_TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # inside the tiny vocabulary
_GPT = dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=128, **_TOKENS)
_MOE = dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
_HYBRID = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=128)


def _gemma4(**kwargs) -> tf.Gemma4TextConfig:
    """Gemma 4's head_dim is a per-layer attribute (full-attention layers may take another one)."""
    return tf.Gemma4TextConfig(head_dim=8, sliding_window=8, vocab_size_per_layer_input=128,
                               hidden_size_per_layer_input=8, **kwargs, **(_HYBRID | dict(
        num_hidden_layers=3, layer_types=["sliding_attention", "full_attention", "full_attention"])))


# sliding windows of 8 are shorter than the prompts + NEW_TOKENS
SWEEP = {
    "qwen3": (lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(head_dim=16, **_GQA)), ["q_proj", "v_proj", "down_proj"]),
    "qwen2_moe": (lambda: tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(shared_expert_intermediate_size=64, **_MOE,
                                                                    **_GQA)), ["q_proj", "o_proj", "down_proj"]),
    "qwen3_moe": (lambda: tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(head_dim=16, **_MOE, **_GQA)),
                  ["q_proj", "k_proj", "o_proj"]),
    "mixtral": (lambda: tf.MixtralForCausalLM(tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2,
                                                               sliding_window=8, **_GQA)), ["q_proj", "v_proj"]),
    "granite": (lambda: tf.GraniteForCausalLM(tf.GraniteConfig(embedding_multiplier=2.0, logits_scaling=4.0,
                                                               residual_multiplier=0.5, attention_multiplier=0.2,
                                                               **_GQA)), ["q_proj", "v_proj", "down_proj"]),
    "cohere": (lambda: tf.CohereForCausalLM(tf.CohereConfig(use_qk_norm=True, logit_scale=0.5, **_TOKENS, **_GQA)),
               ["q_proj", "o_proj", "up_proj"]),
    "stablelm": (lambda: tf.StableLmForCausalLM(tf.StableLmConfig(partial_rotary_factor=0.25, use_qkv_bias=True,
                                                                  qk_layernorm=True, **_GQA)),
                 ["q_proj", "v_proj", "down_proj"]),
    "falcon_new": (lambda: tf.FalconForCausalLM(tf.FalconConfig(new_decoder_architecture=True, num_kv_heads=2,
                                                                **_SMALL)), ["query_key_value", "dense_4h_to_h"]),
    "falcon_mqa": (lambda: tf.FalconForCausalLM(tf.FalconConfig(multi_query=True, parallel_attn=False, bias=True,
                                                                **_SMALL)), ["query_key_value", "dense"]),
    "falcon_alibi": (lambda: tf.FalconForCausalLM(tf.FalconConfig(alibi=True, multi_query=False, **_SMALL)),
                     ["query_key_value", "dense_h_to_4h"]),
    "gptj": (lambda: tf.GPTJForCausalLM(tf.GPTJConfig(rotary_dim=8, **_GPT)), ["q_proj", "v_proj", "fc_out"]),
    "codegen": (lambda: tf.CodeGenForCausalLM(tf.CodeGenConfig(rotary_dim=8, n_ctx=64, **_GPT)),
                ["qkv_proj", "fc_out"]),
    "phi": (lambda: tf.PhiForCausalLM(tf.PhiConfig(partial_rotary_factor=0.5, qk_layernorm=True, **_TOKENS, **_GQA)),
            ["q_proj", "dense", "fc2"]),
    "olmo": (lambda: tf.OlmoForCausalLM(tf.OlmoConfig(clip_qkv=2.0, **_TOKENS, **_GQA)),
             ["q_proj", "v_proj", "down_proj"]),
    "olmo2": (lambda: tf.Olmo2ForCausalLM(tf.Olmo2Config(**_TOKENS, **_GQA)), ["q_proj", "k_proj", "down_proj"]),
    "starcoder2": (lambda: tf.Starcoder2ForCausalLM(tf.Starcoder2Config(sliding_window=8, **_GQA)),
                   ["q_proj", "v_proj", "c_proj"]),
    "gpt_bigcode": (lambda: tf.GPTBigCodeForCausalLM(tf.GPTBigCodeConfig(multi_query=True, **_GPT)),
                    ["c_attn", "c_fc"]),
    "smollm3": (lambda: tf.SmolLM3ForCausalLM(tf.SmolLM3Config(no_rope_layers=[1, 0], **_TOKENS, **_GQA)),
                ["q_proj", "v_proj", "down_proj"]),
    "gemma3": (lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
        head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"], **_GQA)),
        ["q_proj", "o_proj", "up_proj"]),
    "cohere2": (lambda: tf.Cohere2ForCausalLM(tf.Cohere2Config(
        sliding_window=8, layer_types=["sliding_attention", "full_attention"], **_TOKENS, **_GQA)),
        ["q_proj", "o_proj", "up_proj"]),
    "gpt_oss": (lambda: tf.GptOssForCausalLM(tf.GptOssConfig(
        head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], **_TOKENS, **_GQA)), ["q_proj", "v_proj", "o_proj"]),
    "xglm": (lambda: tf.XGLMForCausalLM(tf.XGLMConfig(d_model=64, num_layers=2, attention_heads=4, ffn_dim=128,
                                                      vocab_size=128, max_position_embeddings=64)),
             ["q_proj", "v_proj", "fc2"]),
    "llama_rope_scaling": (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}, **_GQA)),
        ["q_proj", "v_proj", "down_proj"]),
    # ALiBi sliced against max_seq_len: a start that is 0 at every served size (rewrite/size_folding.py)
    "mpt": (lambda: tf.MptForCausalLM(tf.MptConfig(d_model=64, n_layers=2, n_heads=4, expansion_ratio=2,
                                                   max_seq_len=64, vocab_size=128)), ["Wqkv", "out_proj", "down_proj"]),
    # cache shapes read from one eager call (rewrite/decoder.py): Gemma 4's full-attention layers take their own head
    # size and KV-head count (keys doubling as values); DeepSeek-V2 caches its compressed latent (key: the normed
    # latent [batch, 1, positions, kv_lora_rank], value: the rotary key part [batch, 1, positions, qk_rope_head_dim])
    # and rotates in complex numbers (rewrite/complex_pairs.py)
    "gemma4": (lambda: tf.Gemma4ForCausalLM(_gemma4(num_kv_shared_layers=0, global_head_dim=16, attention_k_eq_v=True,
                                                    num_global_key_value_heads=1)),
               ["q_proj", "k_proj", "o_proj", "down_proj"]),
    "deepseek_v2": (lambda: tf.DeepseekV2ForCausalLM(tf.DeepseekV2Config(
        kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=2,
        num_experts_per_tok=1, moe_intermediate_size=16, first_k_dense_replace=1,
        **(_HYBRID | _TOKENS | dict(num_key_value_heads=4)))),  # the latent expands to every head
        ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]),
    "llama_tied_biased": (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(tie_word_embeddings=True, attention_bias=True,
                                                                     mlp_bias=True, **_GQA)),
                          ["k_proj", "o_proj", "gate_proj"]),
}

# a capture replays the model bit for bit, but for complex arithmetic computed as real pairs: the same formula,
# rounded as torch's contiguous complex kernels round it (its broadcasting and polar kernels differ by an ulp)
REPLAY = {"deepseek_v2": 1e-6}

# the mixed-batch test, on the architectures whose cache or attention differs most (each case costs a capture, an
# unmerged export and 16 decode steps; the merged test covers every architecture)
MIXED = ["qwen2_moe", "mixtral", "falcon_alibi", "gpt_bigcode", "phi", "gemma3", "gpt_oss", "llama_tied_biased", "mpt",
         "deepseek_v2", "gemma4"]
# what every CI run covers (~30 s a case); REWRITE_FULL_SWEEP=1 runs all of SWEEP and MIXED
EVERY_RUN = ["falcon_alibi", "gpt_oss", "gemma3", "gpt_bigcode", "qwen3_moe", "phi", "smollm3", "llama_tied_biased"]
EVERY_RUN_MIXED = ["falcon_alibi", "gpt_bigcode", "gemma3"]


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return SWEEP[name][0]().eval()


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.slow
@pytest.mark.parametrize("name", sweep_params(list(SWEEP), EVERY_RUN))
def test_merged_with_past_generates_what_peft_generates(name, tmp_path):
    model = _build(name)
    gm, report = capture_with_past(LoadedModel(copy.deepcopy(model), None, "hf", name, model.config))
    assert report.replay_max_abs_diff <= REPLAY.get(name, 0.0)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=SWEEP[name][1], init_lora_weights=False)
    pm = peft_adapter(model, {"tuned": config}, tmp_path / "peft")
    run_pass(gm, "load", path=str(tmp_path / "peft" / "tuned"), adapter="tuned")
    run_pass(gm, "merge")
    export_merged(gm, tmp_path / "m.onnx", ExportOptions(), None)
    steps = list(decode_steps(_session(tmp_path / "m.onnx"), PROMPTS, max_new_tokens=NEW_TOKENS))
    for row, prompt in enumerate(PROMPTS):
        tokens, logits = peft_steps(pm, prompt, NEW_TOKENS)
        assert [int(s.tokens[row]) for s in steps] == tokens, f"row {row}"
        assert np.abs(np.stack([s.logits[row] for s in steps]) - logits).max() <= 1e-4, f"row {row}"
    with torch.no_grad(), pm.disable_adapter():  # the adapter matters: the base model's logits are elsewhere
        base = pm(torch.tensor([PROMPTS[0]])).logits[0, -1].numpy()
    assert np.abs(base - steps[0].logits[0]).max() > 1e-3


def _mixed_adapters(targets: list[str]) -> dict[str, dict]:
    """Three LoRA adapters over the architecture's targets, of different ranks and site sets."""
    return {"support": dict(r=4, lora_alpha=8, target_modules=targets[:2]),
            "style": dict(r=2, lora_alpha=4, target_modules=targets[-1:]),
            "tenant": dict(r=3, lora_alpha=12, target_modules=targets)}


def _hf_greedy(model, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                              eos_token_id=None)[0, len(prompt):].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("name", sweep_params(MIXED, EVERY_RUN_MIXED))
def test_unmerged_mixed_batch_serves_each_row_as_peft_does(name, tmp_path):
    switching = need("custom-op" if MIXED.index(name) % 2 else "bank")
    model = _build(name)
    model.save_pretrained(tmp_path / "hf")
    adapters = _mixed_adapters(SWEEP[name][1])
    pm = peft_adapter(model, {n: peft.LoraConfig(init_lora_weights=False, **kw) for n, kw in adapters.items()},
                      tmp_path / "peft")
    spec = parse_spec(f'version = 1\n[capture]\nuse_cache = true\n'
                      f'{load_passes({n: tmp_path / "peft" / n for n in adapters})}'
                      f'[export]\nmode = "unmerged"\nswitching = "{switching}"\ncapacity = 4\n')
    apply(spec, str(tmp_path / "hf"), tmp_path / "out")
    prompts = [*PROMPTS, [4, 8]]
    names = ["support", None, "style", "tenant"]
    with AdapterSession(tmp_path / "out") as session:
        got = session.generate(prompts, adapters=names, max_new_tokens=NEW_TOKENS)
        alone = [session.generate([p], adapters=[a], max_new_tokens=NEW_TOKENS)[0] for p, a in zip(prompts, names)]
    assert got == alone
    want = []
    for prompt, adapter in zip(prompts, names):
        if adapter is None:
            with pm.disable_adapter():
                want.append(_hf_greedy(pm, prompt))
        else:
            pm.set_adapter(adapter)
            want.append(_hf_greedy(pm, prompt))
    assert got == want
    with pm.disable_adapter():
        assert [_hf_greedy(pm, p) for p in prompts] != want  # the adapters change what is generated


REFUSED = {
    "qwen3_next": (lambda: tf.Qwen3NextForCausalLM(tf.Qwen3NextConfig(
        layer_types=["linear_attention", "full_attention"], head_dim=8, linear_num_value_heads=4,
        linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, num_experts=2, num_experts_per_tok=1, **_HYBRID)),
        "Qwen3NextForCausalLM has linear_attention layers"),
    "lfm2": (lambda: tf.Lfm2ForCausalLM(tf.Lfm2Config(layer_types=["conv", "full_attention"], **_HYBRID)),
             "Lfm2ForCausalLM has conv layers"),
    "falcon_h1": (lambda: tf.FalconH1ForCausalLM(tf.FalconH1Config(mamba_n_heads=4, mamba_d_head=16, mamba_d_ssm=64,
                                                                    mamba_d_state=8, **_HYBRID)),
                  "FalconH1ForCausalLM has hybrid layers"),
    "mamba": (lambda: tf.MambaForCausalLM(tf.MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=128,
                                                         state_size=8)),
              "MambaForCausalLM has linear_attention layers"),
    "rwkv": (lambda: tf.RwkvForCausalLM(tf.RwkvConfig(hidden_size=32, num_hidden_layers=2, vocab_size=128,
                                                      attention_hidden_size=32, intermediate_size=64)),
             "RwkvForCausalLM has no num_hidden_layers / num_attention_heads: .* keeps no key / value cache"),
    "gemma4_shared_kv": (lambda: tf.Gemma4ForCausalLM(_gemma4(num_kv_shared_layers=1)),
                         "Gemma4ForCausalLM has shared-KV layers"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_models_without_a_per_head_cache_are_refused_by_class(name):
    model = REFUSED[name][0]().eval()
    with pytest.raises(CaptureError, match=REFUSED[name][1]):
        capture_with_past(LoadedModel(model, None, "hf", name, model.config))


class _BfloatIsland(torch.nn.Module):
    """A float32 model computing one term in bfloat16, as Falcon's ALiBi does (`slopes.bfloat16() * positions`)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x, positions):
        bias = (x[..., :1].bfloat16() * positions[:, :, None] + 0.3).float()
        return {"bias": bias, "out": self.proj(x) + bias}


def test_bfloat16_arithmetic_in_a_float32_model_runs_in_onnx_runtime_as_torch_rounds_it(tmp_path):
    torch.manual_seed(0)
    model = _BfloatIsland().eval()
    x, positions = torch.randn(2, 5, 8) * 3, torch.arange(297, 307).reshape(2, 5)  # 301, 303, 305 are no bfloat16
    with torch.no_grad():
        want = model(x, positions)
    gm = capture_module(model, {"x": x, "positions": positions})
    assert not [n for n in gm.graph.nodes if n.target in ARITHMETIC and n.meta["val"].dtype == torch.bfloat16]
    export_merged(gm, tmp_path / "m.onnx", ExportOptions(), None)
    bias, out = _session(tmp_path / "m.onnx").run(["bias", "out"], {"x": x.numpy(), "positions": positions.numpy()})
    assert np.array_equal(bias, want["bias"].numpy())
    assert np.abs(out - want["out"].numpy()).max() <= 1e-5
    unrounded = x[..., :1].bfloat16().float() * positions[:, :, None] + 0.3  # the rounding is what is tested
    assert not np.allclose(bias, unrounded.numpy(), rtol=0, atol=1e-3)
