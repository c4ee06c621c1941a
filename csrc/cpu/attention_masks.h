// Masks of the CPU kernel of adaptwin::attention (included by attention_tiles.h): additive masks in log2
// units, boolean ones as 0 / -inf added (as SDPA adds them: a NaN score stays NaN), applied to the row paths'
// score rows and to the lanes paths' transposed tiles (AVX-512 16 x 16 blocks transposed in registers; the
// AVX2 8 x 8 ones are in attention_avx2.h).
#pragma once

#include <algorithm>
#include <limits>

#include "attention_problem.h"
#include "cpu_features.h"

namespace adaptwin {
namespace {

#if ADAPTWIN_X86
// An additive mask value in log2 units. Hugging Face masks with finfo(float32).min, which times log2e
// overflows to -inf: a row whose keys were all masked that way would then give zeros where SDPA (the
// reference) gives the mean of its values (every score equal after adding -3.4e38). Clamped at -FLT_MAX, a
// finite mask stays finite; -inf stays -inf, and a row of those still gives zeros, as SDPA's CPU kernels.
inline float mask_log2(float m) {
  return m == kNegInf ? m : std::max(m * kLog2e, -std::numeric_limits<float>::max());
}

// mask_tile's per-query masks over queries [q0, q1) and keys [k0, k1) of the tile, one entry at a time.
inline void mask_block(const Problem& p, int64_t b, int64_t h, int64_t i0, int64_t q0, int64_t q1, int64_t j0,
                       int64_t k0, int64_t k1, float* st, int64_t lanes) {
  for (int64_t jj = k0; jj < k1; ++jj) {
    const int64_t base = b * p.ms[0] + h * p.ms[1] + i0 * p.ms[2] + (j0 + jj) * p.ms[3];
    float* row = st + jj * lanes;
    for (int64_t i = q0; i < q1; ++i) {
      const int64_t at = base + i * p.ms[2];
      if (p.mask_f) row[i] += mask_log2(p.mask_f[at]);
      else if (!p.mask_b[at]) row[i] += kNegInf;
    }
  }
}

// Masks of a transposed score tile (nk keys × `lanes` query lanes, log2 units): an additive mask, in log2
// units (mask_log2), added; -inf added where a keep-mask is false (as SDPA, which makes a boolean mask
// additive: a NaN score stays NaN there, and its row NaN). Shared by the AVX-512 (32 lanes) and AVX2
// (16 lanes) query-vectorised paths.
inline void mask_tile(const Problem& p, int64_t b, int64_t h, int64_t i0, int64_t nq, int64_t j0, int64_t nk,
                      float* st, int64_t lanes) {
  if (!p.mask_f && !p.mask_b) return;
  if (p.ms[2] != 0) return mask_block(p, b, h, i0, 0, nq, j0, 0, nk, st, lanes);
  for (int64_t jj = 0; jj < nk; ++jj) {  // one value for every query (padding masks)
    const int64_t base = b * p.ms[0] + h * p.ms[1] + (j0 + jj) * p.ms[3];
    float* row = st + jj * lanes;
    if (p.mask_f) {
      const float add = mask_log2(p.mask_f[base]);
      for (int64_t i = 0; i < lanes; ++i) row[i] += add;
    } else if (!p.mask_b[base]) {
      for (int64_t i = 0; i < lanes; ++i) row[i] += kNegInf;
    }
  }
}

// The row paths' mask: scores s[0, nk) of query i against keys j0 + j, in log2 units, plus the mask as
// mask_tile adds it (mask_log2 of a float mask; -inf added where a keep-mask is false, as SDPA adds it).
inline void mask_row(const Problem& p, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t nk, float* s) {
  if (!p.mask_f && !p.mask_b) return;
  const int64_t base = b * p.ms[0] + h * p.ms[1] + i * p.ms[2] + j0 * p.ms[3];
  for (int64_t j = 0; j < nk; ++j) {
    if (p.mask_f)
      s[j] += mask_log2(p.mask_f[base + j * p.ms[3]]);
    else if (!p.mask_b[base + j * p.ms[3]])
      s[j] += kNegInf;  // NaN stays NaN
  }
}

// r[j] becomes column j of the 16 x 16 block whose rows were r[0..15] (unpack, 4-wide shuffle, two lane
// shuffles: 64 shuffles).
ADAPTWIN_AVX512 inline void transpose16(__m512* r) {
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]), t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  for (int g = 0; g < 16; g += 4) {  // u[g + c], 128-bit lane L: column 4L + c of rows g .. g + 3
    u[g] = _mm512_shuffle_ps(t[g], t[g + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[g + 1] = _mm512_shuffle_ps(t[g], t[g + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[g + 2] = _mm512_shuffle_ps(t[g + 1], t[g + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[g + 3] = _mm512_shuffle_ps(t[g + 1], t[g + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], _MM_SHUFFLE(2, 0, 2, 0));
    const __m512 w0 = _mm512_shuffle_f32x4(u[c], u[4 + c], _MM_SHUFFLE(3, 1, 3, 1));
    const __m512 v1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], _MM_SHUFFLE(2, 0, 2, 0));
    const __m512 w1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], _MM_SHUFFLE(3, 1, 3, 1));
    r[c] = _mm512_shuffle_f32x4(v0, v1, _MM_SHUFFLE(2, 0, 2, 0));
    r[8 + c] = _mm512_shuffle_f32x4(v0, v1, _MM_SHUFFLE(3, 1, 3, 1));
    r[4 + c] = _mm512_shuffle_f32x4(w0, w1, _MM_SHUFFLE(2, 0, 2, 0));
    r[12 + c] = _mm512_shuffle_f32x4(w0, w1, _MM_SHUFFLE(3, 1, 3, 1));
  }
}

// 16 consecutive keys' mask entries from `at` in log2 units, as mask_tile adds them: mask_log2 of a float
// mask, 0 or -inf for a keep-mask.
ADAPTWIN_AVX512 inline __m512 mask16_log2(const Problem& p, int64_t at) {
  const __m512 ninf = _mm512_set1_ps(kNegInf);
  if (p.mask_b) {
    const __m512i keep = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.mask_b + at)));
    return _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(keep, _mm512_setzero_si512()), ninf);
  }
  const __m512 m = _mm512_loadu_ps(p.mask_f + at);
  const __m512 v = _mm512_max_ps(_mm512_set1_ps(-std::numeric_limits<float>::max()),
                                 _mm512_mul_ps(m, _mm512_set1_ps(kLog2e)));  // (NaN stays NaN)
  return _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(m, ninf, _CMP_EQ_OQ), ninf);
}

