// Device code of the CUDA rank_linear kernel (rank_linear.cu launches it). Free of torch headers so that
// tests/cuda_emulation.cpp can compile this same code for the CPU and run it over the launch grid.
#pragma once

#include <cstdint>

namespace adaptwin {
namespace cuda_kernels {

__constant__ float kNF4Cuda[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

enum Format { kFp = 0, kNF4 = 1, kInt8 = 2 };

__device__ __forceinline__ float decode(const void* w, const float* scale, int format, int64_t e, int64_t rowlen,
                                        int64_t bs) {
  if (format == kNF4) {
    const uint8_t byte = static_cast<const uint8_t*>(w)[e >> 1];
    const int code = (e & 1) ? (byte & 0xF) : (byte >> 4);
    return kNF4Cuda[code] * scale[e / bs];
  }
  if (format == kInt8)
    return static_cast<float>(static_cast<const int8_t*>(w)[e]) * scale[bs == 0 ? e / rowlen : e / bs];
  return static_cast<const float*>(w)[e];
}

template <typename in_t, typename out_t>
__global__ void product_kernel(const in_t* __restrict__ x, const void* __restrict__ w, const float* __restrict__ scale,
                               const float* __restrict__ bias, out_t* __restrict__ out, int64_t M, int64_t N,
                               int64_t K, int64_t s_k, int64_t s_n, int64_t rowlen, int64_t bs, int format) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= M * N) return;
  const int64_t m = idx / N, n = idx % N;
  float acc = 0.f;
  for (int64_t kk = 0; kk < K; ++kk)
    acc += static_cast<float>(x[m * K + kk]) * decode(w, scale, format, kk * s_k + n * s_n, rowlen, bs);
  if (bias != nullptr) acc += bias[n];
  out[idx] = static_cast<out_t>(acc);
}

}  // namespace cuda_kernels
}  // namespace adaptwin
