"""Adapter kinds x architectures x exports, each adapter made and saved by PEFT, PEFT as the oracle per row.

For every kind PEFT also has (LoRA, AdaLoRA = our svd_lora, DoRA, VeRA, (IA)^3, LoHa, LoKr, OFT, BOFT, HRA,
FourierFT, RoAd, BEFT = BitFit, LN tuning), PEFT builds two adapters of different settings (ranks, block sizes,
variants) on a tiny transformers model, every trainable tensor moved off its init by seeded noise (an identity adapter
proves nothing), and saves each as a PEFT directory. Our `load` pass puts all of them (2 per kind) on one capture of
the same model, at overlapping sites.
Models: GPT-2 (Conv1D sites, fan_in_fan_out: the kinds PEFT has on Conv1D), Qwen2 (GQA decoder), BERT (encoder), T5
(encoder-decoder; layer norms without bias). Checked, fp32:
1. (fast: Qwen2, GPT-2; slow: BERT, T5) the torch graph with only adapter k equals PEFT with adapter k (<= 1e-5);
2. (slow; every CI run: T5, five kinds; REWRITE_FULL_SWEEP=1: all) merged ONNX of each kind's first adapter
   (merge, then export) in ONNX Runtime equals PEFT (<= 1e-4);
3. (slow; every CI run: two of the eight, REWRITE_FULL_SWEEP=1: all) bank and custom-op exports holding all of
   them: one mixed batch (every adapter once, two base rows) equals
   PEFT row by row (<= 1e-4); ort-adapters: each adapter's run equals PEFT (<= 1e-4). Every adapter moves the output
   of its row by > 1e-3, so each comparison can fail. A mixed adapter (LoRA on attention, (IA)^3 on the FFN input,
   one name) rides along, its oracle our torch graph with it alone (whose parts 1. proves equal to PEFT).
4. GPT-2 prompt tuning (the ids reach `wte` through a view): the graph (fast) and merged ONNX (slow) equal PEFT.
5. conv2d and embedding sites (a small CNN): what merges equals PEFT in merged ONNX (slow); an unmerged export of it
   is refused naming switching, site and kind (fast); a PEFT directory of a kind we do not put on that op is refused
   by `load` naming the module and the kind, and the op where the format's own checks pass (fast).
Run with `-s` to see the measured differences.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from rewrite.capture import flat_outputs
from rewrite.errors import AdapterFileError, ExportError
from rewrite.export.manifest import build_manifest
from rewrite.export.onnx_unmerged import export_unmerged
from rewrite.formats.manifest import MANIFEST, write_manifest
from rewrite.graph_edit import only_adapter
from rewrite.options import ExportOptions
from rewrite.runtime.session import AdapterSession

import factories
from helpers import capture_module, fresh_capture, merged_onnx_output, run_pass, sweep_params
from models import build
from test_unmerged import need

peft = pytest.importorskip("peft")
pytest.importorskip("onnxruntime")

# arch -> (linear / Conv1D targets, the feed-forward one among them ((IA)^3 scales its input), layer norms)
ARCHS = {
    "gpt2": (["c_attn", "mlp.c_proj"], "mlp.c_proj", ["ln_1"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], "down_proj", ["input_layernorm"]),
    "bert": (["query", "value", "output.dense"], "output.dense", ["attention.output.LayerNorm"]),
    "t5": (["q", "v", "wo"], "wo", ["layer_norm"]),
}
CONV1D_KINDS = ("lora", "adalora", "dora", "vera", "ia3", "fourierft", "ln_tuning")  # what PEFT puts on GPT-2's Conv1D


def peft_config(kind: str, arch: str, second: bool):
    """PEFT's config of `kind` on `arch`; the second adapter of a kind differs in its settings."""
    targets, ff, norms = ARCHS[arch]
    r = 2 if second else 4
    return {
        "lora": lambda: peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, use_rslora=second),
        "adalora": lambda: peft.AdaLoraConfig(init_r=r, target_r=1, lora_alpha=2 * r, total_step=10,
                                              target_modules=targets),
        "dora": lambda: peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, use_dora=True),
        "vera": lambda: peft.VeraConfig(r=8, target_modules=targets),  # PEFT: one rank for a model's VeRA adapters
        # PEFT keeps a layer's first feed-forward flag for every IA3 adapter on it: the two differ in sites
        "ia3": lambda: peft.IA3Config(target_modules=targets[1:] if second else targets, feedforward_modules=[ff]),
        "loha": lambda: peft.LoHaConfig(r=r, alpha=2 * r, target_modules=targets),
        "lokr": lambda: peft.LoKrConfig(r=r, alpha=2 * r, target_modules=targets, decompose_both=second),
        "oft": lambda: peft.OFTConfig(r=0, oft_block_size=16 if second else 8, target_modules=targets),
        "boft": lambda: peft.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2 if second else 1,
                                        target_modules=targets),
        "hra": lambda: peft.HRAConfig(r=r, target_modules=targets, apply_GS=second),
        "fourierft": lambda: peft.FourierFTConfig(n_frequency=8 if second else 16, scaling=10.0,
                                                  target_modules=targets),
        "road": lambda: peft.RoadConfig(group_size=8, variant="road_2" if second else "road_1", target_modules=targets),
        "bitfit": lambda: peft.BeftConfig(target_modules=targets[1:] if second else targets),
        "ln_tuning": lambda: peft.LNTuningConfig(target_modules=norms),
    }[kind]()


