"""The GPU figures of the kernels, in one call on a CUDA machine: ceilings, fused attention, NF4 GEMV,
batched rank-r linear.

    python -m benchmarks.gpu_kernels [--out results/gpu_kernels.csv] [--quick] [--tune]

Made to fit a short device lease (one command: checks, then timings, then a table; see docs/kernels.md,
"GPU (H100, H200)"). Every kernel timing is the median of CUDA graph replays (`triton.testing.do_bench_cudagraph`),
so that Python and launch overheads do not swamp microsecond kernels: on an H100 an eager Triton attention
call cost 65-160 us at batch 1 whatever its kernel's work, so the prefill rows also note each call's eager
time (`do_bench`, CUDA events). On random data, after a correctness check of the same call against a
float64 reference.

1. Ceilings measured here: a device-to-device copy of 1 GiB (GB/s counting bytes read plus written) and an
   8192³ matrix product in bf16 and fp16 (TFLOP/s). The achieved figures below are quoted against these.
2. Attention at T = 1500 (a 30 s Whisper window): PyTorch SDPA on the dense heads (d_h = 64) against the
   Triton kernel on rank-space heads of width r + l in 16..48, fp16 and bf16, for (batch, heads) of
   Whisper tiny (1, 6) and large (1, 20), and a batch of 16 large windows. FLOPs 4·B·H·T²·w (q·kᵀ and
   P·V); bytes q, k, v read and the output written once. Widths cut into two dot parts (33-48) are also
   timed padded to one part (``ONE_PART``: fewer, wider dots), and every width with each tile's P·V issued
   after the next tile's scores (``DEFER_PV``, `adaptwin.kernels.attention`). ``--tune`` also sweeps the
   Triton block sizes on the largest shape and reports the best configuration next to the default.
   Decoding rows: one query per (batch, head) against the same 1500 keys (the Triton kernel splits the
   keys over the grid); bytes are the keys and values read.
3. Batch-1 rank-r linear (decoding), d = 1024..8192: the op with NF4 factors at the rank that halves the
   parameters against dense fp16 `F.linear` (cuBLAS), and bitsandbytes' NF4 `matmul_4bit` on the dense
   weight where bitsandbytes imports. Bytes: what each provider must read (codes, scales, weights, x).
   Weight sets rotate so that every call reads from device memory, not from the 50 MB L2: as many sets as
   make the NF4 factors three times the L2 (up to 1024; until 2026-11-25 at most 8, which left the NF4
   factors of d <= 4096 partly in L2). The op takes the code values from a register table by warp
   shuffles (``GATHER``) and launches its kernels with programmatic dependent launch (each lets the next
   launch early); a second adaptwin row takes the values from the select tree instead, a third launches
   without PDL, a fourth reads B's codes as 32-bit words in h·B (``cols: {"WORDS": True}``), a fifth runs
   the whole call in one launch (``gemv="one_launch"``: h per slab of rank
   rows, its products with B added atomically into a float32 workspace, the last program of each column
   chunk writing the output) instead of two or three. The same at 8 rows (``:M8``, a batch of decoding
   streams): cuBLAS, the default plan (both factors decoded into fp16, then the products) and the
   one-launch kernel (each code byte decoded once for the 8 rows). ``--tune`` adds rows with the best
   tiles of the two whole-byte NF4 kernels and of the one-launch kernel.
4. Several rows of x (prefill, encoder frames, a batch of tokens) through a rank-r linear at r <= 64:
   dense fp16 `F.linear` (cuBLAS) against the op with NF4 factors as it plans the call (each factor
   decoded once per call, then one launch or cuBLAS), the same call decoding in the tiled kernels instead
   (``decode="tiles"``: one launch, h = x·Aᵀ kept in registers; and as two launches), the op's reference
   on the GPU (torch's dequantisation, then two GEMMs), the op with fp16 factors (as planned, and forced
   to one launch), and two cuBLAS GEMMs on fp16 factors. FLOPs 2·M·r·(in + out) for the low-rank
   providers, 2·M·in·out for the dense one.

The attention row's speed-up is SDPA's time over ours at equal (B, H, T); the issue's goal is >= 1.5x
at r + l = 16..48. The GEMV rows' goal is >= 3x over cuBLAS fp16.
"""

from __future__ import annotations

import argparse
import re
import sys
from functools import partial

import torch
import torch.nn.functional as F

