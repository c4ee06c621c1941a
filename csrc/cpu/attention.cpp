// CPU kernel of adaptwin::attention (schema: adaptwin/ops/attention.py): flash-style attention on
// rank-space heads whose widths (Dq for queries/keys, Dv for values) are arbitrary (20, 26, 40, 52, ...).
//
// One task = one (batch, head, block of kBQ queries). Keys are visited in blocks of kBK with an online
// softmax (running max m, running sum l, rescaled accumulator O), so the T×S scores never reach memory:
// per task only a kBQ×kBK tile (8 KiB) lives, in L1. Keys are transposed once per call to (B, Hkv, Dq, S)
// so that a score tile is kBQ·Dq broadcast-FMAs over contiguous key rows; values are read in place.
// Queries are pre-multiplied by `scale`. Output is written straight into (B, T, H, Dv), the layout the
// output projection reads, so no transpose copy follows. float32 arithmetic; bf16/fp16 are upcast.
//
// Which path runs (attention_cpu, at the end): on AVX-512 CPUs the query-vectorised kernels (T >= 8; bf16
// in bf16 pairs where the CPU has AVX512-BF16), the row path (decoding) or run_block; on CPUs with AVX2 +
// FMA but no AVX-512 the query-vectorised kernel in 8-float vectors (attention_avx2.h, T >= 8) or the row
// path in 8-float vectors (attention_rows_avx2.h, decoding); every other call (ARM, float64) goes to ATen's
// SDPA as the op's reference calls it (attention_sdpa).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <limits>
#include <vector>

#include "attention_avx2.h"
#include "attention_bf16.h"
#include "attention_rows.h"
#include "attention_rows_avx2.h"
#include "attention_tiles.h"
#include "cpu_features.h"
#include "../attention_checks.h"

