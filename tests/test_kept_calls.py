"""Packed modules keep their whole batch-1 inference call and run it from C++ (`KeptCall`,
adaptwin/compressors/packed_args.py; the entry point ``adaptwin._C.call_rank_linear_kept``): the kept call
gives the general path's output bit for bit and follows the module through every change of its buffers and
parameters; the entry point refuses what it does not take."""

from __future__ import annotations

import pytest
import torch

from adaptwin.ops.backends import FAST
from adaptwin.quant import QuantFormat
from tests.test_quant_modules import _fresh_output, _packed

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif("rank_linear_kept" not in FAST, reason="needs adaptwin._C")]


def _kept_case(kind: str, quantize_lora: bool):
    """(packed module, donor with other factors) for the kept-call tests. With fp LoRA directions the low-rank
    module's call is two op calls added, QuantLinear's "in" one two calls side by side in each head and its
    "out" one two calls on each head's columns, added."""
    fmt = QuantFormat("nf4", 64, True)  # double-quantised scales: derived tensors, kept with their versions
    return _packed(kind, fmt, quantize_lora), _packed(kind, fmt, quantize_lora, seed=1)


@pytest.mark.parametrize("quantize_lora", [True, False], ids=["one-format", "fp-lora"])
@pytest.mark.parametrize("kind", ["in", "out", "low_rank"])
def test_kept_calls_follow_the_module(kind, quantize_lora):
    """A packed module's batch-1 inference call is kept whole after its first call and run from C++
    (`KeptCall`): the same output bit for bit, and still the module's own after a buffer or parameter is
    replaced behind nn.Module's back, a source of the double-quantised scales is written in place, the bias
    is swapped, or `.to` converts it; calls it does not take (more rows, gradients) go the general way."""
    m, donor = _kept_case(kind, quantize_lora)
    x = torch.randn(1, 1, m.in_features)
    with torch.no_grad():
        first = m(x)
        assert m._call.kept is not None
        assert torch.equal(m(x), first) and torch.equal(first, _fresh_output(m, x))
        name = next(iter(m._buffers))
        m._buffers[name] = donor._buffers[name].clone()  # as accelerate's set_module_tensor_to_device does
        replaced = m(x)
        assert not torch.equal(replaced, first) and torch.equal(replaced, _fresh_output(m, x))
        absmax = next(n for n in m._buffers if n.endswith("absmax"))  # a source of derived scales, in place
        m._buffers[absmax].copy_(donor._buffers[absmax])
        assert torch.equal(m(x), _fresh_output(m, x))
        for key, t in m._buffers.items():
            t.copy_(donor._buffers[key])
        for key, p in donor._parameters.items():  # replaced, not written: the bias and any fp LoRA directions
            setattr(m, key, torch.nn.Parameter(p.detach().clone()))
        assert torch.equal(m(x), donor(x))
        m.bias = None
        assert torch.equal(m(x), _fresh_output(m, x)) and not torch.equal(m(x), donor(x))
        many = torch.randn(40, m.in_features)  # more than MIN_BATCHED_ROWS: the whole-factor GEMMs, not kept
        one = m(many[:1])
        torch.testing.assert_close(m(many)[:1], one, rtol=1e-5, atol=1e-5 * one.abs().max().item())
        other = m(x.bfloat16())  # a float32 bias would promote `y + bias`: the general path, the same result
        assert torch.equal(other, _fresh_output(m, x.bfloat16())) and m._call.kept is not None
    y = m(x.requires_grad_())  # a gradient to record: the op and its autograd
    y.sum().backward()
    assert x.grad is not None and torch.equal(y.detach(), m(x.detach()))
    m.double()
    assert m._call.kept is None and m(x.detach().double()).dtype == torch.float64


