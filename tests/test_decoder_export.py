"""Named outputs, with-past decoder exports and the runtime's generation loop, against transformers and PEFT.

Oracles: the ONNX model's output names are the model's output fields; one decode step with the cache gives the
full-sequence logits (<= 1e-4); greedy generation from the with-past ONNX model equals transformers `generate()`
token for token: on the base model (LLaMA, Qwen2, Mistral, GPT-2) and, merged with a PEFT LoRA, on the PEFT model
with that adapter for 32 new tokens with every step's logits within 1e-4 of `generate`'s (LLaMA with GQA, Gemma,
Gemma2 past its sliding window, Phi-3 and GPT-NeoX with fused qkv, OPT, BLOOM with ALiBi); prefill in one call and
token by token give the same cache and logits; an unmerged bank / custom-op export served by
`AdapterSession.generate` gives each row of a mixed batch (3 adapters + base, different prompt lengths) what the row
gives alone and what PEFT generates with its adapter; encoder-decoder models and other cache kinds are refused with
the class named; seeded sampling repeats itself.
"""
from __future__ import annotations

import copy
import inspect

import numpy as np
import onnx
import onnxruntime as ort
import peft
import pytest
import torch
import transformers

from rewrite.decoder import capture_with_past
from rewrite.errors import CaptureError, RuntimeUseError
from rewrite.export.io_names import output_names
from rewrite.export.onnx_merged import export_merged
from rewrite.export.onnx_unmerged import export_unmerged
from rewrite.load import LoadedModel
from rewrite.formats.manifest import read_manifest
from rewrite.options import ExportOptions
from rewrite.pipeline import apply
from rewrite.runtime.generate import decode_steps, generate
from rewrite.runtime.ops import library_path
from rewrite.runtime.session import AdapterSession
from rewrite.spec import parse_spec
from rewrite.state import state_of

from helpers import capture_module, fresh_capture, run_pass
from test_unmerged import load_passes, need, peft_adapter
from models import build

NEW_TOKENS = 32
PROMPTS = [[5, 17, 3, 99, 42, 7], [64, 1, 12, 33, 8, 90]]
_SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128, max_position_embeddings=64)
# name: (config, class, PEFT target_modules); llama is tests/models.py's. gemma2's sliding window of 8 is shorter than
# the prompts + NEW_TOKENS and than the prefill test's longest prompt
DECODERS = {
    "llama": (None, None, ["q_proj", "v_proj", "down_proj"]),
    "gemma": (lambda: transformers.GemmaConfig(intermediate_size=128, num_key_value_heads=2, head_dim=16, **_SMALL),
              transformers.GemmaForCausalLM, ["q_proj", "v_proj", "down_proj"]),
    "gemma2": (lambda: transformers.Gemma2Config(intermediate_size=128, num_key_value_heads=2, head_dim=16,
                                                 sliding_window=8, **_SMALL),
               transformers.Gemma2ForCausalLM, ["q_proj", "o_proj", "up_proj"]),
    "phi3": (lambda: transformers.Phi3Config(intermediate_size=128, num_key_value_heads=2, pad_token_id=0,
                                             eos_token_id=2, **_SMALL),
             transformers.Phi3ForCausalLM, ["qkv_proj", "o_proj"]),
    "gpt_neox": (lambda: transformers.GPTNeoXConfig(intermediate_size=128, **_SMALL),
                 transformers.GPTNeoXForCausalLM, ["query_key_value", "dense_4h_to_h"]),
    "opt": (lambda: transformers.OPTConfig(ffn_dim=128, word_embed_proj_dim=64, **_SMALL),
            transformers.OPTForCausalLM, ["q_proj", "v_proj", "fc2"]),
    "bloom": (lambda: transformers.BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=128),
              transformers.BloomForCausalLM, ["query_key_value", "dense_4h_to_h"]),
}


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _hf_greedy(model, prompts: list[list[int]], stop: int) -> list[list[int]]:
    """transformers generate(), greedy, each prompt alone; new tokens up to and including the first stop token."""
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                    do_sample=False, eos_token_id=stop, pad_token_id=stop)[0, len(prompt):].tolist()
        out.append(tokens[:tokens.index(stop) + 1] if stop in tokens else tokens)
    return out


class _Pair(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 3)

    def forward(self, x):
        return {"scores": self.proj(x), "extra": (x.sum(-1), x.mean(-1))}


