"""Bad calls to the two ops: every entry refuses the same ones, before any kernel reads memory, with the same
ValueError naming the problem. The entries are the reference (also what the Triton launchers check), the op
through the dispatcher (the CPU C++ kernel, whose rules the CUDA C++ one shares: csrc/*_checks.h), the C++
fast entry the compressed modules call, and the fake function torch.compile traces with. Also the inputs
that are accepted although not in q's / x's dtype: float masks and biases."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, os.path.dirname(__file__))
from test_kernels_cpu import NONE, _factor  # noqa: E402

from adaptwin.ops import backends  # noqa: E402
from adaptwin.ops.attention import attention_reference  # noqa: E402
from adaptwin.ops.rank_linear import rank_linear_reference  # noqa: E402

ENTRIES = ("reference", "op", "fast", "fake")
REFERENCES = {"attention": attention_reference, "rank_linear": rank_linear_reference}


def _refused(entry: str, name: str, args: tuple, message: str, other_device: bool) -> None:
    """``args`` through one entry of op ``name`` raise ValueError matching ``message``. The fast entry takes
    plain CPU calls only: one with a tensor on another device it hands back (NotImplemented) to the op."""
    op = getattr(torch.ops.adaptwin, name)
    if entry == "fast":
        fast = backends.FAST.get(name)
        if fast is None:
            pytest.skip("adaptwin._C is not built")
        if other_device:
            with torch.no_grad():
                assert fast(*args) is NotImplemented
            return
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        if entry == "reference":
            REFERENCES[name](*args)
        elif entry == "op":
            op(*args)
        elif entry == "fast":
            backends.FAST[name](*args)
        else:
            with FakeTensorMode() as mode:
                op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])


def _bad_attention_calls():
    """(q, k, v, mask, scale) calls every backend must refuse, with the words of the message."""
    q, k, v = torch.randn(1, 6, 5, 20), torch.randn(1, 2, 7, 20), torch.randn(1, 2, 7, 24)
    return {
        "3-D": ((q[0], k[0], v[0], None, 0.2), "must be 4-D"),
        "integer q": ((q.int(), k.int(), v.int(), None, 0.2), r"q must be floating \(float32, float64"),
        "mixed dtypes": ((q, k.double(), v, None, 0.2),
                         "share one dtype, got (torch.float32|Float), (torch.float64|Double)"),
        "key width": ((q, k[..., :19], v, None, 0.2), "shapes do not match"),
        "value length": ((q, k, v[:, :, :6], None, 0.2), "shapes do not match"),
        "heads": ((q[:, :5], k, v, None, 0.2), r"query heads \(5\) must be a multiple of key heads \(2\)"),
        "integer mask": ((q, k, v, torch.ones(5, 7, dtype=torch.int32), 0.2), "mask must be bool .* or floating"),
        "mask shape": ((q, k, v, torch.ones(5, 6, dtype=torch.bool), 0.2),
                       r"mask of shape .*5, 6.* does not broadcast to \(B, H, T, S\) = \(1, 6, 5, 7\)"),
        "5-D mask": ((q, k, v, torch.ones(1, 1, 1, 5, 7, dtype=torch.bool), 0.2), "does not broadcast"),
        "mask device": ((q, k, v, torch.ones(5, 7, dtype=torch.bool, device="meta"), 0.2),
                        r"must be on one device, got \['cpu', 'meta'\]"),
        "nan scale": ((q, k, v, None, float("nan")), "scale must be a finite number"),
        "inf scale": ((q, k, v, None, float("inf")), "scale must be a finite number"),
    }


BAD_ATTENTION = _bad_attention_calls()


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("case", list(BAD_ATTENTION))
def test_attention_bad_input_names_the_problem(entry, case):
    args, message = BAD_ATTENTION[case]
    _refused(entry, "attention", (*args, False), message, other_device=case == "mask device")


def test_attention_float_masks_of_another_dtype():
    """A float mask need not be in q's dtype (HF's is in the model's): every backend adds it in float32."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, 20, generator=gen).to(torch.bfloat16) for n in (40, 33, 33))
    add = torch.randn(1, 1, 40, 33, generator=gen)
    add[..., 3] = torch.finfo(torch.float32).min
    want = attention_reference(q, k, v, add, 0.2, False).float()
    for m in (add.double(), add.half()):
        got_ref = attention_reference(q, k, v, m, 0.2, False).float()
        got_op = torch.ops.adaptwin.attention(q, k, v, m, 0.2, False).float()
        tol = 2e-2 if m.dtype == torch.half else 1e-2
        torch.testing.assert_close(got_ref, want, rtol=tol, atol=tol)
        torch.testing.assert_close(got_op, want, rtol=tol, atol=tol)


