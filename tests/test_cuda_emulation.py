"""The CUDA C++ backend's kernels, run on the CPU: no GPU has run them yet, so their device code is compiled
here for the CPU (tests/cuda_emulation.cpp: the CUDA keywords defined away, blockIdx / threadIdx as plain
variables) and run over the grids their launchers use, then checked against the op references.

What this covers: the kernels' indexing (strides, grouped key/value heads, the flat layout of each
factor), masks, causal cut, online softmax, NF4 / int8 decoding, the width template bounds, and attention
in float16 / bfloat16 (c10's host Half / BFloat16 types, whose conversions round as the device's do). What
it cannot: anything CUDA-specific (launch limits, the device math library's __expf, memory, streams); those
wait for a GPU (tests/test_kernels_cuda.py). The launchers' host logic (which product is transposed, where
the bias goes, the mask's widening) is mirrored in `_attention` and `_rank_linear` below, line for line from
csrc/cuda/*.cu.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adaptwin.ops.attention import attention_reference
from adaptwin.ops.rank_linear import rank_linear_reference

sys.path.insert(0, os.path.dirname(__file__))
from test_kernels_cpu import (  # noqa: E402
    NON_FINITE,
    _factor,
    _mask,
    _to,
    assert_nan_rows_as_sdpa,
    assert_within_twice,
    masked_throughout,
    non_finite_case,
    seed,
)

ROOT = Path(__file__).resolve().parents[1]
FORMATS = {"fp": 0, "nf4": 1, "int8": 2}  # csrc/cuda/rank_linear_kernel.cuh's Format
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # tests/cuda_emulation.cpp's codes


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    out = tmp_path_factory.mktemp("cuda_emulation") / "emulation.so"
    from torch.utils.cpp_extension import include_paths  # c10's Half / BFloat16 (header-only use)

    cmd = [cxx, "-std=c++17", "-O2", "-shared", "-fPIC", "-Wall", "-Werror", f"-I{ROOT / 'csrc' / 'cuda'}",
           *(f"-I{p}" for p in include_paths()), str(ROOT / "tests" / "cuda_emulation.cpp"), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    so = ctypes.CDLL(str(out))
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    so.emulate_attention.argtypes = [ptr] * 6 + [ctypes.c_int] * 7 + [f32] + [ctypes.c_int] * 3
    so.emulate_attention.restype = ctypes.c_int
    so.emulate_product.argtypes = [ptr] * 5 + [i64] * 7 + [ctypes.c_int]
    return so


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _attention(lib, q, k, v, mask, scale: float, causal: bool) -> torch.Tensor:
    """attention.cu's host side: k and v in q's dtype, mask widened to float32 unless boolean and expanded to
    (B, H, T, S); output (B, T, H, Dv) in q's dtype."""
    b, h, t, dq = q.shape
    hkv, s, dv = k.shape[1], k.shape[2], v.shape[3]
    kind = 0 if mask is None else (2 if mask.dtype == torch.bool else 1)
    m = None if mask is None else (mask if kind == 2 else mask.float()).expand(b, h, t, s)
    k, v = k.to(q.dtype), v.to(q.dtype)
    out = torch.full((b, t, h, dv), float("nan"), dtype=q.dtype)
    strides = torch.tensor([*q.stride(), *k.stride(), *v.stride(), *(m.stride() if m is not None else (0,) * 4)],
                           dtype=torch.int64)
    rc = lib.emulate_attention(_ptr(q), _ptr(k), _ptr(v), _ptr(m), _ptr(out), _ptr(strides), b, h, hkv, t, s, dq,
                               dv, scale, int(causal), kind, DTYPES[q.dtype])
    assert rc == 0, f"no template instance for widths {dq}, {dv}"
    return out


ATTENTION_CASES = [  # (B, H, Hkv, T, S, Dq, Dv, causal, mask)
    (1, 2, 2, 1, 37, 20, 20, False, None),
    (2, 3, 3, 59, 59, 40, 24, False, "bool"),
    (1, 4, 2, 45, 45, 13, 9, True, None),  # grouped key/value heads, causal
    (2, 2, 1, 33, 70, 52, 52, False, "float"),
    (1, 2, 2, 40, 40, 100, 64, True, "float_keys"),  # the 128 instance
    (1, 1, 1, 17, 300, 200, 7, False, "bool_keys"),  # the 256 instance
    (1, 2, 2, 1500, 1500, 40, 40, True, None),  # a 30 s Whisper window
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "B{}H{}kv{}T{}S{}q{}v{}-{}-{}".format(*c))
def test_cuda_attention_kernel_emulated(lib, case, dtype):
    b, h, hkv, t, s, dq, dv, causal, kind = case
    gen = torch.Generator().manual_seed(seed(case))
    q, k, v = (torch.randn(b, n, m, d, generator=gen).to(dtype)
               for n, m, d in ((h, t, dq), (hkv, s, dq), (hkv, s, dv)))
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, T, H, D) memory, as the modules' views give
    mask = _mask(kind, b, h, t, s, gen)
    scale = dq ** -0.5
    out = _attention(lib, q, k, v, mask, scale, causal)
    ref64 = attention_reference(q.double(), k.double(), v.double(), _to(mask, torch.float64), scale, causal)
    assert_within_twice(out, attention_reference(q, k, v, mask, scale, causal), ref64)


