"""Train the benchmark recogniser: a Whisper-architecture model, from scratch, on spoken digit sequences.

    python -m benchmarks.digits.train --data ../shared/data/fsdd --out results/digits/model [--steps N] [--seed S]

Training draws fresh sequences every step (1-5 digits of one speaker, takes 0-39 of all five speakers; see
`benchmarks.digits.data`), so no two batches repeat; by default 4000 steps of 16 under bf16 autocast (23 min
alone on the 2-core CPU with 2 threads). The run is deterministic for a given seed and thread count on one
machine: one seeded generator drives the data, torch's seed the weights, and CPU kernels run with
``torch.use_deterministic_algorithms`` (another thread count sums in another order: another run). At the
end the model transcribes held-out sequences (takes 40-49, the same draws as make_sets' test.jsonl) and the
word error rate is printed per speaker.

The output folder is what ``adaptwin eval DIR --data test.jsonl`` and ``adaptwin compress`` read:
config.json + model.safetensors, generation_config.json, preprocessor_config.json (a WhisperFeatureExtractor
with a 6 s window) and a word-level tokenizer (the ten digit words and four specials), plus train_log.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.digits import atomic_dir
from benchmarks.digits.batches import CHUNK_SECONDS, Batches
from benchmarks.digits.data import (
    DIGIT_WORDS,
    EOT,
    PAD,
    SAMPLING_RATE,
    SOT,
    SPEAKERS,
    TEST_TAKES,
    UNK,
    VOCAB,
    ClipBank,
    scan_fsdd,
)

# A 20 ms hop (Whisper: 10 ms) halves the encoder's positions to 150 for a 6 s window: on the shared 2-core
# CPU a step of 32 utterances took ~12 s at 300 positions and ~4 s at 150 (d_model 256, 4+2 layers).
HOP_LENGTH = 320
N_FFT = 400
MAX_TOKENS = 1 + 5 + 1  # start + at most five digits + end


@dataclass(frozen=True)
class ModelSize:
    d_model: int
    heads: int
    encoder_layers: int
    decoder_layers: int
    ffn_mult: int = 4


SIZES = {
    # head_dim 64 as in every Whisper; 4 encoder layers give the compressors attention and FFN to work on.
    "base": ModelSize(d_model=256, heads=4, encoder_layers=4, decoder_layers=2),
    # For tests only: trains in seconds, recognises nothing.
    "tiny": ModelSize(d_model=64, heads=1, encoder_layers=1, decoder_layers=1, ffn_mult=2),
}


def build_tokenizer():
    """The word-level tokenizer: ``"seven three"`` <-> ``[11, 7]``; specials are skipped when decoding."""
    from tokenizers import Tokenizer, decoders
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel(dict(VOCAB), unk_token=UNK))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SOT, eos_token=EOT, pad_token=PAD, unk_token=UNK,
                                   model_max_length=MAX_TOKENS)


def build_feature_extractor():
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=80, sampling_rate=SAMPLING_RATE, hop_length=HOP_LENGTH,
                                   chunk_length=CHUNK_SECONDS, n_fft=N_FFT)


def build_model(size: ModelSize, source_positions: int, dropout: float = 0.0):
    """A randomly initialised WhisperForConditionalGeneration over the digit vocabulary, with its generation config."""
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    if size.d_model % size.heads:
        raise ValueError(f"d_model {size.d_model} is not a multiple of heads {size.heads}")
    config = WhisperConfig(
        vocab_size=len(VOCAB), num_mel_bins=80, d_model=size.d_model,
        encoder_layers=size.encoder_layers, decoder_layers=size.decoder_layers,
        encoder_attention_heads=size.heads, decoder_attention_heads=size.heads,
        encoder_ffn_dim=size.ffn_mult * size.d_model, decoder_ffn_dim=size.ffn_mult * size.d_model,
        max_source_positions=source_positions, max_target_positions=16,
        pad_token_id=VOCAB[PAD], bos_token_id=VOCAB[SOT], eos_token_id=VOCAB[EOT], decoder_start_token_id=VOCAB[SOT],
        # Whisper's defaults name ids of its 51k-token vocabulary; here they would index past the embedding.
        suppress_tokens=None, begin_suppress_tokens=None,
        dropout=dropout, attention_dropout=0.0, activation_dropout=0.0, tie_word_embeddings=True,
    )
    model = WhisperForConditionalGeneration(config)
    # Whisper's init (normal, std 0.02) leaves the stem's output at std 0.04 against 0.62 for the sinusoidal
    # positions added to it (measured on a batch of digit sequences), so at first the encoder hears mostly
    # where a frame is, not what is in it; a run so initialised sat at the unigram loss for 100+ steps.
    # He init for the two GELU convolutions brings the stem to std 0.67.
    with torch.no_grad():
        for conv in (model.model.encoder.conv1, model.model.encoder.conv2):
            torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            conv.bias.zero_()
    # No language, task or timestamp tokens: generate() then starts every transcript with <|startoftranscript|>
    # alone. No suppress_tokens: the trained model puts no mass on the specials, and an untrained or damaged
    # one should show its errors in the WER rather than have them masked.
    model.generation_config = GenerationConfig(
        decoder_start_token_id=VOCAB[SOT], bos_token_id=VOCAB[SOT], eos_token_id=VOCAB[EOT], pad_token_id=VOCAB[PAD],
        max_length=MAX_TOKENS, do_sample=False, num_beams=1,
    )
    return model


class WeightAverage:
    """Exponential moving average of ``params`` (Polyak averaging) from step ``start`` on: the first update
    copies the weights, each later one moves the average ``1 - decay`` of the way to them."""

    def __init__(self, params, decay: float, start: int):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must lie in (0, 1), got {decay}")
        self.params, self.decay, self.start = params, decay, start
        self.average = None

    def update(self, step: int) -> None:
        import torch

        if step < self.start:
            return
        with torch.no_grad():
            if self.average is None:
                self.average = [p.detach().clone() for p in self.params]
            else:
                torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - self.decay)

    def copy_to_params(self) -> None:
        """Overwrite the parameters with the average (no-op before ``start``)."""
        import torch

        if self.average is None:
            return
        with torch.no_grad():
            for p, a in zip(self.params, self.average):
                p.copy_(a)


ALIGN_WEIGHT = 0.5
# Training precisions: bf16 autocast took 0.30 s per step of 16 against 0.44 s in fp32 (2 threads, this CPU's
# AVX512-BF16), so the default 4000 bf16 steps cost about what 2800 fp32 steps did.
PRECISIONS = ("bf16", "fp32")


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to 5 % of it at ``steps``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def heldout_wer(model, feature_extractor, tokenizer, data: str | Path, per_speaker: int, seed: int,
                batch_size: int = 50) -> dict:
    """Greedy transcripts of the held-out sequences (make_sets' test draws, takes 40-49) and per-speaker WER."""
    import torch

    from adaptwin.speech.wer import wer_report
    from benchmarks.digits.make_sets import heldout_sequences

    clips = scan_fsdd(data)
    bank = ClipBank([c for c in clips if c.take in TEST_TAKES])
    seqs = [q for s in SPEAKERS for q in heldout_sequences(clips, s, per_speaker, seed, bank.durations)]
    hyps: list[str] = []
    model.eval()
    for start in range(0, len(seqs), batch_size):
        part = seqs[start:start + batch_size]
        feats = feature_extractor([bank.render(q) for q in part], sampling_rate=SAMPLING_RATE,
                                  return_tensors="pt")["input_features"]
        with torch.inference_mode():
            out = model.generate(input_features=feats)
        hyps += [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
    report = wer_report([q.text for q in seqs], hyps, [q.speaker for q in seqs], resamples=200, seed=seed)
    return {"wer": report.wer, "ci": list(report.ci), "words": report.reference_words,
            "per_speaker": {s: v["wer"] for s, v in report.per_speaker.items()},
            "examples": [{"reference": q.text, "hypothesis": h}
                         for q, h in list(zip(seqs, hyps))[:: max(1, len(seqs) // 8)]]}


def train(data: str | Path, out: str | Path, *, steps: int = 4000, seed: int = 0, batch_size: int = 16,
          lr: float = 1e-3, size: str = "base", threads: int = 2, eval_per_speaker: int = 100,
          log_every: int = 10, speakers: tuple[str, ...] = SPEAKERS, augment: bool = False,
          spec_augment: bool = False, dropout: float = 0.0, ema: float = 0.998, precision: str = "bf16") -> dict:
    """Train, evaluate on held-out takes, and write the model folder atomically; returns train_log.json's content.

    ``precision="bf16"`` runs forward and backward under CPU autocast (bf16 matmuls and convolutions, fp32
    weights, optimiser state and loss); ``"fp32"`` runs everything in fp32. The saved weights are fp32 either way.
    """
    import torch

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    unknown = sorted(set(speakers) - set(SPEAKERS))
    if unknown or not speakers:
        raise ValueError(f"speakers must be a non-empty subset of {list(SPEAKERS)}, got {list(speakers)}")
    if steps < 1 or batch_size < 1 or threads < 1 or eval_per_speaker < 0:
        raise ValueError(f"steps, batch_size and threads must be >= 1 and eval_per_speaker >= 0, got {steps}, "
                         f"{batch_size}, {threads}, {eval_per_speaker}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    if not 0.0 <= dropout < 1.0 or not 0.0 <= ema < 1.0:
        raise ValueError(f"dropout and ema must lie in [0, 1), got dropout {dropout} and ema {ema}")
    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _train(data, out, steps=steps, seed=seed, batch_size=batch_size, lr=lr, size=size, threads=threads,
                      eval_per_speaker=eval_per_speaker, log_every=log_every, speakers=tuple(speakers),
                      augment=augment, spec_augment=spec_augment, dropout=dropout, ema=ema,
                      precision=precision)
    finally:  # a caller (a test, a notebook) gets its own settings back
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])


def _train(data, out, *, steps, seed, batch_size, lr, size, threads, eval_per_speaker, log_every, speakers,
           augment, spec_augment, dropout, ema, precision) -> dict:
    import torch
    from transformers.models.whisper.modeling_whisper import shift_tokens_right

    from benchmarks.common import OtherLoad

    torch.manual_seed(seed)

    tokenizer = build_tokenizer()
    fe = build_feature_extractor()
    frames = fe.nb_max_frames
    if frames % 2:
        raise ValueError(f"the feature window gives {frames} frames; Whisper's stride-2 encoder needs an even count")
    model = build_model(SIZES[size], frames // 2, dropout)
    n_params = sum(p.numel() for p in model.parameters())
    clips = scan_fsdd(data)
    batches = Batches(clips, seed, fe, tokenizer, speakers, augment, spec_augment)
    print(f"model: {size} {asdict(SIZES[size])}, {n_params / 1e6:.2f} M parameters, {frames} input frames "
          f"({CHUNK_SECONDS} s, hop {HOP_LENGTH / SAMPLING_RATE * 1e3:.0f} ms); {steps} steps of {batch_size}, "
          f"{threads} threads, {precision}; speakers {', '.join(speakers)}", flush=True)

    # An auxiliary head on the encoder, trained beside the decoder and dropped at save time (the saved model is
    # a plain Whisper): it classifies every encoder position as silence or one of the ten digits, targets
    # that the synthesis knows for free. With the decoder's loss alone, and with a CTC head in its place,
    # three runs sat at the unigram loss (2.1) for 130+ steps: nothing told the encoder what a digit sounds
    # like until cross-attention had found where the digits are.
    align_head = torch.nn.Linear(model.config.d_model, len(DIGIT_WORDS) + 1)  # (d) -> silence + 10 digits
    params = list(model.named_parameters()) + [(f"align.{n}", p) for n, p in align_head.named_parameters()]
    decay = [p for n, p in params if p.ndim >= 2 and "embed_positions" not in n]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and "embed_positions" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-8)
    warmup = max(1, min(40, steps // 10))
    pad, start = model.config.pad_token_id, model.config.decoder_start_token_id
    averaged = WeightAverage(list(model.parameters()), ema, start=steps // 2) if ema else None
    load = OtherLoad().start()
    t0, cpu0 = time.perf_counter(), time.process_time()
    history = []
    model.train()
    running = None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        # Curriculum: the first tenth of the steps hear at most two digits, an easy start for the alignment.
        feats, labels, frames = batches.draw(batch_size, max_digits=2 if step < steps // 10 else 5)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            fwd = model(input_features=feats, decoder_input_ids=shift_tokens_right(labels, pad, start))
        # Both losses in fp32 (under autocast the logits are bf16); the decoder's is what labels= would compute.
        decoder_loss = torch.nn.functional.cross_entropy(fwd.logits.float().flatten(0, 1), labels.flatten())
        align = torch.nn.functional.cross_entropy(align_head(fwd.encoder_last_hidden_state.float()).flatten(0, 1),
                                                  frames.flatten())
        loss = decoder_loss + ALIGN_WEIGHT * align
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if averaged is not None:
            averaged.update(step)
        now = (decoder_loss.item(), align.item())  # decoder cross-entropy (the model's own loss), frame loss
        running = now if running is None else tuple(0.9 * r + 0.1 * x for r, x in zip(running, now))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            el = time.perf_counter() - t0
            history.append({"step": step + 1, "loss": round(running[0], 4), "frame_loss": round(running[1], 4),
                            "elapsed_s": round(el, 1)})
            print(f"step {step + 1:5d}/{steps}  loss {running[0]:.4f}  frames {running[1]:.4f}  "
                  f"lr {opt.param_groups[0]['lr']:.2e}  elapsed {el:7.1f} s  {(step + 1) / el:.3f} steps/s", flush=True)
    if averaged is not None:
        averaged.copy_to_params()
    train_s = time.perf_counter() - t0
    other = load.stop()
    own_cores = (time.process_time() - cpu0) / train_s
    print(f"trained {steps} steps in {train_s:.1f} s ({steps / train_s:.3f} steps/s); this process used "
          f"{own_cores:.2f} cores on average, other processes {other if other is None else round(other, 2)} cores",
          flush=True)

    log = {"size": size, "model": asdict(SIZES[size]), "parameters": n_params, "steps": steps, "seed": seed,
           "batch_size": batch_size, "lr": lr, "threads": threads, "speakers": list(speakers), "augment": augment,
           "spec_augment": spec_augment, "dropout": dropout, "ema": ema, "precision": precision,
           "train_seconds": round(train_s, 1),
           "steps_per_second": round(steps / train_s, 4), "own_cores": round(own_cores, 2),
           "other_load_cores": None if other is None else round(other, 2), "history": history,
           "torch": torch.__version__}
    if eval_per_speaker:
        t1 = time.perf_counter()
        log["heldout"] = heldout_wer(model, fe, tokenizer, data, eval_per_speaker, seed)
        log["heldout"]["eval_seconds"] = round(time.perf_counter() - t1, 1)
        h = log["heldout"]
        print(f"held-out WER (takes {TEST_TAKES[0]}-{TEST_TAKES[-1]}, {eval_per_speaker} sequences per speaker, "
              f"{h['words']} words): {100 * h['wer']:.2f} % [{100 * h['ci'][0]:.2f}, {100 * h['ci'][1]:.2f}]")
        for s, w in h["per_speaker"].items():
            print(f"  {s:>10}: {100 * w:.2f} %")
        for ex in h["examples"]:
            print(f"  ref: {ex['reference']:<35} hyp: {ex['hypothesis']}")

    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)  # config.json, generation_config.json, model.safetensors
        fe.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "train_log.json").write_text(json.dumps(log, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {Path(out).expanduser().resolve()}")
    return log


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.digits.train", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="the FSDD folder of {digit}_{speaker}_{take}.wav files")
    p.add_argument("--out", required=True, help="model folder to write (replaced atomically if it exists)")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    p.add_argument("--size", default="base", choices=sorted(SIZES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--augment", action="store_true",
                   help="speed (0.9-1.1) and gain (±6 dB) perturbation of every training sequence")
    p.add_argument("--spec-augment", action="store_true",
                   help="SpecAugment: two frequency (<= 10 bins) and two time (<= 20 frames) masks per sequence")
    p.add_argument("--precision", default="bf16", choices=PRECISIONS,
                   help="bf16: forward and backward under CPU autocast, fp32 master weights (default); fp32: all fp32")
    p.add_argument("--dropout", type=float, default=0.0, help="residual dropout in every layer while training")
    p.add_argument("--ema", type=float, default=0.998,
                   help="save the exponential moving average of the weights over the second half of training, "
                        "with this decay per step (default 0.998; 0: the last weights)")
    p.add_argument("--speakers", default=",".join(SPEAKERS),
                   help="comma-separated training speakers (default all five); leave one out to have an unseen "
                        "speaker for adaptation experiments (held-out WER is still reported for all five)")
    p.add_argument("--eval-per-speaker", type=int, default=100,
                   help="held-out sequences per speaker for the final WER (0: skip)")
    args = p.parse_args(argv)
    try:
        train(args.data, args.out, steps=args.steps, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
              size=args.size, threads=args.threads, eval_per_speaker=args.eval_per_speaker,
              speakers=tuple(s.strip() for s in args.speakers.split(",") if s.strip()), augment=args.augment,
              spec_augment=args.spec_augment, dropout=args.dropout, ema=args.ema,
              precision=args.precision)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
