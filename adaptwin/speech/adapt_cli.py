"""``adaptwin adapt``: PQM speaker adaptation of a speech model on a few utterances of one speaker.

    adaptwin adapt MODEL_DIR --data MANIFEST_OR_FOLDER --out DIR [--speaker NAME] [--lora-rank 1-4]
                   [--epochs N] [--lr LR] [--limit N] [--batch-size N] [--seed N] [--threads N] [--json]

MODEL_DIR is a dense Hugging Face folder (it is PQM-quantised first: every attention/FFN linear becomes an
NF4 base plus a rank-r LoRA) or an adaptwin save that already holds PQM modules (adapted further, e.g.
after multi-speaker LoRA pre-training). Only the LoRA factors train, end to end, with the model's own
loss: token cross-entropy of the transcript (labels = MODEL_DIR's tokenizer ids of the text, ending in
the end token). The result is an adaptwin save in DIR, with the tokenizer and feature extractor files.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

from adaptwin.sources import UsageError, check_out_dir, extra_files, note
from adaptwin.speech.calibration import check_decoder_length, decoder_tokens, transcript_ids
from adaptwin.speech.cli import _positive, load_speech_model, select

DEFAULT_EPOCHS = 10
DEFAULT_LR = 1e-3
DEFAULT_BATCH_SIZE = 8
DEFAULT_LORA_RANK = 4


def _lr(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return value


def _rank(text: str) -> int:
    from adaptwin.compressors.pqm import LORA_RANKS

    try:
        value = int(text)
    except ValueError:
        value = None
    if value not in LORA_RANKS:
        raise argparse.ArgumentTypeError(f"expected one of {list(LORA_RANKS)}, got {text!r}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``adapt`` sub-command to the ``adaptwin`` parser."""
    a = sub.add_parser("adapt", help="PQM speaker adaptation: NF4 base + LoRA trained on a few utterances",
                       description="Quantise a speech model's attention/FFN linears to NF4 with LoRA (PQM, "
                       "arXiv 2309.09136) and train only the LoRA factors on one speaker's utterances.")
    a.add_argument("model", metavar="MODEL_DIR", help="a dense Hugging Face speech model folder (PQM-quantised "
                   "first) or an adaptwin save with PQM modules, with its feature extractor and tokenizer files")
    a.add_argument("--data", required=True, metavar="PATH", help="adaptation utterances: a .jsonl manifest "
                   "({audio, text, speaker} per line) or any folder layout `adaptwin eval` reads")
    a.add_argument("--out", required=True, metavar="DIR", help="save directory for the adapted model (created; an "
                   "old adaptwin save there is replaced, any other non-empty folder is refused)")
    a.add_argument("--speaker", metavar="NAME", help="adapt on this speaker's utterances only")
    a.add_argument("--limit", type=_positive, metavar="N", help="use the first N utterances (after --speaker; PQM "
                   "adapts on 20-30)")
    a.add_argument("--holdout", type=_positive, metavar="N", help="hold out the N utterances after the adaptation "
                   "ones (after --speaker and --limit) and keep the epoch with the lowest loss on them (epoch 0 = not "
                   "adapted is a candidate)")
    a.add_argument("--lora-rank", type=_rank, metavar="R", help=f"LoRA rank 1-4 when MODEL_DIR is dense (default "
                   f"{DEFAULT_LORA_RANK}); a PQM save keeps its own")
    a.add_argument("--epochs", type=_positive, default=DEFAULT_EPOCHS, metavar="N",
                   help=f"passes over the utterances (default {DEFAULT_EPOCHS})")
    a.add_argument("--lr", type=_lr, default=DEFAULT_LR, metavar="LR", help=f"Adam learning rate (default "
                   f"{DEFAULT_LR:g})")
    a.add_argument("--batch-size", type=_positive, default=DEFAULT_BATCH_SIZE, metavar="N",
                   help=f"utterances per step (default {DEFAULT_BATCH_SIZE})")
    a.add_argument("--seed", type=int, default=0, help="seed of the LoRA initialisation and the batch order "
                   "(default 0)")
    a.add_argument("--threads", type=_positive, metavar="N", help="torch intra-op threads (default: torch's)")
    a.add_argument("--json", action="store_true", help="print one JSON object (last stdout line) instead of text")
    return a


def speech_batches(model, feature_extractor, tokenizer, utterances: Sequence, batch_size: int) -> list[dict]:
    """``[{"input_features": (B, mels, frames), "labels": (B, L) with -100 padding}, ...]`` in the given order."""
    import torch

    from adaptwin.speech.audio import load_audio

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    start, eos = decoder_tokens(model)
    rate = int(feature_extractor.sampling_rate)
    param = next(model.parameters())
    batches = []
    for first in range(0, len(utterances), batch_size):
        chunk = utterances[first:first + batch_size]
        clips = [load_audio(u.audio, rate) for u in chunk]
        feats = feature_extractor(clips, sampling_rate=rate, return_tensors="pt")["input_features"]
        ids = [transcript_ids(tokenizer, u.text, eos, start) for u in chunk]
        for u, i in zip(chunk, ids):
            check_decoder_length(model, len(i), u)
        labels = torch.full((len(ids), max(len(i) for i in ids)), -100, dtype=torch.long)  # (B, L)
        for row, i in enumerate(ids):
            labels[row, :len(i)] = torch.tensor(i)
        batches.append({"input_features": feats.to(device=param.device, dtype=param.dtype), "labels": labels})
    return batches


