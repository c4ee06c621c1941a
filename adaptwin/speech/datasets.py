"""Speech test sets as lists of `Utterance` records, read from the layouts people actually have on disk.

    load_dataset("LibriSpeech/dev-clean")    # */*/SPK-CHAP.trans.txt with SPK-CHAP-UTT.flac beside
    load_dataset("LJSpeech-1.1")              # metadata.csv (id|raw|normalised) + wavs/ ; speaker "lj"
    load_dataset("fsdd/recordings")           # {digit}_{speaker}_{take}.wav ; text is the digit's word
    load_dataset("test.jsonl")                # {"audio": relative path, "text": ..., "speaker": ...} per line

Every problem (a transcript line without audio, audio without a transcript, a malformed line, an empty
set) raises ValueError naming the file, and the line number where there is one. Audio is not decoded
here; its header is checked when ``check_audio`` is true, so a corrupt file is named before a long run.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Utterance", "load_dataset", "read_fsdd", "read_librispeech", "read_ljspeech", "read_manifest"]

AUDIO_SUFFIXES = (".flac", ".wav")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_FSDD_NAME = re.compile(r"^(\d)_([A-Za-z0-9-]+)_(\d+)\.wav$")
_LAYOUTS = ("a .jsonl manifest", "a folder with metadata.csv (LJ Speech)", "a folder with *.trans.txt (LibriSpeech)",
            "a folder of {digit}_{speaker}_{take}.wav files (FSDD)")


@dataclass(frozen=True)
class Utterance:
    """One recording and what was said in it."""

    id: str
    audio: Path
    text: str
    speaker: str


def load_dataset(path: str | os.PathLike, *, check_audio: bool = True) -> list[Utterance]:
    """Read the test set at ``path``, detecting its layout (see the module docstring for the four layouts)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"dataset {root} does not exist (expected {', '.join(_LAYOUTS)})")
    if root.is_file():
        if root.suffix.lower() == ".jsonl":
            utts = read_manifest(root)
        elif root.name == "metadata.csv":
            utts = read_ljspeech(root.parent)
        else:
            raise ValueError(f"dataset {root} is a file that is not a .jsonl manifest; expected {', '.join(_LAYOUTS)}")
    elif (root / "metadata.csv").is_file():
        utts = read_ljspeech(root)
    elif next(root.rglob("*.trans.txt"), None) is not None:
        utts = read_librispeech(root)
    elif any(_FSDD_NAME.match(p.name) for p in root.glob("*.wav")):
        utts = read_fsdd(root)
    else:
        manifests = sorted(root.glob("*.jsonl"))
        if len(manifests) != 1:
            raise ValueError(f"dataset {root}: cannot tell its layout; expected {', '.join(_LAYOUTS)}")
        utts = read_manifest(manifests[0])
    if check_audio:
        for u in utts:
            _check_header(u.audio)
    return utts


# ---------------------------------------------------------------------------------------------- readers


def read_librispeech(root: str | os.PathLike) -> list[Utterance]:
    """LibriSpeech: ``SPK-CHAP.trans.txt`` files (lines ``SPK-CHAP-UTT TEXT``) with the flac files beside them."""
    root = Path(root)
    utts: list[Utterance] = []
    for trans in sorted(root.rglob("*.trans.txt")):
        for n, line in enumerate(_read_lines(trans), 1):
            if not line.strip():
                continue
            uid, _, text = line.strip().partition(" ")
            if not text.strip():
                raise ValueError(f"{trans} line {n}: expected 'UTTERANCE-ID TEXT', got {line.strip()[:80]!r}")
            audio = next((trans.parent / f"{uid}{s}" for s in AUDIO_SUFFIXES
                          if (trans.parent / f"{uid}{s}").is_file()), None)
            if audio is None:
                raise ValueError(f"{trans} line {n}: no audio {uid}.flac (or .wav) beside the transcript")
            utts.append(Utterance(uid, audio, text.strip(), uid.split("-")[0]))
    _no_untranscribed(root, utts, "a line in its folder's *.trans.txt")
    return _finish(root, utts)


