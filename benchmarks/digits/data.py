"""Spoken digit sequences synthesised from the Free Spoken Digit Dataset (FSDD), deterministically.

    clips = scan_fsdd("../shared/data/fsdd")                     # every {digit}_{speaker}_{take}.wav
    bank = ClipBank(clips)                                        # 16 kHz float32 audio, loaded once
    seqs = draw_sequences(clips, "jackson", TEST_TAKES, 100, seed=0)
    audio = bank.render(seqs[0])                                  # (T,) float32 at 16 kHz
    seqs[0].text                                                  # "seven three nine"

A sequence is 1-5 clips of ONE speaker joined by short silences, so a recogniser must segment as well as
classify. The takes a sequence may use are always passed explicitly: training draws from takes 0-39
(`TRAIN_TAKES`), evaluation from takes 40-49 (`TEST_TAKES`), and the target speaker's adaptation set from
jackson's takes 0-29 (`CALIB_TAKES`), so held-out scores never hear a recording the model was trained on.
"""

from __future__ import annotations

import os
import re
import wave
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "CALIB_TAKES", "DIGIT_WORDS", "SAMPLING_RATE", "SPEAKERS", "TEST_TAKES", "TRAIN_TAKES",
    "Clip", "ClipBank", "DigitSequence", "draw_sequence", "draw_sequences", "scan_fsdd",
]

SAMPLING_RATE = 16000
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# The recogniser's word-level vocabulary: four specials, then the ten digit words.
EOT, SOT, PAD, UNK = "<|endoftext|>", "<|startoftranscript|>", "<pad>", "<unk>"
SPECIALS = (EOT, SOT, PAD, UNK)
VOCAB = {tok: i for i, tok in enumerate(SPECIALS + DIGIT_WORDS)}
SPEAKERS = ("george", "jackson", "lucas", "nicolas", "yweweler")
TRAIN_TAKES = tuple(range(0, 40))
TEST_TAKES = tuple(range(40, 50))
CALIB_TAKES = tuple(range(0, 30))  # jackson's adaptation/calibration material: a subset of the training takes
TARGET_SPEAKER = "jackson"

MAX_DIGITS = 5
GAP_SECONDS = (0.05, 0.25)  # silence between two digits, uniform
LEAD_SECONDS = (0.0, 0.2)  # silence before the first digit, uniform
# Whisper's feature window for the benchmark model is 6 s; the longest 5-digit sequence of the slowest
# speaker (lucas: clips up to 1.31 s) with the widest gaps would be ~7.7 s, so over-long draws are redrawn.
MAX_SECONDS = 5.8

_NAME = re.compile(r"^(\d)_([A-Za-z0-9-]+)_(\d+)\.wav$")


@dataclass(frozen=True, order=True)
class Clip:
    """One FSDD recording: ``{digit}_{speaker}_{take}.wav``."""

    speaker: str
    digit: int
    take: int
    path: Path

    @property
    def word(self) -> str:
        return DIGIT_WORDS[self.digit]


@dataclass(frozen=True)
class DigitSequence:
    """Clips of one speaker to be joined, with the silences (in samples at 16 kHz) before each clip."""

    speaker: str
    clips: tuple[Clip, ...]
    gaps: tuple[int, ...]  # gaps[0] is the lead-in silence; gaps[i] precedes clips[i]

    @property
    def text(self) -> str:
        return " ".join(c.word for c in self.clips)

    @property
    def takes(self) -> tuple[int, ...]:
        return tuple(c.take for c in self.clips)


