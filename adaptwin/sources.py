"""Where models and calibration text come from: local folders or hub ids, their tokenizer files, text files.

Shared by the CLI commands (compress, eval) and the demo. Problems with what the user passed raise
`UsageError` with one line that names the problem.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

# Files a tokenizer, feature extractor or generation loop needs beside the weights; copied into the save.
EXTRA_FILE_PATTERNS = (
    "tokenizer*.json", "tokenizer.model", "vocab*", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "spiece.model", "sentencepiece*.model", "*.tiktoken", "normalizer.json",
    "preprocessor_config.json", "processor_config.json", "feature_extractor_config.json",
    "generation_config.json", "chat_template.json", "chat_template.jinja",
)
# A tokenizer's vocabulary lives in one of these (tokenizer_config.json alone holds none).
_VOCABULARY_FILES = ("tokenizer.json", "vocab*", "merges.txt", "tokenizer.model", "spiece.model",
                     "sentencepiece*.model", "*.tiktoken")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class UsageError(ValueError):
    """A problem with what the user asked for (reported in one line, exit status 2)."""


DEFAULT_MAX_LENGTH = 128  # tokens per calibration example (--max-length)


def one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split())


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def resolve_model(name: str) -> Path | None:
    """The local folder for MODEL_DIR, or None when it is a hub id; raises for a missing local folder."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"MODEL_DIR {name} is a file; pass the folder holding config.json")
        if not (path / "config.json").is_file() and (path / "adaptwin.json").is_file():
            raise UsageError(f"MODEL_DIR {name} is an adaptwin save, already compressed; compress takes the original "
                             "Hugging Face folder (a save loads with adaptwin.load; eval and adapt take it)")
        if not (path / "config.json").is_file():
            raise UsageError(f"MODEL_DIR {name} has no config.json; pass a Hugging Face model folder "
                             "(written by save_pretrained)")
        return path
    if name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
        raise UsageError(f"MODEL_DIR {name} does not exist (expected a local model folder or a hub id like org/name)")
    return None


def extra_files(folder: Path) -> list[Path]:
    """Tokenizer / feature-extractor / generation files in ``folder`` (never the weights or config)."""
    found: dict[str, Path] = {}
    for pattern in EXTRA_FILE_PATTERNS:
        for p in sorted(folder.glob(pattern)):
            if p.is_file() and p.name not in ("adaptwin.json", "model.safetensors"):
                found[p.name] = p
    return sorted(found.values())


def hub_extra_files(repo_id: str) -> list[Path]:
    try:
        from huggingface_hub import snapshot_download

        return extra_files(Path(snapshot_download(repo_id, allow_patterns=list(EXTRA_FILE_PATTERNS),
                                                  local_files_only=not _hub_reachable())))
    except Exception as e:  # the model loaded; missing tokenizer files are worth a warning, not a failure
        note(f"warning: could not fetch tokenizer files of {repo_id}: {one_line(e)}")
        return []


def _hub_host() -> str:
    from urllib.parse import urlparse

    return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host name resolves (within ``timeout`` s), unless HF_HUB_OFFLINE says not to try."""
    import socket
    import threading

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    found: list[bool] = []

    def resolve() -> None:
        try:
            socket.getaddrinfo(_hub_host(), 443)
            found.append(True)
        except OSError:
            found.append(False)

    t = threading.Thread(target=resolve, daemon=True)
    t.start()
    t.join(timeout)
    return bool(found and found[0])


def load_model(source: str):
    """Load a Hugging Face model in fp32 with the class its config names, falling back to AutoModel."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModel

    from adaptwin import get_architecture

    hub = not Path(source).expanduser().exists()
    offline = hub and not _hub_reachable()  # then only the local cache: no minute of retries ending the same way
    try:
        config = AutoConfig.from_pretrained(source, **({"local_files_only": True} if offline else {}))
    except (OSError, ValueError, KeyError) as e:
        if offline:
            raise UsageError(f"{source} is no local folder, and the hub ({_hub_host()}) cannot be reached to fetch "
                             "it (nor is it in the local cache); pass a model folder written by save_pretrained"
                             ) from None
        raise UsageError(f"cannot read the model config of {source}: {one_line(e)}") from None
    get_architecture(config.model_type)  # unsupported model types stop here, before any weights are read
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if not (isinstance(cls, type) and hasattr(cls, "from_pretrained")):
        cls = AutoModel
    try:
        model = cls.from_pretrained(source, dtype=torch.float32, **({"local_files_only": True} if offline else {}))
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load the model weights of {source}: {one_line(e)}") from None
    return model.float().eval()


