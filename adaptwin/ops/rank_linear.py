"""``torch.ops.adaptwin.rank_linear``: y = (x·Aᵀ)·B + bias with A and B stored plain, NF4-packed or int8.

Schema (declared once here; C++/Triton/CUDA backends register kernels for exactly this op)::

    adaptwin::rank_linear(Tensor x,
                          Tensor? a, Tensor? a_scale, str a_format, int a_blocksize, SymInt[] a_shape,
                          Tensor? b, Tensor? b_scale, str b_format, int b_blocksize, SymInt[] b_shape,
                          Tensor? bias) -> Tensor

Both factors are stored *direction-major*: one row per rank direction, so a block of scales never mixes
two directions (the SVD's directions differ in norm by orders of magnitude).

    x        (..., in) floating; any number of leading dims (batched, or batch-1 decode (1, 1, in)).
    a        in factor A, logical shape a_shape = (k, in): h = x·Aᵀ, (..., k). None: h = x (then b is given;
             pass `ABSENT` for the five arguments of a missing factor).
    b        out factor B, logical shape b_shape = (k, out): y = h·B, (..., out). None: y = h.
    bias     (out,) or None, added last.
    *_format "fp": the tensor is the factor itself (any float dtype; *_scale None, *_blocksize ignored)
             "nf4": uint8 (ceil(k·n/2),) two codes per byte, *_scale float32 absmax (ceil(k·n/blocksize),)
                    (double-quantised scales are expanded by the caller: ceil(k·n/64) floats)
             "int8": int8 (k, n), *_scale float32: per row (k,) when *_blocksize is 0, else per flat block
    returns  (..., out) in x's dtype. Factors are dequantised in float32 and cast to x's dtype before each
             GEMM (the layouts are in `adaptwin.quant.nf4` / `adaptwin.quant.int8`).

Backends: the CPU C++ kernel (``csrc/cpu/rank_linear.cpp``: for at most 8 rows of x, e.g. batch-1
decoding, the packed codes are decoded 512 at a time into L1 and consumed at once, x·Aᵀ stays in cache;
NF4 and int8 factors with 32-code-aligned scale groups are decoded in registers, once per 8 rows, up to
32 rows (16 for bf16 x); more rows dequantise each factor once and run two GEMMs), CUDA C++ (``csrc/cuda``) and Triton
(``kernels/rank_linear.py``) register for this op; `adaptwin.ops.backends` loads them.

The reference implementation (every device) dequantises with `adaptwin.quant.dequantize` (vectorised:
a gather and a broadcast multiply, no loop over blocks) and runs two GEMMs; the dense out×in matrix is
never formed. Autograd: gradients flow to x, to "fp" factors and to bias; packed codes get none (a
quantised layer trains through fp master factors with fake quantisation, see
`adaptwin.compressors.quantized`).
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from adaptwin import quant
from adaptwin.ops.backends import FAST, _is_compiling, call_without_autograd

FORMATS = ("fp", *quant.FORMATS)
# An absent factor in the op's argument order (data, scale, format, blocksize, shape). Any shape is accepted
# for an absent factor; the library passes [0, 0], not []: AOTInductor's proxy executor hands an empty
# SymInt[] to the op as None, and the call fails (torch 2.13; pytorch/pytorch#194324).
ABSENT = (None, None, "fp", 0, [0, 0])


def _factor(t: Tensor, scale: Tensor | None, fmt: str, blocksize: int, shape: Sequence[int],
            dtype: torch.dtype) -> Tensor:
    """The (k, n) factor in ``dtype``."""
    if fmt == "fp":
        return t.to(dtype)
    return quant.dequantize(t, scale, fmt, blocksize, tuple(int(s) for s in shape), dtype)


def _check_factor(name: str, t: Tensor, scale: Tensor | None, fmt: str, blocksize: int, shape: Sequence[int]) -> None:
    """One present factor's storage against its format and logical (k, n) shape (the C++ kernels check the same,
    csrc/rank_linear_checks.h): the fused kernels index the packed codes and scales by these sizes."""
    if fmt not in FORMATS:
        raise ValueError(f"rank_linear: {name}_format must be one of {FORMATS}, got {fmt!r}")
    if len(shape) != 2 or shape[0] < 0 or shape[1] < 0:
        raise ValueError(f"rank_linear: {name}_shape must be (k, features), two sizes >= 0, got {list(shape)}")
    k, n = shape
    if fmt == "fp":
        if tuple(t.shape) != (k, n) or not t.is_floating_point():
            raise ValueError(f"rank_linear: fp factor {name} must be a floating ({k}, {n}) matrix as {name}_shape "
                             f"says, got {t.dtype} {tuple(t.shape)}")
        return
    if scale is None:
        raise ValueError(f"rank_linear: {fmt} factor {name} needs {name}_scale")
    if not scale.is_floating_point():
        raise ValueError(f"rank_linear: {name}_scale must be floating, got {scale.dtype}")
    if k * n > 2 ** 62:  # the C++ kernels compute sizes in int64
        raise ValueError(f"rank_linear: {name}_shape must hold at most 2^62 values, got {list(shape)}")
    numel = k * n
    if fmt == "nf4":
        if blocksize < 2 or blocksize % 2:
            raise ValueError(f"rank_linear: NF4 blocksize must be an even whole number >= 2, got {blocksize}")
        if t.dtype != torch.uint8 or t.dim() != 1 or t.numel() != (numel + 1) // 2:
            raise ValueError(f"rank_linear: NF4 data must be uint8 of shape ({(numel + 1) // 2},) for {numel} values, "
                             f"got {t.dtype} {tuple(t.shape)}")
        blocks = -(-numel // blocksize)
        if scale.dim() != 1 or scale.numel() != blocks:
            raise ValueError(f"rank_linear: NF4 absmax must have shape ({blocks},) for {numel} values in blocks of "
                             f"{blocksize}, got {tuple(scale.shape)}")
    else:
        if blocksize < 0:
            raise ValueError(f"rank_linear: int8 blocksize must be 0 (per row) or > 0, got {blocksize}")
        if t.dtype != torch.int8 or tuple(t.shape) != (k, n):
            raise ValueError(f"rank_linear: int8 data must be int8 of shape ({k}, {n}), got {t.dtype} "
                             f"{tuple(t.shape)}")
        groups = k if blocksize == 0 else -(-numel // blocksize)
        if scale.dim() != 1 or scale.numel() != groups:
            raise ValueError(f"rank_linear: int8 scale must have shape ({groups},), got {tuple(scale.shape)}")


def _check(x: Tensor, a: Tensor | None, a_scale: Tensor | None, a_format: str, a_blocksize: int,
           a_shape: Sequence[int], b: Tensor | None, b_scale: Tensor | None, b_format: str, b_blocksize: int,
           b_shape: Sequence[int], bias: Tensor | None) -> int:
    """Validate the arguments as every backend does; return the output width."""
    if a is None and b is None:
        raise ValueError("rank_linear needs at least one factor (a or b)")
    if x.dim() == 0:
        raise ValueError("rank_linear: x must have a last dimension of features (..., in), got a 0-d tensor")
    if not x.is_floating_point():
        raise ValueError(f"rank_linear: x must be floating, got {x.dtype}")
    for t in (a, a_scale, b, b_scale, bias):
        if t is not None and t.device != x.device:
            raise ValueError(f"rank_linear: every tensor must be on x's device ({x.device}), got one on {t.device}")
    width = x.shape[-1]
    for name, t, scale, fmt, blocksize, shape in (("a", a, a_scale, a_format, a_blocksize, a_shape),
                                                  ("b", b, b_scale, b_format, b_blocksize, b_shape)):
        if t is None:
            continue
        _check_factor(name, t, scale, fmt, blocksize, shape)
        if name == "a":
            if shape[1] != width:
                raise ValueError(f"rank_linear: x has {width} features, factor a expects {shape[1]}")
            width = shape[0]
        elif shape[0] != width:
            raise ValueError(f"rank_linear: factor b has rank {shape[0]}, its input has {width} features")
        else:
            width = shape[1]
    if bias is not None and (not bias.is_floating_point() or bias.dim() != 1 or bias.shape[0] != width):
        raise ValueError(f"rank_linear: bias must be a floating ({width},) vector (the output's width), got "
                         f"{bias.dtype} {tuple(bias.shape)}")
    return width


def rank_linear_reference(
    x: Tensor,
    a: Tensor | None, a_scale: Tensor | None, a_format: str, a_blocksize: int, a_shape: Sequence[int],
    b: Tensor | None, b_scale: Tensor | None, b_format: str, b_blocksize: int, b_shape: Sequence[int],
    bias: Tensor | None,
) -> Tensor:
    """The op's reference implementation (the oracle of the fused kernels' tests and their fallback)."""
    _check(x, a, a_scale, a_format, a_blocksize, a_shape, b, b_scale, b_format, b_blocksize, b_shape, bias)
    if bias is not None:
        bias = bias.to(x.dtype)  # any floating dtype, as the kernels take it
    h = x if a is None else F.linear(x, _factor(a, a_scale, a_format, a_blocksize, a_shape, x.dtype))  # (..., k)
    if b is None:
        return h + bias if bias is not None else h.clone() if a is None else h
    return F.linear(h, _factor(b, b_scale, b_format, b_blocksize, b_shape, x.dtype).t(), bias)  # (..., out)


@torch.library.custom_op("adaptwin::rank_linear", mutates_args=())
def rank_linear(
    x: Tensor,
    a: Tensor | None, a_scale: Tensor | None, a_format: str, a_blocksize: int, a_shape: Sequence[int],
    b: Tensor | None, b_scale: Tensor | None, b_format: str, b_blocksize: int, b_shape: Sequence[int],
    bias: Tensor | None,
) -> Tensor:
    return rank_linear_reference(x, a, a_scale, a_format, a_blocksize, a_shape,
                                 b, b_scale, b_format, b_blocksize, b_shape, bias)


@rank_linear.register_fake
def _(x, a, a_scale, a_format, a_blocksize, a_shape, b, b_scale, b_format, b_blocksize, b_shape, bias):
    out = _check(x, a, a_scale, a_format, a_blocksize, a_shape, b, b_scale, b_format, b_blocksize, b_shape, bias)
    return x.new_empty((*x.shape[:-1], out))


def _setup_context(ctx, inputs, output) -> None:
    x, a, a_scale, a_format, a_blocksize, a_shape, b, b_scale, b_format, b_blocksize, b_shape, bias = inputs
    ctx.save_for_backward(x, a, a_scale, b, b_scale)
    ctx.meta = (a_format, a_blocksize, tuple(a_shape), b_format, b_blocksize, tuple(b_shape), bias is not None)


def _backward(ctx, gy: Tensor):
    x, a, a_scale, b, b_scale = ctx.saved_tensors
    a_format, a_blocksize, a_shape, b_format, b_blocksize, b_shape, has_bias = ctx.meta
    need = ctx.needs_input_grad
    dtype = x.dtype
    A = None if a is None else _factor(a, a_scale, a_format, a_blocksize, a_shape, dtype)  # (k, in)
    h = x if A is None else F.linear(x, A)  # (..., k), recomputed rather than saved
    g_a = g_b = g_bias = None
    if has_bias and need[11]:
        g_bias = gy.reshape(-1, gy.shape[-1]).sum(0)
    if b is not None:
        B = _factor(b, b_scale, b_format, b_blocksize, b_shape, dtype)  # (k, out)
        if b_format == "fp" and need[6]:
            g_b = (h.reshape(-1, h.shape[-1]).t() @ gy.reshape(-1, gy.shape[-1])).to(b.dtype)  # (k, out)
        gh = F.linear(gy, B)  # (..., k)
    else:
        gh = gy
    if A is not None:
        if a_format == "fp" and need[1]:
            g_a = (gh.reshape(-1, gh.shape[-1]).t() @ x.reshape(-1, x.shape[-1])).to(a.dtype)  # (k, in)
        gx = gh @ A if need[0] else None  # (..., in)
    else:
        gx = gh if need[0] else None
    return gx, g_a, None, None, None, None, g_b, None, None, None, None, g_bias


rank_linear.register_autograd(_backward, setup_context=_setup_context)

_OP = torch.ops.adaptwin.rank_linear.default


def dequantize_factor(data: Tensor, scale: Tensor | None, fmt: str, blocksize: int, shape: Sequence[int],
                      out: Tensor | None = None, group: int = 1, stride: int = 1) -> Tensor:
    """The ``shape`` = (k, n) float32 matrix one `rank_linear` factor stores (its arguments as the op takes
    them): decoded by the CPU kernels' own loops where ``adaptwin._C`` takes the call (CPU tensors, eager,
    no gradient to record: 11 us for a 122 x 1536 NF4 factor on the 2-core CPU), else by the reference
    (`adaptwin.quant.dequantize`, 455 us there). The values are the same either way, bit for bit.

    With ``out`` (a contiguous float32 tensor), row r goes to row (r // group)·stride + r % group of ``out``
    viewed as (-1, n), the other rows are left as they are, and ``out`` is returned: a compressed module
    decodes each head's spectral directions straight into its full matrix, between its LoRA ones."""
    fast = FAST.get("dequantize")
    if fast is not None and not _is_compiling():
        w = fast(data, scale, fmt, int(blocksize), list(shape), *((out, int(group), int(stride)) if out is not None
                                                                 else ()))
        if w is not NotImplemented:
            return w
    k, n = int(shape[0]), int(shape[1])
    w = data.float() if fmt == "fp" else quant.dequantize(data, scale, fmt, int(blocksize), (k, n))
    if out is None:
        return w
    if group < 1 or stride < group or k % group:
        raise ValueError(f"dequantize: group must be >= 1 and divide {k} rows, stride >= group; got group {group}, "
                         f"stride {stride}")
    need = k // group * stride * n
    if out.dtype != torch.float32 or not out.is_contiguous() or out.numel() < need:
        raise ValueError(f"dequantize: out must be a contiguous float32 tensor of at least {need} elements, got "
                         f"{out.dtype} {tuple(out.shape)}")
    out.view(-1)[: k // group * stride * n].view(k // group, stride, n)[:, :group] = w.view(k // group, group, n)
    return out


# Rows of x up to which a linear layer's CPU inference call takes the GEMV (`takes_gemv`): float32 weights of
# GEMV_LARGE elements or more (an output head) up to GEMV_ROWS_LARGE, bfloat16 ones up to GEMV_ROWS_LARGE_BF16,
# smaller weights and the factors of `LowRankLinear` up to GEMV_ROWS. On the 2-core Zen 4 (2 threads, p50 us,
# GEMV / F.linear; csrc/cpu/fp_gemv.h's kernels; `python -m benchmarks.gemv_rows` measures it):
#   bfloat16, rows 1 / 2 / 3 / 4 / 6 / 8:
#     51865 x 384   1081/2821 1345/2828 1520/2602 2056/3413 3025/3550 3744/3163
#     240 x 384     5.5/25.3 6.7/25.4 8.6/25.6 10.6/26.0 14.5/27.0 18.9/26.7
#     1536 x 136    13.8/32.4 14.9/34.2 20.9/34.3 27.0/35.6 40.0/37.3 52.6/40.7
#     136 x 1536    7.4/35.9 11.7/36.5 18.7/38.7 24.6/39.5 36.3/43.0 47.3/46.7
#   float32:
#     51865 x 384   2778/8517 2506/20373 2434/30142 2789/13622 3252/13068 4488/12322
#     240 x 384     6.0/9.1 6.8/16.2 8.7/36.6 13.3/21.6 16.8/22.8 20.6/23.3
#     1536 x 136    10.6/24.5 16.7/44.1 24.2/60.3 29.6/46.9 46.8/47.9 58.5/49.0
#     136 x 1536    9.0/17.1 12.8/32.3 21.1/44.3 23.7/44.8 33.5/46.0 41.9/48.0
# Under the AVX2 caps (torch, oneDNN, MKL and adaptwin; the kernels' AVX2 paths) the GEMV won at 1-4 rows in
# every case but bfloat16 136 x 1536 (15.6 / 15.2 us at one row, even to four) and 384 -> 240 at one row
# (11.4 / 15.6 and 10.9 / 9.5 in two runs).
GEMV_ROWS = 4
GEMV_ROWS_LARGE = 8
GEMV_ROWS_LARGE_BF16 = 6
GEMV_LARGE = 1 << 22


_GEMV_DTYPES = (torch.float32, torch.bfloat16)


def gemv_rows(weight: Tensor) -> int:
    """Rows of x up to which a call on ``weight`` takes the GEMV path (0: never, for other dtypes)."""
    if weight.dtype not in _GEMV_DTYPES:
        return 0
    if weight.numel() < GEMV_LARGE:
        return GEMV_ROWS
    return GEMV_ROWS_LARGE if weight.dtype == torch.float32 else GEMV_ROWS_LARGE_BF16


def parameters_of(module: torch.nn.Module, names: tuple[str, ...]) -> tuple[Tensor | None, ...]:
    """The module's parameters ``names`` (None where registered as None), read from ``module._parameters``: 0.1 us
    where each attribute takes 0.6 us through `nn.Module.__getattr__`, and a decoding step calls a linear layer's
    forward tens of times (with `takes_gemv`'s checks as they are now, a one-row 384 -> 240 float32 `GemvLinear`
    call went from 12.4-15.5 to 9.6-11.5 us). A parametrized one (`torch.nn.utils.parametrize`: a property,
    no longer in ``_parameters``) is read as an attribute."""
    params = module._parameters
    try:
        return tuple(params[name] for name in names)
    except KeyError:
        return tuple(getattr(module, name) for name in names)


def takes_gemv(x: Tensor, params: Sequence[Tensor | None], max_rows: int) -> bool:
    """Whether a linear layer's call of ``x`` on ``params`` (its weights and bias; None skipped) takes the CPU
    kernels' GEMV through `run_rank_linear` (`adaptwin.fusion.GemvLinear`, `LowRankLinear`): float32 / bfloat16
    x on the CPU with at most ``max_rows`` rows, every parameter of x's dtype, no gradient to record. Under
    ``torch.compile`` such a call traces as the op, one graph node (Inductor would otherwise run the few-row
    product as MKL's sgemv: a compiled float32 Whisper-tiny decoding step, static cache, took 12.4-13.5 ms that
    way against 5.6-6.0 ms with the op; eager 5.8-7.3)."""
    dtype = x.dtype  # (x.is_cpu: 0.08 us where x.device.type took 0.36; this runs on every decoding call)
    if dtype not in _GEMV_DTYPES or not x.is_cpu or x.dim() == 0 or x.numel() > max_rows * x.shape[-1]:
        return False
    grad = torch.is_grad_enabled()
    if grad and x.requires_grad:
        return False
    for p in params:
        if p is not None and (p.dtype != dtype or (grad and p.requires_grad)):
            return False
    return True


def run_rank_linear(
    x: Tensor,
    a: Tensor | None, a_scale: Tensor | None, a_format: str, a_blocksize: int, a_shape: Sequence[int],
    b: Tensor | None, b_scale: Tensor | None, b_format: str, b_blocksize: int, b_shape: Sequence[int],
    bias: Tensor | None,
) -> Tensor:
    """`rank_linear` as modules call it: the same op, run below the autograd key when there is no gradient to
    record (grad mode off, or no argument requires grad): through ``adaptwin._C``'s entry point where it
    takes the call (`backends.FAST`), else `backends.call_without_autograd`."""
    fast = FAST.get("rank_linear")
    if fast is not None and not _is_compiling():
        y = fast(x, a, a_scale, a_format, a_blocksize, a_shape, b, b_scale, b_format, b_blocksize, b_shape, bias)
        if y is not NotImplemented:
            return y
    if torch.is_grad_enabled() and (x.requires_grad or (a is not None and a.requires_grad)
                                    or (b is not None and b.requires_grad)
                                    or (bias is not None and bias.requires_grad)):
        return _OP(x, a, a_scale, a_format, a_blocksize, a_shape, b, b_scale, b_format, b_blocksize, b_shape, bias)
    return call_without_autograd(_OP, x, a, a_scale, a_format, a_blocksize, a_shape,
                                 b, b_scale, b_format, b_blocksize, b_shape, bias)
