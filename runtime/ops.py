"""The multi-adapter LoRA op `rewrite::LoraDelta`: torch op, ONNX schema and ONNX Runtime library.

    y = lora_delta(x, a_bank, b_bank, idx, base=None)
        x [..., d_in], a_bank [K, d_in, r], b_bank [K, r, d_out], idx [B], base [..., d_out] or None
        x / base / y float32; the banks float32 or both float16 (half the bytes; widened to float32 in the kernel)

The N = prod(x.shape[:-1]) rows of x split into B equal blocks; the rows of block b get
`base_row + x_row @ a_bank[idx[b]] @ b_bank[idx[b]]`, or `base_row` when idx[b] < 0 (no adapter); without `base`
the delta alone (base = 0). The LoRA scale is folded into b_bank and smaller ranks are zero-padded to r. The base
product stays ORT's own Gemm/MatMul (ONNX.md §10) and its output is `base`, e.g.
`torch.ops.rewrite.lora_delta(x, A, B, idx, base(x))`: the add is fused into the op, which ONNX Runtime may run in
place on base's buffer.

* `torch.ops.rewrite.lora_delta` — a `torch.library.custom_op` with a torch reference implementation, a fake
  (meta) kernel, so it traces through `torch.export` / fx, and autograd (trains adapter banks).
* `register_onnx_schema()` / `onnx_translation_table()` — ONNX domain "rewrite", version 1; pass the table to
  `torch.onnx.export(..., dynamo=True, custom_translation_table=onnx_translation_table())` to get one
  `rewrite::LoraDelta` node per call (ONNX.md §6).
* `library_path()` — the C++ ONNX Runtime library (runtime/csrc), built on first use into build/lora and rebuilt
  when its sources change; `session_options_with_library()` registers it with an `ort.SessionOptions`.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path

import torch

from rewrite.errors import RewriteError

DOMAIN = "rewrite"
OP_TYPE = "LoraDelta"
VERSION = 1

CSRC = Path(__file__).resolve().parent / "csrc"
_BUILD_SCRIPT = CSRC / "build.sh"
_LIB_PREFIX = "librewrite_lora-"
_build_lock = threading.Lock()


class LoraLibraryError(RewriteError):
    """The LoraDelta library cannot be built (no compiler, no ONNX Runtime headers, compile error)."""


class LoraHeadersUnavailable(LoraLibraryError):
    """The ONNX Runtime headers could not be found or fetched (offline and no ORT_INCLUDE_DIR)."""


# ---------------------------------------------------------------------------------------------------------------
# torch op


def _check_args(x: torch.Tensor, a_bank: torch.Tensor, b_bank: torch.Tensor, idx: torch.Tensor,
                base: torch.Tensor | None = None) -> None:
    torch._check(x.dim() >= 1, lambda: "LoraDelta: x must be [..., d_in]")
    torch._check(a_bank.dim() == 3, lambda: "LoraDelta: A_bank must be [K, d_in, r]")
    torch._check(b_bank.dim() == 3, lambda: "LoraDelta: B_bank must be [K, r, d_out]")
    torch._check(idx.dim() <= 1, lambda: "LoraDelta: idx must be a 1-D int64 tensor [B]")
    torch._check(a_bank.shape[1] == x.shape[-1], lambda: "LoraDelta: A_bank dim 1 must equal the last dim of x")
    torch._check(a_bank.shape[0] == b_bank.shape[0], lambda: "LoraDelta: A_bank and B_bank hold different K")
    torch._check(a_bank.shape[2] == b_bank.shape[1], lambda: "LoraDelta: rank mismatch between A_bank and B_bank")
    torch._check(a_bank.dtype == b_bank.dtype, lambda: "LoraDelta: A_bank and B_bank must have one dtype")
    if base is not None:
        torch._check(base.shape == (*x.shape[:-1], b_bank.shape[2]),
                     lambda: "LoraDelta: base must have the shape of x with the last dim d_out")


def _lora_delta_impl(x: torch.Tensor, a_bank: torch.Tensor, b_bank: torch.Tensor, idx: torch.Tensor,
                     base: torch.Tensor | None = None) -> torch.Tensor:
    """Segmented reference: one `x_seg @ A_k @ B_k` per adapter present (SGMV order), plus base; differentiable."""
    _check_args(x, a_bank, b_bank, idx, base)
    d_in, d_out, k_count = x.shape[-1], b_bank.shape[2], a_bank.shape[0]
    rows = x.reshape(-1, d_in)
    n = rows.shape[0]
    ids = idx.reshape(-1).to(torch.int64)
    nb = ids.numel()
    if nb < 1 or n % nb:
        raise ValueError(f"LoraDelta: the {n} rows of x do not split into {nb} equal blocks (N % B != 0)")
    if bool((ids >= k_count).any()):
        raise IndexError("LoraDelta: adapter index out of range")
    blocks = rows.reshape(nb, n // nb, d_in)
    out = blocks.new_zeros(nb, n // nb, d_out)
    for k in torch.unique(ids[ids >= 0]).tolist():
        sel = (ids == k).nonzero().reshape(-1)
        out = out.index_put((sel,), blocks[sel] @ a_bank[k].to(x.dtype) @ b_bank[k].to(x.dtype))
    out = out.reshape(*x.shape[:-1], d_out)
    return out if base is None else base + out


@torch.library.custom_op("rewrite::lora_delta", mutates_args=())
def lora_delta(x: torch.Tensor, a_bank: torch.Tensor, b_bank: torch.Tensor, idx: torch.Tensor,
               base: torch.Tensor | None = None) -> torch.Tensor:
    """Reference implementation (torch): per block, base + x_rows @ a_bank[k] @ b_bank[k]; base where idx < 0."""
    return _lora_delta_impl(x, a_bank, b_bank, idx, base)


@lora_delta.register_fake
def _lora_delta_fake(x, a_bank, b_bank, idx, base=None):
    _check_args(x, a_bank, b_bank, idx, base)
    return x.new_empty((*x.shape[:-1], b_bank.shape[2]))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])


def _backward(ctx, grad):
    x, a_bank, b_bank, idx = ctx.saved_tensors[:4]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(need) for t, need in zip((x, a_bank, b_bank), ctx.needs_input_grad[:3])]
        y = _lora_delta_impl(*leaves, idx)
        wanted = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(y, wanted, grad, allow_unused=True) if wanted else ())
    base_grad = grad if len(ctx.needs_input_grad) > 4 and ctx.needs_input_grad[4] else None
    return (*(next(grads) if t.requires_grad else None for t in leaves), None, base_grad)


lora_delta.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# ONNX


def register_onnx_schema() -> None:
    """Register the `rewrite::LoraDelta` (version 1) schema with onnx (idempotent)."""
    import onnx

    if onnx.defs.has(OP_TYPE, DOMAIN):
        return
    P = onnx.defs.OpSchema.FormalParameter
    Optional = onnx.defs.OpSchema.FormalParameterOption.Optional
    schema = onnx.defs.OpSchema(
        OP_TYPE,
        DOMAIN,
        VERSION,
        doc="Multi-adapter LoRA: y[rows of block b] = base + x @ A_bank[idx[b]] @ B_bank[idx[b]], base where "
        "idx < 0; base absent = 0 (the delta alone).",
        inputs=[
            P("x", "T", "rows to adapt, [..., d_in]"),
            P("A_bank", "TB", "[K, d_in, r] (matmul layout)"),
            P("B_bank", "TB", "[K, r, d_out] (LoRA scale folded in)"),
            P("idx", "tensor(int64)", "[B] adapter per row block, < 0 = none"),
            P("base", "T", "[..., d_out] the base layer's output (optional)", param_option=Optional),
        ],
        outputs=[P("y", "T", "base + delta, [..., d_out]")],
        type_constraints=[("T", ["tensor(float)"], "float32 activations"),
                          ("TB", ["tensor(float)", "tensor(float16)"], "adapter banks: float32, or float16 (half "
                           "the bytes, widened to float32 in the kernel)")],
    )
    onnx.defs.register_schema(schema)


def onnx_translation_table() -> dict:
    """`{torch.ops.rewrite.lora_delta.default: f}` for `torch.onnx.export(..., custom_translation_table=...)`."""
    import onnxscript

    register_onnx_schema()
    rewrite_opset = onnxscript.values.Opset(DOMAIN, VERSION)

    def lora_delta_onnx(x, a_bank, b_bank, idx, base=None):
        if base is None:
            return rewrite_opset.LoraDelta(x, a_bank, b_bank, idx)
        return rewrite_opset.LoraDelta(x, a_bank, b_bank, idx, base)

    return {torch.ops.rewrite.lora_delta.default: lora_delta_onnx}


# ---------------------------------------------------------------------------------------------------------------
# ONNX Runtime library


def build_dir() -> Path:
    """Where the library is built: $REWRITE_BUILD_DIR, else <repo>/build/lora (git-ignored) in a source
    checkout, else the user's cache ($XDG_CACHE_HOME or ~/.cache)/rewrite/lora for an installed package."""
    env = os.environ.get("REWRITE_BUILD_DIR")
    if env:
        return Path(env) / "lora"
    repo = CSRC.parents[1]
    if (repo / "pyproject.toml").is_file():
        return repo / "build" / "lora"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "rewrite" / "lora"


