"""Batch-1 rank-r linear with NF4 factors vs dense F.linear on CPU (decoding-shaped: x is (1, in)).

    python -m benchmarks.rank_linear_speed [--sizes 384,768,1536,3072] [--repeats 30] [--threads 2]
        [--dtype fp32] [--cpp-loop] [--out results/rank_linear_speed.csv]

``--dtype`` (fp32 or bf16) is x's, the dense weight's, the bias's and the plain factors' (like with like);
the quantised factors are the same codes either way.

For each (in, out) the rank is the one that halves the parameters (r·(in + out) = in·out / 2, the
compression ratio 0.5 of the encoder benchmark). Providers, timed interleaved in one run:

* ``dense``: ``F.linear(x, W)`` with W (out, in) in the run's dtype: the original layer.
* ``nf4``: ``torch.ops.adaptwin.rank_linear`` with both factors NF4 (blocksize 64): the C++ decode path
  where ``adaptwin._C`` is built, else the reference.
* ``int8``: the same op with per-row int8 factors.
* ``nf4_reference``: the op's pure-PyTorch reference on the NF4 factors (dequantise, then two GEMMs).
* ``lowrank``: two F.linear with plain factors in the run's dtype (low rank, no quantisation).

These run under ``torch.inference_mode``. Two more run, interleaved, under ``torch.no_grad`` (as ``generate``
does), where a custom op's Python autograd kernel runs on every call:

* ``nf4_no_grad``: the NF4 op as the compressed modules call it, `run_rank_linear`: through
  ``adaptwin._C``'s entry point (arguments converted in C++, the op called through the C++ dispatcher
  below the autograd keys; `adaptwin.ops.backends.FAST`) where the extension is built;
* ``nf4_no_grad_torch_ops``: the op through ``torch.ops`` below the autograd key
  (`backends.call_without_autograd`), what `run_rank_linear` does without that entry point;
* ``nf4_no_grad_direct``: the op called directly, through its autograd kernel.

and, module against module (what a model's forward pays per layer, ``nn.Module.__call__`` included; their
``time/dense`` is against ``dense_module``):

* ``dense_module``: an ``nn.Linear`` holding W and the bias (fp32 runs only);
* ``nf4_module``: a packed `QuantLowRankLinear` (NF4, blocksize 64) holding the same factors and bias,
  as `adaptwin.load` builds it for a quantised compressed model;
* ``dense_int8_module``: the peer: that ``nn.Linear`` as torch's dynamically quantised int8 linear
  (`benchmarks.common.int8_dynamic`: the full-rank W in int8, x quantised on each call).

With ``--cpp-loop``, two more, timed in loops written in C++ (``benchmarks/cpp/dispatch_loop.cpp``, built
on first use, ~45 s): ``dense_cpp_loop`` (``at::linear``) and ``nf4_cpp_loop`` (the NF4 op called through
the C++ dispatcher). That is what a libtorch / AOTInductor deployment pays per call, without the Python
argument conversion of ``torch.ops`` (about 3 us for this 12-argument schema); their ``time/dense`` is
against ``dense_cpp_loop``.

Batch-1 linear layers are memory-bound: the table also gives the weight bytes each provider reads and the
GB/s that makes. Each sample times ``--inner`` calls (the calls take microseconds). The CPU is shared with
other processes, so timings are noisy; the ``other load`` column says how busy it was.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from adaptwin import quant
from adaptwin.compressors.quantized import QuantLowRankLinear
from adaptwin.ops import backends
from adaptwin.ops.backends import call_without_autograd
from adaptwin.ops.rank_linear import rank_linear_reference, run_rank_linear
from benchmarks.common import (
    OtherLoad,
    Timing,
    device_string,
    format_table,
    int8_dynamic,
    now_utc,
    stored_bytes,
    time_interleaved,
    versions,
    write_rows,
)

BENCHMARK = "rank_linear_speed"
PROVIDERS = ("dense", "nf4", "int8", "nf4_reference", "lowrank")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def half_rank(n_in: int, n_out: int) -> int:
    """The rank whose two factors hold half the dense parameters."""
    return max(1, round(n_in * n_out / (2 * (n_in + n_out))))


def half_rank_layer(n_in: int, n_out: int, gen: torch.Generator) -> tuple:
    """(W (out, in), A (r, in), B (r, out), bias, r): a random float32 layer and its SVD factors at the rank
    that halves the parameters (the singular values split evenly between A and B)."""
    r = half_rank(n_in, n_out)
    w = torch.randn(n_out, n_in, generator=gen) / n_in**0.5
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    a = s[:r, None].sqrt() * vh[:r]
    b = (u[:, :r] * s[:r].sqrt()).t().contiguous()
    return w, a, b, torch.randn(n_out, generator=gen), r


def _args(fmt: quant.QuantFormat, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor) -> tuple:
    sa, sb = fmt.quantize(a), fmt.quantize(b)
    return (sa["qweight"], fmt.scale(sa), fmt.kind, fmt.blocksize, list(a.shape),
            sb["qweight"], fmt.scale(sb), fmt.kind, fmt.blocksize, list(b.shape), bias)


def _modules(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor) -> tuple:
    """(nn.Linear with W and the bias, packed NF4 `QuantLowRankLinear` with the factors A, B and the bias)."""
    dense = torch.nn.Linear(w.shape[1], w.shape[0])
    low = QuantLowRankLinear(w.shape[1], w.shape[0], a.shape[0], 0, True, fmt=quant.QuantFormat("nf4", 64),
                             quantize_lora=True, packed=False)
    with torch.no_grad():
        dense.weight.copy_(w)
        dense.bias.copy_(bias)
        low.in_factor.copy_(a)  # (k, in)
        low.out_factor.copy_(b.t())  # stored (out, k)
        low.bias.copy_(bias)
    low.pack()
    return dense, low


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


CPP_LOOP_CALLS = 200  # timed calls per C++ loop sample (after up to 100 untimed ones)


def load_cpp_loop():
    """The C++ timing loops (benchmarks/cpp/dispatch_loop.cpp), built with torch.utils.cpp_extension."""
    from pathlib import Path

    from torch.utils.cpp_extension import load

    source = Path(__file__).parent / "cpp" / "dispatch_loop.cpp"
    return load(name="adaptwin_bench_dispatch_loop", sources=[str(source)], extra_cflags=["-O2"], verbose=False)


def run_size(n_in: int, n_out: int, repeats: int, inner: int, seed: int = 0, cpp=None,
             dtype: str = "fp32") -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    w, a, b, bias, r = half_rank_layer(n_in, n_out, gen)
    x = torch.randn(1, n_in, generator=gen)
    t = DTYPES[dtype]
    nf4 = _args(quant.QuantFormat("nf4", 64), a, b, bias.to(t))
    int8 = _args(quant.QuantFormat("int8", 0), a, b, bias.to(t))
    bt = b.t().contiguous()  # (out, r) for F.linear
    x, w, a, bt, bias = (v.to(t) for v in (x, w, a, bt, bias))
    op = torch.ops.adaptwin.rank_linear

    def rep(fn):
        def run():
            for _ in range(inner):
                fn()
        return run

    fns = {
        "dense": rep(lambda: F.linear(x, w, bias)),
        "nf4": rep(lambda: op(x, *nf4)),
        "int8": rep(lambda: op(x, *int8)),
        "nf4_reference": rep(lambda: rank_linear_reference(x, *nf4)),
        "lowrank": rep(lambda: F.linear(F.linear(x, a), bt, bias)),
    }
    weight_bytes = {"dense": _nbytes(w, bias), "nf4": _nbytes(*nf4[:2], *nf4[5:7], bias),
                    "nf4_no_grad": _nbytes(*nf4[:2], *nf4[5:7], bias),
                    "nf4_no_grad_direct": _nbytes(*nf4[:2], *nf4[5:7], bias),
                    "nf4_no_grad_torch_ops": _nbytes(*nf4[:2], *nf4[5:7], bias),
                    "int8": _nbytes(*int8[:2], *int8[5:7], bias), "nf4_reference": _nbytes(*nf4[:2], *nf4[5:7], bias),
                    "lowrank": _nbytes(a, bt, bias)}
    ref = F.linear(x.double(), w.double(), bias.double())
    errs = {p: float((fn_out - ref).norm() / ref.norm()) for p, fn_out in (
        ("dense", F.linear(x, w, bias).double()), ("nf4", op(x, *nf4).double()),
        ("nf4_no_grad", run_rank_linear(x, *nf4).double()), ("nf4_no_grad_direct", op(x, *nf4).double()),
        ("nf4_no_grad_torch_ops", call_without_autograd(op.default, x, *nf4).double()),
        ("int8", op(x, *int8).double()),
        ("nf4_reference", rank_linear_reference(x, *nf4).double()),
        ("lowrank", F.linear(F.linear(x, a), bt, bias).double()))}
    no_grad = {"nf4_no_grad": rep(lambda: run_rank_linear(x, *nf4)),
               "nf4_no_grad_torch_ops": rep(lambda: call_without_autograd(op.default, x, *nf4)),
               "nf4_no_grad_direct": rep(lambda: op(x, *nf4))}
    if dtype == "fp32":
        dense_module, nf4_module = _modules(w, a, b, bias)
        int8_module = int8_dynamic(dense_module)
        no_grad.update(dense_module=rep(lambda: dense_module(x)), nf4_module=rep(lambda: nf4_module(x)),
                       dense_int8_module=rep(lambda: int8_module(x)))
        weight_bytes.update(dense_module=weight_bytes["dense"], nf4_module=weight_bytes["nf4"],
                            dense_int8_module=stored_bytes(int8_module))
        with torch.no_grad():
            errs.update({p: float((m(x).double() - ref).norm() / ref.norm())
                         for p, m in (("dense_module", dense_module), ("nf4_module", nf4_module),
                                      ("dense_int8_module", int8_module))})
    loops = {}
    if cpp is not None:
        loops = {"dense_cpp_loop": lambda: cpp.linear_loop(x, w, bias, CPP_LOOP_CALLS),
                 "nf4_cpp_loop": lambda: cpp.rank_linear_loop(x, *nf4, CPP_LOOP_CALLS)}
        weight_bytes.update(dense_cpp_loop=weight_bytes["dense"], nf4_cpp_loop=weight_bytes["nf4"])
        errs.update(dense_cpp_loop=errs["dense"], nf4_cpp_loop=errs["nf4"])
    load = OtherLoad().start()
    with torch.inference_mode():
        timings = time_interleaved(fns, repeats=repeats, warmup=3)
    with torch.no_grad():
        timings.update(time_interleaved(no_grad, repeats=repeats, warmup=3))
    if loops:  # each call returns its loop's own seconds per call (its warm-up calls not counted)
        per_call = {p: [] for p in loops}
        for r_ in range(repeats):
            names = list(loops)[r_ % 2:] + list(loops)[:r_ % 2]
            for p in names:
                per_call[p].append(loops[p]())
        timings.update({p: Timing([s_ * inner for s_ in v]) for p, v in per_call.items()})
    other = load.stop()
    fns.update(no_grad)
    fns.update(loops)
    timings = {p: Timing([s / inner for s in t.samples]) for p, t in timings.items()}
    rows = []
    for p in fns:
        t = timings[p]
        dense = timings["dense_cpp_loop" if p.endswith("_cpp_loop") else "dense_module" if p.endswith("_module")
                        else "dense"].p50
        rows.append({
            "benchmark": BENCHMARK, "shape": f"{n_in}x{n_out}:r{r}", "dtype": dtype, "provider": p,
            "p20_ms": t.p20, "p50_ms": t.p50, "p80_ms": t.p80, "repeats": repeats, "ratio_p50": t.p50 / dense,
            "gflop": 2 * (n_in * n_out if p.startswith("dense") else r * (n_in + n_out)) / 1e9,
            "rel_err": errs[p], "device": device_string(), "threads": torch.get_num_threads(),
            "other_load": other, **versions(), "timestamp": now_utc(), "_bytes": weight_bytes[p],
            "weight_mb": weight_bytes[p] / 1e6,
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="384,768,1536,3072", help="comma-separated square sizes d (d x d layers)")
    ap.add_argument("--ffn", action="store_true", help="also time the FFN shapes d x 4d and 4d x d")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--inner", type=int, default=20, help="calls per timed sample")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="x, dense weight, bias, plain factors")
    ap.add_argument("--cpp-loop", action="store_true",
                    help="also time both layers in C++ loops (no Python per call); builds a small extension")
    ap.add_argument("--out", default="results/rank_linear_speed.csv")
    args = ap.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--sizes must be comma-separated whole numbers, got {args.sizes!r}")
    if not sizes or min(sizes) < 1:
        ap.error("--sizes needs at least one size >= 1")
    if args.repeats < 1 or args.inner < 1:
        ap.error(f"--repeats and --inner must be >= 1, got {args.repeats} and {args.inner}")
    torch.set_num_threads(args.threads)
    kernels = "C++ kernel" if backends.has_kernel("adaptwin::rank_linear", "cpu") else "reference (no adaptwin._C)"
    print(f"{device_string()}, torch {torch.__version__}, rank_linear on CPU: {kernels}")
    cpp = None
    if args.cpp_loop:
        if not backends.has_kernel("adaptwin::rank_linear", "cpu"):
            ap.error("--cpp-loop times the C++ kernel, and adaptwin._C is not built here (`make install`)")
        print("building the C++ timing loops (benchmarks/cpp/dispatch_loop.cpp)...", flush=True)
        cpp = load_cpp_loop()
    shapes = [(d, d) for d in sizes] + ([(d, 4 * d) for d in sizes] + [(4 * d, d) for d in sizes] if args.ffn else [])
    rows: list[dict] = []
    for n_in, n_out in shapes:
        print(f"timing {n_in}x{n_out}...", flush=True)
        rows += run_size(n_in, n_out, args.repeats, args.inner, cpp=cpp, dtype=args.dtype)
    table = [[r["shape"], r["provider"], r["p20_ms"] * 1e3, r["p50_ms"] * 1e3, r["p80_ms"] * 1e3,
              f"{r['ratio_p50']:.3f}x", f"{1 / r['ratio_p50']:.2f}x", r["_bytes"] / 1e6,
              r["_bytes"] / (r["p50_ms"] * 1e-3) / 1e9, f"{r['rel_err']:.1e}", f"{r['other_load']:.2f}"]
             for r in rows]
    print(format_table(["shape", "provider", "p20 us", "p50 us", "p80 us", "time/dense", "speed-up", "weight MB",
                        "GB/s", "rel err", "other load"], table))
    print("\nrel err: vs the float64 dense layer (includes the rank truncation and quantisation error of the "
          "factors, the same for every low-rank provider up to rounding).")
    path = write_rows(args.out, [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows])
    print(f"\nwrote {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
