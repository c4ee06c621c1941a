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
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <array>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include <Python.h>

#include "cpu_features.h"

namespace adaptwin {

at::Tensor dequantize_factor(const at::Tensor& data, const std::optional<at::Tensor>& scale, c10::string_view format,
                             int64_t blocksize, c10::SymIntArrayRef shape, const std::optional<at::Tensor>& out,
                             int64_t group, int64_t stride);  // rank_linear.cpp

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

constexpr Py_ssize_t kMaxKeptCalls = 4;

// call_rank_linear_kept(x, kept) -> Tensor | NotImplemented: a packed module's whole batch-1 call, kept between
// calls (adaptwin/compressors/packed_args.py, `KeptCall`, builds kept):
//   kept = (max_rows, sources, calls, layout) or (max_rows, sources, calls, layout, parsed)
//   sources: ((mapping, name, tensor or None, version or None), ...): the call is still the module's while
//            mapping.get(name) is that object (a missing key reads as None) and, with a version, the tensor's
//            version counter is that number;
//   calls:   one to four tuples of the op's 11 arguments after x;
//   layout:  None: the result is the first call's output plus the others', added in that order;
//            ("in", blocks, widths, bias): call i's output (..., blocks·widths[i]) fills columns
//            [sum(widths[:i]), sum(widths[:i + 1])) of each of the result's blocks of sum(widths), then bias (a
//            tensor or None) is added (a QuantLinear "in" factor with LoRA directions kept in fp);
//            ("out", blocks, widths, None): call i takes those columns of each of x's blocks as its x, and
//            the outputs are added in order (the "out" factor);
//            ("add", 1, alphas, None): the first call's output plus alphas[i] times call i's, in order
//            (alphas[0] is 1: PQM's base plus its scaled LoRA update);
//   parsed:  parse_rank_linear_kept's capsule of these calls and layout (read once, not on every call).
// NotImplemented (the module then builds its call anew, or takes another path) for x with more than max_rows
// rows (or none: a 0-d x), x of another width than a layout's blocks, a source that changed, and whatever
// call_rank_linear refuses.
// Whether every source of a kept call is still its module's (call_rank_linear_kept's ``sources``).
bool sources_hold(PyObject* sources) {
  if (!PyTuple_CheckExact(sources)) return false;
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(sources); ++i) {
    PyObject* source = PyTuple_GET_ITEM(sources, i);
    if (!PyTuple_CheckExact(source) || PyTuple_GET_SIZE(source) != 4 || !PyDict_Check(PyTuple_GET_ITEM(source, 0)))
      return false;
    PyObject* now = PyDict_GetItemWithError(PyTuple_GET_ITEM(source, 0), PyTuple_GET_ITEM(source, 1));  // borrowed
    if (now == nullptr && PyErr_Occurred()) return false;
    PyObject* expected = PyTuple_GET_ITEM(source, 2);
    if ((now == nullptr ? Py_None : now) != expected) return false;
    PyObject* version = PyTuple_GET_ITEM(source, 3);
    if (version != Py_None) {
      int64_t v;
      const at::Tensor* t;
      if (!read_int(version, &v) || !read_tensor(expected, &t) || t->is_inference() || t->_version() != v) return false;
    }
  }
  return true;
}

// How a kept call's n op calls make its result (call_rank_linear_kept's ``layout``).
struct KeptLayout {
  enum Kind { kAdd, kIn, kOut } kind = kAdd;
  int64_t blocks = 1, block_width = 0, widths[kMaxKeptCalls] = {};
  double alphas[kMaxKeptCalls] = {1.0, 1.0, 1.0, 1.0};  // kAdd: result = Σ alphas[i]·call i, alphas[0] = 1
  OptTensor bias;                                         // kIn: added last
};

