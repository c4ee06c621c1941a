"""`adaptwin eval` end to end on a tiny random Whisper (dense and compressed), and transcribe()'s batching.

The model is random, so its WER means nothing; what is checked is that the command runs on both kinds of
folder, that its numbers agree with each other (WER = (S + D + I) / N, speakers and utterances sum to the
totals) and that bad input ends in one line and exit status 2.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_speech import WORDS, run_cli, save_ctc_dir, save_model_dir, tokenizer

import adaptwin
from adaptwin.speech.audio import write_wav
from adaptwin.speech.datasets import Utterance
from adaptwin.speech.evaluate import generate_kwargs, transcribe

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A word-level Whisper as the digit recogniser writes it: 1 s windows of 16 mel bins, 14 words."""
    # std 0.3 rather than HF's 0.02: the decoder then emits words for some clips instead of stopping at once.
    return save_model_dir(tmp_path_factory.mktemp("whisper-words"), d_model=32, std=0.3)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """Six clips from two speakers at three sampling rates; one (1.4 s) is longer than the 1 s window."""
    d = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    rows = []
    for i, (rate, seconds) in enumerate([(8000, 0.4), (16000, 0.7), (22050, 1.4), (16000, 0.3), (8000, 0.9),
                                         (44100, 0.5)]):
        t = np.arange(round(rate * seconds)) / rate
        x = 0.3 * np.sin(2 * np.pi * (200 + 150 * i) * t) + 0.05 * rng.standard_normal(len(t))
        write_wav(d / "wav" / f"c{i}.wav", x, rate)
        text = " ".join(WORDS[4 + (i + k) % 10] for k in range(1 + i % 3))
        rows.append({"audio": f"wav/c{i}.wav", "text": text, "speaker": "ann" if i % 2 else "bob"})
    path = d / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def table(tmp_path) -> Path:
    path = tmp_path / "normalizer.json"
    path.write_text(json.dumps({"colour": "color"}))
    return path


def check_report(data: dict, utterances: int) -> None:
    """The JSON line's figures agree with each other."""
    n = data["reference_words"]
    assert n > 0 and data["utterances"] == utterances == len(data["per_utterance"])
    assert data["wer"] == pytest.approx((data["substitutions"] + data["deletions"] + data["insertions"]) / n)
    assert data["ci_low"] <= data["wer"] <= data["ci_high"] and data["ci_level"] == 0.95
    for key in ("substitutions", "deletions", "insertions", "reference_words"):
        assert sum(r[key] for r in data["per_utterance"]) == data[key]
        assert sum(s[key] for s in data["per_speaker"].values()) == data[key]
    assert sum(s["utterances"] for s in data["per_speaker"].values()) == utterances
    for s in data["per_speaker"].values():
        assert s["wer"] == pytest.approx((s["substitutions"] + s["deletions"] + s["insertions"])
                                         / s["reference_words"])
    assert all(isinstance(r["hypothesis"], str) for r in data["per_utterance"])


def test_eval_dense_and_compressed(model_dir, manifest, table, tmp_path):
    rc, out, err = run_cli("eval", model_dir, "--data", manifest, "--json", "--normalizer", table,
                           "--max-new-tokens", "4", "--batch-size", "4")
    assert rc == 0, err
    dense = json.loads(out.strip().splitlines()[-1])
    check_report(dense, 6)
    assert dense["normalizer"] == str(table) and dense["truncated"] == 1
    assert sorted(dense["per_speaker"]) == ["ann", "bob"]
    assert dense["per_utterance"][0]["reference"] == "zero"  # manifest order is kept
    hyps = [r["normalised_hypothesis"] for r in dense["per_utterance"]]
    assert any(hyps), "the random model should say something for some clip; the S/I counts are then exercised"

    rc, _, err = run_cli("compress", model_dir, "--out", tmp_path / "small", "--ratio", "0.3")
    assert rc == 0, err
    assert (tmp_path / "small" / "preprocessor_config.json").is_file()
    runs = []
    for _ in range(2):  # greedy decoding: the same words every time
        rc, out, err = run_cli("eval", tmp_path / "small", "--data", manifest, "--json", "--max-new-tokens", "4")
        assert rc == 0, err
        runs.append(json.loads(out.strip().splitlines()[-1]))
        check_report(runs[-1], 6)
    assert runs[0]["per_utterance"] == runs[1]["per_utterance"]

    rc, out, err = run_cli("eval", tmp_path / "small", "--data", manifest, "--max-new-tokens", "4")
    assert rc == 0, err
    assert f"WER {100 * runs[0]['wer']:.2f} %" in out and "95 % CI" in out
    assert "1 clip(s) are longer than the feature extractor's 1 s window" in out
    assert any(line.split()[:2] == ["ann", "3"] for line in out.splitlines())  # speaker, utterances


