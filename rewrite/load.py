"""Turn the MODEL argument into a PyTorch module (or an already-exported program).

    HF directory   config.json + *.safetensors, loaded offline with transformers     safe (no code runs)
    .pt2           a torch.export archive                                            safe (pt2_archive guards)
    pkg.mod:fn     a Python factory returning an nn.Module                           runs your code, by design
    .pt / .pth     a pickled nn.Module                                               runs code: needs trust

A pickle is first opened with `torch.load(weights_only=True)`, which executes nothing. If it holds a
whole module, it is unpickled with code execution only when the user trusts it explicitly
(`--trust-pickle` or `[model] trust_pickle = true`).
"""
from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from rewrite.errors import ModelLoadError, did_you_mean, first_line, plain
from rewrite.factory import call_factory, import_callable
from rewrite.finite import check_tensors
from rewrite.pt2_archive import load_archive


@dataclass
class LoadedModel:
    module: nn.Module | None
    program: torch.export.ExportedProgram | None
    kind: str  # "hf" | "pt2" | "factory" | "pickle"
    source: str
    config: Any = None


def _model_class(transformers: Any, name: Any) -> Any:
    """transformers' model class `name` (a PreTrainedModel or an Auto class), or None."""
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    cls = getattr(transformers, name, None) if isinstance(name, str) and name[:1].isupper() else None
    models = (transformers.PreTrainedModel, _BaseAutoModelClass)
    return cls if isinstance(cls, type) and issubclass(cls, models) else None


def _architectures(config: Any) -> list:
    """config.json's `architectures` as a list (a single name is accepted as transformers does)."""
    value = getattr(config, "architectures", None) or []
    return [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]


def _hf_class(config: Any, requested: str | None, where: str):
    """The class to build: `[model] hf_class`, else every `config.architectures` entry must name a transformers
    model class (another head is never substituted); AutoModel only when the config names no architecture."""
    import transformers

    names = [requested] if requested else _architectures(config)
    for name in names:
        if _model_class(transformers, name) is None:
            known = [n for n in dir(transformers) if n.endswith("Model") or "For" in n]
            source = "[model] hf_class" if requested else f"{where}/config.json 'architectures'"
            raise ModelLoadError(f"{source}: transformers has no model class {name!r}.{did_you_mean(str(name), known)}"
                                 + ("" if requested else " Set [model] hf_class to choose the class explicitly."))
    return _model_class(transformers, names[0]) if names else transformers.AutoModel


def _check_loading_info(path: Path, info: dict, own_class: bool) -> None:
    """Refuse a checkpoint whose tensors do not fill the model: transformers would random-initialise every missing
    or mis-shaped weight (tied weights are not reported missing). Tensors the model does not use are refused only
    for the class the config names (`own_class`): a checkpoint with a head legitimately loads into another class
    without one (`[model] hf_class`, or AutoModel for a config without architectures)."""
    missing = sorted(info["missing_keys"])
    mismatched = sorted(f"{key} (file {tuple(got)}, model {tuple(want)})" for key, got, want in info["mismatched_keys"])
    unexpected = sorted(info["unexpected_keys"]) if own_class else []
    problems = [f"{len(names)} {what}: {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}"
                for what, names in (("model weights missing from the files", missing),
                                    ("tensors of the wrong shape", mismatched),
                                    ("tensors the model has no weight for", unexpected)) if names]
    if problems:
        raise ModelLoadError(f"{path}: the weight files do not fit the model class (transformers would initialise "
                             f"the rest at random): {'; '.join(problems)}")


def _from_pretrained(cls: Any, path: Path, config: Any) -> tuple[Any, dict]:
    """(model, loading info) with every weight read as stored: a mis-shaped tensor is reported, not an exception.
    transformers' own load report is silenced: `_check_loading_info` turns what it says into the error."""
    import transformers

    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        return cls.from_pretrained(path, config=config, local_files_only=True, use_safetensors=True,
                                   ignore_mismatched_sizes=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise ModelLoadError(f"{path}: transformers could not load this model: {first_line(err)}") from None
    finally:
        transformers.utils.logging.set_verbosity(verbosity)


def _load_hf(path: Path, hf_class: str | None, device: str) -> LoadedModel:
    import transformers
    from huggingface_hub.errors import StrictDataclassError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.utils.logging.disable_progress_bar()
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, StrictDataclassError) as err:
        # StrictDataclassError: a config.json value of the wrong type (hidden_size = "64"), said on its second line
        lines = [line.strip() for line in plain(str(err)).splitlines() if line.strip()] or [type(err).__name__]
        reason = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
        raise ModelLoadError(f"{path}/config.json: not a loadable Hugging Face model config: {reason}") from None
    config.use_cache = False
    cls = _hf_class(config, hf_class, str(path))
    if device == "meta":
        with torch.device("meta"):
            model = cls(config) if issubclass(cls, transformers.PreTrainedModel) else cls.from_config(config)
    else:
        weights = list(path.glob("*.safetensors"))
        if not weights:
            raise ModelLoadError(f"{path}: no *.safetensors weights in this directory "
                                 "(only safetensors is loaded from HF directories; .bin pickles are refused)")
        model, info = _from_pretrained(cls, path, config)
        _check_loading_info(path, info, own_class=cls.__name__ in _architectures(config))
    return LoadedModel(model.eval(), None, "hf", str(path), config)


