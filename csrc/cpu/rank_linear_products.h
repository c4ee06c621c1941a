// The two products of the CPU rank_linear's decode path (included by rank_linear.cpp only): h = x·Aᵀ and
// y += h·B over parallel ranges, each factor through the fused register-decode kernels where they take it
// (rank_linear_fused.h) or decoded chunk by chunk (rank_linear_decode.h), and both products in one parallel
// region when both factors are fused (AVX-512) or, for one row of x, both take the AVX2 / NEON one-row
// kernels. How the work is split is decided here. Layouts: adaptwin/ops/rank_linear.py.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "cpu_features.h"
#include "fp_gemv.h"
#include "rank_linear_avx2.h"
#include "rank_linear_decode.h"
#include "rank_linear_fused.h"
#include "rank_linear_neon.h"

namespace adaptwin {
namespace {

// --- fused NF4 decode + product for one row of x (batch-1 decoding), AVX-512 ---------------------------
// When every row of the factor starts on a byte and on a scale block, and blocks hold whole groups of 32
// codes (n % blocksize == 0, blocksize % 32 == 0: true for d = 384..3072 with the default 64), the codes
// are decoded straight into registers and consumed there: no L1 round trip through a buffer. At
// 3072x768 (1 thread) the buffered path ran 0.34 ms per factor.

// --- the two products -------------------------------------------------------------------------------

// Work (factor elements, times the rows of x) per part of the fused decode kernels' parallel loops. A
// parallel region costs about 0.7 us to open here (an empty at::parallel_for on 2 threads), and the second
// core then reads codes, x and y lines the first one last wrote. One thread decodes ~28 G NF4 elements/s,
// and a call at d = 384, rank 96 (73.7k elements) took 3.64 us on one thread and 3.69 us on two (C++
// dispatcher loop, medians of 7), so that size stays on one thread; at d = 512 (131k) two took 4.74 us
// against 5.65, at d = 768 7.84 against 11.5. A lone 192x384 NF4 factor (74k) took 4.8 us on one thread
// and 4.5 on two from Python, but 7.1-8.0 on two in some processes (in one of three runs of the same
// script, for the whole process: where the OS put the second thread), so it stays on one too.
constexpr int64_t kPartElems = 1 << 16;
// The same for the one-row AVX2 / NEON kernels of both products in one region (gemv_both), which decode at
// about half AVX-512's rate, so that two threads pay from half the work. With AVX2 (ADAPTWIN_CPU_CAP=avx2
// on this Zen 4, C++ dispatcher loop, medians of 15 x 200 calls, 8 processes each): d = 384, rank 96 took
// 4.5-4.9 us on two threads against 5.9-6.1 on one; d = 768 12.4-12.8 us in one region against 13.2-16.7
// in gemv_in's and gemv_out's; 1536 and 3072 the same either way. Not timed on an ARM CPU.
constexpr int64_t kPartElemsOneRow = 1 << 15;

// Parts to split `work` into (at most one per thread) and the grain that makes at::parallel_for cut
// `range` into that many.
int64_t parts_for(int64_t work, int64_t part_elems = kPartElems) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work / part_elems));
}

int64_t grain_for(int64_t range, int64_t work) {
  const int64_t parts = parts_for(work);
  return std::max<int64_t>(1, (range + parts - 1) / parts);
}

#if ADAPTWIN_X86
// --- the fused kernels over ranges, for any rows of x (kFusedRows per decode of the codes) -----------------

// x as the fused x·Aᵀ kernels read it: NF4, every group of 16 in their lane order (a thread-local copy of
// the calling thread's; the workers get the pointer); int8, x itself.
const float* fused_x(const Factor& a, const float* x, int64_t rows) {
  if (a.format != Format::kNf4) return x;
  thread_local std::vector<float> lanes;
  lanes.resize(static_cast<size_t>(rows * a.n));
  for (int64_t m = 0; m < rows; ++m) to_lane_order(x + m * a.n, a.n, lanes.data() + m * a.n);
  return lanes.data();
}

// h[:, r0:r1] = x·A[r0:r1]ᵀ (x from fused_x).
void fused_in(const Factor& a, const float* x, int64_t rows, float* h, int64_t r0, int64_t r1) {
  for (int64_t m0 = 0; m0 < rows && r0 < r1; m0 += kFusedRows)
    for_rows(std::min(kFusedRows, rows - m0), [&](auto m) {
      if (a.format == Format::kInt8)
        int8_gemv_in_fused<m()>(a, x + m0 * a.n, h + m0 * a.k, r0, r1);
      else
        nf4_gemv_in_fused<m()>(a, x + m0 * a.n, h + m0 * a.k, r0, r1);
    });
}

