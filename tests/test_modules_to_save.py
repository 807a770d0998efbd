"""PEFT's `modules_to_save` (whole layers trained beside any tuner; the head of every SEQ_CLS adapter), against PEFT
reloading the same directory onto the same base weights (rewrite/adapters/full.py, passes/load.py rule 9).

1. (slow, BertForSequenceClassification) A SEQ_CLS LoRA (query / value + the classifier PEFT adds to modules_to_save),
   every tensor moved off its init: `rewrite apply` load + merge, merged ONNX equals PEFT (<= 1e-5); `rewrite bundle`
   of two such adapters serves each row of a batch (a, base, b) as PEFT with that adapter, and the base model;
   load + save writes a directory PEFT reloads to the same logits; `rewrite merge` (the streaming merge) of a
   sharded checkpoint equals PEFT's merge_and_unload tensor for tensor (the head replaced by its copy).
2. (slow, RobertaForSequenceClassification) The classification head (two Linears: dense, out_proj) and the
   embeddings' LayerNorm (an `ln_tuning` copy) beside IA3: load + merge, and per row in a custom-op export, as PEFT.
3. (slow, GPT-2) Conv1D copies (`mlp.c_proj`, every layer) beside LoRA on c_attn, and the token embedding copied:
   merge equals PEFT; the unmerged export refuses the embedding copy by name, and serves the Conv1D copies per row
   once the embedding is left out.
4. (fast, DeepMLP) `insert kind = "full"` beside a LoRA: the torch graph equals the hand-written layer
   x (W + dW)^T + b + db; save writes modules_to_save that PEFT reloads to the same outputs; merge equals the
   unmerged graph; an adapter of copies alone has no PEFT form (refused, naming why).
5. (fast, DeepMLP) Refused with exit 2 naming the file and module: a copy of another shape (num_labels), a copied
   tensor that no site holds (a BatchNorm statistic), a module named by modules_to_save with no copy in the file, a
   module with both LoRA tensors and a copy; the runtime's hot add of such a directory is refused too.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rewrite.errors import AdapterFileError
from rewrite.runtime.session import AdapterSession
from rewrite.state import ADAPTER_ROOT

from factories import cnn, mlp4
from helpers import capture_module, cli, diff, peft_reload, run_pass, save_peft

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

ATOL = 1e-5
SMALL = dict(hidden_size=64, intermediate_size=128, max_position_embeddings=64, num_hidden_layers=2,
             num_attention_heads=4, vocab_size=128)
IDS_INPUT = ('[[capture.inputs]]\nname = "input_ids"\nshape = [2, 8]\ndtype = "int64"\nhigh = 128\n'
             'dims = ["batch", "seq"]\n')
MLP_INPUTS = '[[capture.inputs]]\nname = "x"\nshape = [4, 3, 64]\ndims = ["batch", "seq", ""]\n'

pytestmark = pytest.mark.usefixtures("one_thread")


def _saved_model(cls, config, path: Path) -> Path:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cls(config).save_pretrained(path)
    return path


def _fresh(cls, path: Path) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_pretrained(path).eval()


def _logits(model, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=ids).logits.double().numpy()


def _merged_onnx(out: Path, ids: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"input_ids": ids.numpy()})[0]


def _served_feeds(ids: torch.Tensor) -> dict[str, np.ndarray]:
    """What `rewrite bundle`'s export of a transformers model takes: the ids and their attention mask."""
    return {"input_ids": ids.numpy(), "attention_mask": np.ones(ids.shape, np.int64)}


def _merge_spec(tmp_path: Path, adapter: Path) -> Path:
    spec = tmp_path / "merge.toml"
    spec.write_text(f'version = 1\n{IDS_INPUT}[[pass]]\nname = "load"\npath = {json.dumps(str(adapter))}\n'
                    '[[pass]]\nname = "merge"\n')
    return spec


# ------------------------------------------------------------------------- 1. a SEQ_CLS LoRA on BERT

