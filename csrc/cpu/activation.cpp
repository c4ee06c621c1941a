// `adaptwin._C.gelu_(y)`: the exact GELU in place on a small CPU tensor (gelu.h), the fast path of
// adaptwin.ops.activation.activate for batch-1 FFN outputs. ATen's gelu_ builds a oneDNN eltwise primitive
// descriptor on each call (gelu.h says what that costs); this runs the arithmetic alone.
//
// It answers NotImplemented, and the caller takes aten.gelu_, for anything but a plain, contiguous,
// strided float32 / bfloat16 CPU tensor of at most kGeluMaxElems elements on a CPU with a SIMD path: a
// Tensor subclass other than Parameter, a tensor under a functorch transform or functionalization, one with
// the lazy negation bit, a gradient to record, an active __torch_function__ or dispatch mode (which would
// expect to see an aten call), or an inference tensor outside inference mode (aten raises that error).
// Like aten's in-place ops it bumps the tensor's version counter (inference tensors have none).
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <Python.h>

#include "gelu.h"
#include "python_args.h"

namespace adaptwin {

namespace {

// Above this many elements ATen's gelu_ (oneDNN, on all threads) is left the call: its fixed cost is then
// small beside the arithmetic. On the 2-core Zen 4 (2 threads, medians, float32, AVX-512): 1536 elements 0.72
// against 9.5 us, 16384 7.4 against 13.3, 65536 28.6 against 24.5 (this loop runs on one thread).
constexpr int64_t kGeluMaxElems = 1 << 15;

bool plain_dense(const at::Tensor& t) {
  static const c10::DispatchKeySet wrapped({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                                            c10::DispatchKey::Functionalize, c10::DispatchKey::FuncTorchBatched,
                                            c10::DispatchKey::BatchedNestedTensor,
                                            c10::DispatchKey::FuncTorchGradWrapper, c10::DispatchKey::Negative,
                                            c10::DispatchKey::Conjugate, c10::DispatchKey::ZeroTensor});
  return t.device().is_cpu() && t.layout() == at::kStrided && !t.key_set().has_any(wrapped) && t.has_storage() &&
         t.is_contiguous();
}

}  // namespace

PyObject* gelu_inplace_entry(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 1 || at::impl::torch_function_mode_enabled() || c10::impl::TorchDispatchModeTLS::any_modes_set())
    return not_implemented();
  const at::Tensor* y;
  if (!read_tensor(args[0], &y)) return not_implemented();
  const at::Tensor& t = *y;
  const auto dtype = t.scalar_type();
  if ((dtype != at::kFloat && dtype != at::kBFloat16) || t.numel() > kGeluMaxElems || !plain_dense(t) ||
      (at::GradMode::is_enabled() && t.requires_grad()))
    return not_implemented();
  const bool inference = t.is_inference();
  if (inference && !c10::InferenceMode::is_enabled()) return not_implemented();
  if (t.numel() > 0 && !gelu_inplace(t.data_ptr(), t.numel(), dtype == at::kBFloat16)) return not_implemented();
  if (!inference) t.unsafeGetTensorImpl()->bump_version();
  Py_INCREF(args[0]);
  return args[0];
  END_HANDLE_TH_ERRORS
}

}  // namespace adaptwin