// mask_tile for the AVX-512 lanes path (32 query lanes): a per-query mask along contiguous keys is read 16
// keys x 16 queries at a time, transposed in registers and added to the tile's rows; the same sums as
// mask_tile's entry-at-a-time loop, which read the mask down its columns. A causal + padding bool mask at
// T = S = 1500, 6 heads of width 40, two interleaved runs: float32 16.0 / 20.9 -> 14.3 / 14.6 ms (is_causal
// alone: 6.6-7.2), bfloat16 12.2 / 18.8 -> 8.5 / 10.0; additive, T = 512, width 64: 12.9 / 13.7 -> 11.1 / 10.6.
ADAPTWIN_AVX512 inline void mask_tile_512(const Problem& p, int64_t b, int64_t h, int64_t i0, int64_t nq, int64_t j0,
                                          int64_t nk, float* st) {
  if ((!p.mask_f && !p.mask_b) || p.ms[2] == 0 || p.ms[3] != 1) return mask_tile(p, b, h, i0, nq, j0, nk, st, 32);
  const int64_t base = b * p.ms[0] + h * p.ms[1] + i0 * p.ms[2] + j0;
  const int64_t qb = nq / 16 * 16, kb = nk / 16 * 16;
  for (int64_t q0 = 0; q0 < qb; q0 += 16)
    for (int64_t k0 = 0; k0 < kb; k0 += 16) {
      __m512 r[16];
      for (int i = 0; i < 16; ++i) r[i] = mask16_log2(p, base + (q0 + i) * p.ms[2] + k0);
      transpose16(r);
      for (int j = 0; j < 16; ++j) {
        float* row = st + (k0 + j) * 32 + q0;
        _mm512_storeu_ps(row, _mm512_add_ps(_mm512_loadu_ps(row), r[j]));
      }
    }
  mask_block(p, b, h, i0, 0, qb, j0, kb, nk, st, 32);   // keys past the whole 16s
  mask_block(p, b, h, i0, qb, nq, j0, 0, nk, st, 32);   // queries past them
}
#endif  // ADAPTWIN_X86

}  // namespace
}  // namespace adaptwin
