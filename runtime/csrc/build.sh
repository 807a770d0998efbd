#!/usr/bin/env bash
# Build the rewrite::LoraDelta custom-op library for ONNX Runtime.
#
#   runtime/csrc/build.sh [--out DIR] [--lib PATH] [--cuda] [--selftest] [--cuda-only]
#
#   (default)     CPU library            DIR/librewrite_lora.so            (g++, ORT headers)
#   --cuda        CPU + CUDA library     DIR/librewrite_lora_cuda.so       (nvcc; the CUDA op is registered for
#                                                                           "CUDAExecutionProvider"; no CPU-only one)
#   --selftest    ORT-free CUDA test     DIR/lora_delta_cuda_selftest      (nvcc only, no ORT headers)
#   --cuda-only   skip the CPU library (with --selftest alone)
#
# DIR defaults to <repo>/build/lora (git-ignored); --lib names the library file instead: the CPU one, or with --cuda
# the CPU + CUDA one (runtime/ops.py uses it). Exit status: 0 built, 2 usage, 3 no ONNX Runtime headers, 4 no C++
# compiler, 5 no CUDA toolkit (nvcc or libcudart_static.a missing), other: the compiler's own (a failed compile).
# Headers: ORT_INCLUDE_DIR, else Debian trixie's libonnxruntime-dev fetched once into build/ort-headers
# (fetch_headers.sh). Compilers: CXX (g++), NVCC (nvcc); CUDA_ARCHS (default "80 90" plus the compute capability of
# each GPU nvidia-smi lists, from 75 on) -> -gencode sm_XX each, plus PTX of the newest for later GPUs. CPU code: one
# portable build and one -mavx2 -mfma -mf16c build of the micro-kernels, chosen at run time (never -march=native).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="$repo/build/lora"
lib=""
cpu=1; cuda=0; selftest=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        --lib) lib="$2"; shift 2 ;;
        --cuda) cuda=1; shift ;;
        --selftest) selftest=1; shift ;;
        --cuda-only) cpu=0; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
mkdir -p "$out"
CXX="${CXX:-g++}"
NVCC="${NVCC:-nvcc}"
command -v "$CXX" >/dev/null || { echo "build.sh: C++ compiler '$CXX' not found (set CXX)" >&2; exit 4; }

obj="$(mktemp -d "${TMPDIR:-/tmp}/rewrite_lora.XXXXXX")"
trap 'rm -rf "$obj"' EXIT

cxxflags=(-O3 -std=c++17 -fPIC -fvisibility=hidden -ffp-contract=fast -Wall -Wextra -Wno-psabi
          -Wno-unused-parameter -Wno-missing-field-initializers)
isa=()
case "$("$CXX" -dumpmachine)" in
    x86_64*|i?86*) isa=(-mavx2 -mfma -mf16c) ;;
esac
ldflags=(-shared -Wl,--version-script="$here/exports.map" -Wl,--no-undefined)
# after the objects: CXX may be a C driver (gcc: a library's build step may set CXX=gcc in the environment), which
# does not link the C++ runtime by itself
cxxlibs=(-lstdc++)

cpu_objects() {  # cpu_objects EXTRA_DEFINE...: compile the ORT-free CPU parts into $obj
    local pids=() p
    "$CXX" "${cxxflags[@]}" "$@" -c "$here/lora_delta_generic.cc" -o "$obj/generic.o" & pids+=($!)
    "$CXX" "${cxxflags[@]}" "${isa[@]}" "$@" -c "$here/lora_delta_avx2.cc" -o "$obj/avx2.o" & pids+=($!)
    "$CXX" "${cxxflags[@]}" "$@" -c "$here/lora_delta_cpu.cc" -o "$obj/cpu.o" & pids+=($!)
    for p in "${pids[@]}"; do wait "$p"; done
}

need_headers() {
    inc="$("$here/fetch_headers.sh")" || { echo "build.sh: no ONNX Runtime headers (see above)" >&2; exit 3; }
}