@pytest.mark.slow
def test_seq_cls_lora_merges_serves_per_row_and_saves_as_peft(tmp_path, capsys):
    cls = transformers.BertForSequenceClassification
    hf = _saved_model(cls, transformers.BertConfig(num_labels=3, **SMALL), tmp_path / "hf")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    a = save_peft(_fresh(cls, hf), config, tmp_path / "a", seed=1)
    b = save_peft(_fresh(cls, hf), config, tmp_path / "b", seed=2)
    saved = json.loads((a / "adapter_config.json").read_text())["modules_to_save"]
    assert "classifier" in saved  # PEFT added the head
    ids = torch.randint(0, 128, (3, 8), generator=torch.Generator().manual_seed(0))
    base = _logits(_fresh(cls, hf), ids)
    want = {name: _logits(peft_reload(_fresh(cls, hf), d), ids) for name, d in (("a", a), ("b", b))}
    assert min(diff(want["a"], base), diff(want["b"], base), diff(want["a"], want["b"])) > 1e-3

    code, err = cli(capsys, "apply", _merge_spec(tmp_path, a), hf, "-o", tmp_path / "merged", "-q")
    assert code == 0, err
    assert diff(_merged_onnx(tmp_path / "merged", ids), want["a"]) <= ATOL

    code, err = cli(capsys, "bundle", hf, "--adapter", f"a={a}", "--adapter", f"b={b}", "-o", tmp_path / "rows", "-q")
    assert code == 0, err
    with AdapterSession(tmp_path / "rows") as served:
        (got, *_) = served.run(_served_feeds(ids), adapter_ids=["a", None, "b"])
    assert max(diff(got[0], want["a"][0]), diff(got[1], base[1]), diff(got[2], want["b"][2])) <= ATOL

    spec = tmp_path / "save.toml"
    spec.write_text(f'version = 1\n{IDS_INPUT}[[pass]]\nname = "load"\npath = {json.dumps(str(a))}\n'
                    '[[pass]]\nname = "save"\npath = "again"\n[export]\nformat = "none"\n')
    code, err = cli(capsys, "apply", spec, hf, "-o", tmp_path / "saved", "-q")
    assert code == 0, err
    again = tmp_path / "saved" / "again"
    assert json.loads((again / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    assert diff(_logits(peft_reload(_fresh(cls, hf), again), ids), want["a"]) <= ATOL

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fresh(cls, hf).save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    code, err = cli(capsys, "merge", tmp_path / "sharded", "--adapter", a, "-o", tmp_path / "streamed", "-q")
    assert code == 0, err
    ours = _fresh(cls, tmp_path / "streamed").state_dict()
    theirs = peft_reload(_fresh(cls, hf), a).merge_and_unload().state_dict()
    assert ours.keys() == theirs.keys()
    assert max(diff(ours[k], theirs[k]) for k in ours) <= 1e-6
    assert diff(ours["classifier.weight"], _fresh(cls, hf).classifier.weight.detach()) > 1e-3


# ------------------------------------------------------ 2. a two-Linear head and a LayerNorm beside IA3 (RoBERTa)

@pytest.mark.slow
def test_classification_head_and_norm_copies_beside_ia3(tmp_path, capsys):
    cls = transformers.RobertaForSequenceClassification
    config = transformers.RobertaConfig(num_labels=2, pad_token_id=1, **{**SMALL, "max_position_embeddings": 72})
    hf = _saved_model(cls, config, tmp_path / "hf")
    ia3 = peft.IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"],
                         modules_to_save=["classifier", "embeddings.LayerNorm"], init_ia3_weights=False)
    adapter = save_peft(_fresh(cls, hf), ia3, tmp_path / "ia3")
    ids = torch.randint(2, 128, (3, 8), generator=torch.Generator().manual_seed(1))
    want = _logits(peft_reload(_fresh(cls, hf), adapter), ids)
    base = _logits(_fresh(cls, hf), ids)
    assert diff(want, base) > 1e-3

    code, err = cli(capsys, "apply", _merge_spec(tmp_path, adapter), hf, "-o", tmp_path / "merged", "-q")
    assert code == 0, err
    assert diff(_merged_onnx(tmp_path / "merged", ids), want) <= ATOL

    code, err = cli(capsys, "bundle", hf, "--adapter", f"t={adapter}", "--switching", "custom-op", "-o",
                    tmp_path / "rows", "-q")
    if code == 2 and "custom-op library" in err:
        pytest.skip(err)
    assert code == 0, err
    with AdapterSession(tmp_path / "rows") as served:
        (got, *_) = served.run(_served_feeds(ids), adapter_ids=[None, "t", "t"])
    assert max(diff(got[0], base[0]), diff(got[1:], want[1:])) <= ATOL


# ------------------------------------------------------------- 3. Conv1D and embedding copies (GPT-2)

@pytest.mark.slow
def test_conv1d_and_embedding_copies_on_gpt2(tmp_path, capsys):
    cls = transformers.GPT2LMHeadModel
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=128,
                                     tie_word_embeddings=False)
    hf = _saved_model(cls, config, tmp_path / "hf")
    lora = dict(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False, fan_in_fan_out=True)
    both = save_peft(_fresh(cls, hf), peft.LoraConfig(modules_to_save=["mlp.c_proj", "wte"], **lora), tmp_path / "b")
    conv = save_peft(_fresh(cls, hf), peft.LoraConfig(modules_to_save=["mlp.c_proj"], **lora), tmp_path / "c", seed=7)
    ids = torch.randint(0, 128, (3, 8), generator=torch.Generator().manual_seed(2))
    want = {d.name: _logits(peft_reload(_fresh(cls, hf), d), ids) for d in (both, conv)}
    base = _logits(_fresh(cls, hf), ids)

    code, err = cli(capsys, "apply", _merge_spec(tmp_path, both), hf, "-o", tmp_path / "merged", "-q")
    assert code == 0, err
    assert diff(_merged_onnx(tmp_path / "merged", ids), want["b"]) <= ATOL

    code, err = cli(capsys, "bundle", hf, "--adapter", f"b={both}", "-o", tmp_path / "refused", "-q")
    assert code == 2 and "Traceback" not in err and "transformer.wte" in err and "merge it" in err, err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a 256 x 64 copy's update is full-rank: switching it warns that it costs more
        code, err = cli(capsys, "bundle", hf, "--adapter", f"c={conv}", "-o", tmp_path / "rows", "-q")
    assert code == 0, err
    with AdapterSession(tmp_path / "rows") as served:
        (got, *_) = served.run(_served_feeds(ids), adapter_ids=["c", None, "c"])
    assert max(diff(got[0], want["c"][0]), diff(got[1], base[1]), diff(got[2], want["c"][2])) <= ATOL


