// Row path of the CPU attention kernel (AVX-512, T < kMinLanes; included by attention.cpp only): decoding,
// where one or a few new queries per (batch, head) attend to a cache of S keys. One task = one query row.
// Keys and values are read in place, float32 or bfloat16 (widened in registers): the row-wise path's
// per-call transposed float32 copy of the whole cache cost more than the attention itself (fp32, one
// query against 1500 keys of width 40, 6 heads: 158 us, against SDPA's 65 us at the dense width 64).
//
// Scores of 16 keys at a time: each key's dot product with the query as a vector of partial sums over the
// width (masked loads for widths like 20 or 40), then the 16 vectors summed across their lanes at once by a
// shuffle tree (hsum16), so no horizontal sum per key. Scores are in log2 units (query times scale·log2e,
// additive masks times log2e) for exp2; online softmax over tiles of kRowBK keys; p·v accumulates value
// rows into the output row, one 16-wide column block at a time.
#pragma once

#include "attention_tiles.h"
#include "cpu_features.h"

namespace adaptwin {
namespace {

#if ADAPTWIN_X86
#define ADAPTWIN_AVX512_ROWS __attribute__((target("avx512f,avx512bw,avx512vl")))

constexpr int64_t kRowBK = 256;  // keys per softmax tile: 1 KiB of scores, in L1

// 16 elements (those set in m; the others 0) as float32, from float32 or from bfloat16 bits.
ADAPTWIN_AVX512_ROWS inline __m512 load16(const float* src, __mmask16 m) { return _mm512_maskz_loadu_ps(m, src); }
ADAPTWIN_AVX512_ROWS inline __m512 load16(const uint16_t* src, __mmask16 m) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, src));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// Query row i of (b, h) into p.out. K, V: float or bfloat16 bits, strides p.ks / p.vs, last dim contiguous.
// ws: Dq rounded up to 16, then kRowBK scores, then Dv rounded up to 16 floats.
template <typename Elem>
ADAPTWIN_AVX512_ROWS void run_row(const Problem& p, const Elem* k, const Elem* v, int64_t b, int64_t h, int64_t i,
                                  float* ws) {
  const int64_t dqp = (p.Dq + 15) / 16 * 16, dvp = (p.Dv + 15) / 16 * 16;
  const int64_t hk = h / (p.H / p.Hkv);
  float* q = ws;
  float* s = q + dqp;
  float* o = s + kRowBK;
  const float qscale = p.scale * kLog2e;
  const float* qi = p.q + b * p.qs[0] + h * p.qs[1] + i * p.qs[2];
  for (int64_t d = 0; d < dqp; ++d) q[d] = d < p.Dq ? qi[d] * qscale : 0.0f;
  for (int64_t d = 0; d < dvp; ++d) o[d] = 0.0f;
  const Elem* kb = k + b * p.ks[0] + hk * p.ks[1];
  const Elem* vb = v + b * p.vs[0] + hk * p.vs[1];
  const __m512 ninf = _mm512_set1_ps(kNegInf);
  float m = kNegInf, l = 0.0f;
  const int64_t s_end = p.causal ? std::min(p.S, i + 1) : p.S;  // keys j <= i (top-left, as SDPA)
  for (int64_t j0 = 0; j0 < s_end; j0 += kRowBK) {
    const int64_t nk = std::min(kRowBK, s_end - j0);
    for (int64_t jj = 0; jj < nk; jj += 16) {  // scores of 16 keys
      const int64_t n = std::min<int64_t>(16, nk - jj);
      __m512 acc[16];
      for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t r = 0; r < n; ++r) {
        const Elem* kr = kb + (j0 + jj + r) * p.ks[2];
        // the key kPrefetchKeys ahead, and this key's value row for the p·v pass below (attention_problem.h)
        if (j0 + jj + r + kPrefetchKeys < s_end) prefetch_row(kr + kPrefetchKeys * p.ks[2], p.Dq);
        prefetch_row(vb + (j0 + jj + r) * p.vs[2], p.Dv);
        __m512 a = _mm512_setzero_ps();
        for (int64_t c = 0; c < p.Dq; c += 16) a = _mm512_fmadd_ps(load16(kr + c, tail_mask(p.Dq - c)), _mm512_loadu_ps(q + c), a);
        acc[r] = a;
      }
      _mm512_mask_storeu_ps(s + jj, tail_mask(n), hsum16(acc));
    }
    mask_row(p, b, h, i, j0, nk, s);
    __m512 tmax = ninf;
    for (int64_t j = 0; j < nk; j += 16) tmax = _mm512_max_ps(tmax, _mm512_mask_loadu_ps(ninf, tail_mask(nk - j), s + j));
    const float m_new = std::max(m, _mm512_reduce_max_ps(tmax));
    const float m_use = m_new == kNegInf ? 0.0f : m_new;  // only masked keys so far: exp2 gives 0, not NaN
    const __m512 mv = _mm512_set1_ps(m_use);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < nk; j += 16) {
      const __mmask16 t = tail_mask(nk - j);
      const __m512 e = exp2_512_nonpos(_mm512_sub_ps(_mm512_mask_loadu_ps(ninf, t, s + j), mv));
      _mm512_mask_storeu_ps(s + j, t, e);
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(t, e));
    }
    const float alpha = std::exp2(m - m_use);  // 0 on the first tile (m = -inf)
    l = l * alpha + _mm512_reduce_add_ps(sum);
    m = m_new;
    const __m512 av = _mm512_set1_ps(alpha);
    for (int64_t c = 0; c < p.Dv; c += 16) {  // o[c:c+16] = alpha·o + Σ_j p_j · v_j[c:c+16]
      const __mmask16 t = tail_mask(p.Dv - c);
      __m512 a0 = _mm512_mul_ps(_mm512_loadu_ps(o + c), av), a1 = _mm512_setzero_ps();
      const Elem* vc = vb + j0 * p.vs[2] + c;
      int64_t j = 0;
      for (; j + 2 <= nk; j += 2) {  // two chains: the FMA latency is not on one accumulator
        a0 = _mm512_fmadd_ps(_mm512_set1_ps(s[j]), load16(vc + j * p.vs[2], t), a0);
        a1 = _mm512_fmadd_ps(_mm512_set1_ps(s[j + 1]), load16(vc + (j + 1) * p.vs[2], t), a1);
      }
      if (j < nk) a0 = _mm512_fmadd_ps(_mm512_set1_ps(s[j]), load16(vc + j * p.vs[2], t), a0);
      _mm512_storeu_ps(o + c, _mm512_add_ps(a0, a1));
    }
  }
  store_row(p, b, h, i, o, l);
}

inline size_t row_workspace(const Problem& p) {
  return static_cast<size_t>((p.Dq + 15) / 16 * 16 + kRowBK + (p.Dv + 15) / 16 * 16);
}
#endif

}  // namespace
}  // namespace adaptwin
