"""A model saved in float16 (an HF directory whose weights are half precision) served unmerged.

The adapter inputs of its export take float16: `AdapterSession` reads that type from the model, not from
`[export] bank_dtype` (an option of float32 models), so it opens the export's own float16 adapter files, and an
adapter added while serving (a PEFT directory, float32 in memory) is cast to it. Oracle: PEFT's forward of the same
float16 weights run in float32 (each answer within float16 rounding of the model's activations), and the added
adapter answers exactly as the exported one with the same weights.
"""
from __future__ import annotations

import numpy as np
import peft
import pytest
import torch

from rewrite.cli import main
from rewrite.runtime.session import AdapterSession

from models import build

TOKENS = np.array([[1, 5, 9, 3, 7], [2, 4, 6, 8, 10]], np.int64)


@pytest.fixture(scope="module")
def half_llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("half_llama")
    build("llama").half().save_pretrained(root / "model")
    torch.manual_seed(3)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = peft.get_peft_model(build("llama").half(), config).eval()
    peft_model.save_pretrained(root / "peft_a")
    with torch.no_grad():
        want = peft_model.float()(input_ids=torch.from_numpy(TOKENS)).logits.numpy()
        with peft_model.disable_adapter():
            base = peft_model(input_ids=torch.from_numpy(TOKENS)).logits.numpy()
    return root, want, base


@pytest.mark.parametrize("switching", ["ort-adapters", "bank"])
def test_a_float16_model_serves_its_adapters_and_takes_new_ones(half_llama, switching):
    root, want, base = half_llama
    spec = root / f"{switching}.toml"
    capacity = "" if switching == "ort-adapters" else "capacity = 2\n"
    spec.write_text(f'version = 1\n[[pass]]\nname = "load"\npath = "peft_a"\nadapter = "a"\n'
                    f'[export]\nmode = "unmerged"\nswitching = "{switching}"\n{capacity}')
    out = root / f"out-{switching}"
    assert main(["apply", str(spec), str(root / "model"), "-o", str(out), "-q"]) == 0
    with AdapterSession(out) as session:
        assert session.bank_dtype == "float16"
        feeds = {"input_ids": TOKENS, "attention_mask": np.ones_like(TOKENS)}
        feeds = {k: v for k, v in feeds.items() if k in session.input_names}
        got = session.run(feeds, adapter="a")[0]
        assert got.dtype == np.float16
        assert np.abs(want - base).max() > 1e-2  # the adapter moves the answer
        assert np.abs(got.astype(np.float32) - want).max() <= 2e-2  # float16 activations, |logits| ~ 1
        session.add_adapter("again", root / "peft_a")
        assert np.array_equal(session.run(feeds, adapter="again")[0], got)
