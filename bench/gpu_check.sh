#!/usr/bin/env bash
# GPU check of rewrite::LoraDelta's CUDA kernel. Run from the repo root on a machine with an NVIDIA GPU:
#
#   bash bench/gpu_check.sh            # about 2-5 minutes (most of it nvcc and one small ONNX export)
#
# 1. builds the CUDA library (CPU + CUDA kernels, one .so) and the ORT-free self-test into build/gpu, for sm_80,
#    sm_90 and the GPU found here (build.sh's default; CUDA_ARCHS overrides);
# 2. runs the self-test (CUDA kernel vs a CPU double reference, incl. -1 rows, 3-D blocks, broadcast, odd ranks and
#    widths, > 1000 blocks, rank 0; times B = 32 / B = 1 at d = 1024, r = 16, K = 8 with CUDA events), and again
#    under compute-sanitizer memcheck when that tool is there;
# 3. with onnxruntime-gpu (CUDAExecutionProvider available): runs 4 x (Gemm -> LoraDelta(x, A, B, ids, base)), the
#    fused form the custom-op export writes, with float32 and float16 banks of K = 32 adapters, on the CUDA EP with
#    CPU fallback disabled (so LoraDelta must run on the GPU), numerics vs a float64 per-row torch/numpy reference
#    (2-D / 3-D x, mixed ids with -1, one id broadcast, batch 1), IOBinding with x/y on the GPU and ids in host
#    memory, the out-of-range error, and the per-row latency of base + LoraDelta vs base (Gemm alone) through
#    IOBinding: float16 banks with 1, 8 and 32 distinct adapters in a batch of 32 rows (the ratios to read);
# 4. with onnxruntime-gpu and this project importable (torch too: it exports): `rewrite apply` exports a 4 x
#    Linear(1024) custom-op model with float16 banks, and `AdapterSession` opened with its default providers must
#    pick the CUDA EP and the CUDA build of the library (`rewrite.runtime.ops.library_path(cuda=True)`, built on
#    first use); 32 adapters added while serving, per-row answers at 1 / 8 / 32 distinct adapters vs a float64 numpy
#    forward pass, and AdapterSession.run's own latency (numpy in and out) vs the base rows.
#
# Needs: nvcc (same CUDA major as onnxruntime-gpu's, see the warning printed), g++, the ONNX Runtime headers —
# ORT_INCLUDE_DIR, or build/ort-headers from a machine that ran runtime/csrc/fetch_headers.sh (carry the folder
# when the GPU machine is offline). PYTHON (default python3) runs parts 3-4. Exit status: 0 all run parts passed,
# 1 a failure, 2 could not build. A part whose Python packages are missing says SKIPPED and does not fail.
# Without a GPU, GPU_CHECK_ON_CPU=1 skips parts 1-2 and runs parts 3-4 on the CPU EP (checks the script's logic),
# with GPU_CHECK_LIB (default: the CPU library, runtime/ops.py) in part 3.
set -uo pipefail
cd "$(dirname "$0")/.."
out=build/gpu
mkdir -p "$out"
status=0
PY="${PYTHON:-python3}"
say() { printf '\n== %s\n' "$*"; }

if [ "${GPU_CHECK_ON_CPU:-0}" = 1 ]; then
    say "GPU_CHECK_ON_CPU=1: no build, no self-test; parts 3-4 on the CPU EP"
    lib="${GPU_CHECK_LIB:-}"
    if [ -z "$lib" ]; then
        lib="$("$PY" -c 'from rewrite.runtime.ops import library_path; print(library_path())')" || exit 2
    fi
else
    say "GPU"
    nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi not available"
    nvcc --version 2>/dev/null | tail -1

    say "headers"
    if ! inc="$(bash runtime/csrc/fetch_headers.sh)"; then
        echo "no ONNX Runtime headers: set ORT_INCLUDE_DIR, or carry build/ort-headers from a machine with network" >&2
        exit 2
    fi
    echo "$inc"

    say "build (CUDA_ARCHS=${CUDA_ARCHS:-80 90 + the GPUs found})"
    t0=$(date +%s)
    if ! bash runtime/csrc/build.sh --cuda --selftest --cuda-only --out "$out"; then
        echo "build failed" >&2
        exit 2
    fi
    echo "built in $(( $(date +%s) - t0 )) s"
    lib="${GPU_CHECK_LIB:-$out/librewrite_lora_cuda.so}"

    say "self-test (CUDA kernel vs CPU double reference)"
    if ! "$out/lora_delta_cuda_selftest"; then status=1; fi
    if command -v compute-sanitizer >/dev/null; then
        say "self-test under compute-sanitizer memcheck"
        compute-sanitizer --tool memcheck --error-exitcode 9 "$out/lora_delta_cuda_selftest" --quick || status=1
    fi