// False where ``layout`` is not one call_rank_linear_kept takes for these calls (widths that do not fit; what
// depends on x is layout_fits's).
bool read_layout(PyObject* layout, const RankLinearArgs* r, Py_ssize_t n, KeptLayout* l) {
  if (layout == Py_None) return true;  // the outputs added
  if (!PyTuple_CheckExact(layout) || PyTuple_GET_SIZE(layout) != 4) return false;
  PyObject* sizes = PyTuple_GET_ITEM(layout, 2);
  c10::string_view name;
  if (!read_str(PyTuple_GET_ITEM(layout, 0), &name) || (name != "in" && name != "out" && name != "add") ||
      !read_int(PyTuple_GET_ITEM(layout, 1), &l->blocks) || l->blocks < 1 || !PyTuple_CheckExact(sizes) ||
      PyTuple_GET_SIZE(sizes) != n || !read_opt_tensor(PyTuple_GET_ITEM(layout, 3), &l->bias))
    return false;
  if (name == "add") {
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* a = PyTuple_GET_ITEM(sizes, i);
      if (!PyFloat_CheckExact(a)) return false;
      l->alphas[i] = PyFloat_AS_DOUBLE(a);
    }
    return !l->bias && l->alphas[0] == 1.0;
  }
  l->kind = name == "in" ? KeptLayout::kIn : KeptLayout::kOut;
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!read_int(PyTuple_GET_ITEM(sizes, i), &l->widths[i]) || l->widths[i] < 1) return false;
    l->block_width += l->widths[i];
    // the width call i gives ("in") or takes ("out"), from its factors' (k, n) shapes
    const RankLinearArgs& c = r[i];
    if (c.na != 2 || c.nb != 2) return false;
    const c10::SymInt& side =
        l->kind == KeptLayout::kIn ? (c.b ? c.b_shape[1] : c.a_shape[0]) : (c.a ? c.a_shape[1] : c.b_shape[0]);
    if (side != l->blocks * l->widths[i]) return false;
  }
  return !(l->bias && (l->bias->dim() != 1 || l->bias->size(0) != l->blocks * l->block_width));
}

// Whether a layout read_layout took fits x: its bias a plain CPU tensor of x's dtype (another dtype would
// promote the module's `y + bias`), and x of the "out" blocks' width.
bool layout_fits(const KeptLayout& l, const at::Tensor& x) {
  return !(l.bias && (!plain_cpu_inference({&*l.bias}) || l.bias->scalar_type() != x.scalar_type())) &&
         !(l.kind == KeptLayout::kOut && x.size(-1) != l.blocks * l.block_width);
}

// A kept tuple's calls and layout as read from it: by call_rank_linear_kept on each call, or once by
// parse_rank_linear_kept into a capsule that the kept tuple then ends with. Read once, its tensors are
// held here between calls. That is not only the parsing saved: a tensor that Python alone holds has its
// PyObject incref'd when C++ takes a second reference and decref'd (taking the GIL) when that one goes,
// and with these references held the call's own ones no longer do either. A 384-wide NF4
// QuantLowRankLinear's kept call (rank 96, the benchmarks.rank_linear_speed module) took 4.22 us from Python
// with its capsule against 4.39 us reading the calls each time (medians of 9 x 20000 calls, 2 threads).
// Python's cycle collector does not see these references (as with any C++ holder of a tensor): KeptCall.put
// asks for a capsule only where no tensor of the calls has attributes of its own.
struct KeptParsed {
  // the kept tuple's calls and layout it was read from (compared by identity, never dereferenced)
  PyObject *calls = nullptr, *layout_of = nullptr;
  Py_ssize_t n = 0;
  RankLinearArgs r[kMaxKeptCalls];
  KeptLayout layout;
  std::string formats[kMaxKeptCalls][2];  // a capsule's: r's formats point into these
};

// False where ``calls`` and ``layout`` are not ones call_rank_linear_kept takes (types, arity, widths).
bool read_kept(PyObject* calls, PyObject* layout, KeptParsed* p) {
  if (!PyTuple_CheckExact(calls)) return false;
  p->calls = calls;
  p->layout_of = layout;
  p->n = PyTuple_GET_SIZE(calls);
  if (p->n < 1 || p->n > kMaxKeptCalls) return false;
  for (Py_ssize_t i = 0; i < p->n; ++i) {
    PyObject* call = PyTuple_GET_ITEM(calls, i);
    if (!PyTuple_CheckExact(call) || PyTuple_GET_SIZE(call) != 11 ||
        !read_rank_linear_args(PySequence_Fast_ITEMS(call), &p->r[i]))
      return false;
  }
  return read_layout(layout, p->r, p->n, &p->layout);
}

constexpr const char* kParsedName = "adaptwin.rank_linear_kept";

// The tensor arguments of a kept call (their positions among the op's 11 after x).
constexpr int kTensorArgs[] = {0, 1, 5, 6, 10};

