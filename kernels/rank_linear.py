"""The Triton launcher of ``torch.ops.adaptwin.rank_linear`` (schema: `adaptwin.ops.rank_linear`) and its
launch planning; the kernels are in `rank_gemv` (whole-byte GEMVs), `rank_gemv_one` (the one-launch GEMV) and
`rank_tiles` (the rest).

y = (x·Aᵀ)·B + bias; factors are stored fp / NF4 / int8. `plan` picks the launches:
- one row of x (batch-1 decoding, the memory-bound case): the factors are decoded in registers, never expanded
  in memory. With NF4 they are read as whole bytes (both nibbles of a byte used, contiguous loads), each
  code's value comes from one ``shfl.sync.idx`` (``GATHER`` 2, the GPU default: lane i of the warp holds
  entry i mod 16 of the book; 1.6-1.8x the select tree `nf4_value` on an H100 at 4096²-8192²; GATHER True,
  Triton's gather from a register table, costs 2 shuffles and a select per code; the select tree under the
  interpreter) and the scale block size is a compile-time constant.
  x·Aᵀ reads A's rows (codes packed along K) and is split over K so
  that a rank-wide output still fills the GPU; its float32 partial rows are summed by the h·B kernel as it
  loads h. h·B reads B's rows (codes packed along N), each byte giving two neighbouring outputs, split over
  byte columns and over K (float32 partial outputs, then a small sum kernel). On sm_90 each kernel is launched
  with programmatic dependent launch (`rank_gemv.pdl_kwargs`). Both prefetch their next tile's
  bytes. ``gemv="one_launch"`` runs the call as one kernel instead (`rank_gemv_one._gemv_nf4_one_launch_kernel`:
  atomic float32 sums and a ticket per column chunk; 2.5-4x slower than the three launches on an H100 at every
  size timed, so off by default).
- several rows (prefill, encoders, batches; ``decode="once"``, the default): a quantised factor is
  decoded once per call into x's dtype (`_dequant_kernel`, one launch per factor), then the products
  run on dense factors. Decoding inside the row tiles instead repeats the decode for every block of
  rows, and on an H100 that made NF4 5-9x slower than the same call on fp16 factors. With both
  factors, a rank of at most `FUSED_MAX_RANK` and enough row and column blocks to occupy the GPU,
  `_fused_kernel` runs both products in one launch: each program keeps its rows of h = x·Aᵀ in
  registers and multiplies them by B's column tiles, so h never reaches memory. Otherwise (few
  programs: long K with few rows, where one program would walk all of K) cuBLAS runs the two
  products (`_cublas_products`), as the reference does.
- ``decode="tiles"`` keeps the decoding in the tiled kernels for several rows too (the one-launch
  kernel, or per product `_gemm_kernel`: NF4 as whole bytes, the nibbles multiplying x's even and odd
  columns for x·Aᵀ or giving B's even and odd output columns): what decoding once buys, in the
  benchmarks.
16-bit x: factors in x's dtype, tensor-core dots, the intermediate rounded to x's dtype as the
reference rounds it; float32 x and the interpreter: float32 "ieee" dots.
"""

from __future__ import annotations

import torch
from adaptwin.kernels import cdiv, interpreting, next_pow2, sm_count, with_launch_options
from adaptwin.kernels.rank_gemv import (
    GEMV_MAX_SPLITS,
    GEMV_WAVES,
    Launch,
    _gemv_nf4_rows_kernel,
    by_width,
    cols_launches,
    pdl_kwargs,
)
from adaptwin.kernels.rank_gemv_one import ONE_LAUNCH_MAX_ROWS, one_launch
from adaptwin.kernels.rank_tiles import _dequant_kernel, _fused_kernel, _gemm_kernel, _gemv_kernel

