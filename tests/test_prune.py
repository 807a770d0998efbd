"""The prune pass: structural removal equals masking, GQA evenness, targets, errors, idempotence, ONNX.

Oracle for "removal equals masking": the unpruned model with the removed units silenced where they are read, the
consumer side only, from the architecture's own layout (the o-projection's input columns of a removed head, the
down-projection's input columns of a removed neuron, the next conv's input channels of a removed channel, and the
same rows of the LoRA A read there). Zeroing those makes a unit contribute nothing whatever its producers compute,
so the oracle needs neither the coupling analysis nor its cuts.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from helpers import capture_module, fresh_capture, merged_onnx_output, run_pass
from models import build
from prune_models import attention, resnet_tiny
from rewrite.errors import SpecError

ATOL = 1e-5


def removed(report_dir, structure: str) -> dict[str, list[int]]:
    """group -> removed unit indices, from prune.json."""
    report = json.loads((report_dir / "prune.json").read_text())
    return {row["group"]: [int(label.rpartition(" ")[2]) for label in row["removed"]]
            for row in report["groups"] if row["structure"] == structure}


def silence(model: torch.nn.Module, weight: str, dim: int, index: list[int], adapters: bool = True) -> None:
    """Zero `index` along `dim` of the parameter `weight` (and the same rows of a LoRA A reading them)."""
    with torch.no_grad():
        model.get_parameter(weight).index_fill_(dim, torch.tensor(index, dtype=torch.long), 0.0)
        lora = f"adapters.{weight.rpartition('.')[0]}.a.lora_A"
        if adapters and lora in dict(model.named_parameters()):
            model.get_parameter(lora).index_fill_(0, torch.tensor(index, dtype=torch.long), 0.0)


def with_lora(gm, targets: list[str]):
    """A rank-2 LoRA 'a' on `targets` whose B is not zero (an identity adapter proves nothing)."""
    run_pass(gm, "insert", adapter="a", targets=targets, rank=2, init="gaussian")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if name.endswith("lora_B"):
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return gm


def first(out) -> torch.Tensor:
    return out.logits if getattr(out, "logits", None) is not None else out[0] if isinstance(out, (tuple, dict)) \
        else out


def outputs(gm, kwargs) -> torch.Tensor:
    with torch.no_grad():
        return first(gm(**kwargs))


# --------------------------------------------------------------------------- removal equals masking

def test_llama_gqa_removal_equals_masking(tmp_path):
    gm, kwargs = fresh_capture("llama")
    cfg = build("llama").config
    with_lora(gm, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    masked = copy.deepcopy(gm)
    result = run_pass(gm, "prune", tmp_path, heads=0.5, ffn=40)
    assert result.modified and result.stats["heads_removed"] == 4 and result.stats["ffn_removed"] == 80
    dh, group = cfg.hidden_size // cfg.num_attention_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    for layer, heads in removed(tmp_path, "heads").items():
        assert sorted(h // group for h in heads) == list(range(cfg.num_key_value_heads))  # one per KV head
        silence(masked, f"{layer}.o_proj.weight", 1, [h * dh + i for h in heads for i in range(dh)])
    for layer, neurons in removed(tmp_path, "ffn").items():
        assert len(neurons) == 40
        silence(masked, f"{layer}.down_proj.weight", 1, neurons)
    diff = (outputs(gm, kwargs) - outputs(masked, kwargs)).abs().max()
    assert diff <= ATOL
    q = gm.get_submodule("adapters.model.layers.0.self_attn.q_proj.a")
    assert q.lora_B.shape == (2, 32) and q.d_out == 32  # B columns went with the q rows
    assert gm.get_parameter("model.layers.0.self_attn.k_proj.weight").shape == (32, 64)  # KV heads all stay
    assert gm.meta["rewrite"].sites["model.layers.0.mlp.down_proj"].d_in == 128 - 40


def test_llama_kv_head_takes_its_query_group(tmp_path):
    gm, kwargs = fresh_capture("llama")
    cfg = build("llama").config
    with_lora(gm, ["k_proj", "v_proj", "o_proj"])
    masked = copy.deepcopy(gm)
    assert run_pass(gm, "prune", tmp_path, kv_heads=1, method="random").stats["kv_heads_removed"] == 2
    dh, group = cfg.hidden_size // cfg.num_attention_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    for layer, (kv,) in removed(tmp_path, "kv_heads").items():  # the query heads of KV head kv read it
        silence(masked, f"{layer}.o_proj.weight", 1, list(range(kv * group * dh, (kv + 1) * group * dh)))
    assert (outputs(gm, kwargs) - outputs(masked, kwargs)).abs().max() <= ATOL
    assert gm.get_parameter("model.layers.1.self_attn.k_proj.weight").shape == (dh, 64)
    assert gm.get_submodule("adapters.model.layers.1.self_attn.v_proj.a").lora_B.shape == (2, dh)


def test_gpt2_fused_c_attn_removal_equals_masking(tmp_path):
    gm, kwargs = fresh_capture("gpt2")
    with_lora(gm, ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"])
    masked = copy.deepcopy(gm)
    run_pass(gm, "prune", tmp_path, heads=1, ffn=0.25, method="random", seed=3)
    dh = 16
    for layer, heads in removed(tmp_path, "heads").items():  # Conv1D weights are [in, out]: input rows
        silence(masked, f"{layer}.c_proj.weight", 0, [h * dh + i for h in heads for i in range(dh)])
    for layer, neurons in removed(tmp_path, "ffn").items():
        silence(masked, f"{layer}.c_proj.weight", 0, neurons)
    assert (outputs(gm, kwargs) - outputs(masked, kwargs)).abs().max() <= ATOL
    assert gm.get_parameter("transformer.h.0.attn.c_attn.weight").shape == (64, 3 * 48)


def test_bert_removal_equals_masking(tmp_path):
    gm, kwargs = fresh_capture("bert")
    masked = copy.deepcopy(gm)
    run_pass(gm, "prune", tmp_path, heads=2, ffn=0.5, exempt=["encoder.layer.0.*"])
    heads, ffn = removed(tmp_path, "heads"), removed(tmp_path, "ffn")
    assert list(heads) == ["encoder.layer.1.attention"] and list(ffn) == ["encoder.layer.1"]
    silence(masked, "encoder.layer.1.attention.output.dense.weight", 1,
            [h * 16 + i for h in heads["encoder.layer.1.attention"] for i in range(16)])
    silence(masked, "encoder.layer.1.output.dense.weight", 1, ffn["encoder.layer.1"])
    assert (outputs(gm, kwargs) - outputs(masked, kwargs)).abs().max() <= ATOL
    assert gm.get_parameter("encoder.layer.0.attention.self.query.weight").shape == (64, 64)  # exempt


def test_cnn_removal_equals_masking(tmp_path):
    x = {"x": torch.randn(2, 3, 8, 8)}
    gm = capture_module(resnet_tiny(), x)
    with_lora(gm, ["layer1.conv2", "layer2.conv2"])
    masked = copy.deepcopy(gm)
    result = run_pass(gm, "prune", tmp_path, channels=0.5)
    assert result.stats["channels_removed"] == 4 + 8  # layer1.conv1, layer2.conv1; residual ones are tied
    for group, channels in removed(tmp_path, "channels").items():
        block = group.rpartition(".")[0]
        silence(masked, f"{block}.conv2.weight", 1, channels, adapters=False)
        with torch.no_grad():  # LoRA-conv A [r, c_in, kh, kw]: its input channels
            masked.get_parameter(f"adapters.{block}.conv2.a.lora_A")[:, channels] = 0.0
    assert (outputs(gm, x) - outputs(masked, x)).abs().max() <= ATOL
    assert gm.get_buffer("layer1.bn1.running_mean").shape == (4,)


# --------------------------------------------------------------------------- targets and selection

def test_zero_target_is_the_identity():
    gm, kwargs = fresh_capture("llama")
    before, nodes = outputs(gm, kwargs), len(gm.graph.nodes)
    result = run_pass(gm, "prune", heads=0.0, ffn=0, report="")
    assert not result.modified and len(gm.graph.nodes) == nodes
    assert torch.equal(outputs(gm, kwargs), before)


def test_pruning_twice_is_idempotent_and_the_scores_deterministic(tmp_path):
    x = {"x": torch.randn(2, 6, 32)}
    gm, other = capture_module(attention(), x), capture_module(attention(), x)
    assert run_pass(gm, "prune", tmp_path, heads=1, ffn=0.25, method="random", seed=5).modified
    first_plan = json.loads((tmp_path / "prune.json").read_text())["groups"]
    after = {n: p.clone() for n, p in gm.named_parameters()}
    again = run_pass(gm, "prune", tmp_path, heads=1, ffn=0.25, method="random", seed=5)
    assert not again.modified
    assert all(torch.equal(p, after[n]) for n, p in gm.named_parameters())
    run_pass(other, "prune", tmp_path, heads=1, ffn=0.25, method="random", seed=5)
    assert json.loads((tmp_path / "prune.json").read_text())["groups"] == first_plan
    assert torch.equal(outputs(gm, x), outputs(other, x))


def test_magnitude_removes_the_smallest_heads(tmp_path):
    x = {"x": torch.randn(2, 6, 32)}
    model = attention().requires_grad_(False)
    gm = capture_module(model, x)
    run_pass(gm, "prune", tmp_path, heads=2)
    dh, norms = 8, []
    for h in range(4):  # hand-computed: every weight and bias entry of the head
        rows = slice(h * dh, (h + 1) * dh)
        total = sum(float(p.weight[rows].pow(2).sum() + p.bias[rows].pow(2).sum()) for p in (model.q, model.k, model.v))
        norms.append(total + float(model.o.weight[:, rows].pow(2).sum()))
    report = json.loads((tmp_path / "prune.json").read_text())
    row = next(r for r in report["groups"] if r["structure"] == "heads")
    assert row["scores"] == pytest.approx([n ** 0.5 for n in norms], rel=1e-6)
    assert [int(r.split()[1]) for r in row["removed"]] == sorted(sorted(range(4), key=lambda h: norms[h])[:2])


def test_global_scope_keeps_one_unit_per_layer(tmp_path):
    gm, kwargs = fresh_capture("bert")
    result = run_pass(gm, "prune", tmp_path, ffn=0.75, scope="global", method="random")
    assert result.stats["ffn_removed"] == int(0.75 * 2 * 128)
    kept = [row["units_after"] for row in json.loads((tmp_path / "prune.json").read_text())["groups"]]
    assert sum(kept) == 64 and min(kept) >= 1
    assert outputs(gm, kwargs).shape == (2, 16, 64)


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("value, message", [(1.5, "a fraction must be in \\[0, 1\\)"), (1.0, "every unit"),
                                            (-2, "a count must be >= 0")])
def test_bad_targets_name_the_key(value, message):
    from rewrite.spec import parse_spec

    with pytest.raises(SpecError, match=message) as err:
        parse_spec(f'version = 1\n[[pass]]\nname = "prune"\nheads = {value}\n')
    assert "'pass[0].heads'" in str(err.value)


def test_infeasible_requests_are_errors():
    gm, _ = fresh_capture("llama")
    with pytest.raises(SpecError, match="removes 4 of the 4 heads of model.layers.0.self_attn; at least one must "
                                        "stay") as err:
        run_pass(gm, "prune", heads=4, keys=True)
    assert "(heads)" in str(err.value)
    with pytest.raises(SpecError, match=r"\(heads\): heads = 1 removes nothing from the 2 groups it reaches \(1 "
                                        r"rounded down to 0: query heads go evenly per KV head\)"):
        run_pass(gm, "prune", heads=1, keys=True)  # 4 query heads on 2 KV heads: one is less than one per KV head
    with pytest.raises(SpecError, match=r"\(ffn\): ffn = 0.005 removes nothing from the 2 groups it reaches \(it "
                                        r"rounds down to 0 of 128 units in model.layers.0.mlp\)"):
        run_pass(gm, "prune", ffn=0.005, keys=True)
    cnn = capture_module(resnet_tiny(), {"x": torch.randn(2, 3, 8, 8)})
    with pytest.raises(SpecError, match=r"\(layers\): channels of layer1.conv2\+stem cannot be pruned: a residual "
                                        "add"):
        run_pass(cnn, "prune", channels=2, layers=["stem"], keys=True)
    with pytest.raises(SpecError, match=r"\(heads\): heads = 1, but no group of heads can be pruned here"):
        run_pass(cnn, "prune", heads=1, keys=True)
    with pytest.raises(SpecError, match=r"kv_heads = 1, but no group of kv_heads can be pruned here \(groups: "
                                        r"encoder.layer.0.attention \(ok\)"):
        run_pass(fresh_capture("bert")[0], "prune", kv_heads=1, keys=True)
    with pytest.raises(SpecError, match="selector 'nothing_here' matches no site"):
        run_pass(cnn, "prune", channels=1, exempt=["nothing_here"], keys=True)


def test_an_adapter_that_cannot_be_sliced_is_an_error_unless_exempt():
    gm, _ = fresh_capture("llama")
    run_pass(gm, "insert", adapter="r", kind="oft", targets=["model.layers.1.self_attn.o_proj"],
             options={"block_size": 4})
    with pytest.raises(SpecError, match="oft adapters cannot be sliced"):
        run_pass(gm, "prune", heads=2, report="")
    assert run_pass(gm, "prune", heads=2, exempt=["model.layers.1.*"], report="").stats["heads_removed"] == 2


# --------------------------------------------------------------------------- export

def test_pruned_attention_exports_merged_onnx(tmp_path):
    x = {"x": torch.randn(2, 6, 32)}
    gm = with_lora(capture_module(attention(), x), ["q", "v", "o", "fc1"])
    run_pass(gm, "prune", heads=2, ffn=0.5, report="")
    got = merged_onnx_output(gm, x, tmp_path / "model.onnx")
    assert got.shape == (2, 6, 32)
    assert (got - outputs(gm, x)).abs().max() <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_pruned_decoder_exports_merged_onnx(tmp_path, name):
    gm, kwargs = fresh_capture(name)
    with_lora(gm, ["re:.*(proj|c_attn|c_fc)"])
    run_pass(gm, "prune", heads=0.5, ffn=0.25, report="")
    got = merged_onnx_output(gm, kwargs, tmp_path / "model.onnx")
    assert (got - outputs(gm, kwargs)).abs().max() <= 1e-4


@pytest.mark.slow
def test_apply_prunes_and_exports_unmerged(tmp_path, hf_dir):
    from rewrite.cli import main

    spec = tmp_path / "spec.toml"
    spec.write_text('version = 1\n[[pass]]\nname = "insert"\nadapter = "a"\ntargets = ["c_attn", "c_fc"]\nrank = 2\n'
                    'init = "gaussian"\n[[pass]]\nname = "prune"\nheads = 0.5\nffn = 0.25\n'
                    '[export]\nmode = "unmerged"\nswitching = "bank"\n')
    assert main(["apply", str(spec), str(hf_dir("gpt2")), "-o", str(tmp_path / "out"), "--check", "--json"]) == 0
    assert (tmp_path / "out" / "prune.md").is_file() and (tmp_path / "out" / "model.onnx").is_file()
