// The Problem view of one call of the CPU kernel of adaptwin::attention (included by its headers and
// attention.cpp only), its tile sizes, and the rule that turns a row's softmax sum into its output.
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

// The decoding row paths (attention_rows.h, attention_rows_avx2.h) read keys ahead of the scores (software
// prefetch, 64 keys: 10 KB at width 40 in float32) and prefetch every value row as its key is scored, so that
// the p·v pass finds the tile's values in cache. A decoding step's cross-attention cache (Whisper-tiny: 4
// layers x 2.9 MB float32) is evicted from L3 by the step's 80 MB output head between calls, and the
// hardware prefetchers alone read it back at about 7 GB/s a core: one call (6 heads, 1500 keys, width 40, 2
// threads, AVX-512) right after the head's GEMV took 157-207 us, 125-151 with these prefetches (16 keys
// ahead: 133-151), against 43-123 us with the cache still in L3 (p50 of 7 calls, three alternating runs).
constexpr int64_t kPrefetchKeys = 64;

// Prefetch the n elements of a row into L1 (every line it touches); prefetches do not fault.
template <typename Elem>
inline void prefetch_row(const Elem* row, int64_t n) {
#if ADAPTWIN_X86
  const char* c = reinterpret_cast<const char*>(row);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(Elem));
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(c + o, _MM_HINT_T0);
  _mm_prefetch(c + bytes - 1, _MM_HINT_T0);  // the last line, where the row does not start on one
#else
  (void)row, (void)n;
#endif
}

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

// The row paths' output: out[b, i, h, :] = o / l (inverse_sum's rule for l = 0 or NaN).
inline void store_row(const Problem& p, int64_t b, int64_t h, int64_t i, const float* o, float l) {
  const float inv = inverse_sum(l);
  float* dst = p.out + ((b * p.T + i) * p.H + h) * p.Dv;
  for (int64_t d = 0; d < p.Dv; ++d) dst[d] = o[d] * inv;
}

}  // namespace
}  // namespace adaptwin
