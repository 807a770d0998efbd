"""Trainable tokens against Hugging Face PEFT's TrainableTokens on the same base and the same trained rows.

Oracle: `peft.get_peft_model(model, TrainableTokensConfig(token_indices=...))` on a tiny LLaMA (untied) and a tiny
BERT, its rows `trainable_tokens_delta` moved off their init (random), copied into ours. Forward, gradients, saved
directories both ways, `merge_and_unload` (bit for bit), merged ONNX under ONNX Runtime; the refusals (tied
embeddings, unmerged export, bad token ids, a target that is no embedding, broken directories).
LoRA directories with `trainable_token_indices` (rows beside the LoRA modules, list and object forms): load and
merge equal PEFT (and `rewrite merge`, the streaming merge, bit for bit on the table); they save back as PEFT writes
them; rows that disagree with the config, and hot-adding such a directory to a running export, are refused.
"""
from __future__ import annotations

import copy
import json
import functools
import re

import pytest
import torch
import transformers

from rewrite.adapters.trainable_tokens import KEY
from rewrite.capture import capture
from rewrite.errors import AdapterFileError, RewriteError, SpecError
from rewrite.graph_edit import adapters_at
from rewrite.inputs import example_inputs
from rewrite.load import LoadedModel
from rewrite.options import CaptureOptions
from rewrite.runtime.session import AdapterSession
from rewrite.state import state_of
from rewrite.streaming_merge import merge_checkpoint

from helpers import edit_json, fill_adapter, first_output, peft_reloaded
from helpers import run_pass as run
from models import build

peft = pytest.importorskip("peft")

TOKENS = [3, 17, 64, 127]  # 127: the table's last row
EMBEDDING = {"llama": "model.embed_tokens", "bert": "embeddings.word_embeddings"}
MOVED = {KEY: (0.0, 0.5)}


