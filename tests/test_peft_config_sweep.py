"""PEFT directories as users save them, beyond test_peft_oracle.py's configs, against PEFT reloading the same directory.

Oracle: `PeftModel.from_pretrained(fresh base, dir)` (what the directory means to PEFT), on the same base weights.
1. (fast, DeepMLP) An AdaLoRA directory (`peft_type = "ADALORA"`, `lora_A` / `lora_E` / `lora_B`), its modules cut
   by `rank_pattern` masks: `load` gives each module the kept rank and PEFT's scale lora_alpha / (init_r + 1e-5);
   load, our save (a plain LoRA directory) reloaded in PEFT, and merge equal PEFT (<= 1e-5); an unmerged bank
   export serves it per row as PEFT (<= 1e-5).
2. (fast, DeepMLP) Refused through the CLI with exit 2, no traceback, naming the directory and the config key or
   file, and what works instead: an adapter_model.bin only (a pickle; read with trust_pickle = true, as PEFT
   reads it), bias = "all", an AdaLoRA module whose mask kept nothing, tensors whose rank is not the config's init_r; a LoHa conv module saved Tucker-factored (use_effective_conv2d on a 3x3 kernel).
3. (slow, tiny LLaMA) The configs users save: "all-linear", layers_to_transform with layers_pattern and a
   regex exclude_modules, rank / alpha patterns keyed by suffix and by regex, rsLoRA, fp16 / bf16 tensors, an older
   config (fields missing, unknown fields), a second adapter in its save_pretrained subfolder, DoRA with a
   rank pattern, IA3 with feedforward_modules, LoHa and LoKr (decompose_both) saved with use_effective_conv2d
   (no conv: nothing Tucker-factored), AdaLoRA: load and merge equal PEFT (<= 1e-5); `rewrite bundle` of several
   of them serves each per batch row as PEFT (<= 1e-5).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rewrite.errors import AdapterFileError
from rewrite.runtime.session import AdapterSession
from rewrite.state import ADAPTER_ROOT

from factories import mlp4
from helpers import capture_module, cli, diff, fresh_capture, peft_reload, run_pass, save_peft
from models import build

peft = pytest.importorskip("peft")

ATOL = 1e-5
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MLP_INPUTS = '[[capture.inputs]]\nname = "x"\nshape = [4, 3, 64]\ndims = ["batch", "seq", ""]\n'

pytestmark = pytest.mark.usefixtures("one_thread")


def first(outputs) -> torch.Tensor:
    out = outputs if isinstance(outputs, torch.Tensor) else outputs[0]
    return out.detach().double()


# ------------------------------------------------------------------------------------- 1. AdaLoRA (DeepMLP)

ADA_MASKS = {"layers.0.lora_E.default": [True, False, True, False], "layers.2.lora_E.default": [False] * 3 + [True]}


def _adalora_dir(path: Path, masks: dict | None = ADA_MASKS) -> Path:
    config = peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=10,
                                target_modules=[f"layers.{i}" for i in range(4)])
    return save_peft(mlp4(), config, path, rank_pattern=masks)


def test_adalora_dir_loads_and_merges_as_peft(tmp_path):
    directory = _adalora_dir(tmp_path / "ada")
    x = torch.randn(4, 3, 64, generator=torch.Generator().manual_seed(0))
    want = first(peft_reload(mlp4(), directory)(x))
    gm = capture_module(mlp4(), {"x": x})
    assert diff(first(gm(x=x)), want) > 1e-3  # the adapter is visible
    result = run_pass(gm, "load", path=str(directory), adapter="ada")
    assert result.modified and result.stats["modules"] == 4
    modules = {o: gm.get_submodule(f"{ADAPTER_ROOT}.layers.{o}.ada") for o in range(4)}
    assert {o: m.kind for o, m in modules.items()} == dict.fromkeys(range(4), "svd_lora")
    assert {o: m.rank for o, m in modules.items()} == {0: 2, 1: 4, 2: 1, 3: 4}  # the masks' kept triplets
    assert [m.scaling for m in modules.values()] == [pytest.approx(8 / (4 + 1e-5), rel=1e-12)] * 4
    assert diff(first(gm(x=x)), want) <= ATOL
    assert run_pass(gm, "load", path=str(directory), adapter="ada").modified is False
    run_pass(gm, "save", tmp_path, path="saved", adapter="ada")  # as a plain LoRA directory
    assert json.loads((tmp_path / "saved" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert diff(first(peft_reload(mlp4(), tmp_path / "saved")(x)), want) <= ATOL
    run_pass(gm, "merge")
    assert diff(first(gm(x=x)), want) <= ATOL


def test_adalora_dir_served_per_row_in_a_bank(tmp_path, capsys):
    directory = _adalora_dir(tmp_path / "ada")
    spec = tmp_path / "spec.toml"
    spec.write_text(f'version = 1\n{MLP_INPUTS}[[pass]]\nname = "load"\npath = {json.dumps(str(directory))}\n'
                    'adapter = "ada"\n[export]\nmode = "unmerged"\nswitching = "bank"\ncheck = true\n')
    code, err = cli(capsys, "apply", spec, "factories:mlp4", "-o", tmp_path / "out", "-q")
    assert code == 0, err
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))
    want, base = first(peft_reload(mlp4(), directory)(x)), first(mlp4()(x))
    with AdapterSession(tmp_path / "out") as served:
        (got,) = served.run({"x": x.numpy()}, adapter_ids=["ada", None, "ada"])
    assert diff(want[0], base[0]) > 1e-3
    assert max(diff(got[0], want[0]), diff(got[1], base[1]), diff(got[2], want[2])) <= ATOL


# ------------------------------------------------------------------------------------ 2. refusals (CLI)

def _lora_dir(path: Path, **options) -> Path:
    config = peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **{"target_modules": ["layers.0"], **options})
    return save_peft(mlp4(), config, path)


def _bin_only(path: Path) -> Path:
    from safetensors.torch import load_file

    directory = _lora_dir(path)
    torch.save(load_file(directory / "adapter_model.safetensors"), directory / "adapter_model.bin")
    (directory / "adapter_model.safetensors").unlink()
    return directory


def _init_r_mismatch(path: Path) -> Path:
    directory = _adalora_dir(path, masks=None)
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, "init_r": 3}))
    return directory


REFUSED = {
    "bin_only": (_bin_only, ["no adapter_model.safetensors", "adapter_model.bin is a pickle",
                             "set trust_pickle = true on this load pass",
                             "safetensors.torch.save_file(torch.load('adapter_model.bin')"]),
    "bias_all": (lambda p: _lora_dir(p, bias="all"), ["adapter_config.json: 'bias'", 'only bias = "none"']),
    "adalora_rank_0": (lambda p: _adalora_dir(p, masks={"layers.1.lora_E.default": [False] * 4}),
                       ["module 'layers.1'", "kept none of its triplets"]),
    "adalora_init_r": (_init_r_mismatch, ["has rank 4, but adapter_config.json says 'init_r' = 3"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_dirs_exit_2_naming_dir_and_key(case, tmp_path, capsys):
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


def test_trusted_pickle_loads_as_peft(tmp_path):
    """`trust_pickle = true`: the tensors of adapter_model.bin (bf16 here) are read as PEFT reads them; a pickle
    that is not a dict of tensors is refused naming the file."""
    directory = _bin_only(tmp_path / "adapter")
    state = torch.load(directory / "adapter_model.bin")
    torch.save({k: v.to(torch.bfloat16) for k, v in state.items()}, directory / "adapter_model.bin")
    x = torch.randn(4, 3, 64, generator=torch.Generator().manual_seed(0))
    want = first(peft_reload(mlp4(), directory)(x))
    gm = capture_module(mlp4(), {"x": x})
    assert diff(first(gm(x=x)), want) > 1e-3
    assert run_pass(gm, "load", path=str(directory), trust_pickle=True).stats["modules"] == 1
    assert diff(first(gm(x=x)), want) <= ATOL
    torch.save({"weights": [1, 2]}, directory / "adapter_model.bin")
    with pytest.raises(AdapterFileError, match=r"adapter_model.bin: expected a dict of named tensors"):
        run_pass(capture_module(mlp4(), {"x": x}), "load", path=str(directory), trust_pickle=True)


def test_loha_tucker_conv_is_refused_naming_the_module(tmp_path):
    """use_effective_conv2d on a 3x3 conv: PEFT saves its kernel Tucker-factored (hada_t1, hada_t2), which we
    do not read; the same directory's linear module alone would load (the matrix below)."""
    from factories import cnn

    config = peft.LoHaConfig(r=2, alpha=4, target_modules=["conv", "head"], use_effective_conv2d=True)
    directory = save_peft(cnn(), config, tmp_path / "loha")
    gm = capture_module(cnn(), {"x": torch.randn(2, 3, 8, 8), "ids": torch.randint(0, 32, (2, 5))})
    with pytest.raises(AdapterFileError, match=r"adapter_config.json: 'use_effective_conv2d' = true saved module "
                                               r"'conv' Tucker-factored \(hada_t1, hada_t2\)"):
        run_pass(gm, "load", path=str(directory))


