"""The paper's experiments re-run on the digit recogniser: dense vs compressed WER, per speaker.

    python -m benchmarks.digits.paper table1  [--model results/digits/model] [--sets results/digits/sets]
    python -m benchmarks.digits.paper figure2
    python -m benchmarks.digits.paper table3
    python -m benchmarks.digits.paper all

- table1: the dense model and, at 50 % of the encoder's attention + FFN parameters removed and at 45 % of
  the whole model's, plain SVD and whitened SVD without fine-tuning (reference) and each then fine-tuned
  layer by layer (Eq. 9) on the target speaker's calibration set (jackson, takes 0-29 only); WER of the
  target speaker and of the other speakers (pooled, and each) on held-out takes 40-49, mean ± standard
  deviation over seeds (the seed draws the calibration order, the held-out split and the shuffling);
  compression time and parameters.
- figure2: WER as successive encoder layers are compressed (layers 0..k-1, fixed ranks: those the
  ``--setting`` plan gives, default the 50 % encoder plan), fine-tuned; a line plot.
- table3: the four fine-tuning strategies of the fine-tuning issue (`FinetuneConfig.mode`) at ``--setting``
  (default 50 % encoder).
- ``encoder75`` (75 % of the encoder's attention + FFN parameters) goes beyond the paper, to where plain
  compression loses accuracy and fine-tuning has something to win back.

Each writes results/digits_<name>.csv (atomically, rows merged by key) and a PNG, and prints a table.
Any Whisper-architecture folder with a feature extractor and tokenizer works as ``--model``; the target
speaker and sets are flags.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import format_table, now_utc, save_figure, versions, write_rows

RESULTS = Path("results")
FIELDS = ("benchmark", "setting", "method", "seed", "speaker", "wer", "errors", "words", "params", "params_dense",
          "compress_seconds", "epochs", "lr", "threads", "torch", "transformers", "adaptwin", "timestamp")
KEY = ("benchmark", "setting", "method", "seed", "speaker")
SETTINGS = {  # name -> CompressionConfig keyword arguments
    "encoder50": {"ratio": 0.5, "components": ("encoder",)},
    "whole45": {"ratio": 0.45},
    "encoder75": {"ratio": 0.75, "components": ("encoder",)},  # beyond the paper: where compression hurts
}
METHODS = ("svd", "whiten", "svd+ft", "whiten+ft")
MODES = ("all", "spectral", "lora_scratch", "lora_only")


# ----------------------------------------------------------------------------------------------- data

def require_files(model_dir: str, sets: str) -> None:
    """Exit with what to run first when the recogniser or its test sets are missing (every digits benchmark)."""
    for need in (Path(model_dir) / "config.json", Path(sets) / "test.jsonl"):
        if not need.is_file():
            raise SystemExit(f"{need} is missing: train the recogniser and write its sets first "
                             "(python -m benchmarks.digits.make_sets / benchmarks.digits.train)")


class Bench:
    """The model, its processors, the test sets and the calibration batches of one run."""

    def __init__(self, model_dir: str, sets: str, target: str, batch: int, limit: int | None) -> None:
        from transformers import AutoFeatureExtractor, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        from adaptwin.sources import load_model
        from adaptwin.speech.datasets import load_dataset

        self.model_dir, self.target = model_dir, target
        self.dense = load_model(model_dir)
        self.fe = AutoFeatureExtractor.from_pretrained(model_dir)
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        sets = Path(sets)
        self.test = load_dataset(sets / "test.jsonl")
        if limit:  # the first ``limit`` of each speaker (smoke runs)
            kept: dict[str, list] = {}
            for u in self.test:
                kept.setdefault(u.speaker, [])
                if len(kept[u.speaker]) < limit:
                    kept[u.speaker].append(u)
            self.test = [u for utts in kept.values() for u in utts]
        if target not in {u.speaker for u in self.test}:
            raise SystemExit(f"target speaker {target!r} is not in {sets / 'test.jsonl'}")
        self.calib = load_dataset(sets / f"{target}_calib.jsonl")
        if limit:
            self.calib = self.calib[: max(4 * batch, limit)]
        self.batch = batch
        self._features = self._featurise(self.calib)

    def _featurise(self, utts) -> list[tuple[torch.Tensor, list[int]]]:
        from adaptwin.speech.audio import load_audio

        sr = self.fe.sampling_rate
        out = []
        for u in utts:
            feats = self.fe(load_audio(u.audio, sr), sampling_rate=sr, return_tensors="pt")["input_features"][0]
            ids = self.tok(u.text, add_special_tokens=False)["input_ids"]
            out.append((feats, ids))
        return out

    def calibration(self, seed: int) -> list[dict[str, torch.Tensor]]:
        """Batches of (input_features, teacher-forced decoder inputs + mask), in a seed-drawn order."""
        start = self.dense.generation_config.decoder_start_token_id
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else start
        order = np.random.default_rng(seed).permutation(len(self._features))
        batches = []
        for i in range(0, len(order), self.batch):
            rows = [self._features[j] for j in order[i:i + self.batch]]
            width = 1 + max(len(ids) for _, ids in rows)
            dec = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, (_, ids) in enumerate(rows):
                dec[r, : 1 + len(ids)] = torch.tensor([start, *ids])
                mask[r, : 1 + len(ids)] = 1
            batches.append({"input_features": torch.stack([f for f, _ in rows]), "decoder_input_ids": dec,
                            "decoder_attention_mask": mask})
        return batches

    def score(self, model) -> dict[str, tuple[int, int]]:
        """Per speaker (errors, words), plus "others" pooled over every speaker but the target."""
        from adaptwin.speech.evaluate import evaluate
        from adaptwin.speech.wer import BasicNormalizer

        # The basic normaliser: the English one turns "seven three nine" into "739", one word per utterance.
        result = evaluate(model, self.fe, self.tok, self.test, batch_size=32, resamples=1,
                          normalizer=BasicNormalizer())
        out: dict[str, list[int]] = {}
        for row in result.utterances:
            errors = row["substitutions"] + row["deletions"] + row["insertions"]
            for key in (row["speaker"], "others" if row["speaker"] != self.target else None):
                if key is not None:
                    acc = out.setdefault(key, [0, 0])
                    acc[0] += errors
                    acc[1] += row["reference_words"]
        return {k: (e, w) for k, (e, w) in out.items()}


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def compress(bench: Bench, setting: dict[str, Any], method: str, seed: int, epochs: int, lr: float,
             mode: str = "all", overrides: dict | None = None):
    import adaptwin

    init = method.split("+")[0]
    cfg = adaptwin.CompressionConfig(**setting, overrides=overrides or {})
    ft = None
    if init == "whiten" or method.endswith("+ft"):
        ft = adaptwin.FinetuneConfig(init=init, epochs=epochs if method.endswith("+ft") else 0, lr=lr, mode=mode,
                                     seed=seed, progress=False)
    start = time.perf_counter()
    small = adaptwin.compress(bench.dense, cfg, calibration=bench.calibration(seed) if ft else None, finetune=ft)
    return small.eval(), time.perf_counter() - start


def rows_for(name: str, setting: str, method: str, seed: int, scores: dict[str, tuple[int, int]], params: int,
             dense: int, seconds: float, args: argparse.Namespace) -> list[dict[str, Any]]:
    common = {"benchmark": f"digits_{name}", "setting": setting, "method": method, "seed": seed, "params": params,
              "params_dense": dense, "compress_seconds": round(seconds, 2), "epochs": args.epochs, "lr": args.lr,
              "threads": args.threads, **versions(), "timestamp": now_utc()}
    return [{**common, "speaker": s, "wer": e / w if w else float("nan"), "errors": e, "words": w}
            for s, (e, w) in sorted(scores.items())]


# ---------------------------------------------------------------------------------------- experiments

def table1(bench: Bench, args: argparse.Namespace) -> list[dict[str, Any]]:
    dense = n_params(bench.dense)
    rows = rows_for("table1", "dense", "dense", 0, bench.score(bench.dense), dense, dense, 0.0, args)
    _say(f"dense: target {_wer(rows, bench.target):.2%}, others {_wer(rows, 'others'):.2%}")
    for setting in args.settings:
        for method in args.methods:
            seeds = args.seeds if method.endswith("+ft") else args.seeds[:1]  # no training: nothing to vary
            for seed in seeds:
                small, seconds = compress(bench, SETTINGS[setting], method, seed, args.epochs, args.lr)
                new = rows_for("table1", setting, method, seed, bench.score(small), n_params(small), dense, seconds,
                               args)
                rows += new
                _say(f"{setting} {method} seed {seed}: target {_wer(new, bench.target):.2%}, "
                     f"others {_wer(new, 'others'):.2%} ({seconds:.0f} s)")
    return rows


def figure2(bench: Bench, args: argparse.Namespace) -> list[dict[str, Any]]:
    import adaptwin
    from adaptwin.registry import get_architecture

    base = SETTINGS[args.setting]
    if base.get("components") != ("encoder",):
        raise ValueError(f"figure2 compresses encoder layers; --setting must be an encoder setting, got {args.setting}")
    plan = adaptwin.plan(bench.dense, adaptwin.CompressionConfig(**base))
    label = "" if args.setting == "encoder50" else f"{args.setting}:"  # encoder50 keeps its historical keys
    ranks = {}
    for row in plan.rows:
        prefix = "attention" if row["kind"] == "attention" else "ffn"
        ranks.setdefault(f"{prefix}_rank", row["rank"])
        ranks.setdefault(f"{prefix}_lora_rank", row["lora_rank"])
    layers = [p for p, c in get_architecture(plan.architecture).layer_paths(bench.dense) if c == "encoder"]
    dense = n_params(bench.dense)
    rows = rows_for("figure2", f"{label}layers0", "dense", 0, bench.score(bench.dense), dense, dense, 0.0, args)
    setting = {"components": ("encoder",), **ranks}
    for k in range(1, len(layers) + 1):
        keep = {f"{p}.*": {"attention_rank": None, "ffn_rank": None} for p in layers[k:]}
        for seed in args.seeds:
            small, seconds = compress(bench, setting, args.figure_method, seed, args.epochs, args.lr, overrides=keep)
            new = rows_for("figure2", f"{label}layers{k}", args.figure_method, seed, bench.score(small),
                           n_params(small), dense, seconds, args)
            rows += new
            _say(f"encoder layers 0..{k - 1} compressed, seed {seed}: target {_wer(new, bench.target):.2%}, "
                 f"others {_wer(new, 'others'):.2%}")
    return rows


def table3(bench: Bench, args: argparse.Namespace) -> list[dict[str, Any]]:
    dense = n_params(bench.dense)
    rows = rows_for("table3", "dense", "dense", 0, bench.score(bench.dense), dense, dense, 0.0, args)
    for mode in MODES:
        for seed in args.seeds:
            small, seconds = compress(bench, SETTINGS[args.setting], "svd+ft", seed, args.epochs, args.lr, mode=mode)
            new = rows_for("table3", args.setting, mode, seed, bench.score(small), n_params(small), dense, seconds,
                           args)
            rows += new
            _say(f"mode {mode} seed {seed}: target {_wer(new, bench.target):.2%}, others {_wer(new, 'others'):.2%}")
    return rows


# ------------------------------------------------------------------------------------------ reporting

def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _wer(rows: Sequence[dict[str, Any]], speaker: str) -> float:
    return next(r["wer"] for r in rows if r["speaker"] == speaker)


def summarise(rows: Sequence[dict[str, Any]], target: str) -> list[dict[str, Any]]:
    """One line per (setting, method): params and WER mean ± sd over seeds for the target, others, each."""
    groups: dict[tuple[str, str], dict[str, list[float]]] = {}
    meta: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        key = (r["setting"], r["method"])
        groups.setdefault(key, {}).setdefault(r["speaker"], []).append(float(r["wer"]))
        meta.setdefault(key, {"params": r["params"], "params_dense": r["params_dense"], "seconds": []})
        if r["speaker"] == target:
            meta[key]["seconds"].append(float(r["compress_seconds"]))
    out = []
    for key, by in groups.items():
        stats = {s: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for s, v in by.items()}
        out.append({"setting": key[0], "method": key[1], **meta[key], "wer": stats})
    return out


def print_summary(summary: list[dict[str, Any]], target: str) -> str:
    speakers = sorted({s for g in summary for s in g["wer"]} - {target, "others"})
    dense = next((g for g in summary if g["method"] == "dense"), None)
    header = ["setting", "method", "params", "seeds", f"{target} WER %", "Δ", "others WER %", "Δ", *speakers]
    body = []
    for g in summary:
        t, o = g["wer"][target], g["wer"]["others"]
        dt = (t[0] - dense["wer"][target][0]) * 100 if dense else float("nan")
        do = (o[0] - dense["wer"]["others"][0]) * 100 if dense else float("nan")
        body.append([g["setting"], g["method"], f"{g['params']:,}", t[2], f"{t[0] * 100:.2f} ± {t[1] * 100:.2f}",
                     f"{dt:+.2f}", f"{o[0] * 100:.2f} ± {o[1] * 100:.2f}", f"{do:+.2f}",
                     *[f"{g['wer'][s][0] * 100:.2f}" for s in speakers]])
    text = format_table(header, body)
    print(text)
    return text


def plot(summary: list[dict[str, Any]], target: str, out: Path, name: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _say("matplotlib is not installed (pip install -e '.[bench]'): no PNG")
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(summary) + 2), 4))
    labels = [f"{g['setting']}\n{g['method']}" for g in summary]
    x = np.arange(len(summary))
    for off, who in ((-0.2, target), (0.2, "others")):
        m = [g["wer"][who][0] * 100 for g in summary]
        sd = [g["wer"][who][1] * 100 for g in summary]
        ax.bar(x + off, m, 0.4, yerr=sd, capsize=3, label=who)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("WER %")
    ax.set_title(f"digit recogniser: {name}")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, out)


def plot_layers(summary: list[dict[str, Any]], target: str, out: Path, name: str) -> Path | None:
    """Figure 2 as lines: WER (mean ± sd over seeds) against the number of compressed encoder layers."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _say("matplotlib is not installed (pip install -e '.[bench]'): no PNG")
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for who, style in ((target, "o-"), ("others", "s--")):
        pts = sorted((int(g["setting"].rpartition("layers")[2]), g["wer"][who]) for g in summary)
        ax.errorbar([k for k, _ in pts], [w[0] * 100 for _, w in pts], yerr=[w[1] * 100 for _, w in pts],
                    fmt=style, capsize=3, label=who)
    ax.set_xlabel("encoder layers compressed (0 = dense)")
    ax.set_ylabel("WER %")
    ax.set_title(f"digit recogniser: {name} ({summary[-1]['method']})")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", choices=("table1", "figure2", "table3", "all"))
    parser.add_argument("--model", default="results/digits/model")
    parser.add_argument("--sets", default="results/digits/sets")
    parser.add_argument("--target", default="jackson")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated fine-tuning seeds")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=16, help="calibration utterances per batch")
    parser.add_argument("--settings", default="encoder50,whole45", help=f"table1: subset of {','.join(SETTINGS)}")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"table1: subset of {','.join(METHODS)}")
    parser.add_argument("--figure-method", default="svd+ft", choices=METHODS)
    parser.add_argument("--setting", default="encoder50", choices=sorted(SETTINGS),
                        help="figure2 (ranks of this plan, an encoder setting) and table3: the compression setting")
    parser.add_argument("--limit", type=int, default=None, help="test utterances per speaker (smoke runs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.settings = [s for s in args.settings.split(",") if s]
    args.methods = [m for m in args.methods.split(",") if m]
    bad = sorted(set(args.settings) - set(SETTINGS)) + sorted(set(args.methods) - set(METHODS))
    if bad or not args.seeds:
        parser.error(f"unknown settings/methods {bad} (allowed {list(SETTINGS)}, {list(METHODS)}) or no seeds")
    require_files(args.model, args.sets)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bench = Bench(args.model, args.sets, args.target, args.batch, args.limit)
    out_dir = Path(args.out_dir)
    todo = ("table1", "figure2", "table3") if args.experiment == "all" else (args.experiment,)
    for name in todo:
        rows = {"table1": table1, "figure2": figure2, "table3": table3}[name](bench, args)
        csv = write_rows(out_dir / f"digits_{name}.csv", rows, fields=FIELDS, key=KEY)
        summary = summarise(rows, args.target)
        print(f"\n{name}: WER on held-out takes 40-49 ({len(bench.test)} utterances), calibration "
              f"{len(bench.calib)} {args.target} utterances (takes 0-29), {args.epochs} epochs, lr {args.lr}, "
              f"seeds {args.seeds}")
        print_summary(summary, args.target)
        draw = plot_layers if name == "figure2" else plot
        png = draw(summary, args.target, out_dir / f"digits_{name}.png", name)
        print(f"wrote {csv}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
