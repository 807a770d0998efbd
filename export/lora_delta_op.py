"""The multi-adapter LoRA op `rewrite::LoraDelta` on the compiler side: the torch op and its ONNX form.

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

The C++ kernels that ONNX Runtime runs (CPU and CUDA) are built and located by `rewrite.runtime.ops`.
"""
from __future__ import annotations

import torch

DOMAIN = "rewrite"
OP_TYPE = "LoraDelta"
GROUP_OP_TYPE = "LoraDeltaGroup"
VERSION = 1


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


def _lora_delta_group_impl(x: torch.Tensor, a_bank: torch.Tensor, idx: torch.Tensor, bases: list[torch.Tensor],
                           b_banks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per member i: base_i + lora_delta(x, a_bank[..., o_i : o_i + r_i], b_banks[i], idx), o_i = r_1 + .. + r_(i-1)
    (the op without `base` is the delta alone)."""
    torch._check(len(bases) == len(b_banks) and len(bases) > 0,
                 lambda: "LoraDeltaGroup: one base output per member B bank, at least one member")
    torch._check(a_bank.dim() == 3 and sum(b.shape[1] for b in b_banks) == a_bank.shape[2],
                 lambda: "LoraDeltaGroup: the members' ranks must add up to A_bank's [K, d_in, sum r_i]")
    offsets = [sum(b.shape[1] for b in b_banks[:i]) for i in range(len(b_banks))]
    return [_lora_delta_impl(x, a_bank[..., o:o + b.shape[1]], b, idx, base)
            for o, b, base in zip(offsets, b_banks, bases)]


@torch.library.custom_op("rewrite::lora_delta_group", mutates_args=())
def lora_delta_group(x: torch.Tensor, a_bank: torch.Tensor, idx: torch.Tensor, bases: list[torch.Tensor],
                     b_banks: list[torch.Tensor]) -> list[torch.Tensor]:
    """The sites of a `fuse` group in one call (inference): a_bank [K, d_in, sum r_i] holds the members' A side by
    side, so x @ A is computed once per row; member i's output is base_i + (x @ a_bank[k])[.., o_i : o_i + r_i]
    @ b_banks[i][k], base_i where idx < 0."""
    return _lora_delta_group_impl(x, a_bank, idx, bases, b_banks)


@lora_delta_group.register_fake
def _lora_delta_group_fake(x, a_bank, idx, bases, b_banks):
    torch._check(len(bases) == len(b_banks) and len(bases) > 0,
                 lambda: "LoraDeltaGroup: one base output per member B bank, at least one member")
    return [base.new_empty(base.shape) for base in bases]


def register_onnx_schema() -> None:
    """Register the `rewrite::LoraDelta` and `rewrite::LoraDeltaGroup` (version 1) schemas with onnx (idempotent)."""
    import onnx

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
    if not onnx.defs.has(OP_TYPE, DOMAIN):
        onnx.defs.register_schema(schema)
    if onnx.defs.has(GROUP_OP_TYPE, DOMAIN):
        return
    Variadic = onnx.defs.OpSchema.FormalParameterOption.Variadic
    onnx.defs.register_schema(onnx.defs.OpSchema(
        GROUP_OP_TYPE,
        DOMAIN,
        VERSION,
        doc="The sites of a fuse group: y_i = base_i + (x @ A_bank[k])[:, o_i : o_i + r_i] @ B_i[k] (k = idx of the "
        "row's block; base_i where k < 0), A_bank = [A_1 | .. | A_m], o_i = r_1 + .. + r_(i-1).",
        inputs=[
            P("x", "T", "rows to adapt, [..., d_in]"),
            P("A_bank", "TB", "[K, d_in, sum r_i]: the members' A side by side"),
            P("idx", "tensor(int64)", "[B] adapter per row block, < 0 = none"),
            P("bases_then_B", "V", "base_1 .. base_m ([..., d_out_i] float32), then B_1 .. B_m ([K, r_i, d_out_i], "
              "the type of A_bank)", param_option=Variadic, is_homogeneous=False),
        ],
        outputs=[P("y", "T", "y_1 .. y_m: base_i + delta_i", param_option=Variadic, is_homogeneous=True)],
        type_constraints=[("T", ["tensor(float)"], "float32 activations"),
                          ("TB", ["tensor(float)", "tensor(float16)"], "adapter banks"),
                          ("V", ["tensor(float)", "tensor(float16)"], "bases (float32) and B banks (the type of "
                           "A_bank)")],
    ))


def _group_schema(members: int):
    """LoraDeltaGroup's schema with its variadic inputs and outputs spelled out for `members` members (not
    registered: it only tells the exporter how many outputs one node has)."""
    import onnx

    P = onnx.defs.OpSchema.FormalParameter
    return onnx.defs.OpSchema(
        GROUP_OP_TYPE, DOMAIN, VERSION,
        inputs=[P("x", "T"), P("A_bank", "TB"), P("idx", "tensor(int64)")]
        + [P(f"base_{i}", "T") for i in range(members)] + [P(f"B_{i}", "TB") for i in range(members)],
        outputs=[P(f"y_{i}", "T") for i in range(members)],
        type_constraints=[("T", ["tensor(float)"], ""), ("TB", ["tensor(float)", "tensor(float16)"], "")],
    )


def onnx_translation_table() -> dict:
    """`{torch.ops.rewrite.lora_delta.default: f}` for `torch.onnx.export(..., custom_translation_table=...)`."""
    import onnxscript

    register_onnx_schema()
    rewrite_opset = onnxscript.values.Opset(DOMAIN, VERSION)

    def lora_delta_onnx(x, a_bank, b_bank, idx, base=None):
        if base is None:
            return rewrite_opset.LoraDelta(x, a_bank, b_bank, idx)
        return rewrite_opset.LoraDelta(x, a_bank, b_bank, idx, base)

    def lora_delta_group_onnx(x, a_bank, idx, bases, b_banks):
        # the exporter gives a variadic output one value: call the op through a fixed-arity copy of its schema
        op = onnxscript.values.Op(rewrite_opset, GROUP_OP_TYPE, _group_schema(len(bases)))
        return op(x, a_bank, idx, *bases, *b_banks)

    return {torch.ops.rewrite.lora_delta.default: lora_delta_onnx,
            torch.ops.rewrite.lora_delta_group.default: lora_delta_group_onnx}
