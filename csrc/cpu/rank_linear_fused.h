// Fused register-decode kernels of the CPU rank_linear (included by rank_linear.cpp only): NF4 and int8
// factors decoded in AVX-512 registers and consumed at once, for 1-8 rows of x per decode of the codes
// (templated on the row count), x·Aᵀ over rank rows and h·B over column passes. Which factors they take
// (codes.h's `fused_ok`) and for how many rows (`kFusedMaxRows`) is decided here too; the callers are gemv_in /
// gemv_out in rank_linear.cpp. Layouts: adaptwin/ops/rank_linear.py.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "cpu_features.h"
#include "rank_linear_decode.h"

namespace adaptwin {
namespace {

bool fused_all(const Factor* fa, const Factor* fb) {
  return has_avx512() && (fa == nullptr || fused_ok(*fa)) && (fb == nullptr || fused_ok(*fb));
}

// Rows of x up to which NF4 factors that the fused kernels take stay on the decode path (kGemvRows for
// the others). Against dequantising both factors and two ATen GEMMs, 2 threads, medians (fp32: 384 and 1536
// wide, rank halving the parameters): the fused path took 21-67 against 68-241 us at 9-32 rows and 384,
// 200-652 against 514-757 us at 1536; from about 48 rows (fp32) or 16 (bf16, whose GEMMs run in bf16
// there) the GEMMs win at 1536.
constexpr int64_t kFusedMaxRows = 32, kFusedMaxRowsBf16 = 16;

// When every row of the factor starts on a byte and on a scale block, and blocks hold whole groups of 32
// codes (n % blocksize == 0, blocksize % 32 == 0: true for d = 384..3072 with the default 64), the codes
// are decoded straight into registers and consumed there: no L1 round trip through a buffer. At
// 3072x768 (1 thread) the buffered path ran 0.34 ms per factor.

#if ADAPTWIN_X86
// 16 codes (8 bytes) -> 16 LUT values with one shuffle. The 8 bytes are broadcast to every 64-bit lane and
// lane j shifted right by 4j, so its low 32-bit half starts with nibble j and its high half with nibble
// j + 8; vpermps reads only the low 4 bits of each index. The cvtepu8 + unpack decode it replaces spent
// three shuffles per 16 codes; in a standalone loop (one thread, 768x192 factor) x·Aᵀ went from 8.3 to
// 7.3 us and h·B from 9.6 to 9.5 us (there the broadcast of h and the FMAs weigh as much). The values come
// out in the lane order
// kLaneCode (nibble n of the little-endian word is element n ^ 1: the high nibble of a byte comes first),
// so callers permute x, or their output columns, once to match.
constexpr int kLaneCode[16] = {1, 9, 0, 8, 3, 11, 2, 10, 5, 13, 4, 12, 7, 15, 6, 14};

ADAPTWIN_AVX512 inline __m512 nf4_16(const uint8_t* p, __m512 lut) {
  int64_t word;
  std::memcpy(&word, p, sizeof(word));
  const __m512i shifts = _mm512_set_epi64(28, 24, 20, 16, 12, 8, 4, 0);
  return _mm512_permutexvar_ps(_mm512_srlv_epi64(_mm512_set1_epi64(word), shifts), lut);
}

ADAPTWIN_AVX512 inline __m512i lane_code() { return _mm512_loadu_si512(kLaneCode); }

// 16 int8 codes widened to float32 (in element order).
ADAPTWIN_AVX512 inline __m512 int8_16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// The inverse permutation of kLaneCode: entry e is the lane that holds element e of a group.
ADAPTWIN_AVX512 inline __m512i lane_inverse() {
  alignas(64) int32_t inv[16];
  for (int l = 0; l < 16; ++l) inv[kLaneCode[l]] = l;
  return _mm512_load_si512(inv);
}

// h[m·k + r] = A[r, :]·x_m for r in [r0, r1) and the M rows of x (xp: each row with every group of 16 in
// kLaneCode order, rows n apart). Each group of 16 codes is decoded once for all M rows: a few rows of
// x (beam search, batched decoding) cost M FMAs per decode instead of M decodes.
//
// One row of x (batch-1 decoding) decodes each code for one FMA, so the loop is bound by the decode, and a
// row at a time leaves the core waiting on each row's short FMA chains and final reduction: with one row
// of x, rank rows go kInRows at a time (one accumulator each, x loaded once for all of them). In a
// standalone loop (one thread, 96x384 factor, blocksize 64) x·Aᵀ went from 1.82 to 1.32 us (8 rows; 4:
// 1.53, 12: 1.32, 16: 1.55, spilling), at 192x768 from 6.9 to 5.0 us.
constexpr int kInRows = 8;

template <int R>
ADAPTWIN_AVX512 void nf4_gemv_in_rows(const Factor& f, const float* xp, float* h, int64_t r, __m512 lut) {
  const uint8_t* codes = static_cast<const uint8_t*>(f.data) + r * f.n / 2;
  const float* scale = f.scale + r * (f.n / f.blocksize);
  const int64_t blocks = f.n / f.blocksize;
  __m512 tot[R];
  for (int i = 0; i < R; ++i) tot[i] = _mm512_setzero_ps();
  for (int64_t blk = 0; blk < blocks; ++blk) {
    __m512 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
    const int64_t c0 = blk * f.blocksize;
    for (int64_t c = c0; c < c0 + f.blocksize; c += 32) {
      const __m512 x0 = _mm512_loadu_ps(xp + c), x1 = _mm512_loadu_ps(xp + c + 16);
      for (int i = 0; i < R; ++i) {
        const uint8_t* p = codes + i * f.n / 2 + c / 2;
        acc[i] = _mm512_fmadd_ps(nf4_16(p, lut), x0, acc[i]);
        acc[i] = _mm512_fmadd_ps(nf4_16(p + 8, lut), x1, acc[i]);
      }
    }
    for (int i = 0; i < R; ++i) tot[i] = _mm512_fmadd_ps(acc[i], _mm512_set1_ps(scale[i * blocks + blk]), tot[i]);
  }
  for (int i = 0; i < R; ++i) h[r + i] = _mm512_reduce_add_ps(tot[i]);
}

template <int M>
ADAPTWIN_AVX512 void nf4_gemv_in_fused(const Factor& f, const float* xp, float* h, int64_t r0, int64_t r1) {
  const __m512 lut = _mm512_loadu_ps(kNF4);
  if constexpr (M == 1) {
    for (; r0 + kInRows <= r1; r0 += kInRows) nf4_gemv_in_rows<kInRows>(f, xp, h, r0, lut);
    if (r0 + 4 <= r1) nf4_gemv_in_rows<4>(f, xp, h, r0, lut), r0 += 4;
    if (r0 + 2 <= r1) nf4_gemv_in_rows<2>(f, xp, h, r0, lut), r0 += 2;
    if (r0 < r1) nf4_gemv_in_rows<1>(f, xp, h, r0, lut), r0 += 1;
    return;
  }
  const uint8_t* codes = static_cast<const uint8_t*>(f.data);
  const int64_t blocks = f.n / f.blocksize;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* p = codes + r * f.n / 2;
    const float* scale = f.scale + r * blocks;
    __m512 tot[M];
    for (int m = 0; m < M; ++m) tot[m] = _mm512_setzero_ps();
    for (int64_t blk = 0; blk < blocks; ++blk) {
      __m512 acc0[M], acc1[M];
      for (int m = 0; m < M; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
      const int64_t c0 = blk * f.blocksize;
      for (int64_t c = c0; c < c0 + f.blocksize; c += 32) {
        const __m512 w0 = nf4_16(p + c / 2, lut), w1 = nf4_16(p + c / 2 + 8, lut);
        for (int m = 0; m < M; ++m) {
          acc0[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp + m * f.n + c), acc0[m]);
          acc1[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp + m * f.n + c + 16), acc1[m]);
        }
      }
      const __m512 sc = _mm512_set1_ps(scale[blk]);
      for (int m = 0; m < M; ++m) tot[m] = _mm512_fmadd_ps(_mm512_add_ps(acc0[m], acc1[m]), sc, tot[m]);
    }
    for (int m = 0; m < M; ++m) h[m * f.k + r] = _mm512_reduce_add_ps(tot[m]);
  }
}

