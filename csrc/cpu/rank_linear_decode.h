// Factor storage for the CPU kernel of adaptwin::rank_linear (included by rank_linear.cpp only): the Factor
// (codes.h's Codes with the tensors that own them), float32 views of tensors, and the decode path's sizes.
// The decoding itself is in codes.h, dot / axpy in dot_axpy.h. Layouts: adaptwin/ops/rank_linear.py.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <string>
#include <vector>

#include "bf16.h"
#include "codes.h"
#include "dot_axpy.h"
#include "cpu_features.h"

namespace adaptwin {
namespace {


constexpr int64_t kGemvRows = 8;   // rows of x up to which the decode path runs
constexpr int64_t kChunk = 512;    // floats decoded at a time (2 KiB, stays in L1)
// Factor elements per parallel task. One thread decodes and FMAs ~20 G NF4 elements/s in the fused
// batch-1 path (768x192 factor: 7.3 us), so a task of 64k elements is ~3 us, about what waking a second
// (spinning) OpenMP thread costs; below that one thread runs alone. 16k-element tasks were tried: timed
// the same way (benchmarks/rank_linear_speed.py --cpp-loop, two runs each) they made no difference beyond
// the noise (d = 768: 9.93 / 9.70 us a call with 64k, 9.96 / 10.74 with 16k). On a loaded machine a
// 2-thread region can wait 12-16 ms for a core (measured at load 8): run with torch.set_num_threads(1) there.
constexpr int64_t kGrainElems = 1 << 16;

// Codes (codes.h) with the tensors that own them (fp factors: `keep` only, `data` set where values are read).
struct Factor : Codes {
  at::Tensor keep;  // owns converted storage
  at::Tensor keep_scale;
};

// --- float32 views of tensors -------------------------------------------------------------------------

// t as a contiguous float32 tensor: t itself when it already is one.
at::Tensor as_float(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat && t.is_contiguous() ? t : t.to(at::kFloat).contiguous();
}

// float32 values of a contiguous float32 / bf16 / fp16 tensor: its own data, or converted into buf (a loop, not
// an ATen cast: a batch-1 call is a few microseconds, and each ATen call costs about one).
const float* float_values(const at::Tensor& t, std::vector<float>& buf) {
  if (t.scalar_type() == at::kFloat) return t.data_ptr<float>();
  buf.resize(static_cast<size_t>(t.numel()));
  if (t.scalar_type() == at::kBFloat16) {
    widen_bf16(reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()), buf.data(), t.numel());
  } else {
    TORCH_CHECK(t.scalar_type() == at::kHalf, "rank_linear: float32, bf16 or fp16 expected, got ", t.scalar_type());
    const at::Half* src = t.data_ptr<at::Half>();
    for (int64_t i = 0; i < t.numel(); ++i) buf[i] = static_cast<float>(src[i]);
  }
  return buf.data();
}

}  // namespace
}  // namespace adaptwin
