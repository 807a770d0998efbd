// ORT-free self-test of the CUDA LoraDelta kernel against a CPU double-precision reference.
//   lora_delta_cuda_selftest [--quick]  exit 0 when every case matches (max |err| <= 1e-4 * (1 + max |ref|));
//                                       --quick skips the timing
// Cases: the benchmark shape (B = 32, d = 1024, K = 8, r = 16, some rows -1), 3-D blocks (several rows per id), a
// one-element idx broadcast, odd rank and widths, more blocks than one launch carries, rank 0. Also times the
// benchmark shape with CUDA events (everything stream-ordered: one synchronisation at the end). Every case runs in
// three modes: delta only (y starts as garbage), base in a separate buffer (y = base + delta, y garbage first) and
// base in place (y holds base, p.base == p.y); and with float32 and float16 banks (the reference uses the
// half-rounded values).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "lora_delta.h"

using rewrite_lora::Problem;

#define CK(call)                                                                                      \
  do {                                                                                                \
    cudaError_t e_ = (call);                                                                          \
    if (e_ != cudaSuccess) {                                                                          \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", #call, __FILE__, __LINE__, cudaGetErrorString(e_)); \
      std::exit(2);                                                                                   \
    }                                                                                                 \
  } while (0)

struct Case {
  const char* name;
  int64_t n, din, r, dout, k;
  std::vector<int64_t> idx;
};

enum class Mode { kDelta, kBaseCopy, kBaseInPlace };
const char* mode_name(Mode m) {
  return m == Mode::kDelta ? "delta" : (m == Mode::kBaseCopy ? "+base" : "+base in place");
}

static bool run_case(const Case& c, Mode mode, bool half, std::mt19937& rng, bool time_it) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> x(c.n * c.din), a(c.k * c.din * c.r), b(c.k * c.r * c.dout);
  for (auto& v : x) v = nd(rng);
  for (auto& v : a) v = nd(rng) * 0.05f;
  for (auto& v : b) v = nd(rng) * 0.05f;
  std::vector<__half> ah(a.size()), bh(b.size());
  if (half) {
    for (size_t i = 0; i < a.size(); ++i) a[i] = __half2float(ah[i] = __float2half(a[i]));
    for (size_t i = 0; i < b.size(); ++i) b[i] = __half2float(bh[i] = __float2half(b[i]));
  }
  std::vector<float> base(c.n * c.dout, 0.0f);
  if (mode != Mode::kDelta)
    for (auto& v : base) v = nd(rng);
  const int64_t nb = static_cast<int64_t>(c.idx.size());
  const int64_t L = c.n / nb;
  // reference
  std::vector<double> ref(base.begin(), base.end());
  double ref_max = 0.0;
  for (double v : ref) ref_max = std::fmax(ref_max, std::fabs(v));
  for (int64_t row = 0; row < c.n; ++row) {
    const int64_t k = c.idx[row / L];
    if (k < 0) continue;
    std::vector<double> t(c.r, 0.0);
    for (int64_t j = 0; j < c.din; ++j)
      for (int64_t q = 0; q < c.r; ++q) t[q] += double(x[row * c.din + j]) * a[(k * c.din + j) * c.r + q];
    for (int64_t col = 0; col < c.dout; ++col) {
      double s = 0.0;
      for (int64_t q = 0; q < c.r; ++q) s += t[q] * b[(k * c.r + q) * c.dout + col];
      ref[row * c.dout + col] += s;
      ref_max = std::fmax(ref_max, std::fabs(ref[row * c.dout + col]));
    }
  }
  float *dx, *da, *db, *dy, *dbase;
  CK(cudaMalloc(&dx, sizeof(float) * (x.size() + 1)));
  CK(cudaMalloc(&da, sizeof(float) * (a.size() + 1)));
  CK(cudaMalloc(&db, sizeof(float) * (b.size() + 1)));
  CK(cudaMalloc(&dy, sizeof(float) * (c.n * c.dout + 1)));
  CK(cudaMalloc(&dbase, sizeof(float) * (c.n * c.dout + 1)));
  CK(cudaMemcpy(dx, x.data(), sizeof(float) * x.size(), cudaMemcpyHostToDevice));
  if (half) {
    CK(cudaMemcpy(da, ah.data(), sizeof(__half) * ah.size(), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(db, bh.data(), sizeof(__half) * bh.size(), cudaMemcpyHostToDevice));
  } else {
    CK(cudaMemcpy(da, a.data(), sizeof(float) * a.size(), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(db, b.data(), sizeof(float) * b.size(), cudaMemcpyHostToDevice));
  }
  CK(cudaMemset(dy, 0x7f, sizeof(float) * c.n * c.dout));  // garbage: every element must be written
  CK(cudaMemcpy(mode == Mode::kBaseInPlace ? dy : dbase, base.data(), sizeof(float) * base.size(),
                cudaMemcpyHostToDevice));
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  Problem p;
  p.x = dx; p.a = da; p.b = db; p.y = dy; p.idx = c.idx.data();
  p.half_banks = half;
  p.base = mode == Mode::kDelta ? nullptr : (mode == Mode::kBaseCopy ? dbase : dy);
  p.n = c.n; p.nb = nb; p.din = c.din; p.r = c.r; p.dout = c.dout; p.k = c.k;
  std::string err = rewrite_lora::lora_delta_cuda(p, s);
  if (!err.empty()) {
    std::printf("FAIL %-28s %-14s %s %s\n", c.name, mode_name(mode), half ? "f16" : "f32", err.c_str());
    return false;
  }
  CK(cudaStreamSynchronize(s));
  std::vector<float> y(c.n * c.dout);
  CK(cudaMemcpy(y.data(), dy, sizeof(float) * y.size(), cudaMemcpyDeviceToHost));
  double worst = 0.0;
  for (size_t i = 0; i < y.size(); ++i) {
    const double d = std::fabs(double(y[i]) - ref[i]);
    worst = std::isfinite(y[i]) ? std::fmax(worst, d) : INFINITY;
  }
  const bool ok = worst <= 1e-4 * (1.0 + ref_max);
  std::printf("%s %-28s %-14s %s N=%lld d_in=%lld r=%lld d_out=%lld K=%lld B=%lld  max|err| %.3g (max|ref| %.3g)",
              ok ? "ok  " : "FAIL", c.name, mode_name(mode), half ? "f16" : "f32", (long long)c.n, (long long)c.din,
              (long long)c.r, (long long)c.dout, (long long)c.k, (long long)nb, worst, ref_max);
  if (time_it && ok) {
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    for (int i = 0; i < 20; ++i) rewrite_lora::lora_delta_cuda(p, s);
    const int iters = 200;
    CK(cudaEventRecord(e0, s));
    for (int i = 0; i < iters; ++i) rewrite_lora::lora_delta_cuda(p, s);
    CK(cudaEventRecord(e1, s));
    CK(cudaEventSynchronize(e1));
    float ms = 0.0f;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    std::printf("  %.2f us/call", 1000.0f * ms / iters);
    CK(cudaEventDestroy(e0));
    CK(cudaEventDestroy(e1));
  }
  std::printf("\n");
  CK(cudaStreamDestroy(s));
  CK(cudaFree(dx));
  CK(cudaFree(da));
  CK(cudaFree(db));
  CK(cudaFree(dy));
  CK(cudaFree(dbase));
  return ok;
}

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";  // no timing (e.g. under compute-sanitizer)
  int dev = 0;
  cudaDeviceProp prop;
  CK(cudaGetDevice(&dev));
  CK(cudaGetDeviceProperties(&prop, dev));
  std::printf("device %d: %s (sm_%d%d)\n", dev, prop.name, prop.major, prop.minor);
  std::mt19937 rng(0);
  std::vector<int64_t> ids32(32);
  for (int i = 0; i < 32; ++i) ids32[i] = (i % 5 == 4) ? -1 : (i * 3) % 8;
  std::vector<int64_t> many(2500);
  for (size_t i = 0; i < many.size(); ++i) many[i] = (i % 7 == 0) ? -1 : static_cast<int64_t>(i % 5);
  std::vector<Case> cases = {
      {"bench batch 32, mixed, -1", 32, 1024, 16, 1024, 8, ids32},
      {"bench batch 1", 1, 1024, 16, 1024, 8, {3}},
      {"3-D blocks (4 x 5 rows)", 20, 64, 8, 48, 3, {0, 2, -1, 1}},
      {"broadcast one id", 24, 96, 16, 80, 4, {2}},
      {"block of 37 rows", 74, 128, 16, 64, 2, {1, 0}},
      {"odd rank and widths", 9, 33, 5, 17, 3, {2, -1, 0}},
      {"rank 300 (> 256)", 8, 130, 300, 70, 2, {1, 0, -1, 1}},
      {"2500 blocks (3 launches)", 2500, 64, 8, 40, 5, many},
      {"rank 0", 4, 16, 0, 8, 2, {0, 1}},
      {"all rows -1", 6, 32, 4, 24, 2, {-1, -1, -1}},
  };
  bool all = true;
  for (bool half : {false, true})
    for (Mode mode : {Mode::kDelta, Mode::kBaseCopy, Mode::kBaseInPlace})
      for (size_t i = 0; i < cases.size(); ++i)
        all = run_case(cases[i], mode, half, rng, !quick && mode != Mode::kBaseCopy && (i == 0 || i == 1)) && all;
  std::printf(all ? "ALL OK\n" : "SOME CASES FAILED\n");
  return all ? 0 : 1;
}
