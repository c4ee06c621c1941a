"""Whisper encoder on CPU: dense HF encoder vs adaptwin (ratio 0.5, encoder only) vs an unfused low-rank baseline.

    python -m benchmarks.whisper_encoder_speed [--shapes tiny,base] [--dtypes fp32,bf16] [--repeats N]
        [--providers dense,dense_contig,adaptwin,adaptwin_even,adaptwin_nofuse,adaptwin_strided,adaptwin_sdpa,...]
        [--threads 2] [--profile]
        [--out results/whisper_encoder_speed.csv]

Encoders are built from `WhisperConfig` with random weights (no hub access); the input is 30 s of audio,
input_features (1, 80, 3000), i.e. 1500 positions after the stride-2 convolution. Providers, timed
interleaved in one run and compared like with like (each dtype against the dense encoder in that dtype):

* ``dense``: the Hugging Face encoder, ``attn_implementation="sdpa"``.
* ``dense_contig``: the same with ``adaptwin.contiguous_layer_inputs``: its first layer takes contiguous
  hidden states, where Hugging Face hands it the convolution output's transposed strides, which every
  residual add and LayerNorm then pays for. Every ``adaptwin*`` provider but ``adaptwin_strided`` has it
  too, so ``/dense_contig`` is the like-for-like ratio and ``time/dense`` the ratio to the stock encoder.
* ``adaptwin``: ``adaptwin.compress(model, CompressionConfig(ratio=0.5, components=("encoder",),
  width_multiple=8))``, then ``adaptwin.fuse_activations`` and ``adaptwin.contiguous_layer_inputs``.
  Attention runs in rank space (per-head width r + l), FFN matrices as two thin GEMMs, fc1's second GEMM
  with the GELU in one oneDNN primitive (`adaptwin.ops.linear_act`).
  Inference attention runs ``torch.ops.adaptwin.attention``: the CPU C++ flash kernel where
  ``adaptwin._C`` is built (`make install`), else the SDPA reference.
* ``adaptwin_even``: the same ratio with ``attention_factor=1.0``: attention loses as large a share of its
  parameters as the FFN (the default plans the paper's split, attention at 0.7x the FFN's compression,
  which leaves the rank-space attention wider and the FLOP ratio above the parameter ratio).
* ``adaptwin_unaligned``: ``adaptwin`` with ``width_multiple=1``: widths as the ratio gives them (39
  per head and 137 for tiny), not rounded to multiples of 8: what the rounding buys.
* ``adaptwin_nofuse``: ``adaptwin`` without ``fuse_activations`` (GELU a separate op, as in the HF
  layer): what the fusion buys.
* ``adaptwin_strided``: ``adaptwin`` without ``contiguous_layer_inputs``: what the contiguous layout buys.
* ``adaptwin_sdpa``: the same compressed encoder with the op's SDPA reference (zero-padded to a fast
  CPU width) in place of the C++ kernel: what the fused kernel buys.
* ``adaptwin_nopad``: the SDPA reference with that width padding switched off (SDPA then runs at head
  width r + l as is), to show what the padding buys.
* ``adaptwin_nf4``: ``adaptwin``'s configuration with NF4 factors (``quantization="nf4"``, LoRA directions
  kept in float32), fused: each factor decoded whole once per call, then the same GEMMs. Its rel err is
  against the fp32 ``adaptwin`` encoder (the NF4 rounding of the same factors).
* ``dense_int8``: the peer: the dense encoder with every ``nn.Linear`` replaced by torch's dynamically
  quantised int8 linear (`benchmarks.common.int8_dynamic`: int8 weights, activations quantised per call,
  int8 GEMMs); float32 rows only (it takes float32 activations). Its rel err is against the fp32 dense
  encoder.
* ``unfused``: the *same factors* used naively: every call multiplies each head's twins back into the
  d×d products M_h = P_hᵀQ_h and N_h = V_hᵀO_hᵀ and attends with per-head width d (queries x·M_h, keys
  x, values x·N_h, heads summed), and every FFN multiplies its factors back into the dense out×in
  weight. Same math as ``adaptwin`` (it is the correctness reference: 2e-7 to 3e-7 relative in fp32), but
  QKᵀ and AV cost H times the dense encoder's: what compressing the parameters alone buys in time.

FLOPs are counted from the shapes each module actually sees (forward hooks): GEMM and convolution
multiply-adds ×2 (projections, QKᵀ, AV, FFN, convolutions, the baseline's rebuilds), at the widths the
model defines (not counting `attend`'s zero padding); softmax, GELU and LayerNorm are left out. That
work does not shrink with the ranks, so the time ratio stays above the FLOP ratio by about its share.
``weight_mb`` is what each encoder stores (`benchmarks.common.stored_bytes`).
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import WhisperConfig, WhisperModel
from transformers.models.whisper.modeling_whisper import WhisperAttention

import adaptwin
from adaptwin.compressors.ffn_svd.layer import LowRankLinear
from adaptwin.compressors.product_twin.layer import TwinAttention
from adaptwin.compressors.quantized import QuantLinear, QuantLowRankLinear
from adaptwin.ops import attention
from benchmarks.common import (
    OtherLoad,
    device_string,
    format_table,
    int8_dynamic,
    keep_heap,
    now_utc,
    pick,
    runs_in,
    stored_bytes,
    time_interleaved,
    versions,
    write_rows,
)
from benchmarks.unfused import UnfusedLowRankLinear, UnfusedTwinAttention, unfuse

try:  # torch's dynamically quantised linear (the dense_int8 peer's), announced for removal in a later torch
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
except ImportError:  # pragma: no cover
    DynamicInt8Linear = nn.Linear

BENCHMARK = "whisper_encoder_speed"
PROVIDERS = ("dense", "dense_contig", "adaptwin", "adaptwin_even", "adaptwin_unaligned", "adaptwin_nofuse",
             "adaptwin_strided", "adaptwin_sdpa", "adaptwin_nopad", "adaptwin_nf4", "dense_int8", "unfused")
# Each provider's fp32 reference for rel_err: the dense encoder, or the unfused rebuild of its own factors.
REFERENCE = {"dense": "dense", "dense_contig": "dense", "dense_int8": "dense", "adaptwin_even": "_unfused_even",
             "adaptwin_unaligned": "_unfused_unaligned", "adaptwin_nf4": "adaptwin"}
WIDTH_MULTIPLE = 8  # CompressionConfig.width_multiple of every adaptwin provider but adaptwin_unaligned
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# fp32 adaptwin vs the unfused rebuild of the same factors: the same math in another summation order.
# Measured 2.1e-7 (tiny) and 3.2e-7 (base); 1e-4 leaves room for other BLAS builds and still catches a
# wrong head split, bias fold or scale, which give errors of order 1.
REL_TOL_FP32 = 1e-4


@dataclass(frozen=True)
class EncoderShape:
    """A Whisper encoder's shape; ``positions`` after the stride-2 conv, so 2·positions mel frames in."""

    name: str
    d_model: int
    layers: int
    heads: int
    ffn: int
    mel_bins: int = 80
    positions: int = 1500

    @property
    def frames(self) -> int:
        return 2 * self.positions

    def label(self) -> str:
        return f"{self.name}:d{self.d_model}-L{self.layers}-H{self.heads}-f{self.ffn}-T{self.positions}"


