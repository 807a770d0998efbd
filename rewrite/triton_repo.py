"""`rewrite triton OUT -o REPO`: a Triton model repository from an unmerged export, and new versions for adapters.

    model_dir = write_repository("out/", "repo/", TritonOptions(max_batch_size=32))   # repo/<name>/1/
    add_version(model_dir, add={"tenant": "peft/tenant"}, remove=["style"])          # repo/<name>/2/
    # then the repository API: tritonclient.http.InferenceServerClient(url).load_model(name)

Rules:
  * OUT must hold an unmerged export that switches per row (`bank`, `custom-op`): Triton's ONNX Runtime backend runs
    every batch with IO binding, where ONNX Runtime ignores its own adapters (`ort-adapters`), and it refuses
    optional inputs when batching. Every input and output needs a dynamic leading (batch) axis.
  * REPO/<name> is never replaced: it is built beside its final place inside REPO and moved there whole; a name that
    exists is refused. A new version is built the same way, then the adapter table of config.pbtxt is rewritten.
  * Each version directory holds model.onnx (its external data files copied beside it) and a manifest.json
    whose export entry lists that version's adapters and slots, which a new version starts from; the model has a
    guard that fails a request whose id is not -1 or one of these slots.
  * `custom-op`: the library (this machine's build, or `library`) is copied to REPO/<name>/ and named in
    `model_operations` by its path in the server: `options.server_repo` (where REPO is mounted) or REPO's own path.
  * Adapters added in a version are read and checked like `AdapterSession.add_adapter` (sites, sizes, bank rank,
    dtype, finite values); a full bank, a taken name or an unknown one to remove is refused and nothing is written.
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from rewrite.errors import AdapterFileError, DeploymentError, ExportError, OutputError, RuntimeUseError, SpecError
from rewrite.formats.manifest import MANIFEST, ExportedAdapter, Manifest, UnmergedExport, read_manifest, write_manifest
from rewrite.names import check_adapter_name
from rewrite.options import TritonOptions
from rewrite.runtime.adapter_source import read_adapter
from rewrite.runtime.model_io import TensorSpec, read_io
from rewrite.triton_config import config_text, replace_adapter_table
from rewrite.triton_model import add_guard, drop_weight_inputs, save, set_loaded, write_slot
from rewrite.triton_readme import readme

CONFIG = "config.pbtxt"
TRITON_DIR = "triton"  # the repository inside OUT that `[export] target = "triton"` writes
LIBRARY = "librewrite_lora.so"


@dataclass(frozen=True)
class Written:
    model_dir: Path
    version: int
    files: list[Path]


def routed_export(directory: Path) -> tuple[Manifest, UnmergedExport]:
    """The manifest of `directory` and its per-row (bank / custom-op) export entry."""
    manifest = read_manifest(directory)
    entry = next((e for e in manifest.exports if e.mode == "unmerged"), None)
    if entry is None or not entry.routed:
        got = f"switching \"{entry.switching}\"" if entry else "no unmerged export"
        raise ExportError(f"{directory}: Triton needs an unmerged export with switching \"bank\" or \"custom-op\" "
                          f"(adapters chosen per row by an id), got {got}: its ONNX Runtime backend ignores ONNX "
                          "Runtime's own adapters and refuses optional inputs under dynamic batching")
    return manifest, entry


def _model_io(path: Path, ids: str) -> tuple[list[TensorSpec], TensorSpec, list[TensorSpec]]:
    inputs, outputs = read_io(path)
    fixed = [s for s in [*inputs, *outputs] if not s.batched]
    if fixed:
        raise ExportError(f"{path}: {fixed[0].name!r} has dims {list(fixed[0].dims)}: Triton's dynamic batcher needs a "
                          "dynamic leading (batch) axis on every input and output; export with [capture] dynamic = "
                          "true")
    own = [s for s in inputs if s.name != ids]
    return own, next(s for s in inputs if s.name == ids), outputs


def triton_name(out_dir: Path) -> str:
    """The default model name: OUT's folder name, made a valid Triton model name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", out_dir.resolve().name).lstrip("._-") or "model"


def _model_name(options: TritonOptions, out_dir: Path) -> TritonOptions:
    return options if options.name is not None else options.model_copy(update={"name": triton_name(out_dir)})


def _version_manifest(manifest: Manifest, entry: UnmergedExport, slots: dict[str, int]) -> Manifest:
    adapters = {name: ExportedAdapter(slot=slot) for name, slot in slots.items()}
    return manifest.model_copy(update={"exports": [entry.model_copy(update={"file": "model.onnx",
                                                                           "adapters": adapters})]})