if [ "$cpu" = 1 ] && [ "$cuda" = 0 ]; then
    need_headers
    target="${lib:-$out/librewrite_lora.so}"
    mkdir -p "$(dirname "$target")"
    cpu_objects
    "$CXX" "${cxxflags[@]}" -I"$inc" -c "$here/lora_delta_op.cc" -o "$obj/op.o"
    "$CXX" "${ldflags[@]}" "$obj/generic.o" "$obj/avx2.o" "$obj/cpu.o" "$obj/op.o" "${cxxlibs[@]}" -o "$target.tmp$$"
    mv -f "$target.tmp$$" "$target"   # atomic: a process that already loaded the old file keeps it
    echo "$target"
fi

if [ "$cuda" = 1 ] || [ "$selftest" = 1 ]; then
    command -v "$NVCC" >/dev/null || { echo "build.sh: nvcc not found (install the CUDA toolkit or set NVCC)" >&2; exit 5; }
    # CUDA_HOME, else the toolkit nvcc reports (nvcc may be a wrapper script elsewhere).
    cuda_home="${CUDA_HOME:-$("$NVCC" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)}"
    [ -n "$cuda_home" ] || cuda_home="$(cd "$(dirname "$(command -v "$NVCC")")/.." && pwd)"
    gencode=()
    last=""
    archs="${CUDA_ARCHS:-}"
    if [ -z "$archs" ]; then  # the defaults, plus the GPUs of this machine (sm_75 ... not covered by sm_80 / PTX 90)
        archs="80 90"
        for cap in $(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | tr -d ' .' | sort -u); do
            [[ " $archs " == *" $cap "* ]] || { [ "$cap" -ge 75 ] 2>/dev/null && archs="$archs $cap"; }
        done
    fi
    for a in $archs; do gencode+=(-gencode "arch=compute_$a,code=sm_$a"); last="$a"; done
    gencode+=(-gencode "arch=compute_$last,code=compute_$last")
    nvflags=(-O3 -std=c++17 -DREWRITE_LORA_CUDA -Xcompiler -fPIC,-fvisibility=hidden "${gencode[@]}")
    "$NVCC" "${nvflags[@]}" -Xptxas -warn-spills -c "$here/lora_delta_cuda.cu" -o "$obj/cuda.o"
    cudalib=""
    for d in "$cuda_home/lib64" "$cuda_home/lib" "$cuda_home/targets/x86_64-linux/lib" "$cuda_home/targets/sbsa-linux/lib"; do
        [ -f "$d/libcudart_static.a" ] && { cudalib="$d"; break; }
    done
    [ -n "$cudalib" ] || { echo "build.sh: libcudart_static.a not found under $cuda_home (set CUDA_HOME)" >&2; exit 5; }
    cudalink=(-L"$cudalib" -lcudart_static -ldl -lrt -lpthread)
    if [ "$cuda" = 1 ]; then
        need_headers
        cpu_objects -DREWRITE_LORA_CUDA
        "$CXX" "${cxxflags[@]}" -DREWRITE_LORA_CUDA -I"$inc" -c "$here/lora_delta_op.cc" -o "$obj/op_cuda.o"
        target="${lib:-$out/librewrite_lora_cuda.so}"
        mkdir -p "$(dirname "$target")"
        "$CXX" "${ldflags[@]}" "$obj/generic.o" "$obj/avx2.o" "$obj/cpu.o" "$obj/op_cuda.o" "$obj/cuda.o" \
            "${cudalink[@]}" "${cxxlibs[@]}" -o "$target.tmp$$"
        mv -f "$target.tmp$$" "$target"
        echo "$target"
    fi
    if [ "$selftest" = 1 ]; then
        "$NVCC" "${nvflags[@]}" -c "$here/lora_delta_cuda_selftest.cu" -o "$obj/selftest.o"
        "$CXX" "$obj/selftest.o" "$obj/cuda.o" "${cudalink[@]}" -o "$out/lora_delta_cuda_selftest"
        echo "$out/lora_delta_cuda_selftest"
    fi
fi