SHAPES = {
    "tiny": EncoderShape("tiny", d_model=384, layers=4, heads=6, ffn=1536),
    "base": EncoderShape("base", d_model=512, layers=6, heads=8, ffn=2048),
}


# --------------------------------------------------------------------------------------------------
# Reference-op wrappers


@contextmanager
def reference_ops(pad: bool = True) -> Iterator[None]:
    """Within the block, `attend` calls the op's SDPA reference instead of the dispatcher (which picks the
    C++ kernel where ``adaptwin._C`` is built); ``pad=False`` also switches off the reference's CPU width
    padding."""
    saved = attention._sdpa_width, attention._run_op
    if not pad:
        attention._sdpa_width = lambda q, k, v: None
    attention._run_op = attention.attention_reference
    try:
        yield
    finally:
        attention._sdpa_width, attention._run_op = saved


class ReferenceOps(nn.Module):
    """Runs a compressed encoder under `reference_ops`."""

    def __init__(self, encoder: nn.Module, pad: bool = True) -> None:
        super().__init__()
        self.encoder, self.pad = encoder, pad

    def forward(self, *args: object, **kwargs: object) -> object:
        with reference_ops(self.pad):
            return self.encoder(*args, **kwargs)


def NoPadding(encoder: nn.Module) -> nn.Module:  # noqa: N802 (kept name: the provider it builds)
    """The SDPA reference at head width r + l as is (no CPU width padding)."""
    return ReferenceOps(encoder, pad=False)


