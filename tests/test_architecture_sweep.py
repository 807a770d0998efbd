"""Architectures beyond tests/models.py through the user's flow, against PEFT; and the fixes they needed.

1. The matrix (slow): a tiny config of each architecture (2 layers, width 64, seeded random weights) saved as an HF
   directory, and a PEFT LoRA (r=4, `init_lora_weights=False`: non-zero A and B) on its linear projections.
   `rewrite inspect` exits 0; `rewrite apply` with load + merge (merged export, --check) equals PEFT's adapted
   forward in ONNX Runtime (<= 1e-4); `rewrite apply` with load + insert (unmerged bank export) serves each row of
   a mixed batch as PEFT with / without the adapter (<= 1e-4). The feeds are not the capture's example inputs
   (another batch and length, a right-padded mask), so dynamic axes and data-dependent paths (MoE routing, CLIP's
   pooled EOS token) run on new values. The adapter must move the output by > 1e-3, or the check proves nothing.
2. A linear written out as `x @ W.T + b` (Falcon's `FalconLinear`) is a linear site (`sites.canonical_linears`):
   sites, graph and PEFT oracle on a plain module; a square weight used untransposed stays a matmul, and so does an
   embedding table read as the output projection (`h @ emb.weight.T`: a LoRA on `emb` adapts the lookup, as PEFT's).
3. Grouped matrix products (MoE experts: transformers' `grouped_mm_fallback`) export to ONNX (`export/grouped_mm.py`):
   ONNX Runtime equals a per-expert loop, empty experts included.
4. Refused by name with exit code 2: LoRA on a grouped conv (ConvNext's depthwise conv), an unmerged LoRA on a conv2d
   site (a ResNet has no other), an adapter on one call of a module whose weight other calls share (ALBERT's one
   layer, run twice); on all of its calls a PiSSA init (which rewrites the shared weight) and its merge keep the
   outputs (--verify).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rewrite.capture import flat_outputs
from rewrite.cli import main
from rewrite.runtime.session import AdapterSession

from helpers import capture_module, merged_onnx_output, run_pass

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

T = transformers
_SMALL = dict(num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
_BERT = ["query", "key", "value", "dense"]
_ATTN_MLP = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
_WHISPER_INPUTS = ('[[capture.inputs]]\nname = "input_features"\nshape = [2, 16, 32]\ndims = ["batch", "", ""]\n'
                   '[[capture.inputs]]\nname = "decoder_input_ids"\nshape = [2, 5]\ndtype = "int64"\nhigh = 128\n'
                   'dims = ["batch", "dec_seq"]\n')

# name -> (config, model class, PEFT target_modules, [[capture.inputs]] when the config cannot say)
ARCHS = {
    "vit": (lambda: T.ViTConfig(hidden_size=64, intermediate_size=128, image_size=32, patch_size=8, num_labels=3,
                                num_hidden_layers=2, num_attention_heads=4),
            T.ViTForImageClassification, ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"], ""),
    "distilbert": (lambda: T.DistilBertConfig(dim=64, hidden_dim=128, n_layers=2, n_heads=4, vocab_size=128,
                                              max_position_embeddings=64),
                   T.DistilBertModel, ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"], ""),
    "roberta": (lambda: T.RobertaConfig(hidden_size=64, intermediate_size=128, max_position_embeddings=66, **_SMALL),
                T.RobertaModel, _BERT, ""),
    # one layer's weights shared by every layer: each weight has a site per call (`@k`), one adapter for all
    "albert": (lambda: T.AlbertConfig(embedding_size=32, hidden_size=64, intermediate_size=128,
                                      max_position_embeddings=64, **_SMALL),
               T.AlbertModel, _BERT + ["ffn", "ffn_output"], ""),
    "deberta_v2": (lambda: T.DebertaV2Config(hidden_size=64, intermediate_size=128, max_position_embeddings=64,
                                             relative_attention=True, pos_att_type=["p2c", "c2p"],
                                             position_buckets=16, max_relative_positions=32, **_SMALL),
                   T.DebertaV2Model, ["query_proj", "key_proj", "value_proj", "dense"], ""),
    "electra": (lambda: T.ElectraConfig(embedding_size=32, hidden_size=64, intermediate_size=128,
                                        max_position_embeddings=64, **_SMALL),
                T.ElectraModel, _BERT, ""),
    "gpt_bigcode": (lambda: T.GPTBigCodeConfig(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=128,
                                               multi_query=True, use_cache=False),
                    T.GPTBigCodeForCausalLM, ["c_attn", "c_proj", "c_fc"], ""),
    # FalconLinear computes x @ W.T: no site before `canonical_linears`
    "falcon": (lambda: T.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                                      multi_query=True, use_cache=False),
               T.FalconForCausalLM, ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"], ""),
    "gptj": (lambda: T.GPTJConfig(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=128, rotary_dim=8,
                                  use_cache=False),
             T.GPTJForCausalLM, ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"], ""),
    "phi": (lambda: T.PhiConfig(hidden_size=64, intermediate_size=128, max_position_embeddings=64,
                                partial_rotary_factor=0.5, use_cache=False, **_SMALL),
            T.PhiForCausalLM, ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"], ""),
    "stablelm": (lambda: T.StableLmConfig(hidden_size=64, intermediate_size=128, num_key_value_heads=2,
                                          max_position_embeddings=64, use_cache=False, **_SMALL),
                 T.StableLmForCausalLM, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                         "down_proj"], ""),
    # experts run through transformers' grouped_mm op: no ONNX lowering before export/grouped_mm.py
    "mixtral": (lambda: T.MixtralConfig(hidden_size=64, intermediate_size=128, num_key_value_heads=2,
                                        num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                                        use_cache=False, **_SMALL),
                T.MixtralForCausalLM, ["q_proj", "k_proj", "v_proj", "o_proj"], ""),
    "whisper": (lambda: T.WhisperConfig(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                                        vocab_size=128, num_mel_bins=16, max_source_positions=16,
                                        max_target_positions=32, use_cache=False, pad_token_id=0, bos_token_id=1,
                                        eos_token_id=2, decoder_start_token_id=1),
                T.WhisperModel, _ATTN_MLP, _WHISPER_INPUTS),
    "clip_text": (lambda: T.CLIPTextConfig(hidden_size=64, intermediate_size=128, max_position_embeddings=64,
                                           pad_token_id=0, bos_token_id=1, eos_token_id=2, **_SMALL),
                  T.CLIPTextModel, _ATTN_MLP, ""),
    "resnet": (lambda: T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic"),
               T.ResNetModel, ["convolution"], ""),
    # layer scale 1 (default 1e-6 would hide any adapter in the block's output)
    "convnext": (lambda: T.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], image_size=32,
                                          layer_scale_init_value=1.0),
                 T.ConvNextModel, ["pwconv1", "pwconv2"], ""),
}
CONV_ONLY = {"resnet"}  # no linear site: the unmerged export is refused (section 4)
TOLERANCE = 1e-4


def cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def build(name: str) -> nn.Module:
    make, cls, _, _ = ARCHS[name]
    torch.manual_seed(0)
    return cls(make()).eval()


def feeds_for(names: list[str], config) -> dict[str, torch.Tensor]:
    """Batch 3, length 11 (5 decoder tokens), the mask right-padded on two rows; pixels and features at the
    model's own sizes."""
    g = torch.Generator().manual_seed(7)
    mask = torch.ones(3, 11, dtype=torch.int64)
    mask[1, 6:] = 0
    mask[2, 9:] = 0
    size = getattr(config, "image_size", 32)  # what the capture's example inputs take (rewrite/inputs.py)
    make = {
        "input_ids": lambda: torch.randint(3, config.vocab_size, (3, 11), generator=g),
        "attention_mask": lambda: mask,
        "pixel_values": lambda: torch.rand(3, config.num_channels, size, size, generator=g),
        "input_features": lambda: torch.randn(3, config.num_mel_bins, 2 * config.max_source_positions, generator=g),
        "decoder_input_ids": lambda: torch.randint(3, config.vocab_size, (3, 5), generator=g),
    }
    return {n: make[n]() for n in names if n != "adapter_ids"}


def diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


class Case:
    """An architecture saved as an HF directory and a PeftModel with the adapter `support` (saved beside it)."""

    def __init__(self, name: str, root: Path):
        make, cls, self.targets, self.inputs_toml = ARCHS[name]
        self.root, self.hf = root, root / "hf"
        build(name).save_pretrained(self.hf)
        base = cls.from_pretrained(self.hf).eval()
        base.set_attn_implementation("eager")  # as the capture does
        torch.manual_seed(1234)
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=self.targets, init_lora_weights=False)
        self.peft_model = peft.get_peft_model(base, config, adapter_name="support").eval()
        self.peft_model.save_pretrained(root / "peft")
        self.load = f'[[pass]]\nname = "load"\npath = "{root / "peft" / "support"}"\nadapter = "support"\n'

    def spec(self, name: str, text: str) -> Path:
        path = self.root / f"{name}.toml"
        path.write_text(f"version = 1\n{self.inputs_toml}{text}")
        return path

    def reference(self, feeds: dict[str, torch.Tensor], adapter: str | None) -> list[np.ndarray]:
        with torch.no_grad():
            if adapter is None:
                with self.peft_model.disable_adapter():
                    return [t.numpy() for t in flat_outputs(self.peft_model(**feeds))]
            return [t.numpy() for t in flat_outputs(self.peft_model(**feeds))]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ARCHS))