namespace adaptwin {
namespace {

#if ADAPTWIN_X86
// t as float32 with a unit last stride (a copy only where it is not one already).
at::Tensor f32(const at::Tensor& t) {
  at::Tensor u = t.to(at::kFloat);
  return u.stride(-1) == 1 ? u : u.contiguous();
}

// The call's sizes, scale and causal flag (the data pointers are set by each path).
Problem problem_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, bool is_causal) {
  Problem p{};
  p.B = q.size(0), p.H = q.size(1), p.T = q.size(2), p.Dq = q.size(3);
  p.Hkv = k.size(1), p.S = k.size(2), p.Dv = v.size(3);
  p.scale = static_cast<float>(scale);
  p.causal = is_causal;
  return p;
}

// The float32 (B, T, H, Dv) output, its pointer in p.
at::Tensor set_output(Problem& p) {
  at::Tensor out = at::empty({p.B, p.T, p.H, p.Dv}, at::kFloat);
  p.out = out.data_ptr<float>();
  return out;
}

// The mask's view in p (bool keep-mask or float32 additive, broadcast to (B, H, T, S)); returns the tensor
// that owns it, to be kept alive while the kernel runs.
at::Tensor set_mask(Problem& p, const std::optional<at::Tensor>& mask) {
  if (!mask.has_value()) return at::Tensor();
  at::Tensor m = mask->scalar_type() == at::kBool ? *mask : mask->to(at::kFloat);
  m = m.expand({p.B, p.H, p.T, p.S});
  if (m.stride(3) != 1 && m.stride(3) != 0) m = m.contiguous();
  for (int d = 0; d < 4; ++d) p.ms[d] = m.stride(d);
  if (m.scalar_type() == at::kBool)
    p.mask_b = m.data_ptr<bool>();
  else
    p.mask_f = m.data_ptr<float>();
  return m;
}

ADAPTWIN_AVX512 void run_block_lanes(const Problem& p, int64_t b, int64_t h, int64_t i0, float* ws) {
  const int64_t nq = std::min<int64_t>(32, p.T - i0);
  const int64_t hk = h / (p.H / p.Hkv);
  float* qt = ws;               // (Dq, 32)
  float* st = qt + p.Dq * 32;   // (kBK, 32)
  float* ot = st + kBK * 32;    // (Dv, 32)
  std::fill(qt, qt + p.Dq * 32, 0.0f);
  const float qscale = p.scale * kLog2e;  // scores in log2 units (lanes_softmax)
  for (int64_t i = 0; i < nq; ++i) {
    const float* qi = p.q + b * p.qs[0] + h * p.qs[1] + (i0 + i) * p.qs[2];
    for (int64_t d = 0; d < p.Dq; ++d) qt[d * 32 + i] = qi[d] * qscale;
  }
  std::fill(ot, ot + p.Dv * 32, 0.0f);
  const __m512 ninf = _mm512_set1_ps(kNegInf);
  __m512 mx[2] = {ninf, ninf}, l[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  const float* kb = p.k + b * p.ks[0] + hk * p.ks[1];
  const float* vb = p.v + b * p.vs[0] + hk * p.vs[1];
  const int64_t s_end = p.causal ? std::min(p.S, i0 + nq) : p.S;
  for (int64_t j0 = 0; j0 < s_end; j0 += kBK) {
    const int64_t nk = std::min(kBK, s_end - j0);
    // scores, kKeys keys at a time: Qᵀ[d] is loaded once for kKeys broadcast-FMAs per vector
    __m512 tmax[2] = {ninf, ninf};
    const float* kt = kb + j0 * p.ks[2];
    int64_t j = 0;
    for (; j + kKeys <= nk; j += kKeys) scores_lanes<kKeys>(qt, kt + j * p.ks[2], p.ks[2], p.Dq, st + j * 32, tmax);
    for (; j + 4 <= nk; j += 4) scores_lanes<4>(qt, kt + j * p.ks[2], p.ks[2], p.Dq, st + j * 32, tmax);
    for (; j < nk; ++j) scores_lanes<1>(qt, kt + j * p.ks[2], p.ks[2], p.Dq, st + j * 32, tmax);
    lanes_softmax(p, b, h, i0, nq, j0, nk, st, tmax, mx, l, ot);
    const float* v0 = vb + j0 * p.vs[2];
    for (int64_t d = 0; d < p.Dv; d += 8)
      pv_lanes_any(static_cast<int>(std::min<int64_t>(8, p.Dv - d)), st, v0 + d, p.vs[2], nk, ot + d * 32);
  }
  lanes_store(p, b, h, i0, nq, l, ot);
}

// Decoding (T < kMinLanes) on AVX-512 CPUs without the BW / VL forms of the row path.
ADAPTWIN_AVX512 void run_block(const Problem& p, int64_t b, int64_t h, int64_t i0, std::vector<float>& ws) {
  const int64_t nq = std::min(kBQ, p.T - i0);
  const int64_t hk = h / (p.H / p.Hkv);
  const int64_t dvp = (p.Dv + 15) / 16 * 16;  // accumulator rows padded to whole vectors
  float* qb = ws.data();                      // (kBQ, Dq)
  float* s = qb + kBQ * p.Dq;                 // (kBQ, kBK)
  float* o = s + kBQ * kBK;                   // (kBQ, dvp)
  float* mx = o + kBQ * dvp;                  // (kBQ,)
  float* l = mx + kBQ;                        // (kBQ,)
  for (int64_t i = 0; i < nq; ++i) {
    const float* qi = p.q + b * p.qs[0] + h * p.qs[1] + (i0 + i) * p.qs[2];
    for (int64_t d = 0; d < p.Dq; ++d) qb[i * p.Dq + d] = qi[d] * p.scale;
    mx[i] = kNegInf;
    l[i] = 0.0f;
  }
  std::fill(o, o + kBQ * dvp, 0.0f);
  const float* kt = p.kt + (b * p.Hkv + hk) * p.Dq * p.S;
  const float* vbase = p.v + b * p.vs[0] + hk * p.vs[1];
  const int64_t s_end = p.causal ? std::min(p.S, i0 + nq) : p.S;  // keys j <= i (top-left, as SDPA)
  for (int64_t j0 = 0; j0 < s_end; j0 += kBK) {
    const int64_t nk = std::min(kBK, s_end - j0);
    scores_avx512(p, qb, kt, j0, nq, nk, s);
    if (p.mask_f || p.mask_b || p.causal) {
      for (int64_t i = 0; i < nq; ++i) {
        float* row = s + i * kBK;
        const int64_t base = b * p.ms[0] + h * p.ms[1] + (i0 + i) * p.ms[2] + j0 * p.ms[3];
        if (p.mask_f)
          for (int64_t j = 0; j < nk; ++j) row[j] += p.mask_f[base + j * p.ms[3]];
        else if (p.mask_b)
          for (int64_t j = 0; j < nk; ++j)
            if (!p.mask_b[base + j * p.ms[3]]) row[j] += kNegInf;  // NaN stays NaN, as SDPA
        if (p.causal)
          for (int64_t j = std::max<int64_t>(0, i0 + i + 1 - j0); j < nk; ++j) row[j] = kNegInf;
      }
    }
    softmax_update(p, s, nq, mx, l, o, dvp);
    pv_avx512(p, s, vbase + j0 * p.vs[2], p.vs[2], nq, nk, o, dvp);
  }
  for (int64_t i = 0; i < nq; ++i) {
    // A finite mask, however large (HF's finfo.min), leaves l > 0: that row averages its values, as SDPA.
    const float inv = inverse_sum(l[i]);
    float* dst = p.out + ((b * p.T + i0 + i) * p.H + h) * p.Dv;
    for (int64_t d = 0; d < p.Dv; ++d) dst[d] = o[i * dvp + d] * inv;
  }
}

// The row paths' inputs (decoding: attention_rows.h, attention_rows_avx2.h): q in float32; keys and values read
// in place as bfloat16 bits where `half` (unit last stride made so), else in float32. Returns the tensors p
// points into, for the caller to keep.
std::array<at::Tensor, 3> set_row_inputs(Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         bool half) {
  std::array<at::Tensor, 3> kept{f32(q), at::Tensor(), at::Tensor()};
  p.q = kept[0].data_ptr<float>();
  if (half) {
    kept[1] = k.stride(-1) == 1 ? k : k.contiguous();
    kept[2] = v.stride(-1) == 1 ? v : v.contiguous();
    p.k16 = reinterpret_cast<const uint16_t*>(kept[1].data_ptr<at::BFloat16>());
    p.v16 = reinterpret_cast<const uint16_t*>(kept[2].data_ptr<at::BFloat16>());
  } else {
    kept[1] = f32(k), kept[2] = f32(v);
    p.k = kept[1].data_ptr<float>(), p.v = kept[2].data_ptr<float>();
  }
  for (int d = 0; d < 3; ++d) p.qs[d] = kept[0].stride(d), p.ks[d] = kept[1].stride(d), p.vs[d] = kept[2].stride(d);
  return kept;
}

// Every (batch, head, query) row through run(p, k, v, b, h, i, workspace), k / v the bfloat16 bits where
// `half`, else the float32 keys and values; a workspace of ws_size floats per thread.
template <typename Run>
void run_rows(const Problem& p, bool half, size_t ws_size, Run run) {
  at::parallel_for(0, p.B * p.H * p.T, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> ws(ws_size);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / (p.H * p.T), h = (t / p.T) % p.H, i = t % p.T;
      if (half)
        run(p, p.k16, p.v16, b, h, i, ws.data());
      else
        run(p, p.k, p.v, b, h, i, ws.data());
    }
  });
}