def _tied_llama():
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_key_value_heads=2,
                                      max_position_embeddings=64, use_cache=False, num_hidden_layers=2,
                                      num_attention_heads=4, vocab_size=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _inputs(kwargs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The example inputs with every trained token among the ids (ids the adapter leaves alone around them)."""
    ids = torch.randint(0, 128, kwargs["input_ids"].shape, generator=torch.Generator().manual_seed(5))
    ids[:, ::3] = torch.tensor(TOKENS).repeat(ids.shape[1])[:ids[:, ::3].shape[1]]
    return {**kwargs, "input_ids": ids}


@functools.cache
def _captured(name: str):
    model = _tied_llama() if name == "tied" else build(name)
    inputs = example_inputs(model, model.config, CaptureOptions(), "<test>")
    gm, _ = capture(LoadedModel(model, None, "hf", name, model.config), inputs)
    return gm, _inputs(inputs.kwargs)


def _fresh(name: str):
    gm, kwargs = _captured(name)
    return copy.deepcopy(gm), kwargs


def _peft_model(name: str, seed: int = 3):
    model = _tied_llama() if name == "tied" else build(name)
    config = peft.TrainableTokensConfig(token_indices=TOKENS)  # target_modules: PEFT's default, the input embedding
    return fill_adapter(peft.get_peft_model(model, config), MOVED, seed=seed)


def _rows(theirs) -> torch.Tensor:
    (rows,) = [p for n, p in theirs.named_parameters() if KEY in n]
    return rows


def _ours(name: str, theirs, adapter: str = "tokens"):
    gm, kwargs = _fresh(name)
    result = run(gm, "insert", kind="trainable_tokens", targets=[EMBEDDING[name]], adapter=adapter,
                 options={"token_indices": TOKENS})
    assert result.modified and result.stats["params_added"] == len(TOKENS) * 64
    adapters_at(gm, EMBEDDING[name])[adapter].load_peft_state({KEY: _rows(theirs)})
    return gm, kwargs


@pytest.mark.parametrize("name", list(EMBEDDING))
def test_forward_save_and_merge_equal_peft(name, tmp_path):
    theirs = _peft_model(name)
    fresh, kwargs = _fresh(name)
    gm, _ = _ours(name, theirs)
    expected = first_output(theirs, kwargs)
    assert (expected - first_output(fresh, kwargs)).abs().max() > 1e-2  # the trained rows matter
    torch.testing.assert_close(first_output(gm, kwargs), expected, rtol=0, atol=1e-5)

    run(gm, "save", root=tmp_path, path="ours", adapter="tokens")
    again, said = peft_reloaded(tmp_path / "ours", name)
    assert not [w for w in said if "nexpected" in w or "issing" in w]
    torch.testing.assert_close(first_output(again, kwargs), expected, rtol=0, atol=1e-5)

    assert run(gm, "merge").stats["merged"] == 1
    merged = theirs.merge_and_unload()
    table = state_of(gm).sites[EMBEDDING[name]].weight
    assert torch.equal(gm.get_parameter(table), merged.get_input_embeddings().weight)  # PEFT's index_copy, exactly
    torch.testing.assert_close(first_output(gm, kwargs), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(EMBEDDING))
def test_load_reads_a_directory_peft_saved(name, tmp_path):
    theirs = _peft_model(name)
    theirs.save_pretrained(tmp_path / "peft")
    gm, kwargs = _fresh(name)
    result = run(gm, "load", root=tmp_path, path="peft", adapter="tokens")
    assert result.modified and result.stats["modules"] == 1
    module = adapters_at(gm, EMBEDDING[name])["tokens"]
    assert module.kind == "trainable_tokens" and module.token_indices == TOKENS
    torch.testing.assert_close(first_output(gm, kwargs), first_output(theirs, kwargs), rtol=0, atol=1e-5)
    assert not run(gm, "load", root=tmp_path, path="peft", adapter="tokens").modified


def test_rows_are_replaced_whatever_the_base_holds_there(tmp_path):
    """A directory sets its rows (PEFT replaces them): loaded onto a base whose rows differ, the output is the same
    as PEFT's on that base, and merge writes the saved rows themselves."""
    theirs = _peft_model("llama")
    theirs.save_pretrained(tmp_path / "peft")
    gm, kwargs = _fresh("llama")
    table = gm.get_parameter(state_of(gm).sites["model.embed_tokens"].weight)
    with torch.no_grad():
        table[TOKENS] += 1.0
    run(gm, "load", root=tmp_path, path="peft", adapter="tokens")
    torch.testing.assert_close(first_output(gm, kwargs), first_output(theirs, kwargs), rtol=0, atol=1e-5)
    run(gm, "merge")
    assert torch.equal(table[TOKENS], _rows(theirs))


def test_gradients_equal_peft_and_the_train_pass_moves_only_the_rows(tmp_path):
    """Oracle for training: the gradient of one loss w.r.t. the trained rows equals PEFT's. Then the generic train
    pass trains them (the loss falls) and, merged, only those rows of the table have changed."""
    import numpy as np

    from rewrite.options import DataOptions

    theirs = _peft_model("llama")
    gm, kwargs = _ours("llama", theirs)
    module = adapters_at(gm, "model.embed_tokens")["tokens"]
    target = torch.randint(0, 128, kwargs["input_ids"].shape, generator=torch.Generator().manual_seed(9))

    def loss(logits):
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 128), target.reshape(-1))

    theirs.train()
    loss(theirs(**kwargs).logits).backward()
    loss(gm(**kwargs)[0]).backward()
    assert _rows(theirs).grad.abs().max() > 1e-4
    torch.testing.assert_close(module.values.grad, _rows(theirs).grad, rtol=1e-4, atol=1e-6)

    module.values.grad = None
    np.savez(tmp_path / "data.npz", **{k: v.numpy() for k, v in kwargs.items()})
    table = state_of(gm).sites["model.embed_tokens"].weight
    before = {n: p.detach().clone() for n, p in gm.named_parameters() if not n.startswith("adapters.")}
    data = DataOptions(path="data.npz", loss="causal_lm", batch_size=2, steps=15, lr=1e-2, warmup=0.0)
    result = run(gm, "train", root=tmp_path, data=data)
    assert result.modified and result.stats["params"] == len(TOKENS) * 64
    assert result.stats["loss_final"] < result.stats["loss_first"]
    assert all(torch.equal(before[n], p) for n, p in gm.named_parameters() if n in before)  # the base stayed
    run(gm, "merge")
    changed = (gm.get_parameter(table) != before[table]).any(dim=1).nonzero().flatten()
    assert changed.tolist() == TOKENS


