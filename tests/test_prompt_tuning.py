"""Prompt tuning against Hugging Face PEFT's PromptTuningConfig on the same virtual tokens.

Oracle: `peft.get_peft_model(model, PromptTuningConfig(...))` on a tiny LLaMA (CAUSAL_LM, GQA) and a tiny BERT
(FEATURE_EXTRACTION), its prompt set to seeded random values and copied into ours. Inputs are not the captured
example: another length (the dynamic axis) and a padded row (the mask growth matters). Outputs keep the virtual
positions on both sides. PEFT directories both ways; merge, switching exports and allocate refuse the kind by name.
A SEQ_CLS prompt on BertForSequenceClassification (PEFT trains the classifier too: modules_to_save) with token types
given: `rewrite apply` load + merged ONNX equals PEFT, and the directory saves back as PEFT reads it.
"""
from __future__ import annotations

import copy
import functools
import re

import pytest
import torch
from safetensors.torch import save_file

from rewrite.adapters.prompt_tuning import KEY
from rewrite.capture import capture
from rewrite.errors import AdapterFileError, SpecError
from rewrite.export.manifest import build_manifest
from rewrite.graph_edit import adapters_at, only_adapter
from rewrite.inputs import example_inputs
from rewrite.load import LoadedModel
from rewrite.options import CaptureOptions, InputSpec
from rewrite.passes import REGISTRY

from helpers import edit_json, fill_adapter, first_output, fresh_capture, merged_onnx_output, peft_reloaded, refusals
from helpers import run_pass as run
from models import build

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:Position ids are not supported", "ignore:Token type ids are not")

P = 5
TASKS = {"llama": "CAUSAL_LM", "bert": "FEATURE_EXTRACTION"}
OWNERS = {"llama": "model.embed_tokens", "bert": "embeddings.word_embeddings"}


def _inputs(name: str) -> dict[str, torch.Tensor]:
    """9 tokens (the capture saw 16), the second row left-padded by 3."""
    generator = torch.Generator().manual_seed(11)
    mask = torch.ones(2, 9, dtype=torch.int64)
    mask[1, :3] = 0
    return {"input_ids": torch.randint(0, 128, (2, 9), generator=generator), "attention_mask": mask}


def _peft_model(name: str):
    config = peft.PromptTuningConfig(task_type=TASKS[name], num_virtual_tokens=P)
    return fill_adapter(peft.get_peft_model(build(name), config), {"prompt_encoder": (0.0, 0.5)})


def _prompt(theirs) -> torch.Tensor:
    return theirs.prompt_encoder["default"].embedding.weight.detach()


def _ours(name: str, theirs):
    gm, _ = fresh_capture(name)
    result = run(gm, "insert", kind="prompt_tuning", targets=[OWNERS[name].rpartition(".")[2]], adapter="prompt",
                 options={"num_virtual_tokens": P, "task_type": TASKS[name]})
    assert result.stats["sites"] == 1 and result.stats["params_added"] == P * 64
    adapters_at(gm, OWNERS[name])["prompt"].load_peft_state({KEY: _prompt(theirs)})
    return gm


@pytest.mark.parametrize("name", list(TASKS))
def test_forward_equals_peft_virtual_positions_included(name):
    theirs = _peft_model(name)
    gm, inputs = _ours(name, theirs), _inputs(name)
    want = first_output(theirs, inputs)
    assert want.shape[:2] == (2, P + 9)
    base = first_output(build(name), inputs)
    assert (want[:, P:] - base).abs().max() > 1e-2  # the prompt matters to every real position
    got = first_output(gm, inputs)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    module = adapters_at(gm, OWNERS[name])["prompt"]
    with torch.no_grad():
        module.prompt.add_(1e-3 * torch.randn(P, 64))  # the check can fail: a nearby prompt is told apart
    assert (first_output(gm, inputs) - want).abs().max() > 1e-5
    plain = only_adapter(gm, None)  # unwiring restores the inputs, the embedding and the outputs
    torch.testing.assert_close(first_output(plain, inputs), first_output(fresh_capture(name)[0], inputs), rtol=0,
                               atol=0)


@functools.cache
def _bert_with_types_and_positions():
    model = build("bert")
    specs = [InputSpec(name=n, shape=[2, 16], dtype="int64", low=0, high=h, dims=["batch", "seq"])
             for n, h in (("input_ids", 128), ("attention_mask", 2), ("token_type_ids", 2), ("position_ids", 16))]
    inputs = example_inputs(model, model.config, CaptureOptions(inputs=specs), "<test>")
    gm, _ = capture(LoadedModel(model, None, "hf", "bert", model.config), inputs)
    return gm