def kinds_of(arch: str) -> tuple[str, ...]:
    return CONV1D_KINDS if arch == "gpt2" else tuple(
        ("lora", "adalora", "dora", "vera", "ia3", "loha", "lokr", "oft", "boft", "hra", "fourierft", "road", "bitfit",
         "ln_tuning"))


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every trainable (adapter) tensor plus 0.1 N(0, 1), seeded; eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()


def diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


class Sweep:
    """One architecture: two PEFT adapters of each kind (saved), their oracles, a capture holding all of them."""

    def __init__(self, arch: str, work: Path):
        self.arch, self.work = arch, work
        self.oracles: dict[str, peft.PeftModel] = {}
        self.names: list[str] = []
        gm, self.example = fresh_capture(arch)
        environ = dict(os.environ)
        for index, kind in enumerate(kinds_of(arch)):
            dirs = {}
            for second, tag in ((False, "one"), (True, "two")):
                made = peft.get_peft_model(build(arch), peft_config(kind, arch, second), adapter_name=tag)
                perturbed(made, 2 * index + second).save_pretrained(work / kind)
                dirs[tag] = work / kind / tag
                run_pass(gm, "load", path=str(dirs[tag]), adapter=f"{kind}_{tag}")
                self.names.append(f"{kind}_{tag}")
            oracle = peft.PeftModel.from_pretrained(build(arch), dirs["one"], adapter_name="one")
            oracle.load_adapter(dirs["two"], adapter_name="two")
            self.oracles[kind] = oracle.eval()
        # PEFT's BOFT tries to build its CUDA kernel and leaves CXX=gcc behind, with which the custom-op library
        # (whose build reads CXX) fails to link
        os.environ.clear()
        os.environ.update(environ)
        self.gm = gm
        self.base = build(arch)

    def feeds(self, batch: int) -> dict[str, torch.Tensor]:
        """`batch` rows shaped like the capture's example inputs (another batch size), ids seeded."""
        g = torch.Generator().manual_seed(5)
        out = {}
        for key, value in self.example.items():
            if "mask" in key:
                out[key] = torch.ones(batch, value.shape[1], dtype=torch.int64)
            else:
                out[key] = torch.randint(0, 128, (batch, value.shape[1]), generator=g)
        return out

    def want(self, name: str | None, feeds: dict[str, torch.Tensor]) -> np.ndarray:
        """PEFT's first output with adapter `name` ("<kind>_<one|two>") alone, or the base model's."""
        with torch.no_grad():
            if name is None:
                return flat_outputs(self.base(**feeds))[0].numpy()
            kind, tag = name.rsplit("_", 1)
            self.oracles[kind].set_adapter(tag)
            return flat_outputs(self.oracles[kind](**feeds))[0].numpy()

    def with_mixed(self) -> tuple[torch.fx.GraphModule, str]:
        """A copy of the capture plus adapter `mixed`: LoRA on the first target, (IA)^3 on the feed-forward input."""
        gm = copy.deepcopy(self.gm)
        targets, ff, _ = ARCHS[self.arch]
        run_pass(gm, "insert", kind="lora", targets=targets[:1], adapter="mixed", rank=4, init="gaussian")
        run_pass(gm, "insert", kind="ia3_ff", targets=[ff], adapter="mixed")
        generator = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for key, param in gm.named_parameters():
                if key.startswith("adapters.") and ".mixed." in key:
                    param.add_(0.3 * torch.randn(param.shape, generator=generator))
        return gm, "mixed"