def test_merge_unmerge_round_trip_is_exact():
    gm, kwargs = _ours("bert", _peft_model("bert"))
    adapted = first_output(gm, kwargs)
    site = state_of(gm).sites["embeddings.word_embeddings"]
    before = gm.get_parameter(site.weight).detach().clone()
    module = adapters_at(gm, site.owner)["tokens"]
    run(gm, "merge", keep_original=True)
    torch.testing.assert_close(first_output(gm, kwargs), adapted, rtol=0, atol=1e-5)
    run(gm, "unmerge")
    assert torch.equal(gm.get_parameter(site.weight), before)
    weight = before.clone()
    module.merge_into(weight, None)
    assert torch.equal(weight[TOKENS], module.values.detach())
    module.unmerge_from(weight, None)  # the kind itself, without the kept copy
    assert torch.equal(weight, before)
    with torch.no_grad():  # a row another adapter already moved gets the delta v - o, as the unmerged graph adds it
        weight[TOKENS[0]] += 0.25
        module.merge_into(weight, None)
    expected = before[TOKENS[0]] + 0.25 + (module.values[0] - module.originals[0])
    torch.testing.assert_close(weight[TOKENS[0]], expected.detach(), rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EMBEDDING))
def test_merged_onnx_equals_peft(name, tmp_path):
    """Merged (folded) and inline ([export] mode = "merged" with the adapter live) ONNX under ONNX Runtime."""
    from helpers import merged_onnx_output

    theirs = _peft_model(name)
    gm, kwargs = _ours(name, theirs)
    want = first_output(theirs, kwargs)
    inline = merged_onnx_output(gm, kwargs, tmp_path / "inline.onnx")
    assert (inline - want).abs().max() <= 1e-4
    run(gm, "merge")
    assert (merged_onnx_output(gm, kwargs, tmp_path / "merged.onnx") - want).abs().max() <= 1e-4


def test_unmerged_export_and_allocate_refuse_it(tmp_path):
    from helpers import refusals

    gm, _ = _ours("llama", _peft_model("llama"))
    export, allocate = refusals(gm, "tokens", tmp_path)
    assert re.search(r"model\.embed_tokens: trainable_tokens adapters replace rows of an embedding table.*"
                     r"mode = \"merged\", which folds it", export)
    assert "trainable_tokens" in allocate


def test_tied_embeddings_are_refused(tmp_path):
    """PEFT adapts the tied output layer too (and saves its copy under lm_head): refused on insert and on load."""
    gm, _ = _fresh("tied")
    with pytest.raises(SpecError, match=r"site model\.embed_tokens: its table lm_head\.weight is also read by "
                                        r"lm_head \(tied embeddings\)"):
        run(gm, "insert", kind="trainable_tokens", targets=["embed_tokens"], options={"token_indices": TOKENS})
    theirs = _peft_model("tied")
    assert {n for n, m in theirs.named_modules() if type(m).__name__ == "TrainableTokensLayer"} == {
        "base_model.model.model.embed_tokens", "base_model.model.lm_head"}
    theirs.save_pretrained(tmp_path / "peft")
    gm, _ = _fresh("tied")
    with pytest.raises(AdapterFileError, match=r"lm_head\.trainable_tokens_delta is PEFT's tied copy of "
                                               r"model\.embed_tokens's rows.*not supported"):
        run(gm, "load", root=tmp_path, path="peft", adapter="tokens")
    edit_json(tmp_path / "peft" / "adapter_config.json", target_modules=["embed_tokens"])
    (tmp_path / "peft" / "adapter_model.safetensors").unlink()  # untied rows a tied model cannot take either
    _peft_model("llama").save_pretrained(tmp_path / "untied")
    with pytest.raises(SpecError, match=r"tied embeddings"):
        run(gm, "load", root=tmp_path, path="untied", adapter="tokens")


def test_a_table_read_by_another_op_is_refused():
    """Tied by hand (`h @ E.T`, no output-layer site): any op reading the table besides the embedding counts."""
    from helpers import capture_module

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.mix = torch.nn.Embedding(32, 16), torch.nn.Linear(16, 16)

        def forward(self, input_ids):
            return self.mix(self.emb(input_ids)) @ self.emb.weight.T

    torch.manual_seed(0)
    gm = capture_module(Toy().eval(), {"input_ids": torch.randint(0, 32, (2, 5))})
    with pytest.raises(SpecError, match=r"site emb: its table emb\.weight is also read by the op \w+ "
                                        r"\(tied embeddings\)"):
        run(gm, "insert", kind="trainable_tokens", targets=["emb"], options={"token_indices": [1]})


