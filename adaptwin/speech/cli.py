"""``adaptwin eval``: word error rate of a speech model (dense folder or adaptwin save) on a test set.

    adaptwin eval MODEL_DIR --data PATH [--json] [--batch-size N] [--limit N] [--speaker NAME]
                  [--normalizer PATH] [--max-new-tokens N] [--threads N]

MODEL_DIR holds the feature extractor (preprocessor_config.json) and tokenizer files beside the weights;
`adaptwin compress` copies them into its saves. PATH is any layout `load_dataset` reads. With ``--json``
stdout is one JSON line: the corpus WER with S/D/I, its bootstrap interval, the per-speaker split and
every utterance's hypothesis.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from adaptwin.sources import UsageError, load_model, note, resolve_model

# A tokenizer's vocabulary lives in one of these (tokenizer_config.json alone holds none).
_VOCABULARY_FILES = ("tokenizer.json", "vocab*", "merges.txt", "tokenizer.model", "spiece.model",
                     "sentencepiece*.model", "*.tiktoken")
_FEATURE_FILES = ("preprocessor_config.json", "feature_extractor_config.json", "processor_config.json")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``eval`` sub-command to the ``adaptwin`` parser."""
    e = sub.add_parser("eval", help="word error rate of a speech model on a test set",
                       description="Transcribe a test set greedily and report WER (Whisper's English normaliser, "
                       "jiwer alignment) with substitutions/deletions/insertions, a bootstrap 95 % interval and "
                       "a per-speaker table.")
    e.add_argument("model", metavar="MODEL_DIR", help="a Hugging Face model folder or a folder written by "
                   "adaptwin compress/save, with its feature extractor and tokenizer files")
    e.add_argument("--data", required=True, metavar="PATH", help="test set: a .jsonl manifest ({audio, text, "
                   "speaker} per line), an LJ Speech folder (metadata.csv), a LibriSpeech folder (*.trans.txt) or "
                   "an FSDD folder ({digit}_{speaker}_{take}.wav)")
    e.add_argument("--json", action="store_true", help="print one JSON object (last stdout line) instead of text")
    e.add_argument("--batch-size", type=_positive, default=8, metavar="N", help="clips per generate call (default 8)")
    e.add_argument("--limit", type=_positive, metavar="N", help="score only the first N utterances (after --speaker)")
    e.add_argument("--speaker", metavar="NAME", help="score only this speaker's utterances")
    e.add_argument("--normalizer", metavar="PATH|basic",
                   help="Whisper spelling table (normalizer.json); default: MODEL_DIR/normalizer.json, else the shared "
                        "data folder's whisper-assets/english.json, else none. 'basic': Whisper's basic normaliser "
                        "(lower case, no punctuation) instead of the English one, which rewrites spoken numbers as "
                        "digits ('seven three' -> '73', one word)")
    e.add_argument("--max-new-tokens", type=_positive, metavar="N",
                   help="most tokens generated per clip (default: the model's generation config)")
    e.add_argument("--threads", type=_positive, metavar="N", help="torch intra-op threads (default: torch's); on a "
                   "busy shared CPU 1 can be far faster (a tiny Whisper's generate(): 14 ms with 1, 950 ms with 2)")
    return e


def load_speech_model(model_dir: str):
    """(model, feature_extractor, tokenizer) from a dense HF folder or an adaptwin save."""
    from transformers import AutoFeatureExtractor, AutoTokenizer

    import adaptwin

    folder = Path(model_dir).expanduser()
    saved = (folder / "adaptwin.json").is_file()
    local = folder if saved else resolve_model(model_dir)  # None: a hub id
    if local is not None:
        if not any((local / f).is_file() for f in _FEATURE_FILES):
            raise UsageError(f"MODEL_DIR {model_dir} has no feature extractor (none of {', '.join(_FEATURE_FILES)}); "
                             "save it there with feature_extractor.save_pretrained(MODEL_DIR)")
        if not any(any(local.glob(p)) for p in _VOCABULARY_FILES):
            raise UsageError(f"MODEL_DIR {model_dir} has no tokenizer (none of {', '.join(_VOCABULARY_FILES)}); "
                             "save it there with tokenizer.save_pretrained(MODEL_DIR)")
    model = adaptwin.load(folder) if saved else load_model(model_dir)
    from adaptwin.speech.evaluate import is_ctc

    if not (is_ctc(model) or (getattr(model, "main_input_name", None) == "input_features"
                              and hasattr(model, "generate"))):
        raise UsageError(f"{type(model).__name__} in {model_dir} is not a speech recogniser (it takes "
                         f"{getattr(model, 'main_input_name', '?')}): a model whose generate() takes input_features "
                         "(e.g. WhisperForConditionalGeneration) or a CTC one (Wav2Vec2ForCTC, HubertForCTC) is needed")
    try:
        feature_extractor = AutoFeatureExtractor.from_pretrained(str(local or model_dir))
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"cannot load the feature extractor of {model_dir}: {e}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local or model_dir))
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"cannot load the tokenizer of {model_dir}: {e}") from None
    return model, feature_extractor, tokenizer


