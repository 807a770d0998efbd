#!/usr/bin/env bash
# GPU check of rewrite::LoraDelta's CUDA kernel. Run from the repo root on a machine with an NVIDIA GPU:
#
#   bash bench/gpu_check.sh            # about 1-3 minutes (most of it nvcc)
#
# 1. builds the CUDA library (CPU + CUDA kernels, one .so) and the ORT-free self-test into build/gpu, for sm_80,
#    sm_90 and the GPU found here (CUDA_ARCHS overrides);
# 2. runs the self-test (CUDA kernel vs a CPU double reference, incl. -1 rows, 3-D blocks, broadcast, odd ranks and
#    widths, > 1000 blocks, rank 0; times B = 32 / B = 1 at d = 1024, r = 16, K = 8 with CUDA events), and again
#    under compute-sanitizer memcheck when that tool is there;
# 3. with onnxruntime-gpu (CUDAExecutionProvider available): runs 4 x (Gemm -> LoraDelta(x, A, B, ids, base)), the
#    fused form the custom-op export writes, with float32 and float16 banks, on the CUDA EP with CPU fallback
#    disabled (so LoraDelta must run on the GPU), numerics vs a float64 per-row torch/numpy reference (2-D / 3-D x,
#    mixed ids with -1, one id broadcast, batch 1), IOBinding with x/y on the GPU and ids in host memory, the
#    out-of-range error, and the latency of base vs base + LoraDelta through IOBinding.
#
# Needs: nvcc (same CUDA major as onnxruntime-gpu's, see the warning printed), g++, the ONNX Runtime headers —
# ORT_INCLUDE_DIR, or build/ort-headers from a machine that ran runtime/csrc/fetch_headers.sh (carry the folder
# when the GPU machine is offline). Exit status: 0 all run parts passed, 1 a failure, 2 could not build.
# Without a GPU, GPU_CHECK_ON_CPU=1 GPU_CHECK_LIB=<any LoraDelta .so> runs part 3 on the CPU EP (checks the script).
set -uo pipefail
cd "$(dirname "$0")/.."
out=build/gpu
mkdir -p "$out"
status=0
say() { printf '\n== %s\n' "$*"; }

say "GPU"
nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi not available"
nvcc --version 2>/dev/null | tail -1
cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')"
archs="${CUDA_ARCHS:-80 90}"
if [ -n "$cap" ] && [[ " $archs " != *" $cap "* ]] && [ "$cap" -ge 75 ] 2>/dev/null; then archs="$archs $cap"; fi

say "headers"
if ! inc="$(bash runtime/csrc/fetch_headers.sh)"; then
    echo "no ONNX Runtime headers: set ORT_INCLUDE_DIR, or carry build/ort-headers from a machine with network" >&2
    exit 2
fi
echo "$inc"

say "build (CUDA_ARCHS=$archs)"
t0=$(date +%s)
if ! CUDA_ARCHS="$archs" bash runtime/csrc/build.sh --cuda --selftest --cuda-only --out "$out"; then
    echo "build failed" >&2
    exit 2
fi
echo "built in $(( $(date +%s) - t0 )) s"

say "self-test (CUDA kernel vs CPU double reference)"
if ! "$out/lora_delta_cuda_selftest"; then status=1; fi
if command -v compute-sanitizer >/dev/null; then
    say "self-test under compute-sanitizer memcheck"
    if ! compute-sanitizer --tool memcheck --error-exitcode 9 "$out/lora_delta_cuda_selftest" --quick; then status=1; fi
fi

say "ONNX Runtime CUDA EP end to end"
python3 - "${GPU_CHECK_LIB:-$out/librewrite_lora_cuda.so}" <<'PY'
import re
import subprocess
import sys
import time

import numpy as np

lib = sys.argv[1]
try:
    import onnxruntime as ort
    from onnx import TensorProto, helper
except ImportError as err:
    print(f"SKIPPED: {err}")
    sys.exit(3)
print(f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}")
import os

EP, DEV = "CUDAExecutionProvider", "cuda"
if os.environ.get("GPU_CHECK_ON_CPU") == "1":  # dry run of this script's logic on the CPU EP (no GPU needed)
    EP, DEV = "CPUExecutionProvider", "cpu"
elif EP not in ort.get_available_providers():
    print("SKIPPED: no CUDAExecutionProvider (install onnxruntime-gpu with the CUDA major of nvcc)")
    sys.exit(3)
