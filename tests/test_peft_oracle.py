"""Hugging Face PEFT as the independent oracle for LoRA load / merge / save / merged ONNX export.

For each tiny model of the zoo (GPT-2, BERT, LLaMA, Qwen2, Mistral, T5) and the real-weight MiniLM:

1. PEFT creates a LoRA adapter with non-zero weights (`init_lora_weights=False`) and saves it; our `load`
   pass gives the PEFT model's outputs (fp32, atol 1e-5), on the capture inputs and on inputs of another
   shape with a padded attention mask. Variants: rsLoRA (BERT), rank_pattern / alpha_pattern (Qwen2),
   an Embedding target (Mistral), Conv1D with fan_in_fan_out (GPT-2).
2. `apply` with `[export] check = true` writes a merged ONNX model; ONNX Runtime equals PEFT (<= 1e-4).
3. Our `save` pass writes a directory that `PeftModel.from_pretrained(fresh_base, dir)` loads: after
   PEFT -> load -> save, PEFT gets back bit-identical tensors and outputs; for adapters created by our
   `insert` pass (made non-zero by hand; per-site rank_pattern / alpha_pattern on LLaMA, rsLoRA on GPT-2
   Conv1D + a tied Embedding) PEFT's outputs equal our graph's (atol 1e-6).
4. Counts and flags: `modified`, modules loaded, adapter call nodes, rank / scale per module, idempotent
   reload, and `merge` against PEFT's `merge_and_unload()`; plus PEFT config variants and refusals.

Captures are cached per module (a capture takes seconds); every pass list runs on a copy of the capture,
and the merged-ONNX `apply` runs reuse it too, except GPT-2's, which captures through `apply` itself.
Run with `-s` to see every measured max abs difference (`[peft-oracle]` lines).
"""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch

from rewrite import pipeline
from rewrite.capture import flat_outputs
from rewrite.errors import AdapterFileError
from rewrite.pass_infra import PassContext, PassManager
from rewrite.pipeline import apply, load_and_capture, schedule
from rewrite.spec import parse_spec
from rewrite.state import ADAPTER_ROOT, state_of

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# model -> LoraConfig keyword arguments (besides r=4, lora_alpha=8, init_lora_weights=False)
CASES: dict[str, dict] = {
    "gpt2": dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),  # HF Conv1D
    "bert": dict(target_modules=["query", "key", "value", "dense"], use_rslora=True),
    "llama": dict(target_modules=LLAMA_LIKE),
    "qwen2": dict(target_modules=LLAMA_LIKE,
                  rank_pattern={"q_proj": 8, "model.layers.1.mlp.down_proj": 2},
                  alpha_pattern={"v_proj": 16, "model.layers.0.mlp.up_proj": 3}),
    "mistral": dict(target_modules=[*LLAMA_LIKE, "embed_tokens"]),  # + an Embedding site
    "t5": dict(target_modules=["q", "k", "v", "o", "wi", "wo"]),
    "minilm": dict(target_modules=["query", "key", "value", "dense"]),
}
MODELS = list(CASES)
ONNX_MODELS = ["gpt2", "llama", "t5", "minilm"]
RECAPTURE = {"gpt2"}  # the others reuse the module's cached capture inside `apply` (captures take seconds)

LOAD_ATOL = 1e-5    # our graph vs PEFT, fp32
ONNX_ATOL = 1e-4    # ONNX Runtime vs PEFT, fp32
SAVE_ATOL = 1e-6    # PEFT reloading our saved directory vs our graph

def _record(key: str, diff: float) -> None:
    print(f"\n[peft-oracle] {key}: max abs diff {diff:.3g}")


