"""What the scorers that train share: LoRA factors in matmul layout with their gradients, the mask entries of the
targeted groups, and the training call (rewrite.train.train on the pass's [data], with the scorer's callbacks)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rewrite.coupling.groups import Unit
from rewrite.prune_scorers.base import PruneScoreContext
from rewrite.train import TrainResult, train


def factors(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(A [fan_in, r], B [r, d_out], dL/dA, dL/dB) of a LoRA in matmul layout (delta = s A B); None: no gradient."""
    a, b = module.lora_A, module.lora_B
    if module.op == "conv2d":  # A [r, c_in, kh, kw], B [c_out, r, 1, 1]
        def mat(t):
            return None if t is None else t.flatten(1).T
        return mat(a.detach()), mat(b.detach()), mat(a.grad), mat(b.grad)
    return a.detach(), b.detach(), a.grad, b.grad


def to_weight_layout(matmul: torch.Tensor, module: nn.Module, shape: torch.Size) -> torch.Tensor:
    """A [fan_in, d_out] matrix (matmul layout) in the layout of the site's weight (linear: [d_out, d_in])."""
    if module.op == "conv1d":
        return matmul
    return matmul.T.reshape(shape)


def entries(ctx: PruneScoreContext) -> dict[str, list[Unit]]:
    """group -> what one mask entry is: its KV heads for a kv_heads target, else its units."""
    return {g.name: (g.blocks if structure == "kv_heads" else g.units)
            for structure, groups in ctx.structures.items() for g in groups}


class Recording:
    """The pass's DataSource, remembering the batch being trained on (Light-PEFT averages over its real tokens)."""

    def __init__(self, data: Any):
        self.data, self.options, self.current = data, data.options, None

    def batches(self, limit: int | None = None):
        for batch in self.data.batches(limit=limit):
            self.current = batch
            yield batch

    def model_inputs(self, batch):
        return self.data.model_inputs(batch)


def run_training(ctx: PruneScoreContext, data: Any, callbacks: list, extra: list[str]) -> TrainResult:
    """Train the adapters (and `extra` parameters) for the pass's `steps` (default: [data] steps)."""
    return train(ctx.gm, data, steps=ctx.options.get("steps"), callbacks=callbacks,
                 extra_params=[*ctx.options.get("extra_params", []), *extra])
