"""Encoder-shaped attention on CPU: the op's flash kernel at rank-space head widths against ATen's SDPA.

    python -m benchmarks.attention_speed [--widths 16,24,32,40,48,52,64] [--heads 6] [--length 1500]
        [--dtypes fp32,bf16] [--repeats 21] [--threads 2] [--out results/attention_speed.csv]

One batch of ``--heads`` heads, ``--length`` queries and keys (Whisper-tiny's encoder: 6 heads, 1500
positions), no mask. q, k and v are head views of one (1, T, 3·H·w) projection output, the layout the
compressed attention hands the op. Providers, timed interleaved under ``torch.inference_mode``:

* ``op``: ``torch.ops.adaptwin.attention`` at width w (whatever backend this process runs for the CPU:
  ``adaptwin.ops.backends.cpu_features()`` says which paths, ``ADAPTWIN_CPU_CAP`` caps them).
* ``sdpa``: ``F.scaled_dot_product_attention`` on the same q, k, v at width w, unpadded.
* ``sdpa_dense``: SDPA at the dense model's head width (``--dense-width``, 64): what each layer's attention
  costs before compression. The CSV's ``ratio_p50`` is every row's time over it; ``gflop_ratio`` its width
  over the dense width.

``gflop`` counts 4·H·T·S·w (q·kᵀ and P·v; the softmax not counted). ``rel_err`` is the error against
the op's arithmetic in float64 (q, k, v rounded to the dtype first), so rounding only.
``python -m benchmarks.plot results/attention_speed.csv`` draws the CSV.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from adaptwin.ops import backends
from adaptwin.ops.attention import attention_reference
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

BENCHMARK = "attention_speed"
PROVIDERS = ("op", "sdpa", "sdpa_dense")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def heads(length: int, n_heads: int, width: int, dtype: torch.dtype, gen: torch.Generator) -> list[torch.Tensor]:
    """q, k, v as (1, H, T, w) views of one (1, T, 3·H·w) tensor (unit last stride, rows 3·H·w apart)."""
    qkv = torch.randn(1, length, 3 * n_heads * width, generator=gen).to(dtype)
    return [t.view(1, length, n_heads, width).transpose(1, 2) for t in qkv.split(n_heads * width, -1)]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def run_width(width: int, dname: str, n_heads: int, length: int, dense_width: int, repeats: int,
              seed: int = 0) -> list[dict]:
    dtype = DTYPES[dname]
    gen = torch.Generator().manual_seed(seed + width)
    q, k, v = heads(length, n_heads, width, dtype, gen)
    qd, kd, vd = heads(length, n_heads, dense_width, dtype, gen)
    scale, dense_scale = width ** -0.5, dense_width ** -0.5
    op = torch.ops.adaptwin.attention.default
    fns = {
        "op": lambda: op(q, k, v, None, scale, False),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale),
        "sdpa_dense": lambda: F.scaled_dot_product_attention(qd, kd, vd, scale=dense_scale),
    }
    with torch.inference_mode():
        ref = attention_reference(q.double(), k.double(), v.double(), None, scale, False)  # (1, T, H, w)
        ref_dense = F.scaled_dot_product_attention(qd.double(), kd.double(), vd.double(), scale=dense_scale)
        errs = {"op": rel_err(fns["op"](), ref), "sdpa": rel_err(fns["sdpa"]().transpose(1, 2), ref),
                "sdpa_dense": rel_err(fns["sdpa_dense"](), ref_dense)}
        load = OtherLoad().start()
        timings = time_interleaved(fns, repeats=repeats, warmup=2)
        other = load.stop()
    dense = timings["sdpa_dense"].p50
    rows = []
    for p, t in timings.items():
        w = dense_width if p == "sdpa_dense" else width
        rows.append({
            "benchmark": BENCHMARK, "shape": f"H{n_heads}-T{length}-w{width}", "dtype": dname, "provider": p,
            "p20_ms": t.p20, "p50_ms": t.p50, "p80_ms": t.p80, "repeats": repeats, "ratio_p50": t.p50 / dense,
            "gflop": 4 * n_heads * length * length * w / 1e9, "gflop_ratio": w / dense_width, "rel_err": errs[p],
            "device": device_string(), "threads": torch.get_num_threads(), "other_load": other, **versions(),
            "timestamp": now_utc(),
        })
    return rows


def parse_widths(ap: argparse.ArgumentParser, text: str) -> list[int]:
    """Comma-separated whole numbers >= 1; ``ap.error`` (exit 2) on anything else."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        ap.error(f"--widths takes comma-separated head widths >= 1 (e.g. 24,32,40), got {text!r}")
    return [int(p) for p in parts]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", default="16,24,32,40,48,52,64", help="comma-separated rank-space head widths")
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--length", type=int, default=1500, help="queries = keys (encoder positions)")
    ap.add_argument("--dense-width", type=int, default=64, help="the dense model's head width (sdpa_dense)")
    ap.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated, of {list(DTYPES)}")
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/attention_speed.csv")
    args = ap.parse_args(argv)
    widths = parse_widths(ap, args.widths)
    dtypes = pick(ap, args.dtypes, DTYPES, "dtypes")
    for name in ("heads", "length", "dense_width", "repeats", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    paths = backends.cpu_features() if backends.load()["cpp"] else "reference (no adaptwin._C)"
    print(f"{device_string()}, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
          f"adaptwin CPU paths: {paths}")
    rows: list[dict] = []
    for dname in dtypes:
        for w in widths:
            print(f"timing width {w} {dname}...", flush=True)
            rows += run_width(w, dname, args.heads, args.length, args.dense_width, args.repeats)
    sdpa = {(r["shape"], r["dtype"]): r["p50_ms"] for r in rows if r["provider"] == "sdpa"}
    print(format_table(
        ["shape", "dtype", "provider", "p50 ms", "GFLOP/s", "time/sdpa_dense", "time/sdpa", "rel err", "other load"],
        [[r["shape"], r["dtype"], r["provider"], r["p50_ms"], f"{r['gflop'] / r['p50_ms'] * 1e3:.0f}",
          f"{r['ratio_p50']:.3f}x", f"{r['p50_ms'] / sdpa[r['shape'], r['dtype']]:.3f}x", f"{r['rel_err']:.1e}",
          r["other_load"]] for r in rows]))
    path = write_rows(args.out, rows)
    print(f"\nwrote {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