def read_calibration_text(path: str) -> list[str]:
    """Non-empty, stripped lines of a UTF-8 file: one calibration example per line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"--calib {path} {'is not a file' if p.exists() else 'does not exist'} "
                         "(expected a UTF-8 text file, one example per line)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"--calib {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise UsageError(f"--calib {path} is empty: expected one example per line")
    return lines


def calibration_batches(model, source: str, lines: list[str], batch_size: int, max_length: int) -> list[dict]:
    """``lines`` tokenised with the model's own tokenizer into padded batches (with attention_mask)."""
    import inspect

    from transformers import AutoTokenizer

    speech = "speech models calibrate on a speech set (a JSONL manifest or a speech folder) as --calib"
    takes = getattr(model, "main_input_name", "input_ids")
    if takes != "input_ids":
        raise UsageError(f"{type(model).__name__} takes {takes}, not text, and --calib reads text; {speech}")
    folder = Path(source)
    # Without a vocabulary file transformers builds an empty tokenizer that maps every word to [UNK].
    if folder.is_dir() and not any(any(folder.glob(p)) for p in _VOCABULARY_FILES):
        raise UsageError(f"MODEL_DIR {source} has no tokenizer (none of {', '.join(_VOCABULARY_FILES)}) to read "
                         f"--calib text with; add its tokenizer files ({speech})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"MODEL_DIR {source} has no usable tokenizer to read --calib text with "
                         f"({one_line(e)}); add its tokenizer files ({speech})") from None
    if getattr(tokenizer, "pad_token", None) is None:  # GPT-2 / Llama ship none; the mask hides padding anyway
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if tokenizer.pad_token is None:
            raise UsageError(f"the tokenizer of {source} has no pad, eos or unk token to pad batches with")
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < max_length:  # e.g. 512 for BERT: past it positions run out
        max_length = limit
    accepted = inspect.signature(model.forward).parameters
    batches = []
    for i in range(0, len(lines), batch_size):
        enc = tokenizer(lines[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        if enc["input_ids"].shape[-1] == 0:
            raise UsageError(f"the tokenizer of {source} turns lines {i + 1}-{i + len(enc['input_ids'])} of --calib "
                             "into no tokens at all; is it the model's own tokenizer?")
        vocab = getattr(model.config, "vocab_size", None)
        top = int(enc["input_ids"].max())
        if isinstance(vocab, int) and top >= vocab:
            raise UsageError(f"the tokenizer of {source} gives token id {top} (lines {i + 1}-"
                             f"{i + len(enc['input_ids'])} of --calib), but the model's vocab_size is {vocab}: the "
                             "tokenizer files do not belong to this model")
        batches.append({k: v for k, v in enc.items() if k in accepted})
    _check_known_words(tokenizer, source, batches)
    return batches


def _check_known_words(tokenizer, source: str, batches: list[dict]) -> None:
    """Refuse calibration text that the tokenizer reads as mostly [UNK]: a tokenizer built without its
    vocabulary, or another language's, would calibrate every layer on one repeated token."""
    import torch

    unk = getattr(tokenizer, "unk_token_id", None)
    special = set(getattr(tokenizer, "all_special_ids", []) or []) - {unk}
    if unk is None or unk in {getattr(tokenizer, f"{t}_token_id", None) for t in ("eos", "bos", "pad", "cls", "sep")}:
        return  # byte-level tokenizers (GPT-2) have no real unknown token
    words = unknown = 0
    for b in batches:
        ids = b["input_ids"]
        ids = ids[b["attention_mask"].bool()] if "attention_mask" in b else ids.flatten()
        keep = ~torch.isin(ids, torch.tensor(sorted(special), dtype=ids.dtype))
        words += int(keep.sum())
        unknown += int((ids[keep] == unk).sum())
    if words and unknown > words / 2:
        raise UsageError(f"the tokenizer of {source} reads {unknown} of --calib's {words} tokens as "
                         f"{tokenizer.unk_token!r} (unknown): calibration on them teaches nothing; is the text in the "
                         "model's language, and are its tokenizer files complete?")


def is_speech_set(path: str) -> bool:
    """A folder (LJ Speech, LibriSpeech, FSDD) or a JSONL manifest; anything else is read as text."""
    p = Path(path).expanduser()
    return p.is_dir() or p.suffix.lower() == ".jsonl"


def read_speech_set(path: str, speaker: str | None) -> list:
    """The utterances of speech set ``path`` (``--calib``), one speaker's where ``speaker`` is given."""
    from adaptwin.speech.cli import select
    from adaptwin.speech.datasets import load_dataset

    try:
        utterances = load_dataset(path)
    except ValueError as e:
        raise UsageError(f"--calib {e}") from None
    return select(utterances, speaker, None, path, "--calib-speaker")


def calibration_for(model, source: str, calib: str, lines: list[str] | None, utterances: list | None,
                    batch_size: int, max_length: int | None) -> list:
    """The calibration batches: tokenised text for text models, audio (and transcripts) for speech models."""
    from adaptwin.speech.calibration import calibration_batches as speech_batches
    from adaptwin.speech.calibration import speech_input

    kind = speech_input(model)
    if kind is None:
        if utterances is not None:
            raise UsageError(f"{type(model).__name__} takes {model.main_input_name}, not audio: --calib must be a "
                             f"UTF-8 text file, one example per line, got the speech set {calib}")
        return calibration_batches(model, source, lines, batch_size, max_length or DEFAULT_MAX_LENGTH)
    if utterances is None:
        raise UsageError(f"{type(model).__name__} takes audio ({kind}): --calib must be a speech set (a JSONL "
                         "manifest of {\"audio\", \"text\", \"speaker\"}, or an LJ Speech, LibriSpeech or FSDD "
                         f"folder), got the text file {calib}")
    if max_length is not None:
        raise UsageError("--max-length truncates text; a speech set's clips are taken whole")
    from transformers import AutoFeatureExtractor, AutoTokenizer

    try:
        feature_extractor = AutoFeatureExtractor.from_pretrained(source)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"MODEL_DIR {source} has no usable feature extractor to read --calib audio with "
                         f"({one_line(e)}); save it there with feature_extractor.save_pretrained") from None
    tokenizer = None
    if kind == "input_features":  # the transcripts become the decoder's inputs
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"MODEL_DIR {source} has no usable tokenizer for the --calib transcripts "
                             f"({one_line(e)}); save it there with tokenizer.save_pretrained") from None
    try:
        return speech_batches(model, feature_extractor, tokenizer, utterances, batch_size)
    except ValueError as e:
        raise UsageError(f"--calib {calib}: {e}") from None