// The op on AVX-512 CPUs: the query-vectorised paths (T >= kMinLanes), the row path (decoding) or run_block.
at::Tensor attention_avx512(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, double scale, bool is_causal) {
  Problem p = problem_of(q, k, v, scale, is_causal);
  const bool lanes = p.T >= kMinLanes;
  const bool rows = !lanes && has_avx512_rows();  // decoding: attention_rows.h, the cache read in place
  // bf16 q, k, v with AVX512-BF16: products in bf16 pairs (attention_bf16.h), no float32 copies
  const bool bf16 = lanes && q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                    v.scalar_type() == at::kBFloat16 && has_avx512_bf16();
  at::Tensor q32, k32, v32, kt, q16, kp, vp;
  std::array<at::Tensor, 3> row_inputs;
  // the row path reads bfloat16 keys and values as they are (widened in registers)
  const bool rows16 = rows && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16;
  if (rows) {
    row_inputs = set_row_inputs(p, q, k, v, rows16);
  } else if (bf16) {
    q16 = q.stride(-1) == 1 ? q : q.contiguous();
    p.dq2 = (p.Dq + 1) / 2, p.s2 = (p.S + 1) / 2;
    kp = at::constant_pad_nd(k, {0, p.Dq % 2}).contiguous();  // (B, Hkv, S, 2·dq2)
    vp = at::constant_pad_nd(v, {0, 0, 0, p.S % 2}).view({p.B, p.Hkv, p.s2, 2, p.Dv}).transpose(3, 4).contiguous();
    p.q16 = reinterpret_cast<const uint16_t*>(q16.data_ptr<at::BFloat16>());
    p.kp = reinterpret_cast<const uint16_t*>(kp.data_ptr<at::BFloat16>());
    p.vp = reinterpret_cast<const uint16_t*>(vp.data_ptr<at::BFloat16>());
    for (int d = 0; d < 3; ++d) p.qs[d] = q16.stride(d);
  } else {
    q32 = f32(q), k32 = f32(k), v32 = f32(v);
    kt = lanes ? k32 : k32.transpose(2, 3).contiguous();  // (B, Hkv, Dq, S) for the row-wise path only
    p.q = q32.data_ptr<float>();
    p.kt = kt.data_ptr<float>();
    p.k = k32.data_ptr<float>();
    p.v = v32.data_ptr<float>();
    for (int d = 0; d < 3; ++d) p.qs[d] = q32.stride(d), p.ks[d] = k32.stride(d), p.vs[d] = v32.stride(d);
  }
  const at::Tensor out = set_output(p), m = set_mask(p, mask);
  if (p.T > 0 && p.H > 0 && p.B > 0) {
    if (rows) {
      run_rows(p, rows16, row_workspace(p), [](auto&&... args) { run_row(args...); });
      return out.to(q.scalar_type());
    }
    const int64_t bq = lanes ? 32 : kBQ;
    const int64_t qblocks = (p.T + bq - 1) / bq;
    const int64_t dvp = (p.Dv + 15) / 16 * 16;
    size_t ws_size = lanes ? 32 * (p.Dq + kBK + p.Dv) : kBQ * p.Dq + kBQ * kBK + kBQ * dvp + 2 * kBQ;
    if (bf16) ws_size = lanes_bf16_workspace(p);
    at::parallel_for(0, p.B * p.H * qblocks, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> ws(ws_size);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / (p.H * qblocks), h = (t / qblocks) % p.H, qb = t % qblocks;
        if (p.S == 0) continue;
        if (bf16) {
          run_block_lanes_bf16(p, b, h, qb * bq, ws.data());
          continue;
        }
        if (lanes) {
          run_block_lanes(p, b, h, qb * bq, ws.data());
          continue;
        }
        run_block(p, b, h, qb * bq, ws);
      }
    });
    if (p.S == 0) out.zero_();
  }
  return out.to(q.scalar_type());
}

