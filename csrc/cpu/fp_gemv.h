// The decode path's products with an fp factor (float32 or bfloat16 values: a GemvLinear's weight, the output
// head, an unquantised low-rank factor, the float32 LoRA directions of a quantised module), in SIMD registers:
// h = x·Aᵀ over a range of A's rows (AVX-512 and AVX2 + FMA) and y += h·B over a range of B's columns
// (AVX-512), bfloat16 values widened in registers (exact: a bfloat16 is the upper half of a float32). Free of
// torch; rank_linear_products.h calls it. Other CPUs take the buffered loops (codes.h's row_chunk, dot_axpy.h).
//
// Before, each row of the factor went through row_chunk (bfloat16 widened by a scalar loop into a buffer) and
// dot_axpy.h's dot, one horizontal sum per row: Whisper-tiny's 51865 x 384 bfloat16 head took 1.64-2.0 ms a
// decoding step (2 threads), about half what its 40 MB take to read, and 0.85-1.1 ms here; under the AVX2
// caps (ADAPTWIN_CPU_CAP, ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS) 2.66 ms before,
// slower than oneDNN's 2.27, and 0.96 ms here; 136 -> 1536 in bfloat16 27.7 -> 10.8 us (AVX2), 29-33 -> 13.8
// (AVX-512).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "bf16.h"
#include "codes.h"
#include "cpu_features.h"

