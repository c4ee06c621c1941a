"""Batch-1 NF4 rank-r linear (decoding) on the GPU: item 3 of `benchmarks.gpu_kernels` (its docstring says
what is timed and why), with the GEMV tuning sweeps. Not a script: ``python -m benchmarks.gpu_kernels --parts
gemv`` runs it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks import gpu_common as gc
from benchmarks.gpu_common import half_rank, nf4_bytes, rel_err, result_row

GEMV_SIZES = (1024, 2048, 4096, 8192)
# The two whole-byte kernels are swept one after the other (x·Aᵀ tiles with the default h·B, then h·B tiles).
# Left out: x·Aᵀ tiles of 8 rows (with gathered code values triton 3.6 fails to compile them:
# TritonGPUOptimizeThreadLocality, on the H100 and in tests/test_kernels_sm90.py's 3.6 child), and h·B tiles that
# put 8 bytes on the stack (tests/test_kernels_sm90_linear.py): 64 x 16 bytes on 4 warps (3.9), 64 x 32 on 8 (3.6)
# and, with lane shuffles, 32 x 64 on 8 (3.6).
GEMV_TUNE_ROWS = [{"BLOCK_N": n, "BLOCK_B": 32, "GROUPS": g, "num_warps": w, "GATHER": 2} for n in (16, 32, 64)
                  for g in (1, 2, 4, 8) for w in (4, 8) if 512 <= n * 32 * g <= 1024 * w]
GEMV_TUNE_SPLITS = [{"WAVES": 2, "MAX_SPLITS": 8}, {"WAVES": 8, "MAX_SPLITS": 16}, {"WAVES": 16, "MAX_SPLITS": 32}]
GEMV_TUNE_COLS = [{"BLOCK_K": k, "BLOCK_B": b, "num_warps": w, "GATHER": 2, **words} for k in (32, 64, 128, 256)
                  for b in (16, 32, 64)
                  for w in (4, 8) if 512 <= k * b <= 512 * w  # 4096 bytes with 4 warps spilled
                  and (k, b, w) not in ((64, 16, 4), (64, 32, 8), (32, 64, 8))
                  for words in ({}, {"WORDS": True})]  # B's codes as bytes, or as 32-bit words
GEMV_TUNE_COL_WAVES = (0, 1, 2, 8)  # h·B's K split: 0 is none (no sum kernel)
# the one-launch GEMV: rank rows per program, bytes per tile and warps (swept first, at the planned number of
# column chunks), then the column chunks (each one more program per slab recomputing its h)
GEMV_TUNE_ONE = [{"SLAB": s, "BLOCK_B": b, "num_warps": w} for s in (4, 8, 16, 32) for b in (32, 64)
                 for w in (2, 4) if 128 <= s * b <= 256 * w]
GEMV_TUNE_CHUNKS = (1, 2, 4, 8)


def _bnb():
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except Exception:  # not installed, or no CUDA library for this CUDA version
        return None
    return bnb, bnbf


def weight_sets(l2_bytes: int, set_bytes: int) -> int:
    """How many weight sets a GEMV timing rotates over: enough that the NF4 factors make three times the L2 (the
    dense weights, larger, more), so every call reads from device memory; 1024 at most."""
    return max(1, min(1024, math.ceil(3 * l2_bytes / set_bytes)))


def nf4_rank_args(fmt, r: int, d: int, device: torch.device) -> tuple:
    """``rank_linear``'s arguments after x for fresh random factors (r, d) and (r, d), both NF4 in ``fmt``, no bias."""
    a, b = gc.low_rank_factors(r, d, d, device)  # (r, in), (r, out)
    qa, qb = fmt.quantize(a), fmt.quantize(b)
    return (qa["qweight"], fmt.scale(qa), "nf4", 64, [r, d], qb["qweight"], fmt.scale(qb), "nf4", 64, [r, d], None)


class Cycle:
    """Calls ``fn(i)`` with i rotating over ``n`` weight sets (captured as n_repeat calls in a CUDA graph)."""

    def __init__(self, fn: Callable[[int], object], n: int) -> None:
        self.fn, self.n, self.i = fn, n, 0

    def __call__(self) -> object:
        self.i = (self.i + 1) % self.n
        return self.fn(self.i)


def bench_gemv(device: torch.device, sizes, l2_bytes: int, ceil: dict, tune: bool = False) -> list[dict]:
    rows = []
    for d in sizes:
        rows += _gemv_size(device, d, l2_bytes, ceil, tune)
    return rows


