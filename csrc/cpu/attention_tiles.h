// Tile primitives of the CPU kernel of adaptwin::attention (included by attention.cpp only): the score tile
// q·kᵀ, the online-softmax update of a tile and the p·v accumulation, in AVX-512 (CPUs without it run the
// AVX2 kernels or ATen's SDPA: attention.cpp). The Problem view is in attention_problem.h, masks in
// attention_masks.h.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attention_masks.h"
#include "attention_problem.h"
#include "cpu_features.h"

namespace adaptwin {
namespace {

#if ADAPTWIN_X86
// Four query rows at a time: 16 accumulators, each key vector loaded once for four FMAs.
ADAPTWIN_AVX512 void scores_avx512(const Problem& p, const float* qb, const float* kt, int64_t j0, int64_t nq,
                                   int64_t nk, float* s) {
  __mmask16 m[4];
  for (int c = 0; c < 4; ++c) m[c] = tail_mask(std::max<int64_t>(0, nk - 16 * c));
  const __m512 ninf = _mm512_set1_ps(kNegInf);
  int64_t i = 0;
  for (; i + 4 <= nq; i += 4) {
    __m512 acc[4][4];
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int64_t d = 0; d < p.Dq; ++d) {
      const float* k = kt + d * p.S + j0;
      __m512 kv[4];
      for (int c = 0; c < 4; ++c) kv[c] = _mm512_maskz_loadu_ps(m[c], k + 16 * c);
      for (int r = 0; r < 4; ++r) {
        const __m512 qd = _mm512_set1_ps(qb[(i + r) * p.Dq + d]);
        for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_fmadd_ps(qd, kv[c], acc[r][c]);
      }
    }
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < 4; ++c) _mm512_storeu_ps(s + (i + r) * kBK + 16 * c, _mm512_mask_mov_ps(ninf, m[c], acc[r][c]));
  }
  for (; i < nq; ++i) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t d = 0; d < p.Dq; ++d) {
      const float* k = kt + d * p.S + j0;
      const __m512 qd = _mm512_set1_ps(qb[i * p.Dq + d]);
      for (int c = 0; c < 4; ++c) acc[c] = _mm512_fmadd_ps(qd, _mm512_maskz_loadu_ps(m[c], k + 16 * c), acc[c]);
    }
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(s + i * kBK + 16 * c, _mm512_mask_mov_ps(ninf, m[c], acc[c]));
  }
}
#endif

#if ADAPTWIN_X86
// row[j] = exp(row[j] - m) for the kBK scores of one query; returns their sum.
ADAPTWIN_AVX512 float exp_row_avx512(float* row, float m) {
  const __m512 mv = _mm512_set1_ps(m);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < kBK; j += 16) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(row + j), mv));
    _mm512_storeu_ps(row + j, e);
    acc = _mm512_add_ps(acc, e);
  }
  return _mm512_reduce_add_ps(acc);
}

// Online-softmax update of rows [0, nq) with the tile s: p = exp(s - m_new) in place, rescale o.
ADAPTWIN_AVX512 void softmax_update(const Problem& p, float* s, int64_t nq, float* mx, float* l, float* o, int64_t dvp) {
  for (int64_t i = 0; i < nq; ++i) {
    float* row = s + i * kBK;
    float tile_max = kNegInf;
    for (int64_t j = 0; j < kBK; ++j) tile_max = std::max(tile_max, row[j]);
    const float m_new = std::max(mx[i], tile_max);
    if (m_new == kNegInf) {  // every key so far is masked (std::max passes NaN scores over): nothing yet
      bool nan = false;
      for (int64_t j = 0; j < kBK; ++j) nan |= std::isnan(row[j]), row[j] = 0.0f;
      if (nan) l[i] = std::numeric_limits<float>::quiet_NaN();  // a NaN score makes the row NaN, as in SDPA
      continue;
    }
    const float alpha = std::exp(mx[i] - m_new);  // exp(-inf) = 0 on the first visible tile
    const float sum = exp_row_avx512(row, m_new);
    l[i] = l[i] * alpha + sum;
    mx[i] = m_new;
    if (alpha != 1.0f)
      for (int64_t d = 0; d < dvp; ++d) o[i * dvp + d] *= alpha;
  }
}