namespace adaptwin {
namespace {

#if ADAPTWIN_X86
// The two ISAs' vector primitives for the loops below (which are written once, always inlined into the
// per-ISA entry points that carry the target attributes): L float32 lanes; loads of float32 (whole, or the
// first `left` < L with the rest 0), of L bfloat16 values widened, a mask keeping the first `left` lanes;
// the lane sums of L vectors as one vector (hsum16 / hsum8) and of one vector.
struct Avx512Rows {
  static constexpr int L = 16;
  using Vec = __m512;
  ADAPTWIN_AVX512 static Vec zero() { return _mm512_setzero_ps(); }
  ADAPTWIN_AVX512 static Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  ADAPTWIN_AVX512 static Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  ADAPTWIN_AVX512 static Vec loadf(const float* p) { return _mm512_loadu_ps(p); }
  ADAPTWIN_AVX512 static Vec loadf(const float* p, int64_t left) { return _mm512_maskz_loadu_ps(tail_mask(left), p); }
  ADAPTWIN_AVX512 static Vec load_bf16(const uint16_t* p) {
    return widen_bf16_512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  ADAPTWIN_AVX512 static Vec keep(Vec v, int64_t left) { return _mm512_maskz_mov_ps(tail_mask(left), v); }
  ADAPTWIN_AVX512 static Vec sums(const Vec* v) { return hsum16(v); }
  ADAPTWIN_AVX512 static float sum(Vec v) { return _mm512_reduce_add_ps(v); }
  ADAPTWIN_AVX512 static void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
};

struct Avx2Rows {
  static constexpr int L = 8;
  using Vec = __m256;
  ADAPTWIN_AVX2 static __m256i first(int64_t left) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(left < 8 ? left : 8)),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  ADAPTWIN_AVX2 static Vec zero() { return _mm256_setzero_ps(); }
  ADAPTWIN_AVX2 static Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  ADAPTWIN_AVX2 static Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  ADAPTWIN_AVX2 static Vec loadf(const float* p) { return _mm256_loadu_ps(p); }
  ADAPTWIN_AVX2 static Vec loadf(const float* p, int64_t left) { return _mm256_maskload_ps(p, first(left)); }
  ADAPTWIN_AVX2 static Vec load_bf16(const uint16_t* p) {
    return widen_bf16_256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  ADAPTWIN_AVX2 static Vec keep(Vec v, int64_t left) { return _mm256_and_ps(v, _mm256_castsi256_ps(first(left))); }
  ADAPTWIN_AVX2 static Vec sums(const Vec* v) { return hsum8(v); }
  ADAPTWIN_AVX2 static float sum(Vec v) { return sum_lanes8(v); }
  ADAPTWIN_AVX2 static void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
};

#define ADAPTWIN_INLINE __attribute__((always_inline)) inline

// L values of the factor from element e as float32; `left` < L keeps only that many (the rest 0). A short
// bfloat16 tail inside the matrix is read whole and masked (AVX-512F has no 16-bit masked load); only the
// matrix's last values go through a zeroed copy: a 136-wide row's 8-value tail copied on every row cost a
// 136 -> 1536 bfloat16 call twice float32's time.
template <class Isa, bool BF16>
ADAPTWIN_INLINE typename Isa::Vec fp_load(const Codes& f, int64_t e, int64_t left) {
  constexpr int L = Isa::L;
  if (!BF16) {
    const float* p = static_cast<const float*>(f.data) + e;
    return left >= L ? Isa::loadf(p) : Isa::loadf(p, left);
  }
  const uint16_t* p = static_cast<const uint16_t*>(f.data) + e;
  if (left >= L) return Isa::load_bf16(p);
  if (e + L <= f.k * f.n) return Isa::keep(Isa::load_bf16(p), left);
  uint16_t tmp[L] = {};
  std::memcpy(tmp, p, static_cast<size_t>(left) * sizeof(uint16_t));
  return Isa::load_bf16(tmp);
}

// Σ_c A[r][c] · x[c] as the L lanes of a vector: row r of A front to back in two chains of FMAs, so that
// their latency does not pace the row's stream.
template <class Isa, bool BF16>
ADAPTWIN_INLINE typename Isa::Vec fp_dot_lanes(const Codes& a, int64_t r, const float* x) {
  constexpr int L = Isa::L;
  typename Isa::Vec s0 = Isa::zero(), s1 = Isa::zero();
  const int64_t e = r * a.n;
  int64_t c = 0;
  for (; c + 2 * L <= a.n; c += 2 * L) {
    s0 = Isa::fma(fp_load<Isa, BF16>(a, e + c, L), Isa::loadf(x + c), s0);
    s1 = Isa::fma(fp_load<Isa, BF16>(a, e + c + L, L), Isa::loadf(x + c + L), s1);
  }
  for (; c < a.n; c += L) {  // the last n % 2L columns (x's tail loaded under the same mask)
    const int64_t left = a.n - c;
    s0 = Isa::fma(fp_load<Isa, BF16>(a, e + c, left), Isa::loadf(x + c, left), s0);
  }
  return Isa::add(s0, s1);
}

// h (rows of x, ldh apart) columns [r0, r1) = x · A[r0:r1]ᵀ: a row of A at a time, front to back, read from
// memory for the first row of x and from L1 for the others, L rows' sums reduced together (hsum16 / hsum8: a
// row of 136 columns is five FMAs, and a horizontal sum per row made a 136 -> 1536 bfloat16 call scale with
// the rows of x as if compute-bound). On the 2-core Zen 4, Whisper-tiny's 51865 x 384 head: four rows of A a
// step, each load of x shared by four sums, ran 1.5x (float32) to 3x (bf16) slower, four streams 1.5 or 0.75
// KB apart defeating the prefetchers that one stream keeps busy; and for four rows of x, their four sums in
// one pass over a row took 3.35 against 2.7-2.9 ms for four passes.
template <class Isa, bool BF16>
ADAPTWIN_INLINE void fp_gemv_in_rows(const Codes& a, const float* x, int64_t rows, float* h, int64_t ldh, int64_t r0,
                                     int64_t r1) {
  constexpr int64_t kMaxRows = 8;  // rows of x at a time: their lane sums wait in v (8 KB of the stack)
  constexpr int L = Isa::L;
  int64_t r = r0;
  for (; r + L <= r1; r += L)
    for (int64_t m0 = 0; m0 < rows; m0 += kMaxRows) {
      const int64_t mm = std::min(kMaxRows, rows - m0);
      typename Isa::Vec v[kMaxRows][L];
      for (int j = 0; j < L; ++j)
        for (int64_t m = 0; m < mm; ++m) v[m][j] = fp_dot_lanes<Isa, BF16>(a, r + j, x + (m0 + m) * a.n);
      for (int64_t m = 0; m < mm; ++m) Isa::store(h + (m0 + m) * ldh + r, Isa::sums(v[m]));
    }
  for (; r < r1; ++r)
    for (int64_t m = 0; m < rows; ++m) h[m * ldh + r] = Isa::sum(fp_dot_lanes<Isa, BF16>(a, r, x + m * a.n));
}

ADAPTWIN_AVX512 void fp_gemv_in_avx512(const Codes& a, const float* x, int64_t rows, float* h, int64_t ldh,
                                       int64_t r0, int64_t r1) {
  if (a.bf16)
    fp_gemv_in_rows<Avx512Rows, true>(a, x, rows, h, ldh, r0, r1);
  else
    fp_gemv_in_rows<Avx512Rows, false>(a, x, rows, h, ldh, r0, r1);
}

ADAPTWIN_AVX2 void fp_gemv_in_avx2(const Codes& a, const float* x, int64_t rows, float* h, int64_t ldh, int64_t r0,
                                   int64_t r1) {
  if (a.bf16)
    fp_gemv_in_rows<Avx2Rows, true>(a, x, rows, h, ldh, r0, r1);
  else
    fp_gemv_in_rows<Avx2Rows, false>(a, x, rows, h, ldh, r0, r1);
}

// y[m * ldy + c] += Σ_r h[m * k + r] · B[r][c] for columns [c0, min(c0 + 16 C, end)), x's rows m < M.
template <bool BF16, int M, int C>
ADAPTWIN_AVX512 inline void fp_out_block(const Codes& b, const float* h, float* y, int64_t ldy, int64_t c0,
                                         int64_t end) {
  __m512 acc[M][C];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < C; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t r = 0; r < b.k; ++r) {
    __m512 w[C];
    for (int j = 0; j < C; ++j) w[j] = fp_load<Avx512Rows, BF16>(b, r * b.n + c0 + 16 * j, end - c0 - 16 * j);
    for (int m = 0; m < M; ++m) {
      const __m512 hv = _mm512_set1_ps(h[m * b.k + r]);
      for (int j = 0; j < C; ++j) acc[m][j] = _mm512_fmadd_ps(w[j], hv, acc[m][j]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < C; ++j) {
      float* p = y + m * ldy + c0 + 16 * j;
      const __mmask16 mask = tail_mask(end - c0 - 16 * j);
      _mm512_mask_storeu_ps(p, mask, _mm512_add_ps(_mm512_maskz_loadu_ps(mask, p), acc[m][j]));
    }
}

// y (M rows, ldy apart) columns [c0, c1) += h (M rows, k apart) · B[:, c0:c1], M <= 8: 64 columns a step (32
// for M > 4), each row of B read once per step for every row of h; the last columns 16 at a time.
template <bool BF16, int M>
ADAPTWIN_AVX512 void fp_gemv_out_cols(const Codes& b, const float* h, float* y, int64_t ldy, int64_t c0,
                                      int64_t c1) {
  constexpr int C = M <= 4 ? 4 : 2;
  int64_t c = c0;
  for (; c + 16 * C <= c1; c += 16 * C) fp_out_block<BF16, M, C>(b, h, y, ldy, c, c1);
  for (; c < c1; c += 16) fp_out_block<BF16, M, 1>(b, h, y, ldy, c, c1);
}

template <int M>
void fp_gemv_out_avx512(const Codes& b, const float* h, float* y, int64_t ldy, int64_t c0, int64_t c1) {
  if (b.bf16)
    fp_gemv_out_cols<true, M>(b, h, y, ldy, c0, c1);
  else
    fp_gemv_out_cols<false, M>(b, h, y, ldy, c0, c1);
}
#endif

}  // namespace
}  // namespace adaptwin