info = ort.get_build_info() if hasattr(ort, "get_build_info") else ""
m = re.search(r"cuda[_ -]?version[=: ]*(\d+)", info, re.I)
nv = re.search(r"release (\d+)", subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout)
if m and nv and m.group(1) != nv.group(1):
    print(f"WARNING: onnxruntime-gpu is built for CUDA {m.group(1)}, the library with nvcc CUDA {nv.group(1)}")
try:
    import torch
except ImportError:
    torch = None

D, R, K, LAYERS = 1024, 16, 8, 4
rng = np.random.default_rng(0)
W = [(rng.standard_normal((D, D)) / D**0.5).astype(np.float32) for _ in range(LAYERS)]
BIAS = [(rng.standard_normal(D) * 0.01).astype(np.float32) for _ in range(LAYERS)]
A = [(rng.standard_normal((K, D, R)) / D**0.5).astype(np.float32) for _ in range(LAYERS)]
B = [(rng.standard_normal((K, R, D)) * 0.5 / R**0.5).astype(np.float32) for _ in range(LAYERS)]


def build(with_delta: bool, rank3: bool, half: bool = False) -> bytes:
    """4 x (Gemm -> LoraDelta(h, A, B, ids, base)) with the shapes the exporter records (ORT then runs the op in
    place on the Gemm's output); with_delta=False: the base model. half: float16 banks."""
    init, nodes, h = [], [], "x"
    bank_type, bank_np = (TensorProto.FLOAT16, np.float16) if half else (TensorProto.FLOAT, np.float32)
    xshape = ["batch", "seq", D] if rank3 else ["batch", D]
    shapes = []
    for i in range(LAYERS):
        init.append(helper.make_tensor(f"b{i}", TensorProto.FLOAT, BIAS[i].shape, BIAS[i].tobytes(), raw=True))
        if rank3:
            nodes += [helper.make_node("MatMul", [h, f"Wt{i}"], [f"mm{i}"]),
                      helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"base{i}"])]
            wt = np.ascontiguousarray(W[i].T)
            init.append(helper.make_tensor(f"Wt{i}", TensorProto.FLOAT, wt.shape, wt.tobytes(), raw=True))
        else:
            nodes.append(helper.make_node("Gemm", [h, f"W{i}", f"b{i}"], [f"base{i}"], transB=1))
            init.append(helper.make_tensor(f"W{i}", TensorProto.FLOAT, W[i].shape, W[i].tobytes(), raw=True))
        if with_delta:
            a, b = A[i].astype(bank_np), B[i].astype(bank_np)
            init += [helper.make_tensor(f"A{i}", bank_type, a.shape, a.tobytes(), raw=True),
                     helper.make_tensor(f"B{i}", bank_type, b.shape, b.tobytes(), raw=True)]
            nodes.append(helper.make_node("LoraDelta", [h, f"A{i}", f"B{i}", "ids", f"base{i}"], [f"h{i}"],
                                          domain="rewrite"))
            shapes += [helper.make_tensor_value_info(n, TensorProto.FLOAT, xshape) for n in (f"base{i}", f"h{i}")]
        else:
            nodes.append(helper.make_node("Identity", [f"base{i}"], [f"h{i}"]))
        h = f"h{i}"
    nodes.append(helper.make_node("Identity", [h], ["y"]))
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, xshape),
                                       helper.make_tensor_value_info("ids", TensorProto.INT64, ["blocks"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], init, value_info=shapes)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("rewrite", 1)]).SerializeToString()


