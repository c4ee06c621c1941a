// bfloat16 <-> float32 in plain C++ and AVX-512 (included by gelu.h and fp_gemv.h; free of torch): widening is
// exact (a bfloat16 is the upper half of a float32); narrowing rounds to nearest even, as torch rounds, with
// NaN kept quiet and its sign and upper payload bits kept.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu_features.h"

namespace adaptwin {
namespace {

inline float bf16_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if (std::isnan(f)) return static_cast<uint16_t>((u >> 16) | 0x40);
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

#if ADAPTWIN_X86
// 16 float32 -> bfloat16 bits, rounded to nearest even, NaN kept quiet.
ADAPTWIN_AVX512 inline __m256i bf16_round512(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}

ADAPTWIN_AVX512 inline __m512 widen_bf16_512(__m256i b) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

// 8 bfloat16 values (as bits) -> float32.
ADAPTWIN_AVX2 inline __m256 widen_bf16_256(__m128i b) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
}

// n bfloat16 values (as bits) -> float32.
ADAPTWIN_AVX512 inline void widen_bf16_avx512(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, widen_bf16_512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
  for (; i < n; ++i) dst[i] = bf16_to_float(src[i]);
}

// n float32 -> bfloat16 bits.
ADAPTWIN_AVX512 inline void narrow_bf16_avx512(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), bf16_round512(_mm512_loadu_ps(src + i)));
  for (; i < n; ++i) dst[i] = float_to_bf16(src[i]);
}
#endif

// The two on this CPU: AVX-512 where it has it (and ADAPTWIN_CPU_CAP allows), else plain loops.
inline void widen_bf16(const uint16_t* src, float* dst, int64_t n) {
#if ADAPTWIN_X86
  if (has_avx512()) return widen_bf16_avx512(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
}

inline void narrow_bf16(const float* src, uint16_t* dst, int64_t n) {
#if ADAPTWIN_X86
  if (has_avx512()) return narrow_bf16_avx512(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]);
}

}  // namespace
}  // namespace adaptwin