# --------------------------------------------------------------------------- 3. the matrix (tiny LLaMA)

def _older_config(directory: Path) -> None:
    """An adapter_config.json of an older PEFT (later fields missing) that also carries fields we do not know."""
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    for key in ("use_rslora", "rank_pattern", "alpha_pattern", "layers_pattern", "layers_to_transform",
                "exclude_modules", "use_dora", "init_lora_weights", "lora_bias", "megatron_config",
                "layer_replication", "target_parameters", "trainable_token_indices", "use_qalora", "peft_version"):
        config.pop(key, None)
    path.write_text(json.dumps({**config, "enable_lora": None, "merge_weights": False, "a_future_field": {"x": 1}}))


def _half(dtype: torch.dtype):
    def cast(directory: Path) -> None:
        from safetensors.torch import load_file, save_file

        path = directory / "adapter_model.safetensors"
        save_file({k: v.to(dtype) for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    return cast


def _lora(**options):
    return peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **options)


# label -> (PEFT config, adapter name, edit of the saved directory)
MATRIX = {
    "all_linear": (_lora(target_modules="all-linear"), "default", None),
    "layers_pattern": (_lora(target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers",
                             exclude_modules=r".*\.v_proj"), "default", None),
    "rank_alpha_patterns": (_lora(target_modules=LLAMA_LINEARS, use_rslora=True,
                                  rank_pattern={r"layers\.0\.self_attn\.q_proj": 2, "down_proj": 6},
                                  alpha_pattern={r"model\.layers\.1\..*_proj": 3}), "default", None),
    "fp16": (_lora(target_modules=["q_proj", "down_proj"]), "default", _half(torch.float16)),
    "bf16": (_lora(target_modules=["k_proj", "up_proj"]), "default", _half(torch.bfloat16)),
    "older_config": (_lora(target_modules=["q_proj", "v_proj"]), "default", _older_config),
    "named_subfolder": (_lora(target_modules=["o_proj"]), "mine", None),
    "dora_rank_pattern": (_lora(target_modules=["q_proj", "v_proj"], use_dora=True, rank_pattern={"v_proj": 2}),
                          "default", None),
    "ia3_feedforward": (peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                       feedforward_modules=["down_proj"], init_ia3_weights=False), "default", None),
    # use_effective_conv2d changes only conv kernels above 1x1: these linear modules are plain
    "loha_effective_conv2d": (peft.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                                              use_effective_conv2d=True), "default", None),
    "lokr_decompose_both": (peft.LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"], decompose_both=True,
                                            use_effective_conv2d=True), "default", None),
    "adalora": (peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=10,
                                   target_modules=["q_proj", "v_proj"]), "default", None),
}
BUNDLED = ["all_linear", "bf16", "dora_rank_pattern", "lokr_decompose_both", "adalora"]


