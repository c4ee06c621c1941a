"""Training batches of the benchmark recogniser (`benchmarks.digits.train`): digit sequences synthesised
from FSDD takes 0-39, their log-mel features, token labels and per-position digit targets, with the
optional speed/gain perturbation and SpecAugment masks."""

from __future__ import annotations

import numpy as np

from benchmarks.digits.data import (
    DIGIT_WORDS,
    EOT,
    SAMPLING_RATE,
    SPEAKERS,
    TRAIN_TAKES,
    VOCAB,
    ClipBank,
    draw_sequence,
)

CHUNK_SECONDS = 6  # the feature window; every draw is at most data.MAX_SECONDS = 5.8 s long


class Batches:
    """Training batches drawn from one seeded generator: (features (B, 80, frames), labels (B, L) with -100 pad)."""

    def __init__(self, clips, seed: int, feature_extractor, tokenizer, speakers: tuple[str, ...] = SPEAKERS,
                 augment: bool = False, spec_augment: bool = False):
        self.rng = np.random.default_rng([int(seed), 1])
        self.speakers = tuple(speakers)
        self.augment = augment
        self.spec_augment = spec_augment
        self.bank = ClipBank([c for c in clips if c.take in TRAIN_TAKES])
        self.pools = {}
        for s in self.speakers:
            pool = [[c for c in self.bank.audio if c.speaker == s and c.digit == d] for d in range(len(DIGIT_WORDS))]
            if any(not p for p in pool):
                raise ValueError(f"speaker {s} lacks a digit among takes {TRAIN_TAKES[0]}-{TRAIN_TAKES[-1]}")
            self.pools[s] = [sorted(p) for p in pool]
        self.fe = feature_extractor
        self.tok = tokenizer

    def draw(self, batch_size: int, max_digits: int = 5):
        """(features (B, 80, frames), labels (B, L), frame targets (B, frames // 2)) for ``batch_size`` draws."""
        import torch

        seqs = [draw_sequence(self.rng, self.pools[self.speakers[int(self.rng.integers(len(self.speakers)))]],
                              self.bank.durations, max_digits=max_digits) for _ in range(batch_size)]
        audio = [self.bank.render(q) for q in seqs]
        speeds = np.ones(batch_size)
        if self.augment:  # speed perturbation (tempo and pitch, as Kaldi's 0.9-1.1) and gain, per utterance
            audio, speeds = zip(*(self._perturb(a) for a in audio))
        feats = self.fe(list(audio), sampling_rate=SAMPLING_RATE, return_tensors="np")["input_features"]
        if self.spec_augment:
            feats = self._mask(feats)
        ids = [self.tok(q.text, add_special_tokens=False)["input_ids"] + [VOCAB[EOT]] for q in seqs]
        width = max(len(i) for i in ids)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)  # (B, L)
        for row, i in enumerate(ids):
            labels[row, : len(i)] = torch.tensor(i)
        # The encoder's position j hears samples [j, j + 1) * 2 * hop (two mel frames, conv2's stride 2);
        # its target is the digit whose clip holds the middle of that span, else 0 (silence).
        positions = feats.shape[-1] // 2
        span = 2 * self.fe.hop_length
        mids = np.arange(positions) * span + span // 2  # (P,) sample index
        frames = torch.zeros((batch_size, positions), dtype=torch.long)  # (B, P)
        for row, q in enumerate(seqs):
            start = 0
            for gap, clip in zip(q.gaps, q.clips):
                start += gap
                end = start + len(self.bank.audio[clip])
                lo, hi = start / speeds[row], end / speeds[row]  # sample positions after the speed change
                frames[row, torch.from_numpy((mids >= lo) & (mids < hi))] = clip.digit + 1
                start = end
        return torch.from_numpy(np.ascontiguousarray(feats)), labels, frames


    def _mask(self, feats: np.ndarray) -> np.ndarray:
        """SpecAugment (LD policy, scaled to 80 bins x 300 frames): per utterance two frequency masks of up to
        10 bins and two time masks of up to 20 frames, set to the utterance's mean log-mel value."""
        feats = feats.copy()
        for f in feats:  # (80, frames)
            fill = f.mean()
            for _ in range(2):
                w = int(self.rng.integers(0, 11))
                b0 = int(self.rng.integers(0, f.shape[0] - w + 1))
                f[b0:b0 + w] = fill
                w = int(self.rng.integers(0, 21))
                t0 = int(self.rng.integers(0, f.shape[1] - w + 1))
                f[:, t0:t0 + w] = fill
        return feats

    def _perturb(self, audio: np.ndarray) -> tuple[np.ndarray, float]:
        """``audio`` played at a random speed in [0.9, 1.1] (never past the 6 s window) and gain in ±6 dB."""
        import soxr

        slowest = max(0.9, len(audio) / (CHUNK_SECONDS * SAMPLING_RATE))
        speed = float(self.rng.uniform(slowest, 1.1))
        gain = float(10 ** (self.rng.uniform(-6.0, 6.0) / 20))
        out = soxr.resample(audio, SAMPLING_RATE, SAMPLING_RATE / speed)  # fewer samples when faster
        return (gain * out).astype(np.float32), speed
