// Fused register-decode kernels of the CPU rank_linear for AArch64 (NEON; included by
// rank_linear_products.h, and by tests/simd_decode.cpp: free of torch): one row of x (batch-1 decoding),
// NF4 or int8 factors that codes.h's `fused_ok` takes, 32 codes at a time decoded into eight float32x4
// (nf4_32_neon_split / int8_16_neon of codes.h) and consumed at once, as rank_linear_avx2.h does on x86 CPUs
// without AVX-512. Other calls on AArch64 take the buffered NEON path (a chunk decoded into L1, then dot /
// axpy). Layouts: adaptwin/ops/rank_linear.py.
#pragma once

#include "codes.h"
#include "cpu_features.h"

namespace adaptwin {
namespace {

#if ADAPTWIN_NEON
// 32 codes of the factor from element e (a multiple of 32, in one row) as floats, unscaled: NF4 in codes.h's
// split order (nf4_32_neon_split: the even elements, then the odd), int8 in element order.
template <bool kInt8>
inline void codes_32(const Codes& f, int64_t e, const uint8x16x4_t& planes, float32x4_t out[8]) {
  if constexpr (kInt8) {
    int8_16_neon(static_cast<const int8_t*>(f.data) + e, out);
    int8_16_neon(static_cast<const int8_t*>(f.data) + e + 16, out + 4);
  } else {
    nf4_32_neon_split(static_cast<const uint8_t*>(f.data) + e / 2, planes, out);
  }
}

// 32 floats from p in the order codes_32<kInt8> gives its values, and back.
template <bool kInt8>
inline void load_32(const float* p, float32x4_t out[8]) {
  if constexpr (kInt8) {
    for (int q = 0; q < 8; ++q) out[q] = vld1q_f32(p + 4 * q);
  } else {
    for (int j = 0; j < 4; ++j) {
      const float32x4_t a = vld1q_f32(p + 8 * j), b = vld1q_f32(p + 8 * j + 4);
      out[j] = vuzp1q_f32(a, b);
      out[4 + j] = vuzp2q_f32(a, b);
    }
  }
}

template <bool kInt8>
inline void store_32(float* p, const float32x4_t in[8]) {
  if constexpr (kInt8) {
    for (int q = 0; q < 8; ++q) vst1q_f32(p + 4 * q, in[q]);
  } else {
    for (int j = 0; j < 4; ++j) {
      vst1q_f32(p + 8 * j, vzip1q_f32(in[j], in[4 + j]));
      vst1q_f32(p + 8 * j + 4, vzip2q_f32(in[j], in[4 + j]));
    }
  }
}

// h[r + i] = A[r + i, :]·x for i < R: R rank rows at a time, x loaded (and split) once for all of them, two
// accumulators a row (independent FMA chains), each scale group's sum multiplied by its scale.
template <bool kInt8, int R>
void in_rows_neon(const Codes& f, const float* x, float* h, int64_t r, const uint8x16x4_t& planes) {
  const int64_t group = scale_group(f), blocks = f.n / group;
  const float* scale = f.scale + r * blocks;
  float tot[R] = {};
  for (int64_t blk = 0; blk < blocks; ++blk) {
    float32x4_t acc0[R], acc1[R];
    for (int i = 0; i < R; ++i) acc0[i] = acc1[i] = vdupq_n_f32(0.0f);
    const int64_t c0 = blk * group;
    for (int64_t c = c0; c < c0 + group; c += 32) {
      float32x4_t xv[8];
      load_32<kInt8>(x + c, xv);
      for (int i = 0; i < R; ++i) {
        float32x4_t w[8];
        codes_32<kInt8>(f, (r + i) * f.n + c, planes, w);
        for (int q = 0; q < 8; q += 2) {
          acc0[i] = vfmaq_f32(acc0[i], w[q], xv[q]);
          acc1[i] = vfmaq_f32(acc1[i], w[q + 1], xv[q + 1]);
        }
      }
    }
    for (int i = 0; i < R; ++i) tot[i] += vaddvq_f32(vaddq_f32(acc0[i], acc1[i])) * scale[i * blocks + blk];
  }
  for (int i = 0; i < R; ++i) h[r + i] = tot[i];
}

// h[r0:r1] = A[r0:r1]·x.
template <bool kInt8>
void in_neon(const Codes& f, const float* x, float* h, int64_t r0, int64_t r1) {
  const uint8x16x4_t planes = nf4_table_neon();
  for (; r0 + 4 <= r1; r0 += 4) in_rows_neon<kInt8, 4>(f, x, h, r0, planes);
  for (; r0 < r1; ++r0) in_rows_neon<kInt8, 1>(f, x, h, r0, planes);
}

void gemv_in_neon(const Codes& f, const float* x, float* h, int64_t r0, int64_t r1) {
  if (f.format == Format::kInt8)
    in_neon<true>(f, x, h, r0, r1);
  else
    in_neon<false>(f, x, h, r0, r1);
}

// y[c : c + 32·kG] += h·B[:, c : c + 32·kG]: 8·kG accumulators (y split as the codes come) held across all k
// directions, h times the scale formed once per direction and scale group (groups of 32 or more codes:
// a run of 32 from a multiple of 32 is in one).
template <bool kInt8, int kG>
void out_pass_neon(const Codes& f, const float* h, float* y, int64_t c, const uint8x16x4_t& planes) {
  const int64_t group = scale_group(f), blocks = f.n / group;
  int64_t block_of[kG];
  float32x4_t acc[kG][8];
  for (int g = 0; g < kG; ++g) {
    block_of[g] = (c + 32 * g) / group;
    load_32<kInt8>(y + c + 32 * g, acc[g]);
  }
  for (int64_t r = 0; r < f.k; ++r) {
    const int64_t e = r * f.n + c;
    const float* scale = f.scale + r * blocks;
    float coef = h[r] * scale[block_of[0]];
    for (int g = 0; g < kG; ++g) {
      if (g > 0 && block_of[g] != block_of[g - 1]) coef = h[r] * scale[block_of[g]];
      float32x4_t w[8];
      codes_32<kInt8>(f, e + 32 * g, planes, w);
      for (int q = 0; q < 8; ++q) acc[g][q] = vfmaq_n_f32(acc[g][q], w[q], coef);
    }
  }
  for (int g = 0; g < kG; ++g) store_32<kInt8>(y + c + 32 * g, acc[g]);
}

// y[c0:c1] += h·B[:, c0:c1] (c0, c1 multiples of 32).
template <bool kInt8>
void out_neon(const Codes& f, const float* h, float* y, int64_t c0, int64_t c1) {
  const uint8x16x4_t planes = nf4_table_neon();
  int64_t c = c0;
  for (; c + 64 <= c1; c += 64) out_pass_neon<kInt8, 2>(f, h, y, c, planes);
  if (c < c1) out_pass_neon<kInt8, 1>(f, h, y, c, planes);
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
