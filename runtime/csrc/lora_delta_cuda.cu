// rewrite::LoraDelta on CUDA: y = base + delta or the delta alone (the base product stays ORT's cuBLAS Gemm).
// ORT-free.
//
// Design (BGMV / SGMV, fused): the rows of one idx block are a contiguous segment that shares one adapter, so a CTA
// takes a tile of up to ROWS rows of one block and does both halves for them:
//   shrink  t[ROWS, r] = x_tile @ A_k     thread (g, c) of r * G threads accumulates rank column c over the d_in
//                                          positions j = g, g + G, ...: consecutive threads read consecutive A_k
//                                          elements (coalesced), x is a broadcast; the G partial sums are reduced
//                                          in shared memory
//   expand  y[ROWS, :] = t @ B_k           threads over output columns (coalesced B_k reads and y writes), each B
//                                          element reused for all ROWS rows; t comes from shared memory
// No scratch in global memory, so nothing to free and no synchronisation: everything is enqueued on the caller's
// stream (ORT's compute stream). With a base, y starts as base (in place, or one device-to-device copy first) and
// the kernel adds to it, leaving idx < 0 blocks alone; without one, blocks with idx < 0 write zeros.
//
// The adapter ids arrive in host memory (the ORT op declares idx a CPU input, the ids are checked on the host) and
// travel to the GPU inside the kernel parameters, CAP ids per launch (one launch per CAP blocks): no host->device
// copy, no staging buffer, no stream synchronisation. Banks are float32 or float16 (TB); arithmetic is float.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "lora_delta.h"

