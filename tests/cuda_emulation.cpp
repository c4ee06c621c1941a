// The CUDA C++ backend's device code (csrc/cuda/*_kernel.cuh), compiled for the CPU and run over the launch
// grid its launchers use, one emulated thread at a time (tests/test_cuda_emulation.py builds and loads this
// with ctypes). Valid for these kernels because they use no shared memory, barriers, warp functions or
// atomics: each thread's output depends on blockIdx, blockDim and threadIdx only. float32 instances only.
#include <algorithm>
#include <cmath>
#include <cstdint>

struct EmulatedDim3 {
  unsigned x = 0, y = 0, z = 0;
};
static EmulatedDim3 blockIdx, threadIdx, blockDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __constant__
#define __restrict__
inline float __expf(float x) { return std::exp(x); }
using std::min;

#include "attention_kernel.cuh"
#include "rank_linear_kernel.cuh"

namespace kernels = adaptwin::cuda_kernels;

// Runs kernel(thread) for every (block, thread) of a 1-D grid of `blocks` x `threads`.
template <typename Fn>
static void over_grid(int64_t blocks, unsigned threads, Fn&& kernel) {
  blockDim.x = threads;
  for (int64_t b = 0; b < blocks; ++b)
    for (unsigned t = 0; t < threads; ++t) {
      blockIdx.x = static_cast<unsigned>(b), threadIdx.x = t;
      kernel();
    }
}

template <int MAXD>
static void attention_grid(const float* q, const float* k, const float* v, const void* mask, float* out,
                           const int64_t* strides, int B, int H, int Hkv, int T, int S, int Dq, int Dv, float scale,
                           bool causal, int mask_kind) {
  kernels::Strides4 qs, ks, vs, ms;
  for (int d = 0; d < 4; ++d)
    qs.s[d] = strides[d], ks.s[d] = strides[4 + d], vs.s[d] = strides[8 + d], ms.s[d] = strides[12 + d];
  const unsigned threads = 128;  // as attention.cu's launch
  const int64_t rows = static_cast<int64_t>(B) * H * T;
  const int64_t blocks = (rows + threads - 1) / threads;
  if (mask_kind == 2) {
    over_grid(blocks, threads, [&] {
      kernels::attention_kernel<float, bool, MAXD>(q, k, v, static_cast<const bool*>(mask), out, qs, ks, vs, ms, B,
                                                   H, Hkv, T, S, Dq, Dv, scale, causal, true, true);
    });
  } else {
    over_grid(blocks, threads, [&] {
      kernels::attention_kernel<float, float, MAXD>(q, k, v, static_cast<const float*>(mask), out, qs, ks, vs, ms,
                                                    B, H, Hkv, T, S, Dq, Dv, scale, causal, mask_kind == 1, false);
    });
  }
}

extern "C" {

// strides: q, k, v, mask, four each (elements). mask_kind: 0 none, 1 additive float32, 2 boolean keep-mask.
// The width bound picks the template instance as attention.cu does (64, 128, 256).
int emulate_attention(const float* q, const float* k, const float* v, const void* mask, float* out,
                      const int64_t* strides, int B, int H, int Hkv, int T, int S, int Dq, int Dv, float scale,
                      int causal, int mask_kind) {
  const int width = std::max(Dq, Dv);
  if (width <= 64)
    attention_grid<64>(q, k, v, mask, out, strides, B, H, Hkv, T, S, Dq, Dv, scale, causal, mask_kind);
  else if (width <= 128)
    attention_grid<128>(q, k, v, mask, out, strides, B, H, Hkv, T, S, Dq, Dv, scale, causal, mask_kind);
  else if (width <= 256)
    attention_grid<256>(q, k, v, mask, out, strides, B, H, Hkv, T, S, Dq, Dv, scale, causal, mask_kind);
  else
    return 1;
  return 0;
}

// One product launch of rank_linear.cu: out (M, N) = x (M, K) times the factor's elements kk·s_k + n·s_n.
void emulate_product(const float* x, const void* w, const float* scale, const float* bias, float* out, int64_t M,
                     int64_t N, int64_t K, int64_t s_k, int64_t s_n, int64_t rowlen, int64_t bs, int format) {
  const unsigned threads = 256;  // as rank_linear.cu's product
  over_grid((M * N + threads - 1) / threads, threads, [&] {
    kernels::product_kernel<float, float>(x, w, scale, bias, out, M, N, K, s_k, s_n, rowlen, bs, format);
  });
}

}  // extern "C"