_SWEEPS: dict[str, Sweep] = {}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    def get(arch: str) -> Sweep:
        if arch not in _SWEEPS:
            _SWEEPS[arch] = Sweep(arch, tmp_path_factory.mktemp(f"sweep-{arch}"))
        return _SWEEPS[arch]
    return get


def _slow_unless(*fast: str):
    return [a if a in fast else pytest.param(a, marks=pytest.mark.slow) for a in ARCHS]


# ------------------------------------------------------------------------------------ 1. torch graph vs PEFT


@pytest.mark.parametrize("arch", _slow_unless("qwen2", "gpt2"))
def test_loaded_kinds_equal_peft_one_adapter_at_a_time(sweep, arch):
    s = sweep(arch)
    feeds = s.feeds(2)
    base = s.want(None, feeds)
    with torch.no_grad():
        for name in s.names:
            got = flat_outputs(only_adapter(s.gm, name)(**feeds))[0].numpy()
            want = s.want(name, feeds)
            assert diff(want, base) > 1e-3, name
            assert diff(got, want) <= 1e-5, (name, diff(got, want))
            print(f"\n[kind-arch] {arch} {name} torch: {diff(got, want):.3g}")


# ------------------------------------------------------------------------------------ 2. merged ONNX vs PEFT


# every kind's own test file exports it merged on LLaMA / BERT (and GPT-2's Conv1D where PEFT has the kind); every
# CI run adds T5 (bias-free norms, encoder-decoder) for five kinds (each case one ONNX export, ~15 s), and
# REWRITE_FULL_SWEEP=1 every architecture and kind (all passed in session 8)
EVERY_RUN_MERGED = [("t5", k) for k in ("lora", "dora", "oft", "boft", "ln_tuning")]


@pytest.mark.slow
@pytest.mark.parametrize("arch, kind", sweep_params([(a, k) for a in ARCHS for k in kinds_of(a)], EVERY_RUN_MERGED))
def test_merged_onnx_equals_peft(sweep, arch, kind, tmp_path):
    s = sweep(arch)
    gm = only_adapter(s.gm, f"{kind}_one")
    run_pass(gm, "merge")
    feeds = s.feeds(3)
    got = merged_onnx_output(gm, feeds, tmp_path / "model.onnx").numpy()
    want = s.want(f"{kind}_one", feeds)
    assert diff(want, s.want(None, feeds)) > 1e-3
    assert diff(got, want) <= 1e-4, diff(got, want)
    print(f"\n[kind-arch] {arch} {kind} merged: {diff(got, want):.3g}")


# --------------------------------------------------------------------- 3. unmerged exports, per row / per run


def _export(s: Sweep, switching: str, out: Path) -> tuple[Path, torch.fx.GraphModule, str]:
    gm, mixed = s.with_mixed()
    entry = export_unmerged(gm, out, ExportOptions(mode="unmerged", switching=switching))
    write_manifest(out / MANIFEST, build_manifest(gm, source=s.arch, exports=[entry]))
    return out, gm, mixed


# each case exports all 30 adapters and runs them (1-2 min here): every CI run covers two, REWRITE_FULL_SWEEP=1 all
EVERY_RUN_MIXED = [("qwen2", "bank"), ("bert", "custom-op")]


@pytest.mark.slow
@pytest.mark.parametrize("arch, switching", sweep_params([(a, s) for a in ARCHS for s in ("bank", "custom-op")],
                                                         EVERY_RUN_MIXED))
