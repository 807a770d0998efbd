"""`[export] reserve`: slots kept in an unmerged export for adapters added while serving; banks quiet in plain ORT.

Oracles are independent of the code under test: Hugging Face PEFT (`get_peft_model` with random non-zero weights,
`save_pretrained`; each adapter's output is PEFT's forward with that adapter set) and ONNX Runtime's own log.

1. factories:mlp4 (4 x Linear(64, 64)), exported with adapter `one` (rank 8 on layers.0 and layers.1) and
   `reserve = { rank = 16, targets = ["layers.3"] }`, per switching mode: every selected site has a slot of rank
   >= 16 for per-row modes (layers.3 zero-filled), the manifest records the reserve; adapter `two` (rank 16 on
   layers.0, layers.1 and layers.3, a PEFT directory) is hot-added and every row / run equals PEFT with `two`
   (<= 1e-4), `one` and the base model are unchanged; rank 17 (per-row modes) and an unreserved site (layers.2)
   are refused with an `AdapterSlotError` (a `RuntimeUseError` and an `AdapterFileError`) naming the site, the
   rank and what the export reserved. ort-adapters' rank dims are symbolic: rank 17 is served there, exactly.
2. Without a reserve the old behaviour holds: `two` is refused (no slot at layers.3; rank 16 above the bank's 8).
3. Spec and CLI mapping: `reserve` needs an unmerged export, targets need a rank for per-row modes, a selector
   matching nothing or a non-Linear site is a SpecError; `bundle_spec(reserve_rank=, reserve_targets=)`.
4. Plain ONNX Runtime (a subprocess, log severity WARNING, stderr captured) prints no "appears in graph inputs"
   warning for bank / custom-op models, and runs their exported adapters by `adapter_ids`; the same model with
   its banks listed as graph inputs (the earlier form) does print it (the capture works), and AdapterSession still
   opens that form and hot-adds into it.
5. (slow) tiny LLaMA: `rewrite bundle` spec with --reserve-rank 16 --reserve-target lm_head, adapter A rank 8 on
   q_proj, v_proj; B rank 16 on q_proj, v_proj and lm_head hot-added; logits per row equal PEFT's (<= 1e-4).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from rewrite.bundle import bundle_spec
from rewrite.errors import AdapterFileError, AdapterSlotError, RuntimeUseError, SpecError
from rewrite.pipeline import apply
from rewrite.runtime.session import AdapterSession
from rewrite.spec import parse_spec

import factories
from test_unmerged import PER_ROW, STRATEGIES, diff, need, peft_adapter

peft = pytest.importorskip("peft")

INPUTS = '[[capture.inputs]]\nname = "x"\nshape = [4, 3, 64]\ndims = ["batch", "seq", ""]\n'
ADAPTERS = {
    "one": dict(r=8, lora_alpha=16, target_modules=["layers.0", "layers.1"]),
    "two": dict(r=16, lora_alpha=8, target_modules=["layers.0", "layers.1", "layers.3"]),
}
RESERVE = 'reserve = { rank = 16, targets = ["layers.3"] }\n'
TOLERANCE = 1e-4


class Mlp:
    """factories:mlp4 with PEFT adapters a and b (saved), PEFT's outputs as the reference, exports per mode."""

    def __init__(self, work: Path):
        self.work = work
        configs = {n: peft.LoraConfig(init_lora_weights=False, **kw) for n, kw in ADAPTERS.items()}
        self.peft_model = peft_adapter(factories.mlp4(), configs, work / "peft")
        self.x = np.random.default_rng(0).standard_normal((4, 3, 64)).astype(np.float32)
        self.refs = {name: self.reference(name) for name in [None, *ADAPTERS]}
        assert min(diff(self.refs[p], self.refs[q]) for p in self.refs for q in self.refs if p != q) > 1e-2
        self._exports: dict[tuple[str, bool], Path] = {}

    def reference(self, name: str | None) -> np.ndarray:
        with torch.no_grad():
            if name is None:
                with self.peft_model.disable_adapter():
                    return self.peft_model(torch.from_numpy(self.x)).numpy()
            self.peft_model.set_adapter(name)
            return self.peft_model(torch.from_numpy(self.x)).numpy()

    def export(self, switching: str, reserve: bool = True) -> Path:
        key = (switching, reserve)
        if key not in self._exports:
            out = self.work / f"out-{switching}-{'reserve' if reserve else 'plain'}"
            spec = parse_spec(f'version = 1\n{INPUTS}[[pass]]\nname = "load"\npath = "{self.work / "peft" / "one"}"\n'
                              f'adapter = "one"\n[export]\nmode = "unmerged"\nswitching = "{switching}"\ncapacity = 3\n'
                              f"check = true\ntolerance = 1e-5\n{RESERVE if reserve else ''}")
            summary = apply(spec, "factories:mlp4", out)
            assert summary.check_max_abs_diff <= 1e-5
            self._exports[key] = out
        return self._exports[key]


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> Mlp:
    return Mlp(tmp_path_factory.mktemp("reserve"))