def reference(x: np.ndarray, ids: np.ndarray, half: bool = False) -> np.ndarray:
    """float64, per row: h <- h W^T + b + h A[k] B[k] (no delta where k < 0; A, B rounded to half for float16
    banks); torch when available."""
    bank_np = np.float16 if half else np.float32
    shape = x.shape
    h = x.reshape(-1, D).astype(np.float64)
    per = h.shape[0] // ids.size
    for i in range(LAYERS):
        if torch is not None:
            t = torch.from_numpy(h)
            out = (t @ torch.from_numpy(W[i]).double().T + torch.from_numpy(BIAS[i]).double()).numpy()
        else:
            out = h @ W[i].astype(np.float64).T + BIAS[i]
        for n in range(h.shape[0]):
            k = ids[n // per]
            if k >= 0:
                out[n] += h[n] @ A[i][k].astype(bank_np).astype(np.float64) @ B[i][k].astype(bank_np).astype(np.float64)
        h = out
    return h.reshape(shape)


def session(model: bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.register_custom_ops_library(lib)
    if EP != "CPUExecutionProvider":
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")  # every node on the GPU, or fail
    return ort.InferenceSession(model, so, providers=[EP])


failures = 0
s2, s3, s2h = session(build(True, False)), session(build(True, True)), session(build(True, False, half=True))
cases = [
    ("2-D batch 32, per-row ids with -1", s2, (32, D), np.array([i % 8 if i % 5 else -1 for i in range(32)]), False),
    ("2-D batch 32, one id broadcast", s2, (32, D), np.array([5]), False),
    ("2-D batch 1", s2, (1, D), np.array([3]), False),
    ("3-D 4 x 16, ids per sequence", s3, (4, 16, D), np.array([0, -1, 7, 2]), False),
    ("float16 banks, 2-D batch 32, ids with -1", s2h, (32, D), np.array([i % 8 if i % 5 else -1 for i in range(32)]),
     True),
]
for name, s, shape, ids, half in cases:
    x = rng.standard_normal(shape).astype(np.float32)
    ids = ids.astype(np.int64)
    y = s.run(None, {"x": x, "ids": ids})[0]
    ref = reference(x, ids, half)
    err = float(np.abs(y - ref).max())
    ok = err <= 1e-3 * (1 + float(np.abs(ref).max()))
    failures += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {name:42s} max|err| {err:.2e} (max|ref| {np.abs(ref).max():.2f})")

# IOBinding: x and y on the GPU, ids in host memory (the op declares ids a CPU input: no copy, no sync)
x = rng.standard_normal((32, D)).astype(np.float32)
ids = np.array([i % 8 for i in range(32)], np.int64)
xb = ort.OrtValue.ortvalue_from_numpy(x, DEV, 0)
io = s2.io_binding()
io.bind_ortvalue_input("x", xb)
io.bind_cpu_input("ids", ids)
io.bind_output("y", DEV, 0)
s2.run_with_iobinding(io)
y = io.copy_outputs_to_cpu()[0]
err = float(np.abs(y - reference(x, ids)).max())
ok = err <= 1e-3 * (1 + float(np.abs(y).max()))
failures += not ok
print(f"{'ok  ' if ok else 'FAIL'} {'IOBinding, x/y on GPU, ids on host':42s} max|err| {err:.2e}")

try:
    s2.run(None, {"x": x, "ids": np.array([0, 8], np.int64)})
    print("FAIL out-of-range id: no error")
    failures += 1
except Exception as e:  # noqa: BLE001
    ok = "adapter index out of range" in str(e)
    failures += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {'out-of-range id -> error':42s} {str(e).splitlines()[-1][-80:]}")

# latency through IOBinding (device-resident x/y; ids on host), median of 300 runs after 30 warm-ups
base = session(build(False, False))
print(f"\nlatency, 4 x Linear {D}, rank {R}, K = {K}, {EP}, IOBinding:")
for batch in (32, 1):
    x = rng.standard_normal((batch, D)).astype(np.float32)
    xb = ort.OrtValue.ortvalue_from_numpy(x, DEV, 0)
    res = {}
    for name, s, ids in (("base (Gemm)", base, np.zeros(batch, np.int64)),
                         ("Gemm + LoraDelta, mixed ids", s2, (np.arange(batch) % K).astype(np.int64)),
                         ("Gemm + LoraDelta f16, mixed ids", s2h, (np.arange(batch) % K).astype(np.int64)),
                         ("Gemm + LoraDelta, all -1", s2, np.full(batch, -1, np.int64))):
        io = s.io_binding()
        io.bind_ortvalue_input("x", xb)
        io.bind_cpu_input("ids", ids)
        io.bind_output("y", DEV, 0)
        for _ in range(30):
            s.run_with_iobinding(io)
        ts = []
        for _ in range(300):
            t = time.perf_counter()
            s.run_with_iobinding(io)
            io.synchronize_outputs()
            ts.append(time.perf_counter() - t)
        res[name] = float(np.median(ts)) * 1e6
    b0 = res["base (Gemm)"]
    for name, us in res.items():
        print(f"  batch {batch:3d}  {name:32s} {us:8.1f} us  {us / b0:5.2f}x base")
print("\nALL OK" if failures == 0 else f"\n{failures} FAILURE(S)")
sys.exit(1 if failures else 0)
PY
rc=$?
if [ "$rc" = 3 ]; then echo "(end-to-end part skipped)"; elif [ "$rc" != 0 ]; then status=1; fi

say "summary"
[ "$status" = 0 ] && echo "gpu_check: PASSED (see above for skipped parts)" || echo "gpu_check: FAILED"
exit "$status"