def max_diff(got, want) -> float:
    a, b = flat_outputs(got), flat_outputs(want)
    assert len(a) == len(b), f"{len(a)} outputs vs {len(b)}"
    for x, y in zip(a, b):
        assert x.shape == y.shape, (x.shape, y.shape)
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These models are tiny: one intra-op thread is as fast alone and ~10x faster on a busy 2-core box
    (OpenMP threads spin against other processes). Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Case:
    """One model: its saved base directory, a PEFT adapter directory and the PEFT model that made it."""

    def __init__(self, name: str, base_dir: Path, work: Path):
        self.name, self.base_dir, self.work = name, Path(base_dir), work
        self.config = transformers.AutoConfig.from_pretrained(self.base_dir)
        self.adapter_dir = work / "peft_adapter"
        torch.manual_seed(1234)
        lora = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **CASES[name])
        self.peft_model = peft.get_peft_model(self.fresh_base(), lora).eval()
        with warnings.catch_warnings():  # targeting embed_tokens: PEFT saves its base weight too (on purpose)
            warnings.filterwarnings("ignore", message=".*save_embedding_layers.*")
            self.peft_model.save_pretrained(self.adapter_dir)
        self.lora_modules = sorted(n for n, m in self.peft_model.base_model.model.named_modules()
                                   if isinstance(m, peft.tuners.lora.LoraLayer))
        self._gm = None

    def fresh_base(self) -> torch.nn.Module:
        cls = getattr(transformers, self.config.architectures[0])
        model = cls.from_pretrained(self.base_dir).eval()
        model.set_attn_implementation("eager")  # the capture uses eager attention too (same math as sdpa)
        return model

    def spec(self, passes: str, export: str = '[export]\nformat = "none"\n'):
        return parse_spec(f"version = 1\n{export}{passes}", self.work / "spec.toml")

    def load_spec(self, times: int = 1, extra: str = ""):
        load = f'[[pass]]\nname = "load"\npath = "{self.adapter_dir}"\n'
        return self.spec(load * times + extra)

    @property
    def gm(self):
        """The base model captured once (no adapters); run passes on it with `run` (which copies)."""
        if self._gm is None:
            self._gm, self.loaded, self.report = load_and_capture(str(self.base_dir), self.spec(""))
            assert self.report.replay_max_abs_diff == 0.0
        return self._gm

    def run(self, spec, gm=None):
        context = PassContext(spec_dir=self.work, output_dir=self.work)
        return PassManager(schedule(spec, context)).run(self.gm if gm is None else gm)

    def inputs(self) -> list[dict[str, torch.Tensor]]:
        """The capture's example inputs, plus another batch / length with a right-padded attention mask."""
        base = state_of(self.gm).inputs.kwargs
        g = torch.Generator().manual_seed(7)
        other = {}
        for key, value in base.items():
            if key == "attention_mask":
                mask = torch.ones(3, 11, dtype=value.dtype)
                mask[1, 6:] = 0
                mask[2, 9:] = 0
                other[key] = mask
            else:
                length = 7 if key == "decoder_input_ids" else 11
                other[key] = torch.randint(0, self.config.vocab_size, (3, length), generator=g)
        return [dict(base), other]


@pytest.fixture(scope="module")
def case(request, hf_dir, tmp_path_factory):
    made: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in made:
            base = request.getfixturevalue("minilm") if name == "minilm" else hf_dir(name)
            made[name] = Case(name, base, tmp_path_factory.mktemp(f"peft_{name}"))
        return made[name]

    return get


def adapter_calls(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes
            if n.op == "call_module" and str(n.target).startswith(ADAPTER_ROOT + ".")]


def outputs(model, kwargs):
    with torch.no_grad():
        return model(**kwargs)


# -------------------------------------------------------------------------------------------- 1. load

@pytest.mark.parametrize("name", MODELS)
def test_load_matches_peft(case, name):
    c = case(name)
    base_nodes = len(c.gm.graph.nodes)
    gm = c.run(c.load_spec())
    record = state_of(gm).history[-1]
    n = len(c.lora_modules)
    assert n > 0
    assert (record.name, record.modified) == ("load", True)
    assert record.stats["modules"] == n and record.stats["changed"] == n
    # one adapter per PEFT module, each called once (no module of these models is called twice)
    calls = adapter_calls(gm)
    assert sorted(calls) == sorted(f"{ADAPTER_ROOT}.{m}.default" for m in c.lora_modules)
    assert len(gm.graph.nodes) == base_nodes + 2 * n  # a call and an add per site
    # rank and scale per module as PEFT resolved them (rank_pattern / alpha_pattern / rsLoRA)
    peft_layers = dict(c.peft_model.base_model.model.named_modules())
    for module in c.lora_modules:
        ours, theirs = gm.get_submodule(f"{ADAPTER_ROOT}.{module}.default"), peft_layers[module]
        assert ours.rank == theirs.r["default"], module
        assert ours.scaling == pytest.approx(theirs.scaling["default"], rel=1e-12), module
    if name == "qwen2":  # the patterns really gave different ranks and scales
        assert {peft_layers[m].r["default"] for m in c.lora_modules} == {2, 4, 8}
        assert len({peft_layers[m].scaling["default"] for m in c.lora_modules}) >= 3
    # the adapter is not a no-op, and our graph equals PEFT's on two input sets
    for i, kwargs in enumerate(c.inputs()):
        want = outputs(c.peft_model, kwargs)
        assert max_diff(outputs(c.gm, kwargs), want) > 1e-2, "the PEFT adapter should change the outputs"
        diff = max_diff(outputs(gm, kwargs), want)
        _record(f"{name} load vs PEFT (inputs {i})", diff)
        assert diff <= LOAD_ATOL