def select(utterances: list, speaker: str | None, limit: int | None, data: str, flag: str = "--speaker") -> list:
    """The utterances of ``speaker`` (all when None), the first ``limit`` of them; ``flag`` names the option
    that gave the speaker in the error."""
    if speaker is not None:
        chosen = [u for u in utterances if u.speaker == speaker]
        if not chosen:
            names = sorted({u.speaker for u in utterances})
            shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
            raise UsageError(f"{flag} {speaker!r} has no utterances in {data}; speakers there: {shown}")
        utterances = chosen
    return utterances[:limit] if limit is not None else utterances


def cmd_eval(args: argparse.Namespace) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    import adaptwin.speech.evaluate as ev
    from adaptwin.speech.datasets import load_dataset
    from adaptwin.speech.wer import BasicNormalizer, english_normalizer

    utterances = select(load_dataset(args.data), args.speaker, args.limit, args.data)  # cheap checks first
    normalizer = (BasicNormalizer() if args.normalizer == "basic"
                  else english_normalizer(Path(args.model).expanduser(), args.normalizer))
    hf_logging.disable_progress_bar()
    verbosity, threads = hf_logging.get_verbosity(), torch.get_num_threads()
    hf_logging.set_verbosity_error()  # generate()'s advice about max_length is noise in a report
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        model, feature_extractor, tokenizer = load_speech_model(args.model)
        if args.max_new_tokens is not None and ev.is_ctc(model):
            raise UsageError(f"--max-new-tokens limits generate(); {type(model).__name__} is a CTC model, which "
                             "gives one token per audio frame: leave it out")
        note(f"transcribing {len(utterances)} utterances from {args.data} with {type(model).__name__} "
             f"(batch {args.batch_size}, greedy) ...")
        result = ev.evaluate(model, feature_extractor, tokenizer, utterances, batch_size=args.batch_size,
                             max_new_tokens=args.max_new_tokens, normalizer=normalizer, progress=_progress())
    finally:  # main() may be called in-process (tests): leave the process as it was
        hf_logging.set_verbosity(verbosity)
        torch.set_num_threads(threads)
    data = {"model": str(args.model), "data": str(args.data), **result.to_dict()}
    if args.json:
        print(json.dumps(data, allow_nan=False))
        return 0
    r = result.report
    print(f"{args.model} on {args.data}: {r.utterances} utterances, {r.reference_words} reference words")
    print(f"WER {100 * r.wer:.2f} %  (S {r.substitutions}, D {r.deletions}, I {r.insertions} / N {r.reference_words}); "
          f"{100 * r.ci_level:.0f} % CI {100 * r.ci_low:.2f}-{100 * r.ci_high:.2f} % "
          f"(bootstrap over utterances, {r.resamples} resamples, seed {r.seed})")
    kind = "" if r.normalizer.startswith("basic") else "Whisper English, spelling table "
    print(f"text normaliser: {kind}{r.normalizer}")
    rows = [(s, str(v["utterances"]), str(v["reference_words"]), "-" if v["wer"] is None else f"{100 * v['wer']:.2f} %",
             str(v["substitutions"]), str(v["deletions"]), str(v["insertions"])) for s, v in r.per_speaker.items()]
    print(_table(("speaker", "utterances", "words", "WER", "S", "D", "I"), rows, right=(1, 2, 3, 4, 5, 6)))
    rtf = data["real_time_factor"]
    print(f"time: {result.transcribe_seconds:.1f} s for {result.audio_seconds:.1f} s of audio"
          + (f" (real-time factor {rtf:.3f})" if rtf is not None else ""))
    if result.truncated:
        print(f"warning: {result.truncated} clip(s) are longer than the feature extractor's "
              f"{feature_extractor.n_samples / feature_extractor.sampling_rate:g} s window; only their start was heard")
    written = sum(len(u.text.split()) for u in utterances)
    if r.reference_words < written / 2:
        print(f"warning: normalisation turned the transcripts' {written} words into {r.reference_words} (the Whisper "
              "English normaliser writes spelled-out numbers as digits: 'one two' -> '12'), so this WER counts "
              "whole numbers; --normalizer basic keeps every word")
    return 0


def _progress():
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        print(f"\r  {done}/{total} transcribed", end="\n" if done == total else "", file=sys.stderr, flush=True)

    return show


def _table(header, rows, right=()) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells) -> str:
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])
