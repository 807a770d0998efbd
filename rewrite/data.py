"""Data for data-driven passes: batches of named tensors and the loss that scores them.

`[data] path` names a file of tensors keyed by the model's input names plus `labels`, all with the
same first dimension (examples): `.safetensors`, `.npz` (numpy, no pickles) or `.pt`
(`torch.load(weights_only=True)`: tensors only, never code). `[data] factory = "pkg.mod:fn"` names a
function returning an iterable of such dicts (called once per pass over the data). NaN / Inf values are refused,
naming the tensor: a file's once when it is read, a factory's batch by batch as they are produced.

Losses (`[data] loss`), on the model output selected by `[data] output` (a name such as "logits", or
the index among the flattened outputs):
    cross_entropy  CE(output.reshape(-1, C), labels.reshape(-1))      classification / token labels
    mse            mean (output - labels)^2                             regression, teacher outputs
    causal_lm      CE(output[:, :-1], labels[:, 1:])                    next-token, labels = input_ids
    model          the output named "loss" (the model computes it from `labels` itself)
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from rewrite.errors import SpecError
from rewrite.factory import import_callable
from rewrite.finite import check_tensors
from rewrite.options import DataOptions

Batch = dict[str, torch.Tensor]


def _read_file(path: Path) -> Batch:
    if not path.is_file():
        raise SpecError(f"[data] path: {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(path)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                tensors = {k: torch.from_numpy(archive[k]) for k in archive.files}
        elif path.suffix in (".pt", ".pth"):
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise SpecError(f"[data] path: {path}: unknown format {path.suffix!r} (expected .safetensors, .npz "
                            "or .pt)")
    except SpecError:
        raise
    except Exception as err:  # noqa: BLE001 - an unreadable data file is bad input
        raise SpecError(f"[data] path: {path}: cannot read tensors: {str(err).splitlines()[0]}") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise SpecError(f"[data] path: {path}: expected a mapping of names to tensors")
    sizes = {k: v.shape[0] if v.dim() else None for k, v in tensors.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise SpecError(f"[data] path: {path}: every tensor needs the same number of examples (dim 0); got {sizes}")
    check_tensors(tensors, f"[data] path: {path}", SpecError)
    return tensors


class DataSource:
    """Batches for one model: validated once against its forward inputs."""

    def __init__(self, options: DataOptions, spec_dir: Path, input_names: list[str]):
        self.options, self.input_names = options, input_names
        self._tensors: Batch | None = None
        self._factory: Callable[[], Any] | None = None
        if options.path is not None:
            path = Path(options.path)
            self._tensors = _read_file(path if path.is_absolute() else spec_dir / path)
            self._check_names(set(self._tensors), f"[data] path {options.path}")
        else:
            self._factory = import_callable(options.factory, SpecError, "[data] factory")

    def _check_names(self, names: set[str], where: str) -> None:
        missing = [n for n in self.input_names if n not in names]
        if missing:
            raise SpecError(f"{where}: missing model input(s) {missing} (has: {sorted(names)})")
        if self.options.loss != "causal_lm" and self.options.loss != "model" and "labels" not in names:
            raise SpecError(f"{where}: no 'labels' tensor, which loss = {self.options.loss!r} needs")

    def batches(self, limit: int | None = None) -> Iterator[Batch]:
        """Batches in a seeded order, cycling through the data until `limit` batches (default: one epoch)."""
        if self._factory is not None:
            yield from self._factory_batches(limit)
            return
        count = next(iter(self._tensors.values())).shape[0]
        generator = torch.Generator().manual_seed(self.options.seed)
        size, produced = self.options.batch_size, 0
        while True:
            order = torch.randperm(count, generator=generator)
            for start in range(0, count, size):
                if limit is not None and produced >= limit:
                    return
                rows = order[start:start + size]
                yield {k: v[rows] for k, v in self._tensors.items()}
                produced += 1
            if limit is None:
                return

    def _factory_batches(self, limit: int | None) -> Iterator[Batch]:
        produced = 0
        while limit is None or produced < limit:
            empty = True
            for index, batch in enumerate(self._factory()):
                empty = False
                if produced == 0:
                    self._check_names(set(batch), f"[data] factory {self.options.factory}")
                check_tensors(batch, f"[data] factory {self.options.factory}: batch {index}", SpecError)
                yield batch
                produced += 1
                if limit is not None and produced >= limit:
                    return
            if empty:
                raise SpecError(f"[data] factory {self.options.factory} yielded no batches")
            if limit is None:
                return

    def model_inputs(self, batch: Batch) -> Batch:
        return {k: v for k, v in batch.items() if k in self.input_names}


def select_output(outputs: Any, key: str | int) -> torch.Tensor:
    if isinstance(key, str):
        value = outputs.get(key) if hasattr(outputs, "get") else getattr(outputs, key, None)
        if value is None:
            raise SpecError(f"[data] output = {key!r}: the model has no such output")
        return value
    leaves = [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]
    if key >= len(leaves):
        raise SpecError(f"[data] output = {key}: the model has only {len(leaves)} tensor outputs")
    return leaves[key]


def make_loss(options: DataOptions) -> Callable[[Any, Batch], torch.Tensor]:
    """loss(outputs, batch) -> scalar; shape problems are reported as SpecError naming [data]."""

    def loss(outputs: Any, batch: Batch) -> torch.Tensor:
        if options.loss == "model":
            return select_output(outputs, "loss")
        out = select_output(outputs, options.output)
        try:
            if options.loss == "causal_lm":
                labels = batch.get("labels", batch.get("input_ids"))
                return F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]).float(), labels[:, 1:].reshape(-1))
            labels = batch["labels"]
            if options.loss == "mse":
                return F.mse_loss(out.float(), labels.float().reshape(out.shape))
            return F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), labels.reshape(-1).long())
        except (RuntimeError, ValueError) as err:
            raise SpecError(f"[data] loss = {options.loss!r}: labels of shape {tuple(batch['labels'].shape)} do "
                            f"not fit the output of shape {tuple(out.shape)}: {str(err).splitlines()[0]}") from None

    return loss
