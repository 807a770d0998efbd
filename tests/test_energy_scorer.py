"""The `energy` scorer: allocating ranks for an adapter that is already trained (load -> allocate -> save).

Model: the tiny LLaMA (tests/models.py) with a PEFT LoRA adapter (r = 16, alpha = 32) on q_proj and o_proj,
whose updates have planted ranks and singular values (factors mixed by a random invertible matrix, so no
factor row is zero). Every site is 64 x 64, so each rank costs the same 128 parameters and the optimum for
a budget of K ranks keeps the K largest singular values over all sites. Oracles: numpy SVD of PEFT's own
dense deltas (the kept energy, the ranks), the best rank-r truncations of those deltas (what PEFT reads
back from the saved adapter), `delta_weight` of each LoRA kind (the scorer's spectrum).
"""
from __future__ import annotations

import copy
import functools
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from rewrite.adapters.lora import LoRA
from rewrite.cli import main
from rewrite.errors import SpecError
from rewrite.graph_edit import adapters_at
from rewrite.report import load_report
from rewrite.scorers.energy import update_kept, update_spectrum

from helpers import capture_hf, run_pass
from models import build

PLANTED = {  # owner -> singular values of s B A (distinct across sites: the global top-K is unique)
    "model.layers.0.self_attn.q_proj": [6.0, 1.05],
    "model.layers.0.self_attn.o_proj": [4.0, 3.1, 2.2, 1.6, 1.15, 0.8, 0.5, 0.3],
    "model.layers.1.self_attn.q_proj": [3.5, 2.6, 0.95, 0.4],
    "model.layers.1.self_attn.o_proj": [2.9, 2.4, 2.0, 1.7, 1.4, 1.2, 1.0, 0.85, 0.7, 0.6, 0.45, 0.35, 0.25,
                                        0.2, 0.15, 0.1],
}
PER_RANK = 64 + 64  # parameters of one rank at a 64 x 64 site
BLIND = "does not read the adapter's trained update"

run = functools.partial(run_pass, where="spec.toml:9", keys=True)