def test_outputs_are_named_after_the_output_tree(tmp_path):
    x = torch.randn(2, 4)
    gm = capture_module(_Pair(), {"x": x})
    assert output_names(gm, state_of(gm).inputs) == ["scores", "extra.0", "extra.1"]
    entry = export_merged(gm, tmp_path / "m.onnx", ExportOptions(), None)
    assert [(o.name, o.dims) for o in entry.outputs] == [("scores", [2, 3]), ("extra.0", [2]), ("extra.1", [2])]
    got = _session(tmp_path / "m.onnx").run(["scores"], {"x": x.numpy()})[0]
    assert np.abs(got - gm(x=x)["scores"].detach().numpy()).max() <= 1e-6


class _CountingSession:
    """A numpy stand-in for a with-past ONNX decoder over a vocabulary of 10: the next token is (last token + 1) % 10,
    ties broken by position; the cache holds one float per position, so its length is checked at every step."""
    vocab = 10

    class _Info:
        def __init__(self, name, shape):
            self.name, self.shape, self.type = name, shape, "tensor(float)"

    def get_inputs(self):
        shapes = {"input_ids": ["b", "s"], "attention_mask": ["b", "t"], "position_ids": ["b", "s"],
                  "past_key_values.0.key": ["b", 1, "p", 1]}
        return [self._Info(name, shape) for name, shape in shapes.items()]

    def get_outputs(self):
        return [self._Info("logits", None), self._Info("present.0.key", None)]

    def run(self, names, feeds):
        ids, past = feeds["input_ids"], feeds["past_key_values.0.key"]
        assert feeds["attention_mask"].shape[1] == past.shape[2] + ids.shape[1]
        assert feeds["position_ids"].shape == ids.shape
        logits = np.eye(self.vocab, dtype=np.float32)[(ids + 1) % self.vocab]
        present = np.concatenate([past, ids[:, None, :, None].astype(np.float32)], axis=2)
        return [logits, present]


def test_generate_greedy_stops_pads_and_samples_reproducibly():
    session = _CountingSession()
    assert generate(session, [[1, 2], [7]], max_new_tokens=4) == [[3, 4, 5, 6], [8, 9, 0, 1]]
    assert generate(session, [[1, 2], [7]], max_new_tokens=6, stop_tokens=[9]) == [[3, 4, 5, 6, 7, 8], [8, 9]]
    runs = [generate(session, [[1], [2]], max_new_tokens=5, do_sample=True, temperature=5.0, seed=11)
            for _ in range(2)]
    assert runs[0] == runs[1] and all(len(row) == 5 for row in runs[0])
    with pytest.raises(RuntimeUseError):
        generate(session, [[1]], max_new_tokens=2, adapter_ids=[0])


def _build(name: str) -> torch.nn.Module:
    make, cls, _ = DECODERS.get(name, (None, None, None))
    if make is None:
        return build(name)
    torch.manual_seed(0)
    return cls(make()).eval()


def _with_past(name: str):
    model = _build(name)
    gm, report = capture_with_past(LoadedModel(copy.deepcopy(model), None, "hf", name, model.config))
    assert report.replay_max_abs_diff == 0.0
    return model, gm


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_merged_outputs_are_named_after_the_model_fields(name, tmp_path):
    gm, kwargs = fresh_capture(name)
    entry = export_merged(gm, tmp_path / "m.onnx", ExportOptions(), None)
    want = ["logits"] if name == "llama" else ["last_hidden_state", "pooler_output"]
    assert [o.name for o in onnx.load(str(tmp_path / "m.onnx")).graph.output] == want
    assert [o.name for o in entry.outputs] == want and entry.outputs[0].dims[:2] == ["batch", "seq"]
    assert [(i.name, i.dtype) for i in entry.inputs] == [("input_ids", "int64"), ("attention_mask", "int64")]
    got = _session(tmp_path / "m.onnx").run(want[:1], {k: v.numpy() for k, v in kwargs.items()})[0]
    with torch.no_grad():
        assert np.abs(got - gm(**kwargs)[want[0]].numpy()).max() <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_unmerged_bank_outputs_are_named(name, tmp_path):
    gm, kwargs = fresh_capture(name)
    run_pass(gm, "insert", adapter="a", kind="lora", targets=["re:.*(query|q_proj)"], rank=2, init="gaussian")
    entry = export_unmerged(gm, tmp_path, ExportOptions(mode="unmerged", switching="bank"))
    want = ["logits"] if name == "llama" else ["last_hidden_state", "pooler_output"]
    assert [o.name for o in entry.outputs] == want
    feeds = {k: v.numpy() for k, v in kwargs.items()} | {"adapter_ids": np.zeros(2, np.int64)}
    got = _session(tmp_path / "model.onnx").run(want[:1], feeds)[0]
    with torch.no_grad():
        assert np.abs(got - gm(**kwargs)[want[0]].numpy()).max() <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "gpt2"])