def test_mixed_batch_rows_equal_peft(sweep, arch, switching, tmp_path):
    s = sweep(arch)
    out, gm, mixed = _export(s, need(switching), tmp_path)
    rows = [None, *s.names, mixed, None]
    feeds = s.feeds(len(rows))
    with AdapterSession(out) as session:
        got = session.run({k: v.numpy() for k, v in feeds.items()}, adapter_ids=rows)[0]
    with torch.no_grad():
        torch_mixed = flat_outputs(only_adapter(gm, mixed)(**feeds))[0].numpy()
    worst = 0.0
    for i, name in enumerate(rows):
        one = {k: v[i:i + 1] for k, v in feeds.items()}
        want = torch_mixed[i] if name == mixed else s.want(name, one)[0]
        if name is not None:
            assert diff(want, s.want(None, one)[0]) > 1e-3, name
        assert diff(got[i], want) <= 1e-4, (name, diff(got[i], want))
        worst = max(worst, diff(got[i], want))
    print(f"\n[kind-arch] {arch} {switching} {len(rows)} rows: {worst:.3g}")


@pytest.mark.slow
@pytest.mark.parametrize("arch", sweep_params(list(ARCHS), []))  # ort-adapters is covered per kind elsewhere
def test_ort_adapters_runs_equal_peft(sweep, arch, tmp_path):
    s = sweep(arch)
    out, gm, mixed = _export(s, "ort-adapters", tmp_path)
    feeds = s.feeds(2)
    np_feeds = {k: v.numpy() for k, v in feeds.items()}
    worst = 0.0
    with AdapterSession(out) as session:
        assert diff(session.run(np_feeds)[0], s.want(None, feeds)) <= 1e-4
        for name in s.names:
            got = session.run(np_feeds, adapter=name)[0]
            assert diff(got, s.want(name, feeds)) <= 1e-4, (name, diff(got, s.want(name, feeds)))
            worst = max(worst, diff(got, s.want(name, feeds)))
        with torch.no_grad():
            want = flat_outputs(only_adapter(gm, mixed)(**feeds))[0].numpy()
        assert diff(session.run(np_feeds, adapter=mixed)[0], want) <= 1e-4
    print(f"\n[kind-arch] {arch} ort-adapters: {worst:.3g}")


# ------------------------------------------------------------ GPT-2 prompt tuning (its ids reach wte via a view)


@pytest.fixture(scope="module")
def gpt2_prompt(tmp_path_factory):
    work = tmp_path_factory.mktemp("gpt2-prompt")
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    model = perturbed(peft.get_peft_model(build("gpt2"), config, adapter_name="one"), 0)
    model.save_pretrained(work)
    gm, example = fresh_capture("gpt2")
    run_pass(gm, "load", path=str(work / "one"), adapter="one")
    mask = torch.ones(3, 9, dtype=torch.int64)
    mask[1, 6:] = 0  # right-padded
    feeds = {"input_ids": torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(2)),
             "attention_mask": mask}
    return model, gm, {k: feeds[k] for k in example}


def test_gpt2_prompt_tuning_equals_peft(gpt2_prompt):
    """GPT-2 reads `input_ids.view(-1, S)`: the prompt finds wte through that view, and S grows by the 3 virtual
    tokens (logits [B, 3 + S, V], as PEFT's)."""
    model, gm, feeds = gpt2_prompt
    with torch.no_grad():
        got, want = flat_outputs(gm(**feeds))[0].numpy(), model(**feeds).logits.numpy()
        base = build("gpt2")(**feeds).logits.numpy()
    assert got.shape == want.shape == (3, 12, 128)
    assert diff(want[:, 3:], base) > 1e-3
    assert diff(got, want) <= 1e-5, diff(got, want)


@pytest.mark.slow
def test_gpt2_prompt_tuning_merged_onnx_equals_peft(gpt2_prompt, tmp_path):
    model, gm, feeds = gpt2_prompt
    got = merged_onnx_output(gm, feeds, tmp_path / "model.onnx").numpy()
    with torch.no_grad():
        want = model(**feeds).logits.numpy()
    assert diff(got, want) <= 1e-4, diff(got, want)


# ------------------------------------------------------------------ 4. conv2d and embedding sites (small CNN)

CNN_INPUTS = {"x": torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0)),
              "ids": torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(1))}