# --------------------------------------------------------------------------------------------------
# Models, FLOPs, timing


def build_encoders(shape: EncoderShape, seed: int = 0, ratio: float = 0.5) -> dict[str, nn.Module]:
    """fp32 encoders of every provider in `PROVIDERS`, in eval mode."""
    torch.manual_seed(seed)
    config = WhisperConfig(
        d_model=shape.d_model, encoder_layers=shape.layers, encoder_attention_heads=shape.heads,
        encoder_ffn_dim=shape.ffn, decoder_layers=1, decoder_attention_heads=shape.heads,
        decoder_ffn_dim=shape.ffn, num_mel_bins=shape.mel_bins, max_source_positions=shape.positions,
        attn_implementation="sdpa",
    )
    model = WhisperModel(config).eval()

    def compressed(**options: object) -> nn.Module:
        options = {"width_multiple": WIDTH_MULTIPLE, **options}
        return adaptwin.compress(model, adaptwin.CompressionConfig(ratio=ratio, components=("encoder",), **options))

    small, even, unaligned = compressed(), compressed(attention_factor=1.0), compressed(width_multiple=1)
    nf4 = compressed(quantization="nf4")
    nofuse = copy.deepcopy(small)
    for m in (small, even, unaligned, nf4):
        adaptwin.fuse_activations(m)
    strided = copy.deepcopy(small)
    dense_contig = copy.deepcopy(model)
    for m in (small, even, unaligned, nf4, nofuse, dense_contig):
        adaptwin.contiguous_layer_inputs(m)
    encoders = {"dense": model.encoder, "dense_contig": dense_contig.encoder, "adaptwin": small.encoder,
                "adaptwin_even": even.encoder, "adaptwin_unaligned": unaligned.encoder,
                "adaptwin_nofuse": nofuse.encoder, "adaptwin_strided": strided.encoder,
                "adaptwin_sdpa": ReferenceOps(small.encoder), "adaptwin_nopad": NoPadding(small.encoder)}
    encoders["adaptwin_nf4"] = nf4.encoder
    encoders["dense_int8"] = int8_dynamic(model.encoder)
    encoders["unfused"] = unfuse(small.encoder).eval()
    encoders["_unfused_even"] = unfuse(even.encoder).eval()
    encoders["_unfused_unaligned"] = unfuse(unaligned.encoder).eval()
    return encoders


