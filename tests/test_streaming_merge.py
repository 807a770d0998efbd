"""Streaming merge (rewrite/streaming_merge.py) against PEFT's `merge_and_unload` as the oracle.

Tiny transformers models are saved with `save_pretrained(max_shard_size=...)` (LLaMA: 4 shards), PEFT makes a LoRA
on them with random non-zero A and B (`init_lora_weights=False`) and saves it; `merge_checkpoint`'s output loads
with transformers `from_pretrained` and equals PEFT's merged model:
- fp32 LLaMA (rank_pattern / alpha_pattern, embed_tokens + lm_head): every weight and the logits <= 1e-6;
- bf16 LLaMA: every tensor stays BF16 and each merged element is round-to-bf16 of PEFT's fp32 merge or, where
  the two fp32 values differ by fp32 rounding, the bf16 neighbour: |ours - ref| <= one bf16 ulp of ref, i.e.
  2^(floor(log2 |ref|) - 7); the measured number of differing elements is printed (0: the same fp32 GEMM and add);
- GPT-2 (a single model.safetensors, Conv1D with fan_in_fan_out, a square c_proj, rsLoRA, the tied wte);
- an adapter trained on `LlamaModel` (module paths without `model.`) into the `LlamaForCausalLM` checkpoint;
- DoRA (magnitudes moved off their init) on LLaMA (Linear, embedding, lm_head) and GPT-2 (Conv1D, wte): every
  weight equal to fp32 rounding; into the bf16 LLaMA: within one bf16 ulp of PEFT's fp32 merge.
Refusals: a module missing from the checkpoint (its name and the nearest), a shape that does not fit, an existing
output without force (and a non-model directory even with it), both model.safetensors and an index, an fp16
overflow; an interrupted run or a full disk leaves no output and no temporary beside it (and an earlier output as
it was). Peak memory and throughput are measured by bench/bench_streaming_merge.py.
"""
from __future__ import annotations

import errno
import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from models import _config, build
from rewrite import streaming_merge
from rewrite.errors import AdapterFileError, ModelLoadError, OutputError
from rewrite.progress import reporting
from rewrite.streaming_merge import merge_checkpoint, resolve

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA_LORA = dict(target_modules=[*LLAMA_LIKE, "embed_tokens", "lm_head"], rank_pattern={"q_proj": 8},
                  alpha_pattern={"model.layers.1.mlp.down_proj": 3, "v_proj": 16})
GPT2_LORA = dict(target_modules=["c_attn", "c_proj", "c_fc", "wte"], fan_in_fan_out=True, use_rslora=True)
ATOL = 1e-6


def save_adapter(model: torch.nn.Module, path: Path, seed: int = 1, **lora) -> Path:
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora)
    with warnings.catch_warnings():  # targeting an embedding: PEFT saves its base weight too (on purpose)
        warnings.filterwarnings("ignore", message=".*(save_embedding_layers|fan_in_fan_out).*")
        peft.get_peft_model(model, config).save_pretrained(path)
    return path


def peft_merged(base: torch.nn.Module, adapter: Path) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        return peft.PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()


def max_diff(ours: torch.nn.Module, ref: torch.nn.Module) -> float:
    a, b = ours.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def logits_diff(ours: torch.nn.Module, ref: torch.nn.Module) -> float:
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((ours(ids).logits - ref(ids).logits).abs().max())