def _load_factory(text: str, device: str) -> LoadedModel:
    factory = import_callable(text, ModelLoadError, text)
    with torch.device(device):
        model = call_factory(factory, ModelLoadError, text)
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{text}: the factory returned {type(model).__name__}, expected a torch.nn.Module")
    return LoadedModel(model.eval(), None, "factory", text, getattr(model, "config", None))


def weights_only_reason(detail: str) -> str:
    """The useful line of torch's weights_only error ('Unsupported operand 103'), not its advice (which tells how to
    unpickle the file anyway)."""
    objects = re.search(r"Unsupported global: GLOBAL (\S+)", detail)
    if objects:
        return f"it needs {objects.group(1)}"
    lines = [line.strip() for line in detail.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error" in line:
            rest = line.partition("WeightsUnpickler error:")[2].strip()
            return rest or (lines[i + 1] if i + 1 < len(lines) else line)
    return lines[0] if lines else "unpickling failed"


def _load_pickle(path: Path, trust: bool) -> LoadedModel:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = plain(str(err))
        objects = re.search(r"Unsupported global: (GLOBAL \S+)", detail)
        if not trust and objects is None:
            raise ModelLoadError(f"{path}: not a readable PyTorch file (corrupt, or not written by torch.save): "
                                 f"{weights_only_reason(detail)}") from None
        if not trust:
            raise ModelLoadError(
                f"{path}: this pickle holds Python objects (not just tensors), and unpickling it would run "
                f"code from the file. Only do that for a file you made or trust: pass --trust-pickle "
                f"(or set [model] trust_pickle = true in the spec). Safer: save the model as a Hugging Face "
                f"directory (save_pretrained) or a torch.export archive (.pt2). Detail: it needs "
                f"{objects.group(1)}") from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as load_err:  # noqa: BLE001 - any failure of a user pickle is bad input
            raise ModelLoadError(f"{path}: could not unpickle: {load_err}") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ModelLoadError(f"{path}: not a PyTorch file: {first_line(err)}") from None
    if isinstance(obj, dict):
        raise ModelLoadError(f"{path}: holds a state_dict ({len(obj)} tensors), not a module; a state_dict "
                             "has no architecture. Use a factory (package.module:function) that builds the "
                             "model and loads these weights.")
    if not isinstance(obj, nn.Module):
        raise ModelLoadError(f"{path}: holds a {type(obj).__name__}, expected a torch.nn.Module")
    return LoadedModel(obj.eval(), None, "pickle", str(path), getattr(obj, "config", None))


def _check_finite(loaded: LoadedModel) -> LoadedModel:
    """A weight holding NaN / Inf makes every output NaN, silently: refused, naming the parameter."""
    module = loaded.module if loaded.module is not None else loaded.program
    params = dict(module.named_parameters()) if module is not None else {}
    check_tensors({k: v.detach() for k, v in params.items() if not v.is_meta}, loaded.source, ModelLoadError)
    return loaded


def load_model(source: str, *, trust_pickle: bool = False, hf_class: str | None = None,
               device: str = "cpu") -> LoadedModel:
    """Load MODEL; never modifies the source. Raises `ModelLoadError` with the reason and what to do, also for a
    weight holding NaN / Inf."""
    return _check_finite(_load(source, trust_pickle, hf_class, device))


def _load(source: str, trust_pickle: bool, hf_class: str | None, device: str) -> LoadedModel:
    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path}: a directory must be a Hugging Face model (config.json + "
                                 "*.safetensors); no config.json found")
        return _load_hf(path, hf_class, device)
    if path.suffix == ".pt2":
        if not path.is_file():
            raise ModelLoadError(f"{path}: file not found")
        return LoadedModel(None, load_archive(path, trust=trust_pickle), "pt2", str(path))
    if path.suffix in (".pt", ".pth", ".bin", ".pkl"):
        if not path.is_file():
            raise ModelLoadError(f"{path}: file not found")
        return _load_pickle(path, trust_pickle)
    if ":" in source and not path.exists():
        return _load_factory(source, device)
    if not path.exists():
        raise ModelLoadError(f"{source}: no such file or directory (expected an HF model directory, a .pt2 "
                             "archive, a .pt pickle or package.module:function)")
    raise ModelLoadError(f"{source}: unknown model format {path.suffix!r} (expected an HF model directory, "
                         ".pt2, .pt/.pth, or package.module:function)")