def test_token_types_and_positions_grow_as_peft_treats_them():
    """FEATURE_EXTRACTION: PEFT drops given token_type_ids and position_ids (with warnings): zeros and the default
    positions over p + S; the graph inputs say otherwise and must lose."""
    theirs = _peft_model("bert")
    gm = copy.deepcopy(_bert_with_types_and_positions())
    run(gm, "insert", kind="prompt_tuning", targets=["word_embeddings"], adapter="prompt",
        options={"num_virtual_tokens": P, "task_type": "FEATURE_EXTRACTION"})
    adapters_at(gm, OWNERS["bert"])["prompt"].load_peft_state({KEY: _prompt(theirs)})
    inputs = {**_inputs("bert"), "token_type_ids": torch.ones(2, 9, dtype=torch.int64),
              "position_ids": torch.arange(3, 12).expand(2, 9).contiguous()}
    torch.testing.assert_close(first_output(gm, inputs), first_output(theirs, inputs), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(TASKS))
def test_peft_directories_both_ways(name, tmp_path):
    theirs = _peft_model(name)
    inputs = _inputs(name)
    want = first_output(theirs, inputs)
    gm = _ours(name, theirs)
    run(gm, "save", root=tmp_path, path="ours", adapter="prompt")
    again, said = peft_reloaded(tmp_path / "ours", name)
    assert not [w for w in said if "nexpected" in w or "issing" in w]
    torch.testing.assert_close(first_output(again, inputs), want, rtol=0, atol=1e-5)

    theirs.save_pretrained(tmp_path / "peft")
    fresh, _ = fresh_capture(name)
    result = run(fresh, "load", root=tmp_path, path="peft", adapter="prompt")
    assert result.modified and result.stats["modules"] == 1
    assert adapters_at(fresh, OWNERS[name])["prompt"].kind == "prompt_tuning"
    torch.testing.assert_close(first_output(fresh, inputs), want, rtol=0, atol=1e-5)
    assert not run(fresh, "load", root=tmp_path, path="peft", adapter="prompt").modified


def test_inits_are_random_or_vocabulary_rows_and_never_the_identity():
    gm, _ = fresh_capture("llama")
    insert = REGISTRY["insert"](REGISTRY["insert"].Options(kind="prompt_tuning", targets=["embed_tokens"],
                                                           options={"num_virtual_tokens": P}))
    assert not insert.preserves_outputs()  # --verify does not hold it to the outputs it changes
    run(gm, "insert", kind="prompt_tuning", targets=["embed_tokens"], adapter="vocab", init="sample_vocab",
        options={"num_virtual_tokens": P})
    rows = adapters_at(gm, "model.embed_tokens")["vocab"].prompt
    table = gm.get_parameter("model.embed_tokens.weight")
    assert all((table == row).all(dim=1).any() for row in rows)
    with pytest.raises(ValueError, match=r"init = 'text': kind = \"prompt_tuning\" starts from random, sample_vocab"):
        REGISTRY["insert"].Options(kind="prompt_tuning", targets=["embed_tokens"], init="text",
                                   options={"num_virtual_tokens": P})
    with pytest.raises(ValueError, match=r"options.num_virtual_tokens: Field required"):
        REGISTRY["insert"].Options(kind="prompt_tuning", targets=["embed_tokens"])


def test_sites_other_than_the_input_embedding_are_refused():
    bert, _ = fresh_capture("bert")
    with pytest.raises(SpecError, match=r"position_embeddings: prompt_tuning adapters attach to the model's input "
                                        r"embedding .*'embeddings.word_embeddings' here"):
        run(bert, "insert", kind="prompt_tuning", targets=["position_embeddings"], options={"num_virtual_tokens": 2})
    with pytest.raises(SpecError, match=r"kind = \"prompt_tuning\" adapts embedding sites; .* are linear"):
        run(bert, "insert", kind="prompt_tuning", targets=["query"], options={"num_virtual_tokens": 2})
    run(bert, "insert", kind="prompt_tuning", targets=["word_embeddings"], options={"num_virtual_tokens": 2})
    with pytest.raises(SpecError, match=r"prompt_tuning adapter 'default' already adds virtual tokens to this graph; "
                                        r"one sequence-changing adapter"):
        run(bert, "insert", kind="prompt_tuning", targets=["word_embeddings"], adapter="second",
            options={"num_virtual_tokens": 2})


def test_merge_switching_exports_and_allocate_refuse_it_by_name(tmp_path):
    gm = _ours("llama", _peft_model("llama"))
    export_error, allocate_error = refusals(gm, "prompt", tmp_path)
    assert re.search(r"embed_tokens: prompt_tuning adapters add virtual tokens .* cannot be folded .* nor switched "
                     r"in an unmerged export; export them inline with \[export\] mode = \"merged\"", export_error)
    assert "adapter 'prompt' is ['prompt_tuning']" in allocate_error, allocate_error
    with pytest.raises(SpecError, match=r"prompt_tuning adapter 'prompt' cannot be folded into the weights exactly; "
                                        r"export it with \[export\] mode = \"merged\", which keeps it inline"):
        run(gm, "merge")
    with pytest.raises(AdapterFileError, match="our adapter file holds LoRA adapters; save prompt_tuning as PEFT"):
        run(gm, "save", root=tmp_path, path="ours.safetensors", adapter="prompt", format="rewrite")
    live = build_manifest(gm, source="llama", exports=[]).adapters
    assert [(a.site, a.kind, a.state) for a in live] == [("model.embed_tokens", "prompt_tuning", "live")]


