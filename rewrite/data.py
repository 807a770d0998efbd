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

import itertools
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from rewrite.errors import DataError, SpecError, describe, first_line, plain
from rewrite.factory import USER_FAILURES, call_factory, import_callable
from rewrite.finite import check_tensors
from rewrite.inputs import ExampleInputs
from rewrite.load import weights_only_reason
from rewrite.options import DataOptions
from rewrite.state import RewriteState

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
    except pickle.UnpicklingError as err:
        raise DataError(f"[data] path: {path}: holds Python objects besides tensors, which are never unpickled (a "
                        f"data file holds named tensors only): {weights_only_reason(plain(str(err)))}") from None
    except Exception as err:  # noqa: BLE001 - an unreadable data file is bad input
        raise DataError(f"[data] path: {path}: cannot read tensors: {first_line(err)}") from None
    _check_batch(tensors, f"[data] path: {path}")
    sizes = {k: v.shape[0] if v.dim() else None for k, v in tensors.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise DataError(f"[data] path: {path}: every tensor needs the same number of examples (dim 0); got {sizes}")
    if not tensors or 0 in sizes.values():
        raise DataError(f"[data] path: {path}: holds no examples (tensors: {sizes})")
    check_tensors(tensors, f"[data] path: {path}", DataError)
    return tensors


def _check_batch(batch: Any, where: str) -> None:
    """A batch (or a whole data file) is a dict of names to tensors."""
    if not isinstance(batch, dict):
        raise DataError(f"{where}: expected a mapping of names to tensors, got {type(batch).__name__}")
    bad = next(((k, v) for k, v in batch.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise DataError(f"{where}: expected a mapping of names to tensors, got {bad[0]!r}: {type(bad[1]).__name__}")


def _user_batches(factory: Callable[[], Any], where: str) -> Iterator[Any]:
    """What the user's factory yields; calling it, or iterating what it returned, failing is a DataError."""
    returned = call_factory(factory, DataError, where)
    try:
        iterator = iter(returned)
    except TypeError:
        raise DataError(f"{where}: the factory returned {type(returned).__name__}, expected an iterable of batches "
                        "(dicts of tensors)") from None
    for index in itertools.count():
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except USER_FAILURES as err:
            raise DataError(f"{where}: batch {index}: the factory raised {describe(err)}") from None
        yield batch


LOSSES_WITH_LABELS = ("cross_entropy", "mse")  # causal_lm shifts input_ids; model computes its own loss


def _check_labels(options: DataOptions, names: set[str], where: str) -> None:
    if options.loss in LOSSES_WITH_LABELS and "labels" not in names:
        raise DataError(f"{where}: no 'labels' tensor, which loss = {options.loss!r} needs (tensors: {sorted(names)})")


def check_data_file(options: DataOptions | None, spec_dir: Path) -> None:
    """What can be checked of `[data] path` before the model is loaded (minutes, for a large one): the file reads,
    its tensors are finite and share dim 0, and it holds `labels` when the loss needs them. The model's input
    names are checked once it is captured."""
    if options is None or options.path is None:
        return
    path = Path(options.path)
    tensors = _read_file(path if path.is_absolute() else spec_dir / path)
    _check_labels(options, set(tensors), f"[data] path {options.path}")


def _check_fit(batch: Batch, examples: ExampleInputs, where: str, rows: int | None = None) -> None:
    """Each model input in `batch` has the rank and dtype it was captured with, and the captured size on every
    static axis (`rows`: the batch size a file's batches will have, in place of its dim 0). A mismatch would fail
    inside the graph, far from the data."""
    for name, example in examples.kwargs.items():
        got, dims = batch[name], examples.dims[name]
        shape = (rows, *got.shape[1:]) if rows is not None and got.dim() else tuple(got.shape)
        integer = [not t.is_floating_point() and t.dtype != torch.bool for t in (got, example)]
        if got.dtype != example.dtype and not all(integer):  # int32 ids for int64 ones index the same
            raise DataError(f"{where}: tensor {name!r} is {str(got.dtype).removeprefix('torch.')}; the model was "
                            f"captured with {str(example.dtype).removeprefix('torch.')}")
        if len(shape) != example.dim():
            raise DataError(f"{where}: tensor {name!r} has {len(shape)} axes (shape {tuple(got.shape)}); the model "
                            f"was captured with {example.dim()} (shape {tuple(example.shape)})")
        for axis, (size, want, dim) in enumerate(zip(shape, example.shape, dims)):
            if dim is None and size != want:
                what = f"batches of {size}" if rows is not None and axis == 0 else f"size {size}"
                raise DataError(f"{where}: tensor {name!r}: {what} on axis {axis}, which the model was captured with "
                                f"as a static size {want} (shape {tuple(example.shape)}); name the axis in that "
                                f"input's [[capture.inputs]] dims to make it dynamic")


class DataSource:
    """Batches for one model: validated once against its forward inputs: their names, and, for a graph torch.export
    captured (the state of a captured graph given), each input's rank, dtype and static sizes, which its guards
    check."""

    def __init__(self, options: DataOptions, spec_dir: Path, inputs: list[str] | RewriteState):
        captured = inputs if isinstance(inputs, RewriteState) else None
        self.options, self.input_names = options, list(captured.inputs.kwargs) if captured else list(inputs)
        self.examples = examples = captured.inputs if captured and captured.frontend == "export" else None
        self._tensors: Batch | None = None
        self._factory: Callable[[], Any] | None = None
        if options.path is not None:
            path = Path(options.path)
            self._tensors = _read_file(path if path.is_absolute() else spec_dir / path)
            self._check_names(set(self._tensors), f"[data] path {options.path}")
            if examples is not None:  # the batch sizes `batches` cuts: full ones, and an epoch's last one
                count, size = next(iter(self._tensors.values())).shape[0], options.batch_size
                for rows in sorted({min(size, count), count % size if count > size else 0} - {0}, reverse=True):
                    _check_fit(self._tensors, examples, f"[data] path {options.path}", rows)
        else:
            self._factory = import_callable(options.factory, SpecError, "[data] factory")

    def _check_names(self, names: set[str], where: str) -> None:
        missing = [n for n in self.input_names if n not in names]
        if missing:
            raise DataError(f"{where}: missing model input(s) {missing} (has: {sorted(names)})")
        _check_labels(self.options, names, where)

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
        where, produced = f"[data] factory {self.options.factory}", 0
        while limit is None or produced < limit:
            empty = True
            for index, batch in enumerate(_user_batches(self._factory, where)):
                empty = False
                _check_batch(batch, f"{where}: batch {index}")
                self._check_names(set(batch), f"{where}: batch {index}")
                if self.examples is not None:
                    _check_fit(batch, self.examples, f"{where}: batch {index}")
                check_tensors(batch, f"{where}: batch {index}", DataError)
                yield batch
                produced += 1
                if limit is not None and produced >= limit:
                    return
            if empty:
                raise DataError(f"{where} yielded no batches")
            if limit is None:
                return

    def model_inputs(self, batch: Batch) -> Batch:
        return {k: v for k, v in batch.items() if k in self.input_names}


def select_output(outputs: Any, key: str | int) -> torch.Tensor:
    if isinstance(key, str):
        value = outputs.get(key) if hasattr(outputs, "get") else getattr(outputs, key, None)
        if value is None:
            raise DataError(f"[data] output = {key!r}: the model has no such output")
        return value
    leaves = [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]
    if key >= len(leaves):
        raise DataError(f"[data] output = {key}: the model has only {len(leaves)} tensor outputs")
    return leaves[key]


IGNORE_INDEX = -100  # F.cross_entropy's default: a label that counts for nothing (padding, prompt tokens)


def _class_labels(labels: torch.Tensor, classes: int, loss: str) -> torch.Tensor:
    """Labels as class indices: whole numbers in [0, classes), or IGNORE_INDEX. A fraction would be truncated
    and an index out of range fails inside the loss, so both are refused naming the value."""
    if labels.is_floating_point() and bool((labels != labels.round()).any()):
        bad = labels[labels != labels.round()].flatten()[0].item()
        raise DataError(f"[data] loss = {loss!r}: labels are class indices; got the fraction {bad:g}")
    labels = labels.long()
    outside = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= classes))
    if bool(outside.any()):
        raise DataError(f"[data] loss = {loss!r}: label {labels[outside].flatten()[0].item()} is not a class index "
                        f"of the output's {classes} classes (expected 0..{classes - 1}, or {IGNORE_INDEX} to ignore)")
    return labels


def make_loss(options: DataOptions) -> Callable[[Any, Batch], torch.Tensor]:
    """loss(outputs, batch) -> scalar; shape problems are reported as DataError naming [data]."""

    def loss(outputs: Any, batch: Batch) -> torch.Tensor:
        if options.loss == "model":
            return select_output(outputs, "loss")
        out = select_output(outputs, options.output)
        labels = batch.get("labels", batch.get("input_ids") if options.loss == "causal_lm" else None)
        if labels is None:
            raise DataError(f"[data] loss = {options.loss!r}: the batch has no 'labels'"
                            + (" (nor 'input_ids')" if options.loss == "causal_lm" else ""))
        try:
            if options.loss == "causal_lm":
                labels = _class_labels(labels, out.shape[-1], options.loss)
                return F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]).float(), labels[:, 1:].reshape(-1))
            if options.loss == "mse":
                return F.mse_loss(out.float(), labels.float().reshape(out.shape))
            labels = _class_labels(labels, out.shape[-1], options.loss)
            return F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), labels.reshape(-1))
        except (RuntimeError, ValueError) as err:
            raise DataError(f"[data] loss = {options.loss!r}: labels of shape {tuple(labels.shape)} do "
                            f"not fit the output of shape {tuple(out.shape)}: {first_line(err)}") from None

    return loss