def rank17() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    g = np.random.default_rng(3)
    return {"layers.0": (g.standard_normal((64, 17)).astype(np.float32) * 0.1,
                         g.standard_normal((17, 64)).astype(np.float32) * 0.1)}


@pytest.mark.parametrize("switching", STRATEGIES)
def test_reserved_slots_take_a_larger_adapter_on_more_sites(mlp, switching):
    out = mlp.export(need(switching))
    (entry,) = json.loads((out / "manifest.json").read_text())["exports"]
    assert entry["reserve"] == {"rank": 16, "targets": ["layers.3"], "sites": ["layers.3"]}
    ranks = {s["site"]: s["rank"] for s in entry["sites"]}
    # per-row banks: every selected site at least the reserved rank; ort-adapters: symbolic ranks, a's own
    assert ranks == ({"layers.0": 16, "layers.1": 16, "layers.3": 16} if switching in PER_ROW else
                     {"layers.0": 8, "layers.1": 8, "layers.3": 16})
    with AdapterSession(out) as session:
        session.add_adapter("two", mlp.work / "peft" / "two")
        worst = 0.0
        for name in ["two", "one", None, "two"]:
            worst = max(worst, diff(session.run({"x": mlp.x}, adapter=name)[0], mlp.refs[name]))
        if switching in PER_ROW:
            rows = ["two", "one", None, "two"]
            got = session.run({"x": mlp.x}, adapter_ids=rows)[0]
            worst = max(worst, *(diff(got[i], mlp.refs[name][i]) for i, name in enumerate(rows)))
        assert worst <= TOLERANCE, worst
        print(f"\n[reserve] mlp {switching}: hot-added rank-16 adapter vs PEFT {worst:.3g}")

        big = rank17()
        if switching in PER_ROW:
            with pytest.raises(AdapterSlotError) as caught:
                session.add_adapter("big", big)
            text = str(caught.value)
            assert "site 'layers.0': rank 17 exceeds the bank's rank 16" in text
            assert "reserved rank 16 and targets ['layers.3'] (1 site)" in text and "--reserve-rank" in text
        else:  # any rank: exact
            session.add_adapter("big", big)
            got = session.run({"x": mlp.x}, adapter="big")[0]
            assert diff(got, _forward_with(mlp, big)) <= TOLERANCE

        g = np.random.default_rng(4)
        unreserved = {"layers.2": (g.standard_normal((64, 4)).astype(np.float32),
                                   g.standard_normal((4, 64)).astype(np.float32))}
        with pytest.raises(RuntimeUseError) as caught:
            session.add_adapter("other", unreserved)
        assert isinstance(caught.value, AdapterFileError)
        assert "site 'layers.2' has no switchable adapter slot" in str(caught.value)
        assert "targets ['layers.3']" in str(caught.value)
        assert "other" not in session.adapters and ("big" in session.adapters) == (switching == "ort-adapters")
        assert diff(session.run({"x": mlp.x}, adapter="two")[0], mlp.refs["two"]) <= TOLERANCE  # still served


