"""Prefix tuning against Hugging Face PEFT's PrefixTuningConfig (CAUSAL_LM) on a tiny LLaMA with GQA.

Our graph is the with-past capture (the prefix is the initial KV cache); PEFT's forward is a prefill. Oracles: PEFT's
logits for a padded prefill (our cache empty), and PEFT's last-position logits of the longer sequence for our decode
step that feeds back the `present` we returned (the prefix stripped from it, fed in once). Both with and without
`prefix_projection` (PEFT's MLP weights copied into ours), the table seeded random. PEFT directories both ways.
"""
from __future__ import annotations

import copy
import functools
import re

import pytest
import torch

from rewrite.decoder import cache_kwarg, capture_with_past, onnx_name
from rewrite.errors import AdapterFileError, SpecError
from rewrite.export.manifest import build_manifest
from rewrite.graph_edit import adapters_at, only_adapter
from rewrite.load import LoadedModel

from helpers import edit_json, fill_adapter, fresh_capture, peft_reloaded, refusals
from helpers import run_pass as run
from models import build

peft = pytest.importorskip("peft")

P, LAYERS, KV_HEADS, HEAD_DIM = 4, 2, 2, 16  # tiny LLaMA: 4 query heads, 2 KV heads, d = 64
LAYOUT = {"num_virtual_tokens": P, "num_layers": LAYERS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM}
OWNER = "model.embed_tokens"


@functools.cache
def _captured():
    model = build("llama")
    return capture_with_past(LoadedModel(copy.deepcopy(model), None, "hf", "llama", model.config))[0]


def _fresh():
    return copy.deepcopy(_captured())


def _prefill() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    mask = torch.ones(2, 6, dtype=torch.int64)
    mask[1, :2] = 0
    return torch.randint(0, 128, (2, 6), generator=generator), mask


def _feeds(ids, mask, past: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    seen = mask.shape[1] - ids.shape[1]
    feeds = {"input_ids": ids, "attention_mask": mask,
             "position_ids": torch.arange(seen, mask.shape[1]).expand(ids.shape[0], -1).contiguous()}
    for layer in range(LAYERS):
        for kind in ("key", "value"):
            feeds[cache_kwarg(layer, kind)] = past[f"present.{layer}.{kind}"] if past else torch.zeros(
                ids.shape[0], KV_HEADS, 0, HEAD_DIM)
    return feeds


def _peft_model(projection: bool):
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection,
                                     encoder_hidden_size=24 if projection else None)
    return fill_adapter(peft.get_peft_model(build("llama"), config), {"prompt_encoder": (0.0, 0.5)})


def _ours(theirs, projection: bool):
    gm = _fresh()
    options = {**LAYOUT, "prefix_projection": projection, **({"encoder_hidden_size": 24} if projection else {})}
    result = run(gm, "insert", kind="prefix_tuning", targets=["embed_tokens"], adapter="prefix", options=options)
    assert result.stats["sites"] == 1
    module, encoder = adapters_at(gm, OWNER)["prefix"], theirs.prompt_encoder["default"]
    with torch.no_grad():
        if projection:
            module.embedding.copy_(encoder.embedding.weight)
            module.transform.load_state_dict(encoder.transform.state_dict())
        else:
            module.prefix.copy_(encoder.embedding.weight)
    return gm


