// Fused register-decode kernels of the CPU rank_linear for x86 CPUs with AVX2 + FMA but no AVX-512
// (included by rank_linear_products.h, and by tests/simd_decode.cpp: free of torch): one row of x (batch-1
// decoding), NF4 or int8 factors that `fused_ok` takes, decoded in registers (NF4 32 codes at a time from byte
// planes, int8 8 at a time widened) and consumed at once, as rank_linear_fused.h does with AVX-512. Other
// calls on those CPUs take the buffered AVX2 path (a chunk decoded into L1 by codes.h, then dot / axpy).
// Layouts: adaptwin/ops/rank_linear.py.
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

// 8 int8 codes of the factor from element e as floats, unscaled.
ADAPTWIN_AVX2 inline __m256 int8_8(const Codes& f, int64_t e) {
  const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(f.data) + e));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
}

// --- NF4: 32 codes per step, in split order (nf4_32_avx2_split of codes.h) ------------------------------

// h[r + i] = A[r + i, :]·x for i < R (NF4).
template <int R>
ADAPTWIN_AVX2 void nf4_in_rows_avx2(const Codes& f, const float* x, float* h, int64_t r, const Nf4Planes& planes) {
  const int64_t blocks = f.n / f.blocksize;
  const float* scale = f.scale + r * blocks;
  const uint8_t* codes = static_cast<const uint8_t*>(f.data) + r * f.n / 2;
  __m256 tot[R];
  for (int i = 0; i < R; ++i) tot[i] = _mm256_setzero_ps();
  for (int64_t blk = 0; blk < blocks; ++blk) {
    __m256 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
    const int64_t c0 = blk * f.blocksize;
    for (int64_t c = c0; c < c0 + f.blocksize; c += 32) {
      __m256 xv[4];
      for (int q = 0; q < 4; ++q) xv[q] = split_8(_mm256_loadu_ps(x + c + 8 * q));
      for (int i = 0; i < R; ++i) {
        __m256 w[4];
        nf4_32_avx2_split(codes + i * f.n / 2 + c / 2, planes, w);
        for (int q = 0; q < 4; ++q) acc[i] = _mm256_fmadd_ps(w[q], xv[q], acc[i]);
      }
    }
    for (int i = 0; i < R; ++i) tot[i] = _mm256_fmadd_ps(acc[i], _mm256_set1_ps(scale[i * blocks + blk]), tot[i]);
  }
  for (int i = 0; i < R; ++i) h[r + i] = hsum256(tot[i]);
}

// y[c : c + 32·kG] += h·B[:, c : c + 32·kG] (NF4): 4·kG accumulators in split order held across all k
// directions, h times the scale formed once per direction and 32 columns (blocks hold whole 32s).
template <int kG>
ADAPTWIN_AVX2 void nf4_out_pass_avx2(const Codes& f, const float* h, float* y, int64_t c, const Nf4Planes& planes) {
  const int64_t blocks = f.n / f.blocksize;
  int64_t block_of[kG];
  __m256 acc[kG][4];
  for (int g = 0; g < kG; ++g) {
    block_of[g] = (c + 32 * g) / f.blocksize;
    for (int q = 0; q < 4; ++q) acc[g][q] = split_8(_mm256_loadu_ps(y + c + 32 * g + 8 * q));
  }
  const uint8_t* codes = static_cast<const uint8_t*>(f.data) + c / 2;
  for (int64_t r = 0; r < f.k; ++r) {
    const float* scale = f.scale + r * blocks;
    for (int g = 0; g < kG; ++g) {
      const __m256 coef = _mm256_set1_ps(h[r] * scale[block_of[g]]);
      __m256 w[4];
      nf4_32_avx2_split(codes + r * f.n / 2 + 16 * g, planes, w);
      for (int q = 0; q < 4; ++q) acc[g][q] = _mm256_fmadd_ps(coef, w[q], acc[g][q]);
    }
  }
  for (int g = 0; g < kG; ++g)
    for (int q = 0; q < 4; ++q) _mm256_storeu_ps(y + c + 32 * g + 8 * q, merge_8(acc[g][q]));
}