def read_ljspeech(root: str | os.PathLike) -> list[Utterance]:
    """LJ Speech: ``metadata.csv`` rows ``id|raw text|normalised text`` (the normalised text is used) + ``wavs/``."""
    root = Path(root)
    meta = root / "metadata.csv"
    wavs = root / "wavs"
    utts: list[Utterance] = []
    for n, line in enumerate(_read_lines(meta), 1):
        if not line.strip():
            continue
        fields = line.rstrip("\r\n").split("|")
        if len(fields) not in (2, 3) or not fields[0].strip() or not fields[-1].strip():
            raise ValueError(f"{meta} line {n}: expected 'id|raw text|normalised text', got {line.strip()[:80]!r}")
        uid, text = fields[0].strip(), fields[-1].strip()
        audio = wavs / f"{uid}.wav"
        if not audio.is_file():
            raise ValueError(f"{meta} line {n}: audio {audio} does not exist")
        utts.append(Utterance(uid, audio, text, "lj"))
    if wavs.is_dir():
        _no_untranscribed(wavs, utts, f"a row in {meta}")
    return _finish(root, utts)


def read_fsdd(root: str | os.PathLike) -> list[Utterance]:
    """Free Spoken Digit Dataset: ``{digit}_{speaker}_{take}.wav``; the text is the digit's English word."""
    root = Path(root)
    rows = []
    for p in root.glob("*.wav"):
        m = _FSDD_NAME.match(p.name)
        if m is None:
            raise ValueError(f"{p}: no transcript; FSDD files must be named {{digit}}_{{speaker}}_{{take}}.wav")
        rows.append((m.group(2), int(m.group(1)), int(m.group(3)), p))
    utts = [Utterance(p.stem, p, DIGIT_WORDS[digit], speaker) for speaker, digit, _, p in sorted(rows)]
    return _finish(root, utts)


def read_manifest(path: str | os.PathLike) -> list[Utterance]:
    """A JSONL manifest: one object per line, ``{"audio": path, "text": str, "speaker": str, "id": str}``.

    ``audio`` is relative to the manifest's folder (or absolute); ``speaker`` defaults to "unknown" and
    ``id`` to the audio path as written.
    """
    path = Path(path)
    utts: list[Utterance] = []
    for n, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object with 'audio' and 'text', got {type(row).__name__}")
        for key, required in (("audio", True), ("text", True), ("speaker", False), ("id", False)):
            if (required and key not in row) or (row.get(key) is not None and not isinstance(row[key], str)):
                raise ValueError(f"{where}: {key!r} must be a string"
                                 + (" (required: 'audio' and 'text')" if required else " or null"))
        for key in ("audio", "text"):
            if not row[key].strip():
                raise ValueError(f"{where}: {key!r} is empty" + (" (every clip needs its transcript: the word error "
                                                                 "rate and the decoder's training both read it)"
                                                                 if key == "text" else ""))
        audio = Path(row["audio"]).expanduser()
        audio = audio if audio.is_absolute() else path.parent / audio
        if not audio.is_file():
            raise ValueError(f"{where}: audio {audio} does not exist")
        utts.append(Utterance(row.get("id") or row["audio"], audio, row["text"].strip(),
                              row.get("speaker") or "unknown"))
    return _finish(path, utts)


# ---------------------------------------------------------------------------------------------- helpers


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()  # (skips a byte-order mark)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _no_untranscribed(root: Path, utts: list[Utterance], expected: str) -> None:
    """Audio files under ``root`` that no transcript names are a mistake worth stopping for."""
    named = {u.audio.resolve() for u in utts}
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file() and p.resolve() not in named:
            raise ValueError(f"{p}: no transcript (expected {expected})")


def _finish(source: Path, utts: list[Utterance]) -> list[Utterance]:
    if not utts:
        raise ValueError(f"dataset {source} holds no utterances")
    seen: dict[str, Utterance] = {}
    for u in utts:
        if u.id in seen:
            raise ValueError(f"dataset {source}: utterance id {u.id!r} appears twice ({seen[u.id].audio}, {u.audio})")
        seen[u.id] = u
    return utts


def _check_header(path: Path) -> None:
    """Fail early on audio whose header cannot be read (decoding the samples is left to `load_audio`)."""
    try:
        import soundfile
    except (ImportError, OSError):
        return
    from adaptwin.speech.audio import _reason

    try:
        info = soundfile.info(str(path))
    except (RuntimeError, ValueError, TypeError, EOFError) as e:
        raise ValueError(f"cannot read audio file {path}: {_reason(e)}") from None
    if info.frames == 0:
        raise ValueError(f"audio file {path} holds no samples")
