// CPU kernel of adaptwin::rank_linear (schema and layouts: adaptwin/ops/rank_linear.py).
//
// y = (x·Aᵀ)·B + bias with A (k, in) and B (k, out) stored "fp", "nf4" or "int8", direction-major.
// * Decode path (at most kGemvRows rows of x, e.g. batch-1 decoding, or kFusedMaxRows with NF4 / int8
//   factors the fused AVX-512 kernels take, 8 rows per decode of the codes: beam search, batched
//   decoding, short prompts; on CPUs with AVX2 but no AVX-512, one row with the factors rank_linear_avx2.h
//   takes): the packed factors are read once
//   and decoded chunk by chunk into an L1 buffer (512 floats) that is consumed at once, or in registers; h = x·Aᵀ
//   ((rows, k) floats) stays in cache between the two products and no fp32 copy of a factor is made.
//   This is memory-bound: an NF4 factor is 1/8 of its fp32 bytes.
// * Batched path: each quantised factor is dequantised once to fp32 (parallel over directions) and the
//   two products run as ATen GEMMs; the dequantisation is O(k·n) against the GEMMs' O(rows·k·n).
// Arithmetic is float32 (x upcast, the result cast to x's dtype), except for float64 x and batched bf16 x,
// whose GEMMs run in x's dtype (bf16: AVX512-BF16 GEMMs, about 4x float32's here).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/accumulate.h>
#include <c10/util/safe_numerics.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_features.h"

#include "../rank_linear_checks.h"
#include "rank_linear_decode.h"
#include "rank_linear_fused.h"
#include "rank_linear_products.h"

