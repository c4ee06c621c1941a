// Tile primitives of the CPU kernel of adaptwin::attention (included by attention.cpp only): the Problem
// view of one call, the score tile q·kᵀ, the online-softmax update of a tile and the p·v accumulation, in
// AVX-512 (CPUs without it run ATen's SDPA instead: attention.cpp).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_features.h"

namespace adaptwin {
namespace {

constexpr int64_t kBQ = 32;  // queries per task
constexpr int64_t kBK = 64;  // keys per tile: 4 AVX-512 vectors of scores per query row
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Problem {
  int64_t B, H, Hkv, T, S, Dq, Dv;
  const float* q;  // (B, H, T, Dq) with strides qs
  int64_t qs[3];
  const float* kt;  // (B, Hkv, Dq, S) contiguous (row-wise path)
  const float* k;   // (B, Hkv, S, Dq) with strides ks (query-vectorised path)
  int64_t ks[3];
  const float* v;   // (B, Hkv, S, Dv) with strides vs
  int64_t vs[3];
  const float* mask_f = nullptr;  // additive (B, H, T, S) strides ms (0 where broadcast)
  const bool* mask_b = nullptr;   // or boolean keep-mask with strides ms
  int64_t ms[4] = {0, 0, 0, 0};
  bool causal;
  float scale;
  float* out;  // (B, T, H, Dv) contiguous
  // bfloat16 path (attention_bf16.h) only, raw bf16 bits:
  const uint16_t* q16 = nullptr;  // (B, H, T, Dq) with strides qs
  const uint16_t* k16 = nullptr;  // row path (attention_rows.h): keys / values in place, strides ks / vs
  const uint16_t* v16 = nullptr;
  const uint16_t* kp = nullptr;   // (B, Hkv, S, Dq2 * 2): keys, width zero-padded to even
  const uint16_t* vp = nullptr;   // (B, Hkv, S2, Dv, 2): value rows j, j + 1 interleaved, S zero-padded
  int64_t dq2 = 0, s2 = 0;        // Dq and S rounded up to pairs
};

// 1 / l for a row's softmax sum l: 0 where every key was masked (l = 0: the row gives zeros, as SDPA's CPU
// kernels), NaN where a NaN or +inf score made l NaN (the row is NaN, as SDPA).
inline float inverse_sum(float l) { return l > 0.0f ? 1.0f / l : (l == 0.0f ? 0.0f : l); }

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

// An additive mask value in log2 units. Hugging Face masks with finfo(float32).min, which times log2e
// overflows to -inf: a row whose keys were all masked that way would then give zeros where SDPA (the
// reference) gives the mean of its values (every score equal after adding -3.4e38). Clamped at -FLT_MAX, a
// finite mask stays finite; -inf stays -inf, and a row of those still gives zeros, as SDPA's CPU kernels.
inline float mask_log2(float m) {
  return m == kNegInf ? m : std::max(m * kLog2e, -std::numeric_limits<float>::max());
}

// Masks of a transposed score tile (nk keys × `lanes` query lanes, log2 units): an additive mask, in log2
// units (mask_log2), added; -inf added where a keep-mask is false (as SDPA, which makes a boolean mask
// additive: a NaN score stays NaN there, and its row NaN). Shared by the AVX-512 (32 lanes) and AVX2
// (16 lanes) query-vectorised paths.
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

// The row paths' output: out[b, i, h, :] = o / l (inverse_sum's rule for l = 0 or NaN).
inline void store_row(const Problem& p, int64_t b, int64_t h, int64_t i, const float* o, float l) {
  const float inv = inverse_sum(l);
  float* dst = p.out + ((b * p.T + i) * p.H + h) * p.Dv;
  for (int64_t d = 0; d < p.Dv; ++d) dst[d] = o[d] * inv;
}

#if ADAPTWIN_X86
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
#endif

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
