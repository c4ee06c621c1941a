"""Where a batch-1 NF4 rank-r GEMV's time goes on a GPU: each of its kernels timed alone, next to the floors
that bound it, at the sizes of `benchmarks.gpu_gemv` (same weight-set rotation, CUDA graph replays).

    python3 -m benchmarks.gpu_gemv_parts [--sizes 4096,8192] [--config '{"rows": {...}}'] [--out CSV]

Rows per size:
- ``whole``: the call as planned (or with ``--config``);
- ``kernel <i> <name>``: launch i of that plan alone (its inputs are whatever the buffers hold: timing only);
- ``read <bytes>``: a kernel that only reads each factor's bytes (int32 vectors, a sum per program), the
  floor for one product's kernel at this size;
- ``empty x<n>``: n dependent launches of a kernel that writes one number (n = 1..3), the floor a plan of n
  kernels pays whatever they do.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import triton
import triton.language as tl

from benchmarks import gpu_common as gc
from benchmarks.common import write_rows
from benchmarks.gpu_common import half_rank, nf4_bytes, result_row
from benchmarks.gpu_gemv import Cycle, nf4_rank_args, weight_sets
from benchmarks.gpu_kernels import FIELDS, KEY


@triton.jit
def _read_kernel(ptr, n, out_ptr, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    """Sum of STEPS blocks of BLOCK int32 words from ``ptr`` (n words), one number per program."""
    base = tl.program_id(0) * BLOCK * STEPS
    acc = tl.zeros((BLOCK,), tl.int32)
    for s in tl.static_range(STEPS):
        off = base + s * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(ptr + off, mask=off < n, other=0)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, 0))


@triton.jit
def _one_kernel(out_ptr):
    tl.store(out_ptr, tl.load(out_ptr) + 1.0)


def parts(device: torch.device, d: int, l2_bytes: int, config: dict | None) -> list[dict]:
    from adaptwin.kernels.rank_linear import _code_on, plan

    from adaptwin import quant

    fmt = quant.QuantFormat("nf4", 64)
    r = half_rank(d)
    shape = f"{d}x{d}:r{r}"
    ours = nf4_bytes(r, d, d)
    sets = weight_sets(l2_bytes, ours)
    x = torch.randn(1, d, device=device, dtype=torch.float16)
    code = _code_on(device)
    factors = [nf4_rank_args(fmt, r, d, device) for _ in range(sets)]
    plans = [plan(x, *f, code, config)[1] for f in factors]
    note = f"{sets} weight sets; {config or 'planned'}"
    rows = []

    def launch(i: int, j: int) -> None:
        kernel, grid, args, kwargs = plans[j][i]
        kernel[grid](*args, **kwargs)

    def run_all(j: int) -> None:
        for i in range(len(plans[j])):
            launch(i, j)

    whole = gc.bench(Cycle(run_all, sets), graph=True)
    rows.append(result_row("gemv_parts", shape, "fp16", "whole", whole, gbps=ours / whole / 1e3, config=note))
    for i, (kernel, grid, _, kwargs) in enumerate(plans[0]):
        us = gc.bench(Cycle(lambda j, i=i: launch(i, j), sets), graph=True)
        tiles = {k: v for k, v in kwargs.items() if k.isupper() or k == "num_warps"}
        rows.append(result_row("gemv_parts", shape, "fp16", f"kernel {i} {kernel.fn.__name__}", us,
                               config=f"grid {grid}; {tiles}"))
    out = torch.empty(1 << 16, device=device, dtype=torch.int32)
    for name, idx in (("A", 0), ("B", 5)):
        words = [f[idx].view(torch.int32) for f in factors]
        n = words[0].numel()
        for block, steps in ((1024, 1), (1024, 4), (2048, 4)):
            grid = (triton.cdiv(n, block * steps),)

            def read(j, words=words, n=n, grid=grid, block=block, steps=steps):
                _read_kernel[grid](words[j], n, out, BLOCK=block, STEPS=steps)

            us = gc.bench(Cycle(read, sets), graph=True)
            rows.append(result_row("gemv_parts", shape, "fp16", f"read {name} {4 * n} bytes", us,
                                   gbps=4 * n / us / 1e3, config=f"grid {grid}; {block} words x {steps}"))
    one = torch.zeros(1, device=device)
    for n in (1, 2, 3):
        us = gc.bench(lambda n=n: [_one_kernel[(1,)](one) for _ in range(n)], graph=True)
        rows.append(result_row("gemv_parts", shape, "-", f"empty x{n}", us))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4096,8192")
    ap.add_argument("--config", default=None, help="rank_linear config as JSON")
    ap.add_argument("--out", default="results/gpu_gemv_parts.csv")
    args = ap.parse_args(argv)
    try:
        sizes = [int(v) for v in args.sizes.split(",")]
        config = json.loads(args.config) if args.config else None
    except ValueError as exc:
        ap.error(f"--sizes must be comma-separated integers and --config a JSON object: {exc}")
    if any(d < 8 or d % 8 for d in sizes) or not isinstance(config, (dict, type(None))):
        ap.error(f"--sizes must be multiples of 8 (>= 8), got {args.sizes!r}; --config a JSON object, got "
                 f"{args.config!r}")
    if not torch.cuda.is_available():
        print("benchmarks.gpu_gemv_parts: skipped, it needs a CUDA device and none is visible here", file=sys.stderr)
        return 0
    device = torch.device("cuda")
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    rows = []
    with torch.inference_mode():
        for d in sizes:
            for row in parts(device, d, l2, config):
                print(f"{row['shape']:18} {row['provider']:36} {row['median_us']:8.2f} us  "
                      f"{row.get('gbps') or '':>8}  {row.get('config', '')}", flush=True)
                rows.append(row)
    write_rows(args.out, rows, fields=FIELDS, key=KEY)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
