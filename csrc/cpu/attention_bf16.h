// bfloat16 query-vectorised path of the CPU attention kernel (included by attention.cpp only), for
// bf16 q, k, v on CPUs with AVX512-BF16. Same tiling as the float32 path (attention_tiles.h: 32 queries
// per task in the lanes of two vectors, 64-key tiles, online softmax in float32), but both products use
// vdpbf16ps, which multiplies two bf16 pairs and adds both products into each float32 lane: half the
// multiply instructions of the float32 path, and no bf16 -> float32 copies of q, k, v.
//   scores: lane i of key j accumulates q[i][d]·k[j][d] + q[i][d+1]·k[j][d+1] per instruction, from
//           Qᵀ packed as (d pair, lane, 2) and the key pair broadcast as one 32-bit word;
//   P·V:    lane i of value column d accumulates p[i][j]·v[j][d] + p[i][j+1]·v[j+1][d], from P rounded
//           to bf16 and packed as (key pair, lane, 2) and the value pair broadcast from V packed as
//           (key pair, Dv, 2) once per call.
// As SDPA's CPU flash kernel for bf16: products of bf16 inputs, float32 sums and softmax, P rounded to
// bf16 before P·V. The scale multiplies the float32 scores (q is not rescaled before rounding).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>

#include "attention_tiles.h"
#include "cpu_features.h"

