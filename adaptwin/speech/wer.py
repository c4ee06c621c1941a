"""Word error rate as Whisper reports it: both sides through Whisper's English normaliser, then jiwer.

    norm = english_normalizer(model_dir="whisper-small/")   # spelling table from normalizer.json there
    report = wer_report(references, hypotheses, speakers, normalizer=norm)
    report.wer, report.ci, report.per_speaker["1272"]

The normaliser lower-cases, expands titles and contractions ("Mr." -> "mister"), writes numbers as digits
("twenty one" -> "21") and maps British to American spellings with a table that Whisper checkpoints ship
as ``normalizer.json``. The table is never copied into this repository: it is read from the model folder,
an explicit file, or the shared data folder, and the report says which (or that none was found).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TextNormalizer", "UtteranceErrors", "WERReport", "english_normalizer", "utterance_errors", "wer_report"]

NORMALIZER_FILE = "normalizer.json"
# The shared data folder beside the repository (../shared/data from the repo root); absent on most machines.
SHARED_SPELLING = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "whisper-assets" / "english.json"


class TextNormalizer:
    """Whisper's ``EnglishTextNormalizer`` with the spelling table it was given and where that came from."""

    def __init__(self, spelling: Mapping[str, str], source: str):
        from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

        self.spelling = dict(spelling)
        self.source = source
        self._normalize = EnglishTextNormalizer(self.spelling)

    def __call__(self, text: str) -> str:
        return " ".join(self._normalize(text).split())

    def __repr__(self) -> str:
        return f"TextNormalizer({len(self.spelling)} spellings from {self.source})"


class BasicNormalizer:
    """Whisper's ``BasicTextNormalizer``: lower case, punctuation and bracketed asides removed, and nothing
    else — numbers stay words. For vocabularies where the English normaliser would change the unit being
    counted (it turns "seven three nine" into "739", one word)."""

    source = "basic (lower case, punctuation removed; no number or spelling rules)"

    def __init__(self) -> None:
        from transformers.models.whisper.english_normalizer import BasicTextNormalizer

        self._normalize = BasicTextNormalizer()

    def __call__(self, text: str) -> str:
        return " ".join(self._normalize(text).split())

    def __repr__(self) -> str:
        return "BasicNormalizer()"


def english_normalizer(model_dir: str | os.PathLike | None = None,
                       path: str | os.PathLike | None = None) -> TextNormalizer:
    """Whisper's English normaliser with the first spelling table found among:

    1. ``path``, when given (an explicit choice wins; a missing or malformed file is an error);
    2. ``normalizer.json`` in ``model_dir`` (real Whisper checkpoints ship it);
    3. the shared data folder's ``whisper-assets/english.json``, when it exists;
    4. none (an empty table: spellings are left as they are).
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"normalizer table {p} does not exist (expected Whisper's normalizer.json: "
                                    "a JSON object mapping British to American spellings)")
        return TextNormalizer(_read_table(p), str(p))
    candidates = [Path(model_dir) / NORMALIZER_FILE] if model_dir is not None else []
    candidates.append(SHARED_SPELLING)
    for p in candidates:
        if p.is_file():
            return TextNormalizer(_read_table(p), str(p))
    return TextNormalizer({}, "none (empty spelling table)")


def _read_table(p: Path) -> dict[str, str]:
    try:
        table = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"normalizer table {p} is not valid JSON: {e}") from None
    if not isinstance(table, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in table.items()):
        raise ValueError(f"normalizer table {p} must be a JSON object mapping words to words (strings)")
    return table


@dataclass(frozen=True)
class UtteranceErrors:
    """One utterance's alignment counts, after normalisation."""

    reference: str  # normalised
    hypothesis: str  # normalised
    substitutions: int
    deletions: int
    insertions: int
    words: int  # reference words

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions


def utterance_errors(references: Sequence[str], hypotheses: Sequence[str],
                     normalizer: TextNormalizer | None = None) -> list[UtteranceErrors]:
    """Per-utterance substitutions, deletions and insertions of ``hypotheses`` against ``references``."""
    import jiwer

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    norm = normalizer or (lambda s: " ".join(s.split()))
    refs = [norm(r) for r in references]
    hyps = [norm(h) for h in hypotheses]
    out: list[UtteranceErrors | None] = [None] * len(refs)
    scored = [i for i, r in enumerate(refs) if r]
    for i, r in enumerate(refs):  # jiwer refuses empty references: every hypothesis word is an insertion
        if not r:
            out[i] = UtteranceErrors(r, hyps[i], 0, 0, len(hyps[i].split()), 0)
    if scored:
        result = jiwer.process_words([refs[i] for i in scored], [hyps[i] for i in scored])
        for i, chunks in zip(scored, result.alignments):
            counts = {"substitute": 0, "delete": 0, "insert": 0}
            for c in chunks:
                if c.type in counts:
                    counts[c.type] += max(c.ref_end_idx - c.ref_start_idx, c.hyp_end_idx - c.hyp_start_idx)
            out[i] = UtteranceErrors(refs[i], hyps[i], counts["substitute"], counts["delete"], counts["insert"],
                                     len(refs[i].split()))
    return out  # type: ignore[return-value]