// y[:, c0:c1] += h·B[:, c0:c1] (c0, c1 multiples of 32).
void fused_out(const Factor& b, const float* h, int64_t rows, float* y, int64_t c0, int64_t c1) {
  for (int64_t m0 = 0; m0 < rows && c0 < c1; m0 += kFusedRows)
    for_rows(std::min(kFusedRows, rows - m0), [&](auto m) {
      if (b.format == Format::kInt8)
        int8_gemv_out_fused<m()>(b, h + m0 * b.k, y + m0 * b.n, c0, c1);
      else
        nf4_gemv_out_fused<m()>(b, h + m0 * b.k, y + m0 * b.n, c0, c1);
    });
}
#endif

// The one-row register-decode kernels of a CPU without AVX-512 (x·Aᵀ over rank rows [r0, r1), h·B over
// columns [c0, c1)): rank_linear_avx2.h's with AVX2 + FMA, rank_linear_neon.h's on AArch64, else none.
struct OneRowKernels {
  using Kernel = void (*)(const Codes&, const float*, float*, int64_t, int64_t);
  Kernel in = nullptr, out = nullptr;
};

OneRowKernels one_row_kernels() {
#if ADAPTWIN_X86
  if (has_avx2()) return {gemv_in_avx2, gemv_out_avx2};
#endif
#if ADAPTWIN_NEON
  if (has_neon()) return {gemv_in_neon, gemv_out_neon};
#endif
  return {};
}

// h (rows, k) = x (rows, in) · Aᵀ, decoding each direction of A once for all rows.
void gemv_in(const Factor& a, const float* x, int64_t rows, float* h) {
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(a.n, 1));
#if ADAPTWIN_X86
  if (has_avx512() && fused_ok(a)) {
    const float* xf = fused_x(a, x, rows);
    at::parallel_for(0, a.k, grain_for(a.k, rows * a.k * a.n),
                     [&](int64_t r0, int64_t r1) { fused_in(a, xf, rows, h, r0, r1); });
    return;
  }
  if (a.format == Format::kFp && (has_avx512() || has_avx2())) {  // float32 / bf16 values (fp_gemv.h)
    const auto kernel = has_avx512() ? fp_gemv_in_avx512 : fp_gemv_in_avx2;
    at::parallel_for(0, a.k, grain_for(a.k, rows * a.k * a.n),
                     [&](int64_t r0, int64_t r1) { kernel(a, x, rows, h, a.k, r0, r1); });
    return;
  }
#endif
  const OneRowKernels one = one_row_kernels();
  if (rows == 1 && one.in != nullptr && fused_ok(a)) {
    at::parallel_for(0, a.k, grain_for(a.k, a.k * a.n), [&](int64_t r0, int64_t r1) { one.in(a, x, h, r0, r1); });
    return;
  }
  at::parallel_for(0, a.k, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(kChunk);
    std::vector<float> acc(rows);
    for (int64_t r = r0; r < r1; ++r) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t c = 0; c < a.n; c += kChunk) {
        const int64_t len = std::min(kChunk, a.n - c);
        const float* w = row_chunk(a, r, c, len, buf.data());
        for (int64_t m = 0; m < rows; ++m) acc[m] += dot(w, x + m * a.n + c, len);
      }
      for (int64_t m = 0; m < rows; ++m) h[m * a.k + r] = acc[m];
    }
  });
}

// y (rows, out) += h (rows, k) · B, each task owning a range of output columns (no write sharing).
void gemv_out(const Factor& b, const float* h, int64_t rows, float* y) {
  const int64_t grain = std::max<int64_t>(64, kGrainElems / std::max<int64_t>(b.k, 1));
#if ADAPTWIN_X86
  if (has_avx512() && fused_ok(b)) {
    const int64_t groups = b.n / 32;  // tasks own whole groups of 32 columns
    at::parallel_for(0, groups, grain_for(groups, rows * b.k * b.n),
                     [&](int64_t g0, int64_t g1) { fused_out(b, h, rows, y, 32 * g0, 32 * g1); });
    return;
  }
  if (has_avx512() && b.format == Format::kFp) {  // float32 / bf16 values (fp_gemv.h)
    const int64_t groups = (b.n + 15) / 16;  // tasks own whole groups of 16 columns
    at::parallel_for(0, groups, grain_for(groups, rows * b.k * b.n), [&](int64_t g0, int64_t g1) {
      const int64_t c0 = 16 * g0, c1 = std::min(b.n, 16 * g1);
      for (int64_t m0 = 0; m0 < rows; m0 += kFusedRows)
        for_rows(std::min(kFusedRows, rows - m0),
                 [&](auto m) { fp_gemv_out_avx512<m()>(b, h + m0 * b.k, y + m0 * b.n, b.n, c0, c1); });
    });
    return;
  }
#endif
  const OneRowKernels one = one_row_kernels();
  if (rows == 1 && one.out != nullptr && fused_ok(b)) {
    const int64_t groups = b.n / 32;  // tasks own whole groups of 32 columns
    at::parallel_for(0, groups, grain_for(groups, b.k * b.n),
                     [&](int64_t g0, int64_t g1) { one.out(b, h, y, 32 * g0, 32 * g1); });
    return;
  }
  at::parallel_for(0, b.n, grain, [&](int64_t c0, int64_t c1) {
    std::vector<float> buf(kChunk);
    for (int64_t c = c0; c < c1; c += kChunk) {
      const int64_t len = std::min(kChunk, c1 - c);
      for (int64_t r = 0; r < b.k; ++r) {
        const float* w = row_chunk(b, r, c, len, buf.data());
        for (int64_t m = 0; m < rows; ++m) axpy(y + m * b.n + c, h[m * b.k + r], w, len);
      }
    }
  });
}