def test_architecture_through_the_cli_equals_peft(name, tmp_path, capsys):
    case = Case(name, tmp_path)
    inspect_args = ["--spec", case.spec("inspect", "")] if case.inputs_toml else []
    assert cli(capsys, "inspect", case.hf, *inspect_args, "-q") == (0, "")

    merged = case.spec("merged", f'{case.load}[[pass]]\nname = "merge"\n[export]\ncheck = true\n')
    code, err = cli(capsys, "apply", merged, case.hf, "-o", tmp_path / "merged", "-q")
    assert code == 0, err
    (entry,) = json.loads((tmp_path / "merged" / "manifest.json").read_text())["exports"]
    assert entry["check_max_abs_diff"] <= TOLERANCE
    session = ort.InferenceSession(str(tmp_path / "merged" / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = feeds_for([i.name for i in session.get_inputs()], case.peft_model.config)
    got = session.run(None, {k: v.numpy() for k, v in feeds.items()})
    want, base = case.reference(feeds, "support"), case.reference(feeds, None)
    assert len(got) == len(want)
    assert diff(want[0], base[0]) > 1e-3  # the adapter is visible
    assert max(diff(g, w) for g, w in zip(got, want)) <= TOLERANCE
    if name in CONV_ONLY:
        return

    bank = case.spec("bank", f'{case.load}[[pass]]\nname = "insert"\nadapter = "extra"\nkind = "lora"\nrank = 4\n'
                             f'targets = {json.dumps(case.targets[:2])}\n'
                             '[export]\nmode = "unmerged"\nswitching = "bank"\ncheck = true\n')
    code, err = cli(capsys, "apply", bank, case.hf, "-o", tmp_path / "bank", "-q")
    assert code == 0, err
    rows = ["support", None, "extra"]  # extra: a fresh insert, the identity
    with AdapterSession(tmp_path / "bank") as served:
        got = served.run({k: v.numpy() for k, v in feeds.items()}, adapter_ids=rows)
    worst = max(diff(g[i], w[i]) for i, adapter in enumerate(rows)
                for g, w in zip(got, want if adapter == "support" else base) if g.shape and g.shape[0] == 3)
    assert worst <= TOLERANCE


# ------------------------------------------------------------------------------ 2. linears written as x @ W.T


class HandLinear(nn.Linear):
    """An nn.Linear whose forward is written out, as Falcon's FalconLinear: x @ W.T (+ b)."""

    def forward(self, x):
        y = x @ (self.weight.T if self.bias is not None else self.weight.t())
        return y if self.bias is None else y + self.bias


class HandMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = HandLinear(16, 32), HandLinear(32, 16, bias=False)
        self.mix = nn.Parameter(torch.randn(16, 16) / 4)  # square, used as x @ mix: [d_in, d_out], no linear
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))) @ self.mix)


def _hand_mlp() -> nn.Module:
    torch.manual_seed(0)
    return HandMLP().eval()


def test_written_out_linears_are_linear_sites():
    model, x = _hand_mlp(), torch.randn(4, 5, 16)
    gm = capture_module(model, {"x": x})
    sites = gm.meta["rewrite"].sites
    assert [(s.name, s.op, s.bias, s.d_in, s.d_out) for s in sites.values()] == [
        ("fc1", "linear", "fc1.bias", 16, 32), ("fc2", "linear", None, 32, 16), ("head", "linear", "head.bias", 16, 4)]
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.aten.matmul.default) == 1  # x @ mix only
    assert torch.ops.aten.numpy_T.default not in targets and torch.ops.aten.t.default not in targets
    with torch.no_grad():
        assert torch.equal(gm(x=x), model(x))