// y[m, c : c + 16·G] += h_m·B[:, c : c + 16·G] for the M rows (h: M × k, y: M × n): M·G accumulators held
// (in kLaneCode order, put back in place at the store) across all k directions; each group of 16 codes
// decoded once per direction for all M rows.
template <int M, int G>
ADAPTWIN_AVX512 void nf4_out_pass(const Factor& f, const float* h, float* y, int64_t c, __m512 lut) {
  const __m512i to_lanes = lane_code(), to_elements = lane_inverse();
  const uint8_t* codes = static_cast<const uint8_t*>(f.data);
  const int64_t blocks = f.n / f.blocksize;
  __m512 acc[M][G];
  int64_t block_of[G];  // scale block of group g within a row (n is a multiple of the blocksize)
  for (int g = 0; g < G; ++g) {
    block_of[g] = (c + 16 * g) / f.blocksize;
    for (int m = 0; m < M; ++m) acc[m][g] = _mm512_permutexvar_ps(to_lanes, _mm512_loadu_ps(y + m * f.n + c + 16 * g));
  }
  for (int64_t r = 0; r < f.k; ++r) {
    const uint8_t* p = codes + (r * f.n + c) / 2;
    const float* scale = f.scale + r * blocks;
    // h times the scale, once per scale block (groups run through the blocks in order)
    int64_t block = block_of[0];
    __m512 coef[M];
    for (int m = 0; m < M; ++m) coef[m] = _mm512_set1_ps(h[m * f.k + r] * scale[block]);
    for (int g = 0; g < G; ++g) {
      if (block_of[g] != block) {
        block = block_of[g];
        for (int m = 0; m < M; ++m) coef[m] = _mm512_set1_ps(h[m * f.k + r] * scale[block]);
      }
      const __m512 w = nf4_16(p + 8 * g, lut);
      for (int m = 0; m < M; ++m) acc[m][g] = _mm512_fmadd_ps(coef[m], w, acc[m][g]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int m = 0; m < M; ++m)
      _mm512_storeu_ps(y + m * f.n + c + 16 * g, _mm512_permutexvar_ps(to_elements, acc[m][g]));
}

// y[:, c0:c1] += h·B[:, c0:c1]; c0 and c1 are multiples of 32. Passes of 16·G columns, G = 16 / M groups
// (at most 16 accumulators), then the remainder in passes of 8, 4, 2 and 1 groups.
template <int M>
ADAPTWIN_AVX512 void nf4_gemv_out_fused(const Factor& f, const float* h, float* y, int64_t c0, int64_t c1) {
  constexpr int kG = M == 1 ? 16 : M == 2 ? 8 : M <= 4 ? 4 : 2;
  const __m512 lut = _mm512_loadu_ps(kNF4);
  int64_t c = c0;
  for (; c + 16 * kG <= c1; c += 16 * kG) nf4_out_pass<M, kG>(f, h, y, c, lut);
  if constexpr (kG > 8) if (c + 128 <= c1) nf4_out_pass<M, 8>(f, h, y, c, lut), c += 128;
  if constexpr (kG > 4) if (c + 64 <= c1) nf4_out_pass<M, 4>(f, h, y, c, lut), c += 64;
  if constexpr (kG > 2) if (c + 32 <= c1) nf4_out_pass<M, 2>(f, h, y, c, lut), c += 32;
  if constexpr (kG > 1) if (c + 16 <= c1) nf4_out_pass<M, 1>(f, h, y, c, lut), c += 16;
}

// --- the same for int8 factors: codes widened in registers (no lane permutation), one scale per group ---

// h[m·k + r] = A[r, :]·x_m for r in [r0, r1) and the M rows of x (rows n apart); each group of 16 codes
// widened once for all M rows, the sum of a scale group multiplied by its scale.
//
// With one row of x, R rank rows at a time, as nf4_gemv_in_rows (one accumulator per row and scale group).
template <int R>
ADAPTWIN_AVX512 void int8_gemv_in_rows(const Factor& f, const float* x, float* h, int64_t r) {
  const int8_t* codes = static_cast<const int8_t*>(f.data) + r * f.n;
  const int64_t group = f.blocksize == 0 ? f.n : f.blocksize;
  __m512 tot[R];
  for (int i = 0; i < R; ++i) tot[i] = _mm512_setzero_ps();
  for (int64_t g0 = 0; g0 < f.n; g0 += group) {
    __m512 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t c = g0; c < g0 + group; c += 32) {
      const __m512 x0 = _mm512_loadu_ps(x + c), x1 = _mm512_loadu_ps(x + c + 16);
      for (int i = 0; i < R; ++i) {
        acc[i] = _mm512_fmadd_ps(int8_16(codes + i * f.n + c), x0, acc[i]);
        acc[i] = _mm512_fmadd_ps(int8_16(codes + i * f.n + c + 16), x1, acc[i]);
      }
    }
    for (int i = 0; i < R; ++i)
      tot[i] = _mm512_fmadd_ps(acc[i], _mm512_set1_ps(f.scale[(r + i) * (f.n / group) + g0 / group]), tot[i]);
  }
  for (int i = 0; i < R; ++i) h[r + i] = _mm512_reduce_add_ps(tot[i]);
}

template <int M>
ADAPTWIN_AVX512 void int8_gemv_in_fused(const Factor& f, const float* x, float* h, int64_t r0, int64_t r1) {
  if constexpr (M == 1) {
    for (; r0 + kInRows <= r1; r0 += kInRows) int8_gemv_in_rows<kInRows>(f, x, h, r0);
    if (r0 + 4 <= r1) int8_gemv_in_rows<4>(f, x, h, r0), r0 += 4;
    if (r0 + 2 <= r1) int8_gemv_in_rows<2>(f, x, h, r0), r0 += 2;
    if (r0 < r1) int8_gemv_in_rows<1>(f, x, h, r0), r0 += 1;
    return;
  }
  const int8_t* codes = static_cast<const int8_t*>(f.data);
  const int64_t group = f.blocksize == 0 ? f.n : f.blocksize;
  for (int64_t r = r0; r < r1; ++r) {
    const int8_t* p = codes + r * f.n;
    __m512 tot[M];
    for (int m = 0; m < M; ++m) tot[m] = _mm512_setzero_ps();
    for (int64_t g0 = 0; g0 < f.n; g0 += group) {
      __m512 acc0[M], acc1[M];
      for (int m = 0; m < M; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
      for (int64_t c = g0; c < g0 + group; c += 32) {
        const __m512 w0 = int8_16(p + c), w1 = int8_16(p + c + 16);
        for (int m = 0; m < M; ++m) {
          acc0[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * f.n + c), acc0[m]);
          acc1[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * f.n + c + 16), acc1[m]);
        }
      }
      const __m512 sc = _mm512_set1_ps(f.scale[(r * f.n + g0) / group]);
      for (int m = 0; m < M; ++m) tot[m] = _mm512_fmadd_ps(_mm512_add_ps(acc0[m], acc1[m]), sc, tot[m]);
    }
    for (int m = 0; m < M; ++m) h[m * f.k + r] = _mm512_reduce_add_ps(tot[m]);
  }
}

