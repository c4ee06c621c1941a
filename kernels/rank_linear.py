"""Triton kernels for ``torch.ops.adaptwin.rank_linear`` (schema: `adaptwin.ops.rank_linear`).

y = (x·Aᵀ)·B + bias, each product one launch of a GEMM whose weight is decoded in registers from its
stored format (fp / NF4 / int8): the weight element (kk, nn) of a product is element kk·s_k + nn·s_n of
the flat direction-major factor, so one kernel serves both x·Aᵀ (s_k = 1, s_n = in) and h·B (s_k = out,
s_n = 1). Rows of x beyond one use tl.dot tiles (16-bit x: the decoded factor cast to x's dtype and a
tensor-core dot when compiled; float32 x and the interpreter: float32 "ieee" dots); a single row (batch-1
decoding) uses a GEMV kernel that reduces over K with elementwise products (a 16-row dot tile would be
15/16 padding). The factors' codes are read once per output tile, never expanded in memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from adaptwin.kernels import interpreting

_FORMATS = {"fp": 0, "nf4": 1, "int8": 2}


@triton.jit
def _decode(w_ptr, scale_ptr, code_ptr, e, ok, ROWLEN, BS, FORMAT: tl.constexpr):
    """float32 values of flat elements ``e`` of a factor (rows of ROWLEN, scale blocks of BS)."""
    if FORMAT == 0:
        w = tl.load(w_ptr + e, mask=ok, other=0.0).to(tl.float32)
    elif FORMAT == 1:
        byte = tl.load(w_ptr + e // 2, mask=ok, other=0).to(tl.int32)
        nib = tl.where(e % 2 == 0, byte >> 4, byte & 15)  # high nibble first
        w = tl.load(code_ptr + nib, mask=ok, other=0.0) * tl.load(scale_ptr + e // BS, mask=ok, other=0.0)
    else:
        group = tl.where(BS == 0, e // ROWLEN, e // tl.maximum(BS, 1))  # per row (BS 0) or per flat block
        w = tl.load(w_ptr + e, mask=ok, other=0).to(tl.float32) * tl.load(scale_ptr + group, mask=ok, other=0.0)
    return w


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, scale_ptr, code_ptr, bias_ptr, out_ptr, M, N, K, sxm, s_k, s_n, ROWLEN, BS,
                 FORMAT: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                    other=0.0)  # (BM, BK)
        ok = (rk[:, None] < K) & (rn[None, :] < N)
        w = _decode(w_ptr, scale_ptr, code_ptr, rk[:, None] * s_k + rn[None, :] * s_n, ok, ROWLEN, BS, FORMAT)
        if DOT_F32:  # true float32 products: a float32 dot defaults to tf32 on GPUs
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:  # 16-bit x: the decoded factor cast to x's dtype (as the reference casts it), tensor-core dot
            acc += tl.dot(x, w.to(x.dtype))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, scale_ptr, code_ptr, bias_ptr, out_ptr, N, K, s_k, s_n, ROWLEN, BS,
                 FORMAT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)  # (BK,)
        ok = (rk[:, None] < K) & (rn[None, :] < N)
        w = _decode(w_ptr, scale_ptr, code_ptr, rk[:, None] * s_k + rn[None, :] * s_n, ok, ROWLEN, BS, FORMAT)
        acc += tl.sum(x[:, None] * w, 0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + rn, acc.to(out_ptr.dtype.element_ty), mask=rn < N)


def _product(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, fmt: str, blocksize: int,
             shape: tuple[int, int], transposed: bool, bias: torch.Tensor | None, out_dtype: torch.dtype
             ) -> torch.Tensor:
    """x (M, K) times the factor: Aᵀ (transposed=True, A of shape (N, K)) or B ((K, N)) -> (M, N)."""
    M = x.shape[0]
    N = shape[0] if transposed else shape[1]
    out = torch.empty((M, N), dtype=out_dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    kernel, grid, args, kwargs = launch(x, w.contiguous(), scale, fmt, blocksize, shape, transposed, bias, out,
                                        _code_on(x.device))
    kernel[grid](*args, **kwargs)
    return out


def launch(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, fmt: str, blocksize: int,
           shape: tuple[int, int], transposed: bool, bias: torch.Tensor | None, out: torch.Tensor,
           code: torch.Tensor) -> tuple:
    """(kernel, grid, positional arguments, keyword arguments) of one product, x (M, K) non-empty and w
    contiguous: the GEMV kernel for one row, the GEMM kernel otherwise.

    Separate from the launch so the exact specialisation a call would compile can also be compiled ahead
    of time for a GPU that is not here (tests/test_kernels_sm90.py)."""
    rows, cols = shape
    M, K = x.shape
    N = out.shape[1]
    s_k, s_n = (1, cols) if transposed else (cols, 1)
    sc = scale.float().contiguous() if scale is not None else code
    b = bias if bias is not None else code
    fmt_id = _FORMATS[fmt]
    if M == 1:
        # narrower output blocks when N is small, so a rank-wide product (N = r) still spreads over the GPU
        block_n = 64 if N >= 64 * 128 or interpreting() else max(16, min(64, triton.next_power_of_2(N // 128)))
        return (_gemv_kernel, (triton.cdiv(N, block_n),), (x, w, sc, code, b, out, N, K, s_k, s_n, cols, blocksize),
                dict(FORMAT=fmt_id, HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=64))
    grid = (triton.cdiv(M, 32), triton.cdiv(N, 32))
    dot_f32 = x.dtype == torch.float32 or interpreting()
    return (_gemm_kernel, grid, (x, w, sc, code, b, out, M, N, K, x.stride(0), s_k, s_n, cols, blocksize),
            dict(FORMAT=fmt_id, HAS_BIAS=bias is not None, DOT_F32=dot_f32, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32))


_CODES: dict[torch.device, torch.Tensor] = {}


def _code_on(device: torch.device) -> torch.Tensor:
    """The NF4 code book on ``device``, copied there once (not a host-to-device copy per call)."""
    if device not in _CODES:
        from adaptwin.quant.nf4 import NF4_CODE

        _CODES[device] = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    return _CODES[device]


def middle_dtype(x: torch.Tensor) -> torch.dtype:
    """dtype of the rank-wide intermediate x·Aᵀ for x (M, in): float32 for one row (free there) and for
    float32 x; with more rows of 16-bit x it is rounded to x's dtype, as the reference rounds it, so the
    second GEMM also runs on tensor cores (a float32 operand would force the slow exact float32 dot)."""
    return torch.float32 if x.shape[0] == 1 or x.dtype == torch.float32 or interpreting() else x.dtype


def rank_linear(x, a, a_scale, a_format, a_blocksize, a_shape, b, b_scale, b_format, b_blocksize, b_shape, bias):
    """Launcher with the op's signature (see `adaptwin.ops.rank_linear`); float32 accumulation, x's dtype out."""
    from adaptwin.ops.rank_linear import _check

    width = _check(x, a, a_scale, a_format, a_shape, b, b_scale, b_format, b_shape)
    lead = x.shape[:-1]
    h = x.reshape(-1, x.shape[-1]).contiguous()  # (M, in)
    mid = middle_dtype(h)
    if a is not None:
        a_shape = (int(a_shape[0]), int(a_shape[1]))
        h = _product(h, a, a_scale, a_format, a_blocksize, a_shape, True, bias if b is None else None,
                     mid if b is not None else x.dtype)  # (M, k)
    if b is not None:
        b_shape = (int(b_shape[0]), int(b_shape[1]))
        h = _product(h, b, b_scale, b_format, b_blocksize, b_shape, False, bias, x.dtype)  # (M, out)
    return h.reshape(*lead, width).to(x.dtype)
