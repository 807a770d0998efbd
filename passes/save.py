"""save: write one adapter's weights out, as a PEFT directory or as our own adapter file.

PEFT (`format = "peft"`): `adapter_config.json` + `adapter_model.safetensors` that
`PeftModel.from_pretrained(base, dir)` loads with identical outputs; the adapter kind gives the config
(`peft_config`) and its tensors under PEFT's key suffixes (`peft_state`; those it keeps once per adapter, VeRA's
projections, under `base_model.<name>`: `peft_shared_state`), e.g. LoRA's
`base_model.model.<owner>.lora_A.weight` = A^T [r, d_in] and `...lora_B.weight` = B^T [d_out, r].
Ours (`format = "rewrite"`): one safetensors file in matmul layout with the site metadata (`adapter_file_entry`).
Each module is first turned into its saved form (`saved_form`): SVD-form adapters (`svd_lora`, and AdaLoRA /
IncreLoRA before they finish) are written as the plain LoRA with the same delta, so both formats load back
(and into PEFT) as LoRA with identical outputs.
Modules that ride beside another tuner's (`rides`: trained copies of whole layers, `full` and `ln_tuning`, as
`modules_to_save`; `trainable_tokens` as LoRA's `trainable_token_indices`) are written as PEFT writes them: the
config key names them and the file holds their tensors under their paths; a format whose config has no such key
refuses them. An adapter of `full` copies alone has no PEFT form (PEFT has no tuner of modules_to_save only).
An adapter whose init rewrote its base weight (LoRA `init = "pissa" | "olora"`, whose W in the graph is the residual
W - s B0 A0) is written as PEFT writes it (`init_lora_weights = "pissa"`: PEFT recomputes that residual from the
original weight when it loads it); `convert_to_lora = true` writes each module's `converted_form` instead: the plain
LoRA of the same delta against the original weight (rank 2r: [B | -B0], [A; A0]), as PEFT's
`save_pretrained(path_initial_model_for_weight_conversion=...)` does, which loads onto the original model as any
LoRA (and is the only form our adapter file takes). Other adapters are written the same either way.
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

from rewrite.adapters.base import NotSupported
from rewrite.errors import AdapterFileError, SpecError
from rewrite.formats.adapter_file import write_adapter_file
from rewrite.formats.peft_dir import PREFIX, SHARED_PREFIX, write_peft_dir
from rewrite.graph_edit import adapters_at
from rewrite.modes import as_created
from rewrite.names import ADAPTER_NAME
from rewrite.pass_infra import GraphPass, PassOptions, PassResult
from rewrite.state import state_of
from rewrite.tensors import to_numpy


class SaveOptions(PassOptions):
    path: str
    adapter: str = Field(default="default", pattern=ADAPTER_NAME)
    format: Literal["peft", "rewrite"] = "peft"
    allow_outside: bool = False
    convert_to_lora: bool = False


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

    def writes(self) -> list[str]:
        return [self.options.path]

    def check_paths(self) -> None:
        self._target()

    def call(self, gm: fx.GraphModule) -> PassResult:
        state, name = state_of(gm), self.options.adapter
        owners = dict.fromkeys(s.owner for s in state.sites.values())
        convert = self.options.convert_to_lora
        modules = {o: m.converted_form() if convert else m.saved_form()
                   for o in owners if (m := adapters_at(gm, o).get(name)) is not None}
        if not modules:
            raise SpecError(f"{self.context.where}: adapter {name!r} is attached to no site (save it before merge)")
        target = self._target()
        if self.context.write:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
            as_created(tmp)  # a PEFT directory is this folder itself
            try:
                produced = self._write(tmp, name, modules)
                _move(produced, self._target(), replace=not Path(self.options.path).is_absolute())
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return PassResult(gm, False, {"adapter": name, "modules": len(modules), "path": self.options.path,
                                      "format": self.options.format})

    def _write(self, tmp: Path, name: str, modules: dict) -> Path:
        peft = self.options.format == "peft"
        riders = {o: m for o, m in modules.items() if peft and m.rides}
        tuned = {o: m for o, m in modules.items() if o not in riders}
        if not tuned:  # riders alone: those a tuner saves (LN tuning, trainable tokens) are the adapter
            own = next((m.peft_format for m in riders.values() if m.peft_format is not None), None)
            tuned = {o: m for o, m in riders.items() if m.peft_format is own}
            riders = {o: m for o, m in riders.items() if o not in tuned}
        # one format per directory, not one peft_type: LoRA and DoRA directories are both LORA
        forms = {m.peft_format if peft and m.peft_format else m.kind for m in tuned.values()}
        if len(forms) > 1:
            kinds = sorted({m.kind for m in tuned.values()})
            raise AdapterFileError(f"{self.context.where}: adapter {name!r} mixes {kinds}; one "
                                   f"{'PEFT directory' if peft else 'adapter file'} holds one kind")
        first = next(iter(tuned.values()))
        try:
            if peft:
                # a format's bare tensors are the model's own (module "", peft_dir)
                bare = bool(getattr(first.peft_format, "bare", ()))
                tensors = {"" if bare else owner: {k: to_numpy(t) for k, t in m.peft_state().items()}
                           for owner, m in tuned.items()}
                shared = {key: to_numpy(t) for key, t in type(first).peft_shared_state(tuned).items()}
                config = type(first).peft_config(tuned)
                config.update(self._rider_config(first.peft_format, riders))
                write_peft_dir(tmp, config, tensors, shared,
                               {o: {k: to_numpy(t) for k, t in m.rider_state().items()} for o, m in riders.items()},
                               SHARED_PREFIX if bare else PREFIX)
                return tmp
            entries = {owner: m.adapter_file_entry() for owner, m in modules.items()}
            produced = tmp / "adapter.safetensors"
            write_adapter_file(produced, name, first.kind, {o: info for o, (info, _) in entries.items()},
                               {o: {k: to_numpy(t) for k, t in parts.items()} for o, (_, parts) in entries.items()})
            return produced
        except NotSupported as err:
            raise AdapterFileError(f"{self.context.at('format')}: format = {self.options.format!r}: {err}") from None

    @staticmethod
    def _rider_config(peft_format, riders: dict) -> dict:
        """The config keys under which the directory of `peft_format` holds `riders` (modules_to_save, ...)."""
        config = {}
        for key in dict.fromkeys(m.rides for m in riders.values()):
            group = {o: m for o, m in riders.items() if m.rides == key}
            model = peft_format.config
            if key not in model.model_fields or key in model.unsupported:
                raise NotSupported(f"PEFT's {peft_format.peft_type} directories cannot hold {key} (PEFT ignores or "
                                   f"refuses the key there), so the {next(iter(group.values())).kind} modules at "
                                   f"{sorted(group)} would be lost; save them beside another tuner's modules, or "
                                   "merge them")
            config[key] = type(next(iter(group.values()))).rider_config(group)
        return config

    def _target(self) -> Path:
        """The checked target; called again right before the move, which may come long after the first check."""
        return self.context.output_path(self.options.path, "path", outside=self.options.allow_outside)