from benchmarks import gpu_common as gc
from benchmarks.common import device_string, format_table, now_utc, pick, versions, write_rows
from benchmarks.gpu_common import DTYPES, FIELDS, KEY, ceilings, rel_err, result_row
from benchmarks.gpu_gemv import GEMV_SIZES, bench_gemv

PARTS = ("attention", "gemv", "batched")
WIDTHS = (16, 24, 32, 40, 48)
ATTENTION_SHAPES = ((1, 6), (1, 20), (16, 20))  # (batch, heads): Whisper tiny, large, a batch of large
# (rows, in, rank, out): Whisper-tiny frames through a rank-40 projection and a rank-64 FFN matrix, a batch
# of 256 tokens and one of 16 through a 4096-wide layer at rank 64
BATCHED_SHAPES = ((1500, 384, 40, 384), (1500, 384, 64, 1536), (256, 4096, 64, 4096), (16, 4096, 64, 4096))
# Tuning sweep, sized for a lease: 24 attention tiles (each compiles spill-free for sm_90,
# tests/test_kernels_sm90.py), timed on one (batch, heads) shape per dtype and width (the GEMV's sweeps:
# benchmarks/gpu_gemv.py).
TUNE = [{"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s}
        for m in (64, 128) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3) if m * n <= 8192]
