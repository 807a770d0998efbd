"""Multiplicative kinds (OFT, BOFT, HRA, DoRA) in unmerged exports, against our torch forward (tested equal to PEFT
in tests/test_oft.py, test_boft.py, test_hra.py, test_dora.py).

Fast: each kind's exported form (row vectors through `apply_rows`, DoRA's and BOFT's `unmerged_parts`) equals the
kind's own forward with random non-identity weights, and its identity row leaves the tensor unchanged; what has no
unmerged form (DoRA on an embedding) is refused naming site, kind and op.
Slow: a tiny LLaMA (GQA) and BERT each hold two adapters of every kind (Cayley-Neumann and exact-Cayley OFT with a
shared block, one- and two-factor BOFT, HRA with and without apply_GS, DoRA) at overlapping sites, plus a mixed
adapter (DoRA on attention, (IA)^3 and LoRA on the MLP), all with random non-identity weights; bank and custom-op
exports run by ONNX Runtime with a mixed batch (every adapter, base rows) equal, row by row, our torch graph with only
that row's adapter, and ort-adapters with each adapter's file per run equals it too (<= 1e-4, fp32); DoRA on GPT-2's
Conv1D sites (flattened rows, a bias) beside LoRA likewise in a bank export.
Run with `-s` to see the measured max abs differences.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from rewrite.adapters.boft import BOFT
from rewrite.adapters.dora import DoRA
from rewrite.adapters.hra import HRA
from rewrite.adapters.oft import OFT
from rewrite.errors import RewriteError
from rewrite.export.onnx_unmerged import export_unmerged
from rewrite.graph_edit import only_adapter
from rewrite.options import ExportOptions

from helpers import first_output, fresh_capture
from helpers import run_pass as run
from test_unmerged import need

TOLERANCE = 1e-4


def _perturb(module: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))


def _apply(part, t: torch.Tensor, per_run: bool) -> torch.Tensor:
    """A row part as the exports apply it. Per row (bank, custom-op): three rows [3, 1, width] gathered as the adapter,
    the identity, the adapter again. Per run (ort-adapters): the adapter's vectors [width] against the flattened
    [rows * tokens, d] (GPT-2's layout)."""
    params = part.row_params()
    if per_run:
        flat = t.reshape(-1, t.shape[-1])
        return part.apply_rows(flat, {p: v for p, (v, _) in params.items()}, **part.row_layout()).reshape(t.shape)
    rows = {p: torch.stack([v, torch.full_like(v, identity), v])[:, None] for p, (v, identity) in params.items()}
    return part.apply_rows(t, rows, **part.row_layout())


def _check(got: torch.Tensor, want: torch.Tensor, identity: torch.Tensor, per_run: bool) -> None:
    assert (want - identity).abs().max() > 0.1  # not the identity
    kept = slice(None) if per_run else [0, 2]
    torch.testing.assert_close(got[kept], want[kept], rtol=0, atol=1e-5)
    if not per_run:
        torch.testing.assert_close(got[1], identity[1], rtol=0, atol=0)


@pytest.mark.parametrize("per_run", [False, True], ids=["per-row", "per-run"])
@pytest.mark.parametrize("module", [
    OFT("linear", 16, 12, block_size=4),
    OFT("linear", 16, 12, block_size=8, use_cayley_neumann=False, block_share=True),
    OFT("linear", 16, 12, block_size=4, num_cayley_neumann_terms=2),
    HRA("linear", 16, 12, rank=4),
    HRA("linear", 16, 12, rank=6, apply_GS=True),
], ids=["oft-neumann", "oft-cayley-shared", "oft-2-terms", "hra", "hra-gs"])
def test_input_rotation_rows_equal_forward(module, per_run):
    _perturb(module, 0)
    x = torch.randn(3, 5, 16)
    _check(_apply(module, x, per_run), module(x), x, per_run)


def test_hra_compact_form_with_repeated_vectors():
    """The paired init (u, u, v, v, ...: each pair cancels) and a perturbed copy of it, in the compact form."""
    module, x = HRA("linear", 16, 12, rank=4), torch.randn(3, 5, 16)
    torch.testing.assert_close(_apply(module, x, False), x, rtol=0, atol=1e-5)
    with torch.no_grad():
        module.hra_u[:, 1] += 0.2 * torch.randn(16)
    _check(_apply(module, x, False), module(x), x, False)


@pytest.mark.parametrize("per_run", [False, True], ids=["per-row", "per-run"])
@pytest.mark.parametrize("factors", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_boft_parts_equal_forward(factors, bias, per_run):
    module = BOFT("linear", 16, 12, block_size=2, n_butterfly_factor=factors)
    _perturb(module, 1)
    weight, b = torch.randn(12, 16), torch.randn(12) if bias else None
    x = torch.randn(3, 5, 16)
    base = torch.nn.functional.linear(x, weight, b)
    want = base + module(x, weight)
    low_rank, parts = module.unmerged_parts(weight, b)
    assert low_rank is None and [p.join for p in parts] == ["input"] * factors + ["output"]
    assert [p.row_layout()["level"] for p in parts[:-1]] == list(reversed(range(factors)))  # F_(m-1) meets x first
    x_rotated = x
    for part in parts[:-1]:
        x_rotated = _apply(part, x_rotated, per_run)
    _check(_apply(parts[-1], torch.nn.functional.linear(x_rotated, weight, b), per_run), want, base, per_run)


@pytest.mark.parametrize("per_run", [False, True], ids=["per-row", "per-run"])
@pytest.mark.parametrize("op", ["linear", "conv1d"])
def test_dora_parts_equal_forward(op, per_run):
    weight = torch.randn(12, 16) if op == "linear" else torch.randn(16, 12)
    module = DoRA(op, 16, 12, 4, 8.0, weight=weight)
    _perturb(module, 2)
    bias, x = torch.randn(12), torch.randn(3, 5, 16)
    base = (torch.nn.functional.linear(x, weight) if op == "linear" else x @ weight) + bias
    want = base + module(x, weight, base, bias)
    (a, b), (scale,) = module.unmerged_parts(weight, bias)
    _check(_apply(scale, base + x @ a @ b, per_run), want, base + x @ a @ b, per_run)  # identity row: base + delta


def test_dora_on_an_embedding_is_refused_by_site_kind_and_op(tmp_path):
    gm, _ = fresh_capture("llama")
    run(gm, "insert", kind="dora", targets=["embed_tokens"], adapter="a", rank=4)
    with pytest.raises(RewriteError, match=r"model\.embed_tokens: unmerged export switches dora on linear and Conv1D "
                                           r"sites .*embedding sites must be merged"):
        export_unmerged(gm, tmp_path, ExportOptions(mode="unmerged", switching="bank"))


# ------------------------------------------------------------------------------------------------ real models

SITES = {  # model -> role -> target
    "llama": dict(q="q_proj", k="k_proj", v="v_proj", o="o_proj", up="up_proj", down="down_proj"),
    "bert": dict(q="query", k="key", v="value", o="attention.output.dense", up="intermediate.dense",
                 down=r"re:encoder\.layer\.\d+\.output\.dense"),
}
INSERTS = {  # adapter -> [(kind, roles, insert keys)]
    "oft_a": [("oft", ["q", "k", "down"], dict(options={"block_size": 8}))],
    "oft_b": [("oft", ["q", "v"], dict(options={"block_size": 16, "use_cayley_neumann": False,
                                                "block_share": True}))],
    "boft_a": [("boft", ["q", "up"], dict(options={"block_size": 4, "n_butterfly_factor": 2}))],
    "boft_b": [("boft", ["k", "v"], dict(options={"block_size": 8}))],
    "hra_a": [("hra", ["q", "down"], dict(rank=4))],
    "hra_b": [("hra", ["v"], dict(rank=6))],  # apply_GS set below (load sets it from PEFT; insert cannot)
    "dora_a": [("dora", ["q", "k", "v"], dict(rank=4))],
    "dora_b": [("dora", ["v", "o", "down"], dict(rank=2))],
    "mixed": [("dora", ["q", "k"], dict(rank=4)), ("ia3_ff", ["down"], {}), ("lora", ["up"], dict(rank=4))],
}
NAMES = list(INSERTS)


def _targets(model: str, roles: list[str]) -> list[str]:
    return [SITES[model][r] for r in roles]


@pytest.fixture(scope="module")
def adapted():
    made = {}

    def build(model: str):
        if model not in made:
            gm, kwargs = fresh_capture(model)
            for name, inserts in INSERTS.items():
                for kind, roles, keys in inserts:
                    run(gm, "insert", kind=kind, targets=_targets(model, roles), adapter=name, **keys)
            for path, module in gm.named_modules():
                if isinstance(module, HRA) and "hra_b" in path:
                    module.apply_GS = True
            _perturb(gm.get_submodule("adapters"), 7)
            g = torch.Generator().manual_seed(11)
            rows = [*range(len(NAMES)), -1, 3]  # every adapter, a base row, one adapter twice
            feeds = {"input_ids": torch.randint(0, 128, (len(rows), 9), generator=g),
                     "attention_mask": torch.ones(len(rows), 9, dtype=torch.int64)}
            feeds = {k: v for k, v in feeds.items() if k in kwargs}
            with torch.no_grad():
                want = {n: first_output(only_adapter(copy.deepcopy(gm), n), feeds).numpy() for n in [*NAMES, None]}
            made[model] = gm, feeds, rows, want
        return made[model]

    return build


@pytest.mark.slow
@pytest.mark.parametrize("switching", ["bank", "custom-op"])
@pytest.mark.parametrize("model", ["llama", "bert"])
def test_mixed_batch_equals_torch_row_by_row(adapted, model, switching, tmp_path):
    import onnxruntime as ort

    gm, feeds, rows, want = adapted(model)
    entry = export_unmerged(gm, tmp_path, ExportOptions(mode="unmerged", switching=need(switching), adapters=NAMES))
    kinds = {r.kind for r in entry.row_sites}
    assert {"oft", "boft", "hra", "dora", "ia3_ff"} <= kinds, kinds
    options = ort.SessionOptions()
    if switching == "custom-op":
        from rewrite.runtime.ops import library_path

        options.register_custom_ops_library(str(library_path()))
    session = ort.InferenceSession(str(tmp_path / entry.file), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {**{k: v.numpy() for k, v in feeds.items()}, "adapter_ids": np.array(rows, np.int64)})[0]
    worst = {}
    for row, slot in enumerate(rows):
        name = NAMES[slot] if slot >= 0 else None
        worst[name] = max(worst.get(name, 0.0), float(np.abs(got[row] - want[name][row]).max()))
        if name is not None:  # the adapter matters
            assert np.abs(want[name][row] - want[None][row]).max() > 1e-2, name
    print(f"\n[multiplicative] {model} {switching}: max abs diff per adapter {worst}")
    assert max(worst.values()) <= TOLERANCE, worst


@pytest.mark.slow
@pytest.mark.parametrize("model", ["llama", "bert"])
def test_ort_adapters_one_adapter_per_run_equals_torch(adapted, model, tmp_path):
    """Each adapter's .onnx_adapter file (its factors and row vectors) fed per run; no file: the base model."""
    import onnxruntime as ort

    gm, feeds, _, want = adapted(model)
    entry = export_unmerged(gm, tmp_path, ExportOptions(mode="unmerged", switching="ort-adapters", adapters=NAMES))
    session = ort.InferenceSession(str(tmp_path / entry.file), providers=["CPUExecutionProvider"])
    inputs = {k: v.numpy() for k, v in feeds.items()}
    worst = {None: float(np.abs(session.run(None, inputs)[0] - want[None]).max())}
    for name in NAMES:
        adapter = ort.LoraAdapter()
        adapter.Load(str(tmp_path / entry.adapters[name].file))
        options = ort.RunOptions()
        options.add_active_adapter(adapter)
        worst[name] = float(np.abs(session.run(None, inputs, options)[0] - want[name]).max())
        assert np.abs(want[name] - want[None]).max() > 1e-2, name
    print(f"\n[multiplicative] {model} ort-adapters: max abs diff per adapter {worst}")
    assert max(worst.values()) <= TOLERANCE, worst


@pytest.mark.slow
def test_gpt2_conv1d_dora_rows_equal_torch(tmp_path):
    """DoRA on GPT-2's Conv1D sites (W [d_in, d_out], flattened [B*T, d] rows; c_attn with a bias), beside LoRA."""
    import onnxruntime as ort

    gm, kwargs = fresh_capture("gpt2")
    run(gm, "insert", kind="dora", targets=["c_attn", "mlp.c_fc"], adapter="a", rank=4)
    run(gm, "insert", kind="dora", targets=["c_attn"], adapter="b", rank=2)
    run(gm, "insert", kind="lora", targets=["c_attn"], adapter="c", rank=4, init="gaussian")
    _perturb(gm.get_submodule("adapters"), 3)
    names = ["a", "b", "c"]
    entry = export_unmerged(gm, tmp_path, ExportOptions(mode="unmerged", switching="bank", adapters=names))
    session = ort.InferenceSession(str(tmp_path / entry.file), providers=["CPUExecutionProvider"])
    ids = [0, 1, -1, 2]
    feeds = {k: v[:1].expand(len(ids), *v.shape[1:]).contiguous() for k, v in kwargs.items()}
    got = session.run(None, {**{k: v.numpy() for k, v in feeds.items()}, "adapter_ids": np.array(ids, np.int64)})[0]
    one = {k: v[:1] for k, v in feeds.items()}  # every row reads the same tokens
    with torch.no_grad():
        want = {n: first_output(only_adapter(copy.deepcopy(gm), n), one)[0].numpy() for n in [*names, None]}
    for row, slot in enumerate(ids):
        name = names[slot] if slot >= 0 else None
        assert np.abs(got[row] - want[name]).max() <= TOLERANCE, name
        assert name is None or np.abs(want[name] - want[None]).max() > 1e-2, name


@pytest.mark.parametrize("switching", ["bank", "ort-adapters"])
def test_an_adapter_session_serves_vectors_of_several_widths(switching, tmp_path):
    """HRA's row vectors differ in width (V [r d], M [r r]): the manifest records each, and AdapterSession opens the
    export and serves the adapter equal to torch."""
    from rewrite.runtime.session import AdapterSession

    gm, kwargs = fresh_capture("llama")
    run(gm, "insert", kind="hra", targets=["q_proj"], adapter="a", rank=4)
    _perturb(gm.get_submodule("adapters"), 5)
    entry = export_unmerged(gm, tmp_path, ExportOptions(mode="unmerged", switching=switching))
    (row_site, *_) = entry.row_sites
    assert len(set(row_site.widths.values())) == 2, row_site.widths
    from rewrite.formats.manifest import MANIFEST, write_manifest
    from rewrite.export.manifest import build_manifest

    write_manifest(tmp_path / MANIFEST, build_manifest(gm, source="llama", exports=[entry]))
    with torch.no_grad():
        want = first_output(gm, kwargs).numpy()
    with AdapterSession(tmp_path) as session:
        got = session.run({k: v.numpy() for k, v in kwargs.items()}, adapter="a")[0]
    assert np.abs(got - want).max() <= TOLERANCE
