// The exact (erf) GELU in place over float32 or bfloat16 values, in SIMD registers: AVX-512, AVX2 + FMA and
// NEON (included by activation.cpp, and by tests/simd_decode.cpp: free of torch). It serves the batch-1 calls
// of the compressed FFNs (adaptwin.ops.activation.activate), where ATen's gelu_ goes through oneDNN, which
// builds an eltwise primitive descriptor on every call: 7-9 us for a 1536-wide row in a small process and a
// median of 31 us inside Whisper decoding (heap churn), against under a microsecond of arithmetic.
//
// GELU(x) = x/2 · (1 + erf(x/√2)), with erfc(z) = t·P(t)·e^(-z²), t = 1 / (1 + p·z), z = |x|/√2 ≥ 0
// (Abramowitz & Stegun 7.1.26, |error| ≤ 1.5e-7), so that x ≥ 0 takes x/2 · (2 - erfc(z)) and x < 0
// x/2 · erfc(z), with no cancellation in the negative tail. e^(-z²) is 2^(-z²·log2e) by the exp2 polynomial
// of the attention kernels. Against float64 over [-10, 10] and N(0, 9) samples (AVX-512): 4.2e-7 absolute at
// most (2.8e-7·|x|), against 1.2e-6 for torch's own float32 gelu here (oneDNN), whose negative tail below -3
// also flushes to 0 where this keeps relative error under 2e-2. Special values: NaN gives NaN, +inf +inf, -inf NaN
// (as ATen's vectorised GELU; oneDNN's gives NaN for +inf too), -0 gives -0. bfloat16 values are widened,
// computed in float32 and rounded to nearest even, as torch's bfloat16 gelu rounds.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "bf16.h"
#include "cpu_features.h"

namespace adaptwin {
namespace {

constexpr float kGeluP = 0.3275911f;  // A&S 7.1.26
constexpr float kGeluA[5] = {0.254829592f, -0.284496736f, 1.421413741f, -1.453152027f, 1.061405429f};
constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kGeluLog2e = 1.44269504088896341f;

// The same formula in scalar float32 arithmetic (std::exp2 for the exponential): the reference the SIMD paths
// are checked against (tests/simd_decode.cpp) and, in tests, what a tail of lanes would give.
inline float gelu_scalar(float x) {
  const float z = std::fabs(x) * kSqrtHalf;
  const float t = 1.0f / (kGeluP * z + 1.0f);
  float p = kGeluA[4];
  for (int i = 3; i >= 0; --i) p = p * t + kGeluA[i];
  const float erfc = p * t * std::exp2(-(z * z) * kGeluLog2e);
  return 0.5f * x * (x < 0.0f ? erfc : 2.0f - erfc);
}

#if ADAPTWIN_X86
ADAPTWIN_AVX512 inline __m512 gelu512(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 z = _mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(kSqrtHalf));
  const __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(kGeluP), z, one));
  __m512 p = _mm512_set1_ps(kGeluA[4]);
  for (int i = 3; i >= 0; --i) p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(kGeluA[i]));
  const __m512 e = exp2_512_nonpos(_mm512_mul_ps(_mm512_mul_ps(z, z), _mm512_set1_ps(-kGeluLog2e)));
  const __m512 erfc = _mm512_mul_ps(_mm512_mul_ps(p, t), e);
  const __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 w = _mm512_mask_blend_ps(neg, _mm512_sub_ps(_mm512_set1_ps(2.0f), erfc), erfc);
  return _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)), w);
}

ADAPTWIN_AVX512 inline void gelu_f32_avx512(float* y, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    _mm512_mask_storeu_ps(y + i, m, gelu512(_mm512_maskz_loadu_ps(m, y + i)));
  }
}

ADAPTWIN_AVX512 inline void gelu_bf16_avx512(uint16_t* y, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), bf16_round512(gelu512(widen_bf16_512(b))));
  }
  if (i < n) {  // the tail through a buffer (16-bit masked loads would need AVX512-BW)
    alignas(32) uint16_t buf[16] = {};
    std::memcpy(buf, y + i, static_cast<size_t>(n - i) * sizeof(uint16_t));
    const __m256i b = _mm256_load_si256(reinterpret_cast<const __m256i*>(buf));
    _mm256_store_si256(reinterpret_cast<__m256i*>(buf), bf16_round512(gelu512(widen_bf16_512(b))));
    std::memcpy(y + i, buf, static_cast<size_t>(n - i) * sizeof(uint16_t));
  }
}

ADAPTWIN_AVX2 inline __m256 gelu256(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 z = _mm256_mul_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), x), _mm256_set1_ps(kSqrtHalf));
  const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(kGeluP), z, one));
  __m256 p = _mm256_set1_ps(kGeluA[4]);
  for (int i = 3; i >= 0; --i) p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(kGeluA[i]));
  const __m256 e = exp2_256_nonpos(_mm256_mul_ps(_mm256_mul_ps(z, z), _mm256_set1_ps(-kGeluLog2e)));
  const __m256 erfc = _mm256_mul_ps(_mm256_mul_ps(p, t), e);
  const __m256 neg = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
  const __m256 w = _mm256_blendv_ps(_mm256_sub_ps(_mm256_set1_ps(2.0f), erfc), erfc, neg);
  return _mm256_mul_ps(_mm256_mul_ps(x, _mm256_set1_ps(0.5f)), w);
}

