// Query-vectorised attention for x86 CPUs with AVX2 + FMA but no AVX-512 (included by attention.cpp only):
// the AVX-512 lanes path of attention_tiles.h / attention.cpp with 8-float vectors. A task's 16 queries
// are the lanes of two vectors; tiles are kept transposed (keys × 16 queries); scores are in log2 units
// (queries pre-multiplied by scale·log2e, additive masks by log2e) and the softmax takes 2^x. float32
// arithmetic (bf16 / fp16 inputs are widened first). Calls with fewer than kMinLanes queries (decoding)
// run the row path of attention_rows_avx2.h (attention.cpp).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <limits>

#include "attention_tiles.h"
#include "cpu_features.h"

namespace adaptwin {
namespace {

#if ADAPTWIN_X86
constexpr int64_t kLanes2 = 16;  // queries per task

// Oᵀ[d][:] += Σ_j v[j][d]·Pᵀ[j][:] for DN value columns (fresh accumulators per tile, then added: blocked
// summation, as the AVX-512 path does).
template <int DN>
ADAPTWIN_AVX2 inline void pv_lanes_avx2(const float* st, const float* v, int64_t vstride, int64_t nk, float* ot) {
  __m256 acc[DN][2];
  for (int d = 0; d < DN; ++d) acc[d][0] = acc[d][1] = _mm256_setzero_ps();
  for (int64_t j = 0; j < nk; ++j) {
    const __m256 p0 = _mm256_loadu_ps(st + j * kLanes2), p1 = _mm256_loadu_ps(st + j * kLanes2 + 8);
    const float* vj = v + j * vstride;
    for (int d = 0; d < DN; ++d) {
      const __m256 vd = _mm256_set1_ps(vj[d]);
      acc[d][0] = _mm256_fmadd_ps(vd, p0, acc[d][0]);
      acc[d][1] = _mm256_fmadd_ps(vd, p1, acc[d][1]);
    }
  }
  for (int d = 0; d < DN; ++d) {
    float* o = ot + d * kLanes2;
    _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), acc[d][0]));
    _mm256_storeu_ps(o + 8, _mm256_add_ps(_mm256_loadu_ps(o + 8), acc[d][1]));
  }
}

ADAPTWIN_AVX2 void pv_lanes_avx2_any(int dn, const float* st, const float* v, int64_t vstride, int64_t nk, float* ot) {
  switch (dn) {
    case 1: return pv_lanes_avx2<1>(st, v, vstride, nk, ot);
    case 2: return pv_lanes_avx2<2>(st, v, vstride, nk, ot);
    case 3: return pv_lanes_avx2<3>(st, v, vstride, nk, ot);
    case 4: return pv_lanes_avx2<4>(st, v, vstride, nk, ot);
    case 5: return pv_lanes_avx2<5>(st, v, vstride, nk, ot);
    default: return pv_lanes_avx2<6>(st, v, vstride, nk, ot);
  }
}

constexpr int kKeys2 = 6;  // keys per score micro-tile: 12 accumulators