@pytest.mark.parametrize("name", MODELS)
def test_load_is_idempotent(case, name):
    c = case(name)
    once = c.run(c.load_spec())
    twice = c.run(c.load_spec(times=2))
    first, second = state_of(twice).history[-2:]
    assert first.modified and not second.modified
    assert second.stats["changed"] == 0 and second.stats["modules"] == len(c.lora_modules)
    # loading again onto an already-loaded graph: no-op, same graph, same outputs
    again = c.run(c.load_spec(), gm=once)
    assert state_of(again).history[-1].modified is False
    assert len(again.graph.nodes) == len(once.graph.nodes) == len(twice.graph.nodes)
    kwargs = c.inputs()[0]
    assert max_diff(outputs(again, kwargs), outputs(once, kwargs)) == 0.0


# ------------------------------------------------------------------------------------------- 4. merge

@pytest.mark.parametrize("name", MODELS)
def test_merge_matches_merge_and_unload(case, name):
    c = case(name)
    gm = c.run(c.load_spec(extra='[[pass]]\nname = "merge"\n'))
    merge = state_of(gm).history[-1]
    assert (merge.name, merge.modified, merge.stats["merged"]) == ("merge", True, len(c.lora_modules))
    assert adapter_calls(gm) == [] and len(gm.graph.nodes) == len(c.gm.graph.nodes)
    assert sorted(state_of(gm).merged) == c.lora_modules
    merged_peft = copy.deepcopy(c.peft_model).merge_and_unload().eval()
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in merged_peft.modules())
    for i, kwargs in enumerate(c.inputs()):
        diff = max_diff(outputs(gm, kwargs), outputs(merged_peft, kwargs))
        _record(f"{name} merge vs PEFT merge_and_unload (inputs {i})", diff)
        assert diff <= LOAD_ATOL
    # merged weights equal PEFT's merged weights
    ours = dict(gm.named_parameters())
    theirs = dict(merged_peft.named_parameters())
    for module in c.lora_modules:
        key = f"{module}.weight"
        assert torch.allclose(ours[key], theirs[key], atol=1e-6, rtol=0), key
    # a second merge has nothing left to fold
    again = c.run(c.spec('[[pass]]\nname = "merge"\n'), gm=gm)
    assert state_of(again).history[-1].modified is False


# --------------------------------------------------------------------------------------- 2. merged ONNX

@pytest.mark.slow
@pytest.mark.parametrize("name", ONNX_MODELS)
def test_merged_onnx_matches_peft(case, name, tmp_path, monkeypatch):
    import onnx
    import onnxruntime as ort

    c = case(name)
    if name not in RECAPTURE:
        c.gm  # noqa: B018 - capture (once per module) before patching

        def cached_capture(model, spec, **_):
            assert model == str(c.base_dir)
            return copy.deepcopy(c.gm), c.loaded, c.report

        monkeypatch.setattr(pipeline, "load_and_capture", cached_capture)
    spec = c.spec(f'[[pass]]\nname = "load"\npath = "{c.adapter_dir}"\n', export="[export]\ncheck = true\n")
    summary = apply(spec, str(c.base_dir), tmp_path / "out")
    assert summary.check_max_abs_diff is not None and summary.check_max_abs_diff <= ONNX_ATOL
    _record(f"{name} ONNX Runtime vs our graph ([export] check)", summary.check_max_abs_diff)
    labels = [(p["label"], p["modified"]) for p in summary.passes]
    assert labels == [("pass[0] 'load'", True), ("export 'merge'", True)]
    assert summary.passes[0]["stats"]["modules"] == len(c.lora_modules)
    assert summary.passes[1]["stats"]["merged"] == len(c.lora_modules)
    path = tmp_path / "out" / "model.onnx"
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    leftovers = [t.name for t in model.graph.initializer if "lora" in t.name or ADAPTER_ROOT in t.name]
    assert leftovers == [], "a merged export carries no adapter tensors"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert sorted(a["site"] for a in manifest["adapters"] if a["state"] == "merged") == c.lora_modules
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for i, kwargs in enumerate(c.inputs()):
        assert set(names) <= set(kwargs)
        got = session.run(None, {k: kwargs[k].numpy() for k in names})
        want = flat_outputs(outputs(c.peft_model, kwargs))
        assert len(got) == len(want)
        diff = max(float(abs(g.astype("float64") - w.double().numpy()).max()) for g, w in zip(got, want))
        _record(f"{name} ONNX Runtime vs PEFT (inputs {i})", diff)
        assert diff <= ONNX_ATOL


