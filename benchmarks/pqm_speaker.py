"""PQM speaker adaptation on the digit recogniser: WER of full precision, NF4, and NF4 + LoRA adapted on one speaker.

    python -m benchmarks.pqm_speaker [--model results/digits/model] [--sets results/digits/sets]
                                     [--target jackson] [--adapt-utterances 25] [--lora-rank 4]
                                     [--epochs 10] [--lr 1e-3,3e-3,1e-2] [--limit N] [--threads 2]
                                     [--out results/pqm_speaker.csv] [--png results/pqm_speaker.png]

Three models are scored greedily on the held-out sequences of every speaker (``test.jsonl``, takes 40-49):

    fp32        the dense recogniser
    nf4         PQM without adaptation: every attention/FFN linear NF4 (block 64), LoRA B = 0
    nf4+lora    the same after adapting only the LoRA factors on the first N ``{target}_calib.jsonl``
                utterances (PQM uses 20-30) with the model's own cross-entropy; with several ``--lr`` values the one
                with the lowest loss on the next ``--val-utterances`` calibration utterances is kept
                (chosen without looking at the test set)

and the question is PQM's: does adaptation lower the target speaker's WER (PQM: ~15 % relative on
Whisper) and what does it do to the others? Rows per (model, speaker), plus the other speakers pooled and
all speakers; ``rel_vs_nf4`` is (WER − WER_nf4) / WER_nf4. The calibration sequences recombine takes 0-39,
which the recogniser was trained on; only the test takes are unheard. WER carries sampling noise: with ~300
words per speaker one error is ~0.3 points, so small differences are within the bootstrap interval
(``ci_low``/``ci_high``, 95 %, over utterances).

The PNG is drawn from the CSV alone (``--plot-only`` redraws it without rerunning).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("benchmark", "model", "speaker", "utterances", "words", "wer", "ci_low", "ci_high", "substitutions",
          "deletions", "insertions", "rel_vs_nf4", "rel_vs_fp32", "target", "adapt_utterances", "lora_rank",
          "epochs", "lr", "loss_before", "loss_after", "val_loss_before", "val_loss", "best_epoch", "eval_seconds",
          "threads", "torch", "transformers", "adaptwin", "timestamp")
KEY = ("benchmark", "model", "speaker", "target", "adapt_utterances", "lora_rank")
MODELS = ("fp32", "nf4", "nf4+lora")


def _group(report, speakers: list[str]) -> dict:
    """S, D, I, N and WER pooled over ``speakers`` of a WERReport's per-speaker split."""
    rows = [report.per_speaker[s] for s in speakers]
    out = {k: sum(r[k] for r in rows) for k in ("utterances", "reference_words", "substitutions", "deletions",
                                                "insertions")}
    n = out["reference_words"]
    out["wer"] = (out["substitutions"] + out["deletions"] + out["insertions"]) / n if n else None
    return out


def _rows(name: str, result, target: str) -> dict[str, dict]:
    """``{speaker or 'others' or 'all': figures}`` of one model's EvalResult."""
    r = result.report
    speakers = sorted(r.per_speaker)
    out = {s: _group(r, [s]) for s in speakers}
    out["others"] = _group(r, [s for s in speakers if s != target])
    out["all"] = {"utterances": r.utterances, "reference_words": r.reference_words, "substitutions": r.substitutions,
                  "deletions": r.deletions, "insertions": r.insertions, "wer": r.wer, "ci": (r.ci_low, r.ci_high)}
    return out


def _speaker_ci(result, speakers: set[str], seed: int = 0) -> tuple[float, float]:
    """95 % bootstrap interval of the pooled WER of ``speakers`` (resampling their utterances)."""
    import numpy as np

    rows = [u for u in result.utterances if u["speaker"] in speakers]
    e = np.array([u["substitutions"] + u["deletions"] + u["insertions"] for u in rows], dtype=float)
    w = np.array([u["reference_words"] for u in rows], dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(rows), size=(1000, len(rows)))
    wers = e[idx].sum(1) / np.maximum(w[idx].sum(1), 1)
    return float(np.quantile(wers, 0.025)), float(np.quantile(wers, 0.975))