def cmd_adapt(args: argparse.Namespace) -> int:
    import time

    import torch
    from transformers.utils import logging as hf_logging

    import adaptwin
    from adaptwin.compressors.pqm import NF4LoRALinear, is_pqm, quantize
    from adaptwin.speech.datasets import load_dataset

    if not 0 <= args.seed < 2 ** 63:
        raise UsageError(f"--seed must be a whole number in [0, 2**63), got {args.seed}")
    pool = select(load_dataset(args.data), args.speaker, None, args.data)  # cheap checks first
    utterances = pool[:args.limit] if args.limit else pool
    held_out = []
    if args.holdout:
        held_out = pool[len(utterances):len(utterances) + args.holdout]
        if len(held_out) < args.holdout or not args.limit:
            raise UsageError(f"--holdout {args.holdout} needs --limit and {args.holdout} utterances after the "
                             f"first {args.limit or len(pool)}; {args.data} has {len(pool)}"
                             f"{f' of speaker {args.speaker}' if args.speaker else ''}")
    folder, out = Path(args.model).expanduser(), Path(args.out).expanduser()
    check_out_dir(out, folder)
    hf_logging.disable_progress_bar()
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        t0 = time.perf_counter()
        model, feature_extractor, tokenizer = load_speech_model(args.model)
        from adaptwin.speech.evaluate import is_ctc

        if is_ctc(model):
            raise UsageError(f"{type(model).__name__} in {args.model} is a CTC model: adapt trains "
                             "sequence-to-sequence recognisers (a model whose generate() takes input_features, "
                             "e.g. Whisper); `adaptwin eval` scores CTC models")
        if is_pqm(model):
            ranks = sorted({m.rank for m in model.modules() if isinstance(m, NF4LoRALinear)})
            if args.lora_rank is not None and ranks != [args.lora_rank]:
                raise UsageError(f"MODEL_DIR {args.model} is a PQM save with LoRA rank {ranks}; --lora-rank "
                                 f"{args.lora_rank} cannot change it (leave it out, or start from the dense model)")
            note(f"adapting the PQM save {args.model} (LoRA rank {ranks}) ...")
            others = sorted({e["compressor"] for e in model.adaptwin_record.modules.values()} - {"pqm"})
            if others:
                note(f"  only its PQM modules' LoRA factors train; the modules compressed with {', '.join(others)} "
                     "stay as they are")
        elif getattr(model, "adaptwin_record", None) is not None:
            raise UsageError(f"MODEL_DIR {args.model} is an adaptwin save without PQM modules (compressed with "
                             f"{sorted({e['compressor'] for e in model.adaptwin_record.modules.values()})}); adapt "
                             "a dense model folder or a PQM save")
        else:
            rank = args.lora_rank or DEFAULT_LORA_RANK
            note(f"PQM-quantising {type(model).__name__}: attention/FFN linears to NF4 + LoRA rank {rank} ...")
            model = quantize(model, rank, seed=args.seed, inplace=True)
        batches = speech_batches(model, feature_extractor, tokenizer, utterances, args.batch_size)
        t1 = time.perf_counter()
        note(f"adapting on {len(utterances)} utterances from {args.data} in {len(batches)} batches, "
             f"{args.epochs} epochs, lr {args.lr:g} ...")
        held = speech_batches(model, feature_extractor, tokenizer, held_out, args.batch_size) if held_out else None
        about = {"data": str(args.data), "speakers": sorted({u.speaker for u in utterances}),
                 "utterances": len(utterances), "held_out_utterances": len(held_out)}
        report = adaptwin.adapt(model, batches, epochs=args.epochs, lr=args.lr, seed=args.seed, eval_batches=held,
                                progress=lambda e, n, loss: note(f"  epoch {e}/{n}  loss {loss:.4f}"), about=about)
        t2 = time.perf_counter()
        adaptwin.save(model, out, extra_files=extra_files(folder))
        t3 = time.perf_counter()
    finally:  # main() may be called in-process (tests): leave the process as it was
        torch.set_num_threads(threads)
    speakers = sorted({u.speaker for u in utterances})
    data = {"model": str(args.model), "data": str(args.data), "out": str(out), "utterances": len(utterances),
            "speakers": speakers, **report.to_dict(),
            "timing_s": {"load": t1 - t0, "adapt": t2 - t1, "save": t3 - t2}}
    if args.json:
        print(json.dumps(data, allow_nan=False))
        return 0
    print(f"{args.model} adapted on {len(utterances)} utterances ({', '.join(speakers)}) -> {out}")
    print(f"loss {report.loss_before:.4f} -> {report.loss_after:.4f} (mean over the adaptation batches), "
          f"{report.steps} steps, {report.trainable_params:,} LoRA parameters trained")
    if report.best_epoch is not None:
        print(f"held-out loss by epoch ({len(held_out)} utterances): "
              f"{', '.join(f'{v:.4f}' for v in report.eval_losses)}; kept epoch {report.best_epoch} (0 = not adapted)")
    print(f"time: load {t1 - t0:.1f} s, adapt {t2 - t1:.1f} s, save {t3 - t2:.1f} s")
    return 0
