"""The digit recogniser side by side: word error rate, stored size and transcription speed of the dense
model, its peers and AdaPTwin, in one run.

    python -m benchmarks.digits.side_by_side [--model results/digits/model] [--sets results/digits/sets]
        [--target jackson] [--ratio 0.5] [--providers dense,dense_int8,pqm_nf4,adaptwin,adaptwin_nf4,adaptwin_int8]
        [--dtypes fp32,bf16] [--batch 1] [--timed 100] [--repeats 3] [--threads 2] [--limit N]
        [--out results/digits_side_by_side.csv]

Providers (every one built from the same trained recogniser, `benchmarks.digits.train`):

* ``dense``: the recogniser as trained.
* ``dense_int8``: the peer every PyTorch user has: every ``nn.Linear`` (the output head included) as torch's
  dynamically quantised int8 linear (`benchmarks.common.int8_dynamic`); float32 only.
* ``pqm_nf4``: PQM (arXiv 2309.09136) before any adaptation: every attention / FFN linear an NF4 base (blocks
  of 64) plus a rank-4 LoRA whose B is zero, both through ``torch.ops.adaptwin.rank_linear``
  (`adaptwin.compressors.pqm.quantize`): weight-only NF4 of the unfactored matrices.
* ``adaptwin``: ``CompressionConfig(ratio=--ratio)`` with the activation-whitened initialisation calibrated
  on the target speaker's calibration utterances (``{target}_calib.jsonl``), no fine-tuning unless
  ``--epochs``, activations fused (`adaptwin.fuse_activations`).
* ``adaptwin_nf4`` / ``adaptwin_int8``: the same factors stored NF4 (double quantisation) / int8 per row
  (`benchmarks.quant_crossover.derive`), activations fused likewise: decoded in registers by the op's
  kernels when decoding, decoded whole once per call for the encoder's frames.

Every provider runs in every ``--dtypes`` entry (``.to(dtype)``; quantised codes stay as they are), except
``dense_int8`` (float32 activations only); ratios compare like with like, each against the dense model in
its own dtype.

Columns: WER over all test utterances (takes 40-49, every speaker; the basic normaliser) for the target
speaker, the others pooled and everyone, with a 95 % bootstrap interval for everyone; MB stored
(`benchmarks.common.stored_bytes`); and speed: ``model.generate`` on precomputed features of ``--timed``
test utterances (evenly spread over the set) in batches of ``--batch``, the providers interleaved,
``--repeats`` rounds, median: milliseconds per utterance, the real-time factor (seconds of compute per
second of audio) and the ratio to dense. Feature extraction and audio loading are left out of the timing
(the same for every provider).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    OtherLoad,
    format_table,
    int8_dynamic,
    now_utc,
    pick,
    runs_in,
    stored_bytes,
    time_interleaved,
    versions,
    write_rows,
)

BENCHMARK = "digits_side_by_side"
PROVIDERS = ("dense", "dense_int8", "pqm_nf4", "adaptwin", "adaptwin_nf4", "adaptwin_int8")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FIELDS = ("benchmark", "provider", "dtype", "speaker", "wer", "ci_low", "ci_high", "errors", "words", "weight_mb",
          "ms_per_utterance", "real_time_factor", "time_ratio", "timed_utterances", "batch", "repeats", "ratio",
          "epochs", "target", "limit", "other_load", "threads", "torch", "transformers", "adaptwin", "timestamp")
KEY = ("benchmark", "provider", "dtype", "speaker", "ratio", "epochs", "target", "batch", "limit")


def build(bench: Any, providers: list[str], ratio: float, epochs: int, seed: int = 0) -> dict[str, torch.nn.Module]:
    """The float32 models of ``providers`` (see the module docstring), in eval mode."""
    import adaptwin
    from adaptwin.compressors.pqm import quantize
    from benchmarks.quant_crossover import derive

    models: dict[str, torch.nn.Module] = {"dense": bench.dense.eval()}
    if "dense_int8" in providers:
        models["dense_int8"] = int8_dynamic(bench.dense).eval()
    if "pqm_nf4" in providers:
        models["pqm_nf4"] = quantize(copy.deepcopy(bench.dense), 4, seed=seed, inplace=True).eval()
    if any(p.startswith("adaptwin") for p in providers):
        ft = adaptwin.FinetuneConfig(init="whiten", epochs=epochs, seed=seed, progress=False)
        small = adaptwin.compress(bench.dense, adaptwin.CompressionConfig(ratio=ratio),
                                  calibration=bench.calibration(seed), finetune=ft).eval()
        for name, fmt in (("adaptwin_nf4", "nf4"), ("adaptwin_int8", "int8")):
            if name in providers:
                models[name] = derive(small, fmt).eval()
                adaptwin.fuse_activations(models[name])
        adaptwin.fuse_activations(small)
        models["adaptwin"] = small
    return {p: models[p] for p in providers}


def timing_features(bench: Any, count: int, batch: int) -> tuple[list[torch.Tensor], float]:
    """Feature batches of ``count`` test utterances spread evenly over the set, and their audio seconds."""
    from adaptwin.speech.audio import load_audio

    step = max(1, len(bench.test) // count)
    chosen = bench.test[::step][:count]
    rate = bench.fe.sampling_rate
    clips = [load_audio(u.audio, rate) for u in chosen]
    feats = [bench.fe(clips[i:i + batch], sampling_rate=rate, return_tensors="pt")["input_features"]
             for i in range(0, len(clips), batch)]
    return feats, sum(len(c) for c in clips) / rate


def wer_rows(result: Any, target: str) -> dict[str, dict[str, Any]]:
    """``{target, "others", "all": {wer, errors, words, ci_low, ci_high}}`` of one `EvalResult`."""
    report = result.report
    groups = {target: [target], "others": [s for s in report.per_speaker if s != target]}
    out = {}
    for name, speakers in groups.items():
        rows = [report.per_speaker[s] for s in speakers if s in report.per_speaker]
        words = sum(r["reference_words"] for r in rows)
        errors = sum(r["substitutions"] + r["deletions"] + r["insertions"] for r in rows)
        out[name] = {"wer": errors / words if words else None, "errors": errors, "words": words}
    errors = report.substitutions + report.deletions + report.insertions
    out["all"] = {"wer": report.wer, "errors": errors, "words": report.reference_words, "ci_low": report.ci_low,
                  "ci_high": report.ci_high}
    return out


def run(args: argparse.Namespace, providers: list[str], dtypes: list[str]) -> list[dict[str, Any]]:
    from adaptwin.speech.evaluate import evaluate, generate_kwargs
    from adaptwin.speech.wer import BasicNormalizer
    from benchmarks.digits.paper import Bench, require_files

    require_files(args.model, args.sets)
    bench = Bench(args.model, args.sets, args.target, 16, args.limit)
    models = build(bench, providers, args.ratio, args.epochs, args.seed)
    feats, audio_seconds = timing_features(bench, args.timed, args.batch)
    kwargs = generate_kwargs(bench.dense)
    common = {"benchmark": BENCHMARK, "ratio": args.ratio, "epochs": args.epochs, "target": args.target,
              "batch": args.batch, "repeats": args.repeats, "limit": args.limit or "", "threads": args.threads,
              "timed_utterances": sum(len(f) for f in feats), **versions(), "timestamp": now_utc()}
    rows = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        here = [p for p in providers if runs_in(p, dname)]
        typed = {p: models[p] if dname == "fp32" else copy.deepcopy(models[p]).to(dtype) for p in here}
        wers = {}
        for p in here:
            start = time.perf_counter()
            result = evaluate(typed[p], bench.fe, bench.tok, bench.test, batch_size=args.batch,
                              normalizer=BasicNormalizer())
            wers[p] = wer_rows(result, args.target)
            print(f"{p:>13} {dname}: WER {100 * result.report.wer:.2f} % ({time.perf_counter() - start:.0f} s)",
                  file=sys.stderr, flush=True)
        typed_feats = [f.to(dtype) for f in feats]

        def transcribe(model: torch.nn.Module, batches: list[torch.Tensor] = typed_feats) -> None:
            with torch.inference_mode():
                for f in batches:
                    model.generate(input_features=f, **kwargs)

        load = OtherLoad().start()
        timings = time_interleaved({p: (lambda m=typed[p]: transcribe(m)) for p in here}, repeats=args.repeats,
                                   warmup=1)
        other = load.stop()
        n = common["timed_utterances"]
        for p in here:
            seconds = timings[p].p50 / 1e3
            speed = {"weight_mb": stored_bytes(typed[p]) / 1e6, "ms_per_utterance": 1e3 * seconds / n,
                     "real_time_factor": seconds / audio_seconds,
                     "time_ratio": timings[p].p50 / timings["dense"].p50, "other_load": other}
            for speaker, w in wers[p].items():
                rows.append({**common, "provider": p, "dtype": dname, "speaker": speaker, **w, **speed})
    return rows


def report(rows: list[dict[str, Any]], target: str) -> str:
    def pct(v: Any) -> str:
        return "" if v in (None, "") else f"{100 * float(v):.2f}"

    table = []
    for r in rows:
        if r["speaker"] != "all":
            continue
        mine = {o["speaker"]: o for o in rows if o["provider"] == r["provider"] and o["dtype"] == r["dtype"]}
        table.append([r["provider"], r["dtype"], pct(mine[target]["wer"]), pct(mine["others"]["wer"]), pct(r["wer"]),
                      f"{pct(r['ci_low'])}-{pct(r['ci_high'])}", f"{float(r['weight_mb']):.1f}",
                      f"{float(r['ms_per_utterance']):.1f}", f"{float(r['real_time_factor']):.4f}",
                      f"{float(r['time_ratio']):.3f}x"])
    text = format_table(["provider", "dtype", f"{target} WER %", "others WER %", "all WER %", "95 % CI", "MB",
                         "ms/utt", "RTF", "time/dense"], table)
    print(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="results/digits/model")
    ap.add_argument("--sets", default="results/digits/sets")
    ap.add_argument("--target", default="jackson", help="the speaker whose calibration utterances fit the factors")
    ap.add_argument("--ratio", type=float, default=0.5, help="AdaPTwin's share of attention + FFN parameters removed")
    ap.add_argument("--epochs", type=int, default=0, help="layer-wise fine-tuning epochs (0: whitened init only)")
    ap.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma-separated, from {PROVIDERS}")
    ap.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated, from {tuple(DTYPES)}")
    ap.add_argument("--batch", type=int, default=1, help="utterances per generate call (WER and timing)")
    ap.add_argument("--timed", type=int, default=100, help="test utterances in each timed round")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per provider (median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="test utterances per speaker (smoke runs)")
    ap.add_argument("--out", default="results/digits_side_by_side.csv")
    args = ap.parse_args(argv)
    providers = pick(ap, args.providers, PROVIDERS, "providers")
    dtypes = pick(ap, args.dtypes, DTYPES, "dtypes")
    if "dense" not in providers:
        ap.error("the dense provider is the baseline of every ratio; keep it in --providers")
    if not 0 < args.ratio < 1:
        ap.error(f"--ratio must lie strictly between 0 and 1, got {args.ratio}")
    if min(args.batch, args.timed, args.repeats, args.threads) < 1 or args.epochs < 0 or (
            args.limit is not None and args.limit < 1):
        ap.error("--batch, --timed, --repeats, --threads and --limit must be >= 1, --epochs >= 0")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        rows = run(args, providers, dtypes)
    finally:
        torch.set_num_threads(threads)
    report(rows, args.target)
    path = write_rows(Path(args.out), rows, fields=FIELDS, key=KEY)
    print(f"\nwrote {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