namespace adaptwin {
namespace {

#if ADAPTWIN_X86
ADAPTWIN_AVX512BF16 inline __m512bh as_bh(__m512i x) { return (__m512bh)x; }  // GCC/Clang vector cast, same bits

ADAPTWIN_AVX512BF16 inline __m512i pair_bits(const uint16_t* at) {
  int32_t w;
  std::memcpy(&w, at, sizeof(w));  // two consecutive bf16 as one 32-bit word
  return _mm512_set1_epi32(w);
}

template <int DN>
ADAPTWIN_AVX512BF16 inline void pv_lanes_bf16(const uint16_t* pt, const uint16_t* vp, int64_t dv, int64_t npairs,
                                              float* ot) {
  __m512 acc[DN][2];
  for (int d = 0; d < DN; ++d) acc[d][0] = acc[d][1] = _mm512_setzero_ps();
  for (int64_t jp = 0; jp < npairs; ++jp) {
    const __m512bh p0 = as_bh(_mm512_loadu_si512(pt + jp * 64)), p1 = as_bh(_mm512_loadu_si512(pt + jp * 64 + 32));
    const uint16_t* vj = vp + jp * dv * 2;
    for (int d = 0; d < DN; ++d) {
      const __m512bh vd = as_bh(pair_bits(vj + 2 * d));
      acc[d][0] = _mm512_dpbf16_ps(acc[d][0], p0, vd);
      acc[d][1] = _mm512_dpbf16_ps(acc[d][1], p1, vd);
    }
  }
  for (int d = 0; d < DN; ++d) {
    _mm512_storeu_ps(ot + d * 32, _mm512_add_ps(_mm512_loadu_ps(ot + d * 32), acc[d][0]));
    _mm512_storeu_ps(ot + d * 32 + 16, _mm512_add_ps(_mm512_loadu_ps(ot + d * 32 + 16), acc[d][1]));
  }
}

ADAPTWIN_AVX512BF16 void pv_lanes_bf16_any(int dn, const uint16_t* pt, const uint16_t* vp, int64_t dv,
                                           int64_t npairs, float* ot) {
  switch (dn) {
    case 1: return pv_lanes_bf16<1>(pt, vp, dv, npairs, ot);
    case 2: return pv_lanes_bf16<2>(pt, vp, dv, npairs, ot);
    case 3: return pv_lanes_bf16<3>(pt, vp, dv, npairs, ot);
    case 4: return pv_lanes_bf16<4>(pt, vp, dv, npairs, ot);
    case 5: return pv_lanes_bf16<5>(pt, vp, dv, npairs, ot);
    case 6: return pv_lanes_bf16<6>(pt, vp, dv, npairs, ot);
    case 7: return pv_lanes_bf16<7>(pt, vp, dv, npairs, ot);
    default: return pv_lanes_bf16<8>(pt, vp, dv, npairs, ot);
  }
}

// Workspace floats per task: Qᵀ pairs, the score tile, the packed P tile, Oᵀ.
inline int64_t lanes_bf16_workspace(const Problem& p) { return p.dq2 * 32 + kBK * 32 + (kBK / 2) * 32 + p.Dv * 32; }

ADAPTWIN_AVX512BF16 void run_block_lanes_bf16(const Problem& p, int64_t b, int64_t h, int64_t i0, float* ws) {
  const int64_t nq = std::min<int64_t>(32, p.T - i0);
  const int64_t hk = h / (p.H / p.Hkv);
  uint16_t* qt = reinterpret_cast<uint16_t*>(ws);  // (dq2, 32 lanes, 2)
  float* st = ws + p.dq2 * 32;                      // (kBK, 32)
  uint16_t* pt = reinterpret_cast<uint16_t*>(st + kBK * 32);  // (kBK / 2, 32 lanes, 2)
  float* ot = st + kBK * 32 + (kBK / 2) * 32;       // (Dv, 32)
  std::fill(qt, qt + p.dq2 * 64, uint16_t{0});
  for (int64_t i = 0; i < nq; ++i) {
    const uint16_t* qi = p.q16 + b * p.qs[0] + h * p.qs[1] + (i0 + i) * p.qs[2];
    for (int64_t d = 0; d < p.Dq; ++d) qt[(d / 2) * 64 + (i / 16) * 32 + (i % 16) * 2 + d % 2] = qi[d];
  }
  std::fill(ot, ot + p.Dv * 32, 0.0f);
  // scores in log2 units (lanes_softmax): scale·log2e
  const __m512 ninf = _mm512_set1_ps(kNegInf), scale = _mm512_set1_ps(p.scale * kLog2e);
  __m512 mx[2] = {ninf, ninf}, l[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  // interleave two rows of 16 bf16 (a0..a15 b0..b15) into pairs (a0 b0 a1 b1 ...)
  const __m512i zip = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                       21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const uint16_t* kb = p.kp + (b * p.Hkv + hk) * p.S * p.dq2 * 2;
  const uint16_t* vb = p.vp + (b * p.Hkv + hk) * p.s2 * p.Dv * 2;
  const int64_t s_end = p.causal ? std::min(p.S, i0 + nq) : p.S;
  for (int64_t j0 = 0; j0 < s_end; j0 += kBK) {  // j0 is even: tiles start on key pairs
    const int64_t nk = std::min(kBK, s_end - j0);
    int64_t j = 0;
    for (; j + 4 <= nk; j += 4) {
      __m512 acc[4][2];
      for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
      const uint16_t* k0 = kb + (j0 + j) * p.dq2 * 2;
      for (int64_t d2 = 0; d2 < p.dq2; ++d2) {
        const __m512bh q0 = as_bh(_mm512_loadu_si512(qt + d2 * 64)), q1 = as_bh(_mm512_loadu_si512(qt + d2 * 64 + 32));
        for (int r = 0; r < 4; ++r) {
          const __m512bh kd = as_bh(pair_bits(k0 + r * p.dq2 * 2 + 2 * d2));
          acc[r][0] = _mm512_dpbf16_ps(acc[r][0], q0, kd);
          acc[r][1] = _mm512_dpbf16_ps(acc[r][1], q1, kd);
        }
      }
      for (int r = 0; r < 4; ++r) {
        _mm512_storeu_ps(st + (j + r) * 32, _mm512_mul_ps(acc[r][0], scale));
        _mm512_storeu_ps(st + (j + r) * 32 + 16, _mm512_mul_ps(acc[r][1], scale));
      }
    }
    for (; j < nk; ++j) {
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      const uint16_t* kj = kb + (j0 + j) * p.dq2 * 2;
      for (int64_t d2 = 0; d2 < p.dq2; ++d2) {
        const __m512bh kd = as_bh(pair_bits(kj + 2 * d2));
        a0 = _mm512_dpbf16_ps(a0, as_bh(_mm512_loadu_si512(qt + d2 * 64)), kd);
        a1 = _mm512_dpbf16_ps(a1, as_bh(_mm512_loadu_si512(qt + d2 * 64 + 32)), kd);
      }
      _mm512_storeu_ps(st + j * 32, _mm512_mul_ps(a0, scale));
      _mm512_storeu_ps(st + j * 32 + 16, _mm512_mul_ps(a1, scale));
    }
    lanes_softmax(p, b, h, i0, nq, j0, nk, st, nullptr, mx, l, ot);
    // P (float32, keys × lanes) -> bf16 pairs of keys per lane; an odd last key pairs with a zero
    const int64_t npairs = (nk + 1) / 2;
    for (int64_t jp = 0; jp < npairs; ++jp) {
      const float* r0 = st + 2 * jp * 32;
      const bool second = 2 * jp + 1 < nk;
      for (int c = 0; c < 2; ++c) {
        const __m512 a = _mm512_loadu_ps(r0 + 16 * c);
        const __m512 bv = second ? _mm512_loadu_ps(r0 + 32 + 16 * c) : _mm512_setzero_ps();
        const __m512i packed = (__m512i)_mm512_cvtne2ps_pbh(bv, a);  // a (key j) low, bv (key j + 1) high
        _mm512_storeu_si512(pt + jp * 64 + 32 * c, _mm512_permutexvar_epi16(zip, packed));
      }
    }
    const uint16_t* v0 = vb + (j0 / 2) * p.Dv * 2;
    for (int64_t d = 0; d < p.Dv; d += 8)
      pv_lanes_bf16_any(static_cast<int>(std::min<int64_t>(8, p.Dv - d)), pt, v0 + 2 * d, p.Dv, npairs,
                        ot + d * 32);
  }
  lanes_store(p, b, h, i0, nq, l, ot);
}
#endif  // ADAPTWIN_X86

}  // namespace
}  // namespace adaptwin