// The capsule's parsed calls, where ``parsed`` is parse_rank_linear_kept's capsule of exactly these ``calls``
// and ``layout``, and every tensor among them and the layout's bias is still a Tensor or Parameter (a
// __class__ assigned since would bring its own __torch_function__); else null.
const KeptParsed* parsed_for(PyObject* parsed, PyObject* calls, PyObject* layout) {
  if (!PyCapsule_CheckExact(parsed)) return nullptr;
  const auto* p = static_cast<const KeptParsed*>(PyCapsule_GetPointer(parsed, kParsedName));
  if (p == nullptr || p->calls != calls || p->layout_of != layout) return nullptr;
  for (Py_ssize_t i = 0; i < p->n; ++i) {
    PyObject* call = PyTuple_GET_ITEM(calls, i);
    for (int j : kTensorArgs) {
      PyObject* o = PyTuple_GET_ITEM(call, j);
      if (o != Py_None && !THPVariable_CheckExact(o)) return nullptr;
    }
  }
  if (p->layout.bias && !THPVariable_CheckExact(PyTuple_GET_ITEM(layout, 3))) return nullptr;
  return p;
}

// parse_rank_linear_kept(kept) -> capsule | NotImplemented: kept's calls and layout (the kept tuple's first four
// items, call_rank_linear_kept's) read once, for a kept tuple that ends with the capsule.
PyObject* parse_rank_linear_kept(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 1 || !PyTuple_CheckExact(args[0]) || PyTuple_GET_SIZE(args[0]) != 4) return not_implemented();
  auto p = std::make_unique<KeptParsed>();
  if (!read_kept(PyTuple_GET_ITEM(args[0], 2), PyTuple_GET_ITEM(args[0], 3), p.get())) return not_implemented();
  for (Py_ssize_t i = 0; i < p->n; ++i) {  // the formats owned, not read from the tuple's strings
    RankLinearArgs& r = p->r[i];
    p->formats[i][0] = std::string(r.a_format);
    p->formats[i][1] = std::string(r.b_format);
    r.a_format = p->formats[i][0];
    r.b_format = p->formats[i][1];
  }
  PyObject* capsule = PyCapsule_New(p.get(), kParsedName, [](PyObject* c) {
    delete static_cast<KeptParsed*>(PyCapsule_GetPointer(c, kParsedName));
  });
  if (capsule != nullptr) p.release();
  return capsule;
  END_HANDLE_TH_ERRORS
}

// Whether the loops of run_kept may take t: float32 and contiguous (fresh op outputs, and most x).
bool raw_f32(const at::Tensor& t) { return t.scalar_type() == at::kFloat && t.is_contiguous(); }

