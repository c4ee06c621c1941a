// Fast Python entry points of the two ops for CPU inference calls: `adaptwin._C.call_rank_linear(...)` and
// `adaptwin._C.call_attention(...)` take the op's arguments positionally (`call_rank_linear_kept`: a packed
// module's kept call, its sources checked here first) and call it through the C++
// dispatcher below the autograd keys, the GIL released (the dispatcher still picks the kernel, and
// dispatch modes still see the call). They exist because `torch.ops`
// converts arguments for any schema (a stack of IValues, a __torch_function__ scan of each one) and a
// custom op's Python autograd kernel runs even under no_grad: for a 12-argument rank_linear call that
// took 4.8 us of a batch-1 NF4 call at d = 384 (8.1 us, against 13.6 us for the dense F.linear).
//
// They answer NotImplemented, and the caller takes the `torch.ops` path, for anything not plainly an
// inference call on plain CPU tensors: a tensor on another device (on CUDA the Triton kernels are Python
// functions, which a C++ call would reach through a second argument conversion; that path is also not
// one a CPU-only machine can test), a gradient to record (grad mode on and an argument requiring grad),
// a Tensor subclass other than Parameter (it may override __torch_function__), an active
// __torch_function__ mode, or an argument of another Python type than the schema's (so errors are
// raised by the op's own checks). Dispatch modes (TorchDispatchMode, FakeTensorMode) act in the
// dispatcher and see these calls as any other.
//
// The readers they share: python_args.h; the kept call's entry points: kept_calls.cpp.
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <array>
#include <optional>

#include <Python.h>

#include "cpu_features.h"
#include "python_args.h"