def test_kept_call_entry_refuses_what_it_does_not_take():
    """The C++ entry answers NotImplemented, never a crash or a wrong call, for a kept tuple of another shape,
    a source that is not a dict entry, no or too many calls, calls of other arity, layouts it does not know or
    whose widths do not fit, a bias of another kind, and x of other kinds."""
    entry = FAST["rank_linear_kept"]
    m, _ = _kept_case("low_rank", quantize_lora=True)
    x = torch.randn(1, m.in_features)
    with torch.no_grad():
        m(x)
        _, (rows, sources, calls, layout, _) = m._call.kept
        assert layout is None and torch.equal(entry(x, (rows, sources, calls, layout)), m(x))
        bad = [(rows,), (rows, sources, calls), [rows, sources, calls, None], ("32", sources, calls, None),
               (rows, [*sources], calls, None), (rows, ((1, "x", None, None),), calls, None),
               (rows, ((m._buffers, ["unhashable"], None, None),), calls, None), (rows, sources, (), None),
               (rows, sources, calls * 5, None), (rows, sources, (calls[0][:-1],), None), (0, sources, calls, None),
               (rows, sources, calls, ("side", 1, (1,), None)), (rows, sources, calls, ("in", 0, (1,), None)),
               (rows, sources, calls, ("in", 1, (1, 2), None)), (rows, sources, calls, ("out", 1, (63,), None)),
               (rows, sources, calls, ("in", 1, (0,), None)), (rows, sources, calls, ("in", 1, (95,), None)),
               (rows, sources, calls, ("in", 1, (96,), x)),
               (rows, sources, calls, ("in", 1, (96,), m.bias.double()))]
        for kept in bad:
            assert entry(x, kept) is NotImplemented, kept
        assert torch.equal(entry(x, (rows, sources, calls, ("in", 1, (96,), None))), m(x))  # one part: the same
        assert entry(torch.tensor(1.0), (rows, sources, calls, layout)) is NotImplemented  # 0-d x
        assert entry(x.numpy(), (rows, sources, calls, layout)) is NotImplemented
        assert entry(x) is NotImplemented

    # sizes whose products wrap around in int64 (found under the sanitizers, 2026-11-26): blocks 2^62 + 8 times
    # width 4 wrapped to 32, the call's own width, and the kept loops then read past both buffers
    a, b = torch.randn(8, 16), torch.randn(8, 32)
    call = (a, None, "fp", 0, [8, 16], b, None, "fp", 0, [8, 32], None)
    x = torch.randn(1, 16)
    for kept in [(1, (), (call,), ("in", (1 << 62) + 8, (4,), None)),
                 (1, (), (call,), ("in", 1 << 61, (16, 16), None)),
                 (1, (), (call,), ("in", 2, ((1 << 63) - 1, 1 << 62), None))]:
        assert entry(x, kept) is NotImplemented, kept
    torch.testing.assert_close(entry(x, ((1 << 63) - 1, (), (call,), None)), x @ a.t() @ b)  # rows·width overflowed


class _Subclass(torch.Tensor):
    pass


@pytest.mark.parametrize("quantize_lora", [True, False], ids=["one-format", "fp-lora"])
@pytest.mark.parametrize("kind", ["in", "out", "low_rank"])
def test_parsed_kept_call_is_the_tuples_own(kind, quantize_lora):
    """A kept tuple ends with the capsule of its calls read once (``parse_rank_linear_kept``): the entry gives
    what it gives reading the calls on each call, bit for bit, and refuses the capsule with another tuple's
    calls or layout, anything else in its place, and a call whose tensor has since become a Tensor subclass
    (the module then takes its general path, whose result is the same)."""
    entry, parse = FAST["rank_linear_kept"], FAST["parse_rank_linear_kept"]
    m, donor = _kept_case(kind, quantize_lora)
    x = torch.randn(1, m.in_features)
    with torch.no_grad():
        m(x)
        donor(x)
        _, (rows, sources, calls, layout, parsed) = m._call.kept
        _, (_, _, other_calls, other_layout, other) = donor._call.kept
        want = entry(x, (rows, sources, calls, layout))
        assert torch.equal(entry(x, (rows, sources, calls, layout, parsed)), want) and torch.equal(m(x), want)
        assert torch.equal(entry(x, (rows, sources, calls, layout, parse((rows, sources, calls, layout)))), want)
        same_calls = tuple(tuple(call) for call in calls)  # equal calls, but another tuple: not the capsule's
        for bad in [(rows, sources, calls, layout, other), (rows, sources, other_calls, other_layout, parsed),
                    (rows, sources, same_calls, layout, parsed), (rows, sources, calls, layout, None),
                    (rows, sources, calls, layout, calls), (rows, sources, calls, layout, parsed, parsed)]:
            assert entry(x, bad) is NotImplemented
        if layout is not None:  # a layout equal to the capsule's, but not its own
            assert entry(x, (rows, sources, calls, (*layout,), parsed)) is NotImplemented
        for bad in [(rows, sources, calls), (rows, sources, (), layout), [rows, sources, calls, layout],
                    (rows, sources, calls, ("side", 1, (1,), None)), (rows, sources, calls, layout, parsed)]:
            assert parse(bad) is NotImplemented
        assert parse() is NotImplemented
        tensor = next(a for a in calls[0] if isinstance(a, torch.Tensor))
        tensor.__class__ = _Subclass  # in place: the same object, so every source still holds
        try:
            assert entry(x, (rows, sources, calls, layout, parsed)) is NotImplemented
            assert entry(x, (rows, sources, calls, layout)) is NotImplemented
        finally:
            tensor.__class__ = torch.Tensor
        assert torch.equal(entry(x, (rows, sources, calls, layout, parsed)), want)
        m.bias = None  # a source replaced: the capsule is no longer consulted, and the module keeps anew
        assert entry(x, (rows, sources, calls, layout, parsed)) is NotImplemented
        assert torch.equal(m(x), _fresh_output(m, x)) and m._call.kept[1][4] is not parsed