@dataclass
class WERReport:
    """Corpus WER = (S + D + I) / N over all utterances, with a bootstrap interval and a per-speaker split."""

    wer: float
    substitutions: int
    deletions: int
    insertions: int
    reference_words: int
    utterances: int
    ci_low: float
    ci_high: float
    ci_level: float
    resamples: int
    seed: int
    normalizer: str  # where the spelling table came from
    per_speaker: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ci(self) -> tuple[float, float]:
        return self.ci_low, self.ci_high

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def wer_report(references: Sequence[str], hypotheses: Sequence[str], speakers: Sequence[str] | None = None, *,
               normalizer: TextNormalizer | None = None, resamples: int = 1000, seed: int = 0,
               level: float = 0.95, errors: Sequence[UtteranceErrors] | None = None) -> WERReport:
    """Score ``hypotheses`` against ``references`` (or reuse ``errors`` from `utterance_errors`).

    The interval is the percentile bootstrap over utterances: ``resamples`` draws of n utterances with
    replacement (seeded), each scored as a corpus, so long utterances weigh as much as they do in the WER.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    errs = list(errors) if errors is not None else utterance_errors(references, hypotheses, normalizer)
    n = len(errs)
    if n == 0:
        raise ValueError("no utterances to score")
    speakers = list(speakers) if speakers is not None else ["all"] * n
    if len(speakers) != n:
        raise ValueError(f"{len(speakers)} speakers for {n} utterances")
    e = np.array([u.errors for u in errs], dtype=np.int64)  # (n,)
    w = np.array([u.words for u in errs], dtype=np.int64)  # (n,)
    if w.sum() == 0:
        raise ValueError("every reference is empty after normalisation: WER is undefined")
    low, high = _bootstrap(e, w, resamples, seed, level)

    per_speaker: dict[str, dict[str, Any]] = {}
    for s in sorted(set(speakers)):
        idx = [i for i, sp in enumerate(speakers) if sp == s]
        sub = [errs[i] for i in idx]
        words = sum(u.words for u in sub)
        per_speaker[s] = {"wer": sum(u.errors for u in sub) / words if words else None,
                          "substitutions": sum(u.substitutions for u in sub),
                          "deletions": sum(u.deletions for u in sub), "insertions": sum(u.insertions for u in sub),
                          "reference_words": words, "utterances": len(sub)}
    return WERReport(
        wer=float(e.sum() / w.sum()), substitutions=sum(u.substitutions for u in errs),
        deletions=sum(u.deletions for u in errs), insertions=sum(u.insertions for u in errs),
        reference_words=int(w.sum()), utterances=n, ci_low=low, ci_high=high, ci_level=level, resamples=resamples,
        seed=seed, normalizer=normalizer.source if normalizer is not None else "whitespace only",
        per_speaker=per_speaker,
    )


def _bootstrap(e: np.ndarray, w: np.ndarray, resamples: int, seed: int, level: float) -> tuple[float, float]:
    """Percentile interval of sum(e[idx]) / sum(w[idx]) over ``resamples`` uniform draws idx of n indices."""
    rng = np.random.default_rng(seed)
    n = e.shape[0]
    rates = np.empty(resamples)
    block = max(1, 4_000_000 // n)  # ~32 MB of int64 indices per block, whatever n is
    for start in range(0, resamples, block):
        stop = min(start + block, resamples)
        idx = rng.integers(0, n, size=(stop - start, n))  # (b, n)
        words = w[idx].sum(axis=1)  # (b,)
        # A draw of only empty references has no rate; it counts as 0 errors over 0 words -> skipped below.
        rates[start:stop] = np.where(words > 0, e[idx].sum(axis=1) / np.maximum(words, 1), np.nan)
    rates = rates[~np.isnan(rates)]
    alpha = (1 - level) / 2
    lo, hi = np.quantile(rates, [alpha, 1 - alpha])
    return float(lo), float(hi)