def _logits(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _check_prefill_and_step(gm, theirs) -> None:
    ids, mask = _prefill()
    with torch.no_grad():
        out = gm(**_feeds(ids, mask))
    want = _logits(theirs, ids, mask)
    assert (want - _logits(build("llama"), ids, mask)).abs().max() > 1e-2  # the prefix matters
    torch.testing.assert_close(out["logits"], want, rtol=0, atol=1e-5)
    assert out["present.0.key"].shape == (2, KV_HEADS, 6, HEAD_DIM)  # the caller's cache: no prefix in it
    step_ids = torch.tensor([[7], [9]])
    longer = torch.cat((mask, torch.ones(2, 1, dtype=torch.int64)), dim=1)
    with torch.no_grad():
        step = gm(**_feeds(step_ids, longer, out))["logits"][:, -1]
    want_step = _logits(theirs, torch.cat((ids, step_ids), dim=1), longer)[:, -1]
    torch.testing.assert_close(step, want_step, rtol=0, atol=1e-5)


@pytest.mark.parametrize("projection", [False, True], ids=["table", "prefix_projection"])
def test_prefill_and_decode_step_equal_peft(projection):
    theirs = _peft_model(projection)
    gm = _ours(theirs, projection)
    _check_prefill_and_step(gm, theirs)
    module = adapters_at(gm, OWNER)["prefix"]
    with torch.no_grad():  # the check can fail: a nearby prefix is told apart
        (module.transform[2].bias if projection else module.prefix).add_(1e-3)
        ids, mask = _prefill()
        assert (gm(**_feeds(ids, mask))["logits"] - _logits(theirs, ids, mask)).abs().max() > 1e-5
    plain = only_adapter(gm, None)  # unwiring restores the cache inputs, the mask, the positions and `present`
    with torch.no_grad():
        got, base = plain(**_feeds(ids, mask)), _captured()(**_feeds(ids, mask))
    assert all(torch.equal(got[k], base[k]) for k in base)


@pytest.mark.parametrize("projection", [False, True], ids=["table", "prefix_projection"])
def test_peft_directories_both_ways(projection, tmp_path):
    """A projected prefix is saved as the projection's output, which PEFT (and our load) read without the MLP."""
    theirs = _peft_model(projection)
    ids, mask = _prefill()
    want = _logits(theirs, ids, mask)
    gm = _ours(theirs, projection)
    run(gm, "save", root=tmp_path, path="ours", adapter="prefix")
    again, said = peft_reloaded(tmp_path / "ours", "llama")
    assert not [w for w in said if "nexpected" in w or "issing" in w]
    torch.testing.assert_close(_logits(again, ids, mask), want, rtol=0, atol=1e-5)

    theirs.save_pretrained(tmp_path / "peft")
    fresh = _fresh()
    result = run(fresh, "load", root=tmp_path, path="peft", adapter="prefix")
    assert result.modified and result.stats["modules"] == 1
    assert not adapters_at(fresh, OWNER)["prefix"].prefix_projection
    _check_prefill_and_step(fresh, theirs)
    assert not run(fresh, "load", root=tmp_path, path="peft", adapter="prefix").modified


def test_graphs_without_a_cache_or_of_another_layout_are_refused(tmp_path):
    plain, _ = fresh_capture("llama")
    with pytest.raises(SpecError, match=r"model.embed_tokens: prefix_tuning feeds its keys and values in as the "
                                        r"initial KV cache, .* use_cache = true"):
        run(plain, "insert", kind="prefix_tuning", targets=["embed_tokens"], options=LAYOUT)
    _peft_model(False).save_pretrained(tmp_path / "peft")
    with pytest.raises(SpecError, match=r"initial KV cache, and this graph has no cache inputs"):
        run(plain, "load", root=tmp_path, path="peft", adapter="prefix")
    with pytest.raises(SpecError, match=r"the adapter has num_layers = 3; the graph caches 2 layers"):
        run(_fresh(), "insert", kind="prefix_tuning", targets=["embed_tokens"], options={**LAYOUT, "num_layers": 3})
    with pytest.raises(SpecError, match=r"num_key_value_heads = 4, head_dim = 8; the graph's past_key_values_0_key "
                                        r"is \[batch, 2, past, 16\]"):
        run(_fresh(), "insert", kind="prefix_tuning", targets=["embed_tokens"],
            options={**LAYOUT, "num_key_value_heads": 4, "head_dim": 8})
    with pytest.raises(SpecError, match=r"prompt_tuning grows the inputs .*; this graph also takes past_key_values_0_"
                                        r"key.* \(a with-past capture: the prompt belongs to the prefill"):
        run(_fresh(), "insert", kind="prompt_tuning", targets=["embed_tokens"], options={"num_virtual_tokens": 2})


def test_merge_switching_exports_and_allocate_refuse_it_by_name(tmp_path):
    gm = _ours(_peft_model(False), False)
    export_error, allocate_error = refusals(gm, "prefix", tmp_path)
    assert re.search(r"embed_tokens: prefix_tuning adapters add virtual tokens .* export them inline", export_error)
    assert "adapter 'prefix' is ['prefix_tuning']" in allocate_error, allocate_error
    with pytest.raises(SpecError, match=r"prefix_tuning adapter 'prefix' cannot be folded into the weights exactly"):
        run(gm, "merge")
    live = build_manifest(gm, source="llama", exports=[]).adapters
    assert [(a.site, a.kind, a.state) for a in live] == [(OWNER, "prefix_tuning", "live")]


@pytest.mark.parametrize("change,message", [
    ({"task_type": "FEATURE_EXTRACTION"}, r"'task_type' is 'FEATURE_EXTRACTION'; expected CAUSAL_LM \(the prefix "
                                          r"is a decoder's initial cache"),
    ({"num_transformer_submodules": 2}, r"'num_transformer_submodules' is 2; expected 1"),
    ({"num_attention_heads": 3}, r"'num_attention_heads': 3 does not divide token_dim 32"),
    ({"num_layers": 3}, r"prompt_embeddings has shape \[4, 128\]; the config says \[num_virtual_tokens, "
                        r"2 \* num_layers \* token_dim\] = \[4, 192\]"),
    ({"modules_to_save": ["lm_head"]}, r"'modules_to_save' = \['lm_head'\] names 'lm_head' of this model, "
     r"but adapter_model.safetensors has no copy"),
])
def test_configs_it_does_not_implement_are_refused(change, message, tmp_path):
    _peft_model(False).save_pretrained(tmp_path / "peft")
    edit_json(tmp_path / "peft" / "adapter_config.json", **change)
    with pytest.raises(AdapterFileError, match=message):
        run(_fresh(), "load", root=tmp_path, path="peft", adapter="prefix")


@pytest.mark.slow
def test_merged_with_past_onnx_keeps_the_prefix_inline(tmp_path):
    """Projection MLP inline; ORT equals torch on a prefill with an empty cache and on the decode step after it."""
    import onnxruntime as ort

    from rewrite.export.onnx_merged import export_merged
    from rewrite.options import ExportOptions

    gm = _ours(_peft_model(True), True)
    export_merged(gm, tmp_path / "m.onnx", ExportOptions(), None)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    ids, mask = _prefill()
    feeds = _feeds(ids, mask)
    for _ in range(2):
        with torch.no_grad():
            want = gm(**feeds)
        got = dict(zip(names, session.run(None, {onnx_name(k): v.numpy() for k, v in feeds.items()})))
        assert max(abs(got[k] - want[k].numpy()).max() for k in want) <= 1e-4
        longer = torch.cat((feeds["attention_mask"], torch.ones(2, 1, dtype=torch.int64)), dim=1)
        feeds = _feeds(torch.tensor([[3], [4]]), longer, {k: torch.from_numpy(v) for k, v in got.items()})
