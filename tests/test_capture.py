"""Front-ends, model sources, sites, meta device and dynamic shapes, against eager torch / ONNX Runtime."""
import copy
import textwrap

import numpy as np
import onnxruntime as ort
import pytest
import torch

from rewrite.capture import capture, flat_outputs
from rewrite.errors import ExportError
from rewrite.inputs import example_inputs
from rewrite.load import LoadedModel
from rewrite.pipeline import apply, load_and_capture
from rewrite.spec import parse_spec
from rewrite.state import state_of

from factories import cnn_inputs_toml
from models import build

MLP_INPUTS = """
[[capture.inputs]]
name = "input"
shape = [4, 16]
dims = ["batch", ""]
"""


def _spec(text: str):
    return parse_spec("version = 1\n" + textwrap.dedent(text))


def _sites(gm):
    return state_of(gm).sites


@pytest.mark.parametrize("frontend", ["export", "fx"])
def test_factory_model_both_frontends_find_the_same_sites(frontend):
    spec = _spec(f'[capture]\nfrontend = "{frontend}"\n' + MLP_INPUTS)
    gm, loaded, report = load_and_capture("factories:mlp", spec)
    sites = _sites(gm)
    assert [(s.name, s.op, s.d_in, s.d_out, s.module_class) for s in sites.values()] == [
        ("0", "linear", 16, 32, "Linear"), ("2", "linear", 32, 8, "Linear")]
    assert report.replay_max_abs_diff == 0.0


def test_fx_frontend_inserts_and_merges_conv_and_embedding_exactly():
    spec = _spec('[capture]\nfrontend = "fx"\n' + cnn_inputs_toml(8, 8)
                 + '[[pass]]\nname = "insert"\ntargets = ["conv", "embed", "head"]\nrank = 2\n')
    gm, _, _ = load_and_capture("factories:cnn", spec)
    assert {s.op for s in _sites(gm).values()} == {"conv2d", "embedding", "linear"}
    from rewrite.passes import InsertPass, MergePass

    InsertPass(spec.passes[0].options)(gm)
    with torch.no_grad():
        for module in gm.adapters.modules():
            if hasattr(module, "lora_B"):
                module.lora_B.normal_()
                module.lora_A.normal_()
    inputs = state_of(gm).inputs.kwargs
    with torch.no_grad():
        unmerged = gm(**inputs)
        model = copy.deepcopy(gm)
        # independent oracle: each base weight plus its delta written out by hand
        conv, embed, head = model.adapters.conv.default, model.adapters.embed.default, model.adapters.head.default
        w_conv = (conv.lora_B.flatten(1) @ conv.lora_A.flatten(1)).view_as(model.conv.weight) * conv.scaling
        expected_conv = model.conv.weight + w_conv
        expected_embed = model.embed.weight + embed.lora_A @ embed.lora_B * embed.scaling
        expected_head = model.head.weight + (head.lora_A @ head.lora_B).T * head.scaling
    result = MergePass()(gm)
    assert result.modified and result.stats["merged"] == 3
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs), unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gm.conv.weight, expected_conv)
    torch.testing.assert_close(gm.embed.weight, expected_embed)
    torch.testing.assert_close(gm.head.weight, expected_head)
    assert not any(n.op == "call_module" and str(n.target).startswith("adapters") for n in gm.graph.nodes)


@pytest.mark.parametrize("frontend", ["export", "fx"])
def test_conv_lora_copies_the_base_conv_settings(frontend):
    """LoRA on a strided, dilated, padded conv: the same output from either front-end, equal to a hand-written
    forward base(x) + s * conv(conv(x, A, stride, padding, dilation), B) (torch.export keeps no conv attributes on
    its modules: the settings come from the aten.conv2d call)."""
    spec = _spec(f'[capture]\nfrontend = "{frontend}"\n' + cnn_inputs_toml(9, 7)
                 + '[[pass]]\nname = "insert"\ntargets = ["conv"]\nrank = 2\n')
    gm, loaded, _ = load_and_capture("factories:strided_cnn", spec)
    from rewrite.passes import InsertPass

    InsertPass(spec.passes[0].options)(gm)
    lora = gm.adapters.conv.default
    with torch.no_grad():
        lora.lora_A.normal_()
        lora.lora_B.normal_()
        inputs = state_of(gm).inputs.kwargs
        conv = loaded.module.conv
        settings = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
        hidden = torch.nn.functional.conv2d(inputs["x"], lora.lora_A, None, **settings)
        feature = conv(inputs["x"]) + lora.scaling * torch.nn.functional.conv2d(hidden, lora.lora_B)
        head = loaded.module.head
        expected = head(feature.mean(dim=(2, 3)) + loaded.module.embed(inputs["ids"]).mean(dim=1))
        torch.testing.assert_close(flat_outputs(gm(**inputs))[0], expected, atol=1e-5, rtol=1e-5)


