"""Write the digit benchmark's evaluation sets: JSONL manifests beside 16 kHz wavs.

    python -m benchmarks.digits.make_sets --data ../shared/data/fsdd --out results/digits/sets

OUT/test.jsonl            every speaker's held-out sequences (takes 40-49 only)
OUT/test_{speaker}.jsonl  the same, one speaker
OUT/jackson_calib.jsonl   the target speaker's adaptation / calibration set (jackson, takes 0-29 only)
OUT/sets.json             how the sets were drawn (seed, counts, takes) and each set's size
OUT/wavs/*.wav            the audio, 16-bit PCM at 16 kHz

Each manifest line is ``{"audio": "wavs/NAME.wav", "text": "seven three nine", "speaker": "jackson", "id": NAME,
"takes": [...]}``, with the audio path relative to the manifest. The same --seed always writes the same sets;
the folder is written atomically (a temporary folder, then a rename).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.digits import atomic_dir
from benchmarks.digits.data import (
    CALIB_TAKES,
    SAMPLING_RATE,
    SPEAKERS,
    TARGET_SPEAKER,
    TEST_TAKES,
    ClipBank,
    DigitSequence,
    draw_sequences,
    scan_fsdd,
)

# Seed offsets keep the test and calibration draws independent streams of one --seed.
TEST_STREAM, CALIB_STREAM = 1000, 2000


def heldout_sequences(clips, speaker: str, count: int, seed: int, durations=None) -> list[DigitSequence]:
    """The held-out sequences of ``speaker`` (takes 40-49) that test.jsonl holds for ``seed``."""
    return draw_sequences(clips, speaker, TEST_TAKES, count, seed + TEST_STREAM, durations)


def calib_sequences(clips, count: int, seed: int, durations=None) -> list[DigitSequence]:
    """The target speaker's adaptation sequences (jackson, takes 0-29) that jackson_calib.jsonl holds."""
    return draw_sequences(clips, TARGET_SPEAKER, CALIB_TAKES, count, seed + CALIB_STREAM, durations)


def write_sets(data: str | Path, out: str | Path, *, per_speaker: int = 100, calib: int = 200, seed: int = 0,
               speakers: tuple[str, ...] = SPEAKERS) -> dict:
    """Draw and write every set (see the module docstring); returns what sets.json holds."""
    from adaptwin.speech.audio import write_wav

    if per_speaker < 1 or calib < 1:
        raise ValueError(f"--per-speaker and --calib must be at least 1, got {per_speaker} and {calib}")
    clips = scan_fsdd(data)
    unknown = sorted(set(speakers) - {c.speaker for c in clips})
    if unknown:
        raise ValueError(f"speakers {unknown} have no clips in {data}; it holds {sorted({c.speaker for c in clips})}")
    sets: dict[str, list[DigitSequence]] = {f"test_{s}": heldout_sequences(clips, s, per_speaker, seed)
                                            for s in speakers}
    sets[f"{TARGET_SPEAKER}_calib"] = calib_sequences(clips, calib, seed)
    used = {c for seqs in sets.values() for q in seqs for c in q.clips}
    bank = ClipBank(sorted(used))
    meta = {"seed": seed, "sampling_rate": SAMPLING_RATE, "test_takes": list(TEST_TAKES),
            "calib_takes": list(CALIB_TAKES), "calib_speaker": TARGET_SPEAKER, "sets": {}}
    with atomic_dir(out) as tmp:
        (tmp / "wavs").mkdir()
        rows: dict[str, list[dict]] = {}
        for name, seqs in sets.items():
            rows[name] = []
            for i, q in enumerate(seqs):
                uid = f"{name}_{i:04d}"
                write_wav(tmp / "wavs" / f"{uid}.wav", bank.render(q), SAMPLING_RATE)
                rows[name].append({"audio": f"wavs/{uid}.wav", "text": q.text, "speaker": q.speaker, "id": uid,
                                   "takes": list(q.takes)})
        rows["test"] = [r for s in speakers for r in rows[f"test_{s}"]]
        for name, lines in rows.items():
            (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
            meta["sets"][name] = {"utterances": len(lines), "words": sum(len(r["text"].split()) for r in lines)}
        (tmp / "sets.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.digits.make_sets", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="the FSDD folder of {digit}_{speaker}_{take}.wav files")
    p.add_argument("--out", required=True, help="folder to write (replaced atomically if it exists)")
    p.add_argument("--per-speaker", type=int, default=100, help="held-out sequences per speaker (default 100)")
    p.add_argument("--calib", type=int, default=200, help="jackson adaptation sequences (default 200)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        meta = write_sets(args.data, args.out, per_speaker=args.per_speaker, calib=args.calib, seed=args.seed)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, s in meta["sets"].items():
        print(f"{name:>16}: {s['utterances']:4d} utterances, {s['words']:5d} words")
    print(f"wrote {Path(args.out).expanduser().resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
