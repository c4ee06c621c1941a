"""Shared pieces of the GPU benchmarks (`benchmarks.gpu_kernels`, `benchmarks.gpu_gemv`): the CSV layout,
byte and rank accounting, the timer and the measured ceilings.

Timings go through `bench` by module attribute (``gpu_common.bench``) so that a test can replace the timer
for every GPU benchmark at once.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from functools import partial

import torch

BENCHMARK = "gpu_kernels"
FIELDS = ("benchmark", "kind", "shape", "dtype", "provider", "median_us", "speedup", "tflops", "gbps",
          "rel_err", "config", "device", "torch", "transformers", "adaptwin", "timestamp")
KEY = ("benchmark", "kind", "shape", "dtype", "provider", "device")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def half_rank(d: int) -> int:
    """Rank whose two d-wide factors hold half of a d×d weight."""
    return d // 4


def nf4_bytes(rank: int, d_in: int, d_out: int, blocksize: int = 64) -> int:
    """Codes (half a byte each) and float32 block scales of both factors."""
    elements = rank * (d_in + d_out)
    return elements // 2 + 4 * math.ceil(elements / blocksize)


def nf4_factor(rank: int, n: int, device: torch.device, gen: torch.Generator | None = None) -> tuple:
    """Op arguments (codes, scales, "nf4", 64, [rank, n]) of a random (rank, n) factor, entries of size
    n^-1/2, quantised to NF4 with blocksize 64 and moved to ``device``."""
    from adaptwin import quant

    fmt = quant.QuantFormat("nf4", 64)
    stored = fmt.quantize(torch.randn(rank, n, generator=gen) / n**0.5)
    return stored["qweight"].to(device), fmt.scale(stored).to(device), "nf4", 64, [rank, n]


def low_rank_factors(r: int, d_in: int, d_out: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random float32 rank-r factors A (r, in) and B (r, out) with the entry size of a random d_out x d_in
    weight's SVD factors split as sqrt(s) (unit singular vectors, singular values near 1). No SVD is run
    (the GEMV rows once ran a float64 one per weight set, up to eight sets of 8192²): a kernel's time does not
    depend on the values, and every check compares a call with a float64 reference of its own factors."""
    return (torch.randn(r, d_in, device=device) / d_in ** 0.5, torch.randn(r, d_out, device=device) / d_out ** 0.5)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def bench(fn: Callable[[], object], graph: bool = False) -> float:
    """Median microseconds of ``fn`` (CUDA events; CUDA graph replays when ``graph``)."""
    import triton.testing

    if graph:
        return 1000 * triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")
    return 1000 * triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def ceilings(device: torch.device) -> dict[str, float]:
    """Copy GB/s (read + written) and bf16 / fp16 GEMM TFLOP/s, measured on random data."""
    n = 1 << 28  # 1 GiB of float32
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    out = {"copy_gbps": 2 * 4 * n / bench(partial(dst.copy_, src)) / 1e3}
    src = dst = None  # free the 2 GiB before the products
    m = 8192
    for name, dtype in DTYPES.items():
        x, y = torch.randn(m, m, device=device, dtype=dtype), torch.randn(m, m, device=device, dtype=dtype)
        out[f"gemm_{name}_tflops"] = 2 * m ** 3 / bench(partial(torch.matmul, x, y)) / 1e6
    return out


def result_row(kind: str, shape: str, dtype: str, provider: str, us: float, **extra: object) -> dict:
    print(f"  {kind} {shape} {dtype} {provider}: {us:.1f} us", file=sys.stderr, flush=True)  # progress
    return {"benchmark": BENCHMARK, "kind": kind, "shape": shape, "dtype": dtype, "provider": provider,
            "median_us": us, **extra}