@pytest.mark.parametrize("change,message", [
    ({"num_transformer_submodules": 2}, r"'num_transformer_submodules' is 2; expected 1 \(one prompt"),
    ({"task_type": "SEQ_2_SEQ_LM"}, r"'task_type' is 'SEQ_2_SEQ_LM'; expected one of CAUSAL_LM"),
    ({"task_type": None}, r"'task_type': is null; PEFT applies no prompt without a task type"),
    ({"num_virtual_tokens": 7}, r"prompt_embeddings has shape \[5, 64\]; the config says \[num_virtual_tokens, "
                                r"token_dim\] = \[7, 64\]"),
    ({"modules_to_save": ["lm_head"]}, r"'modules_to_save' = \['lm_head'\] names 'lm_head' of this model, "
     r"but adapter_model.safetensors has no copy"),
])
def test_configs_it_does_not_implement_are_refused(change, message, tmp_path):
    _peft_model("llama").save_pretrained(tmp_path / "peft")
    edit_json(tmp_path / "peft" / "adapter_config.json", **change)
    gm, _ = fresh_capture("llama")
    with pytest.raises(AdapterFileError, match=message):
        run(gm, "load", root=tmp_path, path="peft", adapter="prompt")


def test_a_prompt_of_another_width_is_refused(tmp_path):
    _peft_model("llama").save_pretrained(tmp_path / "peft")
    edit_json(tmp_path / "peft" / "adapter_config.json", token_dim=None)
    save_file({KEY: torch.zeros(P, 32)}, tmp_path / "peft" / "adapter_model.safetensors")
    gm, _ = fresh_capture("llama")
    with pytest.raises(AdapterFileError, match=r"module 'model.embed_tokens': tensor shapes \{'prompt_embeddings': "
                                               r"\(5, 32\)\} do not fit this site \(expected .*\(5, 64\)"):
        run(gm, "load", root=tmp_path, path="peft", adapter="prompt")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TASKS))
def test_merged_onnx_keeps_the_prompt_inline(name, tmp_path):
    """The prompt is an initializer; ORT at another length than the export's example equals torch."""
    gm = _ours(name, _peft_model(name))
    want = first_output(gm, _inputs(name))
    got = merged_onnx_output(gm, _inputs(name), tmp_path / "m.onnx")
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-4


@pytest.mark.slow
def test_seq_cls_prompt_with_its_head_and_token_types_equals_peft(tmp_path, capsys):
    import json
    import warnings

    import numpy as np
    import onnxruntime as ort
    import transformers

    from helpers import cli, peft_reload, save_peft

    cls = transformers.BertForSequenceClassification
    config = transformers.BertConfig(hidden_size=64, intermediate_size=128, max_position_embeddings=64, num_labels=3,
                                     num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
    torch.manual_seed(0)
    cls(config).save_pretrained(tmp_path / "hf")

    def fresh():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls.from_pretrained(tmp_path / "hf").eval()

    adapter = save_peft(fresh(), peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P), tmp_path / "pt")
    assert "classifier" in json.loads((adapter / "adapter_config.json").read_text())["modules_to_save"]
    inputs = {**_inputs("bert"), "token_type_ids": torch.tensor([[0] * 4 + [1] * 5, [0] * 6 + [1] * 3])}
    with torch.no_grad():
        want = peft_reload(fresh(), adapter)(**inputs).logits.numpy()
        base = fresh()(**inputs).logits.numpy()
    assert np.abs(want - base).max() > 1e-2
    spec = tmp_path / "spec.toml"
    spec.write_text("version = 1\n" + "".join(
        f'[[capture.inputs]]\nname = "{name}"\nshape = [2, 16]\ndtype = "int64"\nhigh = {high}\n'
        'dims = ["batch", "seq"]\n' for name, high in (("input_ids", 128), ("attention_mask", 2), ("token_type_ids", 2)))
        + f'[[pass]]\nname = "load"\npath = {json.dumps(str(adapter))}\n'
        '[[pass]]\nname = "save"\npath = "again"\n')
    code, err = cli(capsys, "apply", spec, tmp_path / "hf", "-o", tmp_path / "out", "-q")
    assert code == 0, err
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {k: v.numpy() for k, v in inputs.items()})
    assert np.abs(got - want).max() <= 1e-5
    with torch.no_grad():
        again = peft_reload(fresh(), tmp_path / "out" / "again")(**inputs).logits.numpy()
    assert np.abs(again - want).max() <= 1e-5