def run(args: argparse.Namespace) -> list[dict]:
    import torch

    import adaptwin
    from adaptwin.compressors.pqm import quantize
    from adaptwin.speech.adapt_cli import speech_batches
    from adaptwin.speech.cli import load_speech_model
    from adaptwin.speech.datasets import load_dataset
    from adaptwin.speech.evaluate import evaluate
    from adaptwin.speech.wer import BasicNormalizer
    from benchmarks.common import now_utc, versions

    torch.set_num_threads(args.threads)
    sets = Path(args.sets)
    test = load_dataset(sets / "test.jsonl")
    if args.limit:
        kept: dict[str, list] = {}
        for u in test:
            kept.setdefault(u.speaker, []).append(u)
        test = [u for group in kept.values() for u in group[:args.limit]]
    calib_path = sets / f"{args.target}_calib.jsonl"
    pool = [u for u in load_dataset(calib_path) if u.speaker == args.target]
    calib, val = pool[:args.adapt_utterances], pool[args.adapt_utterances:args.adapt_utterances + args.val_utterances]
    if len(calib) < args.adapt_utterances:
        raise ValueError(f"{calib_path} has {len(calib)} utterances of {args.target}, fewer than "
                         f"--adapt-utterances {args.adapt_utterances}")
    if len(args.lr) > 1 and not val:
        raise ValueError(f"choosing among --lr {args.lr} needs validation utterances: {calib_path} has none after "
                         f"the first {args.adapt_utterances}")
    if args.target not in {u.speaker for u in test}:
        raise ValueError(f"--target {args.target} has no test utterances in {sets / 'test.jsonl'}")

    dense, fe, tok = load_speech_model(args.model)
    results, adapt_info = {}, {}

    def score(name: str, model) -> None:
        t0 = time.perf_counter()
        # Basic normaliser: Whisper's English one would turn "seven three nine" into "739", one word.
        results[name] = evaluate(model, fe, tok, test, batch_size=args.batch_size, normalizer=BasicNormalizer())
        results[name].eval_seconds = time.perf_counter() - t0
        print(f"{name:>9}: WER {100 * results[name].report.wer:.2f} % on {len(test)} utterances "
              f"({results[name].eval_seconds:.0f} s)", flush=True)

    score("fp32", dense)
    base = quantize(copy.deepcopy(dense), args.lora_rank, seed=args.seed, inplace=True)
    score("nf4", base)
    batches = speech_batches(base, fe, tok, calib, args.batch_size)
    val_batches = speech_batches(base, fe, tok, val, args.batch_size) if val else []

    def val_loss_of(model) -> float | None:
        with torch.no_grad():
            return sum(float(model(**b).loss) for b in val_batches) / len(val_batches) if val_batches else None

    val_before = val_loss_of(base)
    best = None
    for lr in args.lr:
        pqm = copy.deepcopy(base)
        report = adaptwin.adapt(pqm, batches, epochs=args.epochs, lr=lr, seed=args.seed,
                                eval_batches=val_batches or None,
                                progress=lambda e, n, loss: print(f"  adapt epoch {e}/{n}: loss {loss:.4f}",
                                                                  flush=True))
        val_loss = val_loss_of(pqm)
        print(f"adapted on {len(calib)} {args.target} utterances, lr {lr:g}: loss {report.loss_before:.4f} -> "
              f"{report.loss_after:.4f} in {report.seconds:.0f} s; held-out {args.target} loss "
              f"{'-' if val_loss is None else f'{val_before:.4f} -> {val_loss:.4f}'} over {len(val)} utterances"
              f"{'' if report.best_epoch is None else f' (kept epoch {report.best_epoch}; 0 = not adapted)'}",
              flush=True)
        if best is None or (val_loss is not None and val_loss < best[1]):
            best = (lr, val_loss, report, pqm)
    lr, val_loss, report, pqm = best
    adapt_info = {"loss_before": report.loss_before, "loss_after": report.loss_after, "val_loss_before": val_before,
                  "val_loss": val_loss, "best_epoch": report.best_epoch}
    score("nf4+lora", pqm)

    meta = {"benchmark": "pqm_speaker", "target": args.target, "adapt_utterances": len(calib),
            "lora_rank": args.lora_rank, "epochs": args.epochs, "lr": lr, "threads": args.threads,
            **versions(), "timestamp": now_utc()}
    tables = {name: _rows(name, res, args.target) for name, res in results.items()}
    speakers = sorted(results["fp32"].report.per_speaker)
    rows = []
    for name, table in tables.items():
        for spk, g in table.items():
            members = set(speakers) if spk == "all" else {s for s in speakers if s != args.target} \
                if spk == "others" else {spk}
            lo, hi = _speaker_ci(results[name], members)
            base, full = tables["nf4"][spk]["wer"], tables["fp32"][spk]["wer"]
            rows.append({**meta, "model": name, "speaker": spk, "utterances": g["utterances"],
                         "words": g["reference_words"], "wer": g["wer"], "ci_low": lo, "ci_high": hi,
                         "substitutions": g["substitutions"], "deletions": g["deletions"],
                         "insertions": g["insertions"],
                         "rel_vs_nf4": (g["wer"] - base) / base if base else None,
                         "rel_vs_fp32": (g["wer"] - full) / full if full else None,
                         "eval_seconds": results[name].eval_seconds,
                         **(adapt_info if name == "nf4+lora" else {})})
    return rows


