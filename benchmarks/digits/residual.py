"""ResidualTransformer sharing vs AdaPTwin on the digit recogniser's encoder, at equal parameter count (WER).

    python -m benchmarks.digits.residual [--model results/digits/model] [--sets results/digits/sets]
        [--target jackson] [--groups 2,3] [--ranks 16,64] [--epochs 10] [--lr 1e-3] [--no-ft]
        [--calib N] [--limit N] [--threads 1] [--out results/digits_residual.csv] [--png results/digits_residual.png]
    python -m benchmarks.digits.residual --plot-only   # table and PNG from the CSV (e.g. of an interrupted run)

For every group size K and rank r the encoder's attention projections and FFN matrices are compressed with the
residual compressor (``components=("encoder",)``, ``group_size=K``, rank r for each matrix's own low-rank
part, a diagonal per matrix: W_i ≈ S + A_i·B_iᵀ + diag(d_i)), and AdaPTwin (product twins + FFN SVD + LoRA,
whitened, planned from ``ratio``) to the same number of targeted encoder parameters. Methods:

* ``residual``: the alternating initialisation fitted to the weights, no fine-tuning;
* ``residual-whiten``: alternating on the output error of the target speaker's calibration inputs
  (``FinetuneConfig(init="whiten", epochs=0)``), no fine-tuning;
* ``residual+ft``: ``residual-whiten`` then every group fine-tuned jointly (Eq. 9) on the calibration set;
* ``adaptwin`` / ``adaptwin+ft``: AdaPTwin with whitened initialisation, without / with fine-tuning, at
  ``ratio`` = the residual's achieved compression of the targeted encoder parameters.

The model, sets, calibration batches (``--target``'s, takes 0-29) and WER scoring (held-out takes 40-49, per
speaker and "others" pooled) are `benchmarks.digits.paper`'s `Bench`. ``size_factor`` is targeted (attention +
FFN) encoder parameters before / after; ``encoder_factor`` the whole encoder's (conv front end, positions,
norms included; a shared matrix counted once). ``weight_err`` / ``output_err`` (residual rows, before
fine-tuning) are the relative errors of the residual matrices' weights and of their outputs on the
calibration inputs (`benchmarks.residual_vs_adaptwin`). Rows are merged into the CSV as each finishes, long
format (one row per speaker); the PNG plots WER vs ``size_factor``. Seconds are wall clock on a shared
machine: noisy.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import format_table, now_utc, save_figure, versions, write_rows
from benchmarks.digits.paper import Bench, require_files
from benchmarks.residual_vs_adaptwin import _ints, input_grams, output_error, residual_paths, weight_error

BENCHMARK = "digits_residual"
METHODS = ("residual", "residual-whiten", "residual+ft", "adaptwin", "adaptwin+ft")
FIELDS = ("benchmark", "method", "group_size", "rank", "ratio", "epochs", "lr", "speaker", "wer", "errors", "words",
          "params_before", "params_after", "size_factor", "encoder_params", "encoder_params_dense", "encoder_factor",
          "weight_err", "output_err", "compress_seconds", "calib", "threads", "torch", "transformers", "adaptwin",
          "timestamp")
KEY = ("benchmark", "method", "group_size", "rank", "epochs", "speaker", "calib", "threads")


def encoder_params(model: torch.nn.Module) -> int:
    """Parameters of the encoder (``model.get_encoder()``); a Parameter shared by several modules counts once."""
    return sum(p.numel() for p in model.get_encoder().parameters())


def compress(bench: Bench, method: str, group_size: int, rank: int, ratio: float | None, epochs: int, lr: float):
    """The compressed model and the seconds it took."""
    import adaptwin

    if method.startswith("residual"):
        cfg = adaptwin.CompressionConfig(attention_rank=rank, ffn_rank=rank, attention_method="residual",
                                         ffn_method="residual", components=("encoder",),
                                         method_options={"residual": {"group_size": group_size}})
    else:
        cfg = adaptwin.CompressionConfig(ratio=ratio, components=("encoder",))
    ft = None
    if method != "residual":  # every other method is whitened on the calibration set
        ft = adaptwin.FinetuneConfig(init="whiten", epochs=epochs if method.endswith("+ft") else 0, lr=lr,
                                     progress=False)
    start = time.perf_counter()
    small = adaptwin.compress(bench.dense, cfg, calibration=bench.calibration(0) if ft else None, finetune=ft)
    return small.eval(), time.perf_counter() - start


def measure(bench: Bench, method: str, group_size: int, rank: int, ratio: float | None, args: argparse.Namespace,
            grams: dict[str, Any]) -> list[dict[str, Any]]:
    """One configuration's rows: a row per speaker and "others", with the size and error figures."""
    import adaptwin

    small, seconds = compress(bench, method, group_size, rank, ratio, args.epochs, args.lr)
    total = adaptwin.compression_record(small).summary()["total"]
    extra: dict[str, Any] = {}
    if method.startswith("residual") and not method.endswith("+ft"):
        if "grams" not in grams:  # the encoder's residual paths are the same for every K and r
            grams["grams"] = input_grams(bench.dense, residual_paths(small), bench.calibration(0))
        extra = {"weight_err": weight_error(bench.dense, small),
                 "output_err": output_error(bench.dense, small, grams["grams"])}
    dense_enc, enc = encoder_params(bench.dense), encoder_params(small)
    common = {"benchmark": BENCHMARK, "method": method, "group_size": group_size, "rank": rank,
              "ratio": ratio if ratio is not None else "", "epochs": args.epochs if method.endswith("+ft") else 0,
              "lr": args.lr if method.endswith("+ft") else "", "params_before": total["params_before"],
              "params_after": total["params_after"], "size_factor": total["params_before"] / total["params_after"],
              "encoder_params": enc, "encoder_params_dense": dense_enc, "encoder_factor": dense_enc / enc,
              "compress_seconds": round(seconds, 2), "calib": len(bench.calib), "threads": args.threads, **extra,
              **versions(), "timestamp": now_utc()}
    return [{**common, "speaker": s, "wer": e / w if w else float("nan"), "errors": e, "words": w}
            for s, (e, w) in sorted(bench.score(small).items())]