namespace adaptwin {
namespace {

// The whole factor decoded into float32 rows of dst: row r of the factor into dst row (r / group)·stride +
// r % group (group = k, stride = k: in order; a compressed module's heads interleave their spectral rows
// with fp LoRA ones).
void dequantize_into(const Factor& f, float* dst, int64_t group, int64_t stride) {
  at::parallel_for(0, f.k, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(f.n, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* row = dst + ((r / group) * stride + r % group) * f.n;
      for (int64_t c = 0; c < f.n; c += kChunk) {
        const int64_t len = std::min(kChunk, f.n - c);
        float* d = row + c;
        const float* w = row_chunk(f, r, c, len, d);
        if (w != d) std::copy(w, w + len, d);
      }
    }
  });
}

// The whole factor as a float32 (k, n) tensor.
at::Tensor dequantize(const Factor& f) {
  auto out = at::empty({f.k, f.n}, at::kFloat);
  dequantize_into(f, out.data_ptr<float>(), std::max<int64_t>(f.k, 1), std::max<int64_t>(f.k, 1));
  return out;
}

Factor make_factor(const char* name, const std::optional<at::Tensor>& t, const std::optional<at::Tensor>& scale,
                   c10::string_view format_name, int64_t blocksize, c10::SymIntArrayRef shape_sym) {
  Factor f;
  const bool fp = format_name == "fp", nf4 = format_name == "nf4";
  TORCH_CHECK_VALUE(shape_sym.size() == 2, "rank_linear: ", name, "_shape must be (k, features), two sizes >= 0, got ",
              shape_sym.size(), " values");
  f.blocksize = blocksize;
  f.k = shape_sym[0].expect_int();
  f.n = shape_sym[1].expect_int();
  const at::Tensor& w = *t;
  check_rank_linear_factor(name, w, scale, std::string(format_name), blocksize, f.k, f.n);
  f.format = fp ? Format::kFp : nf4 ? Format::kNf4 : Format::kInt8;
  TORCH_CHECK_VALUE(w.device().is_cpu(), "rank_linear (CPU kernel): factor ", name, " is on ", w.device());
  if (f.format == Format::kFp) {
    f.keep = w;  // used through ATen GEMMs only, converted to the compute dtype there
    return f;
  }
  // (the checks below skip a dispatcher call each on the common path: a batch-1 call is a few microseconds)
  f.keep = w.is_contiguous() ? w : w.contiguous();
  f.data = f.keep.data_ptr();
  f.keep_scale = as_float(*scale);
  f.scale = f.keep_scale.data_ptr<float>();
  return f;
}

// f itself, or for an fp factor (float32, bf16 or fp16) `local`: f with `data` pointing at float32 values,
// its own or converted into buf, or at its own bfloat16 values, which row_chunk widens a chunk at a time: a
// 51865 x 384 bf16 output head took 9.1 ms a row converted whole first (an 80 MB float32 copy per call)
// against 2.4 ms for oneDNN's GEMV. (Quantised factors are not copied: a call is a few microseconds.)
const Factor* with_values(const Factor* f, Factor& local, std::vector<float>& buf) {
  if (f == nullptr || f->format != Format::kFp) return f;
  local = *f;
  local.keep = f->keep.is_contiguous() ? f->keep : f->keep.contiguous();
  if (local.keep.scalar_type() == at::kBFloat16) {
    local.data = local.keep.data_ptr();
    local.bf16 = true;
  } else {
    local.data = float_values(local.keep, buf);
  }
  return &local;
}

// Decoding (a few rows of x, float32, bf16 or fp16), each factor quantised or fp: the whole op as raw loops
// over one output allocation, in float32 (16-bit x, factors and bias widened, the result rounded once to
// x's dtype). At d = 64..768 a call is a few microseconds, so each ATen call saved (reshape, expand + copy
// of the bias, casts) is a measurable share of it: with ATen casts, bf16 calls took 12.4 us against
// float32's 8.1 at d = 384 (rank 96). fp factors are the small LoRA directions that quantised modules keep
// in higher precision; through at::mm a 1x384 · 384x48 product took 9 us in a Whisper decoding step.
at::Tensor gemv_path(const at::Tensor& x, const Factor* fa_in, const Factor* fb_in,
                     const std::optional<at::Tensor>& bias, int64_t width) {
  thread_local std::vector<float> abuf, bbuf_f;
  Factor fa_fp, fb_fp;
  const Factor* fa = with_values(fa_in, fa_fp, abuf);
  const Factor* fb = with_values(fb_in, fb_fp, bbuf_f);
  const int64_t in = x.size(-1);
  const int64_t rows = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);  // in may be 0
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = width;
  at::Tensor out = at::empty(shape, x.options());
  thread_local std::vector<float> xbuf, ybuf, hbuf, bbuf;
  // x itself where it is contiguous, not a copy: x is usually a tensor only Python holds, and a second
  // reference to it taken here (the GIL released) would incref and later decref its PyObject, each taking the
  // GIL (0.12 us of a 384-wide NF4 call's 4.6 from Python)
  at::Tensor xcopy;
  const at::Tensor& xc = x.is_contiguous() ? x : (xcopy = x.contiguous());
  const float* xf = float_values(xc, xbuf);
  float* y = out.scalar_type() == at::kFloat ? out.data_ptr<float>() : nullptr;
  if (y == nullptr) {
    ybuf.resize(static_cast<size_t>(rows * width));
    y = ybuf.data();
  }
  float* h = y;  // without b, h is the output itself
  if (fa != nullptr && fb != nullptr) {
    hbuf.resize(static_cast<size_t>(rows * fa->k));
    h = hbuf.data();
  }
  // a strided bias is copied into biascopy, which must outlive bp (a float32 bias's values are read in place:
  // float_values of a temporary copy would point into freed memory)
  at::Tensor biascopy;
  const float* bp = nullptr;
  if (bias.has_value()) bp = float_values(bias->is_contiguous() ? *bias : (biascopy = bias->contiguous()), bbuf);
  if (fb == nullptr) {
    gemv_in(*fa, xf, rows, h);
    if (bp != nullptr)
      for (int64_t m = 0; m < rows; ++m)
        for (int64_t c = 0; c < width; ++c) y[m * width + c] += bp[c];
  } else {
    for (int64_t m = 0; m < rows; ++m) {  // y starts from the bias; the (last) product accumulates into it
      if (bp != nullptr)
        std::copy(bp, bp + width, y + m * width);
      else
        std::fill(y + m * width, y + (m + 1) * width, 0.0f);
    }
    if (fa == nullptr) {
      gemv_out(*fb, xf, rows, y);
    } else if (!gemv_both(*fa, *fb, xf, rows, h, y)) {
      gemv_in(*fa, xf, rows, h);
      gemv_out(*fb, h, rows, y);
    }
  }
  const int64_t n = rows * width;
  if (out.scalar_type() == at::kBFloat16) {
    narrow_bf16(y, reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), n);
  } else if (out.scalar_type() == at::kHalf) {
    at::Half* dst = out.data_ptr<at::Half>();
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<at::Half>(y[i]);
  }
  return out;
}