_FORMATS = {"fp": 0, "nf4": 1, "int8": 2}
# Ranks up to which several rows of x take the one-launch kernel (h in registers: BLOCK_M x 64 floats)
FUSED_MAX_RANK = 64
# Batch-1 x·Aᵀ tiles on a GPU by K (the first entry whose bound K is within): the best of benchmarks.gpu_kernels
# --tune on an H100 at d = 1024, 2048, 4096 and 8192 (2026-11-26): 4.5, 7.7, 11.0 and 22.8 us a call as defaults,
# with h·B's (`rank_gemv.GEMV_COLS_TILES`), against 8.0, 9.9, 11.0 and 22.8 with the 8192² tiles at every size
GEMV_ROWS_TILES = ((1024, {"BLOCK_N": 32, "GROUPS": 2, "num_warps": 4}),
                   (2048, {"BLOCK_N": 32, "GROUPS": 8, "num_warps": 8, "WAVES": 2, "MAX_SPLITS": 8}),
                   (None, {"BLOCK_N": 16, "GROUPS": 4, "num_warps": 8}))
# `plan`'s config: tiles per kernel, the switches
CONFIG_KEYS = {"rows", "cols", "fused", "fuse", "decode", "gemv", "one_launch", "pdl"}
DECODES = ("once", "tiles")  # several rows: quantised factors decoded once per call, or in every row tile
GEMVS = ("split", "one_launch")  # batch-1 NF4 with both factors: x·Aᵀ, h·B (and a K-split sum), or one launch
DEQUANT_BLOCK = 1024  # factor elements per program of `_dequant_kernel`


class TorchStep:
    """A step of a launch plan that torch runs (cuBLAS on CUDA), in the plan's (kernel, grid, args, kwargs)
    form: ``step[grid](*args, **kwargs)`` calls ``fn``; ``step.fn.__name__`` names it, as a Triton
    kernel's does. Ahead-of-time compiles (tests/test_kernels_sm90.py) skip these."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def __getitem__(self, grid):
        return self.fn


def _cublas_products(x: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None, bias: torch.Tensor | None,
                     out: torch.Tensor) -> None:
    """out = (x·Aᵀ)·B + bias on dense factors in x's dtype (A (R, K), B (R, N), either may be None): torch's
    matrix products (cuBLAS on CUDA), h in x's dtype, as `rank_linear_reference` computes it."""
    if a is not None and b is not None:
        x, w = torch.mm(x, a.t()), b
    else:
        w = a.t() if a is not None else b
    if bias is not None:
        torch.addmm(bias.to(x.dtype), x, w, out=out)
    else:
        torch.mm(x, w, out=out)


_CUBLAS = TorchStep(_cublas_products)