def test_with_past_step_equals_the_full_sequence_and_greedy_equals_generate(name, tmp_path):
    model, gm = _with_past(name)
    entry = export_merged(gm, tmp_path / "m.onnx", ExportOptions(), None)
    names = [i.name for i in entry.inputs]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and "past_key_values.1.value" in names
    present = next(o for o in entry.outputs if o.name == "present.0.key")
    kv_heads = 4 if name == "gpt2" else 2  # GQA: 2 KV heads of 4 query heads
    assert present.dims == ["batch_size", kv_heads, "total_sequence_length", 16]
    session = _session(tmp_path / "m.onnx")
    ids = np.array(PROMPTS, np.int64)
    with torch.no_grad():
        full = model(torch.from_numpy(ids)).logits.numpy()
    empty = {i.name: np.zeros((2, kv_heads, 0, 16), np.float32) for i in session.get_inputs() if "past" in i.name}
    n = ids.shape[1] - 1
    prefill = dict(zip([o.name for o in session.get_outputs()], session.run(None, {
        "input_ids": ids[:, :n], "attention_mask": np.ones((2, n), np.int64),
        "position_ids": np.tile(np.arange(n), (2, 1)), **empty})))
    step = session.run(["logits"], {
        "input_ids": ids[:, n:], "attention_mask": np.ones((2, n + 1), np.int64),
        "position_ids": np.full((2, 1), n), **{k.replace("present", "past_key_values"): v for k, v in prefill.items()
                                               if k.startswith("present")}})[0]
    assert np.abs(prefill["logits"] - full[:, :n]).max() <= 1e-4
    assert np.abs(step[:, 0] - full[:, n]).max() <= 1e-4
    stop = model.config.eos_token_id
    assert generate(session, PROMPTS, max_new_tokens=NEW_TOKENS, stop_tokens=[stop]) == _hf_greedy(model, PROMPTS,
                                                                                                  stop)
    sampled = [generate(session, PROMPTS, max_new_tokens=8, do_sample=True, top_k=20, seed=3) for _ in range(2)]
    assert sampled[0] == sampled[1]


