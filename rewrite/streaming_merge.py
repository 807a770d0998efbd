"""Streaming merge: fold a PEFT LoRA or DoRA adapter into a Hugging Face safetensors checkpoint, one tensor at a time.

    merge_checkpoint(MODEL_DIR, ADAPTER_DIR, OUT_DIR, force=False)     (CLI: rewrite merge)

1. Input: `model.safetensors.index.json` and the shards its `weight_map` names, or one `model.safetensors` (both
   at once: refused). safetensors' own reader (`safe_open`) checks every shard's header; each shard must hold
   exactly the tensors the index maps to it. Shard names are plain file names inside MODEL_DIR.
2. Names: a PEFT module path M (keys `base_model.model.M.lora_*`) folds into the checkpoint tensor `M.weight`;
   without that key, into the one key that differs from it only by leading dotted segments, either way (an
   adapter trained on `LlamaModel` against a `LlamaForCausalLM` checkpoint, whose keys add `model.`, or back).
   Several such keys, or none, is an error naming the module (with the nearest names); so are two modules on one
   tensor. Everything is resolved and shape-checked before anything is written.
3. The update, in the weight's own layout, computed as PEFT's merge does (`get_delta_weight`, then
   `W += delta`):
       Linear     W [out, in] += s (B A)       A = lora_A.weight [r, in], B = lora_B.weight [out, r]
       Conv1D     W [in, out] += s (B A)^T     (GPT-2; PEFT's fan_in_fan_out)
       Embedding  W [V, d]    += s (B A)^T     A = lora_embedding_A [r, V], B = lora_embedding_B [d, r]
   s = alpha / r (use_rslora: alpha / sqrt(r)), r and alpha per module from rank_pattern / alpha_pattern. Linear
   or Conv1D is the layout the shape fits; a square weight follows `fan_in_fan_out` (PEFT decides by module
   class, which a checkpoint does not record). The arithmetic is fp32 (fp64 for an fp64 weight) and the result
   is cast back to the tensor's dtype once: bf16 / fp16 checkpoints stay so and equal PEFT's fp32 merge cast to
   their dtype. A merged value that is NaN or beyond the dtype's largest finite one (fp16: 65504) is an error.
   Conv2d LoRA is refused.
   DoRA (`use_dora = true`; m = `lora_magnitude_vector`), PEFT's DoRA merge:
       W' = (m / n) (.) (W + delta)    n = the L2 norm of each output's weights in W + delta
   Linear: n and m per row of W [out, in], so a block of rows is merged alone. Conv1D (W [in, out]) and Embedding
   (W [V, d], n over V as PEFT takes it): per column, so the update is computed twice over the tensor (read from
   disk once), first for n (the sum of squares of W + delta, in the arithmetic's dtype), then to write W'.
4. `modules_to_save` (whole modules trained beside the adapter, e.g. a SEQ_CLS head): each saved tensor
   `M.<param>` replaces the checkpoint's (named as in rule 2), cast to its dtype, as PEFT's merge_and_unload keeps
   the trained copy; its shape must be the checkpoint tensor's, and a tensor both folded and replaced is an error.
   LoRA's `trainable_token_indices` likewise: the saved rows replace rows `ids` of the embedding `M.weight` (PEFT's
   index_copy), the ids inside the table and the width its own.
5. PEFT's saved copy of a targeted embedding's base weight (`<M>.base_layer.weight`) must equal the checkpoint's
   tensor: anything else is a retrained embedding, not an adapter.
6. Output: shards of the same names, each the input's header byte for byte (same names, dtypes, shapes and
   offsets) with the merged tensors' bytes in place; the index as it was; every other top-level file copied
   (links followed), except weights of other formats (`pytorch_model.bin`, `consolidated.safetensors`, ...: they
   hold the unmerged weights), which are left out and listed in the summary.
7. Memory and time: bytes no module touches are copied in 16 MiB blocks; a touched tensor is read alone (plain
   reads, no mmap: mapped pages would stay resident until the shard closes) and updated in place in blocks of
   rows of 2^18 elements (the block's fp32 update stays in cache) on one torch thread (blocks this small gain
   nothing from more, and lose much on a busy machine). A writer thread writes and fsyncs while the next tensor
   is read and merged (at most 2 buffers wait), and the kernel reads the shard ahead (posix_fadvise WILLNEED:
   page cache, not this process's memory). Peak ≈ the adapter + 3 x the largest touched tensor: never a shard,
   never the model.
8. Atomic (rewrite.publish): built in `.OUT.tmp-<id>` beside OUT and swapped in at the end, once every file is
   written and fsynced (a crash after the swap never finds a half-written shard under its final name either); an
   error or an interruption leaves no OUT and no temporary (a killed run's temporary is removed by the next run).
   An existing non-empty OUT is refused unless `force`, and even then unless it is a model directory
   (config.json or *.safetensors). OUT may not be MODEL_DIR, ADAPTER_DIR or a folder above them.
Progress: a task of one step per shard (rewrite.progress).
"""
from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import torch
from safetensors import safe_open