def _generic(x: torch.Tensor, w: torch.Tensor, sc: torch.Tensor, fmt: str, blocksize: int, shape: tuple[int, int],
             transposed: bool, bias: torch.Tensor | None, out: torch.Tensor, code: torch.Tensor) -> Launch:
    """x (M, K) times the factor, Aᵀ (transposed, A (N, K)) or B ((K, N)), into out (M, N): the GEMV
    kernel for one row, the GEMM kernel otherwise; any format, elementwise decode."""
    rows, cols = shape
    M, K = x.shape
    N = out.shape[1]
    s_k, s_n = (1, cols) if transposed else (cols, 1)
    b = bias if bias is not None else code
    fmt_id = _FORMATS[fmt]
    if M == 1:
        # narrower output blocks when N is small, so a rank-wide product (N = r) still spreads over the GPU
        block_n = 64 if N >= 64 * 128 or interpreting() else max(16, min(64, next_pow2(N // 128)))
        return (_gemv_kernel, (cdiv(N, block_n),), (x, w, sc, b, out, N, K, s_k, s_n, cols),
                dict(BS=blocksize, FORMAT=fmt_id, HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=64))
    dot_f32 = x.dtype == torch.float32 or interpreting()
    # whole NF4 bytes: along K for Aᵀ (two dots of BLOCK_K / 2), along N for B (two of BLOCK_N / 2)
    pack = (1 if transposed else 2) if _packed(fmt, blocksize, cols) else 0
    # 16-bit x with 64 rows or more: 64 x 64 tiles, which compile to Hopper's warp-group MMA (wgmma);
    # float32 ("ieee" dots on the FMA units) and fewer rows: 32 x 32, spill-free for every format
    tile = 64 if not dot_f32 and M >= 64 else 32
    grid = (cdiv(M, tile), cdiv(N, tile))
    # K steps of 16 for float32 elementwise decoding: with 32 the NF4 variant spilled under triton 3.6 (the
    # device's) at 1500 x 384; the whole-byte one needs 32 (each of its two dots is then 16 deep)
    block_k = 32 if pack == 1 or not dot_f32 else 16
    span = block_k if pack == 1 else tile  # a tile's extent along the codes' direction
    scale_row = pack > 0 and cols % blocksize == 0 and blocksize % span == 0
    return (_gemm_kernel, grid, (x, w, sc, b, out, M, N, K, x.stride(0), s_k, s_n, cols),
            dict(BS=blocksize, FORMAT=fmt_id, PACK=pack, SCALE_ROW=scale_row, HAS_BIAS=bias is not None,
                 DOT_F32=dot_f32, BLOCK_M=tile, BLOCK_N=tile, BLOCK_K=block_k))


def _packed(fmt: str, blocksize: int, packed_len: int) -> bool:
    """Whether an NF4 factor's bytes can be read whole along a dimension of ``packed_len`` codes."""
    return fmt == "nf4" and packed_len % 2 == 0 and blocksize % 2 == 0


def plan(x, a, a_scale, a_format, a_blocksize, a_shape, b, b_scale, b_format, b_blocksize, b_shape, bias,
         code: torch.Tensor, config: dict | None = None) -> tuple[torch.Tensor, list[Launch]]:
    """(output, launches) of ``rank_linear`` for x (M, in) contiguous and checked arguments; a launch is
    (kernel, grid, args, kwargs), the kernel a Triton one or a `TorchStep`.

    Several rows: `_decoded_once` (quantised factors decoded once, then one fused launch or cuBLAS).
    Batch-1 NF4 products read whole bytes: x·Aᵀ with the codes packed along K, split over K so that the
    small rank-wide output still fills the GPU (float32 partial rows, which the h·B kernel sums as it
    loads h), and h·B with the codes packed along N. Everything else goes through the generic kernels.
    Separate from the launches so the exact specialisations a call compiles can also be compiled ahead
    of time for a GPU that is not here (tests/test_kernels_sm90.py). ``config`` (tuning runs,
    benchmarks/gpu_gemv.py): {"rows": {BLOCK_N, BLOCK_B, num_warps, GATHER, WAVES, MAX_SPLITS}, "cols":
    {BLOCK_K, BLOCK_B, num_warps, GATHER}}, each optional, for the whole-byte kernels (WAVES / MAX_SPLITS:
    x·Aᵀ's K split, `GEMV_WAVES` / `GEMV_MAX_SPLITS` by default); "fused": {BLOCK_M, BLOCK_N, BLOCK_K, num_warps}
    for the one-launch kernel; "fuse": True / False to force the one launch or two products (default:
    chosen by the number of programs with ``decode`` "once", the one launch with "tiles"); "decode":
    "once" (default) or "tiles" (several rows decoded in the tiled kernels, as `rank_linear`'s docstring
    explains); "gemv": "split" (default) or "one_launch" (1-8 rows, both factors NF4: both products and
    the output in `rank_gemv_one._gemv_nf4_one_launch_kernel`, 2.5-4x slower on an H100), with its tiles in
    "one_launch": {SLAB, BLOCK_B, CHUNKS, num_warps, GATHER}; "pdl": True / False for the whole-byte GEMV
    kernels' programmatic dependent launch (`rank_gemv.pdl_kwargs`; default: where the GPU has it). "rows"
    also takes GROUPS (BLOCK_B-byte groups per step, each with its own scale), "cols" WAVES and WORDS (True:
    h·B reads B's codes as 32-bit words, `rank_gemv._gemv_nf4_cols_words_kernel`; off by default until timed). Every
    Triton launch carries `LAUNCH_OPTIONS`."""
    out, launches = _plan(x, a, a_scale, a_format, a_blocksize, a_shape, b, b_scale, b_format, b_blocksize,
                          b_shape, bias, code, config)
    return out, with_launch_options(launches)


def _plan(x, a, a_scale, a_format, a_blocksize, a_shape, b, b_scale, b_format, b_blocksize, b_shape, bias,
          code: torch.Tensor, config: dict | None) -> tuple[torch.Tensor, list[Launch]]:
    """`plan` before the launch options."""
    config = config or {}
    unknown = sorted(set(config) - CONFIG_KEYS)
    if unknown:
        raise ValueError(f"rank_linear config: unknown keys {unknown}; allowed: {sorted(CONFIG_KEYS)}")
    decode = config.get("decode", "once")
    if decode not in DECODES:
        raise ValueError(f"rank_linear config: decode must be one of {DECODES}, got {decode!r}")
    if interpreting() and any(config.get(part, {}).get("GATHER") == 2 for part in ("rows", "cols")):
        raise ValueError("rank_linear config: GATHER 2 (lane shuffles, inline PTX) runs on CUDA GPUs only, not under "
                         "TRITON_INTERPRET=1; allowed there: True (Triton's gather) or False (the select tree)")
    if config.get("pdl") not in (None, True, False):
        raise ValueError(f"rank_linear config: pdl must be True, False or absent (automatic), got {config['pdl']!r}")
    if config.get("fuse") not in (None, True, False):
        raise ValueError(f"rank_linear config: fuse must be True, False or absent (automatic), got {config['fuse']!r}")
    gemv = config.get("gemv", "split")
    if gemv not in GEMVS:
        raise ValueError(f"rank_linear config: gemv must be one of {GEMVS}, got {gemv!r}")
    M = x.shape[0]
    dev = x.device
    pdl = pdl_kwargs(dev, config.get("pdl"))
    width = int(b_shape[1]) if b is not None else int(a_shape[0])
    out = torch.empty((M, width), dtype=x.dtype, device=dev)
    if M == 0 or width == 0:
        return out, []
    if (gemv == "one_launch" and M <= ONE_LAUNCH_MAX_ROWS and a is not None and b is not None
            and _packed(a_format, a_blocksize, int(a_shape[1])) and _packed(b_format, b_blocksize, int(b_shape[1]))):
        r, k, n = int(a_shape[0]), int(a_shape[1]), int(b_shape[1])
        return out, one_launch(x, a.contiguous(), _scales(a_scale, code), a_blocksize, b.contiguous(),
                               _scales(b_scale, code), b_blocksize, r, k, n, bias, out, code,
                               config.get("one_launch", {}))
    if M > 1 and decode == "once":
        return out, _decoded_once(x, (a, a_scale, a_format, a_blocksize, a_shape),
                                  (b, b_scale, b_format, b_blocksize, b_shape), bias, out, code, config)
    launches: list[Launch] = []
    if (config.get("fuse") is not False and a is not None and b is not None and M > 1
            and int(a_shape[0]) <= FUSED_MAX_RANK):
        launches.append(_fused(x, a, a_scale, a_format, a_blocksize, a_shape, b, b_scale, b_format, b_blocksize,
                               b_shape, bias, out, code, config.get("fused", {})))
        return out, launches
    h, splits = x, 1
    cols_b = b is not None and M == 1 and _packed(b_format, b_blocksize, int(b_shape[1]))
    if a is not None:
        r, k = int(a_shape[0]), int(a_shape[1])
        sc = _scales(a_scale, code)
        last = b is None
        if M == 1 and _packed(a_format, a_blocksize, k):
            if interpreting():
                tiles = {"BLOCK_N": 4, "BLOCK_B": 16}
            else:  # groups of 32 bytes (64 codes, one scale block at the usual blocksize 64), code values by one
                # lane shuffle each (GATHER 2), the rest by K: `GEMV_ROWS_TILES`
                tiles = {"BLOCK_B": 32, "GATHER": 2, **by_width(GEMV_ROWS_TILES, k)}
            tiles.update(config.get("rows", {}))
            waves, max_splits = tiles.pop("WAVES", GEMV_WAVES), tiles.pop("MAX_SPLITS", GEMV_MAX_SPLITS)
            block_n, block_b = tiles["BLOCK_N"], tiles["BLOCK_B"]
            step, n_prog = 2 * block_b * tiles.get("GROUPS", 1), cdiv(r, block_n)
            if cols_b:  # a K split to about GEMV_WAVES programs per multiprocessor, two steps or more each:
                # float32 partial rows for the h·B kernel to sum
                want = max(1, min(waves * sm_count(dev) // n_prog, cdiv(k, 2 * step), max_splits))
                k_split = cdiv(cdiv(k, want), step) * step
                splits = cdiv(k, k_split)
            else:
                k_split = cdiv(k, step) * step
            k_split //= 2  # in bytes
            partial = splits > 1
            h = out if last else torch.empty((splits, r), dtype=torch.float32, device=dev)
            b_arg = bias if (last and bias is not None) else code
            launches.append((_gemv_nf4_rows_kernel, (n_prog, splits),
                             (x, a.contiguous(), sc, b_arg, h, r, k, k // 2, k_split),
                             dict(BS=a_blocksize, SCALE_ROW=k % a_blocksize == 0 and a_blocksize % (2 * block_b) == 0,
                                  HAS_BIAS=last and bias is not None, PARTIAL=partial, **tiles, **pdl)))
        else:
            h = out if last else torch.empty((M, r), dtype=middle_dtype(x), device=dev)
            launches.append(_generic(x, a.contiguous(), sc, a_format, a_blocksize, (r, k), True,
                                     bias if last else None, h, code))
    if b is not None:
        k, n = int(b_shape[0]), int(b_shape[1])
        sc = _scales(b_scale, code)
        if cols_b:
            launches += cols_launches(h, splits, b.contiguous(), sc, b_blocksize, k, n, bias, out, code,
                                      config.get("cols", {}), pdl)
        else:
            launches.append(_generic(h, b.contiguous(), sc, b_format, b_blocksize, (k, n), False, bias, out, code))
    return out, launches


def _decoded_once(x: torch.Tensor, fa: tuple, fb: tuple, bias: torch.Tensor | None, out: torch.Tensor,
                  code: torch.Tensor, config: dict) -> list[Launch]:
    """Launches for several rows of x: each quantised factor decoded once into x's dtype (`_dequant_kernel`),
    then both products on the dense factors: `_fused_kernel` (one launch, h in registers) where the rank is
    at most `FUSED_MAX_RANK` and its programs fill at least a quarter of the multiprocessors (or config
    ``fuse`` is True), the two cuBLAS products otherwise (or with ``fuse`` False). The quarter is from an
    H100 (132 SMs), fp16 factors: one launch took 4.4 and 5.7 us against cuBLAS's 5.8 and 6.9 us with 48
    and 120 programs (1500 rows, 384 -> 384 at rank 40, 384 -> 1536 at rank 64), and 31.7 and 36.3 us
    against 9.4 and 8.2 with 8 and 2 (256 and 16 rows, 4096 -> 4096 at rank 64)."""
    launches: list[Launch] = []
    dense = []
    for factor, scale, fmt, blocksize, shape in (fa, fb):
        if factor is None:
            dense.append(None)
        elif fmt == "fp":
            dense.append(factor.to(x.dtype).contiguous())
        else:
            rows, cols = int(shape[0]), int(shape[1])
            w = torch.empty((rows, cols), dtype=x.dtype, device=x.device)
            numel = rows * cols
            launches.append((_dequant_kernel, (max(1, cdiv(numel, DEQUANT_BLOCK)),),
                             (factor.contiguous(), _scales(scale, code), w, numel, cols),
                             dict(BS=blocksize, FORMAT=_FORMATS[fmt], BLOCK=DEQUANT_BLOCK)))
            dense.append(w)
    a, b = dense
    fuse = config.get("fuse")
    if a is not None and b is not None and int(fa[4][0]) <= FUSED_MAX_RANK and fuse is not False:
        one = _fused(x, a, None, "fp", 0, fa[4], b, None, "fp", 0, fb[4], bias, out, code, config.get("fused", {}))
        grid = one[1]
        if fuse or 4 * grid[0] * grid[1] >= sm_count(x.device):
            return [*launches, one]
    return [*launches, (_CUBLAS, None, (x, a, b, bias, out), {})]


def _fused(x, a, a_scale, a_format, a_blocksize, a_shape, b, b_scale, b_format, b_blocksize, b_shape, bias, out,
           code, tiles: dict) -> Launch:
    """The one-launch kernel for x (M, K) with both factors and a rank of at most `FUSED_MAX_RANK`.

    Programs own BLOCK_M rows each. When the rows alone give fewer than two programs per multiprocessor,
    the output columns are split too, over as many programs as fill the GPU, as long as the x·Aᵀ each of
    them recomputes costs no more in all than h·B (groups <= 1 + N / K)."""
    M, K = x.shape
    R, N = int(a_shape[0]), int(b_shape[1])
    dot_f32 = x.dtype == torch.float32 or interpreting()
    a_packed = _packed(a_format, a_blocksize, K)
    if dot_f32:  # "ieee" dots on the FMA units: 8 warps and K steps of 16 compile spill-free for every format
        t = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32 if a_packed else 16, "num_warps": 8}
    else:  # as `_generic`: 64 x 64 tiles (wgmma) for 64 rows or more
        tile = 64 if M >= 64 else 32
        t = {"BLOCK_M": tile, "BLOCK_N": tile, "BLOCK_K": 32}
    t.update(tiles)
    m_blocks, n_blocks = cdiv(M, t["BLOCK_M"]), cdiv(N, t["BLOCK_N"])
    groups = max(1, min(n_blocks, cdiv(2 * sm_count(x.device), m_blocks), 1 + N // max(K, 1)))
    span = cdiv(n_blocks, groups) * t["BLOCK_N"]
    sa, sb = _scales(a_scale, code), _scales(b_scale, code)
    a_pack = a_packed and t["BLOCK_K"] >= 32
    b_pack = _packed(b_format, b_blocksize, N) and t["BLOCK_N"] >= 32
    return (_fused_kernel, (m_blocks, cdiv(N, span)),
            (x, a.contiguous(), sa, b.contiguous(), sb, bias if bias is not None else code, out, M, K, R, N,
             x.stride(0), span),
            dict(A_BS=a_blocksize, B_BS=b_blocksize, A_FORMAT=_FORMATS[a_format], B_FORMAT=_FORMATS[b_format],
                 # whole bytes where each of the two dots stays at least 16 wide (tl.dot's minimum)
                 A_PACKED=a_pack, B_PACKED=b_pack,
                 A_SCALE_ROW=a_pack and K % a_blocksize == 0 and a_blocksize % t["BLOCK_K"] == 0,
                 B_SCALE_ROW=b_pack and N % b_blocksize == 0 and b_blocksize % t["BLOCK_N"] == 0,
                 HAS_BIAS=bias is not None, DOT_F32=dot_f32, BLOCK_R=max(16, next_pow2(R)), **t))


def _scales(scale: torch.Tensor | None, code: torch.Tensor) -> torch.Tensor:
    """A factor's scales as the kernels read them (contiguous float32); the code book as a placeholder pointer
    for a plain factor, which has none."""
    return scale.float().contiguous() if scale is not None else code


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


def rank_linear(x, a, a_scale, a_format, a_blocksize, a_shape, b, b_scale, b_format, b_blocksize, b_shape, bias,
                *, config: dict | None = None):
    """Launcher with the op's signature (see `adaptwin.ops.rank_linear`); float32 accumulation, x's dtype out.
    ``config``: block sizes of the whole-byte kernels, for tuning runs (see `plan`)."""
    from adaptwin.ops.rank_linear import _check

    width = _check(x, a, a_scale, a_format, a_blocksize, a_shape, b, b_scale, b_format, b_blocksize, b_shape, bias)
    lead = x.shape[:-1]
    h = x.reshape(-1, x.shape[-1]).contiguous()  # (M, in)
    out, launches = plan(h, a, a_scale, a_format, a_blocksize, a_shape, b, b_scale, b_format, b_blocksize, b_shape,
                         bias, _code_on(x.device), config)
    for kernel, grid, args, kwargs in launches:
        kernel[grid](*args, **kwargs)
    return out.reshape(*lead, width)