ADAPTWIN_AVX2 inline void gelu_f32_avx2(float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, gelu256(_mm256_loadu_ps(y + i)));
  if (i < n) {
    alignas(32) float buf[8] = {};
    std::memcpy(buf, y + i, static_cast<size_t>(n - i) * sizeof(float));
    _mm256_store_ps(buf, gelu256(_mm256_load_ps(buf)));
    std::memcpy(y + i, buf, static_cast<size_t>(n - i) * sizeof(float));
  }
}

ADAPTWIN_AVX2 inline void gelu_bf16_avx2(uint16_t* y, int64_t n) {
  for (int64_t i = 0; i < n; i += 8) {
    const int64_t len = n - i < 8 ? n - i : 8;
    alignas(32) uint16_t in[8] = {};
    std::memcpy(in, y + i, static_cast<size_t>(len) * sizeof(uint16_t));
    const __m256 x = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(in))), 16));
    alignas(32) float out[8];
    _mm256_store_ps(out, gelu256(x));
    for (int64_t j = 0; j < len; ++j) y[i + j] = float_to_bf16(out[j]);
  }
}
#endif

#if ADAPTWIN_NEON
// 2^x for 4 floats x <= 0 (-inf gives 0): the polynomial of the x86 paths, 2^n assembled in the exponent bits
// (x clamped at -127, whose n gives exponent bits 0: a zero factor).
inline float32x4_t gelu_exp2_neon(float32x4_t x) {
  x = vmaxq_f32(vdupq_n_f32(-127.0f), x);  // vmaxq_f32 gives NaN where x is NaN
  const float32x4_t n = vrndnq_f32(x);
  const float32x4_t f = vsubq_f32(x, n);
  float32x4_t p = vdupq_n_f32(kExp2Poly[0]);
  for (int i = 1; i < 7; ++i) p = vfmaq_f32(vdupq_n_f32(kExp2Poly[i]), p, f);
  const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
  return vmulq_f32(p, vreinterpretq_f32_s32(e));
}

inline float32x4_t gelu_neon4(float32x4_t x) {
  const float32x4_t one = vdupq_n_f32(1.0f);
  const float32x4_t z = vmulq_f32(vabsq_f32(x), vdupq_n_f32(kSqrtHalf));
  const float32x4_t t = vdivq_f32(one, vfmaq_f32(one, vdupq_n_f32(kGeluP), z));
  float32x4_t p = vdupq_n_f32(kGeluA[4]);
  for (int i = 3; i >= 0; --i) p = vfmaq_f32(vdupq_n_f32(kGeluA[i]), p, t);
  const float32x4_t e = gelu_exp2_neon(vmulq_f32(vmulq_f32(z, z), vdupq_n_f32(-kGeluLog2e)));
  const float32x4_t erfc = vmulq_f32(vmulq_f32(p, t), e);
  const uint32x4_t neg = vcltq_f32(x, vdupq_n_f32(0.0f));
  const float32x4_t w = vbslq_f32(neg, erfc, vsubq_f32(vdupq_n_f32(2.0f), erfc));
  return vmulq_f32(vmulq_f32(x, vdupq_n_f32(0.5f)), w);
}

inline void gelu_f32_neon(float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) vst1q_f32(y + i, gelu_neon4(vld1q_f32(y + i)));
  if (i < n) {
    float buf[4] = {};
    std::memcpy(buf, y + i, static_cast<size_t>(n - i) * sizeof(float));
    vst1q_f32(buf, gelu_neon4(vld1q_f32(buf)));
    std::memcpy(y + i, buf, static_cast<size_t>(n - i) * sizeof(float));
  }
}

inline void gelu_bf16_neon(uint16_t* y, int64_t n) {
  for (int64_t i = 0; i < n; i += 4) {
    const int64_t len = n - i < 4 ? n - i : 4;
    uint16_t in[4] = {};
    std::memcpy(in, y + i, static_cast<size_t>(len) * sizeof(uint16_t));
    const float32x4_t x = vreinterpretq_f32_u32(vshlq_n_u32(vmovl_u16(vld1_u16(in)), 16));
    float out[4];
    vst1q_f32(out, gelu_neon4(x));
    for (int64_t j = 0; j < len; ++j) y[i + j] = float_to_bf16(out[j]);
  }
}
#endif

// GELU in place over n float32 values (bf16: n bfloat16 values as their bits) on the widest SIMD path this
// process takes; false, with nothing written, where it has none (the caller then uses ATen's).
inline bool gelu_inplace(void* data, int64_t n, bool bf16) {
#if ADAPTWIN_X86
  if (has_avx512()) {
    bf16 ? gelu_bf16_avx512(static_cast<uint16_t*>(data), n) : gelu_f32_avx512(static_cast<float*>(data), n);
    return true;
  }
  if (has_avx2()) {
    bf16 ? gelu_bf16_avx2(static_cast<uint16_t*>(data), n) : gelu_f32_avx2(static_cast<float*>(data), n);
    return true;
  }
#endif
#if ADAPTWIN_NEON
  if (has_neon()) {
    bf16 ? gelu_bf16_neon(static_cast<uint16_t*>(data), n) : gelu_f32_neon(static_cast<float*>(data), n);
    return true;
  }
#endif
  (void)data, (void)n, (void)bf16;
  return false;
}

}  // namespace
}  // namespace adaptwin