from rewrite.adapters.dora import DORA_FORMAT, MAGNITUDE
from rewrite.errors import AdapterFileError, ModelLoadError, OutputError, nearest
from rewrite.formats.peft_dir import PeftAdapter, read_peft_dir
from rewrite.formats.peft_lora import EMBEDDING_KEYS, LINEAR_KEYS, LORA_FORMAT, scale_of
from rewrite.progress import tracked
from rewrite.publish import Refusal, Staging

INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"
OTHER_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
BLOCK = 16 << 20  # bytes copied at a time
BLOCK_ELEMENTS = 1 << 18  # elements of W updated at a time (1 MiB of fp32: the update stays in cache)


class Tensor(NamedTuple):
    """A tensor of a shard: safetensors dtype name, shape, and its bytes [begin, end) in the file."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Shard:
    name: str
    path: Path
    size: int  # bytes of the whole file
    tensors: dict[str, Tensor]


@dataclass(frozen=True)
class Fold:
    """W += s (B A), transposed for Conv1D and Embedding: PEFT's `transpose(B @ A, fan_in_fan_out) * scaling`;
    with a DoRA magnitude m, then W *= m / n per output (rule 3)."""

    module: str
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    transposed: bool
    magnitude: torch.Tensor | None = None

    def updates(self, dtype: torch.dtype, rows: int) -> Iterator[tuple[slice, torch.Tensor]]:
        """(a block of `rows` rows of W, their update) for the whole of W: the block's rows of `(B @ A) * s`
        (transposed: `(B @ A[:, rows]).T * s`), each element the same dot product as in the whole product."""
        a, b = self.a.to(dtype), self.b.to(dtype)
        for start in range(0, a.shape[1] if self.transposed else b.shape[0], rows):
            block = slice(start, start + rows)
            product = (b @ a[:, block]).T if self.transposed else b[block] @ a
            yield block, product.mul_(self.scale)


class Replacement(NamedTuple):
    """Tensor bytes the adapter replaces (rule 4): the whole tensor, or the rows `rows` of it."""

    module: str
    what: str  # the saved tensor, for messages
    value: np.ndarray
    rows: list[int] | None = None


@dataclass
class MergeSummary:
    out_dir: Path
    shards: list[str]
    merged: dict[str, str]  # adapter module -> checkpoint tensor
    copied: list[str]
    left_out: list[str]
    shard_bytes: int

    def as_json(self) -> dict[str, Any]:
        return dict(output_dir=str(self.out_dir), shards=self.shards, merged=self.merged, copied=self.copied,
                    left_out=self.left_out, shard_bytes=self.shard_bytes)


def merge_checkpoint(model_dir: Path | str, adapter_dir: Path | str, out_dir: Path | str, *,
                     force: bool = False) -> MergeSummary:
    """Write MODEL_DIR's checkpoint with ADAPTER_DIR's LoRA or DoRA folded in to OUT_DIR (rules: the module
    docstring)."""
    model_dir, adapter_dir, out_dir = Path(model_dir), Path(adapter_dir), Path(out_dir)
    _check_apart(out_dir, model_dir, adapter_dir)
    shards = read_checkpoint(model_dir)
    adapter = read_peft_dir(adapter_dir, [LORA_FORMAT, DORA_FORMAT])
    tensors = {key: (shard, tensor) for shard in shards for key, tensor in shard.tensors.items()}
    folds, copies, saved = plan(adapter, tensors)
    copied, left_out = _other_files(model_dir, {shard.name for shard in shards})
    description = f"merge {adapter_dir.resolve().name} into {model_dir.resolve().name}"
    with Staging(out_dir, str(out_dir), _refusal(force)) as staging, _one_thread(), Writer() as writer:
        for shard in tracked(shards, description, total=len(shards)):
            write_shard(shard, staging.tmp / shard.name, folds, copies, saved, writer)
        for name in copied:
            handle = writer.open(staging.tmp / name)
            writer.write(handle, (model_dir / name).read_bytes())
            writer.finish(handle)
        writer.wait()
        staging.publish()
    merged = {fold.module: key for key, fold in folds.items()} | {f"{m} ({param})": key
                                                                   for key, (m, param, *_) in saved.items()}
    return MergeSummary(out_dir, [s.name for s in shards], merged, copied, left_out, sum(s.size for s in shards))


# ------------------------------------------------------------------------------------------ the checkpoint

def read_checkpoint(model_dir: Path) -> list[Shard]:
    """The shards of MODEL_DIR (rule 1), each checked against the index."""
    index, single = model_dir / INDEX, model_dir / SINGLE
    if index.is_file() and single.is_file():
        raise ModelLoadError(f"{model_dir}: holds both {SINGLE} and {INDEX}; which weights to merge is ambiguous "
                             "(remove the stale one)")
    if single.is_file():
        return [_shard(single, None)]
    if not index.is_file():
        raise ModelLoadError(f"{model_dir}: no {SINGLE} or {INDEX}; the streaming merge reads safetensors "
                             "checkpoints only")
    weight_map = _weight_map(index)
    by_shard: dict[str, set[str]] = {}
    for key, name in weight_map.items():
        by_shard.setdefault(name, set()).add(key)
    return [_shard(model_dir / name, by_shard[name]) for name in sorted(by_shard)]


def _weight_map(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ModelLoadError(f"{index}: not a readable JSON file ({err})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{index}: 'weight_map' must be a non-empty object of tensor name -> shard file")
    for key, name in weight_map.items():
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise ModelLoadError(f"{index}: 'weight_map'[{key!r}] is {name!r}; expected a file name in the directory")
    return weight_map


def _shard(path: Path, expected: set[str] | None) -> Shard:
    """A shard's header, checked by safe_open (offsets contiguous, sizes matching the file) and, under an index,
    holding exactly the `expected` tensors."""
    try:
        with safe_open(path, framework="pt"):
            pass
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length))
    except Exception as err:  # noqa: BLE001 - a missing or corrupt shard is bad input
        raise ModelLoadError(f"{path}: not a readable safetensors file: {err}") from None
    header.pop("__metadata__", None)
    start = 8 + length
    tensors = {key: Tensor(entry["dtype"], tuple(entry["shape"]), start + entry["data_offsets"][0],
                           start + entry["data_offsets"][1]) for key, entry in header.items()}
    if expected is not None and set(tensors) != expected:
        extra, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
        raise ModelLoadError(f"{path}: does not hold what {INDEX} maps to it (missing {missing[:5]}, not in the "
                             f"index {extra[:5]})")
    return Shard(path.name, path, path.stat().st_size, tensors)


# ------------------------------------------------------------------------------------------- the plan

def plan(adapter: PeftAdapter, tensors: Mapping[str, tuple[Shard, Tensor]]
         ) -> tuple[dict[str, Fold], dict[str, tuple[str, np.ndarray]], dict[str, Replacement]]:
    """{tensor key: its fold} for every adapter module, {tensor key: (module, PEFT's saved base copy)} (rule 5) and
    {tensor key: what replaces it} (rule 4)."""
    keys = resolve(adapter.modules, tensors)
    folds = {key: _fold(adapter, module, key, *tensors[key]) for module, key in keys.items()}
    copies = {key: (module, adapter.base_weights[module])
              for module, key in resolve(adapter.base_weights, tensors).items()}
    saved = {}
    wanted = [(m, p, a, None) for m, params in adapter.copies.items() for p, a in params.items()]
    wanted += [(m, "weight", rows, adapter.token_indices(m)) for m, rows in adapter.token_rows.items()]
    for module, param, array, ids in wanted:
        key = _key_of(module, tensors, param)
        what = f"{module}.{param}" if ids is None else f"{module}'s trainable_token_indices rows"
        if key in folds or key in saved:
            raise AdapterFileError(f"{adapter.path}: {what} and another part of the adapter both change {key!r}")
        _, tensor = tensors[key]
        expected = tensor.shape if ids is None else (len(ids), *tensor.shape[1:])
        if tuple(array.shape) != expected or tensor.dtype not in DTYPES or (ids and max(ids) >= tensor.shape[0]):
            raise AdapterFileError(f"{adapter.path}: {what} has shape {tuple(array.shape)}; the checkpoint's {key!r} "
                                   f"is {tensor.dtype} {tensor.shape} (a head built with another num_labels, or "
                                   "token ids outside the table?)")
        saved[key] = Replacement(module, what, array, ids)
    return folds, copies, saved


def resolve(modules: Iterable[str], keys: Collection[str]) -> dict[str, str]:
    """{module: checkpoint key} by rule 2: one key per module, one module per key."""
    found = {module: _key_of(module, keys) for module in modules}
    owners: dict[str, list[str]] = {}
    for module, key in found.items():
        owners.setdefault(key, []).append(module)
    shared = next((key for key, mods in owners.items() if len(mods) > 1), None)
    if shared is not None:
        raise AdapterFileError(f"adapter modules {owners[shared]} all fold into the checkpoint tensor {shared!r}")
    return found


def _key_of(module: str, keys: Collection[str], param: str = "weight") -> str:
    wanted = f"{module}.{param}"
    if wanted in keys:
        return wanted
    found = sorted(k for k in keys if k.endswith("." + wanted) or wanted.endswith("." + k))
    if len(found) == 1:
        return found[0]
    if found:
        raise AdapterFileError(f"adapter module {module!r} matches several checkpoint tensors by suffix: {found}; "
                               "its path must name one (the adapter was trained on another model class)")
    near = nearest(module, [k.removesuffix(f".{param}") for k in keys])
    raise AdapterFileError(f"adapter module {module!r} is not in the checkpoint (no tensor {wanted!r}, not even "
                           f"under another prefix); nearest module names: {near or 'none'}")


def _as_torch(array: np.ndarray) -> torch.Tensor:
    """At least fp32 (exact: bf16 / fp16 widen), so torch can take ml_dtypes' bfloat16 arrays; fp32 is not copied."""
    return torch.from_numpy(array.astype(np.promote_types(array.dtype, np.float32), copy=False))


def _fold(adapter: PeftAdapter, module: str, key: str, shard: Shard, tensor: Tensor) -> Fold:
    parts = adapter.modules[module]
    embedding = EMBEDDING_KEYS[0] in parts
    a, b = (parts[k] for k in (EMBEDDING_KEYS if embedding else LINEAR_KEYS))
    where = f"{adapter.path}: module {module!r} -> {shard.name}: {key!r}"
    if a.ndim != 2:
        raise AdapterFileError(f"{where}: a conv2d LoRA; the streaming merge folds Linear, Conv1D and Embedding "
                               "adapters only")
    if tensor.dtype not in DTYPES:
        raise ModelLoadError(f"{where} is {tensor.dtype}; only {', '.join(DTYPES)} weights can be merged")
    plain, flipped = (b.shape[0], a.shape[1]), (a.shape[1], b.shape[0])
    fits = [layout for layout, shape in ((False, plain), (True, flipped)) if tensor.shape == shape
            and (layout or not embedding)]
    if not fits:
        raise AdapterFileError(f"{where}: A {tuple(a.shape)} and B {tuple(b.shape)} make an update of shape "
                               f"{flipped if embedding else plain}, but the tensor has shape {tensor.shape}")
    transposed = fits[0] if len(fits) == 1 else getattr(adapter.config, "fan_in_fan_out", False) is True
    magnitude = parts.get(MAGNITUDE)
    if magnitude is not None:
        outputs = tensor.shape[1 if transposed else 0]
        if magnitude.size != outputs:
            raise AdapterFileError(f"{where}: {MAGNITUDE} has {magnitude.size} entries; the weight has {outputs} "
                                   "outputs")
        magnitude = _as_torch(magnitude).reshape(-1)
    return Fold(module, _as_torch(a), _as_torch(b), scale_of(adapter, module), transposed, magnitude)


# ------------------------------------------------------------------------------------------ the output

class Writer:
    """Writes, then fsyncs and closes, files on a thread of its own, in the order asked, while the caller reads
    and merges; at most `depth` writes wait, so the caller holds at most depth + 1 buffers."""

    def __init__(self, depth: int = 2):
        self.depth = depth
        self._pool = ThreadPoolExecutor(1)
        self._pending: deque[Future] = deque()
        self._files: list[BinaryIO] = []

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self._pool.shutdown(wait=True, cancel_futures=kind is not None)
        for handle in self._files:
            handle.close()

    def open(self, path: Path) -> BinaryIO:
        handle = open(path, "wb")  # noqa: SIM115 - closed by `finish` or on exit
        self._files.append(handle)
        return handle

    def write(self, handle: BinaryIO, data: bytes | np.ndarray) -> None:
        self._submit(_write, handle, data)

    def finish(self, handle: BinaryIO) -> None:
        """fsync and close `handle` once its writes are done."""
        self._submit(_sync_close, handle)

    def wait(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def _submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self._pending.append(self._pool.submit(fn, *args))
        while len(self._pending) > self.depth:
            self._pending.popleft().result()


@contextmanager
def _writing(handle: BinaryIO) -> Iterator[None]:
    """A failed write (a full disk) is an OutputError naming the file."""
    try:
        yield
    except OSError as err:
        raise OutputError(f"cannot write {handle.name}: {err.strerror or err}") from None


def _write(handle: BinaryIO, data: bytes | np.ndarray) -> None:
    with _writing(handle):
        handle.write(data)


def _sync_close(handle: BinaryIO) -> None:
    with _writing(handle):
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()


def write_shard(shard: Shard, out: Path, folds: Mapping[str, Fold], copies: Mapping[str, tuple[str, np.ndarray]],
                saved: Mapping[str, Replacement], writer: Writer) -> None:
    """`out` = the shard with every folded or replaced tensor in its merged bytes (rule 6), read and written in file
    order: the bytes between touched tensors (the header first) are copied as they are."""
    touched = sorted((t.begin, key, t) for key, t in shard.tensors.items()
                     if key in folds or key in copies or key in saved)
    dst = writer.open(out)
    with open(shard.path, "rb") as src:
        if hasattr(os, "posix_fadvise"):  # the disk reads ahead into the page cache while we compute (not our RSS)
            os.posix_fadvise(src.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
        position = 0
        for begin, key, tensor in touched:
            _copy(src, dst, begin - position, shard.path, writer)
            raw = np.empty(tensor.end - begin, np.uint8)  # not zero-filled, unlike a bytearray
            if src.readinto(raw) != raw.size:
                raise ModelLoadError(f"{shard.path}: ended inside tensor {key!r}")
            writer.write(dst, merged(raw, key, tensor, folds.get(key), copies.get(key), saved.get(key)))
            position = tensor.end
        _copy(src, dst, shard.size - position, shard.path, writer)
    writer.finish(dst)


def merged(raw: np.ndarray, key: str, tensor: Tensor, fold: Fold | None,
           copy: tuple[str, np.ndarray] | None, replacement: Replacement | None = None) -> np.ndarray:
    """`raw`, the bytes of `key`, with its fold added in place (rule 3), once its base copy is checked (rule 5), or
    (partly) replaced (rule 4)."""
    weight = torch.from_numpy(raw).view(DTYPES[tensor.dtype]).view(tensor.shape)
    if replacement is not None:
        value = _as_torch(replacement.value)
        if not bool(value.abs().le(torch.finfo(weight.dtype).max).all()):
            raise AdapterFileError(f"{replacement.what} is not finite in {tensor.dtype}")
        if replacement.rows is None:
            weight.copy_(value)
        else:
            weight[replacement.rows] = value.to(weight.dtype)
        return raw
    if copy is not None:
        saved = _as_torch(copy[1])
        if tuple(saved.shape) != tensor.shape or not torch.equal(saved.to(weight.dtype), weight):
            raise AdapterFileError(f"module {copy[0]!r}: the adapter carries a full base weight "
                                   f"({copy[0]}.base_layer.weight, shape {tuple(saved.shape)}) that differs from the "
                                   f"checkpoint's {key} (shape {tensor.shape}): resized or retrained embeddings are "
                                   "not an adapter; merge into the model they were trained with")
    if fold is None:
        return raw
    limit = torch.finfo(weight.dtype).max
    rows = max(1, BLOCK_ELEMENTS // max(1, weight[0].numel()))
    dtype = torch.promote_types(weight.dtype, torch.float32)
    columns = _column_factor(weight, fold, dtype, rows) if fold.magnitude is not None and fold.transposed else None
    for block, update in fold.updates(dtype, rows):
        part = weight[block]
        update += part  # fp32(W) + s (B A): PEFT's fp32 sum
        if columns is not None:
            update *= columns
        elif fold.magnitude is not None:  # rows are the outputs: n of this block's rows alone
            update *= (fold.magnitude[block].to(dtype) / torch.linalg.norm(update, dim=1)).unsqueeze(1)
        low, high = (float(v) for v in torch.aminmax(update))
        if not (-limit <= low and high <= limit):  # NaN fails both
            raise AdapterFileError(f"module {fold.module!r}: the merged {key} is not finite in {tensor.dtype} (the "
                                   f"update overflows the checkpoint's dtype: values {low:.6g} .. {high:.6g})")
        part.copy_(update)  # the one rounding, into `raw`
    return raw


def _column_factor(weight: torch.Tensor, fold: Fold, dtype: torch.dtype, rows: int) -> torch.Tensor:
    """DoRA's m / n for a weight whose outputs are its columns: n from a first pass over W + delta in row blocks."""
    squares = torch.zeros(weight.shape[1], dtype=dtype)
    for block, update in fold.updates(dtype, rows):
        update += weight[block]
        squares += update.square().sum(0)
    return fold.magnitude.to(dtype) / squares.sqrt()


def _copy(src: BinaryIO, dst: BinaryIO, count: int, path: Path, writer: Writer) -> None:
    while count > 0:
        block = src.read(min(count, BLOCK))
        if not block:
            raise ModelLoadError(f"{path}: ended early (was it changed while being read?)")
        writer.write(dst, block)
        count -= len(block)


def _other_files(model_dir: Path, shards: set[str]) -> tuple[list[str], list[str]]:
    """(files to copy as they are, files left out): rule 6."""
    copied, left_out = [], []
    for path in sorted(model_dir.iterdir()):
        if path.name in shards or not path.is_file():
            continue
        weights = Path(path.name.removesuffix(".index.json")).suffix in OTHER_WEIGHTS and path.name != INDEX
        (left_out if weights else copied).append(path.name)
    return copied, left_out


@contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one thread while merging: blocks of 2^18 elements are too small to split, and on a busy machine
    OpenMP's workers spin against other processes (0.54 GB: 1.8 s on one thread, 18 s on two, load average 7)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_apart(out_dir: Path, *inputs: Path) -> None:
    out = out_dir.resolve()
    for path in inputs:
        if out == path.resolve() or out in path.resolve().parents:
            raise OutputError(f"output directory {str(out_dir)!r} would replace {path}, which the merge reads; "
                              "choose another directory")


def _refusal(force: bool) -> Refusal:
    """Rule 7: an existing OUT is replaced only with `force`, and only when it is a model directory."""
    def why(directory: Path) -> str | None:
        if not any(directory.iterdir()):
            return None
        if not force:
            return "exists; replace it with `rewrite merge --force` (Python: force=True)"
        if (directory / "config.json").is_file() or any(directory.glob("*.safetensors")):
            return None
        return "exists and is not a model directory (no config.json or *.safetensors); it is never replaced"
    return why
