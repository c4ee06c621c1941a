"""Several rows through a rank-r linear on CPU (encoder frames, prefill): the op against dense F.linear.

    python -m benchmarks.rank_linear_rows [--shapes 1500x384x384,1500x384x1536,1500x1536x384]
        [--dtypes fp32,bf16] [--repeats 9] [--threads 2] [--out results/rank_linear_rows.csv]

A shape is ROWSxINxOUT; the rank halves the parameters (r·(in + out) = in·out / 2, as
`benchmarks.rank_linear_speed`). Like is compared with like: in each dtype, x, the dense weight and the
plain factors are in that dtype. Providers, timed interleaved under ``torch.inference_mode``:

* ``dense``: ``F.linear(x, W, bias)``, the original layer.
* ``nf4`` / ``int8``: ``torch.ops.adaptwin.rank_linear`` with NF4 (blocksize 64) / per-row int8 factors:
  each factor dequantised once per call, then two GEMMs (in bf16 for bf16 x, in float32 otherwise); up to
  32 rows of NF4 (16 of bf16 x) the decode path instead (codes decoded in registers, once per 8 rows).
* ``nf4_reference``: the op's pure-PyTorch reference on the NF4 factors.
* ``fp``: the op with plain factors in x's dtype.

``rel_err`` is each provider's rounding error: against the float64 dense layer for ``dense``, against the
op's reference in float64 on the same factors for the others (so not the rank truncation, which every
low-rank provider shares).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from adaptwin import quant
from adaptwin.ops import backends
from adaptwin.ops.rank_linear import rank_linear_reference
from benchmarks.common import (
    OtherLoad,
    device_string,
    format_table,
    now_utc,
    pick,
    time_interleaved,
    versions,
    write_rows,
)
from benchmarks.rank_linear_speed import DTYPES, _args, half_rank_layer

BENCHMARK = "rank_linear_rows"
PROVIDERS = ("dense", "nf4", "int8", "nf4_reference", "fp")
DEFAULT_SHAPES = "1500x384x384,1500x384x1536,1500x1536x384"  # Whisper-tiny's encoder: attention, FFN in, FFN out


def parse_shapes(ap: argparse.ArgumentParser, text: str) -> list[tuple[int, int, int]]:
    """ROWSxINxOUT triples, comma-separated; ``ap.error`` (exit 2) on anything else."""
    shapes = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        dims = part.lower().split("x")
        if len(dims) != 3 or not all(d.isdigit() and int(d) > 0 for d in dims):
            ap.error(f"--shapes takes ROWSxINxOUT with whole numbers >= 1 (e.g. 1500x384x1536), got {part!r}")
        shapes.append(tuple(int(d) for d in dims))
    if not shapes:
        ap.error("--shapes needs at least one ROWSxINxOUT")
    return shapes


def run_shape(rows: int, n_in: int, n_out: int, dname: str, repeats: int, seed: int = 0) -> list[dict]:
    dtype = DTYPES[dname]
    gen = torch.Generator().manual_seed(seed)
    w, a, b, bias, r = half_rank_layer(n_in, n_out, gen)
    x64 = torch.randn(rows, n_in, generator=gen, dtype=torch.float64)
    x, wd, bd = x64.to(dtype), w.to(dtype), bias.to(dtype)
    nf4 = _args(quant.QuantFormat("nf4", 64), a, b, bd)
    int8 = _args(quant.QuantFormat("int8", 0), a, b, bd)
    fp = (a.to(dtype), None, "fp", 0, [r, n_in], b.to(dtype), None, "fp", 0, [r, n_out], bd)
    op = torch.ops.adaptwin.rank_linear
    fns = {
        "dense": lambda: F.linear(x, wd, bd),
        "nf4": lambda: op(x, *nf4),
        "int8": lambda: op(x, *int8),
        "nf4_reference": lambda: rank_linear_reference(x, *nf4),
        "fp": lambda: op(x, *fp),
    }
    # each provider against its own arithmetic in float64 (the dense layer, or the op's reference on the same
    # factors), so rel_err shows rounding, not the rank truncation every low-rank provider shares
    bias64 = bias.double()
    refs = {"dense": F.linear(x64, w.double(), bias64),
            "nf4": rank_linear_reference(x64, *nf4[:-1], bias64),
            "int8": rank_linear_reference(x64, *int8[:-1], bias64),
            "fp": rank_linear_reference(x64, fp[0].double(), *fp[1:5], fp[5].double(), *fp[6:10], bias64)}
    refs["nf4_reference"] = refs["nf4"]
    load = OtherLoad().start()
    with torch.inference_mode():
        errs = {p: float((fn().double() - refs[p]).norm() / refs[p].norm()) for p, fn in fns.items()}
        timings = time_interleaved(fns, repeats=repeats, warmup=2)
    other = load.stop()
    dense = timings["dense"].p50
    return [{
        "benchmark": BENCHMARK, "shape": f"M{rows}:{n_in}x{n_out}:r{r}", "dtype": dname, "provider": p,
        "p20_ms": t.p20, "p50_ms": t.p50, "p80_ms": t.p80, "repeats": repeats, "ratio_p50": t.p50 / dense,
        "gflop": 2 * rows * (n_in * n_out if p == "dense" else r * (n_in + n_out)) / 1e9,
        "gflop_ratio": 1.0 if p == "dense" else r * (n_in + n_out) / (n_in * n_out), "rel_err": errs[p],
        "device": device_string(), "threads": torch.get_num_threads(), "other_load": other, **versions(),
        "timestamp": now_utc(),
    } for p, t in timings.items()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated ROWSxINxOUT")
    ap.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated, of {list(DTYPES)}")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/rank_linear_rows.csv")
    args = ap.parse_args(argv)
    shapes = parse_shapes(ap, args.shapes)
    dtypes = pick(ap, args.dtypes, DTYPES, "dtypes")
    if args.repeats < 1 or args.threads < 1:
        ap.error(f"--repeats and --threads must be >= 1, got {args.repeats} and {args.threads}")
    torch.set_num_threads(args.threads)
    kernels = "C++ kernel" if backends.has_kernel("adaptwin::rank_linear", "cpu") else "reference (no adaptwin._C)"
    print(f"{device_string()}, torch {torch.__version__}, rank_linear on CPU: {kernels}")
    rows: list[dict] = []
    for dname in dtypes:
        for m, n_in, n_out in shapes:
            print(f"timing M{m} {n_in}x{n_out} {dname}...", flush=True)
            rows += run_shape(m, n_in, n_out, dname, args.repeats)
    print(format_table(["shape", "dtype", "provider", "p50 ms", "time/dense", "FLOP/dense", "rel err", "other load"],
                       [[r["shape"], r["dtype"], r["provider"], r["p50_ms"], f"{r['ratio_p50']:.3f}x",
                         f"{r['gflop_ratio']:.3f}x", f"{r['rel_err']:.1e}", r["other_load"]] for r in rows]))
    path = write_rows(args.out, rows)
    print(f"\nwrote {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
