"""BitFit: train only a bias (Ben Zaken et al. 2022), as a delta on the layer's bias, PEFT 0.21's `BeftConfig`.

    y' = base(x) + db          db [d_out], init 0 (the identity)

The module returns db broadcast to the base op's output ("add" join): [..., d_out] for linear and Conv1D outputs,
[d_out, 1, 1] (per output channel) for conv2d outputs [..., c_out, H, W]; x only gives the shape.
Merge (exact up to rounding): b <- b + db, the weight unchanged; unmerge b <- b - db. A site without a bias gets a
zero one in the graph first (`needs_bias`: the merge pass adds the parameter `<owner>.bias` and gives it to the op),
so b + db is always there to write.
PEFT (BEFT): key `base_model.model.<module>.beft_bias` [1, d_out] = db; config fields `target_modules`,
`init_weights`. PEFT's BEFT adapts `nn.Linear` only: a Conv1D or conv2d BitFit has no PEFT form (save refuses it),
and neither kind of site has a form in our LoRA adapter file. No rank; not low-rank (db does not depend on x, it is
not x A B): allocate refuses it. Elementwise (`rowwise`, vector "b", identity 0): bank / custom-op exports switch it
per batch row on linear and Conv1D sites, y' = y + b[id]; ort-adapters feeds b per run (identity default). The format,
and its tensors read as b without torch: rewrite/formats/peft_rows.py.
"""
from __future__ import annotations

import torch
from torch import nn

from rewrite.adapters.base import AdapterKind, NotSupported
from rewrite.adapters.oft import PEFT_VERSION
from rewrite.formats.peft_rows import BEFT_FORMAT, BEFT_KEY


class BitFit(AdapterKind):
    kind = "bitfit"
    ops = ("linear", "conv1d", "conv2d")
    needs_bias = True
    settings = ()
    inits = ("zeros",)
    mergeable = True
    rowwise = True
    peft_format = BEFT_FORMAT

    def __init__(self, op: str, d_in: int, d_out: int, rank: int = 0, alpha: float = 0.0, *, rslora: bool = False,
                 dropout: float = 0.0, init: str = "zeros", conv: dict | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__()
        self.op, self.d_in, self.d_out = op, d_in, d_out
        self.bias_delta = nn.Parameter(torch.zeros(d_out, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.bias_delta.to(x.dtype)
        if self.op == "conv2d":
            return delta[:, None, None]
        return delta.expand(*x.shape[:-1], self.d_out)

    def row_params(self) -> dict[str, tuple[torch.Tensor, float]]:
        if self.op == "conv2d":
            raise NotSupported("per-row switching of bitfit covers linear and Conv1D sites (channels last); a conv2d "
                               "site must be merged")
        return {"b": (self.bias_delta.detach(), 0.0)}

    @classmethod
    def apply_rows(cls, t: torch.Tensor, params, **layout) -> torch.Tensor:
        """y' = y + b"""
        return t + params["b"]

    @torch.no_grad()
    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None, sign: float = 1.0) -> None:
        if bias is None:
            raise NotSupported("bitfit merges into the site's bias, and this site has none (the merge pass gives it "
                               "a zero bias first)")
        if not bias.is_meta:
            bias.add_(self.bias_delta.to(bias.dtype), alpha=sign)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        if self.op != "linear":
            raise NotSupported(f"PEFT's BEFT adapts Linear layers only; a bitfit adapter on a {self.op} site has no "
                               "PEFT form: merge it into the bias instead")
        return {BEFT_KEY: self.bias_delta[None, :]}

    @classmethod
    def peft_module(cls, adapter, module: str) -> tuple[type[BitFit], dict]:
        return cls, {}

    @classmethod
    def peft_config(cls, modules) -> dict:
        return {"peft_type": "BEFT", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
                "peft_version": PEFT_VERSION, "target_modules": sorted(modules), "init_weights": True,
                "modules_to_save": None, "revision": None}

    def extra_repr(self) -> str:
        return f"op={self.op}, d_out={self.d_out}"
