"""Quantised factors on all-MiniLM-L6-v2: per-matrix round-trip SQNR, and AdaPTwin alone vs AdaPTwin +
quantisation at the same bytes.

    python -m benchmarks.quant_crossover [--out results/quant_crossover.csv] [--epochs N] [--threads T]
    python -m benchmarks.quant_crossover --plot-only   # PNG from the CSV

Part 1 (``part=sqnr``): every attention / FFN weight of the original model (36 matrices) round-tripped
through NF4 (blocksize 64, with and without double quantisation), int8 per row, and bitsandbytes' NF4
(where installed): SQNR = 10·log10(‖W‖²/‖W − Ŵ‖²) per matrix.

Part 2 (``part=crossover``): ``CompressionConfig(ratio=r)`` with the activation-whitened initialisation
(``FinetuneConfig(init="whiten")``, calibrated on adaptwin/data/calibration_sentences.txt; ``--epochs``
> 0 adds layer-wise fine-tuning, quantisation-aware for the quantised rows), scored by the mean cosine
of normalised mean-pooled sentence embeddings on adaptwin/data/eval_sentences.txt against the
original's (as benchmarks/minilm_finetune.py). Providers: fp32 factors at r = 0.4..0.8 (AdaPTwin alone),
the same factors stored fp16, and NF4 (double quant) / int8 factors at r = 0.1..0.8. ``bytes`` counts
every stored tensor of the compressed modules (codes, scales, fp LoRA directions, biases);
``bytes_fraction`` divides by the original attention + FFN weights' fp32 bytes. The crossover table
interpolates each quantised curve (linear in log bytes) at each fp32 point's bytes.

Peers (``part=peer``, no rank reduction, the same 36 matrices, the same score and bytes): ``dense_nf4``,
every matrix stored NF4 with double quantisation (blocksize 64; the codes and scales bitsandbytes' NF4
gives, see part 1), computed in fp32 after the round trip; ``dense_int8_dynamic``, every matrix as torch's
dynamically quantised int8 linear (`benchmarks.common.int8_dynamic`: int8 weights with one scale per matrix,
activations quantised on each call, int8 GEMMs). The script prints each AdaPTwin curve's cosine at each
peer's bytes (interpolated, as above).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import csv  # noqa: E402
import importlib  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from benchmarks.common import int8_dynamic, now_utc, save_figure, stored_bytes, versions, write_rows  # noqa: E402
from benchmarks.minilm_finetune import embed, load, sentences, tokenise  # noqa: E402

BENCHMARK = "quant_crossover"
FIELDS = ("benchmark", "part", "provider", "matrix", "ratio", "epochs", "sqnr_db", "cos_mean", "cos_min", "bytes",
          "bytes_fraction", "bits_per_param", "params", "seconds", "threads", "torch", "transformers", "adaptwin",
          "timestamp")
KEY = ("benchmark", "part", "provider", "matrix", "ratio", "epochs")
FP_RATIOS = (0.4, 0.5, 0.6, 0.7, 0.8)
Q_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
QUANT = {"nf4": dict(quantization="nf4", double_quant=True), "int8": dict(quantization="int8")}
PEERS = ("dense_nf4", "dense_int8_dynamic")


def sqnr_rows(model: torch.nn.Module) -> list[dict[str, Any]]:
    from adaptwin.quant import QuantFormat, sqnr_db

    formats = {"nf4": QuantFormat("nf4", 64), "nf4_dq": QuantFormat("nf4", 64, True),
               "int8_row": QuantFormat("int8", 0)}
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        bnbf = None
    rows = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or "encoder.layer" not in name:
            continue
        w = mod.weight.detach()
        for label, fmt in formats.items():
            rows.append({"part": "sqnr", "provider": label, "matrix": name, "params": w.numel(),
                         "sqnr_db": sqnr_db(w, fmt.dequantize(fmt.quantize(w), tuple(w.shape))),
                         "bits_per_param": 8 * fmt.nbytes(tuple(w.shape)) / w.numel()})
        if bnbf is not None:
            q, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
            rows.append({"part": "sqnr", "provider": "bitsandbytes_nf4", "matrix": name, "params": w.numel(),
                         "sqnr_db": sqnr_db(w, bnbf.dequantize_4bit(q, state).reshape(w.shape)),
                         "bits_per_param": 4.5})
    return rows


def layer_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The transformer layers' attention + FFN linears (BERT's ``encoder.layer.N``, Whisper's ``layers.N``; 36
    in MiniLM): what AdaPTwin compresses."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ("encoder.layer." in n or ".layers." in n)]


def peer(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, int, int]:
    """``(model with every layer linear stored as peer `name`, their bytes, their parameters)``; see `PEERS`."""
    from adaptwin.quant import QuantFormat

    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; allowed: {PEERS}")
    out = copy.deepcopy(model)
    nbytes = params = 0
    fmt = QuantFormat("nf4", 64, True)
    for path, lin in layer_linears(out):
        params += sum(t.numel() for t in lin.parameters())
        if name == "dense_nf4":
            shape = tuple(lin.weight.shape)
            with torch.no_grad():
                lin.weight.copy_(fmt.dequantize(fmt.quantize(lin.weight.detach()), shape))
            nbytes += fmt.nbytes(shape) + (lin.bias.numel() * 4 if lin.bias is not None else 0)
        else:
            q = int8_dynamic(lin)
            parent, _, child = path.rpartition(".")
            setattr(out.get_submodule(parent), child, q)
            nbytes += stored_bytes(q)
    return out, nbytes, params


def peer_rows(model, evaluation, reference, original_bytes: int) -> list[dict[str, Any]]:
    rows = []
    for name in PEERS:
        start = time.perf_counter()
        m, nbytes, params = peer(model, name)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            cos = (embed(m, evaluation) * reference).sum(-1)
        rows.append({"part": "peer", "provider": name, "ratio": 0.0, "epochs": 0, "cos_mean": cos.mean().item(),
                     "cos_min": cos.min().item(), "bytes": nbytes, "bytes_fraction": nbytes / original_bytes,
                     "bits_per_param": 8 * nbytes / params, "params": params, "seconds": seconds})
        print(f"{name:>18}: cosine {rows[-1]['cos_mean']:.4f} (min {rows[-1]['cos_min']:.4f}), "
              f"{nbytes / 2**20:.2f} MiB = {100 * rows[-1]['bytes_fraction']:.1f} % of fp32 attention+FFN", flush=True)
    return rows


def module_bytes(small: torch.nn.Module) -> int:
    import adaptwin

    paths = adaptwin.compression_record(small).modules
    return sum(t.numel() * t.element_size() for n, t in small.state_dict().items()
               if any(n.startswith(p + ".") for p in paths))


def derive(small: torch.nn.Module, provider: str) -> torch.nn.Module:
    """The fp32 compressed model's factors stored as ``provider`` (what compress(quantization=...) gives
    without fine-tuning: it factors the same way, then quantises)."""
    import adaptwin
    from adaptwin.compressors.quantized import pack_modules, quantize_modules

    out = copy.deepcopy(small)
    record = adaptwin.compression_record(out)
    if provider == "fp16":  # stored fp16, computed in fp32 after the round trip
        with torch.no_grad():
            for p in record.modules:
                for t in out.get_submodule(p).parameters():
                    t.copy_(t.half().float())
        return out
    cfg = adaptwin.CompressionConfig(ratio=0.5, **QUANT[provider])
    quantize_modules(out, record.modules, cfg.quant_format(), cfg.quantize_lora)
    pack_modules(out, record.modules)
    return out


@contextlib.contextmanager
def cached_stats() -> Iterator[None]:
    """Calibration statistics depend on the model and the batches, not the ratio: inside the block they are
    computed once per site for a sweep over ratios of ONE model and ONE calibration set (restored after)."""
    module = importlib.import_module("adaptwin.finetune")  # the package (adaptwin.finetune is also a function)
    original, cache = module.collect_stats, {}

    def collect(model, sites, batches):
        missing = [s for s in sites if s.path not in cache]
        if missing:
            cache.update(original(model, missing, batches))
        return {s.path: cache[s.path] for s in sites}

    module.collect_stats = collect
    try:
        yield
    finally:
        module.collect_stats = original


def crossover_rows(model, tokenizer, epochs: int, lr: float, fp_ratios, q_ratios) -> list[dict[str, Any]]:
    calibration = tokenise(tokenizer, sentences("calibration_sentences.txt"), 16, bucket=True)
    evaluation = tokenise(tokenizer, sentences("eval_sentences.txt"), 32)
    reference = embed(model, evaluation)
    with cached_stats():
        rows = _sweep(model, calibration, evaluation, reference, epochs, lr, fp_ratios, q_ratios)
    original = 4 * sum(sum(t.numel() for t in lin.parameters()) for _, lin in layer_linears(model))
    return rows + peer_rows(model, evaluation, reference, original)


def _sweep(model, calibration, evaluation, reference, epochs, lr, fp_ratios, q_ratios) -> list[dict[str, Any]]:
    import adaptwin
    from adaptwin.finetune import FinetuneConfig

    rows = []
    original_bytes = None
    for ratio in sorted(set(fp_ratios) | set(q_ratios)):
        cfg = FinetuneConfig(init="whiten", epochs=epochs, lr=lr, progress=False)
        start = time.perf_counter()
        small = adaptwin.compress(model, adaptwin.CompressionConfig(ratio=ratio), calibration=calibration,
                                  finetune=cfg)
        seconds = time.perf_counter() - start
        if original_bytes is None:
            original_bytes = 4 * adaptwin.compression_record(small).summary()["total"]["params_before"]
        variants = [("fp32", small), ("fp16", None)] if ratio in fp_ratios else []
        variants += [(q, None) for q in QUANT] if ratio in q_ratios else []
        for name, m in variants:
            if m is None and epochs and name in QUANT:  # quantisation-aware fine-tuning: its own run
                m = adaptwin.compress(model, adaptwin.CompressionConfig(ratio=ratio, **QUANT[name]),
                                      calibration=calibration, finetune=cfg)
            elif m is None:
                m = derive(small, name)
            cos = (embed(m, evaluation) * reference).sum(-1)
            nbytes = module_bytes(m) // (2 if name == "fp16" else 1)
            params = adaptwin.compression_record(m).summary()["total"]["params_after"]
            row = {"part": "crossover", "provider": name, "ratio": ratio, "epochs": epochs,
                   "cos_mean": cos.mean().item(), "cos_min": cos.min().item(), "bytes": nbytes,
                   "bytes_fraction": nbytes / original_bytes, "bits_per_param": 8 * nbytes / params,
                   "params": params, "seconds": seconds}
            rows.append(row)
            print(f"{name:>5} ratio {ratio:.1f}: cosine {row['cos_mean']:.4f} (min {row['cos_min']:.4f}), "
                  f"{nbytes / 2**20:.2f} MiB = {100 * row['bytes_fraction']:.1f} % of fp32 attention+FFN, "
                  f"{row['bits_per_param']:.2f} bits/param", flush=True)
    return rows


def crossover_table(rows: list[dict[str, Any]]) -> list[str]:
    """At each fp32 point's bytes: the other curves' cosine (interpolated in log bytes) and who wins; then the
    other way round, at each quantised point's bytes: the fp32 curve's (the quantised curves reach far fewer
    bytes, so often only this direction has points inside the other curve's range)."""
    curves: dict[str, list[tuple[float, float, float]]] = {}
    for r in rows:
        if r["part"] in ("crossover", "peer"):
            curves.setdefault(r["provider"], []).append((float(r["bytes"]), float(r["cos_mean"]), float(r["ratio"])))
    lines = crossover_lines(curves, "fp32", ("fp16", "nf4", "int8"), "cosine", higher_is_better=True)
    for q in QUANT:
        lines += crossover_lines(curves, q, ("fp32",), "cosine", higher_is_better=True)
    for p in PEERS:  # each peer is one point: the AdaPTwin curves at its bytes
        lines += crossover_lines(curves, p, ("fp32", "fp16", "nf4", "int8"), "cosine", higher_is_better=True)
    return lines


def crossover_lines(curves: dict[str, list[tuple[float, float, float]]], baseline: str, others: Sequence[str],
                    metric: str, higher_is_better: bool, digits: int = 4) -> list[str]:
    """One line per point of the ``baseline`` curve: at its bytes, each other curve's score (linear
    interpolation in log bytes between its two neighbouring points) and the difference.

    ``curves``: ``{provider: [(bytes, score, ratio), ...]}``. A difference is marked ``better`` when it
    favours the other curve (``higher_is_better`` says which direction that is), so the crossover is where
    the marks change; a bytes value outside a curve's range is said so rather than extrapolated.
    """
    pts = {name: sorted(c) for name, c in curves.items()}
    lines = []
    for b, score, ratio in sorted(pts.get(baseline, []), key=lambda t: t[2]):
        cells = [f"{baseline} ratio {ratio:.2g}: {b / 2**20:.3f} MiB, {metric} {score:.{digits}f}"]
        for q in others:
            at = interpolate(pts.get(q, []), b)
            if at is None:
                span = pts.get(q, [])
                lo = min(p[0] for p in span) if span else float("nan")
                hi = max(p[0] for p in span) if span else float("nan")
                cells.append(f"{q}: outside its range ({lo / 2**20:.3f}-{hi / 2**20:.3f} MiB)")
            else:
                diff = at - score
                wins = diff > 0 if higher_is_better else diff < 0
                cells.append(f"{q}: {at:.{digits}f} ({diff:+.{digits}f}{', better' if wins else ''})")
        lines.append("; ".join(cells))
    return lines


def interpolate(points: Sequence[tuple[float, ...]], b: float) -> float | None:
    """The score at bytes ``b`` of a curve of (bytes, score, ...) points sorted by bytes, linear in log bytes
    (None outside the curve)."""
    for (b0, c0, *_), (b1, c1, *_) in zip(points, points[1:]):
        if b0 <= b <= b1:
            t = (math.log(b) - math.log(b0)) / (math.log(b1) - math.log(b0)) if b1 > b0 else 0.0
            return c0 + t * (c1 - c0)
    if len(points) == 1 and points[0][0] == b:
        return points[0][1]
    return None


def plot(csv_path: Path, png: Path) -> Path | None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed; no plot", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for provider, marker in (("fp32", "o"), ("fp16", "s"), ("nf4", "^"), ("int8", "v")):
        pts = sorted((float(r["bytes_fraction"]), float(r["cos_mean"]), float(r["ratio"])) for r in rows
                     if r["part"] == "crossover" and r["provider"] == provider)
        if pts:
            ax1.plot([100 * p[0] for p in pts], [p[1] for p in pts], marker=marker, label=provider)
            for x, y, r in pts:
                ax1.annotate(f"{r:.1f}", (100 * x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    for provider, marker in zip(PEERS, ("*", "X")):
        pts = [(float(r["bytes_fraction"]), float(r["cos_mean"])) for r in rows
               if r["part"] == "peer" and r["provider"] == provider]
        if pts:
            ax1.scatter([100 * x for x, _ in pts], [y for _, y in pts], marker=marker, s=90, label=provider)
    ax1.set_xscale("log")
    ax1.set_xlabel("bytes of the compressed modules, % of the original attention + FFN fp32 bytes (log)")
    ax1.set_ylabel("mean embedding cosine vs original (eval sentences)")
    ax1.set_title("AdaPTwin alone vs + quantisation (labels: ratio)")
    ax1.grid(alpha=0.3)
    ax1.legend()
    providers = [p for p in ("nf4", "nf4_dq", "bitsandbytes_nf4", "int8_row")
                 if any(r["provider"] == p and r["part"] == "sqnr" for r in rows)]
    data = [[float(r["sqnr_db"]) for r in rows if r["part"] == "sqnr" and r["provider"] == p] for p in providers]
    if data:
        ax2.boxplot(data)
        ax2.set_xticks(range(1, len(providers) + 1), providers)
    ax2.set_ylabel("round-trip SQNR per matrix (dB)")
    ax2.set_title("all-MiniLM-L6-v2 attention + FFN weights (36 matrices)")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, png)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/quant_crossover.csv")
    parser.add_argument("--epochs", type=int, default=0, help="layer-wise fine-tuning epochs (0: whitened init only)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--skip-sqnr", action="store_true")
    parser.add_argument("--fp-ratios", type=float, nargs="+", default=FP_RATIOS)
    parser.add_argument("--q-ratios", type=float, nargs="+", default=Q_RATIOS)
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not args.plot_only:
        torch.set_num_threads(args.threads)
        model, tokenizer = load()
        common = {"benchmark": BENCHMARK, "threads": args.threads, "timestamp": now_utc(), **versions()}
        rows = [{**common, **r} for r in sqnr_rows(model)] if not args.skip_sqnr else []
        by = {}
        for r in rows:
            by.setdefault(r["provider"], []).append(r["sqnr_db"])
        for p, v in by.items():
            print(f"SQNR {p:>17}: median {sorted(v)[len(v) // 2]:.2f} dB, min {min(v):.2f}, max {max(v):.2f} "
                  f"({len(v)} matrices)")
        write_rows(out, rows, fields=FIELDS, key=KEY)
        cross = [{**common, **r} for r in crossover_rows(model, tokenizer, args.epochs, args.lr, args.fp_ratios,
                                                       args.q_ratios)]
        write_rows(out, cross, fields=FIELDS, key=KEY)
        print("\n".join(crossover_table(cross)))
    png = plot(out, out.with_suffix(".png"))
    if png:
        print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