def _forward_with(mlp: Mlp, factors: dict[str, tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The base model (factories:mlp4, PEFT's base) with y += x A B at the given layers, in torch float64."""
    base = factories.mlp4().double()
    h = torch.from_numpy(mlp.x).double()
    with torch.no_grad():
        for i, layer in enumerate(base.layers):
            out = layer(h)
            if f"layers.{i}" in factors:
                a, b = (torch.from_numpy(t).double() for t in factors[f"layers.{i}"])
                out = out + h @ a @ b
            h = torch.relu(out) if i < len(base.layers) - 1 else out
    return h.numpy()


@pytest.mark.parametrize("switching", STRATEGIES)
def test_without_a_reserve_the_slots_are_the_exported_ones(mlp, switching):
    out = mlp.export(need(switching), reserve=False)
    (entry,) = json.loads((out / "manifest.json").read_text())["exports"]
    assert entry["reserve"] is None
    assert {s["site"]: s["rank"] for s in entry["sites"]} == {"layers.0": 8, "layers.1": 8}
    with AdapterSession(out) as session:
        with pytest.raises(AdapterSlotError) as caught:
            session.add_adapter("two", mlp.work / "peft" / "two")
        text = str(caught.value)
        if switching in PER_ROW:  # layers.0 comes first: its rank is checked before layers.3's missing slot
            assert "site 'layers.0': rank 16 exceeds the bank's rank 8" in text
        else:
            assert "site 'layers.3' has no switchable adapter slot" in text
        assert "the export reserved nothing" in text and "[export] reserve = { rank = R" in text
        assert session.adapters == ["one"]
        assert diff(session.run({"x": mlp.x}, adapter="one")[0], mlp.refs["one"]) <= TOLERANCE


# ------------------------------------------------------------------------------------------ 3. spec and CLI


@pytest.mark.parametrize("export, message", [
    ('reserve = { rank = 4 }\n', 'reserve needs mode = "unmerged"'),
    ('mode = "unmerged"\nswitching = "bank"\nreserve = { targets = ["layers.3"] }\n',
     'reserve.targets with switching = "bank" needs reserve.rank'),
    ('mode = "unmerged"\nreserve = {}\n', "give 'rank'"),
    ('mode = "unmerged"\nreserve = { rank = 0 }\n', "greater than or equal to 1"),
    ('mode = "unmerged"\nreserve = { rank = 4, target = ["x"] }\n', "unknown key 'export.reserve.target'.*targets"),
    ('mode = "unmerged"\nreserve = { targets = ["re:("] }\n', "not a valid regular expression"),
])
def test_reserve_options_are_checked(export, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(f"version = 1\n[export]\n{export}")


@pytest.mark.parametrize("model, inputs, adapted, targets, message", [
    ("factories:mlp4", INPUTS, "layers.0", ["layers.9"],
     r"\[export\] reserve.targets: selector 'layers.9' matches no site .*Nearest site names: layers\."),
    ("factories:cnn", factories.cnn_inputs_toml(8, 8), "head", ["conv"],
     r"selector 'conv' matches no site \(only conv1d, linear sites are eligible\)"),
], ids=["matches nothing", "a conv2d site"])
def test_reserve_targets_must_select_linear_sites(tmp_path, model, inputs, adapted, targets, message):
    spec = parse_spec(f'version = 1\n{inputs}[[pass]]\nname = "insert"\ntargets = ["{adapted}"]\nrank = 2\n'
                      f'[export]\nmode = "unmerged"\nswitching = "bank"\n'
                      f"reserve = {{ rank = 4, targets = {json.dumps(targets)} }}\n")
    with pytest.raises(SpecError, match=message):
        apply(spec, model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bundle_maps_the_reserve_flags():
    spec = bundle_spec(["a=/tmp/a"], switching="custom-op", capacity=4, check=False, reserve_rank=16,
                       reserve_targets=["lm_head", "*.q_proj"])
    assert (spec.export.reserve.rank, spec.export.reserve.targets) == (16, ["lm_head", "*.q_proj"])
    spec = bundle_spec(["a=/tmp/a"], switching="ort-adapters", capacity=None, check=False,
                       reserve_targets=["lm_head"])
    assert (spec.export.reserve.rank, spec.export.reserve.targets) == (None, ["lm_head"])
    assert bundle_spec(["a=/tmp/a"], switching="bank", capacity=None, check=False).export.reserve is None
    with pytest.raises(SpecError, match="--reserve-target with --switching bank needs --reserve-rank N"):
        bundle_spec(["a=/tmp/a"], switching="bank", capacity=None, check=False, reserve_targets=["lm_head"])
    with pytest.raises(SpecError, match="reserve.rank"):
        bundle_spec(["a=/tmp/a"], switching="bank", capacity=None, check=False, reserve_rank=0)


# ------------------------------------------------------------------------------- 4. plain ONNX Runtime is quiet

PLAIN_ORT = """
import sys
import numpy as np
import onnxruntime as ort
model, library, x, y = sys.argv[1:]
options = ort.SessionOptions()
options.log_severity_level = 2  # WARNING, plain ONNX Runtime's default
if library:
    options.register_custom_ops_library(library)
session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
np.save(y, session.run(None, {"x": np.load(x), "adapter_ids": np.array([0, -1, 0, -1], np.int64)})[0])
"""


@pytest.mark.parametrize("switching", PER_ROW)
def test_plain_onnx_runtime_prints_no_initializer_warnings(mlp, switching, tmp_path):
    out = mlp.export(need(switching))
    library = ""
    if switching == "custom-op":
        from rewrite.runtime.ops import library_path

        library = str(library_path())
    np.save(tmp_path / "x.npy", mlp.x)

    def plain(model: Path) -> tuple[str, np.ndarray]:
        done = subprocess.run([sys.executable, "-c", PLAIN_ORT, str(model), library, str(tmp_path / "x.npy"),
                               str(tmp_path / "y.npy")], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stderr, np.load(tmp_path / "y.npy")

    stderr, got = plain(out / "model.onnx")
    assert "appears in graph inputs" not in stderr, stderr
    rows = ["one", None, "one", None]  # the exported adapter `one` is in slot 0
    assert max(diff(got[i], mlp.refs[name][i]) for i, name in enumerate(rows)) <= TOLERANCE

    # control: the earlier form, banks listed as graph inputs too, makes ONNX Runtime warn once per bank
    earlier = tmp_path / "earlier"
    shutil.copytree(out, earlier)
    model = onnx.load(str(earlier / "model.onnx"))
    banks = {t.name: t for t in model.graph.initializer if t.name.startswith("lora.")}
    for name, init in banks.items():
        model.graph.input.append(onnx.helper.make_tensor_value_info(name, init.data_type, list(init.dims)))
    onnx.save(model, str(earlier / "model.onnx"))
    stderr, got_earlier = plain(earlier / "model.onnx")
    assert len(banks) == 6 and stderr.count("appears in graph inputs") == len(banks), stderr
    assert diff(got_earlier, got) == 0
    with AdapterSession(earlier) as session:  # and the session still opens it and hot-adds into it
        session.add_adapter("two", mlp.work / "peft" / "two")
        rows = ["two", "one", None, "two"]
        got = session.run({"x": mlp.x}, adapter_ids=rows)[0]
        assert max(diff(got[i], mlp.refs[name][i]) for i, name in enumerate(rows)) <= TOLERANCE


# ------------------------------------------------------------------------------------- 5. tiny LLaMA (slow)

LLAMA = {
    "A": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "B": dict(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj", "lm_head"]),
}


@pytest.fixture(scope="module")
def llama(hf_dir, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    base = hf_dir("llama")
    work = tmp_path_factory.mktemp("reserve_llama")
    model = transformers.LlamaForCausalLM.from_pretrained(base).eval()
    model.set_attn_implementation("eager")
    configs = {n: peft.LoraConfig(init_lora_weights=False, **kw) for n, kw in LLAMA.items()}
    pm = peft_adapter(model, configs, work / "peft")
    g = torch.Generator().manual_seed(5)
    feeds = {"input_ids": torch.randint(0, 128, (3, 9), generator=g),
             "attention_mask": torch.ones(3, 9, dtype=torch.int64)}
    refs = {}
    with torch.no_grad():
        with pm.disable_adapter():
            refs[None] = pm(**feeds).logits.numpy()
        for name in LLAMA:
            pm.set_adapter(name)
            refs[name] = pm(**feeds).logits.numpy()
    assert min(diff(refs[p], refs[q]) for p in refs for q in refs if p != q) > 1e-3
    return base, work, {k: v.numpy() for k, v in feeds.items()}, refs


@pytest.mark.slow
@pytest.mark.parametrize("switching", STRATEGIES)
def test_llama_hot_adds_a_rank_16_adapter_with_lm_head(llama, switching):
    base, work, feeds, refs = llama
    spec = bundle_spec([f"A={work / 'peft' / 'A'}"], switching=need(switching), capacity=2, check=True,
                       reserve_rank=16, reserve_targets=["lm_head"])
    out = work / f"out-{switching}"
    assert apply(spec, str(base), out).check_max_abs_diff <= TOLERANCE
    with AdapterSession(out) as session:
        assert {s.site: s.rank for s in session.entry.sites}["lm_head"] == 16
        session.add_adapter("B", work / "peft" / "B")
        worst = max(diff(session.run(feeds, adapter=name)[0], refs[name]) for name in ["B", "A", None])
        if switching in PER_ROW:
            rows = ["B", None, "A"]
            got = session.run(feeds, adapter_ids=rows)[0]
            worst = max(worst, *(diff(got[i], refs[name][i]) for i, name in enumerate(rows)))
        print(f"\n[reserve] llama {switching}: rank-16 adapter with lm_head, hot-added, vs PEFT {worst:.3g}")
        assert worst <= TOLERANCE
