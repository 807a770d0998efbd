// rewrite::LoraDelta on the CPU: checks, segment planning (SGMV-style) and parallel dispatch; ORT-free.
//
// Plan per call:
//   1. y = base (a copy unless ORT ran the op in place), or zero the rows of blocks with idx < 0 (delta only);
//   2. bucket the other blocks by adapter (counting sort, O(nb + K)): the rows of one adapter form one segment,
//      so each adapter's A_k / B_k is streamed once per macro tile instead of once per row;
//   3. cut every segment into work items of up to `mt` rows (32 when there is enough work for every thread, down to
//      4 to feed more threads), and when there are still fewer items than threads, also split d_out;
//   4. run the items through the executor (ORT's intra-op pool) or serially when the work is small.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "lora_delta.h"

namespace rewrite_lora {

std::string check_shapes(const int64_t* xs, size_t xr, const int64_t* as, size_t ar, const int64_t* bs, size_t br,
                         const int64_t* is, size_t ir, Problem& p) {
  if (xr < 1) return "LoraDelta: x must have at least one dimension [..., d_in]";
  if (ar != 3) return "LoraDelta: A_bank must be [K, d_in, r]";
  if (br != 3) return "LoraDelta: B_bank must be [K, r, d_out]";
  if (ir > 1) return "LoraDelta: idx must be a 1-D int64 tensor [B]";
  const int64_t din = xs[xr - 1];
  int64_t n = 1;
  for (size_t i = 0; i + 1 < xr; ++i) n *= xs[i];
  const int64_t nb = ir == 0 ? 1 : is[0];
  if (as[1] != din)
    return "LoraDelta: A_bank dim 1 (" + std::to_string(as[1]) + ") must equal the last dim of x (" +
           std::to_string(din) + ")";
  if (as[0] != bs[0])
    return "LoraDelta: A_bank and B_bank hold different numbers of adapters (" + std::to_string(as[0]) + " vs " +
           std::to_string(bs[0]) + ")";
  if (as[2] != bs[1])
    return "LoraDelta: rank mismatch: A_bank is [K, d_in, " + std::to_string(as[2]) + "], B_bank is [K, " +
           std::to_string(bs[1]) + ", d_out]";
  if (nb < 1) return "LoraDelta: idx must hold at least one adapter index";
  if (n % nb != 0)
    return "LoraDelta: the " + std::to_string(n) + " rows of x do not split into " + std::to_string(nb) +
           " equal blocks (N % B != 0)";
  p.n = n;
  p.nb = nb;
  p.din = din;
  p.r = as[2];
  p.dout = bs[2];
  p.k = as[0];
  return "";
}

std::string check_member(const int64_t* bs, size_t br, const int64_t* ys, size_t yr, const int64_t* xs, size_t xr,
                         int64_t k, size_t index) {
  const std::string which = "LoraDeltaGroup: member " + std::to_string(index);
  if (br != 3) return which + ": B_bank must be [K, r, d_out]";
  if (bs[0] != k)
    return which + ": B_bank holds " + std::to_string(bs[0]) + " adapters, A_bank " + std::to_string(k);
  if (yr != xr) return which + ": base must have the shape of x with the last dim d_out";
  for (size_t i = 0; i + 1 < xr; ++i)
    if (ys[i] != xs[i]) return which + ": base must have the shape of x with the last dim d_out";
  if (ys[yr - 1] != bs[2])
    return which + ": base's last dim (" + std::to_string(ys[yr - 1]) + ") must equal B_bank's d_out (" +
           std::to_string(bs[2]) + ")";
  return "";
}

std::string check_indices(const int64_t* idx, int64_t nb, int64_t k) {
  for (int64_t i = 0; i < nb; ++i)
    if (idx[i] >= k) return "LoraDelta: adapter index out of range";
  return "";
}

int env_threads() {
  if (const char* s = std::getenv("REWRITE_LORA_THREADS")) {
    const int v = std::atoi(s);
    if (v >= 1) return v;
  }
  static const int hc = [] {  // (reads /sys on glibc: once, not per call)
    const unsigned n = std::thread::hardware_concurrency();
    return n ? static_cast<int>(n) : 1;
  }();
  return hc;
}

namespace {

bool have_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool ok =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

bool use_avx2() {
  if (!have_avx2()) return false;
  const char* s = std::getenv("REWRITE_LORA_ISA");
  return !(s && std::strcmp(s, "generic") == 0);
}

struct Item {
  int64_t adapter, row0, m, c0, c1;  // rows[row0 : row0 + m] of the sorted row list, columns [c0, c1)
};

struct Job {
  const Problem* p;
  const Member* members;
  int64_t n_members;
  const int64_t* rows;
  const Item* items;
  bool avx2;
};

void run_one(void* data, size_t i) {
  const Job& j = *static_cast<const Job*>(data);
  const Item& it = j.items[i];
  if (j.avx2)
    avx2::run_item(*j.p, j.members, j.n_members, j.rows + it.row0, it.m, it.adapter, it.c0, it.c1);
  else
    generic::run_item(*j.p, j.members, j.n_members, j.rows + it.row0, it.m, it.adapter, it.c0, it.c1);
}

// Below this many multiply-adds per call the kernel runs in the calling thread (a parallel dispatch costs a few
// microseconds; one thread does ~4 multiply-adds per ns).
constexpr int64_t kParallelMinMacs = 1 << 17;

}  // namespace

const char* cpu_isa() { return use_avx2() ? "avx2" : "generic"; }

void lora_delta_cpu(const Problem& p, const Executor& ex) {
  const Member single{p.b, p.base, p.y, 0, p.r, p.dout};
  const Member* members = p.members ? p.members : &single;
  const int64_t n_members = p.members ? p.n_members : 1;
  int64_t cols = 0, expand_macs = 0;  // the members' outputs side by side
  for (int64_t i = 0; i < n_members; ++i) {
    cols += members[i].dout;
    expand_macs += members[i].r * members[i].dout;
  }
  if (p.n == 0 || cols == 0) return;
  const int64_t L = p.n / p.nb;
  // 1. y starts as the base output (copied unless in place), or blocks without adapter get a zero delta.
  for (int64_t i = 0; i < n_members; ++i) {
    const Member& o = members[i];
    if (o.base && o.base != o.y) std::memcpy(o.y, o.base, sizeof(float) * static_cast<size_t>(p.n * o.dout));
    for (int64_t b = 0; b < p.nb && !o.base; ++b)
      if (p.idx[b] < 0) std::memset(o.y + b * L * o.dout, 0, sizeof(float) * static_cast<size_t>(L * o.dout));
  }
  // 2. bucket blocks by adapter -> sorted row list.
  thread_local std::vector<int64_t> count, rows;
  thread_local std::vector<Item> items;
  count.assign(static_cast<size_t>(p.k) + 1, 0);
  int64_t m_total = 0;
  for (int64_t b = 0; b < p.nb; ++b)
    if (p.idx[b] >= 0) {
      ++count[static_cast<size_t>(p.idx[b]) + 1];
      m_total += L;
    }
  if (m_total == 0) return;
  for (int64_t k = 0; k < p.k; ++k) count[k + 1] += count[k];  // count[k] = first block slot of adapter k
  rows.resize(static_cast<size_t>(m_total));
  {
    std::vector<int64_t>& next = count;  // reuse as insertion cursors (in blocks)
    for (int64_t b = 0; b < p.nb; ++b) {
      const int64_t k = p.idx[b];
      if (k < 0) continue;
      const int64_t slot = next[k]++;
      for (int64_t i = 0; i < L; ++i) rows[slot * L + i] = b * L + i;
    }
  }
  // After the loop next[k] is the end slot of adapter k, and next[k - 1] (or 0) its start.
  // 3. work items.
  const int64_t macs = m_total * (p.r * p.din + expand_macs);
  const int threads = (ex.run && ex.threads > 1 && macs >= kParallelMinMacs) ? ex.threads : 1;
  auto count_items = [&](int64_t mt) {
    int64_t total = 0, start = 0;
    for (int64_t k = 0; k < p.k; ++k) {
      const int64_t seg = (count[k] - start) * L;
      total += (seg + mt - 1) / mt;
      start = count[k];
    }
    return total;
  };
  int64_t mt = 32;
  while (threads > 1 && mt > 4 && count_items(mt) < 2 * threads) mt /= 2;  // (1 thread: no split, no re-reads)
  const int64_t n_row_items = count_items(mt);
  int64_t col_split = 1;
  if (n_row_items < threads) {
    col_split = (threads + n_row_items - 1) / n_row_items;
    col_split = std::max<int64_t>(1, std::min<int64_t>(col_split, cols / 64));
  }
  items.clear();
  {
    int64_t start = 0;
    for (int64_t k = 0; k < p.k; ++k) {
      const int64_t r0 = start * L, r1 = count[k] * L;
      start = count[k];
      for (int64_t s = r0; s < r1; s += mt) {
        const int64_t m = std::min(mt, r1 - s);
        for (int64_t c = 0; c < col_split; ++c) {
          // column cuts on multiples of 16
          const int64_t c0 = (cols * c / col_split) / 16 * 16;
          const int64_t c1 = c + 1 == col_split ? cols : (cols * (c + 1) / col_split) / 16 * 16;
          if (c1 > c0) items.push_back(Item{k, s, m, c0, c1});
        }
      }
    }
  }
  // 4. run.
  Job job{&p, members, n_members, rows.data(), items.data(), use_avx2()};
  const size_t n_items = items.size();
  if (threads <= 1 || n_items <= 1) {
    for (size_t i = 0; i < n_items; ++i) run_one(&job, i);
  } else {
    ex.run(ex.ctx, run_one, n_items, std::min<size_t>(n_items, static_cast<size_t>(threads)), &job);
  }
}

}  // namespace rewrite_lora