def plot(csv_path: str | Path, png: str | Path) -> Path | None:
    """Grouped bars: WER per speaker (target first, then others, pooled others, all) for each model."""
    import csv

    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed; no PNG drawn", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["benchmark"] == "pqm_speaker"]
    if not rows:
        raise ValueError(f"{csv_path} has no pqm_speaker rows")
    last = rows[-1]  # the newest run's settings
    rows = [r for r in rows if all(r[k] == last[k] for k in ("target", "adapt_utterances", "lora_rank"))]
    target = last["target"]
    speakers = sorted({r["speaker"] for r in rows} - {target, "others", "all"})
    order = [target, *speakers, "others", "all"]
    by = {(r["model"], r["speaker"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(1.4 * len(order) + 2, 4.2))
    width = 0.8 / len(MODELS)
    for i, m in enumerate(MODELS):
        xs = [j + (i - (len(MODELS) - 1) / 2) * width for j in range(len(order))]
        ys = [100 * float(by[(m, s)]["wer"]) for s in order]
        lo = [y - 100 * float(by[(m, s)]["ci_low"]) for y, s in zip(ys, order)]
        hi = [100 * float(by[(m, s)]["ci_high"]) - y for y, s in zip(ys, order)]
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=m)
        if m == "nf4+lora":
            for x, y, s in zip(xs, ys, order):
                rel = by[(m, s)]["rel_vs_nf4"]
                if rel:
                    ax.annotate(f"{100 * float(rel):+.0f}%", (x, y), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(order)), [f"{s}\n(target)" if s == target else s for s in order])
    ax.set_ylabel("WER (%)")
    ax.set_title(f"PQM: NF4 + LoRA r={last['lora_rank']} adapted on {last['adapt_utterances']} {target} "
                 f"utterances ({last['epochs']} epochs, lr {last['lr']})\n(labels: change vs NF4; whiskers: 95 % "
                 "bootstrap over utterances)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(png)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out)
    return out


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers > 0, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pqm_speaker", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "results/digits/model"), help="dense recogniser folder")
    p.add_argument("--sets", default=str(ROOT / "results/digits/sets"), help="folder with test.jsonl and "
                   "{target}_calib.jsonl (benchmarks.digits.make_sets)")
    p.add_argument("--target", default="jackson", help="speaker to adapt to (default jackson)")
    p.add_argument("--adapt-utterances", type=int, default=25, help="first N calibration utterances (default 25)")
    p.add_argument("--lora-rank", type=int, default=4, help="LoRA rank 1-4 (default 4)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=_floats, default=[1e-3, 3e-3, 1e-2], help="Adam learning rate(s), comma-separated; "
                   "several: the one with the lowest held-out target loss is kept (default 1e-3,3e-3,1e-2)")
    p.add_argument("--val-utterances", type=int, default=50, help="calibration utterances after the adaptation "
                   "ones that choose the lr (default 50)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="score only the first N test utterances of each speaker")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "results/pqm_speaker.csv"))
    p.add_argument("--png", default=str(ROOT / "results/pqm_speaker.png"))
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG from the CSV")
    args = p.parse_args(argv)
    if not args.plot_only:
        if not (Path(args.model) / "config.json").is_file():
            print(f"error: no model at {args.model} (train it: python -m benchmarks.digits.train ...)",
                  file=sys.stderr)
            return 2
        try:
            rows = run(args)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        from benchmarks.common import format_table, write_rows

        write_rows(args.out, rows, fields=FIELDS, key=KEY)
        print(format_table(("model", "speaker", "words", "WER %", "95 % CI", "vs nf4", "vs fp32"),
                           [(r["model"], r["speaker"], r["words"], f"{100 * r['wer']:.2f}",
                             f"{100 * r['ci_low']:.1f}-{100 * r['ci_high']:.1f}",
                             "-" if r["rel_vs_nf4"] is None else f"{100 * r['rel_vs_nf4']:+.1f}%",
                             "-" if r["rel_vs_fp32"] is None else f"{100 * r['rel_vs_fp32']:+.1f}%") for r in rows]))
        print(f"wrote {args.out}")
    png = plot(args.out, args.png)
    if png is not None:
        print(f"wrote {png}")
    print(json.dumps({"csv": str(args.out), "png": str(png) if png else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