fi

say "3. ONNX Runtime: LoraDelta graphs on $([ "${GPU_CHECK_ON_CPU:-0}" = 1 ] && echo the CPU EP || echo the CUDA EP)"
"$PY" - "$lib" <<'PY'
import re
import shutil
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
nvcc = shutil.which("nvcc")
nv = nvcc and re.search(r"release (\d+)", subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout)
if m and nv and m.group(1) != nv.group(1):
    print(f"WARNING: onnxruntime-gpu is built for CUDA {m.group(1)}, the library with nvcc CUDA {nv.group(1)}")
try:
    import torch
except ImportError:
    torch = None

D, R, K, LAYERS = 1024, 16, 32, 4
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
    ("float16 banks, 2-D batch 32, 32 ids with -1", s2h, (32, D), np.array([i if i % 5 else -1 for i in range(32)]),
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
    s2.run(None, {"x": x, "ids": np.array([0, K], np.int64)})
    print("FAIL out-of-range id: no error")
    failures += 1
except Exception as e:  # noqa: BLE001
    ok = "adapter index out of range" in str(e)
    failures += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {'out-of-range id -> error':42s} {str(e).splitlines()[-1][-80:]}")

# latency through IOBinding (device-resident x/y; ids on host), median of 300 runs after 30 warm-ups
base = session(build(False, False))


def latency(s: ort.InferenceSession, x: np.ndarray, ids: np.ndarray) -> float:
    xb = ort.OrtValue.ortvalue_from_numpy(x, DEV, 0)
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
    return float(np.median(ts)) * 1e6


print(f"\nper-row latency, 4 x Linear {D}, rank {R}, banks of K = {K}, {EP}, IOBinding (median of 300):")
PER_ROW = [("float16 banks, 1 distinct adapter", s2h, 1), ("float16 banks, 8 distinct adapters", s2h, 8),
           ("float16 banks, 32 distinct adapters", s2h, 32), ("float32 banks, 32 distinct adapters", s2, 32),
           ("float16 banks, all rows -1", s2h, 0)]
for batch, rows in ((32, PER_ROW), (1, [("float16 banks, 1 adapter", s2h, 1)])):
    x = rng.standard_normal((batch, D)).astype(np.float32)
    b0 = latency(base, x, np.zeros(batch, np.int64))
    print(f"  batch {batch:3d}  {'base (Gemm alone)':53s} {b0:8.1f} us")
    for name, s, distinct in rows:
        ids = (np.arange(batch) % distinct if distinct else np.full(batch, -1)).astype(np.int64)
        us = latency(s, x, ids)
        print(f"  batch {batch:3d}  {'Gemm + LoraDelta, ' + name:53s} {us:8.1f} us  {us / b0:5.2f}x base")
print("\nALL OK" if failures == 0 else f"\n{failures} FAILURE(S)")
sys.exit(1 if failures else 0)
PY
rc=$?
if [ "$rc" = 3 ]; then echo "(part 3 skipped)"; elif [ "$rc" != 0 ]; then status=1; fi

say "4. AdapterSession with its default providers"
"$PY" - "$out/session" <<'PY'
"""Export a custom-op model with float16 banks, open it with AdapterSession's defaults, add 32 adapters, check rows."""
import os
import sys
import time
from pathlib import Path

import numpy as np

work = Path(sys.argv[1])
try:
    import onnxruntime as ort
    import torch
    from rewrite.cli import main
    from rewrite.runtime import AdapterSession
except ImportError as err:
    print(f"SKIPPED: {err} (install this project: pip install -e . with torch; see README.md, On a GPU)")
    sys.exit(3)
ON_CPU = os.environ.get("GPU_CHECK_ON_CPU") == "1"
CUDA = "CUDAExecutionProvider"
if not ON_CPU and CUDA not in ort.get_available_providers():
    print("SKIPPED: no CUDAExecutionProvider (install onnxruntime-gpu, see README.md, On a GPU)")
    sys.exit(3)
D, R, LAYERS, K, BATCH = 1024, 16, 4, 32, 32
work.mkdir(parents=True, exist_ok=True)
(work / "gpu_check_model.py").write_text(f"""import torch
from torch import nn


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear({D}, {D}) for _ in range({LAYERS}))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def stack():
    torch.manual_seed(0)
    return Stack().eval()
""")
(work / "spec.toml").write_text(f"""version = 1
[[capture.inputs]]
name = "x"
shape = [4, {D}]
dims = ["batch", ""]
[[pass]]
name = "insert"
adapter = "seed"
targets = ["layers.*"]
rank = {R}
alpha = {R}
[export]
mode = "unmerged"
switching = "custom-op"
capacity = {K}
bank_dtype = "float16"
""")
sys.path.insert(0, str(work))
t0 = time.perf_counter()
if main(["apply", str(work / "spec.toml"), "gpu_check_model:stack", "-o", str(work / "out"), "-q"]) != 0:
    print("FAIL rewrite apply")
    sys.exit(1)
print(f"exported in {time.perf_counter() - t0:.1f} s")
import gpu_check_model  # noqa: E402

model = gpu_check_model.stack()
W = [(m.weight.detach().double().numpy(), m.bias.detach().double().numpy()) for m in model.layers]
rng = np.random.default_rng(1)
adapters = {f"t{k}": {f"layers.{i}": ((rng.standard_normal((D, R)) / D**0.5).astype(np.float32),
                                      (rng.standard_normal((R, D)) * 0.5 / R**0.5).astype(np.float32))
                      for i in range(LAYERS)} for k in range(K)}
t0 = time.perf_counter()
session = AdapterSession(work / "out")
print(f"opened in {time.perf_counter() - t0:.1f} s: providers {session.providers}, library {session.library.name}")
failures = 0
CPU = "CPUExecutionProvider"
want = ([CPU], "librewrite_lora-") if ON_CPU else ([CUDA, CPU], "librewrite_lora_cuda-")
if session.providers != want[0] or not session.library.name.startswith(want[1]):
    print(f"FAIL default providers / library: want {want[0]} and {want[1]}*.so")
    failures += 1
session.remove_adapter("seed")
for name, factors in adapters.items():
    session.add_adapter(name, factors)


def reference(x, names):
    """float64, per row: h <- h W^T + b + h A B with the adapter's A, B rounded to float16 (the banks' type)."""
    h = x.astype(np.float64)
    for i, (w, b) in enumerate(W):
        out = h @ w.T + b
        for n, name in enumerate(names):
            if name is not None:
                a, bb = (f.astype(np.float16).astype(np.float64) for f in adapters[name][f"layers.{i}"])
                out[n] += h[n] @ a @ bb
        h = out
    return h


x = rng.standard_normal((BATCH, D)).astype(np.float32)
rows = {d: [f"t{n % d}" for n in range(BATCH)] for d in (1, 8, 32)}
rows["mixed, None rows"] = [None if n % 5 == 4 else f"t{(7 * n) % K}" for n in range(BATCH)]
for label, names in rows.items():
    y = session.run({"x": x}, adapter_ids=names)[0]
    ref = reference(x, names)
    err = float(np.abs(y - ref).max())
    ok = err <= 1e-3 * (1 + float(np.abs(ref).max()))
    failures += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {f'distinct adapters: {label}':42s} max|err| {err:.2e}")


def median_us(names) -> float:
    for _ in range(20):
        session.run({"x": x}, adapter_ids=names)
    ts = []
    for _ in range(200):
        t = time.perf_counter()
        session.run({"x": x}, adapter_ids=names)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e6


print(f"\nAdapterSession.run latency, batch {BATCH} (numpy in and out; banks changed while serving are fed each run):")
b0 = median_us([None] * BATCH)
print(f"  {'all rows None (base)':32s} {b0:8.1f} us")
for d in (1, 8, 32):
    us = median_us(rows[d])
    print(f"  {f'{d} distinct adapters':32s} {us:8.1f} us  {us / b0:5.2f}x")
session.close()
print("\nALL OK" if failures == 0 else f"\n{failures} FAILURE(S)")
sys.exit(1 if failures else 0)
PY
rc=$?
if [ "$rc" = 3 ]; then echo "(part 4 skipped)"; elif [ "$rc" != 0 ]; then status=1; fi

say "summary"
[ "$status" = 0 ] && echo "gpu_check: PASSED (see above for skipped parts)" || echo "gpu_check: FAILED"
exit "$status"