def _bad_rank_linear_calls():
    """Calls every rank_linear entry must refuse (the fused kernels index codes and scales by the logical
    shape, so a short buffer would be read past its end), with the words of the message."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(1, 64, generator=gen)
    a, b = _factor("nf4", 64, torch.randn(24, 64, generator=gen)), _factor("nf4", 32, torch.randn(24, 32))
    i8 = _factor("int8", 0, torch.randn(24, 64, generator=gen))
    return {
        "no factor": ((x, *NONE, *NONE, None), "at least one factor"),
        "format": ((x, a[0], a[1], "nf3", *a[3:], *b, None), "a_format must be one of \\('fp', 'nf4', 'int8'\\)"),
        "0-d x": ((torch.tensor(1.0), *a, *b, None), "x must have a last dimension"),
        "integer x": ((x.int(), *a, *b, None), "x must be floating"),
        "x width": ((x[:, :32], *a, *b, None), "x has 32 features, factor a expects 64"),
        "b rank": ((x, *a, *_factor("nf4", 32, torch.randn(23, 32)), None), "factor b has rank 23, its input has 24"),
        "shape length": ((x, *a[:4], [24, 64, 1], *b, None), "a_shape must be \\(k, features\\)"),
        "negative shape": ((x, *a[:4], [-24, 64], *b, None), "two sizes >= 0"),
        "huge shape": ((x, *a[:4], [2 ** 62, 64], *b, None), "a_shape must hold at most 2\\^62 values"),
        "no scale": ((x, a[0], None, *a[2:], *b, None), "nf4 factor a needs a_scale"),
        "integer scale": ((x, a[0], a[1].int(), *a[2:], *b, None), "a_scale must be floating"),
        "odd blocksize": ((x, *a[:3], 63, a[4], *b, None), "NF4 blocksize must be an even whole number >= 2, got 63"),
        "short codes": ((x, a[0][:-1], *a[1:], *b, None), "NF4 data must be uint8 of shape \\(768,\\)"),
        "code dtype": ((x, a[0].int(), *a[1:], *b, None), "NF4 data must be uint8"),
        "short absmax": ((x, a[0], a[1][:-1], *a[2:], *b, None), "NF4 absmax must have shape \\(24,\\)"),
        "int8 codes": ((x, a[0], i8[1], "int8", 0, a[4], *b, None), "int8 data must be int8 of shape \\(24, 64\\)"),
        "int8 scales": ((x, i8[0], i8[1][:-1], *i8[2:], *b, None), "int8 scale must have shape \\(24,\\), got"),
        "int8 scales 2-D": ((x, i8[0], i8[1][:, None], *i8[2:], *b, None), "int8 scale must have shape \\(24,\\)"),
        "int8 blocksize": ((x, *i8[:3], -1, i8[4], *b, None), "int8 blocksize must be 0"),
        "fp shape": ((x, torch.randn(24, 63), None, "fp", 0, [24, 64], *b, None), "fp factor a must be a floating"),
        "fp integer": ((x, torch.ones(24, 64, dtype=torch.int32), None, "fp", 0, [24, 64], *b, None),
                       "fp factor a must be a floating"),
        "bias width": ((x, *a, *b, torch.randn(31)), "bias must be a floating \\(32,\\) vector"),
        "bias 2-D": ((x, *a, *b, torch.randn(1, 32)), "bias must be a floating \\(32,\\) vector"),
        "integer bias": ((x, *a, *b, torch.ones(32, dtype=torch.int64)), "bias must be a floating"),
        "scale device": ((x, a[0], a[1].to("meta"), *a[2:], *b, None),
                         r"every tensor must be on x's device \(cpu\), got one on meta"),
    }


BAD_RANK_LINEAR = _bad_rank_linear_calls()


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("case", list(BAD_RANK_LINEAR))
def test_rank_linear_bad_input_names_the_problem(entry, case):
    args, message = BAD_RANK_LINEAR[case]
    _refused(entry, "rank_linear", args, message, other_device=case == "scale device")


def test_rank_linear_bias_of_another_dtype():
    """A bias in another floating dtype than x is added as the kernels add it, on every entry."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 64, generator=gen)
    a, b = _factor("nf4", 64, torch.randn(24, 64, generator=gen)), _factor("nf4", 32, torch.randn(24, 32))
    bias = torch.randn(32, generator=gen)
    want = rank_linear_reference(x, *a, *b, bias)
    for other in (bias.double(), bias.to(torch.bfloat16)):
        tol = 1e-2 if other.dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(rank_linear_reference(x, *a, *b, other), want, rtol=tol, atol=tol)
        torch.testing.assert_close(torch.ops.adaptwin.rank_linear(x, *a, *b, other), want, rtol=tol, atol=tol)