# --------------------------------------------------------------------------------------------- 3. save

def _peft_from(c: Case, directory: Path):
    return peft.PeftModel.from_pretrained(c.fresh_base(), directory).eval()


@pytest.mark.parametrize("name", MODELS)
def test_save_after_load_reloads_in_peft(case, name):
    """PEFT -> our load -> our save -> PEFT: the same tensors, the same outputs."""
    c = case(name)
    gm = c.run(c.load_spec(extra='[[pass]]\nname = "save"\npath = "saved"\n'))
    save = state_of(gm).history[-1]
    assert (save.name, save.modified, save.stats["modules"]) == ("save", False, len(c.lora_modules))
    reloaded = _peft_from(c, c.work / "saved")
    # adapter tensors only: PEFT adds a full copy of a targeted embedding when its config names it by
    # its short name (`embed_tokens`); ours names full paths, so PEFT's "auto" leaves the copy out
    theirs = peft.get_peft_model_state_dict(c.peft_model, save_embedding_layers=False)
    ours = peft.get_peft_model_state_dict(reloaded, save_embedding_layers=False)
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    for i, kwargs in enumerate(c.inputs()):
        want = outputs(c.peft_model, kwargs)
        assert max_diff(outputs(reloaded, kwargs), want) == 0.0
        diff = max_diff(outputs(gm, kwargs), outputs(reloaded, kwargs))
        _record(f"{name} PEFT reloading our save vs our graph (inputs {i})", diff)
        assert diff <= LOAD_ATOL


def _insert_random(c: Case, options: str, seed: int = 3):
    """Our insert pass, then lora_B filled with randn by hand so the adapter is not a no-op."""
    gm = c.run(c.spec(f'[[pass]]\nname = "insert"\n{options}'))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if name.startswith(ADAPTER_ROOT + ".") and name.endswith(".lora_B"):
                param.copy_(torch.randn_like(param) * 0.1)
    return gm


INSERT_CASES = {
    # per-site rank / alpha with every selector kind: dotted suffix, exact path, glob
    "llama-rank-pattern": ("llama", 'targets = ["q_proj", "v_proj", "down_proj", "re:.*embed_tokens"]\n'
                                    'rank = 4\nalpha = 8\n'
                                    'rank_pattern = { "q_proj" = 8, "model.layers.1.mlp.down_proj" = 2 }\n'
                                    'alpha_pattern = { "model.layers.0.*" = 16 }\n'),
    # Conv1D (fan_in_fan_out) next to an Embedding whose weight is tied to lm_head (only the lookup adapts)
    "gpt2-conv1d-rslora": ("gpt2", 'targets = ["c_attn", "c_fc", "transformer.wte"]\nrank = 4\nalpha = 8\n'
                                   'rslora = true\n'),
}