def count_flops(encoder: nn.Module, features: torch.Tensor) -> dict[str, int]:
    """GEMM/conv FLOPs (2 per multiply-add) of one forward, by kind, from the shapes the modules see."""
    totals: dict[str, int] = defaultdict(int)
    hooks = []

    def add(kind: str, n: int) -> None:
        totals[kind] += int(n)

    def on(module: nn.Module, fn: Callable[[nn.Module, tuple, dict], None]) -> None:
        hooks.append(module.register_forward_pre_hook(fn, with_kwargs=True))

    def hidden(args: tuple, kwargs: dict) -> torch.Tensor:
        return args[0] if args else kwargs["hidden_states"]

    for name, module in encoder.named_modules():
        kind = "ffn" if ".fc" in name else "proj"
        if isinstance(module, (UnfusedTwinAttention, UnfusedLowRankLinear)):
            def unfused(m: nn.Module, a: tuple, k: dict) -> None:
                b, t = hidden(a, k).shape[:2]
                for key, n in m.flops(t, b).items():
                    add(key, n)

            on(module, unfused)
        elif isinstance(module, (LowRankLinear, QuantLowRankLinear)):
            on(module, lambda m, a, k, kind=kind: add(
                kind, 2 * a[0].numel() // m.in_features * (m.rank + m.lora_rank) * (m.in_features + m.out_features)))
        elif isinstance(module, QuantLinear):
            on(module, lambda m, a, k, kind=kind: add(kind, 2 * a[0].numel() * m.out_features))
        elif isinstance(module, (nn.Linear, DynamicInt8Linear)):
            on(module, lambda m, a, k, kind=kind: add(kind, 2 * a[0].numel() * m.out_features))
        elif isinstance(module, nn.Conv1d):
            hooks.append(module.register_forward_hook(lambda m, a, out: add(
                "conv", 2 * out.numel() * m.in_channels // m.groups * m.kernel_size[0])))
        elif isinstance(module, (WhisperAttention, TwinAttention)):
            if isinstance(module, WhisperAttention):
                dq = dv = module.head_dim
            else:
                dq, dv = module.qk_width, module.v_width

            def attn(m: nn.Module, a: tuple, k: dict, dq: int = dq, dv: int = dv) -> None:
                b, t = hidden(a, k).shape[:2]
                add("qk", 2 * b * m.num_heads * t * t * dq)
                add("av", 2 * b * m.num_heads * t * t * dv)

            on(module, attn)
    try:
        with torch.inference_mode():
            encoder(features)
    finally:
        for h in hooks:
            h.remove()
    totals["total"] = sum(totals.values())
    return dict(totals)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return float((a - ref).norm() / ref.norm())


def run_shape(shape: EncoderShape, dtypes: list[str], providers: list[str], repeats: int, warmup: int,
              seed: int = 0) -> tuple[list[dict], dict[str, dict[str, int]]]:
    """Time every provider at every dtype; returns CSV rows and the FLOP breakdown per provider."""
    encoders = build_encoders(shape, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    features = torch.randn(1, shape.mel_bins, shape.frames, generator=gen)
    flops = {p: count_flops(encoders[p], features) for p in providers}
    with torch.inference_mode():  # fp32 references: dense for dense, the unfused rebuild for the low-rank paths
        ref = {name: encoders[name](features).last_hidden_state
               for name in {REFERENCE.get(p, "unfused") for p in providers}}
    rows = []
    device, vers, threads = device_string(), versions(), torch.get_num_threads()
    for dname in dtypes:
        dtype = DTYPES[dname]
        here = [p for p in providers if runs_in(p, dname)]
        encs = {p: copy.deepcopy(encoders[p]).to(dtype) for p in here}
        x = features.to(dtype)
        with torch.inference_mode():
            errs = {p: rel_err(encs[p](x).last_hidden_state, ref[REFERENCE.get(p, "unfused")]) for p in here}
            for p in ("adaptwin", "adaptwin_even", "adaptwin_unaligned"):
                if dname == "fp32" and p in errs and errs[p] > REL_TOL_FP32:
                    raise RuntimeError(f"{shape.name}: {p} differs from the unfused rebuild of its own factors by "
                                       f"{errs[p]:.2e} relative (> {REL_TOL_FP32:.0e}); the fast path is wrong")
            load = OtherLoad().start()
            timings = time_interleaved({p: (lambda e=encs[p], x=x: e(x)) for p in here},
                                       repeats=repeats, warmup=warmup)
            other = load.stop()
        base = timings["dense"].p50 if "dense" in timings else None
        for p in here:
            t = timings[p]
            rows.append({
                "benchmark": BENCHMARK, "shape": shape.label(), "dtype": dname, "provider": p,
                "p20_ms": t.p20, "p50_ms": t.p50, "p80_ms": t.p80, "repeats": repeats,
                "ratio_p50": t.p50 / base if base else None,
                "gflop": flops[p]["total"] / 1e9,
                "gflop_ratio": flops[p]["total"] / flops["dense"]["total"] if "dense" in flops else None,
                "rel_err": errs[p], "weight_mb": stored_bytes(encs[p]) / 1e6, "device": device, "threads": threads,
                "other_load": other, **vers, "timestamp": now_utc(),
            })
        del encs
    return rows, flops


def profile_shape(shape: EncoderShape, dname: str, providers: list[str], rows: int = 15) -> None:
    """Print torch.profiler's top operators (self CPU time) of each provider: where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    encoders = build_encoders(shape)
    x = torch.randn(1, shape.mel_bins, shape.frames).to(DTYPES[dname])
    for p in providers:
        enc = copy.deepcopy(encoders[p]).to(DTYPES[dname])
        with torch.inference_mode():
            enc(x)
            enc(x)
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                for _ in range(3):
                    enc(x)
        print(f"\n== profile {shape.name} {dname} {p} (3 calls) ==")
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows))


# --------------------------------------------------------------------------------------------------
# Report


def print_report(rows: list[dict], flops: dict[str, dict[str, dict[str, int]]]) -> None:
    table = []
    contig = {(r["shape"], r["dtype"]): r["p50_ms"] for r in rows if r["provider"] == "dense_contig"}
    for r in rows:
        like = contig.get((r["shape"], r["dtype"]))
        table.append([r["shape"].split(":")[0], r["dtype"], r["provider"], r["p20_ms"], r["p50_ms"], r["p80_ms"],
                      _x(r["ratio_p50"]), _x(r["p50_ms"] / like if like else None), r["gflop"], _x(r["gflop_ratio"]),
                      f"{r['weight_mb']:.1f}", f"{r['rel_err']:.1e}",
                      "" if r["other_load"] is None else f"{r['other_load']:.2f}"])
    print(format_table(["shape", "dtype", "provider", "p20 ms", "p50 ms", "p80 ms", "time/dense", "/dense_contig",
                        "GFLOP", "FLOP/dense", "MB", "rel err", "other load"], table))
    print("\n/dense_contig: time over dense_contig's, the dense encoder with the same contiguous layer inputs as "
          "the adaptwin providers (like for like)."
          "\nrel err: vs the fp32 dense encoder (dense) or the fp32 unfused rebuild of the same factors (low-rank)."
          "\nother load: cores busy with other processes during the timing (of "
          f"{torch.get_num_threads()} threads used here).")
    kinds = ["conv", "proj", "qk", "av", "ffn", "rebuild", "total"]
    ftable = [[s, p] + [f[p].get(k, 0) / 1e9 for k in kinds] for s, f in flops.items() for p in f]
    print("\nGFLOP per forward by kind (2 per multiply-add; softmax/GELU/LayerNorm not counted):")
    print(format_table(["shape", "provider", *kinds], ftable))


def _x(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}x"


def add_model_args(ap: argparse.ArgumentParser, providers: tuple[str, ...]) -> None:
    """--shapes, --dtypes, --providers: the arguments the Whisper speed benchmarks share."""
    ap.add_argument("--shapes", default="tiny,base", help=f"comma-separated, from {sorted(SHAPES)}")
    ap.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated, from {sorted(DTYPES)}")
    ap.add_argument("--providers", default=",".join(providers), help=f"comma-separated, from {providers}")


def picked_models(ap: argparse.ArgumentParser, args: argparse.Namespace, providers: tuple[str, ...]
                  ) -> tuple[list[str], list[str], list[str]]:
    """(shapes, dtypes, providers) as parsed by `add_model_args`; ``ap.error`` on an unknown name or a
    provider list without the dense baseline."""
    chosen = pick(ap, args.providers, providers, "providers")
    if "dense" not in chosen:
        ap.error("the dense provider is the baseline of every ratio; keep it in --providers")
    return pick(ap, args.shapes, SHAPES, "shapes"), pick(ap, args.dtypes, DTYPES, "dtypes"), chosen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap, PROVIDERS)
    ap.add_argument("--repeats", type=int, default=15, help="timed calls per provider (after warm-up)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/whisper_encoder_speed.csv")
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler's top operators")
    ap.add_argument("--warm-heap", action="store_true",
                    help="keep freed memory in the process (glibc mallopt), so no provider pays page faults for "
                         f"its large tensors; rows are written as benchmark {BENCHMARK}_warm_heap")
    args = ap.parse_args(argv)
    shapes, dtypes, providers = picked_models(ap, args, PROVIDERS)
    torch.set_num_threads(args.threads)
    print(f"{device_string()}, torch {torch.__version__}" + (", warm heap" if args.warm_heap else ""))
    if args.warm_heap:
        keep_heap()

    rows: list[dict] = []
    flops: dict[str, dict[str, dict[str, int]]] = {}
    for name in shapes:
        shape = SHAPES[name]
        print(f"timing {shape.label()} ({', '.join(dtypes)}; {args.repeats} repeats)...", flush=True)
        shape_rows, flops[name] = run_shape(shape, dtypes, providers, args.repeats, args.warmup)
        if args.warm_heap:
            for row in shape_rows:
                row["benchmark"] = f"{BENCHMARK}_warm_heap"
        rows += shape_rows
        if args.profile:
            for d in dtypes:
                profile_shape(shape, d, [p for p in providers
                                         if p != "unfused" and runs_in(p, d)])
    print()
    print_report(rows, flops)
    path = write_rows(args.out, rows)
    print(f"\nwrote {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
