// Fused register-decode kernels of the CPU rank_linear for AArch64 (NEON; included by
// rank_linear_products.h, and by tests/simd_decode.cpp: free of torch): one row of x (batch-1 decoding),
// NF4 or int8 factors that codes.h's `fused_ok` takes, 16 codes at a time decoded into four float32x4
// (nf4_16_neon / int8_16_neon of codes.h) and consumed at once, as rank_linear_avx2.h does on x86 CPUs
// without AVX-512. Other calls on AArch64 take the buffered NEON path (a chunk decoded into L1, then dot /
// axpy). Layouts: adaptwin/ops/rank_linear.py.
#pragma once

#include "codes.h"
#include "cpu_features.h"

namespace adaptwin {
namespace {

#if ADAPTWIN_NEON
// 16 codes of the factor from element e (a multiple of 16, in one row) as floats, unscaled.
template <bool kInt8>
inline void codes_16(const Codes& f, int64_t e, const uint8x16x4_t& lut, float32x4_t out[4]) {
  if constexpr (kInt8)
    int8_16_neon(static_cast<const int8_t*>(f.data) + e, out);
  else
    nf4_16_neon(static_cast<const uint8_t*>(f.data) + e / 2, lut, out);
}

// h[r + i] = A[r + i, :]·x for i < R: R rank rows at a time, x loaded once for all of them, two
// accumulators a row (independent FMA chains), each scale group's sum multiplied by its scale.
template <bool kInt8, int R>
void in_rows_neon(const Codes& f, const float* x, float* h, int64_t r, const uint8x16x4_t& lut) {
  const int64_t group = scale_group(f), blocks = f.n / group;
  const float* scale = f.scale + r * blocks;
  float32x4_t tot[R];
  for (int i = 0; i < R; ++i) tot[i] = vdupq_n_f32(0.0f);
  for (int64_t blk = 0; blk < blocks; ++blk) {
    float32x4_t acc0[R], acc1[R];
    for (int i = 0; i < R; ++i) acc0[i] = acc1[i] = vdupq_n_f32(0.0f);
    const int64_t c0 = blk * group;
    for (int64_t c = c0; c < c0 + group; c += 16) {
      const float32x4_t x0 = vld1q_f32(x + c), x1 = vld1q_f32(x + c + 4), x2 = vld1q_f32(x + c + 8),
                        x3 = vld1q_f32(x + c + 12);
      for (int i = 0; i < R; ++i) {
        float32x4_t w[4];
        codes_16<kInt8>(f, (r + i) * f.n + c, lut, w);
        acc0[i] = vfmaq_f32(acc0[i], w[0], x0);
        acc1[i] = vfmaq_f32(acc1[i], w[1], x1);
        acc0[i] = vfmaq_f32(acc0[i], w[2], x2);
        acc1[i] = vfmaq_f32(acc1[i], w[3], x3);
      }
    }
    for (int i = 0; i < R; ++i) tot[i] = vfmaq_n_f32(tot[i], vaddq_f32(acc0[i], acc1[i]), scale[i * blocks + blk]);
  }
  for (int i = 0; i < R; ++i) h[r + i] = vaddvq_f32(tot[i]);
}

// h[r0:r1] = A[r0:r1]·x.
template <bool kInt8>
void in_neon(const Codes& f, const float* x, float* h, int64_t r0, int64_t r1) {
  const uint8x16x4_t lut = nf4_table_neon();
  for (; r0 + 4 <= r1; r0 += 4) in_rows_neon<kInt8, 4>(f, x, h, r0, lut);
  for (; r0 < r1; ++r0) in_rows_neon<kInt8, 1>(f, x, h, r0, lut);
}

void gemv_in_neon(const Codes& f, const float* x, float* h, int64_t r0, int64_t r1) {
  if (f.format == Format::kInt8)
    in_neon<true>(f, x, h, r0, r1);
  else
    in_neon<false>(f, x, h, r0, r1);
}

// y[c : c + 16·kG] += h·B[:, c : c + 16·kG]: 4·kG accumulators held across all k directions, h times the
// scale formed once per direction and scale group (a group of 32 or more never splits a run of 16).
template <bool kInt8, int kG>
void out_pass_neon(const Codes& f, const float* h, float* y, int64_t c, const uint8x16x4_t& lut) {
  const int64_t group = scale_group(f), blocks = f.n / group;
  int64_t block_of[kG];
  float32x4_t acc[kG][4];
  for (int g = 0; g < kG; ++g) {
    block_of[g] = (c + 16 * g) / group;
    for (int q = 0; q < 4; ++q) acc[g][q] = vld1q_f32(y + c + 16 * g + 4 * q);
  }
  for (int64_t r = 0; r < f.k; ++r) {
    const int64_t e = r * f.n + c;
    const float* scale = f.scale + r * blocks;
    float coef = h[r] * scale[block_of[0]];
    for (int g = 0; g < kG; ++g) {
      if (g > 0 && block_of[g] != block_of[g - 1]) coef = h[r] * scale[block_of[g]];
      float32x4_t w[4];
      codes_16<kInt8>(f, e + 16 * g, lut, w);
      for (int q = 0; q < 4; ++q) acc[g][q] = vfmaq_n_f32(acc[g][q], w[q], coef);
    }
  }
  for (int g = 0; g < kG; ++g)
    for (int q = 0; q < 4; ++q) vst1q_f32(y + c + 16 * g + 4 * q, acc[g][q]);
}

// y[c0:c1] += h·B[:, c0:c1] (c0, c1 multiples of 32).
template <bool kInt8>
void out_neon(const Codes& f, const float* h, float* y, int64_t c0, int64_t c1) {
  const uint8x16x4_t lut = nf4_table_neon();
  int64_t c = c0;
  for (; c + 64 <= c1; c += 64) out_pass_neon<kInt8, 4>(f, h, y, c, lut);
  if (c < c1) out_pass_neon<kInt8, 2>(f, h, y, c, lut);
}

void gemv_out_neon(const Codes& f, const float* h, float* y, int64_t c0, int64_t c1) {
  if (f.format == Format::kInt8)
    out_neon<true>(f, h, y, c0, c1);
  else
    out_neon<false>(f, h, y, c0, c1);
}
#endif

}  // namespace
}  // namespace adaptwin