# and DEFER_PV at the tiles around the default (it holds 15-30 more registers: fewer programs per multiprocessor)
TUNE += [{"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s, "DEFER_PV": True}
         for m, n, w, s in ((64, 64, 4, 3), (64, 32, 4, 2), (128, 64, 8, 2), (128, 32, 8, 2))]


def attention_flops(batch: int, heads: int, tokens: int, width: int) -> int:
    """q·kᵀ and P·V multiply-adds ×2."""
    return 4 * batch * heads * tokens * tokens * width


def attention_bytes(batch: int, heads: int, tokens: int, width: int, element: int) -> int:
    """q, k, v read once and the output written once."""
    return 4 * batch * heads * tokens * width * element


def bench_attention(device: torch.device, dtypes: list[str], shapes, widths, tune: bool, ceil: dict) -> list[dict]:
    """Every shape at the default tiles; with ``tune``, the sweep on the last (largest) shape only."""
    rows = []
    for dname in dtypes:
        for i, (batch, heads) in enumerate(shapes):
            rows += _attention_shape(device, dname, batch, heads, widths, tune and i == len(shapes) - 1, ceil)
            rows += _decode_shape(device, dname, batch, heads, widths)
    return rows


def _decode_shape(device: torch.device, dname: str, batch: int, heads: int, widths,
                  tokens: int = 1500) -> list[dict]:
    """One decoder query per (batch, head) against a 30 s window of keys (Whisper's cross-attention while
    generating): SDPA on dense heads against the Triton kernel, keys split over the grid; CUDA graphs."""
    from adaptwin.kernels.attention import attention as triton_attention

    from adaptwin.ops.attention import attention_reference

    dtype = DTYPES[dname]
    shape = f"B{batch}-H{heads}-T1-S{tokens}"
    q = torch.randn(batch, heads, 1, 64, device=device, dtype=dtype)
    kv = torch.randn(batch, heads, tokens, 64, device=device, dtype=dtype)
    with torch.inference_mode():
        sdpa_us = gc.bench(partial(F.scaled_dot_product_attention, q, kv, kv), graph=True)
    element = q.element_size()
    moved = 2 * batch * heads * tokens * 64 * element
    rows = [result_row("attention_decode", shape, dname, "sdpa_dense_w64", sdpa_us, speedup=1.0,
                        gbps=moved / sdpa_us / 1e3)]
    for width in widths:
        q, k, v = (torch.randn(batch, heads, n, width, device=device, dtype=dtype) for n in (1, tokens, tokens))
        err = rel_err(triton_attention(q, k, v, None, 64 ** -0.5, False),
                      attention_reference(q.double(), k.double(), v.double(), None, 64 ** -0.5, False))
        if not err < 2e-2:
            raise RuntimeError(f"decoding attention {shape} w{width} {dname}: relative error {err:.2e}")
        with torch.inference_mode():
            us = gc.bench(partial(triton_attention, q, k, v, None, 64 ** -0.5, False), graph=True)
        moved = 2 * batch * heads * tokens * width * element
        rows.append(result_row("attention_decode", shape, dname, f"triton_w{width}", us, speedup=sdpa_us / us,
                                gbps=moved / us / 1e3, rel_err=err))
    return rows


def _attention_shape(device: torch.device, dname: str, batch: int, heads: int, widths, tune: bool,
                     ceil: dict, tokens: int = 1500) -> list[dict]:
    from adaptwin.kernels.attention import _parts, default_config, deferred_pv_config
    from adaptwin.kernels.attention import attention as triton_attention

    from adaptwin.ops.attention import attention_reference

    dtype = DTYPES[dname]
    shape = f"B{batch}-H{heads}-T{tokens}"
    dense = [torch.randn(batch, heads, tokens, 64, device=device, dtype=dtype) for _ in range(3)]
    # GPU time (CUDA graph replays) for every provider; eager time (a Python call each) in the note
    sdpa_eager = gc.bench(partial(F.scaled_dot_product_attention, *dense))
    sdpa_us = gc.bench(partial(F.scaled_dot_product_attention, *dense), graph=True)
    element = dense[0].element_size()
    rows = [result_row("attention", shape, dname, "sdpa_dense_w64", sdpa_us, speedup=1.0,
                        tflops=attention_flops(batch, heads, tokens, 64) / sdpa_us / 1e6,
                        gbps=attention_bytes(batch, heads, tokens, 64, element) / sdpa_us / 1e3,
                        config=f"eager {sdpa_eager:.1f} us")]
    peak = ceil.get(f"gemm_{dname}_tflops")
    scale = 64 ** -0.5
    for width in widths:
        q, k, v = (torch.randn(batch, heads, tokens, width, device=device, dtype=dtype) for _ in range(3))
        ref = attention_reference(q.double(), k.double(), v.double(), None, scale, False)
        out = triton_attention(q, k, v, None, scale, False)
        err = rel_err(out, ref)
        if not (err < 2e-2 and torch.isfinite(out).all()):
            raise RuntimeError(f"attention {shape} w{width} {dname}: relative error {err:.2e}")
        timed = {}
        eager = gc.bench(partial(triton_attention, q, k, v, None, scale, False))
        configs = [("default", default_config(q))]
        errs = {"default": err}
        if _parts(width)[1]:  # two dot parts: also the width padded to one (fewer, wider dots)
            one = {**default_config(q), "ONE_PART": True}
            errs["one part"] = rel_err(triton_attention(q, k, v, None, scale, False, config=one), ref)
            if not errs["one part"] < 2e-2:
                raise RuntimeError(f"attention {shape} w{width} {dname}, one part: relative error "
                                   f"{errs['one part']:.2e}")
            configs.append(("one part", one))
        deferred = deferred_pv_config(q)  # each tile's P·V in flight during the next softmax
        errs["defer pv"] = rel_err(triton_attention(q, k, v, None, scale, False, config=deferred), ref)
        if not errs["defer pv"] < 2e-2:
            raise RuntimeError(f"attention {shape} w{width} {dname}, DEFER_PV: relative error {errs['defer pv']:.2e}")
        configs.append(("defer pv", deferred))
        for label, config in configs + ([(str(c), c) for c in TUNE] if tune else []):
            try:
                timed[label] = gc.bench(partial(triton_attention, q, k, v, None, scale, False, config=config),
                                        graph=True)
                if tune:  # every tile's time, not only the best: the sweep's record
                    print(f"  tune {shape} w{width} {dname} {label}: {timed[label]:.1f} us", file=sys.stderr,
                          flush=True)
            except Exception as exc:  # a block shape the compiler refuses (shared memory): skip it
                print(f"  {shape} w{width} config {label} failed: {type(exc).__name__}", file=sys.stderr)
        flops = attention_flops(batch, heads, tokens, width)
        moved = attention_bytes(batch, heads, tokens, width, element)
        picks = [("default", f"triton_w{width}")] + [("one part", f"triton_w{width}_one_part")] * ("one part" in timed)
        picks += [("defer pv", f"triton_w{width}_defer_pv")] * ("defer pv" in timed)
        if tune:
            picks.append((min(timed, key=timed.get), f"triton_w{width}_tuned"))
        for label, provider in picks:
            us = timed[label]
            note = label + (f"; {flops / us / 1e6 / peak:.0%} of GEMM peak" if peak else "")
            note += f"; eager {eager:.1f} us" if label == "default" else ""
            rows.append(result_row("attention", shape, dname, provider, us, speedup=sdpa_us / us,
                                    tflops=flops / us / 1e6, gbps=moved / us / 1e3, rel_err=errs.get(label, err),
                                    config=note))
    return rows


def bench_batched(device: torch.device, dtypes: list[str], shapes=BATCHED_SHAPES) -> list[dict]:
    return [row for dname in dtypes for shape in shapes for row in _batched_shape(device, dname, *shape)]


def _batched_shape(device: torch.device, dname: str, m: int, d_in: int, r: int, d_out: int) -> list[dict]:
    """Several rows through a rank-r linear: the providers of the module docstring's item 4, each checked
    against float64 first."""
    from adaptwin.kernels.rank_linear import rank_linear as triton_rank_linear

    from adaptwin import quant
    from adaptwin.ops.rank_linear import _factor, rank_linear_reference, run_rank_linear

    dtype, fmt = DTYPES[dname], quant.QuantFormat("nf4", 64)
    shape = f"M{m}:{d_in}x{d_out}:r{r}"
    w = torch.randn(d_out, d_in, device=device) / d_in ** 0.5
    a, b = gc.low_rank_factors(r, d_in, d_out, device)  # (r, in), (r, out)
    qa, qb = fmt.quantize(a), fmt.quantize(b)
    nf4 = (qa["qweight"], fmt.scale(qa), "nf4", 64, [r, d_in], qb["qweight"], fmt.scale(qb), "nf4", 64, [r, d_out],
           None)
    a16, b16 = a.to(dtype), b.to(dtype)
    fp = (a16, None, "fp", 0, [r, d_in], b16, None, "fp", 0, [r, d_out], None)
    b16t, w16 = b16.T.contiguous(), w.to(dtype)
    x = torch.randn(m, d_in, device=device, dtype=dtype)
    ref_nf4 = x.double() @ (_factor(*nf4[5:7], "nf4", 64, (r, d_out), torch.float64).T
                            @ _factor(*nf4[:2], "nf4", 64, (r, d_in), torch.float64)).T
    ref_fp = x.double() @ a16.double().T @ b16.double()
    low = 2 * m * r * (d_in + d_out)
    providers = {  # name: (call, reference, flops)
        "cublas_dense": (lambda: F.linear(x, w16), x.double() @ w16.double().T, 2 * m * d_in * d_out),
        "adaptwin_nf4": (lambda: run_rank_linear(x, *nf4), ref_nf4, low),
        "adaptwin_nf4_tiles": (lambda: triton_rank_linear(x, *nf4, config={"decode": "tiles"}), ref_nf4, low),
        "adaptwin_nf4_tiles_two_launches": (
            lambda: triton_rank_linear(x, *nf4, config={"decode": "tiles", "fuse": False}), ref_nf4, low),
        "nf4_reference": (lambda: rank_linear_reference(x, *nf4), ref_nf4, low),
        "adaptwin_fp": (lambda: run_rank_linear(x, *fp), ref_fp, low),
        "adaptwin_fp_one_launch": (lambda: triton_rank_linear(x, *fp, config={"fuse": True}), ref_fp, low),
        "cublas_lowrank_two_gemms": (lambda: F.linear(F.linear(x, a16), b16t), ref_fp, low),
    }
    rows, base = [], None
    with torch.inference_mode():
        for name, (fn, ref, flops) in providers.items():
            err = rel_err(fn(), ref)
            if not err < 1e-2:
                raise RuntimeError(f"rank_linear {shape} {dname} {name}: relative error {err:.2e}")
            us = gc.bench(fn, graph=True)
            base = base or us
            rows.append(result_row("batched", shape, dname, name, us, speedup=base / us, tflops=flops / us / 1e6,
                                    rel_err=err))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/gpu_kernels.csv")
    ap.add_argument("--dtypes", default="fp16,bf16", help=f"comma-separated, from {sorted(DTYPES)}")
    ap.add_argument("--quick", action="store_true", help="one attention shape, two widths, two GEMV sizes")
    ap.add_argument("--tune", action="store_true",
                    help="also sweep the Triton block sizes (attention on the largest shape, the NF4 GEMV)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {list(PARTS)}")
    ap.add_argument("--widths", default=None, help=f"attention head widths, comma-separated (default {WIDTHS})")
    ap.add_argument("--shapes", default=None, help="attention (batch x heads) shapes, comma-separated, e.g. 16x20 "
                    f"(default {','.join(f'{b}x{h}' for b, h in ATTENTION_SHAPES)}; --tune sweeps the last)")
    ap.add_argument("--gemv-sizes", default=None, help=f"comma-separated d (default {GEMV_SIZES}; --quick: every "
                    "other one)")
    args = ap.parse_args(argv)
    dtypes = pick(ap, args.dtypes, DTYPES, "dtypes")
    parts = pick(ap, args.parts, dict.fromkeys(PARTS), "parts")
    sizes = GEMV_SIZES[1::2] if args.quick else GEMV_SIZES
    if args.gemv_sizes:
        text = [d.strip() for d in args.gemv_sizes.split(",") if d.strip()]
        if not text or not all(d.isdigit() and int(d) >= 8 and int(d) % 8 == 0 for d in text):
            ap.error(f"--gemv-sizes must be comma-separated multiples of 8 (>= 8), got {args.gemv_sizes!r}")
        sizes = tuple(int(d) for d in text)
    widths = (16, 48) if args.quick else WIDTHS
    if args.widths:
        text = [w.strip() for w in args.widths.split(",") if w.strip()]
        if not text or not all(w.isdigit() and 1 <= int(w) <= 256 for w in text):
            ap.error(f"--widths must be comma-separated integers in 1..256, got {args.widths!r}")
        widths = tuple(int(w) for w in text)
    shapes = ATTENTION_SHAPES[:1] if args.quick else ATTENTION_SHAPES
    if args.shapes:
        found = [re.fullmatch(r"(\d+)x(\d+)", t.strip()) for t in args.shapes.split(",") if t.strip()]
        if not found or not all(m and int(m[1]) > 0 and int(m[2]) > 0 for m in found):
            ap.error(f"--shapes must be comma-separated BATCHxHEADS with positive integers (e.g. 16x20), "
                     f"got {args.shapes!r}")
        shapes = tuple((int(m[1]), int(m[2])) for m in found)
    if not torch.cuda.is_available():  # skipped, not failed: `make bench` runs every script on CPU machines too
        print("benchmarks.gpu_kernels: skipped, it needs a CUDA device and none is visible here", file=sys.stderr)
        return 0
    import adaptwin.ops  # noqa: F401  (loads the backends: Triton on CUDA)

    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    print(f"{device_string()}; {props.name}, {props.multi_processor_count} SMs, L2 {l2 >> 20} MiB, torch "
          f"{torch.__version__}", flush=True)
    torch.manual_seed(0)
    rows = collect(device, props.name, l2, args.out, dtypes, parts,
                   shapes=shapes, widths=widths, sizes=sizes,
                   batched=BATCHED_SHAPES[1:3] if args.quick else BATCHED_SHAPES, tune=args.tune)
    table = [[r["kind"], r["shape"], r["dtype"], r["provider"], f"{r['median_us']:.1f}",
              f"{r.get('speedup', 0):.2f}x" if r.get("speedup") else "", f"{r.get('tflops', 0):.1f}" if r.get("tflops")
              else "", f"{r.get('gbps', 0):.0f}" if r.get("gbps") else "", r.get("config", "")] for r in rows]
    print(format_table(["kind", "shape", "dtype", "provider", "us", "vs base", "TFLOP/s", "GB/s", "note"], table))
    print(f"\nwrote {len(rows)} rows to {args.out}")
    return 0


def collect(device: torch.device, name: str, l2: int, out: str, dtypes: list[str], parts, *, shapes, widths, sizes,
            batched, tune: bool) -> list[dict]:
    """The ceilings, then each part asked for, every row stamped and merged into the CSV at ``out`` as soon as
    its part is done: a run that a lease or a time limit cuts short keeps the parts it finished."""
    vers, stamp = versions(), now_utc()
    rows: list[dict] = []

    def keep(new: list[dict]) -> None:
        for row in new:
            row.update(device=name, timestamp=stamp, **vers)
        rows.extend(new)
        write_rows(out, rows, fields=FIELDS, key=KEY)

    ceil = ceilings(device)
    print("ceilings: " + ", ".join(f"{k} {v:.0f}" for k, v in ceil.items()), flush=True)
    note = "; ".join(f"{k}={v:.1f}" for k, v in ceil.items())
    keep([result_row("ceiling", "-", "-", "measured", 0.0, config=note)])
    if "attention" in parts:
        keep(bench_attention(device, dtypes, shapes, widths, tune, ceil))
    if "gemv" in parts:
        keep(bench_gemv(device, sizes, l2, ceil, tune))
    if "batched" in parts:
        keep(bench_batched(device, dtypes, batched))
    return rows


if __name__ == "__main__":
    sys.exit(main())
