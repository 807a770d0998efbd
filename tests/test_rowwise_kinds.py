"""Per-row switching of elementwise kinds ((IA)^3, RoAd, BitFit) in bank / custom-op exports, against PEFT.

One tiny LLaMA export holds two adapters of each elementwise kind, made by PEFT (`IA3Config` on k / v outputs and the
down_proj input, `RoadConfig` with two group sizes, `BeftConfig`) with random non-identity vectors, plus a PEFT LoRA
adapter on sites the others also touch. Loaded by our `load` pass and exported unmerged (bank, custom-op), served by
`AdapterSession` with a mixed batch (every adapter once, -1 = base): each row equals PEFT with that row's adapter alone
(<= 1e-5). The gather adds no MatMul; ids outside the bank are refused; an elementwise adapter added while serving fills
a free slot (tests/test_rowwise_hot_add.py covers that path in depth; tests/test_rowwise_ort_adapters.py the per-run
mode). Row banks follow bank_dtype = "float16": the answer moves from the float32 one by no more than the bound that
fp16 rounding of the vectors implies.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch

from rewrite import pipeline
from rewrite.errors import RuntimeUseError
from rewrite.formats.manifest import RowSite, UnmergedExport
from rewrite.pipeline import apply, load_and_capture
from rewrite.runtime.session import AdapterSession
from rewrite.spec import parse_spec

from helpers import capture_module, fill_adapter, fresh_capture
from helpers import run_pass as run
from models import build
from test_unmerged import load_passes, need

peft = pytest.importorskip("peft")

ADAPTERS = {  # name -> (PEFT config, the tensors to fill: mean, std)
    "ia3_a": (lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
              {"ia3_l": (1.0, 0.3)}),
    "ia3_b": (lambda: peft.IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]),
              {"ia3_l": (1.0, 0.3)}),
    "road_a": (lambda: peft.RoadConfig(target_modules=["q_proj", "v_proj"], variant="road_1", group_size=8),
               {"road_theta": (0.0, 0.5), "road_alpha": (1.0, 0.3)}),
    "road_b": (lambda: peft.RoadConfig(target_modules=["q_proj", "o_proj"], variant="road_4", group_size=16),
               {"road_theta": (0.0, 0.5), "road_alpha": (1.0, 0.3)}),
    "bitfit_a": (lambda: peft.BeftConfig(target_modules=["up_proj", "v_proj"]), {"beft_bias": (0.0, 0.3)}),
    "bitfit_b": (lambda: peft.BeftConfig(target_modules=["o_proj"]), {"beft_bias": (0.0, 0.3)}),
    "lora": (lambda: peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                     target_modules=["q_proj", "v_proj", "down_proj"]), {}),
}
NAMES = list(ADAPTERS)
ROW_KINDS = {"ia3", "ia3_ff", "road", "bitfit"}


class Setup:
    """Base directory, one PeftModel per adapter (the oracles, each saved), one capture shared by the exports."""

    def __init__(self, work):
        self.work = work
        build("llama").save_pretrained(work / "base")
        self.oracles = {}
        for seed, (name, (config, fill)) in enumerate(ADAPTERS.items()):
            model = peft.get_peft_model(build("llama"), config())
            self.oracles[name] = fill_adapter(model, fill, seed=seed) if fill else model.eval()
            self.oracles[name].save_pretrained(work / "peft" / name)
        self.base = build("llama")
        self.captured = load_and_capture(str(work / "base"), parse_spec("version = 1\n", work / "spec.toml"))
        self.exports = {}

    def export(self, switching: str):
        if switching not in self.exports:
            dirs = {n: self.work / "peft" / n for n in NAMES}
            spec = parse_spec(f'version = 1\n{load_passes(dirs)}[export]\nmode = "unmerged"\nswitching = '
                              f'"{switching}"\ncapacity = {len(NAMES) + 1}\ncheck = true\ntolerance = 1e-5\n',
                              self.work / "spec.toml")
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(pipeline, "load_and_capture", lambda *_, **__: copy.deepcopy(self.captured))
                apply(spec, str(self.work / "base"), self.work / f"out-{switching}")
            self.exports[switching] = self.work / f"out-{switching}"
        return self.exports[switching]

    def oracle(self, name: str | None, row: dict[str, np.ndarray]) -> np.ndarray:
        model = self.base if name is None else self.oracles[name]
        with torch.no_grad():
            return model(**{k: torch.from_numpy(v) for k, v in row.items()}).logits.numpy()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    return Setup(tmp_path_factory.mktemp("rowwise"))


def _feeds(batch: int, length: int = 7) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(5)
    return {"input_ids": torch.randint(0, 128, (batch, length), generator=g).numpy(),
            "attention_mask": np.ones((batch, length), np.int64)}


@pytest.mark.slow
@pytest.mark.parametrize("switching", ["bank", "custom-op"])
def test_mixed_rows_equal_peft_row_by_row(setup, switching):
    out = setup.export(need(switching))
    entry = json.loads((out / "manifest.json").read_text())["exports"][0]
    assert entry["check_max_abs_diff"] <= 1e-5
    kinds = {r["kind"] for r in entry["row_sites"]}
    assert kinds == ROW_KINDS and {s["site"].rsplit(".", 1)[1] for s in entry["sites"]} == {
        "q_proj", "v_proj", "down_proj"}  # LoRA keeps its own bank at sites the elementwise kinds share
    assert len([r for r in entry["row_sites"] if r["site"] == "model.layers.0.self_attn.q_proj"]) == 2  # two layouts
    rows = [NAMES[3], None, *NAMES[:3], *NAMES[4:], NAMES[0]]  # every adapter, the base, one adapter twice
    feeds = _feeds(len(rows))
    with AdapterSession(out) as session:
        got = session.run(feeds, adapter_ids=rows)[0]
        for i, name in enumerate(rows):
            want = setup.oracle(name, {k: v[i:i + 1] for k, v in feeds.items()})[0]
            assert np.abs(got[i] - want).max() <= 1e-5, (name, float(np.abs(got[i] - want).max()))
            if name is not None:  # the adapter matters
                assert np.abs(want - setup.oracle(None, {k: v[i:i + 1] for k, v in feeds.items()})[0]).max() > 1e-3
        for bad in ([len(NAMES) + 1] * len(rows), [-2] * len(rows)):
            with pytest.raises(RuntimeUseError, match=r"adapter_ids: slot -?\d+ is neither -1 \(base\) nor a bank slot"):
                session.run(feeds, adapter_ids=np.array(bad))
        with pytest.raises(RuntimeUseError, match=rf"adapter_ids: slot {len(NAMES)} holds no adapter"):
            session.run(feeds, adapter_ids=np.array([len(NAMES)] * len(rows)))
        session.add_adapter("ia3_c", setup.work / "peft" / "ia3_a")  # the free slot, from PEFT's tensors (numpy)
        added = session.run(feeds, adapter_ids=["ia3_c"] * len(rows))[0]
        for i in range(len(rows)):
            assert np.abs(added[i] - setup.oracle("ia3_a", {k: v[i:i + 1] for k, v in feeds.items()})[0]).max() <= 1e-5
        slot = session._snapshot.slots["ia3_a"]
        session.remove_adapter("ia3_a")  # its slot is the identity again: a LoRA adapter added there is alone
        session.add_adapter("lora_2", setup.work / "peft" / "lora")
        assert session._snapshot.slots["lora_2"] == slot
        again = session.run(feeds, adapter_ids=["lora_2", "lora"] + [None] * (len(rows) - 2))[0]
        for i in (0, 1):
            want = setup.oracle("lora", {k: v[i:i + 1] for k, v in feeds.items()})[0]
            assert np.abs(again[i] - want).max() <= 1e-5


@pytest.mark.slow
def test_the_gather_adds_no_matmul(setup):
    """No MatMul or Gemm comes from a row bank (ONNX nodes keep their module scope), and LoRA adds two per site."""
    model = onnx.load(str(setup.export("bank") / "model.onnx"))

    def scopes(node):
        return "".join(p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes")

    from_rows = [n.op_type for n in model.graph.node if "rows." in scopes(n)]
    assert "Gather" in from_rows and not {"MatMul", "Gemm"} & set(from_rows)
    from_lora = [n.op_type for n in model.graph.node if "lora." in scopes(n)]
    assert from_lora.count("MatMul") == 2 * 3 * 2  # (x A) B at 3 sites in 2 layers


def test_bitfit_on_conv2d_is_refused_per_row():
    from rewrite.adapters.base import NotSupported
    from rewrite.adapters.bitfit import BitFit

    with pytest.raises(NotSupported, match="per-row switching of bitfit covers linear and Conv1D sites"):
        BitFit("conv2d", 3, 4).row_params()


def test_row_formulas_at_identity_and_not():
    from rewrite.adapters.bitfit import BitFit
    from rewrite.adapters.ia3 import IA3
    from rewrite.adapters.road import Road

    t = torch.randn(2, 3, 8)
    for module in (IA3("linear", 8, 8), Road("linear", 8, 8, group_size=4), BitFit("linear", 8, 8)):
        identity = {p: torch.full((8,), value) for p, (_, value) in module.row_params().items()}
        assert torch.equal(module.apply_rows(t, identity, **module.row_layout()), t)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.3 * torch.randn(p.shape))
        params = {p: v for p, (v, _) in module.row_params().items()}
        torch.testing.assert_close(module.apply_rows(t, params, **module.row_layout()),
                                   module(t) + (t if module.kind == "bitfit" else 0))


def test_manifest_row_sites_are_checked():
    site = dict(site="s", kind="ia3", op="linear", join="output", widths={"l": 4}, banks={"l": "x"},
                identity={"l": 1.0})
    with pytest.raises(ValueError, match=r"banks \['l'\], identity \['b'\] and widths \['l'\] name other vectors"):
        RowSite(**{**site, "identity": {"b": 0.0}})
    with pytest.raises(ValueError, match=r"and widths \['m'\] name other vectors"):
        RowSite(**{**site, "widths": {"m": 4}})
    entry = dict(file="m.onnx", switching="ort-adapters", model_version=1, nodes=1, op_types=[], external_data=False,
                 capacity=None, bank_dtype=None, ids_input=None, sites=[], row_sites=[site], adapters={})
    assert UnmergedExport(**entry).row_sites[0].layout == {}  # ort-adapters: vectors fed per run


@pytest.mark.slow
def test_gpt2_conv1d_flattened_rows_equal_torch(tmp_path):
    """Conv1D sites read GPT-2's flattened [B*T, d] rows: (IA)^3 on c_attn outputs and mlp.c_proj inputs, BitFit on
    c_fc, LoRA on c_attn beside (IA)^3; each row equals our torch graph with only that row's adapter (which the kind
    tests prove equal to PEFT)."""
    import onnxruntime as ort

    from rewrite.export.onnx_unmerged import export_unmerged
    from rewrite.graph_edit import only_adapter
    from rewrite.options import ExportOptions

    gm, kwargs = fresh_capture("gpt2")
    run(gm, "insert", kind="ia3", targets=["c_attn"], adapter="a")
    run(gm, "insert", kind="ia3_ff", targets=["mlp.c_proj"], adapter="a")
    run(gm, "insert", kind="bitfit", targets=["c_fc"], adapter="b")
    run(gm, "insert", kind="lora", targets=["c_attn"], adapter="c", rank=4, init="gaussian")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if name.startswith("adapters."):
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    names = ["a", "b", "c"]
    entry = export_unmerged(gm, tmp_path, ExportOptions(mode="unmerged", switching="bank", adapters=names))
    session = ort.InferenceSession(str(tmp_path / entry.file), providers=["CPUExecutionProvider"])
    feeds = {k: v.numpy() for k, v in kwargs.items()}
    with torch.no_grad():
        want = {n: only_adapter(copy.deepcopy(gm), n)(**kwargs).logits.numpy() for n in [*names, None]}
    for ids in ([0, 1], [2, -1], [1, 2]):
        got = session.run(None, {**feeds, "adapter_ids": np.array(ids, np.int64)})[0]
        for row, slot in enumerate(ids):
            assert np.abs(got[row] - want[names[slot] if slot >= 0 else None][row]).max() <= 1e-5


class _OneLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.proj(x)


def test_float16_row_banks_move_the_answer_by_the_vectors_rounding(tmp_path):
    """custom-op with bank_dtype = "float16" on one Linear y = x W^T + b holding one adapter of each elementwise kind
    (slot k: adapter k). Each vector entry v is rounded to fp16, |fl(v) - v| <= d(v) = max(2^-11 |v|, 2^-25) (unit
    roundoff; half the subnormal spacing), and each kind is linear in its vectors, so per output entry
        ia3     |y| d(l)            ia3_ff  (|x| d(l)) |W|^T       road  |y| d(c1) + |rot y| d(c2)       bitfit  d(b)
    plus float32 rounding of the two evaluations, 2 gamma_17 (|x| |W|^T + |b|) with gamma_n = n 2^-24 / (1 - n 2^-24)
    (a 16-term dot product and the bias). The float16 answer stays within that bound of the float32 one, and moves."""
    from rewrite.export.manifest import build_manifest
    from rewrite.export.onnx_unmerged import export_unmerged
    from rewrite.formats.manifest import MANIFEST, write_manifest
    from rewrite.graph_edit import adapters_at
    from rewrite.options import ExportOptions

    need("custom-op")
    torch.manual_seed(0)
    model, x = _OneLinear(), torch.randn(5, 3, 16)
    gm = capture_module(model, {"x": x})
    names = ["ia3", "ia3_ff", "road", "bitfit"]
    for name in names:
        run(gm, "insert", kind=name, targets=["proj"], adapter=name, **({"options": {"group_size": 4}}
                                                                        if name == "road" else {}))
    with torch.no_grad():
        for key, param in gm.named_parameters():
            if key.startswith("adapters."):
                param.add_(0.3 * torch.randn(param.shape))
    got = {}
    for dtype in ("float32", "float16"):
        out = tmp_path / dtype
        out.mkdir()
        entry = export_unmerged(gm, out, ExportOptions(mode="unmerged", switching="custom-op", bank_dtype=dtype))
        write_manifest(out / MANIFEST, build_manifest(gm, source="one-linear", exports=[entry]))
        banks = {i.name: i.data_type for i in onnx.load(str(out / entry.file)).graph.initializer}
        assert {banks[name] for r in entry.row_sites for name in r.banks.values()} == {
            onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))}
        with AdapterSession(out) as session:
            got[dtype] = session.run({"x": x.numpy()}, adapter_ids=[*names, None])[0].astype(np.float64)

    def rounding(v):
        v = np.abs(v.numpy().astype(np.float64))
        return np.maximum(v * 2.0 ** -11, 2.0 ** -25)

    w, b, xs = (t.detach().numpy().astype(np.float64) for t in (model.proj.weight, model.proj.bias, x))
    y = np.abs(xs @ w.T + b)
    vectors = {name: {p: rounding(v) for p, (v, _) in adapters_at(gm, "proj")[name].row_params().items()}
               for name in names}
    rot_y = np.abs(y.reshape(5, 3, -1, 2, 2)[..., ::-1, :].reshape(y.shape))  # |rot y|: swap halves of each group
    bound = {"ia3": y * vectors["ia3"]["l"], "ia3_ff": (np.abs(xs) * vectors["ia3_ff"]["l"]) @ np.abs(w).T,
             "road": y * vectors["road"]["c1"] + rot_y * vectors["road"]["c2"],
             "bitfit": np.broadcast_to(vectors["bitfit"]["b"], y.shape)}
    gamma = 17 * 2.0 ** -24 / (1 - 17 * 2.0 ** -24)
    evaluation = 2 * gamma * (np.abs(xs) @ np.abs(w).T + np.abs(b))
    for row, name in enumerate([*names, None]):
        moved = np.abs(got["float16"][row] - got["float32"][row])
        allowed = evaluation[row] + (bound[name][row] if name else 0.0)
        assert (moved <= allowed).all(), (name, float((moved - allowed).max()))
        print(f"\n[fp16 row banks] {name}: moved {moved.max():.3g}, at most {(moved / allowed).max():.2f} of the bound")
        if name:
            assert moved.max() > 0, name  # the vectors were rounded
