"""Layer-wise fine-tuning throughput on Whisper-tiny encoder shapes, against a plain matmul's FLOP rate.

    python -m benchmarks.finetune_throughput [--samples 300] [--epochs 10] [--positions 1500]
        [--providers memory-fp32,memory-bf16,disk-fp32] [--threads 2] [--profile]
        [--out results/finetune_throughput.csv]

The encoder has Whisper-tiny's shape (d = 384, 6 heads, FFN 1536, 4 layers) with random weights (no hub
access) and is compressed 50 % (`CompressionConfig(ratio=0.5, components=("encoder",))`). Each calibration
sample is one encoder sequence: input_features (1, 80, 2·positions), by default 1500 positions = 30 s of
audio; every layer is then trained on ``samples`` x ``epochs`` steps (one sequence per Adam step, 10 % of
the samples held out for the best-epoch choice). Providers differ in how the captured activations are
stored: ``memory-fp32`` (default of `FinetuneConfig`), ``memory-bf16`` (half the bytes, cast back every
step) and ``disk-fp32`` (safetensors files, read back every step).

The FLOP rate is the trainer's own count (`LayerResult.flops`, every training step's forward + backward
and every evaluation forward, by torch's FlopCounterMode: matmuls and attention, at the widths that
execute, including `attend`'s CPU zero-padding of head widths) over the trainer's wall time
(`LayerResult.seconds`: training and evaluation, not the capture). It is compared with a plain fp32 and
bf16 matmul at the FFN's shape, (1500 x 384) @ (384 x 1536), timed 3 times per dtype after every epoch
of every layer (`MatmulProbe`), so both rates are measured under the same load from other processes; the
matmul is also timed before and after the fine-tuning runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
from transformers import WhisperConfig, WhisperModel

import adaptwin
from adaptwin.finetune import FinetuneConfig, run_finetune
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

BENCHMARK = "finetune_throughput"
PROVIDERS = {  # name -> (storage, storage dtype)
    "memory-fp32": ("memory", "float32"),
    "memory-bf16": ("memory", "bfloat16"),
    "disk-fp32": ("disk", "float32"),
}


@dataclass(frozen=True)
class Shape:
    d_model: int = 384
    heads: int = 6
    ffn: int = 1536
    layers: int = 4
    mel_bins: int = 80
    positions: int = 1500

    def label(self, samples: int, epochs: int) -> str:
        return (f"whisper-tiny-enc:d{self.d_model}-L{self.layers}-H{self.heads}-f{self.ffn}-T{self.positions}"
                f"-n{samples}x{epochs}")


def build(shape: Shape) -> WhisperModel:
    cfg = WhisperConfig(
        d_model=shape.d_model, encoder_layers=shape.layers, decoder_layers=1, encoder_attention_heads=shape.heads,
        decoder_attention_heads=shape.heads, encoder_ffn_dim=shape.ffn, decoder_ffn_dim=shape.ffn,
        num_mel_bins=shape.mel_bins, max_source_positions=shape.positions, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return WhisperModel(cfg).eval()


def encoder_only(model: torch.nn.Module, features: torch.Tensor) -> object:
    return model.encoder(features)  # the decoder is not compressed; do not run it


def matmul_rates(positions: int, d: int, ffn: int, repeats: int) -> dict[str, tuple[float, float]]:
    """GFLOP/s (p50) and p50 ms of (positions x d) @ (d x ffn) in fp32 and bf16."""
    out = {}
    flop = 2 * positions * d * ffn
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(positions, d, dtype=dtype), torch.randn(d, ffn, dtype=dtype)
        t = time_interleaved({name: lambda a=a, b=b: a @ b}, repeats=repeats, warmup=3)[name]
        out[name] = (flop / (t.p50 / 1e3) / 1e9, t.p50)
    return out


class MatmulProbe:
    """Times a few reference matmuls of each dtype whenever called: after every epoch of every layer, so
    the reference rate is sampled under the same load as the training it is compared with (the trainer
    leaves its ``on_epoch`` callback out of ``LayerResult.seconds``)."""

    def __init__(self, positions: int, d: int, ffn: int, calls: int = 3) -> None:
        self.flop, self.calls = 2 * positions * d * ffn, calls
        self.operands = {name: (torch.randn(positions, d, dtype=dt), torch.randn(d, ffn, dtype=dt))
                         for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        self.samples: dict[str, list[float]] = {name: [] for name in self.operands}

    def __call__(self, *progress: object) -> None:
        for name, (a, b) in self.operands.items():
            for _ in range(self.calls):
                start = time.perf_counter()
                a @ b
                self.samples[name].append(time.perf_counter() - start)

    def gflops(self, name: str) -> float:
        """Rate at the median call time, GFLOP/s."""
        s = sorted(self.samples[name])
        return self.flop / s[len(s) // 2] / 1e9


def run_provider(model, shape: Shape, batches, provider: str, epochs: int, scratch: str,
                 probe: MatmulProbe) -> dict:
    storage, dtype = PROVIDERS[provider]
    small = adaptwin.compress(model, adaptwin.CompressionConfig(ratio=0.5, components=("encoder",)))
    ft = FinetuneConfig(epochs=epochs, holdout=0.1, patience=0, storage=storage, storage_dtype=dtype,
                        storage_dir=f"{scratch}/{provider}" if storage == "disk" else None, progress=False)
    start = time.perf_counter()
    report = run_finetune(model, small, batches, ft, run=encoder_only, progress=probe)
    wall = time.perf_counter() - start
    layers = report.layers
    seconds = sum(r.seconds for r in layers)
    return {"report": report, "wall": wall, "seconds": seconds, "flops": sum(r.flops for r in layers),
            "per_layer": [r.seconds for r in layers]}


def profile_steps(model, shape: Shape, batches, rows: int = 18) -> None:
    """torch.profiler's top operators over one epoch of fine-tuning on a few samples (memory-fp32)."""
    from torch.profiler import ProfilerActivity, profile

    small = adaptwin.compress(model, adaptwin.CompressionConfig(ratio=0.5, components=("encoder",)))
    ft = FinetuneConfig(epochs=1, holdout=0.1, patience=0, progress=False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_finetune(model, small, batches[:8], ft, run=encoder_only)
    print("\n== profile: capture + 1 epoch x 8 samples, memory-fp32 ==")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=300, help="encoder sequences (one per training step)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--positions", type=int, default=1500, help="sequence length after the conv (1500 = 30 s)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma-separated, from {list(PROVIDERS)}")
    ap.add_argument("--repeats", type=int, default=20, help="timed calls of the reference matmul")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/finetune_throughput.csv")
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler's top operators")
    args = ap.parse_args(argv)
    providers = pick(ap, args.providers, PROVIDERS, "providers")
    if args.samples < 2 or args.epochs < 1 or args.positions < 1 or args.layers < 1:
        ap.error("need --samples >= 2, --epochs >= 1, --positions >= 1, --layers >= 1")
    torch.set_num_threads(args.threads)
    shape = Shape(layers=args.layers, positions=args.positions)
    device, vers = device_string(), versions()
    print(f"{device}, torch {torch.__version__}")
    print(f"{shape.label(args.samples, args.epochs)}: {args.samples} samples x {args.epochs} epochs, "
          f"{shape.positions} positions", flush=True)

    model = build(shape)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(1, shape.mel_bins, 2 * shape.positions, generator=gen) for _ in range(args.samples)]
    load = OtherLoad().start()
    rates = matmul_rates(shape.positions, shape.d_model, shape.ffn, args.repeats)
    results = {}
    probe = MatmulProbe(shape.positions, shape.d_model, shape.ffn)
    with tempfile.TemporaryDirectory(prefix="adaptwin-bench-") as scratch:
        for p in providers:
            print(f"fine-tuning with {p}...", flush=True)
            results[p] = run_provider(model, shape, batches, p, args.epochs, scratch, probe)
    rates_after = matmul_rates(shape.positions, shape.d_model, shape.ffn, args.repeats)
    other = load.stop()
    rates_before = rates
    # The reference: the matmul timed between epochs, under the load the training saw (other processes'
    # load drifts during a long run; the before/after figures are printed beside it).
    rates = {k: (probe.gflops(k), probe.flop / probe.gflops(k) / 1e6) for k in rates_before}
    if args.profile:
        profile_steps(model, shape, batches)

    label = shape.label(args.samples, args.epochs)
    steps = args.samples * args.epochs
    base = results[providers[0]]["seconds"]
    rows, table = [], []
    for name, (_, p50) in rates.items():
        rows.append({"benchmark": BENCHMARK, "shape": f"matmul:{shape.positions}x{shape.d_model}x{shape.ffn}",
                     "dtype": name, "provider": "matmul", "p50_ms": p50, "repeats": args.repeats,
                     "gflop": 2 * shape.positions * shape.d_model * shape.ffn / 1e9, "device": device,
                     "threads": args.threads, "other_load": other, **vers, "timestamp": now_utc()})
    for p, r in results.items():
        rate = r["flops"] / r["seconds"] / 1e9
        per_step = sorted(1e3 * s / steps for s in r["per_layer"])  # ms per training sample, per layer

        def q(f: float, per_step: list[float] = per_step) -> float:  # nearest-rank quantile over the layers
            return per_step[min(len(per_step) - 1, int(f * (len(per_step) - 1) + 0.5))]

        errs = [(x.error_before, x.error_after) for x in r["report"].layers]
        table.append([p, r["wall"], r["seconds"], r["wall"] - r["seconds"], q(0.5), r["flops"] / 1e9, rate,
                      f"{100 * rate / rates['fp32'][0]:.0f}%", f"{100 * rate / rates['bf16'][0]:.0f}%",
                      r["report"].capture_bytes / 2**20,
                      f"{sum(a for _, a in errs) / len(errs):.3f} ({sum(b for b, _ in errs) / len(errs):.3f})"])
        rows.append({"benchmark": BENCHMARK, "shape": label, "dtype": "fp32", "provider": p,
                     "p20_ms": q(0.2), "p50_ms": q(0.5), "p80_ms": q(0.8), "repeats": len(per_step),
                     "ratio_p50": r["seconds"] / base, "gflop": r["flops"] / 1e9,
                     "gflop_ratio": rate / rates["fp32"][0],
                     "rel_err": sum(a for _, a in errs) / len(errs), "device": device, "threads": args.threads,
                     "other_load": other, **vers, "timestamp": now_utc()})
    print()
    print(format_table(["provider", "wall s", "train s", "capture+other s", "ms/sample/layer", "GFLOP", "GFLOP/s",
                        "of fp32 mm", "of bf16 mm", "stored MiB", "err after (before)"], table))
    print(f"\nmatmul ({shape.positions}x{shape.d_model}) @ ({shape.d_model}x{shape.ffn}): "
          f"fp32 {rates['fp32'][0]:.1f} GFLOP/s, bf16 {rates['bf16'][0]:.1f} GFLOP/s between epochs (the reference, "
          f"median of {len(probe.samples['fp32'])} calls); fp32 {rates_before['fp32'][0]:.1f} / "
          f"{rates_after['fp32'][0]:.1f}, bf16 {rates_before['bf16'][0]:.1f} / {rates_after['bf16'][0]:.1f} "
          "before / after the fine-tuning runs")
    print("other load: " + ("n/a" if other is None else f"{other:.2f}") +
          f" cores busy with other processes during the run (of {args.threads} threads used here)")
    path = write_rows(args.out, rows)
    print(f"wrote {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