# Found by a fuzzing pass on 2026-11-26: each of these crashed, read freed memory or differed between backends.

@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("fmt", ["fp", "nf4", "int8"])
@pytest.mark.parametrize("layout", ["strided", "expanded", "bf16 strided"])
def test_rank_linear_non_contiguous_bias(fmt, rows, layout):
    """A bias that is not contiguous: the few-rows path once read a float32 one from a copy freed before use
    (outputs of 1e32 and up)."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(rows, 64, generator=gen)
    a = _factor(fmt, 64, torch.randn(16, 64, generator=gen))
    b = _factor(fmt, 32, torch.randn(16, 32, generator=gen))
    bias = {"strided": torch.randn(64, generator=gen)[::2], "expanded": torch.randn(1, generator=gen).expand(32),
            "bf16 strided": torch.randn(64, generator=gen).to(torch.bfloat16)[::2]}[layout]
    assert not bias.is_contiguous()
    want = rank_linear_reference(x, *a, *b, bias.contiguous())
    for _ in range(3):  # the freed copy's memory is reused by the next allocations
        torch.testing.assert_close(torch.ops.adaptwin.rank_linear(x, *a, *b, bias), want, rtol=1e-4, atol=1e-4)


def test_dequantize_into_refuses_a_stride_that_overflows():
    """(k / group)·stride·n computed in int64 wrapped around past 2^63 and passed the size check: rows were then
    written far outside ``out`` (a crash), or at 2^62 silently over its start."""
    from adaptwin.ops.rank_linear import dequantize_factor

    data, scale = torch.randint(-127, 127, (3, 2), dtype=torch.int8), torch.ones(3)
    out = torch.zeros(64)
    for stride in (3074457345618258603, 2 ** 62):
        with pytest.raises(ValueError, match="overflows int64|at least"):
            dequantize_factor(data, scale, "int8", 0, [3, 2], out, 1, stride)
    assert out.abs().sum() == 0
    short = torch.zeros(5)
    with pytest.raises(ValueError, match="at least 6 elements"):
        dequantize_factor(data, scale, "int8", 0, [3, 2], short, 1, 1)


def test_attention_masks_of_fewer_than_two_dims():
    """A 0-d or 1-D mask broadcasts to (B, H, T, S) as any other: every backend and dtype takes it (float64 (as
    the portable path) goes through SDPA, which indexes a mask's last two dimensions)."""
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=gen), torch.randn(1, 2, 6, 8, generator=gen),
               torch.randn(1, 2, 6, 8, generator=gen))
    for mask in (torch.rand(6, generator=gen) > 0.3, torch.randn(6, generator=gen), torch.tensor(True)):
        want = attention_reference(q, k, v, mask.expand(1, 1, 4, 6), 0.3, False)
        torch.testing.assert_close(attention_reference(q, k, v, mask, 0.3, False), want)
        for dt in (torch.float32, torch.float64):
            got = torch.ops.adaptwin.attention(q.to(dt), k.to(dt), v.to(dt), mask, 0.3, False)
            torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rank_linear_with_no_input_features(dtype):
    """x of shape (3, 0): a product over nothing, so the bias alone (the C++ path took 0 rows for 3 in float64)."""
    x, a, bias = torch.randn(3, 0, dtype=dtype), torch.randn(4, 0, dtype=dtype), torch.randn(4, dtype=dtype)
    for b in (None, bias):
        y = torch.ops.adaptwin.rank_linear(x, a, None, "fp", 0, [4, 0], *NONE, b)
        assert y.shape == (3, 4) and y.dtype == dtype
        torch.testing.assert_close(y, torch.zeros(3, 4, dtype=dtype) + (0 if b is None else b))


def test_attend_with_no_key_heads_names_the_problem():
    from adaptwin.ops.attention import attend

    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 0, 3, 4)
    for need_weights in (False, True):
        with pytest.raises(ValueError, match="must be a multiple of key heads \\(0\\)"):
            attend(q, k, k, None, 0.5, need_weights=need_weights)
