// Row path of the CPU attention kernel for x86 CPUs with AVX2 + FMA but no AVX-512 (included by attention.cpp
// only): decoding, T < kMinLanes, as attention_rows.h does it with AVX-512, in 8-float vectors. One task =
// one query row; keys and values read in place, float32 or bfloat16 (widened in registers; bfloat16 in place
// needs even widths, so that a row's tail is whole 32-bit words: attention.cpp widens the others first).
// Before it, these calls ran ATen's SDPA, which on such CPUs took 62 against 40 us in float32 and 370 against
// 44 us in bfloat16 (one query against 1500 keys of width 40, 6 heads, 2 threads; README "CPUs without
// AVX-512").
//
// Scores of 8 keys at a time: each key's dot product with the query as a vector of partial sums, the 8
// vectors summed across their lanes at once (hsum8: two rounds of hadd and a 128-bit swap), in log2 units
// for exp2; online softmax over tiles of kRowBK keys; p·v into the output row, 8 columns at a time.
#pragma once

#include "attention_avx2.h"
#include "attention_tiles.h"
#include "cpu_features.h"

namespace adaptwin {
namespace {

#if ADAPTWIN_X86
constexpr int64_t kRowBK2 = 256;  // keys per softmax tile: 1 KiB of scores, in L1

// Lanes [0, n) set (n <= 8): the tail mask of a masked load of floats or 32-bit words.
ADAPTWIN_AVX2 inline __m256i tail8(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// 8 elements from src as float32 (the full 8, or the first n under tail mask t = tail8(n), the rest 0).
ADAPTWIN_AVX2 inline __m256 load8(const float* src) { return _mm256_loadu_ps(src); }
ADAPTWIN_AVX2 inline __m256 load8(const float* src, __m256i t) { return _mm256_maskload_ps(src, t); }
ADAPTWIN_AVX2 inline __m256 widen8(__m128i bits) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
ADAPTWIN_AVX2 inline __m256 load8(const uint16_t* src) {
  return widen8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
}
// bfloat16 tail: an even count n, so n / 2 whole 32-bit words (t = tail8(n / 2) on the low 4 lanes)
ADAPTWIN_AVX2 inline __m256 load8(const uint16_t* src, __m256i t) {
  return widen8(_mm_maskload_epi32(reinterpret_cast<const int*>(src), _mm256_castsi256_si128(t)));
}

// A value row's 8 columns from c: whole, or the row's tail under vt.
template <typename Elem>
ADAPTWIN_AVX2 inline __m256 value8(const Elem* src, bool whole, __m256i vt) {
  return whole ? load8(src) : load8(src, vt);
}

// k·q for one key row: the whole vectors of the width, then its tail (qt: the tail's load mask).
template <typename Elem>
ADAPTWIN_AVX2 inline __m256 dot8(const Elem* kr, const float* q, int64_t whole, bool tail, __m256i qt) {
  __m256 a = _mm256_setzero_ps();
  for (int64_t c = 0; c < whole; c += 8) a = _mm256_fmadd_ps(load8(kr + c), _mm256_loadu_ps(q + c), a);
  if (tail) a = _mm256_fmadd_ps(load8(kr + whole, qt), _mm256_loadu_ps(q + whole), a);
  return a;
}

// Query row i of (b, h) into p.out. K, V: float or bfloat16 bits (even widths), strides p.ks / p.vs, last dim
// contiguous. ws: Dq rounded up to 8, then kRowBK2 scores, then Dv rounded up to 8 floats.
template <typename Elem>
ADAPTWIN_AVX2 void run_row_avx2(const Problem& p, const Elem* k, const Elem* v, int64_t b, int64_t h, int64_t i,
                                float* ws) {
  constexpr bool kHalf = sizeof(Elem) == 2;  // tails counted in 32-bit words of two bfloat16
  const int64_t dqp = (p.Dq + 7) / 8 * 8, dvp = (p.Dv + 7) / 8 * 8;
  const int64_t qwhole = p.Dq / 8 * 8, vwhole = p.Dv / 8 * 8;
  const __m256i qt = tail8(kHalf ? (p.Dq - qwhole) / 2 : p.Dq - qwhole);
  const __m256i vt = tail8(kHalf ? (p.Dv - vwhole) / 2 : p.Dv - vwhole);
  const int64_t hk = h / (p.H / p.Hkv);
  float* q = ws;
  float* s = q + dqp;
  float* o = s + kRowBK2;
  const float qscale = p.scale * kLog2e;
  const float* qi = p.q + b * p.qs[0] + h * p.qs[1] + i * p.qs[2];
  for (int64_t d = 0; d < dqp; ++d) q[d] = d < p.Dq ? qi[d] * qscale : 0.0f;
  for (int64_t d = 0; d < dvp; ++d) o[d] = 0.0f;
  const Elem* kb = k + b * p.ks[0] + hk * p.ks[1];
  const Elem* vb = v + b * p.vs[0] + hk * p.vs[1];
  float m = kNegInf, l = 0.0f;
  const int64_t s_end = p.causal ? std::min(p.S, i + 1) : p.S;  // keys j <= i (top-left, as SDPA)
  for (int64_t j0 = 0; j0 < s_end; j0 += kRowBK2) {
    const int64_t nk = std::min(kRowBK2, s_end - j0);
    for (int64_t jj = 0; jj < nk; jj += 8) {  // scores of 8 keys (a short group's other lanes: -inf)
      const int64_t n = std::min<int64_t>(8, nk - jj);
      __m256 acc[8];
      for (int64_t r = 0; r < n; ++r) {  // the key kPrefetchKeys ahead, this key's value row (attention_problem.h)
        if (j0 + jj + r + kPrefetchKeys < s_end) prefetch_row(kb + (j0 + jj + r + kPrefetchKeys) * p.ks[2], p.Dq);
        prefetch_row(vb + (j0 + jj + r) * p.vs[2], p.Dv);
      }
      for (int64_t r = 0; r < 8; ++r)
        acc[r] = r < n ? dot8(kb + (j0 + jj + r) * p.ks[2], q, qwhole, qwhole < p.Dq, qt) : _mm256_setzero_ps();
      const __m256 sc = hsum8(acc);
      _mm256_storeu_ps(s + jj, n == 8 ? sc : _mm256_blendv_ps(_mm256_set1_ps(kNegInf), sc,
                                                               _mm256_castsi256_ps(tail8(n))));
    }
    mask_row(p, b, h, i, j0, nk, s);
    const int64_t nk8 = (nk + 7) / 8 * 8;  // whole groups: the lanes past nk hold -inf
    __m256 tmax = _mm256_set1_ps(kNegInf);
    for (int64_t j = 0; j < nk8; j += 8) tmax = _mm256_max_ps(tmax, _mm256_loadu_ps(s + j));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, tmax);
    float m_new = m;
    for (float x : lanes) m_new = std::max(m_new, x);
    const float m_use = m_new == kNegInf ? 0.0f : m_new;  // only masked keys so far: exp2 gives 0, not NaN
    const __m256 mv = _mm256_set1_ps(m_use);
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < nk8; j += 8) {
      const __m256 e = exp2_256_nonpos(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
      _mm256_storeu_ps(s + j, e);
      sum = _mm256_add_ps(sum, e);
    }
    const float alpha = std::exp2(m - m_use);  // 0 on the first tile (m = -inf)
    l = l * alpha + sum_lanes8(sum);
    m = m_new;
    const __m256 av = _mm256_set1_ps(alpha);
    for (int64_t c = 0; c < p.Dv; c += 8) {  // o[c:c+8] = alpha·o + Σ_j p_j · v_j[c:c+8]
      const bool whole = c < vwhole;
      const Elem* vc = vb + j0 * p.vs[2] + c;
      __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(o + c), av), a1 = _mm256_setzero_ps();
      const int64_t vs = p.vs[2];
      int64_t j = 0;
      for (; j + 2 <= nk; j += 2) {  // two chains: the FMA latency is not on one accumulator
        a0 = _mm256_fmadd_ps(_mm256_set1_ps(s[j]), value8(vc + j * vs, whole, vt), a0);
        a1 = _mm256_fmadd_ps(_mm256_set1_ps(s[j + 1]), value8(vc + (j + 1) * vs, whole, vt), a1);
      }
      if (j < nk) a0 = _mm256_fmadd_ps(_mm256_set1_ps(s[j]), value8(vc + j * vs, whole, vt), a0);
      _mm256_storeu_ps(o + c, _mm256_add_ps(a0, a1));
    }
  }
  store_row(p, b, h, i, o, l);
}

inline size_t row_workspace_avx2(const Problem& p) {
  return static_cast<size_t>((p.Dq + 7) / 8 * 8 + kRowBK2 + (p.Dv + 7) / 8 * 8);
}
#endif

}  // namespace
}  // namespace adaptwin
