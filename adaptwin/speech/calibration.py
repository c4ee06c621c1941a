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
  padded, with ``attention_mask`` where the feature extractor gives one; transcripts are not needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from adaptwin.speech.audio import load_audio

__all__ = ["calibration_batches", "decoder_tokens", "speech_input", "transcript_ids"]


def speech_input(model) -> str | None:
    """``"input_features"`` (sequence-to-sequence, Whisper), ``"input_values"`` (audio encoder) or None (not
    a speech model)."""
    name = getattr(model, "main_input_name", None)
    if name == "input_features" and hasattr(model, "generate"):
        return name
    return name if name == "input_values" else None


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
    for first in range(0, len(utterances), batch_size):
        chunk = utterances[first:first + batch_size]
        clips = [load_audio(u.audio, rate) for u in chunk]
        if kind == "input_values":
            feats = feature_extractor(clips, sampling_rate=rate, return_tensors="pt", padding=True)
            batch = {"input_values": feats["input_values"].to(device=param.device, dtype=param.dtype)}
            if feats.get("attention_mask") is not None:
                batch["attention_mask"] = feats["attention_mask"].to(param.device)
            batches.append(batch)
            continue
        feats = feature_extractor(clips, sampling_rate=rate, return_tensors="pt")["input_features"]
        rows = [[start, *transcript_ids(tokenizer, u.text, eos, start)[:-1]] for u in chunk]  # labels shifted right
        width = max(len(r) for r in rows)
        dec = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            dec[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        batches.append({"input_features": feats.to(device=param.device, dtype=param.dtype),
                        "decoder_input_ids": dec.to(param.device), "decoder_attention_mask": mask.to(param.device)})
    return batches
