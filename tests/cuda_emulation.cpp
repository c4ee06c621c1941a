// The CUDA C++ backend's device code (csrc/cuda/*_kernel.cuh), compiled for the CPU and run over the launch
// grid its launchers use, one emulated thread at a time (tests/test_cuda_emulation.py builds and loads this
// with ctypes). Valid for these kernels because they use no shared memory, barriers, warp functions or
// atomics: each thread's output depends on blockIdx, blockDim and threadIdx only. Attention runs in the
// three dtypes attention.cu dispatches (c10::Half / c10::BFloat16 are the same host types the CUDA build
// converts with; header-only here), the products in float32 as rank_linear.cu launches them.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

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

template <typename scalar_t, int MAXD>
static void attention_grid(const scalar_t* q, const scalar_t* k, const scalar_t* v, const void* mask, scalar_t* out,
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
      kernels::attention_kernel<scalar_t, bool, MAXD>(q, k, v, static_cast<const bool*>(mask), out, qs, ks, vs, ms, B,
                                                   H, Hkv, T, S, Dq, Dv, scale, causal, true, true);
    });
  } else {
    over_grid(blocks, threads, [&] {
      kernels::attention_kernel<scalar_t, float, MAXD>(q, k, v, static_cast<const float*>(mask), out, qs, ks, vs, ms,
                                                    B, H, Hkv, T, S, Dq, Dv, scale, causal, mask_kind == 1, false);
    });
  }
}

template <typename scalar_t>
static int attention_dtype(const void* q, const void* k, const void* v, const void* mask, void* out,
                           const int64_t* strides, int B, int H, int Hkv, int T, int S, int Dq, int Dv, float scale,
                           int causal, int mask_kind) {
  const auto* qs = static_cast<const scalar_t*>(q);
  const auto* ks = static_cast<const scalar_t*>(k);
  const auto* vs = static_cast<const scalar_t*>(v);
  auto* os = static_cast<scalar_t*>(out);
  const int width = std::max(Dq, Dv);  // the template instance, as attention.cu picks it
  if (width <= 64)
    attention_grid<scalar_t, 64>(qs, ks, vs, mask, os, strides, B, H, Hkv, T, S, Dq, Dv, scale, causal, mask_kind);
  else if (width <= 128)
    attention_grid<scalar_t, 128>(qs, ks, vs, mask, os, strides, B, H, Hkv, T, S, Dq, Dv, scale, causal, mask_kind);
  else if (width <= 256)
    attention_grid<scalar_t, 256>(qs, ks, vs, mask, os, strides, B, H, Hkv, T, S, Dq, Dv, scale, causal, mask_kind);
  else
    return 1;
  return 0;
}

extern "C" {

// q, k, v, out in one dtype (0 float32, 1 float16, 2 bfloat16); strides: q, k, v, mask, four each (elements).
// mask_kind: 0 none, 1 additive float32, 2 boolean keep-mask. Returns 1 for widths over 256.
int emulate_attention(const void* q, const void* k, const void* v, const void* mask, void* out,
                      const int64_t* strides, int B, int H, int Hkv, int T, int S, int Dq, int Dv, float scale,
                      int causal, int mask_kind, int dtype) {
  switch (dtype) {
    case 1:
      return attention_dtype<c10::Half>(q, k, v, mask, out, strides, B, H, Hkv, T, S, Dq, Dv, scale, causal, mask_kind);
    case 2:
      return attention_dtype<c10::BFloat16>(q, k, v, mask, out, strides, B, H, Hkv, T, S, Dq, Dv, scale, causal,
                                            mask_kind);
    default:
      return attention_dtype<float>(q, k, v, mask, out, strides, B, H, Hkv, T, S, Dq, Dv, scale, causal, mask_kind);
  }
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
