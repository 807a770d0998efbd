// rewrite::LoraDelta — the multi-adapter LoRA op (ORT-free declarations).
//
//   y[n, :] = base[n, :] + x[n, :] @ A_bank[k] @ B_bank[k]    k = idx[n / (N / nb)]: rows of block b use idx[b]
//   y[n, :] = base[n, :]                                      when k < 0 (no adapter)
//
// x is [N, d_in] row-major (leading dims flattened), A_bank [K, d_in, r], B_bank [K, r, d_out] (matmul layout, the
// LoRA scale folded into B, smaller ranks zero-padded to r; float32, or both float16 to halve the bytes streamed),
// idx [nb] int64 with N % nb == 0. The base GEMM is not computed here: it stays ORT's own Gemm/MatMul and its
// output is the optional input `base` (absent: base = 0, the delta alone). ORT may hand the op base's buffer as y
// (in place); otherwise the op copies base into y first.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

namespace rewrite_lora {

// One output of a call: y = base + (x @ A_bank[k])[:, off : off + r] @ B_bank[k]. The single op has one (off 0, r the
// rank of A_bank); the grouped op LoraDeltaGroup (the sites of a `fuse` group: A_bank holds their A side by side)
// has one per member, so x @ A_bank[k] is computed once per row for all of them.
struct Member {
  const void* b = nullptr;      // [K, r, dout], the type of A_bank
  const float* base = nullptr;  // [N, dout] or null (delta only); may equal y (in place)
  float* y = nullptr;           // [N, dout]
  int64_t off = 0, r = 0, dout = 0;
};

struct Problem {
  const float* x = nullptr;      // [N, din]
  const void* a = nullptr;       // [K, din, r]  float, or IEEE half bits (uint16_t) when half_banks
  const void* b = nullptr;       // [K, r, dout] same type as a
  bool half_banks = false;
  const int64_t* idx = nullptr;  // [nb] (host memory)
  const float* base = nullptr;   // [N, dout] or null (delta only); may equal y (in place)
  float* y = nullptr;            // [N, dout]
  int64_t n = 0, nb = 1, din = 0, r = 0, dout = 0, k = 0;
  const Member* members = nullptr;  // CPU only: the grouped op's outputs (b, base, y, dout above unused); null: one
  int64_t n_members = 0;
};

// IEEE half (bits) -> float, exact for every value (normals, subnormals, zeros, infinities, NaN).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: man * 2^-24, renormalised
    uint32_t m = man, e = 113;
    while (!(m & 0x400u)) {
      m <<= 1;
      --e;
    }
    bits = sign | (e << 23) | ((m & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Shape checks shared by the CPU and CUDA ops. Returns "" when the shapes are fine, else the message
// (every message starts with "LoraDelta: "). Fills p.n, p.nb, p.din, p.r, p.dout, p.k.
std::string check_shapes(const int64_t* x_shape, size_t x_rank, const int64_t* a_shape, size_t a_rank,
                         const int64_t* b_shape, size_t b_rank, const int64_t* idx_shape, size_t idx_rank,
                         Problem& p);

// The grouped op's extra checks: members' B banks [K, r_i, dout_i] with sum r_i = the rank of A_bank, bases
// [..., dout_i]. Returns "" or the message.
std::string check_member(const int64_t* b_shape, size_t b_rank, const int64_t* base_shape, size_t base_rank,
                         const int64_t* x_shape, size_t x_rank, int64_t k, size_t index);

// Every idx[i] < K (negative means "no adapter"). Returns "" or the message.
std::string check_indices(const int64_t* idx, int64_t nb, int64_t k);

// How the CPU kernel may run work items in parallel: run(ctx, fn, total, max_batches) must call fn(data, i) once
// for every i < total, possibly concurrently. ORT's op passes its intra-op pool (KernelContext::ParallelFor); a null
// run means serial.
struct Executor {
  void (*run)(void* ctx, void (*fn)(void*, size_t), size_t total, size_t max_batches, void* data) = nullptr;
  void* ctx = nullptr;
  int threads = 1;  // upper bound on useful concurrency (REWRITE_LORA_THREADS, default hardware concurrency)
};

// The CPU kernel (idx already checked). Picks the AVX2+FMA build when the CPU has it, else the portable one;
// REWRITE_LORA_ISA=generic forces the portable build.
void lora_delta_cpu(const Problem& p, const Executor& ex);

// Which CPU build lora_delta_cpu will use right now ("avx2" or "generic").
const char* cpu_isa();

// Threads from REWRITE_LORA_THREADS (>= 1), default std::thread::hardware_concurrency().
int env_threads();

// One work item: rows[0:m] (all using `adapter`), columns [c0, c1) of the members' outputs laid side by side.
namespace generic {
void run_item(const Problem& p, const Member* members, int64_t n_members, const int64_t* rows, int64_t m,
              int64_t adapter, int64_t c0, int64_t c1);
}
namespace avx2 {
void run_item(const Problem& p, const Member* members, int64_t n_members, const int64_t* rows, int64_t m,
              int64_t adapter, int64_t c0, int64_t c1);
}

#ifdef REWRITE_LORA_CUDA
// The CUDA kernel: x, a, b, y are device pointers, idx is host memory (already checked); stream-ordered on
// `stream` (a cudaStream_t), no synchronisation. Returns "" or a CUDA error message.
std::string lora_delta_cuda(const Problem& p, void* stream);
#endif

}  // namespace rewrite_lora
