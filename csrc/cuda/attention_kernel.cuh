// Device code of the CUDA attention kernel (attention.cu launches it). Free of torch headers so that
// tests/cuda_emulation.cpp can compile this same code for the CPU and run it over the launch grid.
#pragma once

#include <cmath>
#include <cstdint>

namespace adaptwin {
namespace cuda_kernels {

struct Strides4 {
  int64_t s[4];
};

template <typename scalar_t, typename mask_t, int MAXD>
__global__ void attention_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                 const scalar_t* __restrict__ v, const mask_t* __restrict__ mask,
                                 scalar_t* __restrict__ out, Strides4 qs, Strides4 ks, Strides4 vs, Strides4 ms,
                                 int B, int H, int Hkv, int T, int S, int Dq, int Dv, float scale, bool causal,
                                 bool has_mask, bool mask_bool) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // over B·H·T
  if (row >= static_cast<int64_t>(B) * H * T) return;
  const int i = row % T;
  const int h = (row / T) % H;
  const int b = row / (static_cast<int64_t>(T) * H);
  const int hk = h / (H / Hkv);
  float qr[MAXD], acc[MAXD];
  const scalar_t* qi = q + b * qs.s[0] + h * qs.s[1] + i * qs.s[2];
  for (int d = 0; d < Dq; ++d) qr[d] = static_cast<float>(qi[d * qs.s[3]]) * scale;
  for (int d = 0; d < Dv; ++d) acc[d] = 0.f;
  float m = -INFINITY, l = 0.f;
  const int end = causal ? min(S, i + 1) : S;
  for (int j = 0; j < end; ++j) {
    const scalar_t* kj = k + b * ks.s[0] + hk * ks.s[1] + j * ks.s[2];
    float s = 0.f;
    for (int d = 0; d < Dq; ++d) s += qr[d] * static_cast<float>(kj[d * ks.s[3]]);
    if (has_mask) {
      const mask_t mv = mask[b * ms.s[0] + h * ms.s[1] + i * ms.s[2] + j * ms.s[3]];
      if (mask_bool) {
        if (!static_cast<bool>(mv)) s += -INFINITY;  // added, as SDPA: a NaN score stays NaN (its row NaN)
      } else {
        s += static_cast<float>(mv);
      }
    }
    if (s == -INFINITY) continue;
    const float m_new = fmaxf(m, s);
    const float alpha = __expf(m - m_new);  // 0 on the first visible key (m = -inf)
    const float p = __expf(s - m_new);
    l = l * alpha + p;
    const scalar_t* vj = v + b * vs.s[0] + hk * vs.s[1] + j * vs.s[2];
    for (int d = 0; d < Dv; ++d) acc[d] = acc[d] * alpha + p * static_cast<float>(vj[d * vs.s[3]]);
    m = m_new;
  }
  // fully masked rows give 0, as the reference; a NaN or +inf score left l NaN: the row is NaN, as SDPA
  const float inv = l > 0.f ? 1.f / l : (l == 0.f ? 0.f : l);
  scalar_t* o = out + ((static_cast<int64_t>(b) * T + i) * H + h) * Dv;
  for (int d = 0; d < Dv; ++d) o[d] = static_cast<scalar_t>(acc[d] * inv);
}

}  // namespace cuda_kernels
}  // namespace adaptwin
