"""Batch-1 calls of a packed Whisper decoder layer's compressed modules: each module's whole call kept and run
from C++ (`adaptwin.compressors.packed_args.KeptCall`, the default) against the general path, which builds
the call in Python on each call (the entry point ``adaptwin._C.call_rank_linear_kept`` withheld).

    python -m benchmarks.packed_module_calls [--shape tiny] [--layer 0] [--calls 2000] [--repeats 11]
        [--threads 2] [--aten-gelu] [--out results/packed_module_calls.csv]

Model: `benchmarks.whisper_decode_speed`'s ``adaptwin_nf4`` (Whisper shapes with random weights, ratio 0.5,
NF4 factors with their LoRA directions kept in fp, the token table in NF4), in `torch.inference_mode`, x of
shape (1, 1, in): a decoding step. Every `QuantLinear` / `QuantLowRankLinear` of the decoder layer: the
attention projections (their LoRA directions in fp: two calls per module, placed in each head or fed from
each head's columns) and the FFN matrices (two calls added; fc1 also runs its fused GELU, ``adaptwin._C.gelu_``
in place, or with ``--aten-gelu`` ATen's ``gelu_``, rows written as benchmark ``packed_module_calls_aten_gelu``); and a
PQM `NF4LoRALinear` of the model's width (``pqm``: an NF4 base plus its rank-4 fp LoRA update scaled by 2,
from a random d x d `nn.Linear`, B drawn non-zero). Each timed sample is ``--calls`` calls; the median of
``--repeats`` samples, the two paths alternating. Their outputs are compared first: the kept call must give
the general path's bits.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch

from benchmarks.common import device_string, format_table, now_utc, versions, write_rows

BENCHMARK = "packed_module_calls"
FIELDS = ("benchmark", "shape", "module", "kind", "provider", "us_per_call", "ratio", "calls", "repeats", "threads",
          "device", "torch", "transformers", "adaptwin", "timestamp")
KEY = ("benchmark", "shape", "module", "provider", "threads")
PROVIDERS = ("kept", "general")


@contextlib.contextmanager
def general_path(modules: list[torch.nn.Module]):
    """Inside: no module keeps its call (the native entry point withheld, every kept call dropped)."""
    from adaptwin.ops.backends import FAST

    entry = FAST.pop("rank_linear_kept", None)
    for m in modules:
        m._call.clear()
    try:
        yield
    finally:
        if entry is not None:
            FAST["rank_linear_kept"] = entry


def _sample(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def run(shape_name: str, layer: int, calls: int, repeats: int, benchmark: str = BENCHMARK) -> list[dict]:
    from adaptwin.compressors.pqm import PQMConfig
    from adaptwin.compressors.pqm.layer import NF4LoRALinear
    from adaptwin.compressors.quantized import QuantLinear, QuantLowRankLinear
    from adaptwin.ops.backends import FAST
    from benchmarks.whisper_decode_speed import SHAPES, build_models

    if "rank_linear_kept" not in FAST:
        raise RuntimeError("adaptwin._C is not built: nothing to keep (pip install --no-build-isolation -e .)")
    model = build_models(SHAPES[shape_name], int8=False)["adaptwin_nf4"]
    prefix = f"model.decoder.layers.{layer}."
    modules = {name[len(prefix):]: m for name, m in model.named_modules()
               if name.startswith(prefix) and isinstance(m, (QuantLinear, QuantLowRankLinear))}
    if not modules:
        raise ValueError(f"decoder layer {layer} of {shape_name} has no packed modules")
    gen = torch.Generator().manual_seed(0)
    d = SHAPES[shape_name].d_model
    pqm = NF4LoRALinear.from_linear(torch.nn.Linear(d, d), 4, 2.0, PQMConfig().quant_format(), gen)
    with torch.no_grad():
        pqm.lora_B.normal_(generator=gen)
    modules["pqm"] = pqm
    rows, stamp = [], dict(device=device_string(), threads=torch.get_num_threads(), **versions(), timestamp=now_utc())
    with torch.inference_mode():
        for name, m in modules.items():
            x = torch.randn(1, 1, m.in_features, generator=gen)
            with general_path(list(modules.values())):
                want = m(x)
            got = m(x), m(x)  # the first call keeps the call, the second runs it
            if m._call.kept is None or not all(torch.equal(g, want) for g in got):
                raise RuntimeError(f"{name}: the kept call is missing or differs from the general path")
            samples = {p: [] for p in PROVIDERS}
            for _ in range(repeats):
                samples["kept"].append(_sample(lambda m=m, x=x: m(x), calls))
                with general_path(list(modules.values())):
                    samples["general"].append(_sample(lambda m=m, x=x: m(x), calls))
            us = {p: statistics.median(s) for p, s in samples.items()}
            kind = getattr(m, "role", None) or ("pqm" if m is pqm else "low_rank")
            for p in PROVIDERS:
                rows.append(dict(benchmark=benchmark, shape=shape_name, module=name, kind=kind, provider=p,
                                 us_per_call=us[p], ratio=us[p] / us["general"], calls=calls, repeats=repeats,
                                 **stamp))
    return rows


def main(argv: list[str] | None = None) -> int:
    from benchmarks.whisper_decode_speed import SHAPES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--calls", type=int, default=2000, help="calls per timed sample")
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--aten-gelu", action="store_true",
                    help="fc1's GELU by ATen's gelu_ (oneDNN) instead of the native in-place one")
    ap.add_argument("--out", default="results/packed_module_calls.csv")
    args = ap.parse_args(argv)
    if args.calls < 1 or args.repeats < 1 or args.threads < 1 or args.layer < 0:
        ap.error(f"--calls, --repeats and --threads must be >= 1 and --layer >= 0, got {args.calls}, "
                 f"{args.repeats}, {args.threads} and {args.layer}")
    torch.set_num_threads(args.threads)
    from adaptwin.ops.backends import FAST

    gelu = FAST.pop("gelu_", None) if args.aten_gelu else None
    try:
        rows = run(args.shape, args.layer, args.calls, args.repeats,
                   f"{BENCHMARK}_aten_gelu" if args.aten_gelu else BENCHMARK)
    except (RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if gelu is not None:
            FAST["gelu_"] = gelu
    us = {(r["module"], r["provider"]): r["us_per_call"] for r in rows}
    names = list(dict.fromkeys(r["module"] for r in rows))
    kinds = {r["module"]: r["kind"] for r in rows}
    print(format_table(["module", "kind", "kept us", "general us", "kept / general"],
                       [[n, kinds[n], f"{us[n, 'kept']:.2f}", f"{us[n, 'general']:.2f}",
                         f"{us[n, 'kept'] / us[n, 'general']:.3f}x"] for n in names]))
    path = write_rows(args.out, rows, fields=FIELDS, key=KEY)
    print(f"\nwrote {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