def test_copies_keep_their_own_calls():
    """`copy.deepcopy` gives a module without the kept call (its capsule is the original's), which keeps its
    own on its first inference call and gives the same output; pickling (torch.save of a whole module) writes
    the module without it."""
    import copy
    import io
    import pickle

    m, _ = _kept_case("low_rank", quantize_lora=False)
    x = torch.randn(1, m.in_features)
    with torch.no_grad():
        want = m(x)
        assert m._call.kept is not None
        for clone in (copy.deepcopy(m),):
            assert clone._call.kept is None and m._call.kept is not None
            assert torch.equal(clone(x), want) and clone._call.kept is not None
            assert clone._call.kept[1][4] is not m._call.kept[1][4]
        assert b"PyCapsule" not in pickle.dumps(m)
        buf = io.BytesIO()
        torch.save(m, buf)
        assert buf.tell() > 0


def test_tensors_with_attributes_are_not_held():
    """A kept call holds its tensors from C++ (its capsule) only where none has attributes of its own: one that
    could refer back to the module (a library's bookkeeping on a Parameter, say) would keep the module alive
    unseen by the cycle collector. Such a call is kept without the capsule, read on each call, and gives the
    same output; a module in a reference cycle is still collected."""
    import gc
    import weakref

    m, _ = _kept_case("low_rank", quantize_lora=False)
    x = torch.randn(1, m.in_features)
    with torch.no_grad():
        want = m(x)
        assert len(m._call.kept[1]) == 5
        m.bias.owner = m  # a reference cycle through a tensor the kept call holds
        m._call.clear()
        assert torch.equal(m(x), want) and len(m._call.kept[1]) == 4 and torch.equal(m(x), want)
    refs = [weakref.ref(m)]
    other, _ = _kept_case("in", quantize_lora=True)
    with torch.no_grad():
        other(torch.randn(1, other.in_features))
    assert len(other._call.kept[1]) == 5
    other.loop = [other]  # a cycle not through the held tensors: collected with its capsule
    refs.append(weakref.ref(other))
    del m, other
    gc.collect()
    assert all(r() is None for r in refs)


@pytest.mark.parametrize("kind", ["in", "out", "low_rank"])
def test_kept_layouts_in_every_dtype_and_stride(kind):
    """The kept call's float32 loops (outputs placed side by side, x's columns gathered, sums and the bias
    added in C++) and its ATen path (a non-contiguous x, bf16) give the general path's bits."""
    m, _ = _kept_case(kind, quantize_lora=False)
    with torch.no_grad():
        xs = [torch.randn(1, m.in_features), torch.randn(m.in_features, 2).t()]  # the second not contiguous
        for x in (*xs, None):
            if x is None:
                m.bfloat16()
                x = xs[0].bfloat16()
            want = _fresh_output(m, x)
            entry, kept = m._call.kept
            y = entry(x, kept)  # the kept call itself, not the general path behind it
            assert y is not NotImplemented and torch.equal(y, want) and torch.equal(m(x), want)