# ------------------------------------------------------------------- 4. insert kind = "full" (DeepMLP)

def _fill(gm, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in gm.get_submodule(ADAPTER_ROOT).named_parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))


def test_inserted_full_copy_is_the_trained_layer_and_saves_as_modules_to_save(tmp_path):
    model = mlp4()
    gm = capture_module(model, {"x": torch.randn(4, 3, 64)})
    run_pass(gm, "insert", adapter="t", targets=["layers.0"], kind="lora", rank=2, alpha=4)
    run_pass(gm, "insert", adapter="t", targets=["layers.2"], kind="full")
    _fill(gm, 3)
    full = gm.get_submodule(f"{ADAPTER_ROOT}.layers.2.t")  # the copy's deltas, in nn.Linear's layout
    x = torch.randn(5, 64)
    layer = model.layers[2]
    with torch.no_grad():
        expected = x @ (layer.weight + full.weight_delta).T + layer.bias + full.bias_delta
        assert diff(full(x) + layer(x), expected) <= 1e-6

    run_pass(gm, "save", tmp_path, adapter="t", path="peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["modules_to_save"] == ["layers.2"]
    x = torch.randn(4, 3, 64)
    with torch.no_grad():
        ours, plain = gm(x=x), mlp4()(x)
        theirs = peft_reload(mlp4(), tmp_path / "peft")(x)
    assert diff(ours, theirs) <= ATOL and diff(ours, plain) > 1e-3

    run_pass(gm, "merge", adapters=["t"])
    with torch.no_grad():
        assert diff(gm(x=x), ours) <= ATOL


def test_an_adapter_of_copies_alone_has_no_peft_form(tmp_path):
    gm = capture_module(mlp4(), {"x": torch.randn(4, 3, 64)})
    run_pass(gm, "insert", adapter="t", targets=["layers.2"], kind="full")
    with pytest.raises(AdapterFileError, match="only as modules_to_save beside another tuner"):
        run_pass(gm, "save", tmp_path, adapter="t", path="peft")
    assert not (tmp_path / "peft").exists()


# ------------------------------------------------------------------------------ 5. refusals (DeepMLP)

def _with_copy(path: Path, edit=None, also_saves: str | None = None) -> Path:
    """A LoRA directory on layers.0 with layers.3 saved whole; `edit(tensors)` changes the file afterwards, and
    `also_saves` is added to the config's modules_to_save."""
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["layers.0"], modules_to_save=["layers.3"])
    directory = save_peft(mlp4(), config, path)
    if also_saves:
        raw = json.loads((directory / "adapter_config.json").read_text())
        (directory / "adapter_config.json").write_text(json.dumps({**raw, "modules_to_save": ["layers.3", also_saves]}))
    if edit is not None:
        tensors = load_file(directory / "adapter_model.safetensors")
        edit(tensors)
        save_file(tensors, directory / "adapter_model.safetensors")
    return directory


