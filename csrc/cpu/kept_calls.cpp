// adaptwin._C.call_rank_linear_kept / parse_rank_linear_kept: a packed module's whole batch-1 CPU call, kept
// between calls (adaptwin/compressors/packed_args.py, `KeptCall`), its sources checked here before the op
// runs through the C++ dispatcher (python_calls.cpp: what the fast entry points have in common).
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/accumulate.h>
#include <c10/util/safe_numerics.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <Python.h>

#include "python_args.h"

namespace adaptwin {
namespace {

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
  // (the sums and products of these sizes in int64 without wrapping around: with -fwrapv, blocks = 2^62 + 8 and
  // widths (4,) made blocks·4 = 32, the call's width, and run_kept's loops over rows·blocks ran off its buffers)
  int64_t width = 0;
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!read_int(PyTuple_GET_ITEM(sizes, i), &l->widths[i]) || l->widths[i] < 1 ||
        c10::add_overflows(l->block_width, l->widths[i], &l->block_width) ||
        c10::mul_overflows(l->blocks, l->widths[i], &width))
      return false;
    // the width call i gives ("in") or takes ("out"), from its factors' (k, n) shapes
    const RankLinearArgs& c = r[i];
    if (c.na != 2 || c.nb != 2) return false;
    const c10::SymInt& side =
        l->kind == KeptLayout::kIn ? (c.b ? c.b_shape[1] : c.a_shape[0]) : (c.a ? c.a_shape[1] : c.b_shape[0]);
    if (side != width) return false;
  }
  int64_t total = 0;  // blocks·block_width, which layout_fits and run_kept compute as is
  return !c10::mul_overflows(l->blocks, l->block_width, &total) &&
         !(l->bias && (l->bias->dim() != 1 || l->bias->size(0) != total));
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

}  // namespace

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

namespace {

// Whether the loops of run_kept may take t: float32 and contiguous (fresh op outputs, and most x).
bool raw_f32(const at::Tensor& t) { return t.scalar_type() == at::kFloat && t.is_contiguous(); }

// The kept call's result (the caller holds the GIL released and the autograd keys excluded). For float32 the
// outputs are placed, x's columns gathered and the sums (alpha 1) and the bias added in plain loops, not ATen
// calls (a narrow, a copy_ or an add_ costs about as much as a small call's arithmetic); the same operations
// in the same order as the ATen path, so the same bits. The 384-wide QuantLinears of the packed tiny decoder
// (NF4 directions and fp LoRA ones: two op calls each; benchmarks.packed_module_calls, three runs before and
// after): in-role 7.8-9.3 us a call against 10.2-11.8 with the ATen ops, out-role 8.2-9.7 against 12.0-13.4.
at::Tensor run_kept(const at::Tensor& x, const RankLinearArgs* r, Py_ssize_t n, const KeptLayout& l) {
  const int64_t rows = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);  // x.size(-1) may be 0
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

}  // namespace

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
  if (!read_int(PyTuple_GET_ITEM(kept, 0), &max_rows) || x->dim() == 0 ||
      (x->size(-1) > 0 && x->numel() / x->size(-1) > max_rows) ||  // (max_rows·size(-1) could overflow)
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

}  // namespace adaptwin