def table(rows: list[dict[str, Any]], target: str) -> str:
    """One line per configuration: sizes, target and pooled-others WER, errors, seconds."""
    configs: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        c = configs.setdefault((r["method"], r["group_size"], r["rank"]), dict(r))
        c[f"wer:{r['speaker']}"] = r["wer"]
    header = ["method", "K", "r", "size x", "encoder x", f"{target} WER %", "others WER %", "weight err",
              "output err", "seconds"]

    def num(v: Any, fmt: str) -> str:
        return format(v, fmt) if isinstance(v, (int, float)) and v != "" else "-"

    body = [[c["method"], c["group_size"], c["rank"], num(c["size_factor"], ".2f"), num(c["encoder_factor"], ".2f"),
             num(100 * c[f"wer:{target}"], ".2f"), num(100 * c["wer:others"], ".2f"),
             num(c.get("weight_err", ""), ".3f"), num(c.get("output_err", ""), ".3f"),
             num(c.get("compress_seconds", ""), ".0f")] for c in configs.values()]
    return format_table(header, body)


def plot(rows: list[dict[str, Any]], target: str, out: Path) -> Path | None:
    """WER of the target speaker and of the others vs the targeted encoder size factor, a line per method and K."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no PNG", file=sys.stderr)
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, who in zip(axes, (target, "others")):
        lines: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            if r["speaker"] == who and r["method"] != "dense":
                lines.setdefault(f"{r['method']} K={r['group_size']}", []).append((r["size_factor"], 100 * r["wer"]))
            elif r["speaker"] == who:
                ax.axhline(100 * r["wer"], color="grey", linestyle=":", label="dense")
        for i, (label, pts) in enumerate(sorted(lines.items())):
            pts.sort()
            ax.plot(*zip(*pts), "o-" if label.startswith("residual") else "s--", color=f"C{i}", label=label)
        ax.set_xlabel("encoder attention + FFN size factor (before / after)")
        ax.set_title(f"WER of {who}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("WER %")
    axes[1].legend(fontsize=7)
    fig.suptitle("digit recogniser: ResidualTransformer sharing vs AdaPTwin at equal parameter count", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out)


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The CSV's rows, numbers as floats (what `table` and `plot` take)."""
    import csv

    def value(v: str) -> Any:
        try:
            return float(v)
        except ValueError:
            return v

    with open(path, newline="") as f:
        return [{k: value(v) for k, v in r.items()} for r in csv.DictReader(f) if r["benchmark"] == BENCHMARK]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="results/digits/model")
    parser.add_argument("--sets", default="results/digits/sets")
    parser.add_argument("--target", default="jackson")
    parser.add_argument("--groups", type=_ints, default=[2, 3], help="group sizes K (>= 2)")
    parser.add_argument("--ranks", type=_ints, default=[16, 64], help="ranks of each matrix's own low-rank part")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=16, help="calibration utterances per batch")
    parser.add_argument("--calib", type=int, default=None, help="use only the first N calibration utterances")
    parser.add_argument("--limit", type=int, default=None, help="test utterances per speaker (smoke runs)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=f"results/{BENCHMARK}.csv")
    parser.add_argument("--png", default=f"results/{BENCHMARK}.png")
    parser.add_argument("--plot-only", action="store_true", help="print the table and draw the PNG from --out")
    args = parser.parse_args(argv)
    if args.plot_only:
        rows = read_rows(args.out)
        for r in rows:  # integer columns back to ints for the table's K and r
            r.update({k: int(r[k]) for k in ("group_size", "rank") if isinstance(r[k], float)})
        print(table(rows, args.target))
        print(f"wrote {plot(rows, args.target, Path(args.png))}")
        return 0
    methods = [m for m in args.methods.split(",") if m]
    if sorted(set(methods) - set(METHODS)) or not methods:
        parser.error(f"--methods must be a subset of {','.join(METHODS)}, got {args.methods!r}")
    if min(args.groups) < 2:
        parser.error("group size 1 shares nothing (each layer keeps a full matrix); use K >= 2")
    if args.calib is not None and args.calib < 1:
        parser.error(f"--calib must be >= 1, got {args.calib}")
    require_files(args.model, args.sets)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import adaptwin

    bench = Bench(args.model, args.sets, args.target, args.batch, args.limit)
    if args.calib is not None:  # Bench featurised them all; keep the first N (the order the seed draws is kept)
        bench.calib, bench._features = bench.calib[:args.calib], bench._features[:args.calib]
    dense_enc = encoder_params(bench.dense)
    rows = [{"benchmark": BENCHMARK, "method": "dense", "group_size": "", "rank": "", "speaker": s, "wer": e / w,
             "errors": e, "words": w, "encoder_params": dense_enc, "encoder_params_dense": dense_enc,
             "encoder_factor": 1.0, "size_factor": 1.0, "calib": len(bench.calib), "threads": args.threads,
             **versions(), "timestamp": now_utc()} for s, (e, w) in sorted(bench.score(bench.dense).items())]
    write_rows(args.out, rows, fields=FIELDS, key=KEY)
    grams: dict[str, Any] = {}
    for k in args.groups:
        for r in args.ranks:
            ratio = None
            for method in methods:
                if method.startswith("adaptwin") and ratio is None:  # the residual's compression, without fitting
                    cfg = adaptwin.CompressionConfig(attention_rank=r, ffn_rank=r, attention_method="residual",
                                                     ffn_method="residual", components=("encoder",),
                                                     method_options={"residual": {"group_size": k}})
                    ratio = round(adaptwin.plan(bench.dense, cfg).summary()["total"]["compression"], 4)
                new = measure(bench, method, k, r, ratio, args, grams)
                write_rows(args.out, new, fields=FIELDS, key=KEY)
                rows += new
                wer = {row["speaker"]: row["wer"] for row in new}
                print(f"{method:>15} K={k} r={r:<3} size x{new[0]['size_factor']:.2f} (encoder "
                      f"x{new[0]['encoder_factor']:.2f}): {args.target} WER {100 * wer[args.target]:.2f} %, others "
                      f"{100 * wer['others']:.2f} % ({new[0]['compress_seconds']:.0f} s)", file=sys.stderr, flush=True)
    print(f"\nWER on held-out takes 40-49 ({len(bench.test)} utterances); calibration {len(bench.calib)} "
          f"{args.target} utterances, {args.epochs} epochs for +ft")
    print(table(rows, args.target))
    png = plot(rows, args.target, Path(args.png))
    print(f"wrote {args.out}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
