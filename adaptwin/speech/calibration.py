"""Calibration batches for layer-wise fine-tuning of speech models, from a speech set (`load_dataset`).

    utts = load_dataset("jackson.jsonl")
    batches = calibration_batches(model, feature_extractor, tokenizer, utts, batch_size=16)
    small = adaptwin.compress(model, CompressionConfig(ratio=0.5), calibration=batches, finetune=FinetuneConfig())

Fine-tuning (the paper's Eq. 9) trains every compressed layer to reproduce the original layer's outputs on
these batches, so what matters is that they make the model run as it runs in use:

- a sequence-to-sequence model (Whisper: ``input_features`` in, ``generate`` out) gets each clip's features
  and its transcript, teacher-forced, as decoder inputs (the decoder start token, then the transcript's label
  ids without the final end token, padded; ``decoder_attention_mask`` marks the real positions), so the
  decoder's layers see the target speaker's words too;
- an audio encoder (wav2vec2 / HuBERT, ``input_values`` in, with or without a CTC head) gets the raw audio,
  padded, with ``attention_mask`` where the feature extractor gives one; transcripts are not needed. A model
  whose feature extractor gives no mask (wav2vec2-base: GroupNorm over time in its feature encoder, so padding
  changes every frame) never sees padding: a batch then holds consecutive clips of one length only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from adaptwin.speech.audio import load_audio

__all__ = ["calibration_batches", "check_clip_lengths", "check_decoder_length", "decoder_tokens", "equal_length_runs",
           "min_audio_samples", "speech_input", "takes_padding_mask", "transcript_ids"]


def speech_input(model) -> str | None:
    """``"input_features"`` (sequence-to-sequence, Whisper), ``"input_values"`` (audio encoder) or None (not
    a speech model)."""
    name = getattr(model, "main_input_name", None)
    if name == "input_features" and hasattr(model, "generate"):
        return name
    return name if name == "input_values" else None


def min_audio_samples(model) -> int:
    """The fewest samples an audio encoder turns into one frame (its convolutions' span: 400 for wav2vec2), or
    1 for a model without a frame count (Whisper pads every clip to its window)."""
    import torch

    lengths = getattr(model, "_get_feat_extract_output_lengths", None)
    if lengths is None:
        return 1
    lo, hi = 1, 1
    while int(lengths(torch.tensor(hi))) < 1:  # double, then bisect: the frame count grows with the samples
        lo, hi = hi + 1, hi * 2
        if hi > 1 << 30:
            return 1
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if int(lengths(torch.tensor(mid))) < 1 else (lo, mid)
    return lo


def check_clip_lengths(model, clips: Sequence, utterances: Sequence, rate: int) -> None:
    """Refuse a clip too short for one frame of ``model`` (its convolution would fail), naming it."""
    need = min_audio_samples(model)
    for clip, u in zip(clips, utterances):
        if len(clip) < need:
            raise ValueError(f"{u.audio}: {len(clip)} samples ({1000 * len(clip) / rate:.1f} ms at {rate} Hz) is "
                             f"shorter than {type(model).__name__}'s first frame, {need} samples "
                             f"({1000 * need / rate:.1f} ms); leave such clips out")


def check_decoder_length(model, tokens: int, utterance) -> None:
    """Refuse a transcript longer (in decoder tokens, start or end token included) than the decoder's positions,
    naming its clip: past them the position embedding fails with an IndexError."""
    limit = getattr(model.config, "max_target_positions", None)
    if isinstance(limit, int) and tokens > limit:
        raise ValueError(f"{utterance.audio}: its transcript is {tokens} decoder tokens, more than "
                         f"{type(model).__name__}'s {limit} (max_target_positions); shorten it or leave it out")


def takes_padding_mask(feature_extractor) -> bool:
    """Whether the feature extractor gives an ``attention_mask`` for padded raw audio (False for wav2vec2-base
    and other GroupNorm feature encoders, which must not see padding at all)."""
    return bool(getattr(feature_extractor, "return_attention_mask", True))


def equal_length_runs(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Consecutive indices grouped into runs of one length, at most ``batch_size`` long."""
    runs: list[list[int]] = []
    for i, n in enumerate(lengths):
        if runs and len(runs[-1]) < batch_size and lengths[runs[-1][0]] == n:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def decoder_tokens(model) -> tuple[int | None, int]:
    """``(decoder start token id or None, end token id)`` of a sequence-to-sequence model, from its generation
    config, else its config; a model without one end token id is refused."""
    gc = getattr(model, "generation_config", None)
    ids = []
    for name in ("decoder_start_token_id", "eos_token_id"):
        value = getattr(gc, name, None)
        ids.append(value if isinstance(value, int) else getattr(model.config, name, None))
    start, eos = ids
    if not isinstance(eos, int):
        raise ValueError(f"{type(model).__name__} has no single end token id (eos_token_id) to end the labels with")
    return (start if isinstance(start, int) else None), eos


def transcript_ids(tokenizer, text: str, eos_id: int, start_id: int | None) -> list[int]:
    """Label ids of one transcript: the tokenizer's ids (prefix tokens kept, a leading decoder start token
    dropped since the model prepends it when shifting the labels right), ending in ``eos_id``."""
    ids = list(tokenizer(text)["input_ids"])
    if ids and start_id is not None and ids[0] == start_id:
        ids = ids[1:]
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in ids:
        raise ValueError(f"transcript {text!r} has words the tokenizer does not know (mapped to "
                         f"{tokenizer.unk_token!r}); the adapted model could only learn to say {tokenizer.unk_token!r}")
    if not ids or ids[-1] != eos_id:
        ids.append(eos_id)
    return ids


def calibration_batches(model, feature_extractor, tokenizer, utterances: Sequence, batch_size: int = 16
                        ) -> list[dict[str, Any]]:
    """Batches of ``batch_size`` utterances, in the given order, as ``model``'s forward takes them (see the
    module docstring); ``tokenizer`` is only needed for sequence-to-sequence models."""
    import torch

    kind = speech_input(model)
    if kind is None:
        raise ValueError(f"{type(model).__name__} takes {getattr(model, 'main_input_name', '?')}, not audio: "
                         "speech calibration needs a model whose generate() takes input_features (Whisper) or an "
                         "audio encoder that takes input_values (wav2vec2, HuBERT)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    if not utterances:
        raise ValueError("no calibration utterances")
    rate = int(feature_extractor.sampling_rate)
    param = next(model.parameters())
    if kind == "input_features":
        if tokenizer is None:
            raise ValueError(f"{type(model).__name__} needs its tokenizer: the transcripts are its decoder inputs")
        start, eos = decoder_tokens(model)
        if start is None:
            raise ValueError(f"{type(model).__name__} has no decoder start token id (decoder_start_token_id) to "
                             "teacher-force the transcripts from")
        pad = getattr(model.config, "pad_token_id", None)
        pad = pad if isinstance(pad, int) else eos
    batches = []
    if kind == "input_values":
        clips = [load_audio(u.audio, rate) for u in utterances]
        check_clip_lengths(model, clips, utterances, rate)
        runs = ([list(range(i, min(i + batch_size, len(clips)))) for i in range(0, len(clips), batch_size)]
                if takes_padding_mask(feature_extractor) else equal_length_runs([len(c) for c in clips], batch_size))
        for run in runs:
            feats = feature_extractor([clips[i] for i in run], sampling_rate=rate, return_tensors="pt", padding=True)
            batch = {"input_values": feats["input_values"].to(device=param.device, dtype=param.dtype)}
            if feats.get("attention_mask") is not None:
                batch["attention_mask"] = feats["attention_mask"].to(param.device)
            batches.append(batch)
        return batches
    window = getattr(feature_extractor, "n_samples", None)  # Whisper: chunk_length * sampling_rate
    long = 0
    for first in range(0, len(utterances), batch_size):
        chunk = utterances[first:first + batch_size]
        clips = [load_audio(u.audio, rate) for u in chunk]
        long += sum(1 for c in clips if isinstance(window, int) and len(c) > window)
        feats = feature_extractor(clips, sampling_rate=rate, return_tensors="pt")["input_features"]
        rows = [[start, *transcript_ids(tokenizer, u.text, eos, start)[:-1]] for u in chunk]  # labels shifted right
        for u, r in zip(chunk, rows):
            check_decoder_length(model, len(r), u)
        width = max(len(r) for r in rows)
        dec = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            dec[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        batches.append({"input_features": feats.to(device=param.device, dtype=param.dtype),
                        "decoder_input_ids": dec.to(param.device), "decoder_attention_mask": mask.to(param.device)})
    if long:
        import warnings

        warnings.warn(f"{long} of {len(utterances)} calibration clips are longer than the feature extractor's "
                      f"{window / rate:g} s window: their audio is cut there while their whole transcript is "
                      "teacher-forced", stacklevel=2)
    return batches
