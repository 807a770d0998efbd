"""BOFT against Hugging Face PEFT's BOFT on the same weights: forward, saved and loaded directories, merge, ONNX.

Oracle: `peft.get_peft_model(model, BOFTConfig(...))` with random (non-identity) boft_R and boft_s, copied into our
modules, on a tiny LLaMA and a tiny BERT (PEFT has no BOFT for GPT-2's Conv1D). PEFT computes more than one
butterfly factor only with its CUDA block-diagonal extension (without it, it silently keeps one); the tests stand
in for that extension with `torch.block_diag` per factor (`FakeBlockDiagExtension`), so the permutations and the
product of factors are PEFT's own. The checks are tests/test_oft.py's (`Oracle`).
"""
from __future__ import annotations

import json

import pytest
import torch

from rewrite.adapters import KINDS
from rewrite.adapters.boft import BOFT
from rewrite.errors import SpecError

from helpers import run_pass as run
from test_oft import TARGETS, Oracle, check_allocate_refuses, check_forward, check_load_then_save, check_merge, \
    check_onnx, check_refuses_config, check_save_and_load, oracle_fixtures

peft = pytest.importorskip("peft")
boft_layer = pytest.importorskip("peft.tuners.boft.layer")
report_max_diffs, captured = oracle_fixtures()


class FakeBlockDiagExtension:
    """PEFT's fbd_cuda interface: forward(R [factors, blocks, b, b]) -> [blockdiag per factor]."""

    @staticmethod
    def forward(rotations: torch.Tensor) -> list[torch.Tensor]:
        return [torch.stack([torch.block_diag(*factor) for factor in rotations])]


@pytest.fixture(autouse=True)
def block_diag_extension(monkeypatch):
    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: FakeBlockDiagExtension)


VARIANTS = {  # PEFT's BOFTConfig fields, our insert options
    "default": ({}, {}),
    "2_factors": ({"boft_block_size": 4, "boft_n_butterfly_factor": 2}, {"block_size": 4, "n_butterfly_factor": 2}),
    "3_factors": ({"boft_block_size": 2, "boft_n_butterfly_factor": 3}, {"block_size": 2, "n_butterfly_factor": 3}),
    "block_8": ({"boft_block_size": 8}, {"block_size": 8}),
    "block_num_4": ({"boft_block_size": 0, "boft_block_num": 4}, None),
}


def boft(name: str, variant: str = "default") -> Oracle:
    fields, options = VARIANTS[variant]
    return Oracle("boft", peft.BOFTConfig(target_modules=TARGETS[name], **fields), options)


@pytest.mark.parametrize("name", ["llama", "bert"])
@pytest.mark.parametrize("variant", ["default", "2_factors"])
def test_forward_equals_peft(captured, name, variant):
    check_forward(boft(name, variant), captured, name, f"boft {variant} {name}")


@pytest.mark.parametrize("variant", ["3_factors", "block_8"])
def test_forward_equals_peft_for_each_option(captured, variant):
    check_forward(boft("llama", variant), captured, "llama", f"boft {variant}")


@pytest.mark.parametrize("name", ["llama", "bert"])
@pytest.mark.parametrize("variant", ["default", "2_factors"])
def test_save_and_load_round_trip_through_peft(captured, name, variant, tmp_path):
    check_save_and_load(boft(name, variant), captured, name, tmp_path, f"boft {variant} {name}")


def test_load_reads_block_counts(captured, tmp_path):
    """PEFT's `boft_block_num` instead of a block size: 4 blocks of 16 (q_proj, v_proj) and of 32 (down_proj)."""
    gm = check_load_then_save(boft("llama", "block_num_4"), captured, tmp_path, "boft block_num = 4")
    modules = [m for m in gm.modules() if isinstance(m, BOFT)]
    assert {m.block_size for m in modules} == {16, 32} and {m.blocks for m in modules} == {4}
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (saved["boft_block_size"], saved["boft_block_num"]) == (0, 4)


@pytest.mark.parametrize("name", ["llama", "bert"])
@pytest.mark.parametrize("variant", ["default", "2_factors"])
def test_merge_equals_merge_and_unload_and_unmerge_restores(captured, name, variant):
    check_merge(boft(name, variant), captured, name, f"boft {variant} {name}")


def test_merged_onnx_equals_torch(captured, tmp_path):
    check_onnx(boft("llama", "2_factors"), captured, tmp_path, "boft")


def test_allocate_refuses_by_name(captured):
    check_allocate_refuses(boft("llama"), captured)
    assert not KINDS["boft"].resizable


def test_load_refuses_trained_biases(captured, tmp_path):
    check_refuses_config(boft("llama"), captured, tmp_path, "bias", "boft_only", r"'bias' is 'boft_only'; expected "
                                                                                 r"\"none\"")


def test_insert_refuses_blocks_that_do_not_tile_the_input(captured):
    gm, _ = captured("llama")
    with pytest.raises(SpecError, match=r"q_proj: boft: block_size \* 2\^\(n_butterfly_factor - 1\) = 128 does not "
                                         r"divide this site's input size 64"):
        run(gm, "insert", kind="boft", targets=["q_proj"], options={"block_size": 32, "n_butterfly_factor": 3})
    with pytest.raises(SpecError, match=r"q_proj: boft: block_size = 3 with n_butterfly_factor = 2; .* must be even"):
        run(gm, "insert", kind="boft", targets=["q_proj"], options={"block_size": 3, "n_butterfly_factor": 2})


def test_dropout_replaces_blocks_of_one_factor_by_the_identity_while_training():
    """PEFT's boft_dropout: one random factor, int(p * blocks) random blocks of it set to I (training only)."""
    module = BOFT("linear", 16, 16, dropout=0.5, block_size=4, n_butterfly_factor=2)
    with torch.no_grad():
        module.boft_R.normal_()
    eye = torch.eye(4)
    rotations = module.rotations()
    module.eval()
    assert module._dropped(rotations) is rotations  # inference: untouched
    module.train()
    dropped = module._dropped(rotations)
    identity = torch.tensor([[torch.equal(block, eye) for block in factor] for factor in dropped.detach()])
    assert identity.sum() == 2 and identity.any(dim=1).sum() == 1
