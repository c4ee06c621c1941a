"""Transcribe a test set with a speech model and score it: a sequence-to-sequence one (Whisper) through
``generate``, or a CTC one (wav2vec2 / HuBERT ``...ForCTC``) by greedy CTC decoding.

    result = evaluate(model, feature_extractor, tokenizer, load_dataset("dev-clean"), batch_size=8)
    result.report.wer, result.utterances[0]["hypothesis"]

Decoding is greedy (one beam, no sampling), so the same model and data always give the same words.
The feature extractor pads (and truncates) every clip to its own window (Whisper: ``chunk_length`` s);
clips longer than that window are counted in the result, since their tails are never heard.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from adaptwin.speech.audio import load_audio
from adaptwin.speech.calibration import check_clip_lengths, takes_padding_mask
from adaptwin.speech.datasets import Utterance
from adaptwin.speech.wer import TextNormalizer, WERReport, utterance_errors, wer_report

__all__ = ["EvalResult", "evaluate", "generate_kwargs", "is_ctc", "transcribe"]


def generate_kwargs(model, max_new_tokens: int | None = None) -> dict[str, Any]:
    """Greedy decoding settings; English transcription when the generation config knows ``<|en|>``."""
    kwargs: dict[str, Any] = {"do_sample": False, "num_beams": 1}
    if max_new_tokens is not None:
        kwargs["max_new_tokens"] = int(max_new_tokens)
    gc = getattr(model, "generation_config", None)
    lang_to_id = getattr(gc, "lang_to_id", None) or {}
    if "<|en|>" in lang_to_id:  # a multilingual Whisper would otherwise guess the language per clip
        kwargs.update(language="en", task="transcribe")
    pad, eos = getattr(gc, "pad_token_id", None), getattr(gc, "eos_token_id", None)
    if isinstance(pad, int) and pad != eos and not isinstance(eos, list | tuple):
        # Real Whisper pads with its end token. Where a model has a separate pad token, emitting it is never a
        # word, and Whisper's generate() (transformers 5.23) strips as many tokens as there are pads when the
        # output ends in one: a clip decoded to pads alone raises IndexError, mixed ones lose real words.
        kwargs["suppress_tokens"] = sorted({*(getattr(gc, "suppress_tokens", None) or []), pad})
    return kwargs


def transcribe(model, feature_extractor, tokenizer, utterances: Sequence[Utterance], batch_size: int = 8,
               max_new_tokens: int | None = None, progress: Callable[[int, int], None] | None = None) -> list[str]:
    """The model's text for each utterance, in order, from batched ``model.generate(input_features=...)``.

    ``progress(done, total)`` is called after each batch.
    """
    return _transcribe(model, feature_extractor, tokenizer, utterances, batch_size, max_new_tokens, progress)[0]


def _transcribe(model, feature_extractor, tokenizer, utterances, batch_size, max_new_tokens, progress):
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    rate = int(feature_extractor.sampling_rate)
    window = getattr(feature_extractor, "n_samples", None)  # Whisper: chunk_length * sampling_rate
    param = next(model.parameters())
    ctc = is_ctc(model)
    kwargs = {} if ctc else generate_kwargs(model, max_new_tokens)
    model.eval()
    texts: list[str] = []
    seconds: list[float] = []
    for start in range(0, len(utterances), batch_size):
        batch = utterances[start:start + batch_size]
        clips = [load_audio(u.audio, rate) for u in batch]
        seconds += [len(c) / rate for c in clips]
        if ctc:
            check_clip_lengths(model, clips, batch, rate)
            texts += _ctc_batch(model, feature_extractor, tokenizer, clips, rate, param)
            if progress is not None:
                progress(len(texts), len(utterances))
            continue
        feats = feature_extractor(clips, sampling_rate=rate, return_tensors="pt")
        features = feats["input_features"].to(device=param.device, dtype=param.dtype)  # (B, mels, frames)
        with torch.inference_mode():
            out = model.generate(input_features=features, **kwargs)
        ids = out.sequences if hasattr(out, "sequences") else out  # (B, tokens)
        texts += [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
        if progress is not None:
            progress(len(texts), len(utterances))
    truncated = sum(1 for s in seconds if window is not None and s * rate > window)
    return texts, seconds, truncated


def is_ctc(model) -> bool:
    """A CTC recogniser (wav2vec2 / HuBERT ``...ForCTC``): raw audio in, one token distribution per frame out."""
    return getattr(model, "main_input_name", None) == "input_values" and type(model).__name__.endswith("ForCTC")


def _ctc_batch(model, feature_extractor, tokenizer, clips, rate: int, param) -> list[str]:
    """Greedy CTC decoding: the best token of each frame, repeats merged and blanks dropped by the tokenizer.
    Frames past a clip's own length (batch padding) are blanked before decoding. A model whose feature
    extractor gives no padding mask (GroupNorm feature encoders, wav2vec2-base) runs each length on its own:
    padding would change every frame of the shorter clips."""
    if not takes_padding_mask(feature_extractor) and len({len(c) for c in clips}) > 1:
        texts: list[str] = [""] * len(clips)
        for n in sorted({len(c) for c in clips}):
            same = [i for i, c in enumerate(clips) if len(c) == n]
            for i, t in zip(same, _ctc_batch(model, feature_extractor, tokenizer, [clips[i] for i in same], rate,
                                             param)):
                texts[i] = t
        return texts
    import torch

    feats = feature_extractor(clips, sampling_rate=rate, return_tensors="pt", padding=True)
    inputs = feats["input_values"].to(device=param.device, dtype=param.dtype)  # (B, samples)
    mask = feats.get("attention_mask")
    with torch.inference_mode():
        logits = model(input_values=inputs, **({"attention_mask": mask.to(param.device)} if mask is not None
                                                else {})).logits  # (B, frames, vocab)
    ids = logits.argmax(-1).cpu()
    lengths = model._get_feat_extract_output_lengths(torch.tensor([len(c) for c in clips]))
    frames = torch.arange(ids.shape[1])[None, :]
    blank = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.config.pad_token_id
    ids = ids.masked_fill(frames >= lengths[:, None], int(blank))
    return [t.strip() for t in tokenizer.batch_decode(ids)]


@dataclass
class EvalResult:
    """The WER report, one row per utterance, and how long transcription took."""

    report: WERReport
    utterances: list[dict[str, Any]] = field(default_factory=list)
    audio_seconds: float = 0.0
    transcribe_seconds: float = 0.0
    truncated: int = 0  # clips longer than the feature extractor's window (their tails were cut)

    def to_dict(self) -> dict[str, Any]:
        return {**self.report.to_dict(), "audio_seconds": self.audio_seconds,
                "transcribe_seconds": self.transcribe_seconds,
                "real_time_factor": self.transcribe_seconds / self.audio_seconds if self.audio_seconds else None,
                "truncated": self.truncated, "per_utterance": self.utterances}


def evaluate(model, feature_extractor, tokenizer, utterances: Sequence[Utterance], *, batch_size: int = 8,
             max_new_tokens: int | None = None, normalizer: TextNormalizer | None = None, resamples: int = 1000,
             seed: int = 0, progress: Callable[[int, int], None] | None = None) -> EvalResult:
    """Transcribe ``utterances`` greedily and score them (see `wer_report` for the interval)."""
    utterances = list(utterances)
    if not utterances:
        raise ValueError("no utterances to evaluate")
    norm = normalizer or (lambda s: " ".join(s.split()))
    if not any(norm(u.text) for u in utterances):  # found before transcribing, not after
        raise ValueError(f"every reference is empty after normalisation (e.g. {utterances[0].audio}: "
                         f"{utterances[0].text!r} -> ''): WER is undefined; try another normalizer")
    t0 = time.perf_counter()
    hyps, seconds, truncated = _transcribe(model, feature_extractor, tokenizer, utterances, batch_size,
                                           max_new_tokens, progress)
    elapsed = time.perf_counter() - t0
    errs = utterance_errors([u.text for u in utterances], hyps, normalizer)
    report = wer_report([u.text for u in utterances], hyps, [u.speaker for u in utterances], normalizer=normalizer,
                        resamples=resamples, seed=seed, errors=errs)
    rows = [{"id": u.id, "speaker": u.speaker, "audio": str(u.audio), "seconds": round(s, 3), "reference": u.text,
             "hypothesis": h, "normalised_reference": e.reference, "normalised_hypothesis": e.hypothesis,
             "substitutions": e.substitutions, "deletions": e.deletions, "insertions": e.insertions,
             "reference_words": e.words}
            for u, h, s, e in zip(utterances, hyps, seconds, errs)]
    return EvalResult(report, rows, float(sum(seconds)), elapsed, truncated)