// o[i] += Σ_j s[i][j] · v[j] for rows [0, nq), keys [0, nk).
ADAPTWIN_AVX512 void pv_avx512(const Problem& p, const float* s, const float* v, int64_t vstride, int64_t nq,
                               int64_t nk, float* o, int64_t dvp) {
  for (int64_t c = 0; c < p.Dv; c += 16) {
    const __mmask16 m = tail_mask(p.Dv - c);
    int64_t i = 0;
    for (; i + 4 <= nq; i += 4) {
      __m512 acc[4];
      for (int r = 0; r < 4; ++r) acc[r] = _mm512_loadu_ps(o + (i + r) * dvp + c);
      for (int64_t j = 0; j < nk; ++j) {
        const __m512 vj = _mm512_maskz_loadu_ps(m, v + j * vstride + c);
        for (int r = 0; r < 4; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(s[(i + r) * kBK + j]), vj, acc[r]);
      }
      for (int r = 0; r < 4; ++r) _mm512_storeu_ps(o + (i + r) * dvp + c, acc[r]);
    }
    for (; i < nq; ++i) {
      __m512 acc = _mm512_loadu_ps(o + i * dvp + c);
      for (int64_t j = 0; j < nk; ++j)
        acc = _mm512_fmadd_ps(_mm512_set1_ps(s[i * kBK + j]), _mm512_maskz_loadu_ps(m, v + j * vstride + c), acc);
      _mm512_storeu_ps(o + i * dvp + c, acc);
    }
  }
}
#endif

#if ADAPTWIN_X86
// Query-vectorised path (AVX-512, T >= kMinLanes): a task's 32 queries are the 32 lanes of two vectors,
// so tiles are kept transposed (keys × queries). Every width works without wasted lanes: a score row is
// Σ_d k[j][d]·Qᵀ[d] (a broadcast key element times two query vectors), the softmax max/sum run down
// the key rows (vertical, no horizontal reductions), and P·V is Σ_j v[j][d]·Pᵀ[j] into Oᵀ (Dv × 32).
// On D = 20 the row-wise path's value accumulators were 20/32 full; this path has no such loss.
constexpr int64_t kMinLanes = 8;

template <int DN>
ADAPTWIN_AVX512 inline void pv_lanes(const float* st, const float* v, int64_t vstride, int64_t nk, float* ot) {
  __m512 acc[DN][2];
  // each tile sums into fresh accumulators that are then added to Oᵀ (blocked summation, as a GEMM per
  // tile would): one 1500-long FMA chain per output gave 7.4e-7 relative error where SDPA has 3.5e-7
  for (int d = 0; d < DN; ++d) acc[d][0] = acc[d][1] = _mm512_setzero_ps();
  for (int64_t j = 0; j < nk; ++j) {
    const __m512 p0 = _mm512_loadu_ps(st + j * 32), p1 = _mm512_loadu_ps(st + j * 32 + 16);
    const float* vj = v + j * vstride;
    for (int d = 0; d < DN; ++d) {
      const __m512 vd = _mm512_set1_ps(vj[d]);
      acc[d][0] = _mm512_fmadd_ps(vd, p0, acc[d][0]);
      acc[d][1] = _mm512_fmadd_ps(vd, p1, acc[d][1]);
    }
  }
  for (int d = 0; d < DN; ++d) {
    _mm512_storeu_ps(ot + d * 32, _mm512_add_ps(_mm512_loadu_ps(ot + d * 32), acc[d][0]));
    _mm512_storeu_ps(ot + d * 32 + 16, _mm512_add_ps(_mm512_loadu_ps(ot + d * 32 + 16), acc[d][1]));
  }
}

ADAPTWIN_AVX512 void pv_lanes_any(int dn, const float* st, const float* v, int64_t vstride, int64_t nk, float* ot) {
  switch (dn) {
    case 1: return pv_lanes<1>(st, v, vstride, nk, ot);
    case 2: return pv_lanes<2>(st, v, vstride, nk, ot);
    case 3: return pv_lanes<3>(st, v, vstride, nk, ot);
    case 4: return pv_lanes<4>(st, v, vstride, nk, ot);
    case 5: return pv_lanes<5>(st, v, vstride, nk, ot);
    case 6: return pv_lanes<6>(st, v, vstride, nk, ot);
    case 7: return pv_lanes<7>(st, v, vstride, nk, ot);
    default: return pv_lanes<8>(st, v, vstride, nk, ot);
  }
}

constexpr int kKeys = 8;  // keys per score micro-tile of the float32 lanes path: 16 accumulators