// --- int8: 8 codes per step ------------------------------------------------------------------------------

// h[r + i] = A[r + i, :]·x for i < R: R rank rows at a time, x loaded once for all of them, each scale
// group's sum multiplied by its scale.
template <int R>
ADAPTWIN_AVX2 void int8_in_rows_avx2(const Codes& f, const float* x, float* h, int64_t r) {
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
        acc[i] = _mm256_fmadd_ps(int8_8(f, e), x0, acc[i]);
        acc[i] = _mm256_fmadd_ps(int8_8(f, e + 8), x1, acc[i]);
      }
    }
    for (int i = 0; i < R; ++i) tot[i] = _mm256_fmadd_ps(acc[i], _mm256_set1_ps(scale[i * blocks + blk]), tot[i]);
  }
  for (int i = 0; i < R; ++i) h[r + i] = hsum256(tot[i]);
}

// h[r0:r1] = A[r0:r1]·x, x·Aᵀ's rank rows [r0, r1).
ADAPTWIN_AVX2 void int8_in_avx2(const Codes& f, const float* x, float* h, int64_t r0, int64_t r1) {
  for (; r0 + 4 <= r1; r0 += 4) int8_in_rows_avx2<4>(f, x, h, r0);
  for (; r0 < r1; ++r0) int8_in_rows_avx2<1>(f, x, h, r0);
}

ADAPTWIN_AVX2 void nf4_in_avx2(const Codes& f, const float* x, float* h, int64_t r0, int64_t r1) {
  const Nf4Planes planes = nf4_planes_avx2();
  for (; r0 + 4 <= r1; r0 += 4) nf4_in_rows_avx2<4>(f, x, h, r0, planes);
  for (; r0 < r1; ++r0) nf4_in_rows_avx2<1>(f, x, h, r0, planes);
}

void gemv_in_avx2(const Codes& f, const float* x, float* h, int64_t r0, int64_t r1) {
  if (f.format == Format::kInt8)
    int8_in_avx2(f, x, h, r0, r1);
  else
    nf4_in_avx2(f, x, h, r0, r1);
}

// y[c : c + 8·kG] += h·B[:, c : c + 8·kG]: kG accumulators held across all k directions, h times the scale
// formed once per direction and scale block.
template <int kG>
ADAPTWIN_AVX2 void int8_out_pass_avx2(const Codes& f, const float* h, float* y, int64_t c) {
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
      acc[g] = _mm256_fmadd_ps(coef, int8_8(f, e + 8 * g), acc[g]);
    }
  }
  for (int g = 0; g < kG; ++g) _mm256_storeu_ps(y + c + 8 * g, acc[g]);
}

// y[c0:c1] += h·B[:, c0:c1] (c0, c1 multiples of 32).
ADAPTWIN_AVX2 void int8_out_avx2(const Codes& f, const float* h, float* y, int64_t c0, int64_t c1) {
  int64_t c = c0;
  for (; c + 64 <= c1; c += 64) int8_out_pass_avx2<8>(f, h, y, c);
  if (c < c1) int8_out_pass_avx2<4>(f, h, y, c);
}

ADAPTWIN_AVX2 void nf4_out_avx2(const Codes& f, const float* h, float* y, int64_t c0, int64_t c1) {
  const Nf4Planes planes = nf4_planes_avx2();
  int64_t c = c0;
  for (; c + 64 <= c1; c += 64) nf4_out_pass_avx2<2>(f, h, y, c, planes);
  if (c < c1) nf4_out_pass_avx2<1>(f, h, y, c, planes);
}

void gemv_out_avx2(const Codes& f, const float* h, float* y, int64_t c0, int64_t c1) {
  if (f.format == Format::kInt8)
    int8_out_avx2(f, h, y, c0, c1);
  else
    nf4_out_avx2(f, h, y, c0, c1);
}
#endif

}  // namespace
}  // namespace adaptwin