def test_eval_ctc_dense_and_compressed(manifest, tmp_path):
    """A wav2vec2 CTC recogniser: greedy CTC decoding (repeats merged, blanks dropped, batch padding blanked), the
    same words in batches of 6 as one clip at a time, on the dense folder and on a compressed save. `adapt`, which
    trains sequence-to-sequence models, refuses it by name."""
    model = save_ctc_dir(tmp_path / "ctc")
    runs = {}
    for folder in (model, tmp_path / "small"):
        if folder.name == "small":
            rc, _, err = run_cli("compress", model, "--out", folder, "--ratio", "0.3")
            assert rc == 0, err
        for batch in ("1", "6"):
            rc, out, err = run_cli("eval", folder, "--data", manifest, "--json", "--batch-size", batch,
                                   "--normalizer", "basic")
            assert rc == 0, err
            assert f"with Wav2Vec2ForCTC (batch {batch}, greedy)" in err
            runs[folder.name, batch] = json.loads(out.strip().splitlines()[-1])
            check_report(runs[folder.name, batch], 6)
        assert runs[folder.name, "1"]["per_utterance"] == runs[folder.name, "6"]["per_utterance"]
    hyps = [r["hypothesis"] for r in runs["ctc", "1"]["per_utterance"]]
    assert any(hyps) and all(set(h) <= set("abcdefghijklmnopqrstuvwxyz ") for h in hyps)
    assert not any("<pad>" in h or "  " in h for h in hyps)
    rc, _, err = run_cli("adapt", model, "--data", manifest, "--out", tmp_path / "adapted")
    assert rc == 2 and "is a CTC model: adapt trains sequence-to-sequence recognisers" in err


