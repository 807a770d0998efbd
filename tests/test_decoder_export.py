"""Named outputs, with-past decoder exports and the runtime's generation loop, against transformers and PEFT.

Oracles: the ONNX model's output names are the model's output fields; one decode step with the cache gives the
full-sequence logits (<= 1e-4); greedy generation from the with-past ONNX model (merged, and unmerged bank with
two adapters and the base model in one batch) equals transformers `generate()` on the same model / the PEFT model,
token for token; seeded sampling repeats itself.
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import peft
import pytest
import torch

from rewrite.decoder import capture_with_past
from rewrite.errors import RuntimeUseError
from rewrite.export.io_names import output_names
from rewrite.export.onnx_merged import export_merged
from rewrite.export.onnx_unmerged import export_unmerged
from rewrite.load import LoadedModel
from rewrite.formats.manifest import read_manifest
from rewrite.options import ExportOptions
from rewrite.pipeline import apply
from rewrite.runtime.generate import generate
from rewrite.runtime.ops import library_path
from rewrite.spec import parse_spec
from rewrite.state import state_of

from helpers import capture_module, fresh_capture, run_pass
from test_unmerged import need
from models import build

NEW_TOKENS = 16
PROMPTS = [[5, 17, 3, 99, 42, 7], [64, 1, 12, 33, 8, 90]]


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
            self.name, self.shape = name, shape

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


def _with_past(name: str):
    model = build(name)
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


@pytest.mark.slow
@pytest.mark.parametrize("switching", ["bank", "custom-op"])
def test_with_past_bank_serves_two_peft_adapters_and_the_base_in_one_batch(switching, tmp_path):
    need(switching)
    model, gm = _with_past("llama")
    torch.manual_seed(7)
    configs = {"support": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights=False),
               "style": peft.LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj"], init_lora_weights=False)}
    pm = peft.get_peft_model(copy.deepcopy(model), configs["support"], adapter_name="support")
    pm.add_adapter("style", configs["style"])
    for adapter in configs:
        pm.save_pretrained(tmp_path / "peft", selected_adapters=[adapter])
        run_pass(gm, "load", path=str(tmp_path / "peft" / adapter), adapter=adapter)
    entry = export_unmerged(gm, tmp_path, ExportOptions(mode="unmerged", switching=switching))
    assert "logits" in [o.name for o in entry.outputs]
    options = ort.SessionOptions()
    if switching == "custom-op":
        options.register_custom_ops_library(str(library_path()))
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), options, providers=["CPUExecutionProvider"])
    stop = model.config.eos_token_id
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[1][:3]]  # different lengths: left padding, own past lengths
    got = generate(session, prompts, max_new_tokens=NEW_TOKENS, stop_tokens=[stop],
                   adapter_ids=[entry.adapters["support"].slot, entry.adapters["style"].slot, -1])
    pm.eval()
    want = []
    for prompt, adapter in zip(prompts, ["support", "style", None]):
        if adapter is None:
            with pm.disable_adapter():
                want += _hf_greedy(pm, [prompt], stop)
        else:
            pm.set_adapter(adapter)
            want += _hf_greedy(pm, [prompt], stop)
    assert got == want
    with pm.disable_adapter():
        assert _hf_greedy(pm, prompts[:2], stop) != want[:2]  # the adapters change what is generated


@pytest.mark.slow
def test_apply_with_use_cache_writes_a_checked_with_past_model(hf_dir, tmp_path):
    spec = parse_spec('version = 1\n[capture]\nuse_cache = true\n[[pass]]\nname = "insert"\nadapter = "a"\n'
                      'targets = ["q_proj"]\nrank = 2\ninit = "gaussian"\n[export]\ncheck = true\n')
    summary = apply(spec, str(hf_dir("llama")), tmp_path / "out")
    assert summary.check_max_abs_diff <= 1e-4
    manifest = read_manifest(tmp_path / "out")
    names = [o.name for o in manifest.exports[0].outputs]
    assert names == ["logits", *(f"present.{i}.{kind}" for i in range(2) for kind in ("key", "value"))]
