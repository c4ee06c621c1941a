// CUDA kernel of adaptwin::rank_linear (schema and layouts: adaptwin/ops/rank_linear.py), CUDA key.
//
// Each product (x·Aᵀ, then h·B) is one launch in which every thread computes one output element and
// decodes the factor's codes it needs in registers (NF4: nibble -> code book in constant memory ->
// times the block's absmax; int8: code times its row / block scale). Weight element (kk, nn) of a
// product is flat element kk·s_k + nn·s_n of the direction-major factor. Exact and simple; the tiled
// GPU path is the Triton kernel (kernels/rank_linear.py). float32 accumulation; h is kept in float32.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <string>

#include "../rank_linear_checks.h"
#include "rank_linear_kernel.cuh"

namespace adaptwin {
namespace {

using namespace cuda_kernels;  // NOLINT: the kernel and its format codes

struct Factor {
  at::Tensor data, scale;
  int format = kFp;
  int64_t bs = 0, k = 0, n = 0;
};

Factor make_factor(const char* name, const at::Tensor& t, const std::optional<at::Tensor>& scale,
                   const std::string& fmt, int64_t bs, c10::SymIntArrayRef shape) {
  TORCH_CHECK_VALUE(shape.size() == 2, "rank_linear: ", name, "_shape must be (k, features), two sizes >= 0, got ",
                    shape.size(), " values");
  Factor f;
  f.k = shape[0].expect_int();
  f.n = shape[1].expect_int();
  f.bs = bs;
  check_rank_linear_factor(name, t, scale, fmt, bs, f.k, f.n);
  if (fmt == "fp") {
    f.data = t.to(at::kFloat).contiguous();
    return f;
  }
  f.format = fmt == "nf4" ? kNF4 : kInt8;
  f.data = t.contiguous();
  f.scale = scale->to(at::kFloat).contiguous();
  return f;
}

// x (M, K) float32 times the factor (Aᵀ when transposed) -> (M, N) in out_dtype.
at::Tensor product(const at::Tensor& x, const Factor& f, bool transposed, const std::optional<at::Tensor>& bias,
                   at::ScalarType out_dtype) {
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t N = transposed ? f.k : f.n;
  TORCH_CHECK_VALUE(K == (transposed ? f.n : f.k), "rank_linear: inner sizes do not match (", K, " vs ",
                    transposed ? f.n : f.k, ")");
  const int64_t s_k = transposed ? 1 : f.n, s_n = transposed ? f.n : 1;
  at::Tensor out = at::empty({M, N}, x.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  at::Tensor b32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const int threads = 256;
  const int64_t blocks = (M * N + threads - 1) / threads;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "adaptwin_rank_linear_cuda", [&] {
    product_kernel<float, scalar_t><<<blocks, threads, 0, stream>>>(
        x.data_ptr<float>(), f.data.data_ptr(), f.scale.defined() ? f.scale.data_ptr<float>() : nullptr,
        b32.defined() ? b32.data_ptr<float>() : nullptr, out.data_ptr<scalar_t>(), M, N, K, s_k, s_n, f.n,
        f.bs, f.format);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor rank_linear_cuda(const at::Tensor& x, const std::optional<at::Tensor>& a,
                            const std::optional<at::Tensor>& a_scale, c10::string_view a_format,
                            c10::SymInt a_blocksize, c10::SymIntArrayRef a_shape, const std::optional<at::Tensor>& b,
                            const std::optional<at::Tensor>& b_scale, c10::string_view b_format,
                            c10::SymInt b_blocksize, c10::SymIntArrayRef b_shape,
                            const std::optional<at::Tensor>& bias) {
  check_rank_linear_x(x, {&a, &a_scale, &b, &b_scale, &bias}, a.has_value(), b.has_value());
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t in = x.size(-1);
  int64_t width = in;
  Factor fa, fb;
  if (a.has_value()) {
    fa = make_factor("a", *a, a_scale, std::string(a_format), a_blocksize.expect_int(), a_shape);
    TORCH_CHECK_VALUE(fa.n == in, "rank_linear: x has ", in, " features, factor a expects ", fa.n);
    width = fa.k;
  }
  if (b.has_value()) {
    fb = make_factor("b", *b, b_scale, std::string(b_format), b_blocksize.expect_int(), b_shape);
    TORCH_CHECK_VALUE(fb.k == width, "rank_linear: factor b has rank ", fb.k, ", its input has ", width, " features");
    width = fb.n;
  }
  check_rank_linear_bias(bias, width);
  at::Tensor h = x.to(at::kFloat).reshape({-1, in}).contiguous();
  if (a.has_value()) h = product(h, fa, true, b.has_value() ? std::optional<at::Tensor>() : bias, at::kFloat);
  if (b.has_value()) h = product(h, fb, false, bias, at::kFloat);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = width;
  return h.reshape(shape).to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(adaptwin, CUDA, m) { m.impl("rank_linear", &rank_linear_cuda); }

}  // namespace adaptwin