def test_pt2_archive_is_loaded_without_code_and_captured(tmp_path):
    model = build("llama")
    ids = torch.randint(0, 128, (2, 8))
    program = torch.export.export(model, (), kwargs=dict(input_ids=ids), strict=False)
    torch.export.save(program, tmp_path / "llama.pt2")
    gm, loaded, report = load_and_capture(str(tmp_path / "llama.pt2"), _spec(""))
    assert loaded.kind == "pt2" and report.frontend == "pt2"
    assert len(_sites(gm)) == 21  # 16 weights and 5 RMSNorms (nn_module_stack survives the archive)
    with torch.no_grad():
        torch.testing.assert_close(flat_outputs(gm(input_ids=ids))[0], model(input_ids=ids).logits)


def test_gpt2_conv1d_sites_are_addmm_with_transposed_weight():
    model = build("gpt2")
    loaded = LoadedModel(model, None, "hf", "gpt2", model.config)
    inputs = example_inputs(model, model.config, _spec("").capture, "spec")
    gm, _ = capture(loaded, inputs)
    sites = _sites(gm)
    c_attn = sites["transformer.h.0.attn.c_attn"]
    assert (c_attn.op, c_attn.d_in, c_attn.d_out, c_attn.module_class) == ("conv1d", 64, 192, "Conv1D")
    assert sites["lm_head"].op == "linear"
    assert sum(s.op == "conv1d" for s in sites.values()) == 8


def test_meta_device_rewrites_without_weights_and_refuses_onnx(tmp_path):
    spec = _spec("""
        [capture]
        device = "meta"
        [[pass]]
        name = "insert"
        targets = ["*_proj"]
        rank = 4
    """)
    model_dir = tmp_path / "llama"
    build("llama").save_pretrained(model_dir)
    gm, loaded, _ = load_and_capture(str(model_dir), spec)
    assert all(p.is_meta for p in gm.parameters())
    from rewrite.passes import InsertPass

    result = InsertPass(spec.passes[0].options)(gm)
    assert result.stats["sites"] == 14 and all(p.is_meta for p in gm.adapters.parameters())
    with pytest.raises(ExportError, match="meta-device"):
        apply(spec, str(model_dir), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    no_export = _spec(spec.text.replace("version = 1\n", "") + '\n[export]\nformat = "none"\n')
    summary = apply(no_export, str(model_dir), tmp_path / "out")
    assert summary.files == ["manifest.json"]


@pytest.mark.slow
def test_dynamic_onnx_runs_at_other_sizes(tmp_path):
    spec = _spec("""
        [[pass]]
        name = "insert"
        targets = ["c_attn"]
        rank = 4
        init = "gaussian"
    """)
    model = build("gpt2")
    model.save_pretrained(tmp_path / "gpt2")
    apply(spec, str(tmp_path / "gpt2"), tmp_path / "out")
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.shape for i in session.get_inputs()] == [["batch", "seq"], ["batch", "seq"]]
    for batch, seq in ((3, 9), (1, 30)):
        ids = torch.randint(0, 128, (batch, seq))
        mask = torch.ones_like(ids)
        got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask).logits.numpy()
        np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.slow
def test_external_data_export_loads_in_onnx_runtime(tmp_path):
    spec = _spec("""
        [capture]
        dynamic = false
        [[pass]]
        name = "insert"
        targets = ["q_proj"]
        init = "gaussian"
        [export]
        external_data = "always"
        check = true
    """)
    build("llama").save_pretrained(tmp_path / "llama")
    summary = apply(spec, str(tmp_path / "llama"), tmp_path / "out")
    weights = sum(p.numel() * 4 for p in build("llama").parameters())
    assert (tmp_path / "out" / "model.onnx.data").stat().st_size > weights // 2  # the big tensors moved out
    assert summary.check_max_abs_diff < 1e-5