namespace rewrite_lora {
namespace {

struct Args {
  const float* x;
  const void* a;
  const void* b;
  float* y;
  int64_t L;     // rows per block
  int64_t din, r, dout;
  int64_t b0;    // first block of this launch
  int tiles_per_block;
  int groups;    // G: d_in slices per rank column (blockDim.x == r * G)
  int accumulate;  // y holds the base output: add the delta
};

template <int CAP>
struct Ids {
  int32_t v[CAP];
};

// __grid_constant__: ids.v[lb] with a run-time index reads the parameter bank directly (ld.param) instead of
// copying the whole array to local memory in every thread.
__device__ __forceinline__ float ldf(const float* p) { return __ldg(p); }
__device__ __forceinline__ float ldf(const __half* p) { return __half2float(__ldg(p)); }

template <int ROWS, int CAP, typename TB>
__global__ void __launch_bounds__(ROWS == 1 ? 1024 : 256)
    lora_delta_kernel(const Args p, const __grid_constant__ Ids<CAP> ids) {
  extern __shared__ float smem[];
  const int r = static_cast<int>(p.r);
  float* t_s = smem;                // [ROWS][r]
  float* red = smem + ROWS * r;     // [ROWS][blockDim.x]
  const int nt = blockDim.x;
  const int tid = threadIdx.x;
  const int lb = blockIdx.x / p.tiles_per_block;
  const int64_t tile_row = static_cast<int64_t>(blockIdx.x % p.tiles_per_block) * ROWS;
  const int64_t row0 = (p.b0 + lb) * p.L + tile_row;
  const int nr = static_cast<int>(min(static_cast<int64_t>(ROWS), p.L - tile_row));
  const int k = ids.v[lb];
  float* y0 = p.y + row0 * p.dout;

  if (k < 0) {  // no adapter: the delta is zero
    if (!p.accumulate)
      for (int64_t e = tid; e < static_cast<int64_t>(nr) * p.dout; e += nt) y0[e] = 0.0f;
    return;
  }
  const TB* a = static_cast<const TB*>(p.a) + static_cast<int64_t>(k) * p.din * p.r;
  const TB* b = static_cast<const TB*>(p.b) + static_cast<int64_t>(k) * p.r * p.dout;
  const float* x0 = p.x + row0 * p.din;

  // shrink: thread tid owns rank column c = tid % r and d_in slice g = tid / r.
  const int c = tid % r;
  const int g = tid / r;
  float acc[ROWS];
#pragma unroll
  for (int i = 0; i < ROWS; ++i) acc[i] = 0.0f;
  for (int64_t j = g; j < p.din; j += p.groups) {
    const float av = ldf(a + j * p.r + c);
#pragma unroll
    for (int i = 0; i < ROWS; ++i)
      if (i < nr) acc[i] += __ldg(x0 + i * p.din + j) * av;
  }
#pragma unroll
  for (int i = 0; i < ROWS; ++i) red[i * nt + tid] = acc[i];
  __syncthreads();
  for (int q = tid; q < ROWS * r; q += nt) {
    const int i = q / r, cc = q % r;
    float s = 0.0f;
    for (int gg = 0; gg < p.groups; ++gg) s += red[i * nt + gg * r + cc];
    t_s[q] = s;
  }
  __syncthreads();

  // expand: threads over output columns.
  for (int64_t col = tid; col < p.dout; col += nt) {
    float o[ROWS];
#pragma unroll
    for (int i = 0; i < ROWS; ++i) o[i] = 0.0f;
    const TB* bp = b + col;
    for (int j = 0; j < r; ++j) {
      const float bv = ldf(bp + static_cast<int64_t>(j) * p.dout);
#pragma unroll
      for (int i = 0; i < ROWS; ++i) o[i] += t_s[i * r + j] * bv;
    }
#pragma unroll
    for (int i = 0; i < ROWS; ++i)
      if (i < nr) y0[i * p.dout + col] = p.accumulate ? y0[i * p.dout + col] + o[i] : o[i];
  }
}

constexpr size_t kSmemLimit = 48 * 1024;  // default dynamic shared memory limit, no opt-in needed

size_t smem_bytes(int rows, int64_t r, int nt) { return sizeof(float) * static_cast<size_t>(rows) * (r + nt); }

template <int ROWS, int CAP, typename TB>
std::string launch(const Problem& p, Args args, int nt, cudaStream_t stream) {
  const int64_t L = p.n / p.nb;
  const int64_t tpb = (L + ROWS - 1) / ROWS;
  if (tpb * CAP > 0x7fffffffLL) return "LoraDelta (CUDA): too many rows per idx block";
  args.tiles_per_block = static_cast<int>(tpb);
  const size_t smem = smem_bytes(ROWS, p.r, nt);
  for (int64_t b0 = 0; b0 < p.nb; b0 += CAP) {
    const int64_t cnt = std::min<int64_t>(CAP, p.nb - b0);
    Ids<CAP> ids;
    for (int64_t i = 0; i < cnt; ++i) ids.v[i] = p.idx[b0 + i] < 0 ? -1 : static_cast<int32_t>(p.idx[b0 + i]);
    args.b0 = b0;
    const unsigned grid = static_cast<unsigned>(cnt * tpb);
    lora_delta_kernel<ROWS, CAP, TB><<<grid, nt, smem, stream>>>(args, ids);
  }
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return std::string("LoraDelta (CUDA): kernel launch failed: ") + cudaGetErrorString(e);
  return "";
}

template <int ROWS, typename TB>
std::string launch_ids(const Problem& p, const Args& args, int nt, cudaStream_t stream) {
  // Small batches pass their ids in a 128-byte parameter block, large ones 1000 per launch (4 000 bytes: within
  // the classic 4 KB kernel-parameter limit).
  if (p.nb <= 32) return launch<ROWS, 32, TB>(p, args, nt, stream);
  return launch<ROWS, 1000, TB>(p, args, nt, stream);
}

template <int ROWS>
std::string launch_rows(const Problem& p, const Args& args, int nt, cudaStream_t stream) {
  if (p.half_banks) return launch_ids<ROWS, __half>(p, args, nt, stream);
  return launch_ids<ROWS, float>(p, args, nt, stream);
}

}  // namespace

std::string lora_delta_cuda(const Problem& p, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (p.n == 0 || p.dout == 0) return "";
  if (p.r > 1024) return "LoraDelta (CUDA): rank above 1024 is not supported";
  const size_t y_bytes = sizeof(float) * static_cast<size_t>(p.n * p.dout);
  if (p.base != nullptr && p.base != p.y) {
    const cudaError_t e = cudaMemcpyAsync(p.y, p.base, y_bytes, cudaMemcpyDeviceToDevice, stream);
    if (e != cudaSuccess) return std::string("LoraDelta (CUDA): ") + cudaGetErrorString(e);
  }
  if (p.r == 0 && p.base != nullptr) return "";
  if (p.r == 0) {
    const cudaError_t e = cudaMemsetAsync(p.y, 0, y_bytes, stream);
    return e == cudaSuccess ? "" : std::string("LoraDelta (CUDA): ") + cudaGetErrorString(e);
  }
  const int groups = p.r <= 256 ? static_cast<int>(256 / p.r) : 1;
  const int nt = static_cast<int>(p.r) * groups;
  Args args{p.x, p.a, p.b, p.y, p.n / p.nb, p.din, p.r, p.dout, 0, 0, groups, p.base != nullptr};
  const int64_t L = p.n / p.nb;
  // Rows per CTA: as many as the block holds (up to 8) within the default shared-memory limit; ranks above 256
  // take one thread per rank column (up to 1024 threads), which only the one-row kernel is bounded for.
  if (nt > 256) return launch_rows<1>(p, args, nt, stream);
  if (L >= 8 && smem_bytes(8, p.r, nt) <= kSmemLimit) return launch_rows<8>(p, args, nt, stream);
  if (L >= 4 && smem_bytes(4, p.r, nt) <= kSmemLimit) return launch_rows<4>(p, args, nt, stream);
  if (L >= 2 && smem_bytes(2, p.r, nt) <= kSmemLimit) return launch_rows<2>(p, args, nt, stream);
  return launch_rows<1>(p, args, nt, stream);
}

}  // namespace rewrite_lora