def test_group_norm_ctc_models_never_see_padding(manifest, tmp_path):
    """wav2vec2-base's kind (a GroupNorm feature encoder, no attention mask) is changed everywhere by padding:
    eval runs each clip length on its own, so a batch gives the words each clip gives alone, and its calibration
    batches hold clips of one length. Too short a clip for one frame is refused by name, in eval and in
    calibration (the convolution failed with a traceback, and only when the clip was alone in its batch)."""
    from transformers import AutoFeatureExtractor, Wav2Vec2ForCTC

    from adaptwin.speech.audio import load_audio
    from adaptwin.speech.calibration import calibration_batches, min_audio_samples
    from adaptwin.speech.datasets import load_dataset

    folder = save_ctc_dir(tmp_path / "ctc", group_norm=True)
    model, fe = Wav2Vec2ForCTC.from_pretrained(folder).eval(), AutoFeatureExtractor.from_pretrained(folder)
    utts = load_dataset(manifest)
    clips = [load_audio(u.audio, 16000) for u in utts]
    padded = fe(clips[:2], sampling_rate=16000, return_tensors="pt", padding=True)
    assert "attention_mask" not in padded
    with torch.no_grad():  # the check can fail: padding changes the shorter clip's every frame
        alone = model(**fe(clips[:1], sampling_rate=16000, return_tensors="pt")).logits[0]
        together = model(**padded).logits[0, :len(alone)]
    assert (alone - together).abs().max() > 1e-3
    runs = []
    for batch in ("1", "6"):
        rc, out, err = run_cli("eval", folder, "--data", manifest, "--json", "--batch-size", batch,
                               "--normalizer", "basic")
        assert rc == 0, err
        runs.append(json.loads(out.strip().splitlines()[-1])["per_utterance"])
    assert runs[0] == runs[1]
    batches = calibration_batches(model, fe, None, utts + utts[:1] * 3, batch_size=2)
    assert [tuple(b["input_values"].shape[:1]) for b in batches] == [(1,)] * 6 + [(2,), (1,)]
    assert all("attention_mask" not in b for b in batches)
    # a clip shorter than the convolutions' span (here 5·(3 - 1) + 10 = 20 samples; wav2vec2's is 400)
    assert min_audio_samples(model) == 20
    write_wav(tmp_path / "short.wav", np.full(19, 0.1), 16000)
    (tmp_path / "short.jsonl").write_text(json.dumps({"audio": "short.wav", "text": "one"}) + "\n")
    for batch in ("1", "2"):
        rc, _, err = run_cli("eval", folder, "--data", tmp_path / "short.jsonl", "--batch-size", batch)
        assert rc == 2 and "short.wav: 19 samples (1.2 ms at 16000 Hz) is shorter than Wav2Vec2ForCTC's first " \
                           "frame, 20 samples (1.2 ms)" in err, err
    rc, _, err = run_cli("compress", folder, "--out", tmp_path / "x", "--ratio", "0.4", "--calib",
                         tmp_path / "short.jsonl")
    assert rc == 2 and "short.wav: 19 samples" in err and not (tmp_path / "x").exists()