at::Tensor rank_linear_cpu(const at::Tensor& x, const std::optional<at::Tensor>& a,
                           const std::optional<at::Tensor>& a_scale, c10::string_view a_format, c10::SymInt a_blocksize,
                           c10::SymIntArrayRef a_shape, const std::optional<at::Tensor>& b,
                           const std::optional<at::Tensor>& b_scale, c10::string_view b_format, c10::SymInt b_blocksize,
                           c10::SymIntArrayRef b_shape, const std::optional<at::Tensor>& bias) {
  check_rank_linear_x(x, {&a, &a_scale, &b, &b_scale, &bias}, a.has_value(), b.has_value());
  const int64_t in = x.size(-1);
  const int64_t rows = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);  // in may be 0
  int64_t width = in;
  Factor fa, fb;
  if (a.has_value()) {
    fa = make_factor("a", a, a_scale, a_format, a_blocksize.expect_int(), a_shape);
    TORCH_CHECK_VALUE(fa.n == in, "rank_linear: x has ", in, " features, factor a expects ", fa.n);
    width = fa.k;
  }
  if (b.has_value()) {
    fb = make_factor("b", b, b_scale, b_format, b_blocksize.expect_int(), b_shape);
    TORCH_CHECK_VALUE(fb.k == width, "rank_linear: factor b has rank ", fb.k, ", its input has ", width, " features");
    width = fb.n;
  }
  check_rank_linear_bias(bias, width);
  const bool gemv = rows <= kGemvRows ||
                    (rows <= (x.scalar_type() == at::kBFloat16 ? kFusedMaxRowsBf16 : kFusedMaxRows) &&
                     fused_all(a.has_value() ? &fa : nullptr, b.has_value() ? &fb : nullptr));
  // float64, and bf16 with more rows than the decode path: factors dequantised in float32 and cast to x's
  // dtype, products as ATen GEMMs in that dtype, h rounded to it, as the reference computes them. In bf16
  // those are oneDNN's AVX512-BF16 GEMMs: the two products of 1500 x 384 -> 1536 at rank 64 took 0.92 ms
  // against 3.65 ms in float32 (2 threads). fp16 stays in float32: CPU fp16 GEMMs took 117 ms there.
  if (x.scalar_type() == at::kDouble || (x.scalar_type() == at::kBFloat16 && !gemv)) {
    const at::ScalarType ct = x.scalar_type();
    auto full = [ct](const Factor& f) { return (f.format == Format::kFp ? f.keep : dequantize(f)).to(ct); };
    at::Tensor y = x.reshape({rows, in});
    if (a.has_value()) {
      const at::Tensor w = full(fa).t();
      y = bias.has_value() && !b.has_value() ? at::addmm(bias->to(ct), y, w) : at::mm(y, w);
    }
    if (b.has_value()) y = bias.has_value() ? at::addmm(bias->to(ct), y, full(fb)) : at::mm(y, full(fb));
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = width;
    return y.reshape(shape);  // a fresh tensor: every path above runs at least one GEMM
  }
  auto widened = [](at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; };
  if (gemv && rows > 0 && (a.has_value() || b.has_value()) && widened(x.scalar_type()) &&
      (!bias.has_value() || widened(bias->scalar_type())) &&
      (!a.has_value() || fa.format != Format::kFp || widened(fa.keep.scalar_type())) &&
      (!b.has_value() || fb.format != Format::kFp || widened(fb.keep.scalar_type()))) {
    return gemv_path(x, a.has_value() ? &fa : nullptr, b.has_value() ? &fb : nullptr, bias, width);
  }
  const at::Tensor x32 = x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous()
                             ? x
                             : x.to(at::kFloat).reshape({rows, in}).contiguous();

  at::Tensor h = x32;  // (rows, k)
  if (a.has_value()) {
    if (fa.format == Format::kFp) {
      h = at::mm(x32, fa.keep.to(at::kFloat).t());
    } else if (gemv) {
      h = at::empty({rows, fa.k}, at::kFloat);
      gemv_in(fa, x32.data_ptr<float>(), rows, h.data_ptr<float>());
    } else {
      h = at::mm(x32, dequantize(fa).t());
    }
  }
  at::Tensor y = h;  // (rows, out)
  bool bias_done = false;
  if (b.has_value()) {
    if (fb.format == Format::kFp) {
      y = at::mm(h, fb.keep.to(at::kFloat));
    } else if (gemv) {
      // start from the bias (saves a pass over y); the final add below is then skipped
      // (a fresh tensor: with one row, expand().contiguous() would alias the caller's bias)
      y = at::empty({rows, fb.n}, at::kFloat);
      if (bias.has_value())
        y.copy_(bias->reshape({1, fb.n}).expand({rows, fb.n}));
      else
        y.zero_();
      gemv_out(fb, h.data_ptr<float>(), rows, y.data_ptr<float>());
      bias_done = bias.has_value();
    } else {
      y = at::mm(h, dequantize(fb));
    }
  }
  if (bias.has_value() && !bias_done) y = y + bias->to(at::kFloat);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = width;
  at::Tensor out = y.reshape(shape).to(x.scalar_type());
  // never alias x (a lone identity-like call must still return a fresh tensor, as the op promises)
  return out.is_same(x) || out.data_ptr() == x.data_ptr() ? out.clone() : out;
}

}  // namespace

