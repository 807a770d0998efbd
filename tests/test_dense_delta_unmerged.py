"""LoKr and FourierFT switched unmerged through exact factors of their dense update (rewrite/adapters/dense_factors.py).

    delta W^T = A B,  A [d_in, k], B [k, d_out], k the numerical rank (float64; LoKr: kron of its factors' own factors)

Checked, with random non-identity weights: (a) A B equals the kind's own delta W^T (<= 1e-5 relative to its norm) and
x A B its forward, for every LoKr factor layout and FourierFT on linear and Conv1D sites; (d) k equals the rank
computed by hand on constructed cases (LoKr: rank w1 x rank w2; FourierFT: rank(S + S~), S~ the spectrum mirrored);
the warning past half the width; LoKr's conv2d sites refused by name; neither kind becomes LoRA-shaped for
allocate. Then ONNX Runtime against the torch graph holding each row's adapter alone, two adapters of the kind and base
rows in one batch: (b) bank and custom-op per row, (c) ort-adapters one per run (<= 1e-4); on a 4-layer MLP (fast)
and on a tiny LLaMA with GQA and a tiny BERT (slow).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from rewrite.adapters.base import NotSupported
from rewrite.capture import flat_outputs
from rewrite.adapters.fourierft import FourierFT
from rewrite.adapters.lokr import LoKr
from rewrite.decoder import onnx_name
from rewrite.errors import SpecError
from rewrite.graph_edit import adapters_at, only_adapter
from rewrite.runtime.session import AdapterSession
from rewrite.state import state_of

from factories import mlp4
from helpers import capture_module, fresh_capture
from helpers import run_pass as run
from test_unmerged import need

NAMES = ("one", "two")
ROWS = ["one", None, "two", "one", None]  # both adapters and base rows in one batch
INSERTS = {  # kind -> the two adapters' insert settings (small enough not to warn)
    "lokr": ({"rank": 2, "alpha": 3.0}, {"rank": 2, "alpha": 5.0, "options": {"decompose_both": True}}),
    "fourierft": ({"options": {"n_frequency": 8, "scaling": 100.0, "random_loc_seed": 11}},
                  {"options": {"n_frequency": 6, "scaling": 60.0, "random_loc_seed": 5}}),
}
STD = {"lokr": 0.3, "fourierft": 1.0}  # random weights that move the outputs visibly
TARGETS = {"mlp": ["layers.0", "layers.2", "layers.3"], "llama": ["q_proj", "v_proj", "down_proj"],
           "bert": ["query", "value", "intermediate.dense"]}


def _randomise(module: torch.nn.Module, seed: int, std: float = 0.5) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm())


def _check_factors(module) -> int:
    """(a): A B = delta W^T and x A B = forward; returns the rank k."""
    a, b = module.factors()
    delta_t = module.delta_weight().T
    assert _relative(a @ b, delta_t) <= 1e-5
    x = torch.randn(7, module.d_in, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _relative(x @ a @ b, module(x)) <= 1e-5
    return a.shape[1]


# ------------------------------------------------------------------------------------------- factors (fast)

@pytest.mark.parametrize("rank,options", [(2, {}), (1, {"decompose_both": True}), (8, {}), (3, {"decompose_factor": 4})])
def test_lokr_factors_are_its_delta_in_every_layout(rank, options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # full layouts reach full rank, which warns (tested below)
        module = LoKr("linear", 48, 24, rank, 2.5, **options)
        _randomise(module, seed=rank)
        assert _check_factors(module) >= 1


@pytest.mark.parametrize("op", ["linear", "conv1d"])
def test_fourierft_factors_are_its_delta(op):
    module = FourierFT(op, 40, 24, n_frequency=5, scaling=80.0, random_loc_seed=3)
    _randomise(module, seed=4)
    assert _check_factors(module) <= 2 * 5


def _lokr_with(w1: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor) -> LoKr:
    """A linear LoKr with full w1 and split w2 = w2_a w2_b (rank = w2_a's columns; d = 8 x 8 -> 8 x 8 after split)."""
    module = LoKr("linear", 64, 64, w2_a.shape[1], 1.0)
    assert module.factor_names == ("lokr_w1", "lokr_w2_a", "lokr_w2_b")
    with torch.no_grad():
        module.lokr_w1.copy_(w1)
        module.lokr_w2_a.copy_(w2_a)
        module.lokr_w2_b.copy_(w2_b)
    return module


def test_lokr_rank_is_the_product_of_its_factors_ranks():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(8, 1, generator=g), torch.randn(1, 8, generator=g)
    w2_a, w2_b = torch.randn(8, 2, generator=g), torch.randn(2, 8, generator=g)
    assert _check_factors(_lokr_with(u @ v, w2_a, w2_b)) == 1 * 2
    w1_rank3 = torch.randn(8, 3, generator=g) @ torch.randn(3, 8, generator=g)
    assert _check_factors(_lokr_with(w1_rank3, w2_a, w2_b)) == 3 * 2


def _fourierft_at(positions: list[tuple[int, int]], coefficients: list[float]) -> FourierFT:
    module = FourierFT("linear", 16, 12, n_frequency=len(positions), scaling=50.0)
    with torch.no_grad():
        module.indices.copy_(torch.tensor(positions).T)
        module.fourierft_spectrum.copy_(torch.tensor(coefficients))
    return module


@pytest.mark.parametrize("positions,coefficients,rank", [
    ([(0, 0)], [1.0], 1),                          # a constant: cos(0) only
    ([(6, 8)], [1.0], 1),                          # p = d_out / 2, q = d_in / 2: (-1)^(u + v), no sine part
    ([(0, 5)], [1.0], 1),                          # p = 0: a wave along v alone (its mirror (0, -5) is in row 0)
    ([(3, 5)], [1.0], 2),                          # one cosine wave: cos a cos b - sin a sin b
    ([(3, 5), (3, 1)], [1.0, -0.5], 2),            # one row p: both waves share cos a_u, sin a_u
    ([(3, 5), (4, 1)], [1.0, -0.5], 4),            # two rows: two pairs
    ([(3, 5), (9, 11)], [0.7, -0.7], 0),           # mirrored positions, opposite coefficients: they cancel
])
def test_fourierft_rank_is_the_mirrored_spectrum_rank(positions, coefficients, rank):
    module = _fourierft_at(positions, coefficients)
    if rank == 0:
        a, b = module.factors()
        assert a.shape == (16, 1) and b.shape == (1, 12) and not a.any() and not b.any()
        assert module.delta_weight().abs().max() <= 1e-6
        return
    assert _check_factors(module) == rank


def test_fourierft_rank_equals_rank_of_s_plus_mirror_on_drawn_positions():
    """rank dW = rank(S + S~), S~[p, q] = S[-p mod d_out, -q mod d_in] (module docstring of fourierft.py)."""
    module = FourierFT("linear", 64, 32, n_frequency=7, scaling=100.0, random_loc_seed=9)
    _randomise(module, seed=2)
    spectrum = np.zeros((32, 64))
    p, q = module.indices.numpy()
    spectrum[p, q] = module.fourierft_spectrum.detach().double().numpy()
    mirrored = spectrum[(-np.arange(32)) % 32][:, (-np.arange(64)) % 64]
    assert _check_factors(module) == np.linalg.matrix_rank(spectrum + mirrored) > 7


def test_a_rank_above_half_the_width_warns_once_per_site():
    module = LoKr("linear", 16, 16, 4, 1.0)  # w1, w2 full 4 x 4: rank 16
    _randomise(module, seed=1)
    with pytest.warns(UserWarning, match=r"lokr: the update of a 16 x 16 site has rank 16 > min\(d_in, d_out\) / 2 = "
                                         r"8; .*merged export is cheaper"):
        assert module.factors()[0].shape == (16, 16)
    small = FourierFT("linear", 16, 16, n_frequency=2)
    _randomise(small, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert small.factors()[0].shape[1] <= 4


def test_lokr_on_a_conv2d_site_is_refused_by_name():
    module = LoKr("conv2d", 3, 8, 1, 1.0, conv=dict(kernel_size=(3, 3), stride=1, padding=1, dilation=1))
    with pytest.raises(NotSupported, match="unmerged export supports lokr on linear sites; conv2d sites must be merged"):
        module.factors()


@pytest.mark.parametrize("kind", list(INSERTS))
def test_factors_are_an_export_view_not_a_lora(kind):
    """Neither kind turns LoRA-shaped: allocate still refuses it (fuse and combine read `low_rank`)."""
    assert not LoKr.low_rank and not FourierFT.low_rank and not LoKr.resizable and not FourierFT.resizable
    gm = _adapted_mlp(kind)
    with pytest.raises(SpecError, match=rf"adapter 'one' is \['{kind}'\]"):
        run(gm, "allocate", adapter="one", scorer="spectrum", budget={"params": 10}, report="")


# ------------------------------------------------------------------------------------------- exports

def _insert_both(gm, kind: str, targets: list[str]) -> None:
    for seed, (name, settings) in enumerate(zip(NAMES, INSERTS[kind])):
        run(gm, "insert", kind=kind, adapter=name, targets=targets, **settings)
        for index, owner in enumerate(dict.fromkeys(s.owner for s in state_of(gm).sites.values())):
            if name in adapters_at(gm, owner):
                _randomise(adapters_at(gm, owner)[name], seed=100 * seed + index, std=STD[kind])


def _adapted_mlp(kind: str):
    gm = capture_module(mlp4(), {"x": torch.randn(len(ROWS), 3, 64, generator=torch.Generator().manual_seed(0))})
    _insert_both(gm, kind, TARGETS["mlp"])
    return gm


def _export(gm, switching: str, out) -> None:
    from rewrite.export.manifest import build_manifest
    from rewrite.export.onnx_unmerged import export_unmerged
    from rewrite.formats.manifest import MANIFEST, write_manifest
    from rewrite.options import ExportOptions

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*merged export is cheaper")  # these ranks stay small
        entry = export_unmerged(gm, out, ExportOptions(mode="unmerged", switching=switching, external_data="never"))
    write_manifest(out / MANIFEST, build_manifest(gm, source="test", exports=[entry]))


def _first(gm, kwargs: dict[str, torch.Tensor]) -> np.ndarray:
    with torch.no_grad():
        return flat_outputs(gm(**kwargs))[0].numpy()


def _served_minus_torch(gm, kwargs: dict[str, torch.Tensor], switching: str, out) -> float:
    """Max abs difference between ONNX Runtime and the torch graph holding each row's adapter alone: per row in one
    mixed batch (`ROWS`: both adapters and base rows) for bank / custom-op, one adapter per run for ort-adapters."""
    _export(gm, switching, out)
    want = {name: _first(only_adapter(gm, name), kwargs) for name in (None, *NAMES)}
    for name in NAMES:  # each adapter matters, and differently
        assert np.abs(want[name] - want[None]).max() > 1e-3, name
    assert np.abs(want["one"] - want["two"]).max() > 1e-3
    feeds = {onnx_name(k): v.numpy() for k, v in kwargs.items()}
    with AdapterSession(out) as session:
        if switching == "ort-adapters":
            return max(float(np.abs(session.run(feeds, adapter=name)[0] - want[name]).max()) for name in want)
        got = session.run(feeds, adapter_ids=ROWS)[0]
        return max(float(np.abs(got[row] - want[name][row]).max()) for row, name in enumerate(ROWS))


@pytest.mark.parametrize("kind", list(INSERTS))
@pytest.mark.parametrize("switching", ["bank", pytest.param("custom-op", marks=pytest.mark.slow), "ort-adapters"])
def test_mlp_exports_switch_the_kind_like_torch(kind, switching, tmp_path):
    gm = _adapted_mlp(kind)
    for owner in ("layers.0", "layers.3"):
        for name in NAMES:
            _check_factors(adapters_at(gm, owner)[name])
    kwargs = {"x": torch.randn(len(ROWS), 3, 64, generator=torch.Generator().manual_seed(7))}
    assert _served_minus_torch(gm, kwargs, need(switching), tmp_path) <= 1e-4


@pytest.fixture(scope="module")
def adapted():
    """(model, kind) -> (a tiny real model's graph with two random adapters of the kind, inputs of len(ROWS) rows)."""
    made = {}

    def get(model: str, kind: str):
        if (model, kind) not in made:
            gm, _ = fresh_capture(model)
            _insert_both(gm, kind, TARGETS[model])
            ids = torch.randint(0, 128, (len(ROWS), 12), generator=torch.Generator().manual_seed(3))
            made[model, kind] = gm, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        return made[model, kind]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("model", ["llama", "bert"])
@pytest.mark.parametrize("kind", list(INSERTS))
@pytest.mark.parametrize("switching", ["bank", "custom-op", "ort-adapters"])
def test_real_model_exports_switch_the_kind_like_torch(adapted, model, kind, switching, tmp_path):
    gm, kwargs = adapted(model, kind)
    for owner in dict.fromkeys(s.owner for s in state_of(gm).sites.values()):
        for module in adapters_at(gm, owner).values():
            _check_factors(module)
    assert _served_minus_torch(gm, kwargs, need(switching), tmp_path) <= 1e-4