def write_repository(out_dir: str | Path, repo: str | Path, options: TritonOptions = TritonOptions(),
                     library: str | Path | None = None) -> Written:
    """REPO/<name>/ (config.pbtxt, 1/model.onnx, 1/manifest.json, README.md, the custom-op library) from OUT."""
    out_dir, repo = Path(out_dir), Path(repo)
    manifest, entry = routed_export(out_dir)
    options = _model_name(options, out_dir)
    inputs, ids, outputs = _model_io(out_dir / entry.file, entry.ids_input)
    target = repo / options.name
    if target.exists() or target.is_symlink():
        raise OutputError(f"{target} exists: a Triton model directory is never replaced (remove it, or choose another "
                          "name with --name)")
    repo.mkdir(parents=True, exist_ok=True)
    server_dir = f"{(options.server_repo or str(repo.resolve())).rstrip('/')}/{options.name}"
    slots = {name: info.slot for name, info in entry.adapters.items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".rewrite-triton-{options.name}-", dir=repo))
    try:
        library_file = None
        if entry.switching == "custom-op":
            shutil.copyfile(library or _built_library(cuda=options.kind == "gpu"), tmp / LIBRARY)
            library_file = f"{server_dir}/{LIBRARY}"
        model = onnx.load(str(out_dir / entry.file), load_external_data=False)
        drop_weight_inputs(model)
        add_guard(model, entry.ids_input, entry.capacity, set(slots.values()))
        (tmp / "1").mkdir()
        save(model, tmp / "1", out_dir)
        write_manifest(tmp / "1" / MANIFEST, _version_manifest(manifest, entry, slots))
        (tmp / CONFIG).write_text(config_text(options.name, inputs, ids, outputs, options, slots, library_file))
        examples = {name: info.shape for name, info in manifest.inputs.items()}
        text = readme(options.name, str(out_dir), entry.switching, entry.capacity, inputs, ids.name, outputs, slots,
                      examples, library_file, str(repo.resolve()), server_dir.rsplit("/", 1)[0])
        (tmp / "README.md").write_text(text)
        tmp.chmod(0o755)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Written(target, 1, sorted(p for p in target.rglob("*") if p.is_file()))


def _built_library(cuda: bool) -> Path:
    """This machine's LoraDelta build: with the CUDA kernel for GPU instances (it holds the CPU kernel too)."""
    from rewrite.runtime.ops import library_path

    return library_path(cuda=cuda)


def versions(model_dir: Path) -> list[int]:
    """The version directories Triton sees (numeric names without leading zeros), ascending."""
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and re.fullmatch(r"[1-9][0-9]*", p.name))


def add_version(model_dir: str | Path, add: dict[str, Any] | None = None, remove: list[str] | None = None) -> Written:
    """REPO/<name>/<latest + 1>/: the latest version less `remove`, plus `add` ({name: PEFT dir, our .safetensors,
    .onnx_adapter or {site: (A, B)}}) in free slots; config.pbtxt gets the new adapter table."""
    model_dir, add, remove = Path(model_dir), dict(add or {}), list(remove or [])
    if not add and not remove:
        raise SpecError("a new version needs an adapter to add or remove")
    config = model_dir / CONFIG
    if not config.is_file():
        raise DeploymentError(f"{model_dir}: no {CONFIG} (was this written by `rewrite triton`?)")
    with open(model_dir / ".rewrite-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one new version at a time
        found = versions(model_dir)
        if not found:
            raise DeploymentError(f"{model_dir}: no version directory")
        latest = model_dir / str(found[-1])
        manifest, entry = routed_export(latest)
        slots = {name: info.slot for name, info in entry.adapters.items()}
        changes = _plan(entry, slots, add, remove, latest)
        model = onnx.load(str(latest / "model.onnx"), load_external_data=False)
        for slot, tensors in changes:
            write_slot(model, entry, slot, tensors, latest)
        set_loaded(model, entry.capacity, set(slots.values()))
        version = found[-1] + 1
        tmp = Path(tempfile.mkdtemp(prefix=f".rewrite-version-{version}-", dir=model_dir))
        try:
            save(model, tmp, latest)
            write_manifest(tmp / MANIFEST, _version_manifest(manifest, entry, slots))
            tmp.chmod(0o755)
            os.rename(tmp, model_dir / str(version))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        text = replace_adapter_table(config.read_text(), slots)
        staged = model_dir / f".{CONFIG}.tmp"
        staged.write_text(text)
        os.replace(staged, config)
    files = sorted(p for p in (model_dir / str(version)).rglob("*") if p.is_file())
    return Written(model_dir, version, [config, *files])


def _plan(entry: UnmergedExport, slots: dict[str, int], add: dict[str, Any], remove: list[str],
          where: Path) -> list[tuple[int, Any]]:
    """[(slot, AdapterTensors or None to clear)], updating `slots`; every problem is raised before anything is written."""
    changes = []
    for name in remove:
        if name not in slots:
            raise RuntimeUseError(f"--remove {name}: no such adapter in {where} (adapters: {sorted(slots)})")
        changes.append((slots.pop(name), None))
    sites = {s.site: dict(s.model_dump(), rank_limit=s.rank) for s in entry.sites}
    for name, source in add.items():
        check_adapter_name(name, f"--add {name}", SpecError)
        if name in slots:
            raise AdapterFileError(f"--add {name}: {where} already holds an adapter {name!r} (remove it in the same "
                                   "version to replace it)")
        free = next((s for s in range(entry.capacity) if s not in slots.values()), None)
        if free is None:
            raise AdapterFileError(f"--add {name}: the bank is full ({entry.capacity} slots); remove an adapter or "
                                   "export with a larger [export] capacity")
        tensors = read_adapter(source, sites, entry.row_sites, model_version=entry.model_version,
                               dtype=entry.bank_dtype, reserve=entry.reserve)
        slots[name] = free
        changes.append((free, tensors))
    return changes