def test_written_out_linears_take_peft_lora(tmp_path):
    model, x = _hand_mlp(), torch.randn(4, 5, 16)
    torch.manual_seed(1)
    pm = peft.get_peft_model(_hand_mlp(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"],
                                                         init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path / "peft")
    gm = capture_module(model, {"x": x})
    run_pass(gm, "load", path=str(tmp_path / "peft"), adapter="a")
    with torch.no_grad():
        want = pm(x)
        assert diff(want, model(x)) > 1e-2
        assert diff(gm(x=x), want) <= 1e-6
        run_pass(gm, "merge")
        assert diff(gm(x=x), want) <= 1e-5
    assert diff(merged_onnx_output(gm, {"x": x}, tmp_path / "m.onnx"), want) <= 1e-5


class TiedOutput(nn.Module):
    """An embedding table also used, written out, as the output projection: logits = h @ emb.weight.T."""

    def __init__(self):
        super().__init__()
        self.emb, self.mid = nn.Embedding(50, 16), nn.Linear(16, 16)

    def forward(self, ids):
        return self.mid(self.emb(ids)) @ self.emb.weight.T


def test_an_embedding_table_read_as_a_projection_stays_an_embedding_site(tmp_path):
    """Its module cannot own an embedding site and a linear site (one adapter module per owner): the written-out
    projection is left a matmul, and a LoRA on `emb` adapts the lookup only, as PEFT's does."""
    torch.manual_seed(0)
    model, ids = TiedOutput().eval(), torch.randint(0, 50, (2, 5))
    gm = capture_module(model, {"ids": ids})
    assert [(s.name, s.op) for s in gm.meta["rewrite"].sites.values()] == [("emb", "embedding"), ("mid", "linear")]
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["emb"],
                                                                  init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path / "peft")
    run_pass(gm, "load", path=str(tmp_path / "peft"), adapter="a")
    with torch.no_grad():
        want = pm(ids)
        assert diff(want, model(ids)) > 1e-2
        assert diff(gm(ids=ids), want) <= 1e-6


# ---------------------------------------------------------------------------- 3. grouped products (MoE experts)


class Experts(nn.Module):
    """out[r] = x[r] @ W[group of r], rows sorted by group, `ends` each group's cumulative end row."""

    def __init__(self, op):
        super().__init__()
        self.op = op
        self.weight = nn.Parameter(torch.randn(3, 8, 8))

    def forward(self, x, ends):
        return self.op(x, self.weight, ends)


def test_grouped_matmul_exports_to_onnx(tmp_path):
    import transformers.integrations.moe  # noqa: F401 - registers torch.ops.transformers.grouped_mm_fallback

    torch.manual_seed(0)
    model, x = Experts(torch.ops.transformers.grouped_mm_fallback).eval(), torch.randn(6, 8)
    gm = capture_module(model, {"x": x, "ends": torch.tensor([2, 4, 6], dtype=torch.int32)})
    merged_onnx_output(gm, {"x": x, "ends": torch.tensor([2, 4, 6], dtype=torch.int32)}, tmp_path / "g.onnx")
    session = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"])
    for ends in ([2, 4, 6], [2, 2, 6], [0, 6, 6], [6, 6, 6]):  # empty experts too
        starts = [0, *ends[:-1]]
        want = torch.cat([x[s:e] @ model.weight[g].detach() for g, (s, e) in enumerate(zip(starts, ends))])
        (got,) = session.run(None, {"x": x.numpy(), "ends": np.array(ends, np.int32)})
        assert diff(got, want) <= 1e-5


# ------------------------------------------------------------------------------------------- 4. refusals


@pytest.fixture
def saved(tmp_path):
    def save(name: str) -> Path:
        build(name).save_pretrained(tmp_path / name)
        return tmp_path / name
    return save


@pytest.mark.parametrize("model, target, export, reason", [
    ("convnext", "dwconv", "", "site encoder.stages.0.layers.0.dwconv is a grouped conv (groups=16)"),
    ("resnet", "convolution", '[export]\nmode = "unmerged"\nswitching = "bank"\n',
     "embedder.embedder.convolution"),
])
def test_lora_on_a_conv_it_cannot_serve_is_refused(saved, tmp_path, capsys, model, target, export, reason):
    """A grouped conv takes no LoRA; a conv2d site cannot switch unmerged (it must be merged)."""
    spec = tmp_path / "spec.toml"
    spec.write_text('version = 1\n[[pass]]\nname = "insert"\nadapter = "a"\nkind = "lora"\nrank = 4\n'
                    f'targets = ["{target}"]\n{export}')
    code, err = cli(capsys, "apply", spec, saved(model), "-o", tmp_path / "out", "-q")
    assert code == 2 and "Traceback" not in err
    assert reason in err and (not export or "conv2d sites must be merged" in err)
    assert not (tmp_path / "out").exists()


