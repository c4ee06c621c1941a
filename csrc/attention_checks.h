// adaptwin::attention's input rules, shared by the CPU (csrc/cpu/attention.cpp) and CUDA (csrc/cuda/attention.cu)
// kernels; the same rules as the reference's `_check_attention` (adaptwin/ops/attention.py), with the same
// messages, so every backend refuses the same calls as ValueError.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

namespace adaptwin {

inline void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention: q, k, v must be 4-D (B, H, T|S, D), got ",
                    q.dim(), ", ", k.dim(), ", ", v.dim(), " dims");
  TORCH_CHECK_VALUE(at::isFloatingType(q.scalar_type()),
                    "attention: q must be floating (float32, float64, float16 or bfloat16), got ", q.scalar_type());
  const bool one_device = k.device() == q.device() && v.device() == q.device() &&
                          (!mask.has_value() || mask->device() == q.device());
  TORCH_CHECK_VALUE(one_device, "attention: q, k, v and mask must be on one device, got ", q.device(), ", ", k.device(),
                    ", ", v.device(), mask.has_value() ? ", " : "", mask.has_value() ? mask->device().str() : "");
  TORCH_CHECK_VALUE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                    "attention: q, k and v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
                    v.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK_VALUE(k.size(0) == B && v.size(0) == B && k.size(3) == q.size(3) && v.size(1) == Hkv && v.size(2) == S,
                    "attention: shapes do not match: q ", q.sizes(), " (B, H, T, Dq), k ", k.sizes(), " (B, Hkv, S, Dq), v ",
                    v.sizes(), " (B, Hkv, S, Dv)");
  TORCH_CHECK_VALUE(Hkv > 0 && H % Hkv == 0, "attention: query heads (", H, ") must be a multiple of key heads (", Hkv,
                    ")");
  if (mask.has_value()) {
    TORCH_CHECK_VALUE(mask->scalar_type() == at::kBool || at::isFloatingType(mask->scalar_type()),
                      "attention: mask must be bool (True = attend) or floating (added to the scores), got ",
                      mask->scalar_type());
    const int64_t target[4] = {B, H, T, S};
    bool fits = mask->dim() <= 4;
    for (int64_t d = 1; fits && d <= mask->dim(); ++d) {
      const int64_t m = mask->size(-d);
      fits = m == 1 || m == target[4 - d];
    }
    TORCH_CHECK_VALUE(fits, "attention: mask of shape ", mask->sizes(), " does not broadcast to (B, H, T, S) = (", B,
                      ", ", H, ", ", T, ", ", S, ")");
  }
  TORCH_CHECK_VALUE(std::isfinite(scale), "attention: scale must be a finite number, got ", scale);
}

}  // namespace adaptwin
