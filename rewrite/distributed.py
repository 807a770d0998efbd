"""Running under torch.distributed (`torchrun`): the one place that talks to the process group.

Without an initialised group (`torch.distributed.is_available() and is_initialized()` false) every helper here is
the identity: one process sees all the data and nothing changes. With a group of W processes:

1. Data: every process reads the same batches (the same [data] file or factory, in the same seeded order) and keeps
   its own rows of each: process r takes the r-th of W contiguous slices of dim 0 whose sizes differ by at most
   one (`shard`). A batch of n rows is one batch of the run whatever W is: `batches`, `steps` and `batch_size`
   mean what they mean in one process, and W processes compute what one process computes.
2. Gradients are averaged over the processes (DDP's convention): each process backpropagates its task loss times
   `Shard.scale` = W n_r / n (1 when the rows split evenly), so the mean of the processes' gradients is the
   gradient of the loss over all n rows, for a loss that is a mean over rows (`weighted_loss`, `all_mean`).
   Regularisers of the parameters, the same on every process, are added unscaled.
3. Statistics of the data (sums of x x^T, token counts, sums of J^T u u^T J) are summed (`all_sum`).
4. Decisions (ranks, masks, growth) are taken on process 0 and sent to the others (`agree`), so every process
   resizes its graph identically even where its own floating-point results differ in the last bit.
5. Only process 0 writes files (`is_main`): reports, adapter files, exports, the manifest.

`process_group()` initialises the group from torchrun's environment (WORLD_SIZE > 1) for `rewrite apply`.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rewrite.errors import DataError


def active() -> bool:
    """A process group of any size is initialised."""
    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    """(this process's rank, the number of processes); (0, 1) without a group."""
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def is_main() -> bool:
    """Rule 5: the process that writes files (rank 0, or the only one)."""
    return world()[0] == 0


@dataclass
class Shard:
    """This process's rows [offset, offset + rows) of a batch of `total` rows (rule 1)."""
    batch: dict[str, torch.Tensor]
    offset: int
    rows: int
    total: int
    scale: float   # W rows / total: the weight of this process's loss (rule 2)

    def normal(self, shape: Sequence[int], generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        """N(0, 1) values for an output of this process's rows: this process's rows of one draw for the whole batch
        when dim 0 holds the rows (so W processes draw what one process draws), else a draw of `shape`."""
        if self.rows != self.total and len(shape) and shape[0] == self.rows:
            return torch.randn((self.total, *shape[1:]), generator=generator, dtype=dtype)[self.offset:
                                                                                          self.offset + self.rows]
        return torch.randn(tuple(shape), generator=generator, dtype=dtype)


def shard(batch: dict[str, torch.Tensor]) -> Shard:
    """Rule 1: this process's rows of `batch` (the batch itself without a group)."""
    rank, size = world()
    sizes = {k: v.shape[0] if isinstance(v, torch.Tensor) and v.dim() else None for k, v in batch.items()}
    total = next((n for n in sizes.values() if n is not None), 0)
    if size == 1:
        return Shard(batch, 0, total, total, 1.0)
    if set(sizes.values()) != {total}:
        raise DataError(f"a batch is split across {size} processes by rows: every tensor needs the same dim 0; "
                        f"got {sizes}")
    if total < size:
        raise DataError(f"a batch of {total} rows cannot be split across {size} processes: set [data] batch_size "
                        f">= {size}")
    bounds = [total * r // size for r in range(size + 1)]
    offset, end = bounds[rank], bounds[rank + 1]
    return Shard({k: v[offset:end] for k, v in batch.items()}, offset, end - offset, total,
                 size * (end - offset) / total)


def _reduce(tensors: Sequence[torch.Tensor | None]) -> None:
    """Sum `tensors` over the processes, in place, one collective per dtype and device (None entries skipped)."""
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        if t is not None:
            groups.setdefault((t.dtype, t.device), []).append(t)
    for same in groups.values():
        flat = torch.cat([t.detach().reshape(-1) for t in same])
        dist.all_reduce(flat)
        for t, part in zip(same, flat.split([t.numel() for t in same])):
            t.copy_(part.view_as(t))


def all_sum(tensors: Sequence[torch.Tensor | None]) -> None:
    """Rule 3: replace each tensor by its sum over the processes (in place; nothing without a group)."""
    if world()[1] > 1:
        _reduce(tensors)


def all_mean(tensors: Sequence[torch.Tensor | None]) -> None:
    """Rule 2: replace each tensor by its mean over the processes (in place; nothing without a group)."""
    size = world()[1]
    if size > 1:
        _reduce(tensors)
        for t in tensors:
            if t is not None:
                t.div_(size)


def weighted_loss(loss: torch.Tensor, part: Shard) -> tuple[torch.Tensor, float]:
    """Rule 2 for one batch: (what this process backpropagates, the loss over the whole batch)."""
    local = loss * part.scale if part.scale != 1.0 else loss
    value = local.detach().reshape(1).clone()
    all_mean([value])
    return local, float(value)


def agree(decision):
    """Rule 4: process 0's `decision` (any picklable object), on every process."""
    if world()[1] == 1:
        return decision
    box = [decision]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment) for the block: gloo for CPU
    tensors, with NCCL for CUDA ones where CUDA is present (each process on the GPU of its LOCAL_RANK). Nothing
    when there is no such environment or a group is already initialised (it is then the caller's)."""
    if active() or int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        yield
        return
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend)
    try:
        yield
    finally:
        dist.destroy_process_group()


__all__ = ["Shard", "active", "agree", "all_mean", "all_sum", "is_main", "process_group", "shard", "weighted_loss",
           "world"]