// Sᵀ[r][:] = Σ_d k[r][d]·Qᵀ[d][:] for R keys (rows kstride apart) and the 32 query lanes; tmax[2] takes the
// lanes' maximum over them.
template <int R>
ADAPTWIN_AVX512 inline void scores_lanes(const float* qt, const float* k, int64_t kstride, int64_t dq, float* st,
                                         __m512* tmax) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t d = 0; d < dq; ++d) {
    const __m512 q0 = _mm512_loadu_ps(qt + d * 32), q1 = _mm512_loadu_ps(qt + d * 32 + 16);
    for (int r = 0; r < R; ++r) {
      const __m512 kd = _mm512_set1_ps(k[r * kstride + d]);
      acc[r][0] = _mm512_fmadd_ps(kd, q0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(kd, q1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(st + r * 32, acc[r][0]);
    _mm512_storeu_ps(st + r * 32 + 16, acc[r][1]);
    tmax[0] = _mm512_max_ps(tmax[0], acc[r][0]);
    tmax[1] = _mm512_max_ps(tmax[1], acc[r][1]);
  }
}

// Masks, causal cut and the online-softmax update of one transposed score tile st (nk keys × 32 query
// lanes, float32, in log2 units: the callers scale scores by scale·log2e): st becomes 2^(s - m_new) =
// exp of the natural-unit difference, the running max mx / sum l advance, and Oᵀ (Dv × 32) is rescaled where
// a lane's maximum rose. scores_max (2 vectors, or nullptr): the tile's maximum as the scores were computed,
// used where no mask or causal cut changed them since. Shared by the float32 and bfloat16 paths.
ADAPTWIN_AVX512 inline void lanes_softmax(const Problem& p, int64_t b, int64_t h, int64_t i0, int64_t nq, int64_t j0,
                                          int64_t nk, float* st, const __m512* scores_max, __m512* mx, __m512* l,
                                          float* ot) {
  if (p.mask_f || p.mask_b || p.causal) scores_max = nullptr;
  const __m512 ninf = _mm512_set1_ps(kNegInf);
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  mask_tile_512(p, b, h, i0, nq, j0, nk, st);
  if (p.causal) {  // key j0 + jj is hidden from query i0 + lane when j0 + jj > i0 + lane
    for (int64_t jj = 0; jj < nk; ++jj) {
      const int64_t first = j0 + jj - i0;  // lowest lane that may see this key
      if (first <= 0) continue;
      const __m512i f = _mm512_set1_epi32(static_cast<int>(first));
      float* row = st + jj * 32;
      _mm512_storeu_ps(row, _mm512_mask_mov_ps(_mm512_loadu_ps(row), _mm512_cmplt_epi32_mask(lane, f), ninf));
      const __mmask16 hi = _mm512_cmplt_epi32_mask(_mm512_add_epi32(lane, _mm512_set1_epi32(16)), f);
      _mm512_storeu_ps(row + 16, _mm512_mask_mov_ps(_mm512_loadu_ps(row + 16), hi, ninf));
    }
  }
  // online softmax down the key rows (per lane)
  for (int c = 0; c < 2; ++c) {
    __m512 tmax = ninf;
    if (scores_max)
      tmax = scores_max[c];
    else
      for (int64_t jj = 0; jj < nk; ++jj) tmax = _mm512_max_ps(tmax, _mm512_loadu_ps(st + jj * 32 + 16 * c));
    const __m512 m_new = _mm512_max_ps(mx[c], tmax);
    // lanes that have seen only masked keys keep m = -inf; subtract 0 there so exp gives 0, not NaN
    const __m512 m_use = _mm512_mask_mov_ps(m_new, _mm512_cmp_ps_mask(m_new, ninf, _CMP_EQ_OQ), _mm512_setzero_ps());
    const __m512 alpha = exp2_512_nonpos(_mm512_sub_ps(mx[c], m_use));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t jj = 0; jj < nk; ++jj) {
      float* at = st + jj * 32 + 16 * c;
      const __m512 e = exp2_512_nonpos(_mm512_sub_ps(_mm512_loadu_ps(at), m_use));
      _mm512_storeu_ps(at, e);
      sum = _mm512_add_ps(sum, e);
    }
    l[c] = _mm512_fmadd_ps(l[c], alpha, sum);
    // alpha is exactly 1 where the maximum stayed (2^0; a lane still at -inf has O = 0): no rescale
    const bool same = _mm512_cmp_ps_mask(m_new, mx[c], _CMP_EQ_OQ) == 0xffff;
    mx[c] = m_new;
    if (same) continue;
    for (int64_t d = 0; d < p.Dv; ++d)
      _mm512_storeu_ps(ot + d * 32 + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(ot + d * 32 + 16 * c), alpha));
  }
}

// out[b, i0 + i, h, :] = Oᵀ[:, i] / l[i] for the task's nq queries (0 where every key was masked).
ADAPTWIN_AVX512 inline void lanes_store(const Problem& p, int64_t b, int64_t h, int64_t i0, int64_t nq, const __m512* l,
                                        const float* ot) {
  alignas(64) float inv[32];
  for (int c = 0; c < 2; ++c) {
    const __m512 lc = l[c];
    const __mmask16 pos = _mm512_cmp_ps_mask(lc, _mm512_setzero_ps(), _CMP_GT_OQ);
    _mm512_store_ps(inv + 16 * c, _mm512_maskz_div_ps(pos, _mm512_set1_ps(1.0f), lc));  // fully masked: 0
  }
  for (int64_t i = 0; i < nq; ++i) {
    float* dst = p.out + ((b * p.T + i0 + i) * p.H + h) * p.Dv;
    for (int64_t d = 0; d < p.Dv; ++d) dst[d] = ot[d * 32 + i] * inv[i];
  }
}
#endif  // ADAPTWIN_X86

}  // namespace
}  // namespace adaptwin