// A worker waiting on another's part of h: the x86 / ARM spin-wait hint, else nothing.
inline void spin_pause() {
#if ADAPTWIN_X86
  _mm_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

// y += (x·Aᵀ)·B in ONE parallel region of `parts` parts: h = x·Aᵀ split into rank-row ranges (`in(r0, r1)`,
// multiples of 8 where it can: the kernels' row step), then, once every range is done, y split into ranges
// of whole 32-column groups (`out(c0, c1)`). gemv_in + gemv_out opened a region each: d = 768 took 8.7 us a
// call that way on AVX-512, 7.8 us in one region.
template <typename In, typename Out>
void both_in_one_region(int64_t parts, int64_t k, int64_t n, const In& in, const Out& out) {
  auto in_part = [&](int64_t p) {
    const int64_t step = ((k + parts - 1) / parts + 7) / 8 * 8;
    const int64_t r0 = std::min(k, p * step), r1 = std::min(k, r0 + step);
    if (r0 < r1) in(r0, r1);
  };
  auto out_part = [&](int64_t p) {
    const int64_t groups = n / 32, step = (groups + parts - 1) / parts;
    const int64_t c0 = 32 * std::min(groups, p * step), c1 = 32 * std::min(groups, (p + 1) * step);
    if (c0 < c1) out(c0, c1);
  };
  if (parts == 1) {
    in_part(0);
    out_part(0);
    return;
  }
  // Part p runs on the worker that at::parallel_for gives index p (the same thread call after call, so its
  // codes stay in that core's cache); a worker that finds a part nobody has started (fewer workers than
  // parts) runs it itself, so a wait below is only ever for a part that a running thread is computing.
  std::vector<std::atomic<int>> taken(static_cast<size_t>(2 * parts));
  for (auto& t : taken) t.store(0, std::memory_order_relaxed);
  std::atomic<int64_t> done_in{0};
  auto claim = [&](int64_t i) {
    int expected = 0;
    return taken[i].load(std::memory_order_relaxed) == 0 &&
           taken[i].compare_exchange_strong(expected, 1, std::memory_order_acq_rel);
  };
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      if (claim(p)) in_part(p), done_in.fetch_add(1, std::memory_order_release);
    for (int64_t p = 0; p < parts; ++p)
      if (claim(p)) in_part(p), done_in.fetch_add(1, std::memory_order_release);
    while (done_in.load(std::memory_order_acquire) < parts) spin_pause();  // the rest of h, being computed
    for (int64_t p = p0; p < p1; ++p)
      if (claim(parts + p)) out_part(p);
    for (int64_t p = 0; p < parts; ++p)
      if (claim(parts + p)) out_part(p);
  });
}

// y (rows, out) += (x·Aᵀ)·B with both factors in one parallel region, where the register-decode kernels
// take both: AVX-512's fused kernels (any rows up to the caller's limit), or, for one row of x, the AVX2 /
// NEON one-row kernels. False (nothing done) otherwise: the caller runs gemv_in, then gemv_out.
bool gemv_both(const Factor& a, const Factor& b, const float* x, int64_t rows, float* h, float* y) {
#if ADAPTWIN_X86
  if (fused_all(&a, &b)) {
    const float* xf = fused_x(a, x, rows);
    both_in_one_region(
        parts_for(rows * (a.k * a.n + b.k * b.n)), a.k, b.n,
        [&](int64_t r0, int64_t r1) { fused_in(a, xf, rows, h, r0, r1); },
        [&](int64_t c0, int64_t c1) { fused_out(b, h, rows, y, c0, c1); });
    return true;
  }
#endif
  const OneRowKernels one = one_row_kernels();
  if (rows != 1 || one.in == nullptr || !fused_ok(a) || !fused_ok(b)) return false;
  both_in_one_region(
      parts_for(a.k * a.n + b.k * b.n, kPartElemsOneRow), a.k, b.n,
      [&](int64_t r0, int64_t r1) { one.in(a, x, h, r0, r1); },
      [&](int64_t c0, int64_t c1) { one.out(b, h, y, c0, c1); });
  return true;
}

}  // namespace
}  // namespace adaptwin