// The (k, n) float32 matrix one rank_linear factor stores, decoded by the kernels' own loops (for the
// compressed modules' batched CPU calls, which decode a factor once and multiply it with ATen GEMMs).
// Checked as the op checks a factor (same errors).
// With `out` (a contiguous float32 tensor of (k / group)·stride·n elements or more), the rows go into out
// as dequantize_into places them, and out is returned.
at::Tensor dequantize_factor(const at::Tensor& data, const std::optional<at::Tensor>& scale, c10::string_view format,
                             int64_t blocksize, c10::SymIntArrayRef shape, const std::optional<at::Tensor>& out,
                             int64_t group, int64_t stride) {
  const Factor f = make_factor("factor", data, scale, format, blocksize, shape);
  if (!out.has_value()) return f.format == Format::kFp ? f.keep.to(at::kFloat) : dequantize(f);
  TORCH_CHECK_VALUE(group >= 1 && stride >= group && f.k % group == 0, "dequantize: group must be >= 1 and divide ",
                    f.k, " rows, stride >= group; got group ", group, ", stride ", stride);
  // (k / group)·stride·n in int64 without wrapping around: a stride near 2^63 would otherwise pass the size check
  // and write rows far outside out
  int64_t need = 0;
  TORCH_CHECK_VALUE(!c10::mul_overflows(f.k / group, stride, &need) && !c10::mul_overflows(need, f.n, &need),
                    "dequantize: (k / group)·stride·n overflows int64: k ", f.k, ", group ", group, ", stride ", stride,
                    ", n ", f.n);
  TORCH_CHECK_VALUE(out->scalar_type() == at::kFloat && out->is_contiguous() && out->device().is_cpu() &&
                        out->numel() >= need,
                    "dequantize: out must be a contiguous float32 CPU tensor of at least ", need, " elements");
  if (f.format == Format::kFp) {
    out->view({-1})
        .narrow(0, 0, need)
        .view({f.k / group, stride, f.n})
        .narrow(1, 0, group)
        .copy_(f.keep.reshape({f.k / group, group, f.n}));
  } else {
    dequantize_into(f, out->data_ptr<float>(), group, stride);
  }
  return *out;
}

TORCH_LIBRARY_IMPL(adaptwin, CPU, m) { m.impl("rank_linear", &rank_linear_cpu); }

}  // namespace adaptwin