@pytest.mark.parametrize("options, message", [
    ({"token_indices": [3, 200]}, r"embeddings\.word_embeddings: token_indices \[200\] are outside the embedding's "
                                  r"128 rows"),
    ({"token_indices": [3, 5, 3]}, r"options\.token_indices: Value error, repeats the token ids \[3\]"),
    ({"token_indices": [-1]}, r"options\.token_indices: Value error, has the negative token ids \[-1\]"),
    ({"token_indices": []}, r"options\.token_indices: List should have at least 1 item"),
    ({"token_indices": [1.5]}, r"options\.token_indices\.0: Input should be a valid integer"),
    ({}, r"options\.token_indices: Field required"),
    ({"token_indices": [1], "rows": 2}, r"options\.rows: Extra inputs are not permitted"),
])
def test_bad_token_ids_are_refused(options, message):
    gm, _ = _fresh("bert")
    with pytest.raises((SpecError, ValueError), match=message):
        run(gm, "insert", kind="trainable_tokens", targets=["word_embeddings"], options=options)


def test_a_target_that_is_no_embedding_is_refused():
    gm, _ = _fresh("bert")
    with pytest.raises(SpecError, match=r"kind = \"trainable_tokens\" adapts embedding sites; .*query.* linear"):
        run(gm, "insert", kind="trainable_tokens", targets=["query"], options={"token_indices": [1]})


@pytest.mark.parametrize("change, message", [
    ({"token_indices": [3, 17, 64, 64]}, r"'token_indices': repeats the token ids \[64\]"),
    ({"token_indices": [3, 17, 64]}, r"model\.embed_tokens\.trainable_tokens_delta has shape \[4, 64\]; the config's "
                                     r"token_indices give 3 rows"),
    ({"token_indices": [3, 17, 64, 500]}, r"token_indices \[500\] are outside the embedding's 128 rows"),
    ({"token_indices": []}, r"'token_indices' is \[\]; expected a non-empty list"),
    ({"layers_to_transform": [0]}, r"'layers_to_transform' is set; layers_to_transform \(not a TrainableTokensConfig"),
    ({"modules_to_save": ["lm_head"]}, r"'modules_to_save' is set; modules_to_save \(not a TrainableTokensConfig "
                                       r"field: PEFT ignores it\)"),
    ({"target_modules": ["lm_head"]}, r"'target_modules' = \['lm_head'\] does not select 'model\.embed_tokens'"),
])
def test_broken_directories_are_refused(change, message, tmp_path):
    _peft_model("llama").save_pretrained(tmp_path / "peft")
    edit_json(tmp_path / "peft" / "adapter_config.json", **change)
    gm, _ = _fresh("llama")
    with pytest.raises(RewriteError, match=message):
        run(gm, "load", root=tmp_path, path="peft", adapter="tokens")


def test_one_adapter_saves_one_token_list(tmp_path):
    """PEFT's config holds one token_indices for every module: an adapter whose embeddings train different rows is
    refused by save, and one whose embeddings share them round-trips through PEFT."""
    gm, kwargs = _fresh("bert")
    run(gm, "insert", kind="trainable_tokens", targets=["word_embeddings"], options={"token_indices": [1, 2]})
    run(gm, "insert", kind="trainable_tokens", targets=["position_embeddings"], options={"token_indices": [4]},
        where="spec.toml:9")
    with pytest.raises(RewriteError, match=r"one token_indices list for every module.*\[\[1, 2\], \[4\]\]"):
        run(gm, "save", root=tmp_path, path="two", adapter="default")
    gm, kwargs = _fresh("bert")
    run(gm, "insert", kind="trainable_tokens", targets=["word_embeddings", "position_embeddings"],
        options={"token_indices": [3, 17, 40]})
    for owner in ("embeddings.word_embeddings", "embeddings.position_embeddings"):
        fill_adapter(adapters_at(gm, owner)["default"], {"values": (0.0, 0.5)}, seed=len(owner))
    run(gm, "save", root=tmp_path, path="both", adapter="default")
    again, _ = peft_reloaded(tmp_path / "both", "bert")
    torch.testing.assert_close(first_output(again, kwargs), first_output(gm, kwargs), rtol=0, atol=1e-5)