def _plant(module, sigma: list[float], scale: float, generator: torch.Generator) -> None:
    """lora_B @ lora_A = U diag(sigma) V^T / scale, with both factors dense (mixed by an invertible R)."""
    d_out, r = module.lora_B["default"].weight.shape
    d_in, k = module.lora_A["default"].weight.shape[1], len(sigma)
    u = torch.linalg.qr(torch.randn(d_out, k, generator=generator, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(d_in, k, generator=generator, dtype=torch.float64)).Q
    mix = torch.linalg.qr(torch.randn(r, r, generator=generator, dtype=torch.float64)).Q
    mix = mix * torch.linspace(0.5, 2.0, r, dtype=torch.float64)
    top = u * torch.tensor(sigma, dtype=torch.float64) / scale
    b = torch.cat([top, torch.zeros(d_out, r - k, dtype=torch.float64)], dim=1) @ mix
    a = torch.linalg.solve(mix, torch.cat([v.T, torch.randn(r - k, d_in, generator=generator, dtype=torch.float64)]))
    with torch.no_grad():
        module.lora_B["default"].weight.copy_(b)
        module.lora_A["default"].weight.copy_(a)


class Planted:
    """The captured tiny LLaMA and a saved PEFT adapter with the planted updates."""

    def __init__(self, root: Path):
        peft = pytest.importorskip("peft")
        self.root = root
        _, self.gm, _ = capture_hf("llama")
        model = peft.get_peft_model(build("llama"), peft.LoraConfig(r=16, lora_alpha=32,
                                                                    target_modules=["q_proj", "o_proj"]))
        generator = torch.Generator().manual_seed(0)
        self.deltas = {}
        for name, module in model.named_modules():
            owner = name.removeprefix("base_model.model.")
            if owner in PLANTED:
                _plant(module, PLANTED[owner], module.scaling["default"], generator)
                self.deltas[owner] = module.get_delta_weight("default").detach().double().numpy()
        assert set(self.deltas) == set(PLANTED)
        model.save_pretrained(root / "trained")

    def loaded(self):
        gm = copy.deepcopy(self.gm)
        run(gm, "load", self.root, path=str(self.root / "trained"))
        return gm

    def oracle(self, k: int) -> tuple[dict[str, int], float]:
        """Ranks and kept share of the best allocation of k ranks: the k largest singular values over all sites."""
        sigma = {owner: np.linalg.svd(delta, compute_uv=False)[:16] for owner, delta in self.deltas.items()}
        ranked = sorted(((s, owner) for owner, values in sigma.items() for s in values), reverse=True)[:k]
        ranks = {owner: sum(1 for _, o in ranked if o == owner) for owner in sigma}
        total = sum(float((values ** 2).sum()) for values in sigma.values())
        return ranks, sum(s ** 2 for s, _ in ranked) / total


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Planted:
    return Planted(tmp_path_factory.mktemp("energy"))


def ranks_of(gm) -> dict[str, int]:
    return {o: adapters_at(gm, o)["default"].rank if "default" in adapters_at(gm, o) else 0 for o in PLANTED}


def best_rank(delta: np.ndarray, r: int) -> np.ndarray:
    u, s, vh = np.linalg.svd(delta)
    return (u[:, :r] * s[:r]) @ vh[:r]


# ---------------------------------------------------------------------------------------------- the spectrum


@pytest.mark.parametrize("op", ["linear", "conv1d", "embedding", "conv2d"])
def test_update_spectrum_is_the_svd_of_the_dense_update(op):
    conv = dict(kernel_size=(3, 2), stride=(1, 1), padding=(0, 0), dilation=(1, 1)) if op == "conv2d" else None
    torch.manual_seed(0)
    module = LoRA(op, 5, 7, rank=4, alpha=12.0, conv=conv, dtype=torch.float64)
    assert not update_spectrum(module).any()  # fresh: zero update
    with torch.no_grad():
        module.lora_A.normal_()
        module.lora_B.normal_()
    expected = torch.linalg.svdvals(module.delta_weight().double().flatten(1))
    torch.testing.assert_close(update_spectrum(module), expected[:4], rtol=1e-10, atol=1e-10)
    shares, total = update_kept({"a": expected, "zero": torch.zeros(3, dtype=torch.float64)}, {"a": 1, "zero": 2})
    assert shares == {"a": pytest.approx(float(expected[0] ** 2 / (expected ** 2).sum())), "zero": None}
    assert total == pytest.approx(shares["a"])


# ---------------------------------------------------------------------------------------------- allocation


def test_budget_of_the_planted_ranks_keeps_them_and_the_whole_update(planted, tmp_path):
    gm = planted.loaded()
    planted_ranks = {owner: len(s) for owner, s in PLANTED.items()}
    result = run(gm, "allocate", tmp_path, scorer="energy", budget={"params": PER_RANK * sum(planted_ranks.values())})
    assert ranks_of(gm) == planted_ranks
    assert result.stats["update_kept"] == pytest.approx(1.0, abs=1e-6)
    report = load_report(tmp_path / "allocation.json")
    assert report["totals"]["update_kept"] == pytest.approx(1.0, abs=1e-6)
    assert all(s["update_kept"] == pytest.approx(1.0, abs=1e-6) for s in report["sites"])
    assert "- **Update kept**: 100.0% of the adapter's update energy" in (tmp_path / "allocation.md").read_text()


@pytest.mark.parametrize("k", [12, 5])
def test_tighter_budget_keeps_the_global_top_singular_values(planted, tmp_path, k):
    peft = pytest.importorskip("peft")
    ranks, share = planted.oracle(k)
    gm = planted.loaded()
    result = run(gm, "allocate", tmp_path, scorer="energy", budget={"params": PER_RANK * k}, report="")
    assert ranks_of(gm) == ranks and min(ranks.values()) > 0
    assert result.stats["update_kept"] == pytest.approx(share, abs=1e-4)  # rounded to 4 digits for the summary
    run(gm, "save", tmp_path, path="kept", format="peft")
    again = peft.PeftModel.from_pretrained(build("llama"), tmp_path / "kept")
    kept_energy = total_energy = 0.0
    for name, module in again.named_modules():
        owner = name.removeprefix("base_model.model.")
        if owner in PLANTED:
            delta = module.get_delta_weight("default").detach().double().numpy()
            np.testing.assert_allclose(delta, best_rank(planted.deltas[owner], ranks[owner]), atol=1e-5)
            kept_energy += float((delta ** 2).sum())
            total_energy += float((planted.deltas[owner] ** 2).sum())
    assert kept_energy / total_energy == pytest.approx(share, rel=1e-6)


def test_default_scorer_is_energy_for_a_trained_adapter_and_spectrum_for_a_fresh_one(planted):
    gm = planted.loaded()
    run(gm, "insert", planted.root, adapter="fresh", targets=["q_proj"], rank=4)
    fresh = run(gm, "allocate", planted.root, adapter="fresh", budget={"params": PER_RANK * 4}, report="")
    assert fresh.stats["scorer"] == "spectrum" and "update_kept" not in fresh.stats
    with pytest.raises(SpecError, match=r"spec.toml:9 \(scorer\): scorer = \"energy\" scores the adapter's own update, "
                                        r"and adapter 'fresh' has none"):
        run(gm, "allocate", planted.root, adapter="fresh", scorer="energy", budget={"params": 100}, report="")
    ranks, share = planted.oracle(12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trained = run(gm, "allocate", planted.root, budget={"params": PER_RANK * 12}, report="")
    assert trained.stats["scorer"] == "energy" and ranks_of(gm) == ranks
    assert trained.stats["update_kept"] == pytest.approx(share, abs=1e-4)
    assert not [w for w in caught if BLIND in str(w.message)]


def test_a_scorer_that_ignores_the_update_warns_on_a_trained_adapter(planted):
    gm = planted.loaded()
    with pytest.warns(UserWarning, match=r"spec.toml:9: allocate 'default': scorer = 'spectrum' " + BLIND
                      + r", and the ranks it chose keep \d+\.\d% of the update's energy; scorer = \"energy\""):
        result = run(gm, "allocate", planted.root, scorer="spectrum", budget={"params": PER_RANK * 12}, report="")
    assert result.stats["update_kept"] < planted.oracle(12)[1]


def test_cli_summary_and_report_give_the_share_kept(planted, hf_dir, tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text(f'version = 1\n\n[export]\nformat = "none"\n\n[[pass]]\nname = "load"\npath = '
                    f'"{planted.root / "trained"}"\n\n[[pass]]\nname = "allocate"\n'
                    f'budget = {{ params = {PER_RANK * 12} }}\nplot = false\n')
    out = tmp_path / "out"
    assert main(["apply", str(spec), str(hf_dir("llama")), "-o", str(out), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)["passes"][1]["stats"]
    assert stats["scorer"] == "energy" and stats["update_kept"] == pytest.approx(planted.oracle(12)[1], abs=1e-4)
    assert main(["apply", str(spec), str(hf_dir("llama")), "-o", str(tmp_path / "again")]) == 0
    assert f"update_kept={stats['update_kept']}" in "".join(capsys.readouterr().err.split())  # wrapped anywhere
    assert "update kept" in (out / "allocation.md").read_text()