// The op on CPUs with AVX2 + FMA but no AVX-512, for T >= kMinLanes (attention_avx2.h): float32 copies of
// q, k and v where they are not already float32 with unit last stride, 16 queries per task.
at::Tensor attention_avx2(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& mask, double scale, bool is_causal) {
  Problem p = problem_of(q, k, v, scale, is_causal);
  const at::Tensor q32 = f32(q), k32 = f32(k), v32 = f32(v);
  p.q = q32.data_ptr<float>(), p.k = k32.data_ptr<float>(), p.v = v32.data_ptr<float>();
  for (int d = 0; d < 3; ++d) p.qs[d] = q32.stride(d), p.ks[d] = k32.stride(d), p.vs[d] = v32.stride(d);
  const at::Tensor out = set_output(p), m = set_mask(p, mask);
  const int64_t qblocks = (p.T + kLanes2 - 1) / kLanes2;
  const size_t ws_size = kLanes2 * (p.Dq + kBK + p.Dv);
  at::parallel_for(0, p.B * p.H * qblocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> ws(ws_size);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / (p.H * qblocks), h = (t / qblocks) % p.H, qb = t % qblocks;
      run_block_lanes_avx2(p, b, h, qb * kLanes2, ws.data());
    }
  });
  return out.to(q.scalar_type());
}

// Decoding (T < kMinLanes) on CPUs with AVX2 + FMA but no AVX-512 (attention_rows_avx2.h): q in float32, the
// keys and values read in place where they are float32 or bfloat16 of even widths (else widened first).
at::Tensor attention_avx2_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& mask, double scale, bool is_causal) {
  Problem p = problem_of(q, k, v, scale, is_causal);
  const bool half = k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16 && p.Dq % 2 == 0 &&
                    p.Dv % 2 == 0;
  const auto kept = set_row_inputs(p, q, k, v, half);
  const at::Tensor out = set_output(p), m = set_mask(p, mask);
  run_rows(p, half, row_workspace_avx2(p), [](auto&&... args) { run_row_avx2(args...); });
  return out.to(q.scalar_type());
}
#endif  // ADAPTWIN_X86

// Width ATen's CPU SDPA runs fastest at for heads of width d, and the T·S per head from which q, k and v are
// zero-padded to it: the rule, and the sweep behind it, of adaptwin/ops/attention.py's _cpu_width and
// _CPU_PAD_MIN_SCORES (the op's reference); tests/test_kernels_portable.py checks the two give the same bits.
constexpr int64_t kSdpaPadMinScores = 256 * 256;