# ------------------------------------------------ LoRA's trainable_token_indices (rows beside the LoRA modules)

def _lora_with_tokens(indices, seed: int = 4):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                             trainable_token_indices=indices)
    return fill_adapter(peft.get_peft_model(build("llama"), config), MOVED, seed=seed)


@pytest.mark.parametrize("indices", [TOKENS, {"embed_tokens": TOKENS}])
def test_lora_with_trainable_token_indices_loads_and_merges_as_peft(indices, tmp_path):
    theirs = _lora_with_tokens(indices)
    theirs.save_pretrained(tmp_path / "peft")
    gm, kwargs = _fresh("llama")
    fresh = first_output(gm, kwargs)
    result = run(gm, "load", root=tmp_path, path="peft", adapter="chat")
    assert result.stats["modules"] == 2 * 2 + 1
    module = adapters_at(gm, EMBEDDING["llama"])["chat"]
    assert module.kind == "trainable_tokens" and module.token_indices == TOKENS
    expected = first_output(theirs, kwargs)
    assert (expected - fresh).abs().max() > 1e-2
    torch.testing.assert_close(first_output(gm, kwargs), expected, rtol=0, atol=1e-5)
    run(gm, "merge")
    torch.testing.assert_close(first_output(gm, kwargs), first_output(theirs.merge_and_unload(), kwargs),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("indices, message", [
    (TOKENS[:2], r"has shape \[4, 64\]; 'trainable_token_indices' gives 2 token ids"),
    ({"lm_head": TOKENS}, r"no rows \(token_adapter.trainable_tokens_delta\) for lm_head"),
])
def test_lora_token_rows_that_disagree_with_the_config_are_refused(indices, message, tmp_path):
    _lora_with_tokens(TOKENS).save_pretrained(tmp_path / "peft")
    edit_json(tmp_path / "peft" / "adapter_config.json", trainable_token_indices=indices)
    gm, _ = _fresh("llama")
    with pytest.raises(AdapterFileError, match=message):
        run(gm, "load", root=tmp_path, path="peft", adapter="chat")


def test_hot_adding_lora_with_token_rows_is_refused(deployment, tmp_path):
    _lora_with_tokens(TOKENS).save_pretrained(tmp_path / "peft")
    with AdapterSession(deployment("bank")) as served:
        with pytest.raises(AdapterFileError, match="trainable_token_indices"):
            served.add_adapter("chat", tmp_path / "peft")


def test_lora_with_token_rows_saves_back_as_peft_writes_it(tmp_path):
    theirs = _lora_with_tokens(TOKENS)
    theirs.save_pretrained(tmp_path / "peft")
    gm, kwargs = _fresh("llama")
    run(gm, "load", root=tmp_path, path="peft", adapter="chat")
    run(gm, "save", root=tmp_path, path="ours", adapter="chat")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["trainable_token_indices"] == {EMBEDDING["llama"]: TOKENS}
    again, said = peft_reloaded(tmp_path / "ours", "llama")
    assert not [w for w in said if "nexpected" in w or "issing" in w]
    torch.testing.assert_close(first_output(again, kwargs), first_output(theirs, kwargs), rtol=0, atol=1e-5)


def test_streaming_merge_writes_the_token_rows_as_peft_merges_them(tmp_path):
    theirs = _lora_with_tokens({"embed_tokens": TOKENS})
    theirs.save_pretrained(tmp_path / "peft")
    build("llama").save_pretrained(tmp_path / "base", max_shard_size="100KB")
    merge_checkpoint(tmp_path / "base", tmp_path / "peft", tmp_path / "out")
    ours = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    merged = theirs.merge_and_unload().state_dict()
    table = f"{EMBEDDING['llama']}.weight"
    assert torch.equal(ours[table], merged[table])  # PEFT's index_copy, bit for bit
    assert max((ours[k] - merged[k]).abs().max().item() for k in ours) <= 1e-6