def _digest() -> str:
    h = hashlib.sha256()
    for f in sorted(CSRC.iterdir()):
        if f.is_file() and f.suffix in {".h", ".cc", ".inc", ".map", ".sh"}:
            h.update(f.name.encode())
            h.update(f.read_bytes())
    for var in ("CXX", "ORT_INCLUDE_DIR"):
        h.update(f"{var}={os.environ.get(var, '')}".encode())
    return h.hexdigest()[:12]


def library_path(build: bool = True) -> Path:
    """Path of the CPU custom-op library, built (once per source digest) when missing and `build` is true.

    Raises LoraHeadersUnavailable when the ONNX Runtime headers cannot be had (set ORT_INCLUDE_DIR),
    LoraLibraryError for a missing compiler or a failed compile, or when `build` is false and nothing is built.
    """
    out = build_dir()
    path = out / f"{_LIB_PREFIX}{_digest()}.so"
    if path.is_file():
        return path
    if not build:
        raise LoraLibraryError(f"the LoraDelta library is not built ({path}); call library_path(build=True)")
    if shutil.which("bash") is None:
        raise LoraLibraryError("building the LoraDelta library needs bash")
    out.mkdir(parents=True, exist_ok=True)
    with _build_lock, open(out / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time across processes (pytest-xdist, parallel runs)
        if path.is_file():
            return path
        proc = subprocess.run(
            ["bash", str(_BUILD_SCRIPT), "--lib", str(path)], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0 or not path.is_file():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            if proc.returncode == 3:
                raise LoraHeadersUnavailable(
                    "cannot build the LoraDelta library: no ONNX Runtime headers (set ORT_INCLUDE_DIR to a folder "
                    f"holding onnxruntime_cxx_api.h and onnxruntime_lite_custom_op.h)\n{tail}"
                )
            if proc.returncode == 4:
                raise LoraLibraryError(f"cannot build the LoraDelta library: no compiler\n{tail}")
            raise LoraLibraryError(f"building the LoraDelta library failed (exit {proc.returncode}):\n{tail}")
        for old in out.glob(f"{_LIB_PREFIX}*.so"):  # stale builds (a loaded copy stays mapped in its process)
            if old != path:
                old.unlink(missing_ok=True)
    return path


def session_options_with_library(options=None, build: bool = True):
    """An `onnxruntime.SessionOptions` (the given one, or a new one) with the LoraDelta library registered."""
    import onnxruntime as ort

    so = options if options is not None else ort.SessionOptions()
    so.register_custom_ops_library(str(library_path(build=build)))
    return so
