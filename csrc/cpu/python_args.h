// What the fast Python entry points of adaptwin._C share (python_calls.cpp, kept_calls.cpp): readers of the
// op's arguments from Python objects, the check that a call is a plain CPU inference call, and the
// rank_linear op through the C++ dispatcher. Each reader answers false where the object is not of the plain
// type the fast path takes; the entry points then answer NotImplemented (python_calls.cpp says why).
#pragma once

#include <torch/csrc/autograd/python_variable.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>

#include <initializer_list>
#include <optional>
#include <string_view>

#include <Python.h>

namespace adaptwin {

// The kept-call entry points (kept_calls.cpp), in python_calls.cpp's method table.
PyObject* call_rank_linear_kept(PyObject* self, PyObject* const* args, Py_ssize_t nargs);
PyObject* parse_rank_linear_kept(PyObject* self, PyObject* const* args, Py_ssize_t nargs);
// The in-place GELU entry point (activation.cpp).
PyObject* gelu_inplace_entry(PyObject* self, PyObject* const* args, Py_ssize_t nargs);

namespace {

using OptTensor = std::optional<at::Tensor>;
using RankLinear = at::Tensor(const at::Tensor&, const OptTensor&, const OptTensor&, c10::string_view, c10::SymInt,
                              c10::SymIntArrayRef, const OptTensor&, const OptTensor&, c10::string_view, c10::SymInt,
                              c10::SymIntArrayRef, const OptTensor&);
using Attention = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, double, bool);

// Argument readers: false where the object is not of the plain type the fast path takes.
bool read_tensor(PyObject* o, const at::Tensor** out) {
  if (!THPVariable_CheckExact(o)) return false;  // Tensor or Parameter only: no __torch_function__ of its own
  *out = &THPVariable_Unpack(o);
  return true;
}

bool read_opt_tensor(PyObject* o, OptTensor* out) {
  if (o == Py_None) return true;
  const at::Tensor* t;
  if (!read_tensor(o, &t)) return false;
  *out = *t;
  return true;
}

bool read_str(PyObject* o, c10::string_view* out) {
  if (!PyUnicode_CheckExact(o)) return false;
  Py_ssize_t n;
  const char* s = PyUnicode_AsUTF8AndSize(o, &n);
  if (s == nullptr) return false;
  *out = c10::string_view(s, static_cast<size_t>(n));
  return true;
}

bool read_int(PyObject* o, int64_t* out) {
  if (!PyLong_CheckExact(o)) return false;  // bool and SymInt objects take the general path
  int overflow = 0;
  *out = PyLong_AsLongLongAndOverflow(o, &overflow);
  return overflow == 0 && !(*out == -1 && PyErr_Occurred());
}

constexpr Py_ssize_t kMaxShape = 8;

bool read_shape(PyObject* o, c10::SymInt* buf, Py_ssize_t* n) {
  if (!PyList_CheckExact(o) && !PyTuple_CheckExact(o)) return false;
  PyObject** items = PySequence_Fast_ITEMS(o);
  *n = PySequence_Fast_GET_SIZE(o);
  if (*n > kMaxShape) return false;
  for (Py_ssize_t i = 0; i < *n; ++i) {
    int64_t v;
    if (!read_int(items[i], &v)) return false;
    buf[i] = c10::SymInt(v);
  }
  return true;
}

// Whether the call is for the entry point: every tensor on the CPU, and no gradient to record.
bool plain_cpu_inference(std::initializer_list<const at::Tensor*> tensors) {
  const bool grad = at::GradMode::is_enabled();
  for (const at::Tensor* t : tensors) {
    if (t == nullptr || !t->defined()) continue;
    if (!t->device().is_cpu() || (grad && t->requires_grad())) return false;
  }
  return true;
}

PyObject* not_implemented() {
  PyErr_Clear();  // a failed read may have set one (e.g. a str that is not valid UTF-8)
  Py_RETURN_NOTIMPLEMENTED;
}

// The op's 11 arguments after x, as the fast entries read them.
struct RankLinearArgs {
  OptTensor a, a_scale, b, b_scale, bias;
  c10::string_view a_format, b_format;
  int64_t a_blocksize = 0, b_blocksize = 0;
  c10::SymInt a_shape[kMaxShape], b_shape[kMaxShape];
  Py_ssize_t na = 0, nb = 0;
};

// False where one of args[0..10] is not of the plain type the fast path takes.
bool read_rank_linear_args(PyObject* const* args, RankLinearArgs* r) {
  return read_opt_tensor(args[0], &r->a) && read_opt_tensor(args[1], &r->a_scale) && read_str(args[2], &r->a_format) &&
         read_int(args[3], &r->a_blocksize) && read_shape(args[4], r->a_shape, &r->na) &&
         read_opt_tensor(args[5], &r->b) && read_opt_tensor(args[6], &r->b_scale) && read_str(args[7], &r->b_format) &&
         read_int(args[8], &r->b_blocksize) && read_shape(args[9], r->b_shape, &r->nb) &&
         read_opt_tensor(args[10], &r->bias);
}

bool plain_cpu_inference(const at::Tensor& x, const RankLinearArgs& r) {
  return plain_cpu_inference({&x, r.a ? &*r.a : nullptr, r.a_scale ? &*r.a_scale : nullptr, r.b ? &*r.b : nullptr,
                              r.b_scale ? &*r.b_scale : nullptr, r.bias ? &*r.bias : nullptr});
}

// The op through the dispatcher below the autograd keys (the caller holds the GIL released).
at::Tensor rank_linear_op(const at::Tensor& x, const RankLinearArgs& r) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("adaptwin::rank_linear", "").typed<RankLinear>();
  return op.call(x, r.a, r.a_scale, r.a_format, c10::SymInt(r.a_blocksize), c10::SymIntArrayRef(r.a_shape, r.na), r.b,
                 r.b_scale, r.b_format, c10::SymInt(r.b_blocksize), c10::SymIntArrayRef(r.b_shape, r.nb), r.bias);
}

}  // namespace
}  // namespace adaptwin
