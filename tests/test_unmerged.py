"""Unmerged ONNX export (`[export] mode = "unmerged"`) served by `AdapterSession`, against independent oracles.

Adapters are created by Hugging Face PEFT (`init_lora_weights=False`: non-zero A and B) with DIFFERENT per-site
ranks (`rank_pattern`), saved as PEFT directories and loaded by our `load` pass (one `[[pass]] name = "load"` per
adapter). The oracles are PEFT itself (`set_adapter(name)` / `disable_adapter()`) and, for the small model, a plain
numpy forward pass written out here.

1. Numerics on real models (slow): tiny GPT-2 (Conv1D, flattened [B*T, d] rows) and LLaMA configs and the
   real-weight MiniLM, three / two adapters each. Every run with an adapter (and every row of a mixed batch for
   per-row strategies) equals PEFT with that adapter (<= 1e-5 fp32 random weights, <= 1e-4 MiniLM); no adapter /
   id -1 equals the base model; switching a, b, a, None, b gives the same answers each time.
2. AdapterSession management on a 4 x Linear(64, 64) factory model: adding adapters while serving from a PEFT
   directory, our `.safetensors` file (written by the `save` pass, format = "rewrite") and an `.onnx_adapter`
   file; remove; replace; the ONNX Runtime session object is never rebuilt; each validation error is a
   RewriteError / AdapterFileError with a clear message.
3. Isolation under load: 8 threads x 300 requests with random adapters (per run, or per row) while another thread
   adds, replaces and removes adapters; every answer is compared with its precomputed reference: 0 mismatches.
4. The CLI (`rewrite apply spec.toml MODEL -o out --check`) writes model.onnx + manifest.json (+ one
   .onnx_adapter per adapter); the model passes `onnx.checker.check_model(full_check=True)`; adapter inputs
   have one rank dim per site and empty defaults; `adapter_ids` is [batch].

Strategies: "ort-adapters", "bank", and "custom-op" when `rewrite.runtime.ops` exists and its library builds
(skipped with the reason otherwise). Exports are shared per module (an ONNX export takes seconds).
"""
from __future__ import annotations

import copy
import functools
import gc
import importlib.util
import json
import random
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from rewrite import pipeline
from rewrite.capture import flat_outputs
from rewrite.cli import main
from rewrite.errors import AdapterFileError, RewriteError
from rewrite.formats.onnx_adapter import write_onnx_adapter
from rewrite.pipeline import apply, load_and_capture
from rewrite.runtime.session import AdapterSession
from rewrite.spec import parse_spec

import factories

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

STRATEGIES = ["ort-adapters", "bank", "custom-op"]
PER_ROW = ["bank", "custom-op"]
MAX_DIFFS: dict[str, float] = {}  # printed with -s, for the record


def _record(key: str, diff: float) -> float:
    MAX_DIFFS[key] = max(diff, MAX_DIFFS.get(key, 0.0))
    print(f"\n[unmerged] {key}: max abs diff {diff:.3g}")
    return diff


@functools.cache
def _custom_op_unavailable() -> str | None:
    """Why the custom-op strategy cannot run here (None when it can)."""
    if importlib.util.find_spec("rewrite.runtime.ops") is None:
        return "rewrite.runtime.ops does not exist"
    try:
        from rewrite.runtime.ops import library_path

        library_path()
    except (RewriteError, ImportError, OSError) as err:
        return f"the rewrite::LoraDelta library does not build: {str(err).splitlines()[0]}"
    return None


def need(strategy: str) -> str:
    if strategy == "custom-op" and (reason := _custom_op_unavailable()):
        pytest.skip(f"custom-op: {reason}")
    return strategy


def diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def peft_adapter(model: torch.nn.Module, configs: dict[str, "peft.LoraConfig"], out: Path):
    """A PeftModel holding every adapter of `configs` (in order); each saved as a PEFT directory out/<name>."""
    names = list(configs)
    torch.manual_seed(1234)
    pm = peft.get_peft_model(model, configs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        pm.add_adapter(name, configs[name])
    pm.eval()
    for name in names:
        pm.save_pretrained(out, selected_adapters=[name])
        assert (out / name / "adapter_model.safetensors").is_file()
    return pm


def peft_factors(pm, name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{module path: (A [d_in, r], B [r, d_out] with PEFT's own scaling folded in)} for adapter `name`."""
    out = {}
    for path, layer in pm.base_model.model.named_modules():
        if isinstance(layer, peft.tuners.lora.LoraLayer) and name in layer.lora_A:
            a = layer.lora_A[name].weight.detach().double().numpy().T
            b = layer.lora_B[name].weight.detach().double().numpy().T * layer.scaling[name]
            out[path] = (a, b)
    return out


def load_passes(dirs: dict[str, Path]) -> str:
    return "".join(f'[[pass]]\nname = "load"\npath = "{path}"\nadapter = "{name}"\n' for name, path in dirs.items())


# ============================================================================= small model (sections 2-4)

MLP_SITES = [f"layers.{i}" for i in range(4)]
MLP_INPUTS = '[[capture.inputs]]\nname = "x"\nshape = [4, 3, 64]\ndims = ["batch", "seq", ""]\n'
CAPACITY = 4
# exported: support + style. Bank ranks per site: layers.0 4, layers.1 8, layers.2 4, layers.3 2
MLP_ADAPTERS = {
    "support": dict(r=4, lora_alpha=8, target_modules=MLP_SITES, rank_pattern={"layers.1": 8, "layers.3": 2}),
    "style": dict(r=2, lora_alpha=4, use_rslora=True, target_modules=["layers.0", "layers.2"],
                  rank_pattern={"layers.2": 4}),
    # added while serving (ranks within the bank's)
    "tenant": dict(r=2, lora_alpha=6, target_modules=["layers.0", "layers.1", "layers.3"]),
    "extra": dict(r=3, lora_alpha=3, target_modules=["layers.1", "layers.2"]),
}
EXPORTED = ["support", "style"]


class Mlp:
    """The factory model `factories:mlp4`, four PEFT adapters, a numpy oracle and inputs of two shapes."""

    def __init__(self, work: Path):
        self.work = work
        self.peft_dir = work / "peft"
        configs = {n: peft.LoraConfig(init_lora_weights=False, **kw) for n, kw in MLP_ADAPTERS.items()}
        self.peft_model = peft_adapter(factories.mlp4(), configs, self.peft_dir)
        base = factories.mlp4()
        self.weights = [(layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy())
                        for layer in base.layers]
        self.factors = {n: peft_factors(self.peft_model, n) for n in MLP_ADAPTERS}
        assert {s: a.shape[1] for s, (a, _) in self.factors["support"].items()} == {
            "layers.0": 4, "layers.1": 8, "layers.2": 4, "layers.3": 2}
        g = np.random.default_rng(0)
        self.inputs = [g.standard_normal((4, 3, 64)).astype(np.float32) for _ in range(5)]
        self.inputs.append(g.standard_normal((2, 5, 64)).astype(np.float32))  # another batch and length
        self.refs = {name: [self.forward(x, name) for x in self.inputs] for name in [None, *MLP_ADAPTERS]}
        self._exports: dict[str, Path] = {}

    def forward(self, x: np.ndarray, adapter: str | dict | None) -> np.ndarray:
        """y = W x + b + x A B per layer (float64), ReLU between layers; `adapter` a name or {site: (A, B)}."""
        h = x.astype(np.float64)
        factors = self.factors[adapter] if isinstance(adapter, str) else adapter or {}
        for i, (w, b) in enumerate(self.weights):
            out = h @ w.T + b
            if f"layers.{i}" in factors:
                a, bb = factors[f"layers.{i}"]
                out = out + h @ a @ bb
            h = np.maximum(out, 0) if i < len(self.weights) - 1 else out
        return h

    def float32_factors(self, name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {s: (a.astype(np.float32), b.astype(np.float32)) for s, (a, b) in self.factors[name].items()}

    def export(self, strategy: str, bank_dtype: str = "float32") -> Path:
        """`rewrite apply spec.toml factories:mlp4 -o out --check` (once per strategy and bank dtype)."""
        key = strategy if bank_dtype == "float32" else f"{strategy}-{bank_dtype}"
        if key not in self._exports:
            out = self.work / f"out-{key}"
            spec = self.work / f"spec-{key}.toml"
            dirs = {n: self.peft_dir / n for n in ["support", "style", "extra"]}
            spec.write_text(
                f"version = 1\n{MLP_INPUTS}{load_passes(dirs)}"
                '[[pass]]\nname = "save"\nadapter = "extra"\npath = "extra.safetensors"\nformat = "rewrite"\n'
                f'[export]\nmode = "unmerged"\nswitching = "{strategy}"\nadapters = {json.dumps(EXPORTED)}\n'
                f"capacity = {CAPACITY}\nbank_dtype = \"{bank_dtype}\"\n"
                + ("tolerance = 1e-5\n" if bank_dtype == "float32" else ""))
            assert main(["apply", str(spec), "factories:mlp4", "-o", str(out), "--check", "-q"]) == 0
            self._exports[key] = out
        return self._exports[key]

    def half_factors(self, name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """What a float16 bank holds: A and (scale-folded) B rounded to half precision."""
        return {s: (a.astype(np.float16).astype(np.float64), b.astype(np.float16).astype(np.float64))
                for s, (a, b) in self.factors[name].items()}


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> Mlp:
    return Mlp(tmp_path_factory.mktemp("unmerged_mlp"))


@pytest.fixture(params=STRATEGIES)
def strategy(request) -> str:
    return need(request.param)


@pytest.fixture(params=PER_ROW)
def row_strategy(request) -> str:
    return need(request.param)


def check_answer(mlp: Mlp, got: np.ndarray, k: int, rows: list[str | None]) -> float:
    return max(diff(got[i], mlp.refs[name][k][i]) for i, name in enumerate(rows))


def test_numpy_oracle_equals_peft(mlp):
    """The numpy forward used as the reference is PEFT's model, for every adapter and none."""
    x = torch.from_numpy(mlp.inputs[0])
    with torch.no_grad():
        with mlp.peft_model.disable_adapter():
            assert diff(mlp.peft_model(x), mlp.refs[None][0]) <= 1e-5
        for name in MLP_ADAPTERS:
            mlp.peft_model.set_adapter(name)
            assert diff(mlp.peft_model(x), mlp.refs[name][0]) <= 1e-5
    # the adapters really differ from each other and from the base (a mix-up would be visible)
    names = [None, *MLP_ADAPTERS]
    assert min(diff(mlp.refs[a][0], mlp.refs[b][0]) for a in names for b in names if a != b) > 1e-2


# ------------------------------------------------------------------------------------------- 4. the CLI


def test_cli_writes_switchable_model(mlp, strategy):
    out = mlp.export(strategy)
    files = sorted(p.name for p in out.iterdir())
    expected = ["extra.safetensors", "manifest.json", "model.onnx"]
    if strategy == "ort-adapters":
        expected.insert(0, "adapters")
        assert sorted(p.name for p in (out / "adapters").iterdir()) == ["style.onnx_adapter", "support.onnx_adapter"]
    assert files == expected
    manifest = json.loads((out / "manifest.json").read_text())
    (entry,) = manifest["exports"]
    assert (entry["mode"], entry["switching"], list(entry["adapters"])) == ("unmerged", strategy, EXPORTED)
    assert entry["check_max_abs_diff"] <= 1e-5
    _record(f"mlp {strategy} --check", entry["check_max_abs_diff"])
    assert [(s["site"], s["rank"]) for s in entry["sites"]] == [
        ("layers.0", 4), ("layers.1", 8), ("layers.2", 4), ("layers.3", 2)]
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    initializers = {t.name: list(t.dims) for t in model.graph.initializer}
    assert inputs["x"] == ["batch", "seq", 64]
    if strategy == "ort-adapters":
        assert "adapter_ids" not in inputs
        for i, site in enumerate(entry["sites"]):
            assert inputs[site["A"]] == [64, f"rank_{i}"] and inputs[site["B"]] == [f"rank_{i}", 64]
            assert initializers[site["A"]] == [64, 0] and initializers[site["B"]] == [0, 64]  # empty default
        assert {o.get("file") for o in entry["adapters"].values()} == {
            "adapters/support.onnx_adapter", "adapters/style.onnx_adapter"}
    else:
        assert inputs["adapter_ids"] == ["batch"]
        assert entry["capacity"] == CAPACITY and entry["ids_input"] == "adapter_ids"
        assert {n: a["slot"] for n, a in entry["adapters"].items()} == {"support": 0, "style": 1}
        # banks are initializers holding the exported adapters, not graph inputs (quiet in plain ONNX Runtime);
        # the session declares them inputs of the model it loads, so it can override them
        overridable = {i.name: i.shape for i in AdapterSession(out)._session.get_overridable_initializers()}
        for site in entry["sites"]:
            r = site["rank"]
            shape_a = [CAPACITY, 64, r] if strategy == "custom-op" else [64, CAPACITY * r]
            shape_b = [CAPACITY, r, 64] if strategy == "custom-op" else [CAPACITY * r, 64]
            assert site["A"] not in inputs and site["B"] not in inputs
            assert initializers[site["A"]] == overridable[site["A"]] == shape_a
            assert initializers[site["B"]] == overridable[site["B"]] == shape_b
        if strategy == "custom-op":
            assert "LoraDelta" in entry["op_types"]
        else:
            assert set(entry["op_types"]) <= {"MatMul", "Gemm", "Add", "Mul", "Equal", "Cast", "Reshape", "Relu",
                                              "Shape", "Gather", "Unsqueeze", "Concat", "Range", "Slice",
                                              "Expand", "Constant", "Squeeze", "Transpose"}


# -------------------------------------------------------------------------------------------- numerics


def test_mlp_switching_per_run(mlp, strategy):
    with AdapterSession(mlp.export(strategy)) as session:
        assert session.adapters == sorted(EXPORTED)
        worst = 0.0
        for name in ["support", "style", "support", None, "style", None, "support"]:
            for k, x in enumerate(mlp.inputs):
                (got,) = session.run({"x": x}, adapter=name)
                assert got.dtype == np.float32 and got.shape == x.shape
                worst = max(worst, diff(got, mlp.refs[name][k]))
        assert _record(f"mlp {strategy} per run", worst) <= 1e-5


def test_mlp_rows_mix_adapters(mlp, row_strategy):
    with AdapterSession(mlp.export(row_strategy)) as session:
        slots = {n: a.slot for n, a in session.entry.adapters.items()}
        worst = 0.0
        for rows in (["support", None, "style", "support"], [None, None, None, None], ["style"] * 4,
                     [None, "style", "support", None]):
            for k in range(5):
                got = session.run({"x": mlp.inputs[k]}, adapter_ids=rows)[0]
                worst = max(worst, check_answer(mlp, got, k, rows))
                ints = np.array([-1 if n is None else slots[n] for n in rows], np.int64)  # raw slot ids
                worst = max(worst, check_answer(mlp, session.run({"x": mlp.inputs[k]}, adapter_ids=ints)[0], k, rows))
        got = session.run({"x": mlp.inputs[5]}, adapter_ids=["style", None])[0]  # batch 2, length 5
        worst = max(worst, check_answer(mlp, got, 5, ["style", None]))
        assert _record(f"mlp {row_strategy} per row", worst) <= 1e-5


def test_float16_banks(mlp, tmp_path):
    """custom-op with bank_dtype = "float16": the banks are half in the model (half the bytes), each row equals the
    numpy oracle on the half-rounded adapters (<= 1e-5) and the float32 adapters within the default check tolerance;
    the fused op's output carries base's shape (what lets ONNX Runtime run it in place); adapters added while
    serving are rounded the same way."""
    need("custom-op")
    out = mlp.export("custom-op", "float16")
    (entry,) = json.loads((out / "manifest.json").read_text())["exports"]
    assert entry["bank_dtype"] == "float16" and entry["check_max_abs_diff"] <= 2e-3
    model = onnx.load(str(out / "model.onnx"))
    banks = {t.name: t.data_type for t in model.graph.initializer if t.name in {s["A"] for s in entry["sites"]}}
    assert set(banks.values()) == {onnx.TensorProto.FLOAT16} and len(banks) == len(entry["sites"])
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*model.graph.value_info, *model.graph.output]}
    fused = [n for n in model.graph.node if n.op_type == "LoraDelta"]
    assert len(fused) == 4 and all(len(n.input) == 5 for n in fused)
    assert all(shapes[n.output[0]] == shapes[n.input[4]] == ["batch", "seq", 64] for n in fused)
    half = {n: mlp.half_factors(n) for n in MLP_ADAPTERS}
    rows = ["support", None, "style", "support"]
    with AdapterSession(out) as session:
        worst = worst_fp32 = 0.0
        for k in range(5):
            got = session.run({"x": mlp.inputs[k]}, adapter_ids=rows)[0]
            for i, name in enumerate(rows):
                worst = max(worst, diff(got[i], mlp.forward(mlp.inputs[k], half.get(name))[i]))
                worst_fp32 = max(worst_fp32, diff(got[i], mlp.refs[name][k][i]))
        session.add_adapter("tenant", mlp.peft_dir / "tenant")
        got = session.run({"x": mlp.inputs[0]}, adapter="tenant")[0]
        worst = max(worst, diff(got, mlp.forward(mlp.inputs[0], half["tenant"])))
        session.add_adapter("tenant16", onnx_adapter_for(session, mlp.float32_factors("tenant"),
                                                         tmp_path / "t16.onnx_adapter", dtype=np.float16))
        worst = max(worst, diff(session.run({"x": mlp.inputs[0]}, adapter="tenant16")[0], got))
    assert _record("mlp custom-op float16 banks vs rounded oracle", worst) <= 1e-5
    assert 1e-7 < _record("mlp custom-op float16 banks vs float32 adapters", worst_fp32) <= 2e-3


def test_float16_banks_need_the_custom_op(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(f'version = 1\n{MLP_INPUTS}[export]\nmode = "unmerged"\nswitching = "bank"\n'
                    'bank_dtype = "float16"\n')
    with pytest.raises(RewriteError, match='bank_dtype = "float16" needs mode = "unmerged" and switching = '
                                           '"custom-op"'):
        parse_spec(spec.read_text(), spec)


# ------------------------------------------------------------------------------ 2. adapter management


def onnx_adapter_for(session: AdapterSession, factors, path: Path, version: int | None = None,
                     dtype=np.float32) -> Path:
    """An .onnx_adapter with this model's input names (A/B of each site) and model version."""
    tensors = {}
    for site, (a, b) in factors.items():
        info = next(s for s in session.entry.sites if s.site == site)
        tensors[info.A], tensors[info.B] = a.astype(dtype), b.astype(dtype)
    write_onnx_adapter(path, tensors, session.entry.model_version if version is None else version)
    return path


def expect(session: AdapterSession, mlp: Mlp, name: str | None, as_: str | None = None) -> float:
    """Run under `name` and compare with the reference of adapter `as_` (default: the same name)."""
    worst = 0.0
    for k in (0, 5):
        got = session.run({"x": mlp.inputs[k]}, adapter=name)[0]
        worst = max(worst, diff(got, mlp.refs[as_ or name][k]))
    assert worst <= 1e-5, (name, as_, worst)
    return worst


def test_add_remove_replace_while_serving(mlp, strategy, tmp_path):
    out = mlp.export(strategy)
    with AdapterSession(out) as session:
        ort_session = session._session
        expect(session, mlp, "support")
        # from a PEFT directory
        session.add_adapter("tenant", mlp.peft_dir / "tenant")
        # from our .safetensors file (written by the save pass of the export's spec)
        session.add_adapter("extra", out / "extra.safetensors")
        assert session.adapters == ["extra", "style", "support", "tenant"]
        for name in ["tenant", "extra", "support", None, "style", "tenant"]:
            expect(session, mlp, name)
        # remove: the name is gone, the others are untouched
        session.remove_adapter("tenant")
        assert "tenant" not in session.adapters
        with pytest.raises(RewriteError, match="unknown adapter 'tenant'"):
            session.run({"x": mlp.inputs[0]}, adapter="tenant")
        for name in ["extra", "support", "style", None]:
            expect(session, mlp, name)
        # from an .onnx_adapter file (for ort-adapters: the one the export wrote)
        # the file the ort-adapters export wrote fits every strategy: tensor names and versions agree
        source = mlp.export("ort-adapters") / "adapters" / "style.onnx_adapter"
        session.add_adapter("style_copy", source)
        expect(session, mlp, "style_copy", as_="style")
        # replace: same name, other weights; then back
        session.add_adapter("support", mlp.peft_dir / "tenant", replace_existing=True)
        expect(session, mlp, "support", as_="tenant")
        expect(session, mlp, "style")
        session.add_adapter("support", mlp.float32_factors("support"), replace_existing=True)  # a dict
        expect(session, mlp, "support")
        session.add_adapter("support", mlp.peft_dir / "support", replace_existing=True)  # rank_pattern
        expect(session, mlp, "support")
        # a removed adapter can come back (into the freed slot for banks)
        session.remove_adapter("style_copy")
        session.add_adapter("tenant", mlp.peft_dir / "tenant")
        session.remove_adapter("style")
        session.add_adapter("style", mlp.peft_dir / "style")  # rsLoRA + rank_pattern, read by adapter_source
        for name in ["tenant", "support", None, "extra", "style"]:
            expect(session, mlp, name)
        if strategy in PER_ROW:
            rows = ["tenant", "extra", None, "support"]
            assert check_answer(mlp, session.run({"x": mlp.inputs[1]}, adapter_ids=rows)[0], 1, rows) <= 1e-5
        assert session._session is ort_session  # never rebuilt
        assert list(session._tmp.iterdir()) == []  # added adapters leave no files behind
        if strategy == "ort-adapters":  # a replaced adapter is freed once no run holds it
            gone = weakref.ref(session._snapshot.run_options["tenant"][1])
            session.add_adapter("tenant", mlp.peft_dir / "style", replace_existing=True)
            expect(session, mlp, "tenant", as_="style")
            gc.collect()
            assert gone() is None


# ------------------------------------------------------------------------------------ validation errors


@pytest.fixture
def session(mlp, strategy):
    with AdapterSession(mlp.export(strategy)) as s:
        yield s


def test_duplicate_name_is_refused(session, mlp):
    with pytest.raises(AdapterFileError, match=r"adapter 'support' is already loaded .*replace_existing"):
        session.add_adapter("support", mlp.peft_dir / "tenant")
    expect(session, mlp, "support")  # unchanged


def test_unknown_site_names_the_nearest(session, mlp):
    a, b = mlp.float32_factors("tenant")["layers.0"]
    with pytest.raises(AdapterFileError, match=r"site 'layers\.7' has no switchable adapter slot .*nearest: layers\."):
        session.add_adapter("bad", {"layers.7": (a, b)})
    with pytest.raises(AdapterFileError, match=r"site 'layer.1' .*nearest: layers\.1"):
        session.add_adapter("bad", {"layer.1": (a, b)})
    assert "bad" not in session.adapters


def test_wrong_d_in_or_d_out_is_refused(session, mlp):
    a, b = mlp.float32_factors("tenant")["layers.0"]
    with pytest.raises(AdapterFileError, match=r"site 'layers\.0': shapes A \(32, 2\).*d_in=64"):
        session.add_adapter("bad", {"layers.0": (a[:32], b)})
    with pytest.raises(AdapterFileError, match=r"shapes A \(64, 2\), B \(2, 16\) do not fit .*d_out=64"):
        session.add_adapter("bad", {"layers.0": (a, b[:, :16])})
    with pytest.raises(AdapterFileError, match="do not fit"):  # A and B disagree on the rank
        session.add_adapter("bad", {"layers.0": (a, b[:1])})


def test_rank_above_the_bank_rank(session, mlp, strategy):
    g = np.random.default_rng(1)
    big = {"layers.3": (g.standard_normal((64, 3)).astype(np.float32), g.standard_normal((3, 64)).astype(np.float32))}
    if strategy == "ort-adapters":  # any rank: the rank dims are symbolic
        session.add_adapter("big", big)
        got = session.run({"x": mlp.inputs[0]}, adapter="big")[0]
        assert diff(got, mlp.forward(mlp.inputs[0], big)) <= 1e-5
    else:
        with pytest.raises(AdapterFileError, match=r"site 'layers\.3': rank 3 exceeds the bank's rank 2"):
            session.add_adapter("big", big)


def test_bank_full(mlp, row_strategy):
    with AdapterSession(mlp.export(row_strategy)) as session:
        session.add_adapter("tenant", mlp.peft_dir / "tenant")
        session.add_adapter("extra", mlp.peft_dir / "extra")
        with pytest.raises(AdapterFileError, match=r"the bank is full \(4 slots\).*capacity"):
            session.add_adapter("more", mlp.peft_dir / "tenant")
        assert session.adapters == ["extra", "style", "support", "tenant"]
        session.remove_adapter("style")  # frees slot 1
        session.add_adapter("more", mlp.peft_dir / "tenant")
        assert session._snapshot.slots["more"] == 1
        for name, as_ in [("more", "tenant"), ("extra", None), ("support", None), ("tenant", None)]:
            expect(session, mlp, name, as_)


def test_onnx_adapter_of_another_model(session, mlp, tmp_path):
    path = onnx_adapter_for(session, mlp.float32_factors("tenant"), tmp_path / "other.onnx_adapter",
                            version=session.entry.model_version + 1)
    with pytest.raises(AdapterFileError, match="another model"):
        session.add_adapter("other", path)
    # names of another model's inputs
    tensors = {"lora.decoder.q.A": np.zeros((64, 2), np.float32), "lora.decoder.q.B": np.zeros((2, 64), np.float32)}
    write_onnx_adapter(tmp_path / "names.onnx_adapter", tensors, session.entry.model_version)
    with pytest.raises(AdapterFileError, match=r"tensor 'lora\.decoder\.q\.A' is not an adapter input of this model"):
        session.add_adapter("other", tmp_path / "names.onnx_adapter")
    # half a pair: B of layers.0 without its A
    a, b = mlp.float32_factors("tenant")["layers.0"]
    info = session.entry.sites[0]
    write_onnx_adapter(tmp_path / "half.onnx_adapter", {info.B: b}, session.entry.model_version)
    with pytest.raises(AdapterFileError, match=rf"has {info.B} but not its pair {info.A}"):
        session.add_adapter("other", tmp_path / "half.onnx_adapter")
    (tmp_path / "bad.onnx_adapter").write_bytes(b"garbage, not an adapter")
    with pytest.raises(AdapterFileError, match="not a readable .onnx_adapter file"):
        session.add_adapter("other", tmp_path / "bad.onnx_adapter")
    assert "other" not in session.adapters


def test_wrong_dtype_is_refused(session, mlp, tmp_path):
    path = onnx_adapter_for(session, mlp.float32_factors("tenant"), tmp_path / "half.onnx_adapter", dtype=np.float16)
    with pytest.raises(AdapterFileError, match=r"dtypes float16/float16, the model takes float32"):
        session.add_adapter("half", path)


def test_run_argument_errors(session, mlp, strategy):
    x = mlp.inputs[0]
    with pytest.raises(RewriteError, match=r"unknown adapter 'nope'; loaded: \['style', 'support'\]"):
        session.run({"x": x}, adapter="nope")
    with pytest.raises(RewriteError, match="unknown adapter 'nope'"):
        session.run({"x": x}, adapter_ids=["nope"] * 4)
    with pytest.raises(RewriteError, match="adapter_ids has 3 entries for a batch of 4"):
        session.run({"x": x}, adapter_ids=["support", None, "style"])
    with pytest.raises(RewriteError, match="unknown adapter 'tenant'"):
        session.remove_adapter("tenant")
    if strategy == "ort-adapters":
        with pytest.raises(RewriteError, match=r"one adapter per run \(ort-adapters\).*\"bank\""):
            session.run({"x": x}, adapter_ids=["support", None, "style", "support"])
        # the same adapter for every row is one adapter per run
        got = session.run({"x": x}, adapter_ids=["style"] * 4)[0]
        assert diff(got, mlp.refs["style"][0]) <= 1e-5
    else:
        with pytest.raises(RewriteError, match=r"adapter_ids: slot 7 .*-1 .*0\.\.3"):
            session.run({"x": x}, adapter_ids=np.array([0, 1, 7, -1]))


# ---------------------------------------------------------------------------- 3. isolation under load

THREADS, REQUESTS, CYCLES = 8, 300, 20


def test_isolation_under_load(mlp, strategy):
    """8 threads x >= 300 requests while adapters come and go (20 cycles); every answer checked against its
    reference. Workers keep going until the changer is done, so the two always overlap."""
    out = mlp.export(strategy)
    stable, churn = [None, "support", "style"], ["tenant", "extra"]
    sources = {"tenant": [mlp.peft_dir / "tenant", mlp.float32_factors("tenant")],
               "extra": [out / "extra.safetensors", mlp.peft_dir / "extra"]}
    per_row = strategy in PER_ROW
    changed = threading.Event()
    served: dict[str | None, int] = {}
    mismatches, refused, failures, requests = [], [0], [], [0]
    lock = threading.Lock()

    with AdapterSession(out, intra_op_threads=1) as session:
        ort_session = session._session

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            try:
                done = 0
                while done < REQUESTS or not changed.is_set():
                    done += 1
                    k = rng.randrange(len(mlp.inputs))
                    batch = mlp.inputs[k].shape[0]
                    if per_row:
                        rows = [rng.choice(stable + churn) for _ in range(batch)]
                        kwargs = dict(adapter_ids=rows)
                    else:
                        rows = [rng.choice(stable + churn)] * batch
                        kwargs = dict(adapter=rows[0])
                    try:
                        got = session.run({"x": mlp.inputs[k]}, **kwargs)[0]
                    except RewriteError as err:  # a churn adapter removed at that moment
                        assert "unknown adapter" in str(err) and any(n in str(err) for n in churn), err
                        with lock:
                            refused[0] += 1
                        continue
                    worst = check_answer(mlp, got, k, rows)
                    with lock:
                        requests[0] += 1
                        for name in rows:
                            served[name] = served.get(name, 0) + 1
                        if not worst <= 1e-5:
                            mismatches.append((rows, k, worst))
            except BaseException as err:  # noqa: BLE001 - reported by the main thread
                failures.append(repr(err))

        def mutator() -> None:
            rng = random.Random(99)
            try:
                for _ in range(CYCLES):
                    for name in churn:
                        session.add_adapter(name, rng.choice(sources[name]))
                    time.sleep(0.002)  # let requests see both churn adapters for a while
                    # replace with the same weights from another source: the answer must not change
                    session.add_adapter("tenant", rng.choice(sources["tenant"]), replace_existing=True)
                    for name in rng.sample(churn, 2):
                        session.remove_adapter(name)
            except BaseException as err:  # noqa: BLE001
                failures.append(repr(err))
            finally:
                changed.set()

        workers = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
        changer = threading.Thread(target=mutator)
        changer.start()
        for t in workers:
            t.start()
        for t in [*workers, changer]:
            t.join()
        assert session._session is ort_session
        assert session.adapters == sorted(EXPORTED)

    assert failures == []
    print(f"\n[unmerged] {strategy} under load: {requests[0]} answers checked, {refused[0]} refused (adapter "
          f"removed), {CYCLES} add/replace/remove cycles, rows served {served}")
    assert mismatches == [], mismatches[:5]
    assert requests[0] + refused[0] >= THREADS * REQUESTS
    assert requests[0] >= THREADS * REQUESTS // 2
    assert all(served.get(name, 0) > 0 for name in stable + churn), served  # every adapter really served


# ==================================================================== 1. real models (PEFT as the oracle)

LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REAL = {
    "gpt2": {
        "support": dict(r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc"],
                        rank_pattern={"h.0.attn.c_attn": 8, "h.1.mlp.c_proj": 2}),
        "style": dict(r=2, lora_alpha=4, fan_in_fan_out=True, target_modules=["c_attn", "c_fc"],
                      rank_pattern={"h.1.attn.c_attn": 6}),
    },
    "llama": {
        "support": dict(r=4, lora_alpha=8, target_modules=LLAMA,
                        rank_pattern={"q_proj": 8, "model.layers.1.mlp.down_proj": 2}),
        "style": dict(r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj", "up_proj"],
                      rank_pattern={"model.layers.0.self_attn.v_proj": 6}),
        "extra": dict(r=3, lora_alpha=6, target_modules=["o_proj", "gate_proj"]),
    },
    "minilm": {
        "support": dict(r=4, lora_alpha=8, target_modules=["query", "key", "value", "dense"],
                        rank_pattern={"query": 8, "encoder.layer.5.output.dense": 2}),
        "style": dict(r=2, lora_alpha=4, target_modules=["query", "value"],
                      rank_pattern={"encoder.layer.0.attention.self.value": 6}),
    },
}
TOLERANCE = {"gpt2": 1e-5, "llama": 1e-5, "minilm": 1e-4}


class Real:
    """A real model: base directory, a PeftModel with 2-3 adapters (each saved), one capture shared by exports."""

    def __init__(self, name: str, base_dir: Path, work: Path):
        self.name, self.base_dir, self.work = name, Path(base_dir), work
        self.config = transformers.AutoConfig.from_pretrained(self.base_dir)
        configs = {n: peft.LoraConfig(init_lora_weights=False, **kw) for n, kw in REAL[name].items()}
        self.peft_model = peft_adapter(self.fresh_base(), configs, work / "peft")
        self.names = list(configs)
        ranks = {a.shape[1] for f in (peft_factors(self.peft_model, n) for n in self.names) for a, _ in f.values()}
        assert len(ranks) >= 3, ranks  # several ranks across sites and adapters
        self.captured = load_and_capture(str(self.base_dir), self.spec(""))
        self._exports: dict[str, Path] = {}

    def fresh_base(self) -> torch.nn.Module:
        cls = getattr(transformers, self.config.architectures[0])
        model = cls.from_pretrained(self.base_dir).eval()
        model.set_attn_implementation("eager")  # the capture uses eager attention too
        return model

    def spec(self, text: str):
        return parse_spec(f"version = 1\n{text}", self.work / "spec.toml")

    def export(self, strategy: str) -> Path:
        """`apply` with a load pass per adapter and an unmerged export (--check), reusing the capture."""
        if strategy not in self._exports:
            dirs = {n: self.work / "peft" / n for n in self.names}
            spec = self.spec(f'{load_passes(dirs)}[export]\nmode = "unmerged"\nswitching = "{strategy}"\n'
                             f"check = true\ntolerance = {TOLERANCE[self.name]}\n")
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(pipeline, "load_and_capture", lambda *_, **__: copy.deepcopy(self.captured))
                summary = apply(spec, str(self.base_dir), self.work / f"out-{strategy}")
            _record(f"{self.name} {strategy} --check", summary.check_max_abs_diff)
            assert [p["stats"]["adapter"] for p in summary.passes] == self.names
            self._exports[strategy] = self.work / f"out-{strategy}"
        return self._exports[strategy]

    def inputs(self) -> list[dict[str, np.ndarray]]:
        """The capture's example inputs, and a batch of 3 x 11 with a right-padded attention mask."""
        base = {k: v.numpy() for k, v in self.captured[0].meta["rewrite"].inputs.kwargs.items()}
        g = torch.Generator().manual_seed(7)
        mask = torch.ones(3, 11, dtype=torch.int64)
        mask[1, 6:] = 0
        mask[2, 9:] = 0
        other = {"input_ids": torch.randint(0, self.config.vocab_size, (3, 11), generator=g).numpy(),
                 "attention_mask": mask.numpy()}
        return [base, {k: other[k] for k in base}]

    def reference(self, feeds: dict[str, np.ndarray], adapter: str | None) -> list[np.ndarray]:
        kwargs = {k: torch.from_numpy(v) for k, v in feeds.items()}
        with torch.no_grad():
            if adapter is None:
                with self.peft_model.disable_adapter():
                    out = self.peft_model(**kwargs)
            else:
                self.peft_model.set_adapter(adapter)
                out = self.peft_model(**kwargs)
        return [t.numpy() for t in flat_outputs(out)]


@pytest.fixture(scope="module")
def real(request, hf_dir, tmp_path_factory):
    made: dict[str, Real] = {}

    def get(name: str) -> Real:
        if name not in made:
            base = request.getfixturevalue("minilm") if name == "minilm" else hf_dir(name)
            made[name] = Real(name, base, tmp_path_factory.mktemp(f"unmerged_{name}"))
        return made[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("model", list(REAL))
def test_real_model_equals_peft(real, model, strategy):
    c = real(model)
    tolerance = TOLERANCE[model]
    out = c.export(strategy)
    feeds_list = c.inputs()
    refs = [{n: c.reference(feeds, n) for n in [None, *c.names]} for feeds in feeds_list]
    for feeds, ref in zip(feeds_list, refs):  # every adapter changes the outputs, and differently
        names = [None, *c.names]
        assert min(diff(ref[a][0], ref[b][0]) for a in names for b in names if a != b) > 1e-3
    with AdapterSession(out) as session:
        assert session.adapters == sorted(c.names)
        worst = 0.0
        for name in [c.names[0], c.names[1], c.names[0], None, c.names[1], *c.names[2:]]:
            for feeds, ref in zip(feeds_list, refs):
                got = session.run(feeds, adapter=name)
                assert len(got) == len(ref[name])
                worst = max(worst, *(diff(g, w) for g, w in zip(got, ref[name])))
        _record(f"{model} {strategy} per run vs PEFT", worst)
        assert worst <= tolerance
        if strategy in PER_ROW:
            worst = 0.0
            cycle = [*c.names, None]
            for shift in range(len(cycle)):
                for feeds, ref in zip(feeds_list, refs):
                    batch = next(iter(feeds.values())).shape[0]
                    rows = [cycle[(i + shift) % len(cycle)] for i in range(batch)]
                    got = session.run(feeds, adapter_ids=rows)
                    for i, name in enumerate(rows):
                        worst = max(worst, *(diff(g[i], w[i]) for g, w in zip(got, ref[name])
                                             if g.shape and g.shape[0] == batch))
            _record(f"{model} {strategy} per row vs PEFT", worst)
            assert worst <= tolerance


@pytest.mark.parametrize("switching", ["ort-adapters", "bank"])
def test_fresh_identity_adapters_keep_their_names(tmp_path, switching):
    """Freshly inserted adapters all have B = 0; the exporter must not merge those equal tensors."""
    from rewrite.pipeline import apply
    from rewrite.spec import parse_spec

    passes = "".join(f'[[pass]]\nname = "insert"\nadapter = "{n}"\ntargets = ["layers.*"]\nrank = 4\n' for n in "ab")
    spec = parse_spec('version = 1\n[[capture.inputs]]\nname = "x"\nshape = [4, 64]\ndims = ["batch", ""]\n'
                      + passes + f'[export]\nmode = "unmerged"\nswitching = "{switching}"\ncheck = true\n')
    summary = apply(spec, "factories:mlp4", tmp_path / "out")
    assert summary.check_max_abs_diff <= 1e-6
    with AdapterSession(tmp_path / "out") as session:
        assert session.adapters == ["a", "b"]
        assert len(session.entry.sites) == 4