def test_transcripts_longer_than_the_decoder_are_refused(model_dir, manifest, tmp_path):
    """A transcript past Whisper's decoder positions (max_target_positions) is refused by name before any work,
    by `compress --calib` (was an IndexError traceback from the position embedding) and by `adapt` (was
    Hugging Face's error without the clip, after quantising)."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[1]["text"] = " ".join(WORDS[4:8] * 5)  # 20 words, past the tiny decoder's 16 positions
    for r in rows:
        r["audio"] = str(manifest.parent / r["audio"])
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    rc, _, err = run_cli("compress", model_dir, "--out", tmp_path / "x", "--ratio", "0.4", "--calib", long)
    assert rc == 2 and "c1.wav: its transcript is 21 decoder tokens, more than WhisperForConditionalGeneration's " \
                       "16 (max_target_positions)" in err, err
    rc, _, err = run_cli("adapt", model_dir, "--data", long, "--out", tmp_path / "y", "--epochs", "1")
    assert rc == 2 and "c1.wav: its transcript is 21 decoder tokens" in err, err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_eval_and_adapt_small_refusals_and_warnings(model_dir, manifest, tmp_path):
    """Found by the speech audit of 2026-11-26: each was a late, silent or Python-worded outcome before."""
    ctc = save_ctc_dir(tmp_path / "ctc")
    rc, _, err = run_cli("eval", ctc, "--data", manifest, "--max-new-tokens", "4")  # was silently ignored
    assert rc == 2 and "--max-new-tokens limits generate(); Wav2Vec2ForCTC is a CTC model" in err
    rc, _, err = run_cli("adapt", model_dir, "--data", manifest, "--out", tmp_path / "a", "--seed", "-3")
    assert rc == 2 and "--seed must be a whole number in [0, 2**63), got -3" in err  # before loading, by flag
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    punct = tmp_path / "punct.jsonl"
    punct.write_text("".join(json.dumps({**r, "audio": str(manifest.parent / r["audio"]), "text": "?!"}) + "\n"
                             for r in rows))
    rc, _, err = run_cli("eval", model_dir, "--data", punct, "--normalizer", "basic")
    assert rc == 2 and "every reference is empty after normalisation (e.g. " in err and "'?!' -> ''" in err
    rc, _, err = run_cli("compress", ctc, "--out", tmp_path / "c", "--ratio", "0.3")
    assert rc == 0
    rc, _, err = run_cli("compress", tmp_path / "c", "--out", tmp_path / "d", "--ratio", "0.3")
    assert rc == 2 and "is an adaptwin save, already compressed; compress takes the original" in err


def test_eval_warns_when_normalisation_merges_words(tmp_path):
    """Whisper's English normaliser writes spelled-out numbers as digits: a digit sequence becomes one word, and
    the WER counts whole numbers; eval says so (and --normalizer basic keeps the words)."""
    from adaptwin.speech.wer import english_normalizer

    try:
        norm = english_normalizer(tmp_path, None)
    except (ValueError, FileNotFoundError, OSError):
        pytest.skip("no Whisper English spelling table here (the shared data folder's whisper-assets)")
    assert norm("seven three one") == "731"
    folder = save_model_dir(tmp_path / "whisper")
    write_wav(tmp_path / "a.wav", 0.1 * np.sin(np.arange(8000) / 5), 16000)
    (tmp_path / "m.jsonl").write_text(json.dumps({"audio": "a.wav", "text": "seven three one"}) + "\n")
    rc, out, err = run_cli("eval", folder, "--data", tmp_path / "m.jsonl", "--max-new-tokens", "2")
    assert rc == 0, err
    assert "warning: normalisation turned the transcripts' 3 words into 1" in out
    rc, out, err = run_cli("eval", folder, "--data", tmp_path / "m.jsonl", "--max-new-tokens", "2",
                           "--normalizer", "basic")
    assert rc == 0 and "normalisation turned" not in out


def test_eval_selects_speaker_and_limit(model_dir, manifest):
    rc, out, err = run_cli("eval", model_dir, "--data", manifest, "--json", "--speaker", "ann", "--limit", "2",
                           "--max-new-tokens", "2", "--threads", "2")
    assert rc == 0, err
    assert torch.get_num_threads() == 1  # the module's setting is back after the command
    data = json.loads(out.strip().splitlines()[-1])
    check_report(data, 2)
    assert list(data["per_speaker"]) == ["ann"] and [r["audio"][-6:] for r in data["per_utterance"]] == [
        "c1.wav", "c3.wav"]


def assert_user_error(rc: int, err: str, expected: str) -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert lines and expected in lines[-1], err
    assert lines[-1].startswith(("adaptwin eval: error:", "usage:")) or "error: argument" in lines[-1]


def test_eval_bad_input(model_dir, manifest, tmp_path):
    def fails(*args, expected: str) -> None:
        rc, out, err = run_cli("eval", *args)
        assert_user_error(rc, err, expected)
        assert out == ""

    fails(model_dir, "--data", tmp_path / "none", expected="none does not exist")
    fails(model_dir, "--data", manifest, "--speaker", "zed", expected="--speaker 'zed' has no utterances")
    fails(model_dir, "--data", manifest, "--batch-size", "0", expected="expected a whole number >= 1, got 0")
    fails(model_dir, "--data", manifest, "--normalizer", tmp_path / "n.json", expected="n.json does not exist")
    fails(tmp_path / "nomodel", "--data", manifest, expected="nomodel does not exist")
    for missing, expected in (("preprocessor_config.json", "has no feature extractor"),
                              ("tokenizer.json", "has no tokenizer")):
        bare = tmp_path / f"no-{missing}"
        shutil.copytree(model_dir, bare)
        (bare / missing).unlink()
        fails(bare, "--data", manifest, expected=expected)


# ---------------------------------------------------------------------------------------------- transcribe


class StubModel(torch.nn.Module):
    """Records what generate() is given and answers with one word per call, so order and batching show."""

    main_input_name = "input_features"

    def __init__(self, **generation_config):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        self.generation_config = type("GenerationConfig", (), generation_config)()
        self.calls: list[tuple[tuple[int, ...], torch.dtype, dict]] = []

    def generate(self, input_features, **kwargs):
        self.calls.append((tuple(input_features.shape), input_features.dtype, kwargs))
        word = WORDS.index("zero") + len(self.calls)  # call k answers WORDS[4 + k]
        return torch.tensor([[1, word, 2]] * input_features.shape[0])


def test_transcribe_batches_in_order(tmp_path):
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=16, sampling_rate=16000, hop_length=160, chunk_length=1, n_fft=400)
    utts = [Utterance(str(i), write_wav(tmp_path / f"{i}.wav", 0.1 * np.ones(800 + 400 * i), 8000), "x", "s")
            for i in range(5)]
    model = StubModel()
    texts = transcribe(model, fe, tokenizer(), utts, batch_size=2, max_new_tokens=3)
    assert texts == ["one", "one", "two", "two", "three"]
    assert [c[0] for c in model.calls] == [(2, 16, 100), (2, 16, 100), (1, 16, 100)]  # padded to the 1 s window
    assert all(c[1] == torch.float64 for c in model.calls)  # features follow the model's dtype
    assert model.calls[0][2] == {"do_sample": False, "num_beams": 1, "max_new_tokens": 3}  # no pad token known

    english = StubModel(lang_to_id={"<|en|>": 50259, "<|de|>": 50261})
    transcribe(english, fe, tokenizer(), utts[:1])
    assert english.calls[0][2] == {"do_sample": False, "num_beams": 1, "language": "en", "task": "transcribe"}
    assert generate_kwargs(StubModel(lang_to_id={"<|de|>": 1})) == {"do_sample": False, "num_beams": 1}
    # A pad token apart from the end token is never a word: suppressed, beside what the config suppresses.
    assert generate_kwargs(StubModel(pad_token_id=0, eos_token_id=2, suppress_tokens=[7]))["suppress_tokens"] == [0, 7]
    assert "suppress_tokens" not in generate_kwargs(StubModel(pad_token_id=2, eos_token_id=2))  # as in Whisper
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        transcribe(model, fe, tokenizer(), utts, batch_size=0)


def test_english_multilingual_whisper_transcribes(tmp_path):
    """A generation config that knows <|en|> (as real multilingual Whisper's does) gets language="en",
    task="transcribe" through Whisper's own generate(), which then checks the ids it is given."""
    from tiny_models import whisper
    from transformers import WhisperFeatureExtractor

    model = whisper()  # 16 mel bins, 50 input frames, 64 tokens
    gc = model.generation_config
    gc.lang_to_id, gc.task_to_id = {"<|de|>": 59, "<|en|>": 60}, {"transcribe": 61, "translate": 62}
    gc.no_timestamps_token_id, gc.is_multilingual = 63, True
    fe = WhisperFeatureExtractor(feature_size=16, sampling_rate=16000, hop_length=320, chunk_length=1, n_fft=400)
    utts = [Utterance(str(i), write_wav(tmp_path / f"{i}.wav", 0.2 * np.sin(np.arange(4000 * (i + 1)) / 9), 16000),
                      "x", "s") for i in range(3)]
    texts = transcribe(model, fe, tokenizer(), utts, batch_size=2, max_new_tokens=4)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert transcribe(model, fe, tokenizer(), utts, batch_size=3, max_new_tokens=4) == texts  # batching-invariant


def test_wav2vec2_calibration_counts_real_frames_only(manifest, tmp_path, monkeypatch):
    """wav2vec2's attention_mask marks samples, its layers see frames: the fine-tuning loss, its errors and the
    whitening statistics count the real frames only, so they do not depend on how clips are padded together."""
    from transformers import AutoFeatureExtractor, Wav2Vec2ForCTC

    from adaptwin import CompressionConfig, FinetuneConfig
    from adaptwin.finetune import stats, trainer
    from adaptwin.finetune.capture import frame_mask
    from adaptwin.speech.calibration import calibration_batches
    from adaptwin.speech.datasets import load_dataset

    ctc = save_ctc_dir(tmp_path / "ctc")
    model, fe = Wav2Vec2ForCTC.from_pretrained(ctc).eval(), AutoFeatureExtractor.from_pretrained(ctc)
    utts = load_dataset(manifest)[1:3]  # 0.7 s and 1.4 s: the first is half padding when batched together
    padded = calibration_batches(model, fe, None, utts, batch_size=2)
    alone = calibration_batches(model, fe, None, utts, batch_size=1)
    with torch.no_grad():
        lengths = [model(**b, output_hidden_states=True).hidden_states[1].shape[1] for b in alone]
        width = model(**padded[0], output_hidden_states=True).hidden_states[1].shape[1]
    (masks,) = trainer.token_masks(padded, "encoder", model)
    frames = masks[-1]
    assert tuple(frames.shape) == (2, width) and frames.sum(1).tolist() == lengths and lengths[0] < width

    def errors(batches, init="svd"):
        small = adaptwin.compress(model, CompressionConfig(ratio=0.4), calibration=batches,
                                  finetune=FinetuneConfig(epochs=1, lr=1e-4, init=init, holdout=0.0))
        return [r["error_before"] for r in small.adaptwin_record.finetune["layers"]]

    for init in ("svd", "whiten"):
        assert errors(padded, init) == pytest.approx(errors(alone, init), rel=1e-4)
    # the check can fail: counting the padded frames (what happened before) changes the errors
    monkeypatch.setattr(trainer, "frame_mask", lambda model, batch: None)
    monkeypatch.setattr(stats, "frame_mask", lambda model, batch: None)
    assert frame_mask(model, padded[0]) is not None
    assert errors(padded) != pytest.approx(errors(alone), rel=1e-2)


def test_compress_fine_tunes_speech_models_on_a_speech_set(model_dir, manifest, tmp_path):
    """`compress --calib` takes a speech set for speech models: Whisper's decoder is fed the transcripts (its
    decoder layer is fine-tuned on real positions), a wav2vec2 CTC model the raw audio; --calib-speaker keeps one
    speaker's clips. A text file for a speech model, or a speech set for a text model, is refused by name."""
    ctc = save_ctc_dir(tmp_path / "ctc")
    for model, extra, speakers in ((model_dir, (), 6), (model_dir, ("--calib-speaker", "ann"), 3), (ctc, (), 6)):
        out = tmp_path / f"out-{model.name}-{len(extra)}"
        rc, stdout, err = run_cli("compress", model, "--out", out, "--ratio", "0.4", "--calib", manifest,
                                  "--epochs", "2", "--batch-size", "2", *extra)
        assert rc == 0, err
        assert f"on {speakers} utterances in {-(-speakers // 2)} batches" in err
        layers = adaptwin.read_meta(out)["compression"]["finetune"]["layers"]
        assert layers and all(r["error_after"] <= r["error_before"] for r in layers)
        if model is model_dir:
            assert any(r["path"].startswith("model.decoder.") for r in layers)
        rc, _, err = run_cli("eval", out, "--data", manifest, "--json",
                             *(("--max-new-tokens", "4") if model is model_dir else ()))
        assert rc == 0, err
    rc, _, err = run_cli("compress", model_dir, "--out", tmp_path / "x", "--ratio", "0.4", "--calib", manifest,
                         "--calib-speaker", "nobody")
    assert rc == 2 and "--calib-speaker 'nobody' has no utterances" in err
    text = tmp_path / "calib.txt"
    text.write_text("one two three\n")
    rc, _, err = run_cli("compress", model_dir, "--out", tmp_path / "x", "--ratio", "0.4", "--calib", text)
    assert rc == 2 and "takes audio (input_features): --calib must be a speech set" in err
    assert not (tmp_path / "x").exists()
