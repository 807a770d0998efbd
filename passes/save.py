"""save: write one adapter's weights out, as a PEFT directory or as our own adapter file.

PEFT (`format = "peft"`): `adapter_config.json` + `adapter_model.safetensors` that
`PeftModel.from_pretrained(base, dir)` loads with identical outputs. Keys are
`base_model.model.<owner>.lora_A.weight` = A^T [r, d_in] and `...lora_B.weight` = B^T [d_out, r];
`r` / `lora_alpha` are the most common values, per-module differences go to `rank_pattern` /
`alpha_pattern` keyed by the full module path. GPT-2 Conv1D sites set `fan_in_fan_out`.
Ours (`format = "rewrite"`): one safetensors file in matmul layout with the site metadata.
SVD-form adapters (`svd_lora`, and AdaLoRA / IncreLoRA before they finish) are written as the plain LoRA
with the same delta: rank = their triplets, A = (diag(lam) Q)^T, B = P^T c / s (SvdLoRA.to_lora), so
both formats load back (and into PEFT) as LoRA with identical outputs.
The graph is not modified. `path` is relative to the output directory and must stay inside it, where an existing
entry of that name is replaced; writing is atomic. `allow_outside = true` also accepts an absolute path, which
must not exist yet: nothing outside the output directory is ever replaced or deleted.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch.fx as fx
from pydantic import Field

from rewrite.errors import SpecError
from rewrite.formats.adapter_file import SiteInfo, write_adapter_file
from rewrite.formats.peft_dir import LoraSettings, PeftConfig, lora_config, write_peft_dir
from rewrite.graph_edit import adapters_at
from rewrite.names import ADAPTER_NAME
from rewrite.pass_infra import GraphPass, PassOptions, PassResult
from rewrite.state import state_of
from rewrite.tensors import to_numpy


class SaveOptions(PassOptions):
    path: str
    adapter: str = Field(default="default", pattern=ADAPTER_NAME)
    format: Literal["peft", "rewrite"] = "peft"
    allow_outside: bool = False


def _peft_config(modules: dict) -> PeftConfig:
    return lora_config({o: LoraSettings(m.op, m.rank, m.alpha, m.rslora, getattr(m.dropout, "p", 0.0))
                        for o, m in modules.items()})


def _as_lora(module):
    return module.to_lora() if module.kind == "svd_lora" else module


def _move(produced: Path, target: Path, *, replace: bool) -> None:
    """Move the finished adapter to `target`, first removing what is there only when `replace` (inside OUT)."""
    if replace and target.is_dir():
        shutil.rmtree(target)
    elif replace and target.exists():
        target.unlink()
    os.rename(produced, target)


class SavePass(GraphPass):
    name = "save"
    Options = SaveOptions

    def call(self, gm: fx.GraphModule) -> PassResult:
        state, name = state_of(gm), self.options.adapter
        owners = dict.fromkeys(s.owner for s in state.sites.values())
        modules = {o: _as_lora(adapters_at(gm, o)[name]) for o in owners if name in adapters_at(gm, o)}
        if not modules:
            raise SpecError(f"{self.context.where}: adapter {name!r} is attached to no site (save it before merge)")
        target = self._target()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            if self.options.format == "peft":
                tensors = {owner: {key: to_numpy(t) for key, t in m.peft_state().items()}
                           for owner, m in modules.items()}
                write_peft_dir(tmp, _peft_config(modules), tensors)
                produced = tmp
            else:
                sites = {o: SiteInfo(op=m.op, rank=m.rank, alpha=m.alpha, rslora=m.rslora, d_in=m.d_in, d_out=m.d_out)
                         for o, m in modules.items()}
                produced = tmp / "adapter.safetensors"
                write_adapter_file(produced, name, "lora", sites,
                                   {o: {"lora_A": to_numpy(m.lora_A), "lora_B": to_numpy(m.lora_B)}
                                    for o, m in modules.items()})
            _move(produced, self._target(), replace=not Path(self.options.path).is_absolute())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return PassResult(gm, False, {"adapter": name, "modules": len(modules), "path": self.options.path,
                                      "format": self.options.format})

    def _target(self) -> Path:
        """The checked target; called again right before the move, which may come long after the first check."""
        return self.context.output_path(self.options.path, "path", outside=self.options.allow_outside)