def header(directory: Path) -> dict[str, tuple[str, torch.Tensor]]:
    """{key: (safetensors dtype, tensor)} of every shard in `directory`."""
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                out[key] = (handle.get_slice(key).get_dtype(), handle.get_tensor(key))
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A 4-shard fp32 LLaMA checkpoint and a PEFT LoRA on it; a bf16 twin and a LoRA made on it (PEFT's saved copy
    of the embedding is then the bf16 one)."""
    root = tmp_path_factory.mktemp("llama")
    build("llama").save_pretrained(root / "fp32", max_shard_size="100KB")
    build("llama").to(torch.bfloat16).save_pretrained(root / "bf16", max_shard_size="50KB")
    save_adapter(build("llama"), root / "adapter", **LLAMA_LORA)
    upcast = transformers.LlamaForCausalLM.from_pretrained(root / "bf16", dtype=torch.float32)
    save_adapter(upcast, root / "adapter_bf16", **LLAMA_LORA)
    return root


def test_llama_fp32_equals_peft_merge(llama, tmp_path):
    shards = sorted(p.name for p in (llama / "fp32").glob("*.safetensors"))
    assert len(shards) >= 3
    summary = merge_checkpoint(llama / "fp32", llama / "adapter", tmp_path / "out")
    assert summary.shards == shards and len(summary.merged) == 2 * 7 + 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [*shards, "config.json", "generation_config.json", "model.safetensors.index.json"])
    ours = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    ref = peft_merged(transformers.LlamaForCausalLM.from_pretrained(llama / "fp32"), llama / "adapter")
    weights, logits = max_diff(ours, ref), logits_diff(ours, ref)
    print(f"\n[streaming-merge] llama fp32: weights {weights:.3g}, logits {logits:.3g}")
    assert weights <= ATOL and logits <= ATOL


def test_llama_bf16_stays_bf16_and_equals_peft_fp32_merge_rounded(llama, tmp_path):
    merge_checkpoint(llama / "bf16", llama / "adapter_bf16", tmp_path / "out")
    ours, before = header(tmp_path / "out"), header(llama / "bf16")
    assert ours.keys() == before.keys() and {dtype for dtype, _ in ours.values()} == {"BF16"}
    ref = peft_merged(transformers.LlamaForCausalLM.from_pretrained(llama / "bf16", dtype=torch.float32),
                      llama / "adapter_bf16").state_dict()
    differing = 0
    for key, (_, got) in ours.items():
        want = ref[key].to(torch.bfloat16)
        ulp = torch.exp2(torch.floor(torch.log2(want.float().abs().clamp_min(1e-30))) - 7)
        assert bool(((got.float() - want.float()).abs() <= ulp).all()), key
        differing += int((got != want).sum())
        if "proj" not in key and key not in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(got, before[key][1])  # untouched tensors are copied bit for bit
    print(f"\n[streaming-merge] llama bf16: {differing} elements differ from PEFT's fp32 merge rounded to bf16")
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())


def test_gpt2_conv1d_rslora_single_file(tmp_path):
    base = tmp_path / "gpt2"
    build("gpt2").save_pretrained(base)
    assert (base / "model.safetensors").is_file() and not (base / "model.safetensors.index.json").exists()
    adapter = save_adapter(build("gpt2"), tmp_path / "adapter", **GPT2_LORA)
    summary = merge_checkpoint(base, adapter, tmp_path / "out")
    assert summary.merged["transformer.h.0.attn.c_proj"] == "transformer.h.0.attn.c_proj.weight"  # square Conv1D
    ours = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    ref = peft_merged(transformers.GPT2LMHeadModel.from_pretrained(base), adapter)
    weights, logits = max_diff(ours, ref), logits_diff(ours, ref)
    print(f"\n[streaming-merge] gpt2: weights {weights:.3g}, logits {logits:.3g}")
    assert weights <= ATOL and logits <= ATOL


def save_dora(model: torch.nn.Module, path: Path, **lora) -> Path:
    """A PEFT DoRA whose magnitudes are moved off their init (||W + s B A|| per output, which would make m / n = 1)."""
    torch.manual_seed(2)
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, use_dora=True, **lora)
    dora = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in dora.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(save_embedding_layers|fan_in_fan_out).*")
        dora.save_pretrained(path)
    return path


@pytest.mark.parametrize("name, cls, lora", [
    ("llama", transformers.LlamaForCausalLM, dict(target_modules=[*LLAMA_LIKE, "embed_tokens", "lm_head"])),
    ("gpt2", transformers.GPT2LMHeadModel, dict(target_modules=["c_attn", "c_proj", "c_fc", "wte"],
                                                fan_in_fan_out=True))])
def test_dora_equals_peft_merge(name, cls, lora, tmp_path):
    """Linear rows (norm per row, merged block by block) and Conv1D / Embedding columns (norm over the rows: the
    tensor read twice); the column norms are summed in another order than PEFT's, so equal to fp32 rounding of the
    value (rtol), not bit for bit."""
    build(name).save_pretrained(tmp_path / "base", max_shard_size="100KB")
    adapter = save_dora(build(name), tmp_path / "dora", **lora)
    summary = merge_checkpoint(tmp_path / "base", adapter, tmp_path / "out")
    assert len(summary.merged) == (2 * 7 + 2 if name == "llama" else 2 * 4 + 1)
    ours = cls.from_pretrained(tmp_path / "out").eval()
    ref = peft_merged(cls.from_pretrained(tmp_path / "base"), adapter)
    unchanged = cls.from_pretrained(tmp_path / "base").state_dict()
    theirs = ref.state_dict()
    for key, got in ours.state_dict().items():
        assert torch.allclose(got, theirs[key], rtol=1e-6, atol=ATOL), key
        if key.endswith(("q_proj.weight", "c_attn.weight", "wte.weight", "embed_tokens.weight")):
            assert not torch.allclose(got, unchanged[key], atol=1e-3), key  # the adapter did change it
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = ours(ids).logits, ref(ids).logits
    print(f"\n[streaming-merge] {name} DoRA: weights {max_diff(ours, ref):.3g}, logits "
          f"{float((got - want).abs().max()):.3g} of {float(want.abs().max()):.3g}")
    assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max())  # GPT-2's tied logits reach ~400


def test_dora_into_bf16_is_peft_fp32_merge_rounded(llama, tmp_path):
    upcast = transformers.LlamaForCausalLM.from_pretrained(llama / "bf16", dtype=torch.float32)
    adapter = save_dora(upcast, tmp_path / "dora", target_modules=LLAMA_LIKE)
    merge_checkpoint(llama / "bf16", adapter, tmp_path / "out")
    ours = header(tmp_path / "out")
    ref = peft_merged(transformers.LlamaForCausalLM.from_pretrained(llama / "bf16", dtype=torch.float32),
                      adapter).state_dict()
    assert {dtype for dtype, _ in ours.values()} == {"BF16"}
    for key, (_, got) in ours.items():
        want = ref[key].to(torch.bfloat16)
        ulp = torch.exp2(torch.floor(torch.log2(want.float().abs().clamp_min(1e-30))) - 7)
        assert bool(((got.float() - want.float()).abs() <= ulp).all()), key


def test_a_dora_magnitude_that_does_not_fit_the_weight_is_refused(llama, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = save_dora(build("llama"), tmp_path / "dora", target_modules=["q_proj"])
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("layers.0.self_attn.q_proj.lora_magnitude_vector"))
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, weights)
    with pytest.raises(AdapterFileError, match=r"module 'model.layers.0.self_attn.q_proj'.*lora_magnitude_vector has "
                                               r"63 entries; the weight has 64 outputs"):
        merge_checkpoint(llama / "fp32", adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_adapter_of_the_bare_model_folds_into_the_causal_lm_checkpoint(llama, tmp_path):
    adapter = save_adapter(build("llama").model, tmp_path / "adapter", target_modules=[*LLAMA_LIKE, "embed_tokens"])
    summary = merge_checkpoint(llama / "fp32", adapter, tmp_path / "out")
    assert summary.merged["layers.0.self_attn.q_proj"] == "model.layers.0.self_attn.q_proj.weight"
    ours = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    ref = peft_merged(transformers.LlamaForCausalLM.from_pretrained(llama / "fp32").model, adapter)
    assert max_diff(ours.model, ref) <= ATOL


def test_names_resolve_exactly_then_by_a_unique_suffix():
    keys = ["model.layers.0.q.weight", "lm_head.weight", "a.x.weight", "b.x.weight"]
    assert resolve(["model.layers.0.q", "lm_head"], keys) == {
        "model.layers.0.q": "model.layers.0.q.weight", "lm_head": "lm_head.weight"}
    assert resolve(["layers.0.q"], keys) == {"layers.0.q": "model.layers.0.q.weight"}  # the checkpoint adds model.
    assert resolve(["base.model.layers.0.q"], keys) == {"base.model.layers.0.q": "model.layers.0.q.weight"}
    with pytest.raises(AdapterFileError, match=r"'x' matches several checkpoint tensors by suffix: \['a.x.weight', "
                                               r"'b.x.weight'\]"):
        resolve(["x"], keys)
    with pytest.raises(AdapterFileError, match=r"\['model.layers.0.q', 'layers.0.q'\] all fold into"):
        resolve(["model.layers.0.q", "layers.0.q"], keys)


def test_a_module_missing_from_the_checkpoint_is_named_with_the_nearest(llama, tmp_path):
    config, cls = _config("llama")
    config.num_hidden_layers = 1
    cls(config).save_pretrained(tmp_path / "one_layer", max_shard_size="100KB")
    with pytest.raises(AdapterFileError, match=r"module 'model.layers.1.mlp.down_proj' is not in the checkpoint.*"
                                               r"nearest module names: \['model.layers.0.mlp.down_proj'"):
        merge_checkpoint(tmp_path / "one_layer", llama / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_shape_that_does_not_fit_is_refused(llama, tmp_path):
    config, cls = _config("llama")
    config.intermediate_size = 96
    cls(config).save_pretrained(tmp_path / "narrow")
    with pytest.raises(AdapterFileError, match=r"module 'model.layers.0.mlp.down_proj' -> model.safetensors: "
                                               r"'model.layers.0.mlp.down_proj.weight': A \(4, 128\) and B \(64, 4\) "
                                               r"make an update of shape \(64, 128\), but the tensor has shape "
                                               r"\(64, 96\)"):
        merge_checkpoint(tmp_path / "narrow", llama / "adapter", tmp_path / "out")


def test_existing_output_needs_force_and_must_be_a_model_directory(llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(OutputError, match=r"exists; replace it with `rewrite merge --force`"):
        merge_checkpoint(llama / "fp32", llama / "adapter", out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    merge_checkpoint(llama / "fp32", llama / "adapter", out, force=True)
    assert (out / "model.safetensors.index.json").is_file()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(OutputError, match="is not a model directory"):
        merge_checkpoint(llama / "fp32", llama / "adapter", other, force=True)
    assert (other / "todo.txt").read_text() == "keep me"
    with pytest.raises(OutputError, match="which the merge reads"):
        merge_checkpoint(llama / "fp32", llama / "adapter", llama, force=True)


@pytest.mark.parametrize("earlier", [False, True])
def test_an_interrupted_run_leaves_nothing(llama, tmp_path, monkeypatch, earlier):
    out = tmp_path / "out"
    if earlier:
        merge_checkpoint(llama / "fp32", llama / "adapter", out)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
    real, written = streaming_merge.write_shard, []

    def failing(shard, path, *args):
        if len(written) == 2:
            assert path.name == shard.name and path.parent.name.startswith(".out.tmp-")
            raise RuntimeError("killed mid-way")
        real(shard, path, *args)
        written.append(path)

    monkeypatch.setattr(streaming_merge, "write_shard", failing)
    with pytest.raises(RuntimeError, match="killed mid-way"):
        merge_checkpoint(llama / "fp32", llama / "adapter", out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if earlier else [])
    if earlier:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_other_files_are_copied_and_other_weights_left_out(llama, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(llama / "fp32", model)
    (model / "tokenizer.json").write_text("{}")
    (model / "pytorch_model.bin").write_bytes(b"unmerged pickle")
    (model / "original").mkdir()
    summary = merge_checkpoint(model, llama / "adapter", tmp_path / "out")
    assert summary.left_out == ["pytorch_model.bin"]
    assert summary.copied == ["config.json", "generation_config.json", "model.safetensors.index.json",
                              "tokenizer.json"]
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index == json.loads((model / "model.safetensors.index.json").read_text())


def test_checkpoint_with_both_layouts_is_refused(llama, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(llama / "fp32", model)
    shutil.copyfile(next(model.glob("model-*.safetensors")), model / "model.safetensors")
    with pytest.raises(ModelLoadError, match="holds both model.safetensors and model.safetensors.index.json"):
        merge_checkpoint(model, llama / "adapter", tmp_path / "out")


def test_progress_is_one_step_per_shard(llama, tmp_path):
    class Count:
        def __init__(self):
            self.started, self.steps = [], 0

        def start(self, description, total):
            self.started.append((description, total))

        def advance(self, handle, fields):
            self.steps += 1

        def finish(self, handle):
            pass

    count = Count()
    with reporting(count):
        summary = merge_checkpoint(llama / "fp32", llama / "adapter", tmp_path / "out")
    assert count.started == [("merge adapter into fp32", len(summary.shards))]
    assert count.steps == len(summary.shards)


def test_a_merge_that_overflows_float16_is_refused():
    raw = torch.tensor([[60000.0]], dtype=torch.float16).view(torch.uint8).flatten().numpy()
    fold = streaming_merge.Fold("m", torch.ones(1, 1), torch.full((1, 1), 10000.0), 1.0, False)
    with pytest.raises(AdapterFileError, match=r"module 'm': the merged m.weight is not finite in F16 .* values "
                                               r"70000 \.\. 70000"):
        streaming_merge.merged(raw, "m.weight", streaming_merge.Tensor("F16", (1, 1), 0, 2), fold, None)


def test_a_full_disk_is_an_output_error_and_leaves_nothing(llama, tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(streaming_merge.os, "fsync", full)
    with pytest.raises(OutputError, match=r"cannot write .*/\.out\.tmp-\w+/model-00001-of-00004\.safetensors: No "
                                          r"space left on device"):
        merge_checkpoint(llama / "fp32", llama / "adapter", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_cli_merges_reports_json_and_refuses_bad_input_with_exit_2(llama, tmp_path, capsys):
    from rewrite.cli import main

    out = tmp_path / "out"
    assert main(["merge", str(llama / "fp32"), "--adapter", str(llama / "adapter"), "-o", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["merged"]["model.layers.0.self_attn.q_proj"] == "model.layers.0.self_attn.q_proj.weight"
    assert len(result["shards"]) == 4 and result["left_out"] == []
    ref = peft_merged(build("llama"), llama / "adapter")
    assert max_diff(transformers.LlamaForCausalLM.from_pretrained(out), ref) <= ATOL
    assert main(["merge", str(llama / "fp32"), "--adapter", str(llama / "adapter"), "-o", str(out)]) == 2
    assert "replace it with `rewrite merge --force`" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "missing"), "--adapter", str(llama / "adapter"), "-o",
                 str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert "no model.safetensors or model.safetensors.index.json" in err and "Traceback" not in err
    assert not (tmp_path / "new").exists()


def _streaming_spec(tmp_path: Path, adapter: Path, export: str = 'format = "none"', extra: str = "") -> Path:
    spec = tmp_path / "spec.toml"
    spec.write_text(f'version = 1\n[[pass]]\nname = "load"\npath = "{adapter}"\n{extra}'
                    f'[[pass]]\nname = "merge"\nstreaming = true\n[export]\n{export}\n')
    return spec


def test_apply_with_a_streaming_merge_pass_equals_peft_without_loading_the_model(llama, tmp_path, capsys):
    from rewrite.cli import main

    out = tmp_path / "out"
    spec = _streaming_spec(tmp_path, llama / "adapter")
    assert main(["apply", str(spec), str(llama / "fp32"), "-o", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    stats = result["passes"][0]["stats"]
    assert stats["shards"] == 4 and stats["merged"] == 2 * 7 + 2  # 2 layers x 7 projections, embed_tokens, lm_head
    assert result["capture"] == {} and "model.safetensors.index.json" in result["files"]
    ref = peft_merged(build("llama"), llama / "adapter")
    assert max_diff(transformers.LlamaForCausalLM.from_pretrained(out), ref) <= ATOL


@pytest.mark.parametrize("export, extra, message", [
    ("", "", r"\[export\] format = \"none\""),
    ('format = "none"', '[[pass]]\nname = "insert"\ntargets = ["q_proj"]\n',
     r"the passes must be exactly a `load` of a PEFT LoRA directory, then this merge \(got \['load', 'insert', "
     r"'merge'\]\)"),
])
def test_a_streaming_merge_spec_that_does_more_is_refused_with_exit_2(llama, tmp_path, capsys, export, extra,
                                                                      message):
    from rewrite.cli import main

    spec = _streaming_spec(tmp_path, llama / "adapter", export, extra)
    assert main(["apply", str(spec), str(llama / "fp32"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err.replace("\n", " ")), err
    assert f"{spec}:" in err and not (tmp_path / "out").exists()
