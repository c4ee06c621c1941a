// Fused register-decode kernels of the CPU rank_linear for x86 CPUs with AVX2 + FMA but no AVX-512
// (included by rank_linear_products.h, and by tests/simd_decode.cpp: free of torch): one row of x (batch-1
// decoding), NF4 or int8 factors that `fused_ok` takes, 8 codes at a time decoded in registers (NF4 by nf4_8
// of codes.h, int8 widened) and consumed at once, as rank_linear_fused.h does with AVX-512. Other calls on
// those CPUs take the buffered AVX2 path (a chunk decoded into L1, then dot / axpy). Layouts:
// adaptwin/ops/rank_linear.py.
#pragma once

#include "codes.h"
#include "cpu_features.h"

namespace adaptwin {
namespace {

#if ADAPTWIN_X86
ADAPTWIN_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 codes of the factor from element e (a multiple of 8, in one row) as floats, unscaled.
template <bool kInt8>
ADAPTWIN_AVX2 inline __m256 codes_8(const Codes& f, int64_t e, __m256 lo, __m256 hi) {
  if constexpr (kInt8) {
    const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(f.data) + e));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
  } else {
    return nf4_8(static_cast<const uint8_t*>(f.data) + e / 2, lo, hi);
  }
}

// h[r + i] = A[r + i, :]·x for i < R: R rank rows at a time, x loaded once for all of them, each scale
// group's sum multiplied by its scale.
template <bool kInt8, int R>
ADAPTWIN_AVX2 void in_rows_avx2(const Codes& f, const float* x, float* h, int64_t r, __m256 lo, __m256 hi) {
  const int64_t group = scale_group(f), blocks = f.n / group;
  const float* scale = f.scale + r * blocks;
  __m256 tot[R];
  for (int i = 0; i < R; ++i) tot[i] = _mm256_setzero_ps();
  for (int64_t blk = 0; blk < blocks; ++blk) {
    __m256 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
    const int64_t c0 = blk * group;
    for (int64_t c = c0; c < c0 + group; c += 16) {
      const __m256 x0 = _mm256_loadu_ps(x + c), x1 = _mm256_loadu_ps(x + c + 8);
      for (int i = 0; i < R; ++i) {
        const int64_t e = (r + i) * f.n + c;
        acc[i] = _mm256_fmadd_ps(codes_8<kInt8>(f, e, lo, hi), x0, acc[i]);
        acc[i] = _mm256_fmadd_ps(codes_8<kInt8>(f, e + 8, lo, hi), x1, acc[i]);
      }
    }
    for (int i = 0; i < R; ++i) tot[i] = _mm256_fmadd_ps(acc[i], _mm256_set1_ps(scale[i * blocks + blk]), tot[i]);
  }
  for (int i = 0; i < R; ++i) h[r + i] = hsum256(tot[i]);
}

// h[r0:r1] = A[r0:r1]·x.
template <bool kInt8>
ADAPTWIN_AVX2 void in_avx2(const Codes& f, const float* x, float* h, int64_t r0, int64_t r1) {
  const __m256 lo = _mm256_loadu_ps(kNF4), hi = _mm256_loadu_ps(kNF4 + 8);
  for (; r0 + 4 <= r1; r0 += 4) in_rows_avx2<kInt8, 4>(f, x, h, r0, lo, hi);
  for (; r0 < r1; ++r0) in_rows_avx2<kInt8, 1>(f, x, h, r0, lo, hi);
}

void gemv_in_avx2(const Codes& f, const float* x, float* h, int64_t r0, int64_t r1) {
  if (f.format == Format::kInt8)
    in_avx2<true>(f, x, h, r0, r1);
  else
    in_avx2<false>(f, x, h, r0, r1);
}

// y[c : c + 8·kG] += h·B[:, c : c + 8·kG]: kG accumulators held across all k directions, h times the scale
// formed once per direction and scale block.
template <bool kInt8, int kG>
ADAPTWIN_AVX2 void out_pass_avx2(const Codes& f, const float* h, float* y, int64_t c, __m256 lo, __m256 hi) {
  const int64_t group = scale_group(f), blocks = f.n / group;
  int64_t block_of[kG];
  __m256 acc[kG];
  for (int g = 0; g < kG; ++g) {
    block_of[g] = (c + 8 * g) / group;
    acc[g] = _mm256_loadu_ps(y + c + 8 * g);
  }
  const bool one_block = block_of[0] == block_of[kG - 1];
  for (int64_t r = 0; r < f.k; ++r) {
    const int64_t e = r * f.n + c;
    const float* scale = f.scale + r * blocks;
    __m256 coef = _mm256_set1_ps(h[r] * scale[block_of[0]]);
    for (int g = 0; g < kG; ++g) {
      if (!one_block && g > 0 && block_of[g] != block_of[g - 1]) coef = _mm256_set1_ps(h[r] * scale[block_of[g]]);
      acc[g] = _mm256_fmadd_ps(coef, codes_8<kInt8>(f, e + 8 * g, lo, hi), acc[g]);
    }
  }
  for (int g = 0; g < kG; ++g) _mm256_storeu_ps(y + c + 8 * g, acc[g]);
}

// y[c0:c1] += h·B[:, c0:c1] (c0, c1 multiples of 32).
template <bool kInt8>
ADAPTWIN_AVX2 void out_avx2(const Codes& f, const float* h, float* y, int64_t c0, int64_t c1) {
  const __m256 lo = _mm256_loadu_ps(kNF4), hi = _mm256_loadu_ps(kNF4 + 8);
  int64_t c = c0;
  for (; c + 64 <= c1; c += 64) out_pass_avx2<kInt8, 8>(f, h, y, c, lo, hi);
  if (c < c1) out_pass_avx2<kInt8, 4>(f, h, y, c, lo, hi);
}

void gemv_out_avx2(const Codes& f, const float* h, float* y, int64_t c0, int64_t c1) {
  if (f.format == Format::kInt8)
    out_avx2<true>(f, h, y, c0, c1);
  else
    out_avx2<false>(f, h, y, c0, c1);
}
#endif

}  // namespace
}  // namespace adaptwin