def _albert_spec(tmp_path, targets: str) -> Path:
    spec = tmp_path / "spec.toml"
    spec.write_text('version = 1\n[[pass]]\nname = "insert"\nadapter = "a"\nkind = "lora"\nrank = 4\ninit = "pissa"\n'
                    f'targets = {targets}\n[[pass]]\nname = "merge"\n[export]\nformat = "none"\n')
    return spec


def test_an_adapter_on_one_call_of_a_shared_module_is_refused(saved, tmp_path, capsys):
    query = "encoder.albert_layer_groups.0.albert_layers.0.attention.query"
    code, err = cli(capsys, "apply", _albert_spec(tmp_path, f'["{query}@1"]'), saved("albert"), "-o",
                    tmp_path / "out", "--verify", "-q")
    assert code == 2 and "Traceback" not in err
    assert f"site {query}@1 is one call of {query}, and the calls {query} use the same weight" in err
    assert f"select '{query}' to adapt all of its calls" in err


def test_pissa_and_merge_on_every_call_of_a_shared_module_keep_the_outputs(saved, tmp_path, capsys):
    code, err = cli(capsys, "apply", _albert_spec(tmp_path, '["query", "ffn"]'), saved("albert"), "-o",
                    tmp_path / "out", "--verify", "-q")
    assert code == 0, err


def test_prune_of_a_shared_layer_equals_zeroing_its_units(tmp_path):
    """ALBERT runs one layer twice: removing a head and FFN neurons from it equals the model with that head's columns
    of the attention output projection and those neurons' columns of ffn_output zeroed, in every call."""
    from rewrite.capture import capture
    from rewrite.inputs import example_inputs
    from rewrite.load import LoadedModel
    from rewrite.options import CaptureOptions

    model = build("albert")
    inputs = example_inputs(model, model.config, CaptureOptions(), "<test>")
    gm, _ = capture(LoadedModel(model, None, "hf", "albert", model.config), inputs)
    gm = copy.deepcopy(gm)  # the capture shares the model's parameters
    run_pass(gm, "prune", tmp_path, heads=1, ffn=32)
    groups = {g["structure"]: g for g in json.loads((tmp_path / "prune.json").read_text())["groups"]
              if g["group"].startswith("encoder.")}
    assert len(groups["heads"]["sites"]) == 8  # q, k, v, dense, in both calls
    layer = model.encoder.albert_layer_groups[0].albert_layers[0]
    head = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        for unit in groups["heads"]["removed"]:
            h = int(unit.split()[1])
            layer.attention.dense.weight[:, h * head:(h + 1) * head] = 0
        for unit in groups["ffn"]["removed"]:
            layer.ffn_output.weight[:, int(unit.split()[1])] = 0
        feeds = feeds_for(["input_ids", "attention_mask"], model.config)
        assert max(diff(a, b) for a, b in zip(flat_outputs(gm(**feeds)), flat_outputs(model(**feeds)))) <= 1e-5


class Routed(nn.Module):
    """Runs its expert only on the rows the router picks: the row count depends on the values."""

    def __init__(self):
        super().__init__()
        self.router, self.expert = nn.Linear(8, 1), nn.Linear(8, 8)

    def forward(self, x):
        rows = torch.nonzero(self.router(x)[:, 0] > 0).squeeze(-1)
        if rows.numel() == 0:
            return x
        return x.index_add(0, rows, self.expert(x[rows]))


def routed() -> nn.Module:
    torch.manual_seed(0)
    return Routed().eval()


def test_data_dependent_control_flow_is_refused_naming_the_line(tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text('version = 1\n[[capture.inputs]]\nname = "x"\nshape = [4, 8]\n')
    code, err = cli(capsys, "apply", spec, "test_architecture_sweep:routed", "-o", tmp_path / "out", "-q")
    assert code == 2 and "Traceback" not in err
    assert "torch.export could not capture Routed" in err
    assert ("branches on the values of a tensor (test_architecture_sweep.py:"
            in err and "in forward: if rows.numel() == 0:)" in err)
    assert "dynamic = false" not in err  # static sizes do not help here