@pytest.mark.parametrize("label", list(INSERT_CASES))
def test_insert_save_reloads_in_peft(case, label):
    name, options = INSERT_CASES[label]
    c = case(name)
    gm = _insert_random(c, options)
    adapters = {n: m for n, m in gm.named_modules() if n.startswith(ADAPTER_ROOT + ".") and hasattr(m, "kind")}
    if label.startswith("llama"):
        ranks = {n.removeprefix(ADAPTER_ROOT + ".").removesuffix(".default"): m.rank for n, m in adapters.items()}
        assert ranks["model.layers.0.self_attn.q_proj"] == 8 and ranks["model.layers.1.mlp.down_proj"] == 2
        assert ranks["model.layers.0.mlp.down_proj"] == 4 and ranks["model.embed_tokens"] == 4
        assert {m.alpha for n, m in adapters.items() if ".layers.0." in n} == {16.0}
    gm = c.run(c.spec('[[pass]]\nname = "save"\npath = "inserted"\n'), gm=gm)
    config = json.loads((c.work / "inserted" / "adapter_config.json").read_text())
    reloaded = _peft_from(c, c.work / "inserted")
    lora = {n: m for n, m in reloaded.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert sorted(lora) == sorted(n.removeprefix(ADAPTER_ROOT + ".").removesuffix(".default") for n in adapters)
    for path, layer in lora.items():
        ours = gm.get_submodule(f"{ADAPTER_ROOT}.{path}.default")
        assert layer.r["default"] == ours.rank and layer.scaling["default"] == pytest.approx(ours.scaling)
    if label.startswith("gpt2"):
        assert config["use_rslora"] and config["fan_in_fan_out"]
    for i, kwargs in enumerate(c.inputs()):
        assert max_diff(outputs(gm, kwargs), outputs(c.gm, kwargs)) > 1e-3
        diff = max_diff(outputs(reloaded, kwargs), outputs(gm, kwargs))
        _record(f"{label} PEFT reloading our insert+save vs our graph (inputs {i})", diff)
        assert diff <= SAVE_ATOL
    # and our load of that directory is a no-op on the graph that wrote it
    again = c.run(c.spec(f'[[pass]]\nname = "load"\npath = "{c.work / "inserted"}"\n'), gm=gm)
    assert state_of(again).history[-1].modified is False


# ------------------------------------------------------------------------------------------ errors

def test_load_refuses_adapter_of_another_model(case):
    gpt2, llama = case("gpt2"), case("llama")
    spec = llama.spec(f'[[pass]]\nname = "load"\npath = "{gpt2.adapter_dir}"\n')
    with pytest.raises(AdapterFileError, match="match no site"):
        llama.run(spec)


def test_load_refuses_rank_mismatch(case):
    c = case("llama")
    # the adapter's own sites, at another rank
    gm = c.run(c.spec(f'[[pass]]\nname = "insert"\ntargets = {json.dumps(LLAMA_LIKE)}\nrank = 8\n'))
    with pytest.raises(AdapterFileError, match="rank 8 there, 4 in the file"):
        c.run(c.load_spec(), gm=gm)


def test_load_checks_peft_embedding_base_copy(case, tmp_path):
    """PEFT saves a targeted embedding's full base weight; ours must equal it (it is never replaced)."""
    from safetensors.torch import load_file, save_file

    c = case("mistral")
    tensors = load_file(c.adapter_dir / "adapter_model.safetensors")
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert key in tensors  # PEFT's save_embedding_layers="auto"
    altered = tmp_path / "altered"
    altered.mkdir()
    (altered / "adapter_config.json").write_text((c.adapter_dir / "adapter_config.json").read_text())
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, altered / "adapter_model.safetensors")
    with pytest.raises(AdapterFileError, match="full base weight"):
        c.run(c.spec(f'[[pass]]\nname = "load"\npath = "{altered}"\n'))


# ----------------------------------------------------------------------------- PEFT config variants (LLaMA)

VARIANTS = {
    "layers_to_transform": dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
    "regex_targets_alpha_pattern": dict(target_modules=r".*\.mlp\.(up|down)_proj", alpha_pattern={"down_proj": 2.5}),
    "exclude_modules": dict(target_modules=["q_proj", "k_proj"], exclude_modules=["model.layers.0.self_attn.k_proj"]),
    "lm_head_and_embed_tokens": dict(target_modules=["lm_head", "embed_tokens"]),
    "named_adapter": dict(target_modules=["o_proj"]),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_load_peft_config_variants(case, variant, tmp_path):
    c = case("llama")
    torch.manual_seed(5)
    adapter_name = "mine" if variant == "named_adapter" else "default"
    lora = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **VARIANTS[variant])
    model = peft.get_peft_model(c.fresh_base(), lora, adapter_name=adapter_name).eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*save_embedding_layers.*")
        model.save_pretrained(tmp_path)
    directory = tmp_path / adapter_name if adapter_name != "default" else tmp_path  # PEFT's layout
    modules = [n for n, m in model.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    gm = c.run(c.spec(f'[[pass]]\nname = "load"\npath = "{directory}"\n'))
    assert state_of(gm).history[-1].stats["modules"] == len(modules) > 0
    assert sorted(adapter_calls(gm)) == sorted(f"{ADAPTER_ROOT}.{m}.default" for m in modules)
    for kwargs in c.inputs():
        want = outputs(model, kwargs)
        assert max_diff(outputs(c.gm, kwargs), want) > 1e-3
        assert max_diff(outputs(gm, kwargs), want) <= LOAD_ATOL


@pytest.mark.filterwarnings("ignore:.*invalid shape.*")  # PEFT's own save check misreads lora_B.bias
@pytest.mark.filterwarnings("ignore:.*lora_bias=True.*")
def test_load_refuses_lora_bias(case, tmp_path):
    c = case("llama")
    lora = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj"], lora_bias=True)
    peft.get_peft_model(c.fresh_base(), lora).save_pretrained(tmp_path)
    with pytest.raises(AdapterFileError, match="lora_bias"):
        c.run(c.spec(f'[[pass]]\nname = "load"\npath = "{tmp_path}"\n'))