// The kept call's result (the caller holds the GIL released and the autograd keys excluded). For float32 the
// outputs are placed, x's columns gathered and the sums (alpha 1) and the bias added in plain loops, not ATen
// calls (a narrow, a copy_ or an add_ costs about as much as a small call's arithmetic); the same operations
// in the same order as the ATen path, so the same bits. The 384-wide QuantLinears of the packed tiny decoder
// (NF4 directions and fp LoRA ones: two op calls each; benchmarks.packed_module_calls, three runs before and
// after): in-role 7.8-9.3 us a call against 10.2-11.8 with the ATen ops, out-role 8.2-9.7 against 12.0-13.4.
at::Tensor run_kept(const at::Tensor& x, const RankLinearArgs* r, Py_ssize_t n, const KeptLayout& l) {
  const int64_t rows = x.numel() / x.size(-1);
  std::vector<int64_t> shape = x.sizes().vec();
  at::Tensor out;
  auto add_into = [](at::Tensor& sum, const at::Tensor& part) {  // sum += part, the sum's own storage
    if (raw_f32(sum) && raw_f32(part) && sum.numel() == part.numel()) {
      float* o = sum.data_ptr<float>();
      const float* p = part.data_ptr<float>();
      for (int64_t k = 0; k < sum.numel(); ++k) o[k] += p[k];
    } else {
      sum.add_(part);
    }
  };
  if (l.kind == KeptLayout::kAdd) {
    out = rank_linear_op(x, r[0]);
    for (Py_ssize_t i = 1; i < n; ++i) {
      const at::Tensor part = rank_linear_op(x, r[i]);
      if (l.alphas[i] == 1.0)
        add_into(out, part);
      else
        out.add_(part, l.alphas[i]);  // (ATen's own rounding of o + alpha·p, as the module's general path)
    }
  } else if (l.kind == KeptLayout::kIn) {
    shape.back() = l.blocks * l.block_width;
    out = at::empty(shape, x.options());
    at::Tensor parts[kMaxKeptCalls];
    bool raw = raw_f32(out) && (!l.bias || raw_f32(*l.bias));
    for (Py_ssize_t i = 0; i < n; ++i) {
      parts[i] = rank_linear_op(x, r[i]);
      raw = raw && raw_f32(parts[i]);
    }
    if (raw) {  // each (row, block): call i's widths[i] outputs side by side, then the bias
      const int64_t width = l.block_width;
      float* o = out.data_ptr<float>();
      const float* bias = l.bias ? l.bias->data_ptr<float>() : nullptr;
      const float* src[kMaxKeptCalls];
      for (Py_ssize_t i = 0; i < n; ++i) src[i] = parts[i].data_ptr<float>();
      for (int64_t m = 0; m < rows * l.blocks; ++m) {
        float* dst = o + m * width;
        for (Py_ssize_t i = 0, at = 0; i < n; at += l.widths[i], ++i)
          std::copy(src[i] + m * l.widths[i], src[i] + (m + 1) * l.widths[i], dst + at);
        if (bias != nullptr) {
          const float* b = bias + (m % l.blocks) * width;
          for (int64_t c = 0; c < width; ++c) dst[c] += b[c];
        }
      }
    } else {
      const at::Tensor each = out.view({rows, l.blocks, l.block_width});
      for (Py_ssize_t i = 0, at = 0; i < n; at += l.widths[i], ++i)
        each.narrow(2, at, l.widths[i]).copy_(parts[i].view({rows, l.blocks, l.widths[i]}));
      if (l.bias) out.add_(*l.bias);
    }
  } else {
    const bool raw = raw_f32(x);
    at::Tensor each;  // (not x itself where raw: a second reference to x would take the GIL, as above)
    if (!raw) each = x.reshape({rows, l.blocks, l.block_width});
    for (Py_ssize_t i = 0, at = 0; i < n; at += l.widths[i], ++i) {
      shape.back() = l.blocks * l.widths[i];
      at::Tensor xi;
      if (raw) {  // each block's columns [at, at + widths[i]) of x, gathered
        xi = at::empty(shape, x.options());
        const float* xs = x.data_ptr<float>();
        float* d = xi.data_ptr<float>();
        for (int64_t m = 0; m < rows * l.blocks; ++m)
          std::copy(xs + m * l.block_width + at, xs + m * l.block_width + at + l.widths[i], d + m * l.widths[i]);
      } else {
        xi = each.narrow(2, at, l.widths[i]).reshape(shape);
      }
      const at::Tensor part = rank_linear_op(xi, r[i]);
      if (i == 0)
        out = part;
      else
        add_into(out, part);
    }
  }
  return out;
}

PyObject* call_rank_linear_kept(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 2 || at::impl::torch_function_mode_enabled()) return not_implemented();
  const at::Tensor* x;
  PyObject* kept = args[1];
  if (!read_tensor(args[0], &x) || !PyTuple_CheckExact(kept) ||
      (PyTuple_GET_SIZE(kept) != 4 && PyTuple_GET_SIZE(kept) != 5))
    return not_implemented();
  int64_t max_rows;
  PyObject* calls = PyTuple_GET_ITEM(kept, 2);
  if (!read_int(PyTuple_GET_ITEM(kept, 0), &max_rows) || x->dim() == 0 || x->numel() > max_rows * x->size(-1) ||
      !sources_hold(PyTuple_GET_ITEM(kept, 1)))
    return not_implemented();
  std::optional<KeptParsed> local;  // (made only for a tuple without its capsule: 2% of a 384-wide call)
  const KeptParsed* p = nullptr;
  if (PyTuple_GET_SIZE(kept) == 5)
    p = parsed_for(PyTuple_GET_ITEM(kept, 4), calls, PyTuple_GET_ITEM(kept, 3));
  else if (read_kept(calls, PyTuple_GET_ITEM(kept, 3), &local.emplace()))
    p = &*local;
  if (p == nullptr || !layout_fits(p->layout, *x)) return not_implemented();
  for (Py_ssize_t i = 0; i < p->n; ++i)
    if (!plain_cpu_inference(*x, p->r[i])) return not_implemented();
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    c10::impl::ExcludeDispatchKeyGuard below_autograd(c10::autograd_dispatch_keyset);
    out = run_kept(*x, p->r, p->n, p->layout);
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
    {"cpu_features", &cpu_features, METH_NOARGS, "the SIMD paths the CPU kernels take in this process"},
    {"dequantize", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&dequantize)), METH_FASTCALL,
     "the (k, n) float32 matrix one rank_linear factor stores, decoded on the CPU, else NotImplemented"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace adaptwin