// y[m, c : c + 16·G] += h_m·B[:, c : c + 16·G] for the M rows, M·G accumulators across all k directions.
template <int M, int G>
ADAPTWIN_AVX512 void int8_out_pass(const Factor& f, const float* h, float* y, int64_t c) {
  const int8_t* codes = static_cast<const int8_t*>(f.data);
  // scale groups tile each row (fused_ok: n % group == 0), so group g of the pass is in the row's group
  // group_of[g]: no division per code group (one per 16 codes took int8 twice NF4's time at d = 384)
  const int64_t group = f.blocksize == 0 ? f.n : f.blocksize, per_row = f.n / group;
  int64_t group_of[G];
  for (int g = 0; g < G; ++g) group_of[g] = (c + 16 * g) / group;
  __m512 acc[M][G];
  for (int g = 0; g < G; ++g)
    for (int m = 0; m < M; ++m) acc[m][g] = _mm512_loadu_ps(y + m * f.n + c + 16 * g);
  for (int64_t r = 0; r < f.k; ++r) {
    const int8_t* p = codes + r * f.n + c;
    const int64_t row = r * per_row;
    int64_t at = row + group_of[0];  // the scale group of the pass's first column
    __m512 coef[M];
    for (int m = 0; m < M; ++m) coef[m] = _mm512_set1_ps(h[m * f.k + r] * f.scale[at]);
    for (int g = 0; g < G; ++g) {
      const int64_t now = row + group_of[g];
      if (now != at) {
        at = now;
        for (int m = 0; m < M; ++m) coef[m] = _mm512_set1_ps(h[m * f.k + r] * f.scale[at]);
      }
      const __m512 w = int8_16(p + 16 * g);
      for (int m = 0; m < M; ++m) acc[m][g] = _mm512_fmadd_ps(coef[m], w, acc[m][g]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int m = 0; m < M; ++m) _mm512_storeu_ps(y + m * f.n + c + 16 * g, acc[m][g]);
}

template <int M>
ADAPTWIN_AVX512 void int8_gemv_out_fused(const Factor& f, const float* h, float* y, int64_t c0, int64_t c1) {
  constexpr int kG = M == 1 ? 16 : M == 2 ? 8 : M <= 4 ? 4 : 2;
  int64_t c = c0;
  for (; c + 16 * kG <= c1; c += 16 * kG) int8_out_pass<M, kG>(f, h, y, c);
  if constexpr (kG > 8) if (c + 128 <= c1) int8_out_pass<M, 8>(f, h, y, c), c += 128;
  if constexpr (kG > 4) if (c + 64 <= c1) int8_out_pass<M, 4>(f, h, y, c), c += 64;
  if constexpr (kG > 2) if (c + 32 <= c1) int8_out_pass<M, 2>(f, h, y, c), c += 32;
  if constexpr (kG > 1) if (c + 16 <= c1) int8_out_pass<M, 1>(f, h, y, c), c += 16;
}

constexpr int64_t kFusedRows = 8;  // rows of x per call of the fused kernels (template arguments 1..8)

// f(std::integral_constant<int, M>{}) for M = rows, 1..kFusedRows: the fused kernels' row count as a
// template argument, chosen at run time.
template <class F>
void for_rows(int64_t rows, F&& f) {
  switch (rows) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}

// x with every group of 16 features in kLaneCode order (n is a multiple of 16).
ADAPTWIN_AVX512 void to_lane_order(const float* x, int64_t n, float* xp) {
  const __m512i idx = lane_code();
  for (int64_t c = 0; c < n; c += 16) _mm512_storeu_ps(xp + c, _mm512_permutexvar_ps(idx, _mm512_loadu_ps(x + c)));
}
#endif

}  // namespace
}  // namespace adaptwin