namespace adaptwin {

at::Tensor dequantize_factor(const at::Tensor& data, const std::optional<at::Tensor>& scale, c10::string_view format,
                             int64_t blocksize, c10::SymIntArrayRef shape, const std::optional<at::Tensor>& out,
                             int64_t group, int64_t stride);  // rank_linear.cpp

namespace {

// call_rank_linear(x, a, a_scale, a_format, a_blocksize, a_shape, b, b_scale, b_format, b_blocksize,
//                  b_shape, bias) -> Tensor | NotImplemented
PyObject* call_rank_linear(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 12 || at::impl::torch_function_mode_enabled()) return not_implemented();
  const at::Tensor* x;
  RankLinearArgs r;
  if (!read_tensor(args[0], &x) || !read_rank_linear_args(args + 1, &r) || !plain_cpu_inference(*x, r))
    return not_implemented();
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    c10::impl::ExcludeDispatchKeyGuard below_autograd(c10::autograd_dispatch_keyset);
    out = rank_linear_op(*x, r);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// call_attention(q, k, v, mask, scale, is_causal) -> Tensor | NotImplemented
PyObject* call_attention(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 6 || at::impl::torch_function_mode_enabled()) return not_implemented();
  const at::Tensor *q, *k, *v;
  OptTensor mask;
  if (!read_tensor(args[0], &q) || !read_tensor(args[1], &k) || !read_tensor(args[2], &v) ||
      !read_opt_tensor(args[3], &mask) || !(PyFloat_CheckExact(args[4]) || PyLong_CheckExact(args[4])) ||
      !PyBool_Check(args[5]))
    return not_implemented();
  const double scale = PyFloat_AsDouble(args[4]);
  if (scale == -1.0 && PyErr_Occurred()) return not_implemented();
  if (!plain_cpu_inference({q, k, v, mask ? &*mask : nullptr})) return not_implemented();
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("adaptwin::attention", "").typed<Attention>();
  // References held across the call, taken and dropped with the GIL held: a tensor only Python holds has its
  // PyObject incref'd when C++ takes a second reference and decref'd when that one goes, each taking the GIL,
  // and the kernel's own references (t.to(float32) returns t itself) would do so with it released. A decoding
  // step's call (T 1, S 64, 6 heads, width 40; three runs each) took 3.45-3.56 us in float32 against 3.73-3.85
  // without (bf16: 5.55-5.70 against 5.78-5.91).
  const std::array<at::Tensor, 3> held{*q, *k, *v};
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    c10::impl::ExcludeDispatchKeyGuard below_autograd(c10::autograd_dispatch_keyset);
    out = op.call(*q, *k, *v, mask, scale, args[5] == Py_True);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// dequantize(data, scale, format, blocksize, shape[, out, group, stride]) -> the (k, n) float32 matrix of one
// rank_linear factor on the CPU (`adaptwin.ops.rank_linear.dequantize_factor`), or, with out, its rows written
// into out (row r at (r / group)·stride + r % group) and out returned; NotImplemented for arguments of other
// types or devices, or a gradient to record.
PyObject* dequantize(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if ((nargs != 5 && nargs != 8) || at::impl::torch_function_mode_enabled()) return not_implemented();
  const at::Tensor* data;
  OptTensor scale, out;
  c10::string_view format;
  int64_t blocksize, group = 1, stride = 1;
  c10::SymInt shape[kMaxShape];
  Py_ssize_t n;
  if (!read_tensor(args[0], &data) || !read_opt_tensor(args[1], &scale) || !read_str(args[2], &format) ||
      !read_int(args[3], &blocksize) || !read_shape(args[4], shape, &n))
    return not_implemented();
  if (nargs == 8 && (!read_opt_tensor(args[5], &out) || !read_int(args[6], &group) || !read_int(args[7], &stride)))
    return not_implemented();
  if (!plain_cpu_inference({data, scale ? &*scale : nullptr, out ? &*out : nullptr})) return not_implemented();
  at::Tensor result;
  {
    pybind11::gil_scoped_release no_gil;
    c10::impl::ExcludeDispatchKeyGuard below_autograd(c10::autograd_dispatch_keyset);
    result = dequantize_factor(*data, scale, format, blocksize, c10::SymIntArrayRef(shape, n), out, group, stride);
  }
  return THPVariable_Wrap(std::move(result));
  END_HANDLE_TH_ERRORS
}

// {"avx2": bool, "avx512": bool, "avx512_rows": bool, "avx512_bf16": bool, "neon": bool}: the SIMD paths the
// CPU kernels take in this process (the CPU's features, capped by ADAPTWIN_CPU_CAP; all False in a build
// without SIMD intrinsics).
PyObject* cpu_features(PyObject* /*self*/, PyObject* /*unused*/) {
  auto b = [](bool yes) { return yes ? Py_True : Py_False; };
  return Py_BuildValue("{s:O,s:O,s:O,s:O,s:O}", "avx2", b(has_avx2()), "avx512", b(has_avx512()), "avx512_rows",
                       b(has_avx512_rows()), "avx512_bf16", b(has_avx512_bf16()), "neon", b(has_neon()));
}

}  // namespace

PyMethodDef kPythonMethods[] = {
    {"call_rank_linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&call_rank_linear)),
     METH_FASTCALL, "adaptwin::rank_linear for an inference call on plain tensors, else NotImplemented"},
    {"call_rank_linear_kept", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&call_rank_linear_kept)),
     METH_FASTCALL, "a packed module's kept batch-1 rank_linear call(s) while its sources hold, else NotImplemented"},
    {"parse_rank_linear_kept", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&parse_rank_linear_kept)),
     METH_FASTCALL, "a kept call's calls and layout read once, a capsule to end its kept tuple, else NotImplemented"},
    {"call_attention", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&call_attention)), METH_FASTCALL,
     "adaptwin::attention for an inference call on plain tensors, else NotImplemented"},
    {"gelu_", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&gelu_inplace_entry)), METH_FASTCALL,
     "the exact GELU in place on a small plain CPU float32 / bfloat16 tensor, returned, else NotImplemented"},
    {"cpu_features", &cpu_features, METH_NOARGS, "the SIMD paths the CPU kernels take in this process"},
    {"dequantize", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&dequantize)), METH_FASTCALL,
     "the (k, n) float32 matrix one rank_linear factor stores, decoded on the CPU, else NotImplemented"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace adaptwin
