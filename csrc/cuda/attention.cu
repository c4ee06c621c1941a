// CUDA kernel of adaptwin::attention (schema: adaptwin/ops/attention.py), registered for the CUDA key.
//
// Simple and exact rather than tuned: one thread per query row walks the keys with an online softmax
// (running max, running sum, rescaled accumulator in registers), so no T×S matrix is stored. Widths up
// to 256 (template bound MAXD; rank-space heads are 20-64 wide). The tuned GPU path is the Triton
// kernel (kernels/attention.py), used when this library is built without CUDA. float32 accumulation.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>

#include "../attention_checks.h"
#include "attention_kernel.cuh"

namespace adaptwin {
namespace {

using cuda_kernels::Strides4;
using cuda_kernels::attention_kernel;

Strides4 strides(const at::Tensor& t) {
  Strides4 s;
  for (int d = 0; d < 4; ++d) s.s[d] = t.stride(d);
  return s;
}

template <typename scalar_t, int MAXD>
void launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& m, bool has_mask,
            at::Tensor& out, double scale, bool causal) {
  const int B = q.size(0), H = q.size(1), T = q.size(2), Dq = q.size(3);
  const int Hkv = k.size(1), S = k.size(2), Dv = v.size(3);
  const int64_t rows = static_cast<int64_t>(B) * H * T;
  const int threads = 128;
  const dim3 grid((rows + threads - 1) / threads);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const Strides4 ms = has_mask ? strides(m) : Strides4{{0, 0, 0, 0}};
  if (has_mask && m.scalar_type() == at::kBool) {
    attention_kernel<scalar_t, bool, MAXD><<<grid, threads, 0, stream>>>(
        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), m.data_ptr<bool>(),
        out.data_ptr<scalar_t>(), strides(q), strides(k), strides(v), ms, B, H, Hkv, T, S, Dq, Dv,
        static_cast<float>(scale), causal, true, true);
  } else {
    const float* mp = has_mask ? m.data_ptr<float>() : nullptr;
    attention_kernel<scalar_t, float, MAXD><<<grid, threads, 0, stream>>>(
        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), mp, out.data_ptr<scalar_t>(),
        strides(q), strides(k), strides(v), ms, B, H, Hkv, T, S, Dq, Dv, static_cast<float>(scale), causal,
        has_mask, false);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& mask, double scale, bool is_causal) {
  check_attention(q, k, v, mask, scale);
  const int64_t width = std::max(q.size(3), v.size(3));
  TORCH_CHECK_VALUE(width <= 256, "attention (CUDA C++ kernel): head widths up to 256, got ", width);
  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({q.size(0), q.size(2), q.size(1), v.size(3)}, q.options());
  if (out.numel() == 0) return out;
  at::Tensor m;
  const bool has_mask = mask.has_value();
  if (has_mask) {
    m = mask->scalar_type() == at::kBool ? *mask : mask->to(at::kFloat);
    m = m.expand({q.size(0), q.size(1), q.size(2), k.size(2)});
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "adaptwin_attention_cuda", [&] {
    const at::Tensor kk = k.to(q.scalar_type()), vv = v.to(q.scalar_type());
    if (width <= 64)
      launch<scalar_t, 64>(q, kk, vv, m, has_mask, out, scale, is_causal);
    else if (width <= 128)
      launch<scalar_t, 128>(q, kk, vv, m, has_mask, out, scale, is_causal);
    else
      launch<scalar_t, 256>(q, kk, vv, m, has_mask, out, scale, is_causal);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(adaptwin, CUDA, m) { m.impl("attention", &attention_cuda); }

}  // namespace adaptwin