def scan_fsdd(root: str | os.PathLike) -> list[Clip]:
    """Every ``{digit}_{speaker}_{take}.wav`` under ``root`` (not recursive), sorted.

    Raises FileNotFoundError when ``root`` is not a folder and ValueError when it holds no FSDD file or a
    wav with another name pattern.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"FSDD folder {root} does not exist (expected {{digit}}_{{speaker}}_{{take}}.wav "
                                "files)")
    clips = []
    for p in root.glob("*.wav"):
        m = _NAME.match(p.name)
        if m is None:
            raise ValueError(f"{p}: not an FSDD file name; expected {{digit}}_{{speaker}}_{{take}}.wav")
        clips.append(Clip(m.group(2), int(m.group(1)), int(m.group(3)), p))
    if not clips:
        raise ValueError(f"FSDD folder {root} holds no {{digit}}_{{speaker}}_{{take}}.wav files")
    return sorted(clips)


def _pool(clips: Iterable[Clip], speaker: str, takes: Sequence[int]) -> list[list[Clip]]:
    """Per digit, the clips of ``speaker`` whose take is in ``takes``; every digit must have at least one."""
    allowed = set(int(t) for t in takes)
    pool: list[list[Clip]] = [[] for _ in DIGIT_WORDS]
    for c in clips:
        if c.speaker == speaker and c.take in allowed:
            pool[c.digit].append(c)
    missing = [DIGIT_WORDS[d] for d, p in enumerate(pool) if not p]
    if missing:
        raise ValueError(f"speaker {speaker!r} has no clip of {', '.join(missing)} among takes {sorted(allowed)}")
    return [sorted(p) for p in pool]


def draw_sequence(rng: np.random.Generator, pool: list[list[Clip]], durations: dict[Clip, float], *,
                  max_digits: int = MAX_DIGITS, max_seconds: float = MAX_SECONDS) -> DigitSequence:
    """One sequence of 1..``max_digits`` clips drawn from ``pool`` (per digit, the allowed clips).

    ``durations`` gives each clip's length in seconds; a draw longer than ``max_seconds`` is redrawn (the
    redraws come from the same generator, so the result is still a function of its state).
    """
    if max_digits < 1:
        raise ValueError(f"max_digits must be at least 1, got {max_digits}")
    for _ in range(1000):
        n = int(rng.integers(1, max_digits + 1))
        digits = rng.integers(0, len(DIGIT_WORDS), size=n)
        clips = tuple(pool[d][int(rng.integers(0, len(pool[d])))] for d in digits)
        lead = rng.uniform(*LEAD_SECONDS)
        gaps = [lead] + list(rng.uniform(*GAP_SECONDS, size=n - 1))
        seconds = sum(gaps) + sum(durations[c] for c in clips)
        if seconds <= max_seconds:
            return DigitSequence(clips[0].speaker, clips, tuple(int(round(g * SAMPLING_RATE)) for g in gaps))
    raise ValueError(f"could not draw a digit sequence of at most {max_seconds} s in 1000 tries "
                     f"(max_digits={max_digits}); the clips are too long for the window")


def draw_sequences(clips: Sequence[Clip], speaker: str, takes: Sequence[int], count: int, seed: int,
                   durations: dict[Clip, float] | None = None, **kwargs) -> list[DigitSequence]:
    """``count`` sequences of ``speaker`` using only ``takes``; the same arguments always give the same list."""
    if speaker not in {c.speaker for c in clips}:
        raise ValueError(f"unknown speaker {speaker!r}; the clips hold {sorted({c.speaker for c in clips})}")
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    pool = _pool(clips, speaker, takes)
    durations = durations if durations is not None else clip_durations(c for p in pool for c in p)
    # One stream per (seed, speaker), so adding a speaker never changes another speaker's sequences.
    rng = np.random.default_rng([int(seed), SPEAKERS.index(speaker) if speaker in SPEAKERS else len(SPEAKERS)])
    return [draw_sequence(rng, pool, durations, **kwargs) for _ in range(count)]


def clip_durations(clips: Iterable[Clip]) -> dict[Clip, float]:
    """Each clip's length in seconds, from its wav header (no decoding)."""
    out = {}
    for c in clips:
        with wave.open(str(c.path), "rb") as w:
            out[c] = w.getnframes() / w.getframerate()
    return out


class ClipBank:
    """The clips' audio at 16 kHz, decoded once (`adaptwin.speech.audio.load_audio`), and sequence rendering."""

    def __init__(self, clips: Iterable[Clip]):
        from adaptwin.speech.audio import load_audio

        self.audio: dict[Clip, np.ndarray] = {c: load_audio(c.path, SAMPLING_RATE) for c in clips}  # (T,) each
        self.durations = {c: len(a) / SAMPLING_RATE for c, a in self.audio.items()}

    def render(self, seq: DigitSequence) -> np.ndarray:
        """The sequence as one float32 array (T,) at 16 kHz: silence, clip, silence, clip, ..."""
        parts = []
        for gap, clip in zip(seq.gaps, seq.clips):
            parts.append(np.zeros(gap, dtype=np.float32))
            parts.append(self.audio[clip])
        return np.concatenate(parts)