@pytest.mark.parametrize("kind", ["bool", "neg_inf", "finfo_min", "finfo_min_bf16"])
def test_cuda_attention_kernel_query_with_every_key_masked(lib, kind):
    """As SDPA: zeros where every key is masked out (False, -inf); the values' mean where a finite mask
    (finfo.min) hides them all."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, n, 8, generator=gen) for n in (5, 9, 9))
    mask = masked_throughout(kind, 5, 9, 2, gen)
    out = _attention(lib, q, k, v, mask, 0.3, False)
    assert torch.isfinite(out).all()
    if kind in ("bool", "neg_inf"):
        assert torch.equal(out[:, 2], torch.zeros(1, 2, 8))
    else:
        torch.testing.assert_close(out[:, 2], v.mean(2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, attention_reference(q, k, v, mask, 0.3, False), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("where,mask_kind", NON_FINITE)
def test_cuda_attention_kernel_non_finite_inputs_give_nan_rows_as_sdpa(lib, where, mask_kind, dtype):
    """A NaN or infinite entry of q or k makes the rows that score it NaN, as SDPA (a False keep-mask entry
    adds -inf, so a NaN score stays NaN; keys past the causal cut are not read)."""
    gen = torch.Generator().manual_seed(seed((where, mask_kind)))
    q, k, v, mask, causal = non_finite_case(6, 40, where, mask_kind, gen)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    assert_nan_rows_as_sdpa(_attention(lib, q, k, v, mask, 0.25, causal), q, k, v, mask, causal, 0.25)


def _product(lib, x, factor, transposed: bool, bias):
    """rank_linear.cu's `product`: x (M, K) float32 times the factor (its transpose when ``transposed``)."""
    data, scale, fmt, bs, (fk, fn) = factor
    data = data.float().contiguous() if fmt == "fp" else data.contiguous()
    m, k = x.shape
    n = fk if transposed else fn
    assert k == (fn if transposed else fk)
    s_k, s_n = (1, fn) if transposed else (fn, 1)
    out = torch.full((m, n), float("nan"))
    scale = None if scale is None else scale.float().contiguous()
    bias = None if bias is None else bias.float().contiguous()
    lib.emulate_product(_ptr(x), _ptr(data), _ptr(scale), _ptr(bias), _ptr(out), m, n, k, s_k, s_n, fn, bs,
                        FORMATS[fmt])
    return out


def _rank_linear(lib, x, a, b, bias):
    """rank_linear.cu's `rank_linear_cuda`: h = x·Aᵀ (bias here when there is no B), then h·B (+ bias)."""
    h = x.float().reshape(-1, x.shape[-1]).contiguous()
    if a is not None:
        h = _product(lib, h, a, True, bias if b is None else None)
    if b is not None:
        h = _product(lib, h, b, False, bias)
    return h.reshape(*x.shape[:-1], h.shape[-1])


LINEAR_CASES = [  # (rows, in, rank, out, format, blocksize, which factors)
    (1, 384, 96, 384, "nf4", 64, "ab"),
    (1, 384, 1, 384, "nf4", 64, "ab"),  # rank 1
    (3, 384, 64, 431, "nf4", 64, "ab"),
    (3, 431, 37, 433, "nf4", 64, "ab"),
    (5, 416, 29, 480, "int8", 0, "ab"),  # per-row scales
    (2, 384, 40, 96, "int8", 64, "ab"),  # flat blocks
    (7, 64, 13, 50, "fp", 0, "ab"),
    (4, 96, 24, 80, "nf4", 32, "a"),  # one factor: the bias goes with x·Aᵀ
    (4, 96, 24, 80, "int8", 0, "b"),
]


@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: "M{}-{}x{}x{}-{}{}-{}".format(*c))
def test_cuda_rank_linear_kernel_emulated(lib, case):
    rows, d_in, r, d_out, fmt, bs, which = case
    gen = torch.Generator().manual_seed(seed(case))
    a = _factor(fmt, bs, torch.randn(r, d_in, generator=gen) / d_in ** 0.5) if "a" in which else None
    out_w = d_out if "b" in which else r
    b = _factor(fmt, bs, torch.randn(r if "a" in which else d_in, d_out, generator=gen)) if "b" in which else None
    x = torch.randn(2, rows, d_in, generator=gen)
    bias = torch.randn(out_w, generator=gen)
    none = (None, None, "fp", 0, [])
    out = _rank_linear(lib, x, a, b, bias)
    ref = rank_linear_reference(x, *(a or none), *(b or none), bias)
    ref64 = rank_linear_reference(x.double(), *(a or none), *(b or none), bias.double())
    assert out.shape == ref.shape
    assert_within_twice(out, ref, ref64)