int64_t sdpa_width(int64_t d) {
  if (d <= 16) return 16;
  const int64_t w8 = (d + 7) / 8 * 8, pad = w8 - d;
  return w8 % 16 == 0 || pad <= 2 || (d % 2 == 1 && pad <= 5) ? w8 : d;
}

// The op through ATen's SDPA, as the reference computes it (adaptwin/ops/attention.py: _sdpa): a causal
// flag given with a mask folded into the mask, a mask in a third dtype made float32, heads zero-padded to
// a fast width (exact: zero columns change neither q·kᵀ nor the kept columns of p·v). Returns (B, T, H, Dv).
at::Tensor attention_sdpa(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& mask, double scale, bool is_causal) {
  const int64_t T = q.size(2), S = k.size(2), dq = q.size(3), dv = v.size(3);
  std::optional<at::Tensor> m = mask;
  // a 0-d or 1-D mask broadcasts like any other, but SDPA indexes its last two dimensions: made (1, S) / (1, 1)
  if (m.has_value() && m->dim() < 2) m = m->reshape({1, m->dim() == 1 ? m->size(0) : 1});
  bool causal = is_causal;
  if (causal && m.has_value()) {
    const at::Tensor keep = at::ones({T, S}, q.options().dtype(at::kBool)).tril();
    m = m->scalar_type() == at::kBool ? at::logical_and(*m, keep)
                                      : m->masked_fill(at::logical_not(keep), -std::numeric_limits<double>::infinity());
    causal = false;
  }
  if (m.has_value() && m->scalar_type() != at::kBool && m->scalar_type() != q.scalar_type() &&
      m->scalar_type() != at::kFloat)
    m = m->to(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor qq = q, kk = k, vv = v;
  if (T * S >= kSdpaPadMinScores) {
    const int64_t w = sdpa_width(std::max(dq, dv));
    if (w != dq || w != dv) {
      auto pad = [w](const at::Tensor& t) { return t.size(3) == w ? t : at::constant_pad_nd(t, {0, w - t.size(3)}); };
      qq = pad(q), kk = pad(k), vv = pad(v);
    }
  }
  at::Tensor out = at::scaled_dot_product_attention(qq, kk, vv, m, 0.0, causal, scale, q.size(1) != k.size(1));
  if (out.size(3) != dv) out = out.narrow(3, 0, dv);
  return out.transpose(1, 2).contiguous();
}

// Without AVX-512, calls with keys run the AVX2 kernels where the CPU has AVX2 + FMA (the lanes path from
// kMinLanes queries, the row path below); every other call (ARM CPUs, ADAPTWIN_CPU_CAP=portable) runs
// attention_sdpa: ATen's SDPA is vectorised for those CPUs, and portable loops were 1.3-5.8x slower than
// it on an emulated AVX2 CPU (README: "CPUs without AVX-512"). float64 (gradcheck, oracles) runs it too.
at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::optional<at::Tensor>& mask, double scale, bool is_causal) {
  check_attention(q, k, v, mask, scale);
  // A q, k or v without elements (a width of 0, no keys, no batch) has no storage: its data pointer is null, and
  // the SIMD paths' row pointers into it (b·stride + ...) and prefetches (row + bytes - 1) would be undefined
  // (UBSan: "applying non-zero offset to null pointer"). SDPA, the reference, gives those results: zeros
  // without keys, each row's mean of its values at Dq = 0, an empty output at Dv = 0.
  if (q.numel() == 0 || k.numel() == 0 || v.numel() == 0) return attention_sdpa(q, k, v, mask, scale, is_causal);
#if ADAPTWIN_X86
  if (q.scalar_type() != at::kDouble && !has_avx512() && has_avx2() && k.size(2) > 0 && q.size(0) > 0 &&
      q.size(1) > 0 && q.size(2) > 0)
    return q.size(2) >= kMinLanes ? attention_avx2(q, k, v, mask, scale, is_causal)
                                  : attention_avx2_rows(q, k, v, mask, scale, is_causal);
#endif
  if (q.scalar_type() == at::kDouble || !has_avx512()) return attention_sdpa(q, k, v, mask, scale, is_causal);
#if ADAPTWIN_X86
  return attention_avx512(q, k, v, mask, scale, is_causal);
#else
  return at::Tensor();  // unreachable: has_avx512() is false in a portable build
#endif
}


}  // namespace

TORCH_LIBRARY_IMPL(adaptwin, CPU, m) { m.impl("attention", &attention_cpu); }

}  // namespace adaptwin
