// adaptwin::rank_linear's input rules, shared by the CPU (csrc/cpu/rank_linear.cpp) and CUDA (csrc/cuda/rank_linear.cu)
// kernels; the same rules and messages as the reference's `_check` (adaptwin/ops/rank_linear.py). The kernels
// index packed codes and scales by the logical shape, so a factor's storage is checked against it here.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <optional>
#include <string>

namespace adaptwin {

inline void check_rank_linear_x(const at::Tensor& x, std::initializer_list<const std::optional<at::Tensor>*> others,
                                bool has_a, bool has_b) {
  TORCH_CHECK_VALUE(has_a || has_b, "rank_linear needs at least one factor (a or b)");
  for (const std::optional<at::Tensor>* t : others)
    TORCH_CHECK_VALUE(!t->has_value() || (*t)->device() == x.device(), "rank_linear: every tensor must be on x's device (",
                      x.device(), "), got one on ", (*t)->device());
  TORCH_CHECK_VALUE(x.dim() >= 1, "rank_linear: x must have a last dimension of features (..., in), got a 0-d tensor");
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()), "rank_linear: x must be floating, got ", x.scalar_type());
}

// A present factor: `format` one of fp / nf4 / int8, logical shape (k, n).
inline void check_rank_linear_factor(const char* name, const at::Tensor& w, const std::optional<at::Tensor>& scale,
                                     const std::string& format, int64_t blocksize, int64_t k, int64_t n) {
  TORCH_CHECK_VALUE(format == "fp" || format == "nf4" || format == "int8", "rank_linear: ", name,
                    "_format must be one of ('fp', 'nf4', 'int8'), got '", format, "'");
  TORCH_CHECK_VALUE(k >= 0 && n >= 0, "rank_linear: ", name, "_shape must be (k, features), two sizes >= 0, got [", k,
                    ", ", n, "]");
  if (format == "fp") {
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) == k && w.size(1) == n && at::isFloatingType(w.scalar_type()),
                      "rank_linear: fp factor ", name, " must be a floating (", k, ", ", n, ") matrix as ", name,
                      "_shape says, got ", w.scalar_type(), " ", w.sizes());
    return;
  }
  TORCH_CHECK_VALUE(scale.has_value(), "rank_linear: ", format, " factor ", name, " needs ", name, "_scale");
  TORCH_CHECK_VALUE(at::isFloatingType(scale->scalar_type()), "rank_linear: ", name, "_scale must be floating, got ",
                    scale->scalar_type());
  // the sizes below are computed in int64: a logical shape past 2^62 values would wrap them around
  TORCH_CHECK_VALUE(n == 0 || k <= (int64_t{1} << 62) / n, "rank_linear: ", name,
                    "_shape must hold at most 2^62 values, got [", k, ", ", n, "]");
  const int64_t numel = k * n;
  if (format == "nf4") {
    TORCH_CHECK_VALUE(blocksize >= 2 && blocksize % 2 == 0,
                      "rank_linear: NF4 blocksize must be an even whole number >= 2, got ", blocksize);
    TORCH_CHECK_VALUE(w.scalar_type() == at::kByte && w.dim() == 1 && w.numel() == (numel + 1) / 2,
                      "rank_linear: NF4 data must be uint8 of shape (", (numel + 1) / 2, ",) for ", numel,
                      " values, got ", w.scalar_type(), " ", w.sizes());
    const int64_t blocks = numel / blocksize + (numel % blocksize != 0);
    TORCH_CHECK_VALUE(scale->dim() == 1 && scale->numel() == blocks, "rank_linear: NF4 absmax must have shape (",
                      blocks, ",) for ", numel, " values in blocks of ", blocksize, ", got ", scale->sizes());
  } else {
    TORCH_CHECK_VALUE(blocksize >= 0, "rank_linear: int8 blocksize must be 0 (per row) or > 0, got ", blocksize);
    TORCH_CHECK_VALUE(w.scalar_type() == at::kChar && w.dim() == 2 && w.size(0) == k && w.size(1) == n,
                      "rank_linear: int8 data must be int8 of shape (", k, ", ", n, "), got ", w.scalar_type(), " ",
                      w.sizes());
    const int64_t groups = blocksize == 0 ? k : numel / blocksize + (numel % blocksize != 0);
    TORCH_CHECK_VALUE(scale->dim() == 1 && scale->numel() == groups, "rank_linear: int8 scale must have shape (", groups,
                      ",), got ", scale->sizes());
  }
}

inline void check_rank_linear_bias(const std::optional<at::Tensor>& bias, int64_t width) {
  if (!bias.has_value()) return;
  TORCH_CHECK_VALUE(at::isFloatingType(bias->scalar_type()) && bias->dim() == 1 && bias->size(0) == width,
                    "rank_linear: bias must be a floating (", width, ",) vector (the output's width), got ",
                    bias->scalar_type(), " ", bias->sizes());
}

}  // namespace adaptwin