def peft_steps(pm, prompt: list[int], new_tokens: int = NEW_TOKENS) -> tuple[list[int], np.ndarray]:
    """PEFT generate(), greedy, `new_tokens` tokens without stop: (the tokens, the logits of every step)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          do_sample=False, eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), torch.cat(out.logits).numpy()


@pytest.fixture(scope="module")
def merged_peft(tmp_path_factory):
    """merged_peft(name) -> (the PEFT model with one LoRA `tuned`, an ORT session of the merged with-past export of the
    same adapter); each architecture exported once per module."""
    made = {}

    def make(name: str):
        if name not in made:
            work = tmp_path_factory.mktemp(f"merged_{name}")
            model, gm = _with_past(name)
            config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=DECODERS[name][2], init_lora_weights=False)
            pm = peft_adapter(copy.deepcopy(model), {"tuned": config}, work / "peft")
            run_pass(gm, "load", path=str(work / "peft" / "tuned"), adapter="tuned")
            run_pass(gm, "merge")
            export_merged(gm, work / "m.onnx", ExportOptions(), None)
            made[name] = pm, _session(work / "m.onnx")
        return made[name]

    return make


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DECODERS))
def test_merged_with_past_generates_what_peft_generates_with_the_adapter(name, merged_peft):
    pm, session = merged_peft(name)
    config = pm.config
    layers, kv_heads = config.num_hidden_layers, getattr(config, "num_key_value_heads", config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inputs = {i.name: i.shape for i in session.get_inputs()}
    takes_positions = "position_ids" in inspect.signature(type(pm.base_model.model).forward).parameters
    assert list(inputs)[:3] == ["input_ids", "attention_mask", *(["position_ids"] if takes_positions else
                                                                   ["past_key_values.0.key"])]
    assert inputs[f"past_key_values.{layers - 1}.value"] == ["batch_size", kv_heads, "past_sequence_length", head_dim]
    present = {o.name: o.shape for o in session.get_outputs()}
    assert present["present.0.key"] == ["batch_size", kv_heads, "total_sequence_length", head_dim]
    prompts = [PROMPTS[0], PROMPTS[1][:4], [9, 30, 2, 77, 15]]  # left padding: each row its own past length
    steps = list(decode_steps(session, prompts, max_new_tokens=NEW_TOKENS))
    for row, prompt in enumerate(prompts):
        tokens, logits = peft_steps(pm, prompt)
        assert len(tokens) == NEW_TOKENS and [int(s.tokens[row]) for s in steps] == tokens
        assert np.abs(np.stack([s.logits[row] for s in steps]) - logits).max() <= 1e-4
    with torch.no_grad(), pm.disable_adapter():  # the adapter matters: the base model's logits are elsewhere
        base = pm(torch.tensor([prompts[0]])).logits[0, -1].numpy()
    assert np.abs(base - steps[0].logits[0]).max() > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DECODERS))
def test_prefill_in_one_call_equals_token_by_token(name, merged_peft):
    _, session = merged_peft(name)
    outputs = [o.name for o in session.get_outputs()]
    takes_positions = "position_ids" in {i.name for i in session.get_inputs()}
    prompts = [PROMPTS[0] + PROMPTS[1], PROMPTS[1][:4]]
    width = len(prompts[0])
    ids = np.array([[0] * (width - len(p)) + p for p in prompts], np.int64)  # left-padded with 0
    mask = (np.arange(width)[None] >= np.array([[width - len(p)] for p in prompts])).astype(np.int64)
    positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1)  # transformers' rule for left padding

    def run(start: int, stop: int, past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {"input_ids": ids[:, start:stop], "attention_mask": mask[:, :stop], **past}
        if takes_positions:
            feeds["position_ids"] = positions[:, start:stop]
        return dict(zip(outputs, session.run(outputs, feeds)))

    empty = {i.name: np.zeros((2, i.shape[1], 0, i.shape[3]), np.float32) for i in session.get_inputs()
             if i.name.startswith("past_key_values.")}
    whole = run(0, width, empty)
    past, logits = empty, []
    for t in range(width):
        result = run(t, t + 1, past)
        logits.append(result["logits"][:, 0])
        past = {k.replace("present.", "past_key_values."): v for k, v in result.items() if k.startswith("present.")}
    real = mask.astype(bool)  # padded positions hold whatever the model makes of a masked pad token
    assert np.abs(np.stack(logits, 1)[real] - whole["logits"][real]).max() <= 1e-4
    for present in outputs[1:]:
        stepped = past[present.replace("present.", "past_key_values.")]
        assert stepped.shape == whole[present].shape
        assert np.abs(stepped.transpose(0, 2, 1, 3)[real] - whole[present].transpose(0, 2, 1, 3)[real]).max() <= 1e-5


MIXED = {"support": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
         "style": dict(r=2, lora_alpha=4, target_modules=["o_proj", "down_proj"]),
         "tenant": dict(r=3, lora_alpha=12, target_modules=["k_proj", "up_proj"])}


@pytest.mark.slow
@pytest.mark.parametrize("switching", ["bank", "custom-op"])
def test_session_generate_serves_each_row_of_a_mixed_batch_as_alone(switching, hf_dir, tmp_path):
    need(switching)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir("llama")).eval()
    pm = peft_adapter(model, {n: peft.LoraConfig(init_lora_weights=False, **kw) for n, kw in MIXED.items()},
                      tmp_path / "peft")
    spec = parse_spec(f'version = 1\n[capture]\nuse_cache = true\n{load_passes({n: tmp_path / "peft" / n for n in MIXED})}'
                      f'[export]\nmode = "unmerged"\nswitching = "{switching}"\ncapacity = 5\n')
    apply(spec, str(hf_dir("llama")), tmp_path / "out")
    session = AdapterSession(tmp_path / "out")
    stop = model.config.eos_token_id
    prompts = [PROMPTS[0], PROMPTS[1][:3], [9, 30, 2, 77, 15], [4, 8]]
    adapters = ["support", None, "style", "tenant"]
    got = session.generate(prompts, adapters=adapters, max_new_tokens=NEW_TOKENS, stop_tokens=[stop])
    alone = [session.generate([p], adapters=[a], max_new_tokens=NEW_TOKENS, stop_tokens=[stop])[0]
             for p, a in zip(prompts, adapters)]
    assert got == alone
    want = []
    for prompt, adapter in zip(prompts, adapters):
        if adapter is None:
            with pm.disable_adapter():
                want += _hf_greedy(pm, [prompt], stop)
        else:
            pm.set_adapter(adapter)
            want += _hf_greedy(pm, [prompt], stop)
    assert got == want
    with pm.disable_adapter():
        assert _hf_greedy(pm, [prompts[0]], stop) != want[:1]  # the adapters change what is generated
    slots = [-1 if a is None else read_manifest(tmp_path / "out").exports[0].adapters[a].slot for a in adapters]
    raw = ort.SessionOptions()
    if switching == "custom-op":
        raw.register_custom_ops_library(str(library_path()))
    plain = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), raw, providers=["CPUExecutionProvider"])
    assert generate(plain, prompts, max_new_tokens=NEW_TOKENS, stop_tokens=[stop], adapter_ids=slots) == got
    session.add_adapter("tenant_again", tmp_path / "peft" / "tenant")  # a bank slot filled while serving
    assert session.generate(prompts[3:], adapters=["tenant_again"], max_new_tokens=NEW_TOKENS,
                            stop_tokens=[stop]) == got[3:]
    with pytest.raises(RuntimeUseError, match="unknown adapter 'nope'; loaded: \\['style', 'support', 'tenant', 'tenant_again'\\]"):
        session.generate(prompts, adapters=["style", "nope", None, "support"], max_new_tokens=2)
    with pytest.raises(RuntimeUseError, match="one name \\(or None\\) per prompt"):
        session.generate(prompts, adapters="style", max_new_tokens=2)
    with pytest.raises(RuntimeUseError, match="adapter_ids has 2 entries for a batch of 4"):
        session.generate(prompts, adapters=["style", "support"], max_new_tokens=2)


@pytest.mark.slow
def test_session_generate_on_ort_adapters_runs_one_adapter_for_every_row(hf_dir, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir("llama")).eval()
    pm = peft_adapter(model, {"support": peft.LoraConfig(init_lora_weights=False, **MIXED["support"])},
                      tmp_path / "peft")
    spec = parse_spec(f'version = 1\n[capture]\nuse_cache = true\n{load_passes({"support": tmp_path / "peft" / "support"})}'
                      '[export]\nmode = "unmerged"\nswitching = "ort-adapters"\n')
    apply(spec, str(hf_dir("llama")), tmp_path / "out")
    session = AdapterSession(tmp_path / "out")
    stop = model.config.eos_token_id
    prompts = [PROMPTS[0], PROMPTS[1][:3]]
    got = session.generate(prompts, adapters=["support", "support"], max_new_tokens=NEW_TOKENS, stop_tokens=[stop])
    assert got == _hf_greedy(pm, prompts, stop)
    with pm.disable_adapter():
        assert session.generate(prompts, max_new_tokens=NEW_TOKENS, stop_tokens=[stop]) == _hf_greedy(pm, prompts,
                                                                                                       stop) != got
    with pytest.raises(RuntimeUseError, match="one adapter per run"):
        session.generate(prompts, adapters=["support", None], max_new_tokens=2)


@pytest.mark.parametrize("name, why", [
    ("t5", "T5ForConditionalGeneration is an encoder-decoder model"),
    ("bart", "BartForConditionalGeneration is an encoder-decoder model"),
    ("chunked", "Qwen2ForCausalLM has chunked_attention layers")])
def test_models_the_with_past_capture_cannot_serve_are_refused_by_class(name, why):
    small = dict(vocab_size=128, max_position_embeddings=64)
    model = {"t5": lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
                 d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=4, vocab_size=128)),
             "bart": lambda: transformers.BartForConditionalGeneration(transformers.BartConfig(
                 d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, **small)),
             "chunked": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
                 hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 layer_types=["full_attention", "chunked_attention"], **small))}[name]()
    with pytest.raises(CaptureError, match=why):
        capture_with_past(LoadedModel(model, None, "hf", name, model.config))


@pytest.mark.slow
def test_apply_with_use_cache_writes_a_checked_with_past_model(hf_dir, tmp_path):
    spec = parse_spec('version = 1\n[capture]\nuse_cache = true\n[[pass]]\nname = "insert"\nadapter = "a"\n'
                      'targets = ["q_proj"]\nrank = 2\ninit = "gaussian"\n[export]\ncheck = true\n')
    summary = apply(spec, str(hf_dir("llama")), tmp_path / "out")
    assert summary.check_max_abs_diff <= 1e-4
    manifest = read_manifest(tmp_path / "out")
    names = [o.name for o in manifest.exports[0].outputs]
    assert names == ["logits", *(f"present.{i}.{kind}" for i in range(2) for kind in ("key", "value"))]