def feeds() -> dict[str, torch.Tensor]:
    """Batch 3, length 11, row 1 right-padded (not the capture's example inputs)."""
    mask = torch.ones(3, 11, dtype=torch.int64)
    mask[1, 6:] = 0
    return {"input_ids": torch.randint(3, 128, (3, 11), generator=torch.Generator().manual_seed(7)),
            "attention_mask": mask}


def _base():
    model = build("llama")
    model.set_attn_implementation("eager")  # the capture's attention
    return model


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """made(label) -> (PEFT directory, PEFT's reloaded output on `feeds()`), each built once."""
    cache: dict[str, tuple[Path, torch.Tensor]] = {}

    def make(label: str) -> tuple[Path, torch.Tensor]:
        if label not in cache:
            config, name, edit = MATRIX[label]
            directory = save_peft(_base(), config, tmp_path_factory.mktemp(label), adapter_name=name)
            if edit is not None:
                edit(directory)
            with torch.no_grad():
                cache[label] = directory, first(peft_reload(_base(), directory)(**feeds()).logits)
        return cache[label]

    return make


@pytest.mark.slow
@pytest.mark.parametrize("label", list(MATRIX))
def test_saved_config_loads_and_merges_as_peft(label, made):
    directory, want = made(label)
    gm, _ = fresh_capture("llama")
    with torch.no_grad():
        assert diff(first(gm(**feeds())), want) > 1e-3  # the adapter is visible
        assert run_pass(gm, "load", path=str(directory), adapter="a").stats["modules"] > 0
        assert diff(first(gm(**feeds())), want) <= ATOL
        run_pass(gm, "merge")
        assert diff(first(gm(**feeds())), want) <= ATOL


@pytest.mark.slow
def test_bundle_serves_each_saved_config_per_row_as_peft(made, hf_dir, tmp_path, capsys):
    args = [a for label in BUNDLED for a in ("--adapter", f"{label}={made(label)[0]}")]
    code, err = cli(capsys, "bundle", hf_dir("llama"), *args, "--switching", "bank", "-o", tmp_path / "out", "-q")
    assert code == 0, err
    kwargs = feeds()
    with torch.no_grad():
        base = first(_base()(**kwargs).logits)
    with AdapterSession(tmp_path / "out") as served:
        for label in BUNDLED:
            want = made(label)[1]
            (got, *_) = served.run({k: v.numpy() for k, v in kwargs.items()}, adapter_ids=[label, None, label])
            worst = max(diff(got[0], want[0]), diff(got[1], base[1]), diff(got[2], want[2]))
            assert worst <= ATOL, (label, worst)