def _other_shape(tensors):
    tensors["base_model.model.layers.3.weight"] = torch.zeros(5, 64)
    tensors["base_model.model.layers.3.bias"] = torch.zeros(5)


REFUSED = {
    "other_shape": (lambda p: _with_copy(p, _other_shape), ["module 'layers.3'", "another num_labels"]),
    "no_site": (lambda p: _with_copy(p, lambda t: t.update({"base_model.model.layers.3.running_mean":
                                                                torch.zeros(64)})),
                ["layers.3.running_mean", "has weight and bias only"]),
    "missing": (lambda p: _with_copy(p, lambda t: [t.pop(k) for k in list(t) if ".layers.3." in k]),
                ["'modules_to_save' = ['layers.3'] names 'layers.3'", "has no copy of it"]),
    "both": (lambda p: _with_copy(p, lambda t: t.update({"base_model.model.layers.0.weight": torch.zeros(64, 64)}),
                                  also_saves="layers.0"),
             ["module 'layers.0' holds both LORA tensors and a modules_to_save copy"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_copies_that_do_not_fit_exit_2_naming_the_module(case, tmp_path, capsys):
    make, expected = REFUSED[case]
    directory = make(tmp_path / "adapter")
    spec = tmp_path / "spec.toml"
    spec.write_text(f'version = 1\n{MLP_INPUTS}[[pass]]\nname = "load"\npath = {json.dumps(str(directory))}\n')
    code, err = cli(capsys, "apply", spec, "factories:mlp4", "-o", tmp_path / "out", "-q")
    assert code == 2 and "Traceback" not in err and "internal error" not in err, err
    assert str(directory) in err
    for text in expected:
        assert text in err, (text, err)
    assert not (tmp_path / "out").exists()


def test_hot_adding_a_directory_with_copies_is_refused(deployment, tmp_path):
    directory = _with_copy(tmp_path / "adapter")
    with AdapterSession(deployment("bank")) as served:
        with pytest.raises(AdapterFileError, match="modules_to_save"):
            served.add_adapter("copied", directory)


def test_allocate_resizes_the_lora_beside_a_copy_and_keeps_the_copy(tmp_path):
    gm = capture_module(mlp4(), {"x": torch.randn(4, 3, 64)})
    run_pass(gm, "insert", adapter="t", targets=["layers.0", "layers.1"], kind="lora", rank=8, alpha=16)
    run_pass(gm, "insert", adapter="t", targets=["layers.3"], kind="full")
    _fill(gm, 5)
    full = gm.get_submodule(f"{ADAPTER_ROOT}.layers.3.t")
    before = full.weight_delta.detach().clone()
    result = run_pass(gm, "allocate", tmp_path, adapter="t", budget={"fraction": 0.5}, report="")
    ranks = [gm.get_submodule(f"{ADAPTER_ROOT}.layers.{i}.t").rank for i in (0, 1)]
    assert result.stats["sites"] == 2 and sum(ranks) < 16
    assert gm.get_submodule(f"{ADAPTER_ROOT}.layers.3.t") is full and torch.equal(full.weight_delta, before)


def test_copies_beside_a_tuner_whose_directory_cannot_hold_them_are_refused(tmp_path):
    gm = capture_module(cnn(), {"x": torch.randn(2, 3, 8, 8), "ids": torch.randint(0, 32, (2, 5))})
    run_pass(gm, "insert", adapter="t", targets=["embed"], kind="trainable_tokens", options={"token_indices": [1, 2]})
    run_pass(gm, "insert", adapter="t", targets=["head"], kind="full")
    with pytest.raises(AdapterFileError, match=r"TRAINABLE_TOKENS directories cannot hold modules_to_save "
                                               r".*\['head'\]"):
        run_pass(gm, "save", tmp_path, adapter="t", path="peft")
    assert not (tmp_path / "peft").exists()