// Sᵀ[r][:] = Σ_d k[r][d]·Qᵀ[d][:] for R keys (rows kstride apart) and the 16 query lanes; tmax[2] takes the
// lanes' maximum over them (the tile's maximum, read again only where masks change the scores).
template <int R>
ADAPTWIN_AVX2 inline void scores_avx2(const float* qt, const float* k, int64_t kstride, int64_t dq, float* st,
                                      __m256* tmax) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t d = 0; d < dq; ++d) {
    const __m256 q0 = _mm256_loadu_ps(qt + d * kLanes2), q1 = _mm256_loadu_ps(qt + d * kLanes2 + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 kd = _mm256_set1_ps(k[r * kstride + d]);
      acc[r][0] = _mm256_fmadd_ps(kd, q0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(kd, q1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(st + r * kLanes2, acc[r][0]);
    _mm256_storeu_ps(st + r * kLanes2 + 8, acc[r][1]);
    tmax[0] = _mm256_max_ps(tmax[0], acc[r][0]);
    tmax[1] = _mm256_max_ps(tmax[1], acc[r][1]);
  }
}

// r[j] becomes column j of the 8 x 8 block whose rows were r[0..7].
ADAPTWIN_AVX2 inline void transpose8(__m256* r) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]), t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  for (int g = 0; g < 8; g += 4) {  // u[g + c], 128-bit lane L: column 4L + c of rows g .. g + 3
    u[g] = _mm256_shuffle_ps(t[g], t[g + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[g + 1] = _mm256_shuffle_ps(t[g], t[g + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[g + 2] = _mm256_shuffle_ps(t[g + 1], t[g + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[g + 3] = _mm256_shuffle_ps(t[g + 1], t[g + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
    r[4 + c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
  }
}

// 8 consecutive keys' mask entries from `at` in log2 units, as mask_tile adds them.
ADAPTWIN_AVX2 inline __m256 mask8_log2(const Problem& p, int64_t at) {
  const __m256 ninf = _mm256_set1_ps(kNegInf);
  if (p.mask_b) {
    const __m256i keep = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p.mask_b + at)));
    return _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(keep, _mm256_setzero_si256())), ninf);
  }
  const __m256 m = _mm256_loadu_ps(p.mask_f + at);
  const __m256 v = _mm256_max_ps(_mm256_set1_ps(-std::numeric_limits<float>::max()),
                                 _mm256_mul_ps(m, _mm256_set1_ps(kLog2e)));  // (NaN stays NaN)
  return _mm256_blendv_ps(v, ninf, _mm256_cmp_ps(m, ninf, _CMP_EQ_OQ));
}

// mask_tile for the 16 query lanes: a per-query mask along contiguous keys read 8 keys x 8 queries at a time
// and transposed in registers, as mask_tile_512 does with AVX-512. Under the AVX2 caps, a causal + padding
// mask, 6 heads, two interleaved runs: T = S = 1500, width 40, bool 24.1 / 22.5 -> 19.3 / 18.5 ms, additive
// 26.3 / 25.0 -> 19.4 / 18.1; T = 512, width 64, additive 17.6 / 15.6 -> 13.9 / 12.1 (SDPA 13.0-17.0).
ADAPTWIN_AVX2 inline void mask_tile_avx2(const Problem& p, int64_t b, int64_t h, int64_t i0, int64_t nq, int64_t j0,
                                         int64_t nk, float* st) {
  if ((!p.mask_f && !p.mask_b) || p.ms[2] == 0 || p.ms[3] != 1) return mask_tile(p, b, h, i0, nq, j0, nk, st, kLanes2);
  const int64_t base = b * p.ms[0] + h * p.ms[1] + i0 * p.ms[2] + j0;
  const int64_t qb = nq / 8 * 8, kb = nk / 8 * 8;
  for (int64_t q0 = 0; q0 < qb; q0 += 8)
    for (int64_t k0 = 0; k0 < kb; k0 += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = mask8_log2(p, base + (q0 + i) * p.ms[2] + k0);
      transpose8(r);
      for (int j = 0; j < 8; ++j) {
        float* row = st + (k0 + j) * kLanes2 + q0;
        _mm256_storeu_ps(row, _mm256_add_ps(_mm256_loadu_ps(row), r[j]));
      }
    }
  mask_block(p, b, h, i0, 0, qb, j0, kb, nk, st, kLanes2);  // keys past the whole 8s
  mask_block(p, b, h, i0, qb, nq, j0, 0, nk, st, kLanes2);  // queries past them
}

// Masks, causal cut and the online-softmax update of one transposed score tile (nk keys × 16 lanes, log2
// units): st becomes 2^(s - m_new), the running max mx / sum l advance, Oᵀ (Dv × 16) is rescaled where a
// lane's maximum rose. scores_max: the tile's maximum as scores_avx2 took it (lanes_softmax's rule).
ADAPTWIN_AVX2 inline void lanes_softmax_avx2(const Problem& p, int64_t b, int64_t h, int64_t i0, int64_t nq,
                                             int64_t j0, int64_t nk, float* st, const __m256* scores_max, __m256* mx,
                                             __m256* l, float* ot) {
  if (p.mask_f || p.mask_b || p.causal) scores_max = nullptr;  // scores changed since scores_max was taken
  const __m256 ninf = _mm256_set1_ps(kNegInf);
  mask_tile_avx2(p, b, h, i0, nq, j0, nk, st);
  if (p.causal) {  // key j0 + jj is hidden from query i0 + lane when j0 + jj > i0 + lane
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int64_t jj = 0; jj < nk; ++jj) {
      const int64_t first = j0 + jj - i0;  // lowest lane that may see this key
      if (first <= 0) continue;
      const __m256i f = _mm256_set1_epi32(static_cast<int>(std::min<int64_t>(first, kLanes2)));
      float* row = st + jj * kLanes2;
      const __m256 hide0 = _mm256_castsi256_ps(_mm256_cmpgt_epi32(f, lane));
      const __m256 hide1 = _mm256_castsi256_ps(_mm256_cmpgt_epi32(f, _mm256_add_epi32(lane, _mm256_set1_epi32(8))));
      _mm256_storeu_ps(row, _mm256_blendv_ps(_mm256_loadu_ps(row), ninf, hide0));
      _mm256_storeu_ps(row + 8, _mm256_blendv_ps(_mm256_loadu_ps(row + 8), ninf, hide1));
    }
  }
  for (int c = 0; c < 2; ++c) {
    __m256 tmax = ninf;
    if (scores_max)
      tmax = scores_max[c];
    else
      for (int64_t jj = 0; jj < nk; ++jj) tmax = _mm256_max_ps(tmax, _mm256_loadu_ps(st + jj * kLanes2 + 8 * c));
    const __m256 m_new = _mm256_max_ps(mx[c], tmax);
    // lanes that have seen only masked keys keep m = -inf; subtract 0 there so 2^x gives 0, not NaN
    const __m256 m_use = _mm256_blendv_ps(m_new, _mm256_setzero_ps(), _mm256_cmp_ps(m_new, ninf, _CMP_EQ_OQ));
    const __m256 alpha = exp2_256_nonpos(_mm256_sub_ps(mx[c], m_use));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t jj = 0; jj < nk; ++jj) {
      float* at = st + jj * kLanes2 + 8 * c;
      const __m256 e = exp2_256_nonpos(_mm256_sub_ps(_mm256_loadu_ps(at), m_use));
      _mm256_storeu_ps(at, e);
      sum = _mm256_add_ps(sum, e);
    }
    l[c] = _mm256_fmadd_ps(l[c], alpha, sum);
    // O is rescaled only where a lane's maximum rose (after the first tiles, rarely)
    const bool same = _mm256_movemask_ps(_mm256_cmp_ps(m_new, mx[c], _CMP_EQ_OQ)) == 0xff;
    mx[c] = m_new;
    if (same) continue;
    for (int64_t d = 0; d < p.Dv; ++d) {
      float* o = ot + d * kLanes2 + 8 * c;
      _mm256_storeu_ps(o, _mm256_mul_ps(_mm256_loadu_ps(o), alpha));
    }
  }
}

// One task: queries [i0, i0 + 16) of head h in batch b, written to p.out (0 where every key was masked).
ADAPTWIN_AVX2 void run_block_lanes_avx2(const Problem& p, int64_t b, int64_t h, int64_t i0, float* ws) {
  const int64_t nq = std::min<int64_t>(kLanes2, p.T - i0);
  const int64_t hk = h / (p.H / p.Hkv);
  float* qt = ws;                    // (Dq, 16)
  float* st = qt + p.Dq * kLanes2;   // (kBK, 16)
  float* ot = st + kBK * kLanes2;    // (Dv, 16)
  std::fill(qt, qt + p.Dq * kLanes2, 0.0f);
  const float qscale = p.scale * kLog2e;
  for (int64_t i = 0; i < nq; ++i) {
    const float* qi = p.q + b * p.qs[0] + h * p.qs[1] + (i0 + i) * p.qs[2];
    for (int64_t d = 0; d < p.Dq; ++d) qt[d * kLanes2 + i] = qi[d] * qscale;
  }
  std::fill(ot, ot + p.Dv * kLanes2, 0.0f);
  const __m256 ninf = _mm256_set1_ps(kNegInf);
  __m256 mx[2] = {ninf, ninf}, l[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  const float* kb = p.k + b * p.ks[0] + hk * p.ks[1];
  const float* vb = p.v + b * p.vs[0] + hk * p.vs[1];
  const int64_t s_end = p.causal ? std::min(p.S, i0 + nq) : p.S;
  for (int64_t j0 = 0; j0 < s_end; j0 += kBK) {
    const int64_t nk = std::min(kBK, s_end - j0);
    // scores, kKeys2 keys at a time: Qᵀ[d] loaded once for kKeys2 broadcast-FMAs per vector
    __m256 tmax[2] = {ninf, ninf};
    const float* kt = kb + j0 * p.ks[2];
    int64_t j = 0;
    for (; j + kKeys2 <= nk; j += kKeys2) scores_avx2<kKeys2>(qt, kt + j * p.ks[2], p.ks[2], p.Dq, st + j * kLanes2, tmax);
    for (; j + 4 <= nk; j += 4) scores_avx2<4>(qt, kt + j * p.ks[2], p.ks[2], p.Dq, st + j * kLanes2, tmax);
    for (; j < nk; ++j) scores_avx2<1>(qt, kt + j * p.ks[2], p.ks[2], p.Dq, st + j * kLanes2, tmax);
    lanes_softmax_avx2(p, b, h, i0, nq, j0, nk, st, tmax, mx, l, ot);
    const float* v0 = vb + j0 * p.vs[2];
    // value columns in chunks of at most 6 (12 accumulators), as even as they come: a short last chunk
    // (2 of Dv = 32) leaves too few accumulators to cover the FMA latency
    const int64_t chunks = (p.Dv + 5) / 6;
    for (int64_t c = 0, d = 0; c < chunks; ++c) {
      const int64_t dn = (p.Dv - d) / (chunks - c);
      pv_lanes_avx2_any(static_cast<int>(dn), st, v0 + d, p.vs[2], nk, ot + d * kLanes2);
      d += dn;
    }
  }
  alignas(32) float inv[kLanes2];
  for (int c = 0; c < 2; ++c) {
    const __m256 positive = _mm256_cmp_ps(l[c], _mm256_setzero_ps(), _CMP_GT_OQ);
    _mm256_store_ps(inv + 8 * c, _mm256_and_ps(positive, _mm256_div_ps(_mm256_set1_ps(1.0f), l[c])));
  }
  for (int64_t i = 0; i < nq; ++i) {
    float* dst = p.out + ((b * p.T + i0 + i) * p.H + h) * p.Dv;
    for (int64_t d = 0; d < p.Dv; ++d) dst[d] = ot[d * kLanes2 + i] * inv[i];
  }
}
#endif

}  // namespace
}  // namespace adaptwin