def _gemv_size(device: torch.device, d: int, l2_bytes: int, ceil: dict, tune: bool = False) -> list[dict]:
    from adaptwin import quant
    from adaptwin.ops.rank_linear import run_rank_linear

    fmt, lib, copy = quant.QuantFormat("nf4", 64), _bnb(), ceil.get("copy_gbps")
    r = half_rank(d)
    shape = f"{d}x{d}:r{r}"
    ours_bytes, dense_bytes = nf4_bytes(r, d, d), 2 * d * d
    sets = weight_sets(l2_bytes, ours_bytes)
    weights, factors, packed4 = [], [], []
    for _ in range(sets):
        w = torch.randn(d, d, device=device) / d ** 0.5
        factors.append(nf4_rank_args(fmt, r, d, device))
        weights.append(w.half())
        if lib is not None:
            packed4.append(lib[1].quantize_4bit(w.half(), quant_type="nf4", blocksize=64))
    x = torch.randn(1, d, device=device, dtype=torch.float16)
    err = rel_err(run_rank_linear(x, *factors[0]), F.linear(x.double(), _dequant(factors[0], r, d)))
    if not err < 1e-2:
        raise RuntimeError(f"rank_linear {shape}: relative error {err:.2e} against its own dequantised factors")
    note = f"{sets} weight sets"
    with torch.inference_mode():
        dense_us = gc.bench(Cycle(lambda i: F.linear(x, weights[i]), sets), graph=True)
        ours_us = gc.bench(Cycle(lambda i: run_rank_linear(x, *factors[i]), sets), graph=True)
        share = f"; {ours_bytes / ours_us / 1e3 / copy:.0%} of copy GB/s" if copy else ""
        rows = [result_row("gemv", shape, "fp16", "cublas_dense_fp16", dense_us, speedup=1.0,
                            gbps=dense_bytes / dense_us / 1e3, config=note),
                result_row("gemv", shape, "fp16", "adaptwin_nf4_rank", ours_us, speedup=dense_us / ours_us,
                            gbps=ours_bytes / ours_us / 1e3, rel_err=err, config=note + share)]
        rows.append(_gemv_select_tree(factors, sets, x, shape, dense_us, ours_bytes, note, r, d))
        rows.append(_gemv_config(factors, sets, x, shape, dense_us, ours_bytes, note, r, d, "adaptwin_nf4_rank_no_pdl",
                                 {"pdl": False}))
        rows.append(_gemv_config(factors, sets, x, shape, dense_us, ours_bytes, note, r, d, "adaptwin_nf4_rank_words",
                                 {"cols": {"WORDS": True}}))  # h·B reading B as 32-bit words
        rows.append(_gemv_config(factors, sets, x, shape, dense_us, ours_bytes, note, r, d,
                                 "adaptwin_nf4_rank_one_launch", {"gemv": "one_launch"}))
        # 8 rows (a batch of decoding streams): the default plan decodes both factors into fp16 first
        x8 = torch.randn(8, d, device=device, dtype=torch.float16)
        dense8 = gc.bench(Cycle(lambda i: F.linear(x8, weights[i]), sets), graph=True)
        ours8 = gc.bench(Cycle(lambda i: run_rank_linear(x8, *factors[i]), sets), graph=True)
        rows += [result_row("gemv", f"{shape}:M8", "fp16", "cublas_dense_fp16", dense8, speedup=1.0,
                             gbps=dense_bytes / dense8 / 1e3, config=note),
                 result_row("gemv", f"{shape}:M8", "fp16", "adaptwin_nf4_rank", ours8, speedup=dense8 / ours8,
                             gbps=ours_bytes / ours8 / 1e3, config=note),
                 _gemv_config(factors, sets, x8, f"{shape}:M8", dense8, ours_bytes, note, r, d,
                              "adaptwin_nf4_rank_one_launch", {"gemv": "one_launch"})]
        if tune:
            rows.append(_tune_gemv(factors, sets, x, shape, dense_us, ours_bytes, note))
            rows.append(_tune_one_launch(factors, sets, x, shape, dense_us, ours_bytes, note))
        if lib is not None:
            bnb = lib[0]
            bnb_us = gc.bench(Cycle(lambda i: bnb.matmul_4bit(x, packed4[i][0].t(), quant_state=packed4[i][1]), sets),
                              graph=True)
            rows.append(result_row("gemv", shape, "fp16", "bitsandbytes_nf4_dense", bnb_us, speedup=dense_us / bnb_us,
                                    gbps=(d * d // 2 + 4 * d * d // 64) / bnb_us / 1e3, config=note))
    return rows


def _gemv_select_tree(factors: list, sets: int, x: torch.Tensor, shape: str, dense_us: float, ours_bytes: int,
                      note: str, r: int, d: int) -> dict:
    """The same GEMV with code values from the select tree instead of gathered from a register table by warp
    shuffles (the default since the H100 run of 2026-11-25)."""
    return _gemv_config(factors, sets, x, shape, dense_us, ours_bytes, note, r, d, "adaptwin_nf4_rank_select_tree",
                        {"rows": {"GATHER": False}, "cols": {"GATHER": False}})


def _gemv_config(factors: list, sets: int, x: torch.Tensor, shape: str, dense_us: float, ours_bytes: int,
                 note: str, r: int, d: int, provider: str, config: dict) -> dict:
    """The GEMV as the Triton launcher runs it with ``config``, checked against the dequantised factors (twice:
    the one-launch plan must leave its workspace as it found it)."""
    from adaptwin.kernels.rank_linear import rank_linear as triton_rank_linear

    ref = F.linear(x.double(), _dequant(factors[0], r, d))
    err = max(rel_err(triton_rank_linear(x, *factors[0], config=config), ref) for _ in range(2))
    if not err < 1e-2:
        raise RuntimeError(f"rank_linear {shape} ({provider}): relative error {err:.2e}")
    us = gc.bench(Cycle(lambda i: triton_rank_linear(x, *factors[i], config=config), sets), graph=True)
    return result_row("gemv", shape, "fp16", provider, us, speedup=dense_us / us, gbps=ours_bytes / us / 1e3,
                       rel_err=err, config=f"{note}; {config}")


def _tune_one_launch(factors: list, sets: int, x: torch.Tensor, shape: str, dense_us: float, ours_bytes: int,
                     note: str) -> dict:
    """The best tiles of the one-launch GEMV for this size (`GEMV_TUNE_ONE`, then `GEMV_TUNE_CHUNKS` with those),
    checked once more after."""
    from adaptwin.kernels.rank_linear import rank_linear as triton_rank_linear

    def timed(tiles: dict) -> float:
        config = {"gemv": "one_launch", "one_launch": tiles}
        try:
            return gc.bench(Cycle(lambda i: triton_rank_linear(x, *factors[i], config=config), sets), graph=True)
        except Exception as exc:  # a tile the compiler refuses: skip it
            print(f"  gemv {shape} one-launch tiles {tiles} failed: {type(exc).__name__}", file=sys.stderr)
            return math.inf

    best = min(GEMV_TUNE_ONE, key=timed)
    best = min([best] + [{**best, "CHUNKS": c} for c in GEMV_TUNE_CHUNKS], key=timed)
    config = {"gemv": "one_launch", "one_launch": best}
    d = x.shape[1]
    r = int(factors[0][4][0])
    err = rel_err(triton_rank_linear(x, *factors[0], config=config), F.linear(x.double(), _dequant(factors[0], r, d)))
    us = timed(best)
    return result_row("gemv", shape, "fp16", "adaptwin_nf4_rank_one_launch_tuned", us, speedup=dense_us / us,
                       gbps=ours_bytes / us / 1e3, rel_err=err, config=f"{note}; {config}")


def _tune_gemv(factors: list, sets: int, x: torch.Tensor, shape: str, dense_us: float, ours_bytes: int,
               note: str) -> dict:
    """The best whole-byte GEMV tiles for this size: x·Aᵀ tiles first (default h·B), then its K split, then
    h·B tiles, then h·B's K split (code values by lane shuffles, GATHER 2), then those tiles with Triton's
    gather and with the select tree instead."""
    from adaptwin.kernels.rank_linear import rank_linear as triton_rank_linear

    def timed(config: dict) -> float:
        try:
            return gc.bench(Cycle(lambda i: triton_rank_linear(x, *factors[i], config=config), sets), graph=True)
        except Exception as exc:  # a tile the compiler refuses: skip it
            print(f"  gemv {shape} config {config} failed: {type(exc).__name__}", file=sys.stderr)
            return math.inf

    best_rows = min(GEMV_TUNE_ROWS, key=lambda c: timed({"rows": c}))
    # more of x·Aᵀ's K split (more programs, more bytes in flight; h·B sums more partial rows)
    best_rows = min([best_rows] + [{**best_rows, **s} for s in GEMV_TUNE_SPLITS], key=lambda c: timed({"rows": c}))
    best = min(({"rows": best_rows, "cols": c} for c in GEMV_TUNE_COLS), key=timed)
    best = min([best] + [{"rows": best_rows, "cols": {**best["cols"], "WAVES": w}} for w in GEMV_TUNE_COL_WAVES],
               key=timed)
    # the best tiles with Triton's gather (GATHER True) and with the select tree instead of lane shuffles
    others = [{part: {**tiles, "GATHER": g} for part, tiles in best.items()} for g in (True, False)]
    best = min([best] + others, key=timed)
    us = timed(best)
    return result_row("gemv", shape, "fp16", "adaptwin_nf4_rank_tuned", us, speedup=dense_us / us,
                       gbps=ours_bytes / us / 1e3, config=f"{note}; {best}")


def _dequant(args: tuple, r: int, d: int) -> torch.Tensor:
    """The dense float64 weight (out, in) the NF4 factors stand for."""
    from adaptwin.ops.rank_linear import _factor

    a = _factor(args[0], args[1], "nf4", 64, (r, d), torch.float64)
    b = _factor(args[5], args[6], "nf4", 64, (r, d), torch.float64)
    return b.T @ a
