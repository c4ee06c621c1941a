"""A few rows of x through one linear layer on CPU: the CPU kernels' GEMV (`adaptwin.fusion.GemvLinear`'s path,
``torch.ops.adaptwin.rank_linear`` with the weight as its one fp factor) against ``F.linear``, row by row.

    python -m benchmarks.gemv_rows [--shapes 51865x384,240x384,1536x136,136x1536] [--dtypes fp32,bf16]
        [--rows 1,2,3,4,6,8] [--calls N] [--repeats 3] [--threads 2] [--out results/gemv_rows.csv]

A shape is OUTxIN (the weight's shape: 51865x384 is Whisper-tiny's output head, the others a compressed
decoder's rank-space projections and FFN factors). For each dtype, shape and number of rows, both calls run
on the same x, weight and bias, timed interleaved under ``torch.inference_mode``: the median of ``--calls``
calls per sample (default: 20 for weights of 4M elements or more, else 1000), the best of ``--repeats``
samples. The GEMV is forced here, whatever `adaptwin.ops.rank_linear.gemv_rows` allows: the table is what
those limits are read from (their comment in adaptwin/ops/rank_linear.py quotes one run). ``rel_err`` is each
call's error against the float64 layer. Run under ``ADAPTWIN_CPU_CAP=avx2`` (with ``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``, so that ``F.linear`` is capped alike) for the AVX2
paths; the device column says which paths ran.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.common import device_string, format_table, now_utc, versions, write_rows

BENCHMARK = "gemv_rows"
FIELDS = ("benchmark", "shape", "dtype", "rows", "provider", "us_per_call", "ratio", "rel_err", "calls", "repeats",
          "threads", "device", "torch", "transformers", "adaptwin", "timestamp")
KEY = ("benchmark", "shape", "dtype", "rows", "provider", "threads", "device")
PROVIDERS = ("gemv", "f_linear")
LARGE = 1 << 22  # weights of this many elements or more get fewer calls per sample
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_shape(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"shape {text!r}: expected OUTxIN with positive integers, e.g. 51865x384")
    return int(parts[0]), int(parts[1])


def _median_us(fn, calls: int) -> float:
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2] * 1e6


def run(shapes: list[tuple[int, int]], dtypes: list[str], rows_list: list[int], calls: int | None, repeats: int,
        seed: int = 0) -> list[dict]:
    from adaptwin.ops.rank_linear import ABSENT, run_rank_linear

    gen = torch.Generator().manual_seed(seed)
    device, vers, threads = device_string(), versions(), torch.get_num_threads()
    out = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        for n_out, n_in in shapes:
            w64 = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64) / n_in ** 0.5
            b64 = torch.randn(n_out, generator=gen, dtype=torch.float64)
            w, b = w64.to(dtype), b64.to(dtype)
            n_calls = calls or (20 if w.numel() >= LARGE else 1000)
            for rows in rows_list:
                x = torch.randn(1, rows, n_in, generator=gen).to(dtype)
                fns = {"gemv": lambda x=x, w=w, b=b: run_rank_linear(x, w, None, "fp", 0, list(w.shape), *ABSENT, b),
                       "f_linear": lambda x=x, w=w, b=b: F.linear(x, w, b)}
                with torch.inference_mode():
                    ref = F.linear(x.double(), w.double(), b.double())
                    err = {}
                    for name, fn in fns.items():
                        y = fn()
                        if y.shape != ref.shape or y.dtype != dtype:
                            raise RuntimeError(f"{name} gave {tuple(y.shape)} {y.dtype}, expected "
                                               f"{tuple(ref.shape)} {dtype}")
                        err[name] = ((y.double() - ref).norm() / ref.norm()).item()
                    best = {name: float("inf") for name in fns}
                    for _ in range(repeats):
                        for name, fn in fns.items():
                            fn()
                            best[name] = min(best[name], _median_us(fn, n_calls))
                for name in PROVIDERS:
                    out.append({"benchmark": BENCHMARK, "shape": f"{n_out}x{n_in}", "dtype": dname, "rows": rows,
                                "provider": name, "us_per_call": best[name], "ratio": best[name] / best["f_linear"],
                                "rel_err": err[name], "calls": n_calls, "repeats": repeats, "threads": threads,
                                "device": device, **vers, "timestamp": now_utc()})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="51865x384,240x384,1536x136,136x1536")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--rows", default="1,2,3,4,6,8")
    ap.add_argument("--calls", type=int, default=None, help="calls per timed sample (default: by weight size)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/gemv_rows.csv")
    args = ap.parse_args(argv)
    try:
        shapes = [parse_shape(s) for s in args.shapes.split(",") if s]
        rows_list = [int(r) for r in args.rows.split(",") if r]
    except ValueError as err:
        ap.error(str(err))
    dtypes = [d for d in args.dtypes.split(",") if d]
    bad = [d for d in dtypes if d not in ("fp32", "bf16")]
    if bad or not dtypes or not shapes or not rows_list:
        ap.error(f"--dtypes takes fp32 and / or bf16 (got {args.dtypes!r}); --shapes and --rows need one value each")
    if min(rows_list) < 1 or args.repeats < 1 or args.threads < 1 or (args.calls is not None and args.calls < 1):
        ap.error("--rows, --repeats, --threads and --calls must be >= 1")
    torch.set_num_threads(args.threads)
    rows = run(shapes, dtypes, rows_list, args.calls, args.repeats)
    us = {(r["dtype"], r["shape"], r["rows"], r["provider"]): r["us_per_call"] for r in rows}
    table = []
    for dname in dtypes:
        for n_out, n_in in shapes:
            shape = f"{n_out}x{n_in}"
            table.append([dname, shape] + [f"{us[dname, shape, m, 'gemv']:.1f}/{us[dname, shape, m, 'f_linear']:.1f}"
                                           for m in rows_list])
    print(format_table(["dtype", "weight"] + [f"rows {m}: gemv/F.linear us" if m == rows_list[0] else f"{m}"
                                              for m in rows_list], table))
    print(f"({rows[0]['device']})")
    path = write_rows(args.out, rows, fields=FIELDS, key=KEY)
    print(f"\nwrote {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
