"""AdaPTwin alone vs AdaPTwin + quantised factors on the digit recogniser: WER against bytes.

    python -m benchmarks.digits.quant_crossover [--model results/digits/model] [--sets results/digits/sets]
        [--threads 1] [--epochs N] [--limit N] [--out results/digits_quant_crossover.csv]
    python -m benchmarks.digits.quant_crossover --plot-only

The speech counterpart of benchmarks/quant_crossover.py (MiniLM). Every row compresses the encoder and the
decoder with ``CompressionConfig(ratio=r)`` and the activation-whitened initialisation
(``FinetuneConfig(init="whiten")``) calibrated on the target speaker's calibration set (jackson, takes
0-29; `benchmarks.digits.paper.Bench` loads the model, the sets and the calibration batches and scores).
``--epochs`` > 0 adds layer-wise fine-tuning on the same set, quantisation-aware for the quantised rows
(their own run); with 0 the quantised rows pack the fp32 row's factors.

Peers (ratio 0, no rank reduction; `benchmarks.quant_crossover.peer`): ``dense_nf4``, every attention / FFN
matrix of the layers stored NF4 with double quantisation (bitsandbytes' codes), and ``dense_int8_dynamic``,
every one as torch's dynamically quantised int8 linear; their WER and bytes sit beside the curves.

Providers: fp32 factors at r = 0.4..0.8 (AdaPTwin alone) and NF4 (double quant) / int8 (per row) factors
at r = 0.1..0.8, plus the dense model. WER is measured on the held-out takes 40-49 for the target speaker
and for the other speakers pooled (and each, in the CSV). ``bytes`` counts every stored tensor of the
compressed modules (codes, scales, fp LoRA directions, biases); ``bytes_fraction`` divides by the original
attention + FFN weights' fp32 bytes. The crossover tables interpolate each quantised curve (linear in log
bytes) at each fp32 point's bytes, as the MiniLM benchmark does (`benchmarks.quant_crossover.crossover_lines`).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import format_table, now_utc, save_figure, versions, write_rows
from benchmarks.quant_crossover import (
    FP_RATIOS,
    PEERS,
    Q_RATIOS,
    QUANT,
    cached_stats,
    crossover_lines,
    derive,
    module_bytes,
    peer,
)

BENCHMARK = "digits_quant_crossover"
FIELDS = ("benchmark", "provider", "ratio", "epochs", "speaker", "wer", "errors", "words", "bytes", "bytes_fraction",
          "bits_per_param", "params", "compress_seconds", "lr", "limit", "threads", "torch", "transformers",
          "adaptwin", "timestamp")
KEY = ("benchmark", "provider", "ratio", "epochs", "speaker", "limit")
PROVIDERS = ("fp32", *QUANT)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sweep(bench: Any, fp_ratios: Sequence[float], q_ratios: Sequence[float], epochs: int, lr: float,
          seed: int = 0) -> list[dict[str, Any]]:
    """Rows (one per provider, ratio and speaker, "others" pooled) for a `benchmarks.digits.paper.Bench`."""
    import adaptwin

    calibration = bench.calibration(seed)
    # The dense row's bytes: the attention + FFN weights every compressed row replaces, in fp32.
    targeted = adaptwin.plan(bench.dense, adaptwin.CompressionConfig(ratio=0.5)).summary()["total"]["params_before"]
    rows = _rows("dense", 0.0, epochs, bench.score(bench.dense), 4 * targeted, None, targeted, 0.0)
    _say(f"dense: {_line(rows, bench.target)}")
    for name in PEERS:
        start = time.perf_counter()
        model, nbytes, params = peer(bench.dense, name)
        new = _rows(name, 0.0, 0, bench.score(model.eval()), nbytes, 4 * targeted, params,
                    time.perf_counter() - start)
        rows += new
        _say(f"{name}: {_line(new, bench.target)}, {nbytes / 2**20:.3f} MiB = {100 * new[0]['bytes_fraction']:.1f} % "
             "of fp32 attention+FFN")
    with cached_stats():  # the Grams of one model on one calibration set serve every ratio
        for ratio in sorted(set(fp_ratios) | set(q_ratios)):
            ft = adaptwin.FinetuneConfig(init="whiten", epochs=epochs, lr=lr, seed=seed, progress=False)
            start = time.perf_counter()
            small = adaptwin.compress(bench.dense, adaptwin.CompressionConfig(ratio=ratio), calibration=calibration,
                                      finetune=ft).eval()
            seconds = time.perf_counter() - start
            original = 4 * adaptwin.compression_record(small).summary()["total"]["params_before"]
            variants = ["fp32"] if ratio in fp_ratios else []
            variants += list(QUANT) if ratio in q_ratios else []
            for name in variants:
                took = seconds
                if name == "fp32":
                    model = small
                elif epochs:  # quantisation-aware fine-tuning: its own run
                    start = time.perf_counter()
                    model = adaptwin.compress(bench.dense, adaptwin.CompressionConfig(ratio=ratio, **QUANT[name]),
                                              calibration=calibration, finetune=ft).eval()
                    took = time.perf_counter() - start
                else:
                    model = derive(small, name)
                params = adaptwin.compression_record(model).summary()["total"]["params_after"]
                new = _rows(name, ratio, epochs, bench.score(model), module_bytes(model), original, params, took)
                rows += new
                _say(f"{name:>4} ratio {ratio:.1f}: {_line(new, bench.target)}, {new[0]['bytes'] / 2**20:.3f} MiB "
                     f"= {100 * new[0]['bytes_fraction']:.1f} % of fp32 attention+FFN, "
                     f"{new[0]['bits_per_param']:.2f} bits/param")
    return rows


def _rows(provider: str, ratio: float, epochs: int, scores: dict[str, tuple[int, int]], nbytes: int,
          original: int | None, params: int, seconds: float) -> list[dict[str, Any]]:
    common = {"provider": provider, "ratio": ratio, "epochs": epochs, "bytes": nbytes,
              "bytes_fraction": nbytes / original if original else 1.0, "bits_per_param": 8 * nbytes / params,
              "params": params, "compress_seconds": round(seconds, 2)}
    return [{**common, "speaker": s, "wer": e / w if w else float("nan"), "errors": e, "words": w}
            for s, (e, w) in sorted(scores.items())]


def _line(rows: list[dict[str, Any]], target: str) -> str:
    wer = {r["speaker"]: r["wer"] for r in rows}
    return f"WER {target} {100 * wer[target]:.2f} %, others {100 * wer['others']:.2f} %"


def curves(rows: Sequence[dict[str, Any]], speaker: str) -> dict[str, list[tuple[float, float, float]]]:
    """``{provider: [(bytes, WER %, ratio), ...]}`` of one speaker (or "others"), the dense row left out."""
    out: dict[str, list[tuple[float, float, float]]] = {}
    for r in rows:
        if r["speaker"] == speaker and r["provider"] != "dense":
            out.setdefault(r["provider"], []).append((float(r["bytes"]), 100 * float(r["wer"]), float(r["ratio"])))
    return out


def report(rows: Sequence[dict[str, Any]], target: str) -> str:
    """The points table and, per speaker group, the crossover lines (WER %, lower is better)."""
    body = []
    for r in rows:
        if r["speaker"] == target:
            other = next(o for o in rows if o["speaker"] == "others" and o["provider"] == r["provider"]
                         and o["ratio"] == r["ratio"])
            body.append([r["provider"], f"{float(r['ratio']):.1f}", f"{int(r['bytes']) / 2**20:.3f}",
                         f"{100 * float(r['bytes_fraction']):.1f}", f"{float(r['bits_per_param']):.2f}",
                         f"{100 * float(r['wer']):.2f}", f"{100 * float(other['wer']):.2f}"])
    lines = [format_table(["provider", "ratio", "MiB", "% fp32", "bits/param", f"{target} WER %", "others WER %"],
                          body)]
    for who in (target, "others"):
        lines.append(f"\ncrossover, {who} (WER %, lower is better; quantised curves interpolated in log bytes):")
        lines += crossover_lines(curves(rows, who), "fp32", tuple(QUANT), "WER %", higher_is_better=False, digits=2)
        for q in QUANT:  # the other way round: the fp32 curve at each quantised point's bytes
            lines += crossover_lines(curves(rows, who), q, ("fp32",), "WER %", higher_is_better=False, digits=2)
        for p in PEERS:  # each peer is one point: the AdaPTwin curves at its bytes
            lines += crossover_lines(curves(rows, who), p, PROVIDERS, "WER %", higher_is_better=False, digits=2)
    text = "\n".join(lines)
    print(text)
    return text


def plot(rows: Sequence[dict[str, Any]], target: str, out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _say("matplotlib is not installed (pip install -e '.[bench]'): no PNG")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, who in zip(axes, (target, "others")):
        for provider, marker in zip(PROVIDERS, "o^v"):
            pts = sorted(curves(rows, who).get(provider, []))
            if pts:
                ax.plot([p[0] / 2**20 for p in pts], [p[1] for p in pts], marker=marker, label=provider)
                for b, w, r in pts:
                    ax.annotate(f"{r:.1f}", (b / 2**20, w), textcoords="offset points", xytext=(3, 3), fontsize=7)
        for provider, marker in zip(PEERS, "*X"):
            pts = curves(rows, who).get(provider, [])
            if pts:
                ax.scatter([p[0] / 2**20 for p in pts], [p[1] for p in pts], marker=marker, s=90, label=provider)
        dense = [100 * float(r["wer"]) for r in rows if r["provider"] == "dense" and r["speaker"] == who]
        if dense:
            ax.axhline(dense[0], color="grey", linestyle="--", label="dense")
        ax.set_xscale("log")
        ax.set_xlabel("bytes of the compressed attention + FFN modules (MiB, log)")
        ax.set_title(f"{who}: AdaPTwin fp32 vs + NF4 / int8 factors (labels: ratio)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("WER % (held-out takes)")
    axes[0].legend()
    fig.tight_layout()
    return save_figure(fig, out)


def _read(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r["benchmark"] == BENCHMARK]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="results/digits/model")
    parser.add_argument("--sets", default="results/digits/sets")
    parser.add_argument("--target", default="jackson")
    parser.add_argument("--epochs", type=int, default=0, help="layer-wise fine-tuning epochs (0: whitened init only)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=16, help="calibration utterances per batch")
    parser.add_argument("--seed", type=int, default=0, help="calibration order and fine-tuning shuffling")
    parser.add_argument("--limit", type=int, default=None, help="test utterances per speaker (smoke runs)")
    parser.add_argument("--fp-ratios", type=float, nargs="+", default=FP_RATIOS)
    parser.add_argument("--q-ratios", type=float, nargs="+", default=Q_RATIOS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="results/digits_quant_crossover.csv")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG and tables from the CSV")
    args = parser.parse_args(argv)
    if args.epochs < 0 or args.threads < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--epochs must be >= 0, --threads >= 1 and --limit >= 1")
    bad = [r for r in (*args.fp_ratios, *args.q_ratios) if not 0 < r < 1]
    if bad:
        parser.error(f"ratios must lie strictly between 0 and 1, got {bad}")
    out = Path(args.out)
    if args.plot_only:
        rows: list[dict[str, Any]] = _read(out)
    else:
        from benchmarks.digits.paper import Bench, require_files

        require_files(args.model, args.sets)
        threads = torch.get_num_threads()
        torch.set_num_threads(args.threads)
        try:
            bench = Bench(args.model, args.sets, args.target, args.batch, args.limit)
            common = {"benchmark": BENCHMARK, "lr": args.lr, "limit": args.limit or "", "threads": args.threads,
                      **versions(), "timestamp": now_utc()}
            rows = [{**common, **r} for r in sweep(bench, args.fp_ratios, args.q_ratios, args.epochs, args.lr,
                                                   args.seed)]
        finally:
            torch.set_num_threads(threads)
        write_rows(out, rows, fields=FIELDS, key=KEY)
        print(f"\nWER on held-out takes 40-49 ({len(bench.test)} utterances), whitened init calibrated on "
              f"{len(bench.calib)} {args.target} utterances, {args.epochs} fine-tuning epochs")
    report(rows, args.target)
    png = plot(rows, args.target, out.with_suffix(".png"))
    print(f"wrote {out}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
