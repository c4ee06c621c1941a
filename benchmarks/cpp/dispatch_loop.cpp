// Timing loops in C++ for benchmarks/rank_linear_speed.py --cpp-loop: n calls of adaptwin::rank_linear
// through the C++ dispatcher (what a libtorch or AOTInductor deployment pays per call, with no Python
// argument conversion) and n calls of at::linear, each returning the mean seconds per call. Built on demand
// with torch.utils.cpp_extension; registers no ops (the benchmark process also loads adaptwin._C).
#include <torch/extension.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <chrono>
#include <string>
#include <vector>

namespace {

using OptTensor = std::optional<at::Tensor>;
using RankLinear = at::Tensor(const at::Tensor&, const OptTensor&, const OptTensor&, c10::string_view, c10::SymInt,
                              c10::SymIntArrayRef, const OptTensor&, const OptTensor&, c10::string_view, c10::SymInt,
                              c10::SymIntArrayRef, const OptTensor&);

template <typename F>
double seconds_per_call(F&& call, int64_t n) {
  c10::InferenceMode guard;
  for (int64_t i = 0; i < std::min<int64_t>(n, 100); ++i) call();  // warm-up
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < n; ++i) call();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / static_cast<double>(n);
}

double rank_linear_loop(const at::Tensor& x, const OptTensor& a, const OptTensor& a_scale, const std::string& a_format,
                        int64_t a_blocksize, const std::vector<int64_t>& a_shape, const OptTensor& b,
                        const OptTensor& b_scale, const std::string& b_format, int64_t b_blocksize,
                        const std::vector<int64_t>& b_shape, const OptTensor& bias, int64_t n) {
  TORCH_CHECK_VALUE(n > 0, "rank_linear_loop: n must be > 0, got ", n);
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("adaptwin::rank_linear", "").typed<RankLinear>();
  const std::vector<c10::SymInt> sa(a_shape.begin(), a_shape.end()), sb(b_shape.begin(), b_shape.end());
  return seconds_per_call([&] {
    return op.call(x, a, a_scale, a_format, c10::SymInt(a_blocksize), sa, b, b_scale, b_format, c10::SymInt(b_blocksize),
                   sb, bias);
  }, n);
}

double linear_loop(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, int64_t n) {
  TORCH_CHECK_VALUE(n > 0, "linear_loop: n must be > 0, got ", n);
  return seconds_per_call([&] { return at::linear(x, weight, bias); }, n);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rank_linear_loop", &rank_linear_loop);
  m.def("linear_loop", &linear_loop);
}