MERGE_ONLY = {  # (site, kind) -> PEFT config: merged only, unmerged refused
    ("conv", "lora"): lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=["conv"]),
    ("conv", "dora"): lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=["conv"], use_dora=True),
    ("conv", "loha"): lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=["conv"]),
    ("conv", "lokr"): lambda: peft.LoKrConfig(r=2, alpha=4, target_modules=["conv"]),
    ("embed", "lora"): lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=["embed"]),
    ("embed", "dora"): lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=["embed"], use_dora=True),
}
NOT_OURS = {  # (site, kind) -> (PEFT config of a kind PEFT puts on that op and we do not, what the refusal says)
    ("conv", "oft"): (lambda: peft.OFTConfig(r=0, oft_block_size=3, target_modules=["conv"]),
                      "module 'conv' is a conv2d site; oft adapters go on linear sites"),
    ("conv", "hra"): (lambda: peft.HRAConfig(r=2, target_modules=["conv"]),
                      "module 'conv' is a conv2d site; hra adapters go on linear sites"),
    ("conv", "ia3"): (lambda: peft.IA3Config(target_modules=["conv"], feedforward_modules=[]),
                      "module 'conv' is a conv2d site; ia3 adapters go on linear, conv1d sites"),
    # refused by the format's own checks, before the site's op is known: the module and the tensors are named
    ("conv", "boft"): (lambda: peft.BOFTConfig(boft_block_size=3, target_modules=["conv"]),
                       "module 'conv': boft_R (1, 9, 3, 3) and boft_s (1, 8); expected [factors, blocks, b, b] and "
                       "[d_out, 1]"),
    ("embed", "oft"): (lambda: peft.OFTConfig(r=0, oft_block_size=4, target_modules=["embed"]),
                       "tensor 'base_model.model.embed.oft_embedding_R.weight' is not a OFT tensor"),
}
OPS = {"conv": "conv2d", "embed": "embedding"}


@pytest.fixture(scope="module")
def cnn_capture():
    return capture_module(factories.cnn(), CNN_INPUTS)


def _peft_cnn(config, work: Path) -> tuple[peft.PeftModel, Path]:
    model = perturbed(peft.get_peft_model(factories.cnn(), config, adapter_name="one"), 0)
    model.save_pretrained(work)
    return model, work / "one"


@pytest.mark.parametrize("site, kind", list(MERGE_ONLY))
def test_conv2d_and_embedding_switching_is_refused(cnn_capture, site, kind, tmp_path):
    _, directory = _peft_cnn(MERGE_ONLY[site, kind](), tmp_path / "peft")
    gm = copy.deepcopy(cnn_capture)
    run_pass(gm, "load", path=str(directory), adapter="a")
    for switching in ("ort-adapters", "bank", "custom-op"):
        with pytest.raises(ExportError) as refused:
            export_unmerged(gm, tmp_path / switching, ExportOptions(mode="unmerged", switching=switching))
        message = str(refused.value)
        assert f"switching = {switching!r}: {site}: " in message and kind in message, message
        assert f"{OPS[site]} sites must be merged" in message, message
        assert not (tmp_path / switching / "model.onnx").exists()


@pytest.mark.slow
@pytest.mark.parametrize("site, kind", list(MERGE_ONLY))
def test_conv2d_and_embedding_merged_onnx_equals_peft(cnn_capture, site, kind, tmp_path):
    model, directory = _peft_cnn(MERGE_ONLY[site, kind](), tmp_path / "peft")
    gm = copy.deepcopy(cnn_capture)
    run_pass(gm, "load", path=str(directory), adapter="a")
    run_pass(gm, "merge")
    with torch.no_grad():
        want, base = model(**CNN_INPUTS).numpy(), factories.cnn()(**CNN_INPUTS).numpy()
    got = merged_onnx_output(gm, CNN_INPUTS, tmp_path / "merged.onnx").numpy()
    assert diff(want, base) > 1e-3
    assert diff(got, want) <= 1e-5, diff(got, want)


@pytest.mark.parametrize("site, kind", list(NOT_OURS))
def test_a_kind_we_do_not_put_on_that_op_is_refused_by_load(cnn_capture, site, kind, tmp_path):
    config, says = NOT_OURS[site, kind]
    _, directory = _peft_cnn(config(), tmp_path / "peft")
    gm = copy.deepcopy(cnn_capture)
    with pytest.raises(AdapterFileError) as refused:
        run_pass(gm, "load", path=str(directory), adapter="a")
    assert says in str(refused.value), str(refused.value)
    assert not [n for n in gm.graph.nodes if str(n.target).startswith("adapters.")]  # nothing changed