# ---------------------------------------------------------------------------------------------- outputs


def check_out_dir(out: Path, model_dir: Path | None) -> None:
    """Refuse a target `save` would refuse, before spending minutes on compression."""
    from adaptwin.io import check_replaceable

    if model_dir is not None and out.resolve() == model_dir.resolve():
        raise UsageError(f"--out {out} is the model folder itself (MODEL_DIR itself); choose a new directory")
    try:  # (a file, a folder that is no save, foreign files in a save, a folder this process cannot write)
        check_replaceable(out)
    except ValueError as e:
        raise UsageError(f"--out {e}") from None


def check_run_dir_flag(run_dir: Path, model_dir: Path | None, out: Path) -> None:
    """--run-dir: new, empty or an earlier run's, and neither inside MODEL_DIR nor inside --out."""
    from adaptwin.finetune.checkpoint import check_run_dir

    for other, what in ((model_dir, "MODEL_DIR"), (out, "--out")):
        if other is not None and run_dir.resolve().is_relative_to(other.resolve()):
            raise UsageError(f"--run-dir {run_dir} is inside {what} {other}; give a folder of its own")
    try:
        check_run_dir(run_dir)
    except ValueError as e:
        raise UsageError(f"--{e}".replace("--run_dir", "--run-dir", 1)) from None
