"""The digit benchmark's data synthesis, evaluation sets and training script (benchmarks/digits/).

Reads the Free Spoken Digit Dataset in ../shared/data/fsdd and skips where it is absent. The training run
here is a 3-step run of the tiny size: it checks that the folder written reloads through the Auto classes
and transcribes, not that the model recognises anything (the real run is minutes, see train.py).
The crossover and residual benchmarks run end to end on tiny random recognisers and synthetic audio.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.digits.data import (
    CALIB_TAKES,
    DIGIT_WORDS,
    MAX_SECONDS,
    SAMPLING_RATE,
    SPEAKERS,
    TEST_TAKES,
    TRAIN_TAKES,
    ClipBank,
    draw_sequences,
    scan_fsdd,
)
from benchmarks.digits.make_sets import calib_sequences, heldout_sequences, write_sets

FSDD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fsdd"


@pytest.fixture(scope="module")
def clips():
    if not FSDD.is_dir():
        pytest.skip(f"{FSDD} is absent (the shared data folder is only on the project's machines)")
    return scan_fsdd(FSDD)


def test_splits_are_disjoint():
    assert set(TRAIN_TAKES).isdisjoint(TEST_TAKES)
    assert set(CALIB_TAKES) <= set(TRAIN_TAKES)
    assert sorted(TRAIN_TAKES + TEST_TAKES) == list(range(50))


def test_synthesis_is_deterministic(clips):
    a = draw_sequences(clips, "lucas", TRAIN_TAKES, 40, seed=3)
    b = draw_sequences(clips, "lucas", TRAIN_TAKES, 40, seed=3)
    c = draw_sequences(clips, "lucas", TRAIN_TAKES, 40, seed=4)
    assert a == b
    assert a != c
    bank = ClipBank({clip for q in a for clip in q.clips})
    np.testing.assert_array_equal(bank.render(a[0]), ClipBank(a[0].clips).render(a[0]))
    lengths = {len(q.clips) for q in a}
    assert lengths <= set(range(1, 6)) and len(lengths) > 1  # 1-5 digits, not all the same length
    for q in a:
        audio = bank.render(q)
        assert q.text == " ".join(DIGIT_WORDS[c.digit] for c in q.clips)
        assert {c.speaker for c in q.clips} == {"lucas"}  # one voice per sequence
        assert all(800 <= g <= 4000 for g in q.gaps[1:])  # 0.05-0.25 s at 16 kHz
        assert audio.dtype == np.float32 and len(audio) / SAMPLING_RATE <= MAX_SECONDS


def test_takes_never_mix(clips):
    for s in SPEAKERS:
        takes = {t for q in heldout_sequences(clips, s, 60, seed=0) for t in q.takes}
        assert takes <= set(TEST_TAKES) and len(takes) > 5
        train = {t for q in draw_sequences(clips, s, TRAIN_TAKES, 60, seed=0) for t in q.takes}
        assert train <= set(TRAIN_TAKES)
    calib = calib_sequences(clips, 60, seed=0)
    assert {q.speaker for q in calib} == {"jackson"}
    assert {t for q in calib for t in q.takes} <= set(CALIB_TAKES)


def test_training_batches_use_training_takes_only(clips):
    from benchmarks.digits.batches import Batches
    from benchmarks.digits.train import VOCAB, build_feature_extractor, build_tokenizer

    batches = Batches(clips, 0, build_feature_extractor(), build_tokenizer())
    assert {c.take for c in batches.bank.audio} == set(TRAIN_TAKES)
    feats, labels, frames = batches.draw(3)
    assert tuple(feats.shape) == (3, 80, 300) and tuple(frames.shape) == (3, 150)
    assert ((labels == -100) | ((labels >= 0) & (labels < 14))).all()
    for row in range(3):
        digits = [int(t) - VOCAB["zero"] for t in labels[row] if t >= VOCAB["zero"]]
        # The frame targets name the same digits in the same order (runs of one digit value, silences between).
        runs = [int(v) - 1 for i, v in enumerate(frames[row]) if v > 0 and (i == 0 or frames[row, i - 1] != v)]
        assert runs == digits
    # Speed/gain perturbation keeps the frame targets on the (moved) digits.
    aug = Batches(clips, 0, build_feature_extractor(), build_tokenizer(), augment=True)
    feats, labels, frames = aug.draw(4)
    assert tuple(feats.shape) == (4, 80, 300)
    for row in range(4):
        digits = [int(t) - VOCAB["zero"] for t in labels[row] if t >= VOCAB["zero"]]
        runs = [int(v) - 1 for i, v in enumerate(frames[row]) if v > 0 and (i == 0 or frames[row, i - 1] != v)]
        assert runs == digits
    # SpecAugment: the same draw with masks differs from the plain one only where set to the utterance's mean.
    plain = Batches(clips, 0, build_feature_extractor(), build_tokenizer()).draw(4)[0]
    masked = Batches(clips, 0, build_feature_extractor(), build_tokenizer(), spec_augment=True).draw(4)[0]
    assert not torch.equal(plain, masked)
    for f, g in zip(plain, masked):
        changed = f != g
        assert torch.allclose(g[changed], f.mean().expand(int(changed.sum())))
    # A speaker left out of training (for adaptation to an unseen voice) contributes no clip.
    some = Batches(clips, 0, build_feature_extractor(), build_tokenizer(), speakers=("george", "lucas"))
    assert set(some.pools) == {"george", "lucas"}
    with pytest.raises(ValueError, match="speakers must be a non-empty subset"):
        from benchmarks.digits.train import train

        train(FSDD, "unused", speakers=("alice",))


def test_weight_average_is_an_ema_from_its_start_step():
    import torch

    from benchmarks.digits.train import WeightAverage, train

    w = torch.nn.Parameter(torch.zeros(3))
    avg = WeightAverage([w], decay=0.75, start=2)
    expected = None
    for step, value in enumerate([5.0, 7.0, 1.0, 3.0, -2.0]):
        with torch.no_grad():
            w.fill_(value)
        avg.update(step)
        if step >= 2:
            expected = value if expected is None else 0.75 * expected + 0.25 * value
    avg.copy_to_params()
    torch.testing.assert_close(w.detach(), torch.full((3,), expected))  # 1 -> 1.5 -> 0.625
    assert expected == pytest.approx(0.625)
    with pytest.raises(ValueError, match="decay must lie in"):
        WeightAverage([w], decay=1.0, start=0)
    with pytest.raises(ValueError, match="dropout and ema must lie in"):
        train(FSDD, "unused", ema=1.5)
    with pytest.raises(ValueError, match=r"unknown precision 'fp16'; choose one of \['bf16', 'fp32'\]"):
        train(FSDD, "unused", precision="fp16")


def test_bad_input(tmp_path, clips):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_fsdd(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="holds no"):
        scan_fsdd(tmp_path)
    with pytest.raises(ValueError, match="unknown speaker 'alice'"):
        draw_sequences(clips, "alice", TEST_TAKES, 1, seed=0)
    with pytest.raises(ValueError, match="has no clip"):
        draw_sequences(clips, "george", (99,), 1, seed=0)


def test_manifests(tmp_path, clips):
    from adaptwin.speech.audio import load_audio
    from adaptwin.speech.datasets import load_dataset

    meta = write_sets(FSDD, tmp_path / "sets", per_speaker=3, calib=4, seed=5)
    out = tmp_path / "sets"
    assert meta == json.loads((out / "sets.json").read_text())
    test = load_dataset(out / "test.jsonl")
    assert len(test) == 3 * len(SPEAKERS) and {u.speaker for u in test} == set(SPEAKERS)
    for s in SPEAKERS:
        assert [u.id for u in load_dataset(out / f"test_{s}.jsonl")] == [u.id for u in test if u.speaker == s]
    calib = load_dataset(out / "jackson_calib.jsonl")
    assert len(calib) == 4 and {u.speaker for u in calib} == {"jackson"}
    for line in (out / "test.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert not Path(row["audio"]).is_absolute() and set(row["takes"]) <= set(TEST_TAKES)
        assert set(row["text"].split()) <= set(DIGIT_WORDS) and len(row["takes"]) == len(row["text"].split())
    expected = heldout_sequences(clips, "george", 3, seed=5)
    george = [u for u in test if u.speaker == "george"]
    assert [u.text for u in george] == [q.text for q in expected]
    audio = load_audio(george[0].audio, SAMPLING_RATE)
    reference = ClipBank(expected[0].clips).render(expected[0])
    assert len(audio) == len(reference)
    assert np.abs(audio - reference).max() < 1.5 / 32767  # 16-bit rounding only
    # The same seed writes byte-identical manifests.
    write_sets(FSDD, tmp_path / "again", per_speaker=3, calib=4, seed=5)
    for name in ("test.jsonl", "jackson_calib.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_tokenizer_round_trip():
    from benchmarks.digits.train import VOCAB, build_tokenizer

    tok = build_tokenizer()
    ids = tok("seven three nine", add_special_tokens=False)["input_ids"]
    assert ids == [VOCAB["seven"], VOCAB["three"], VOCAB["nine"]]
    padded = [VOCAB["<|startoftranscript|>"], *ids, VOCAB["<|endoftext|>"], VOCAB["<pad>"]]
    assert tok.batch_decode([padded], skip_special_tokens=True) == ["seven three nine"]


def test_tiny_training_run_reloads_and_generates(tmp_path, clips):
    import torch
    from transformers import AutoFeatureExtractor, AutoTokenizer, WhisperForConditionalGeneration

    from benchmarks.digits.train import train

    threads = torch.get_num_threads()
    log = train(FSDD, tmp_path / "model", steps=3, batch_size=4, size="tiny", threads=1, eval_per_speaker=1,
                log_every=1)
    assert log["precision"] == "bf16"  # the default: bf16 autocast, fp32 weights saved
    assert torch.get_num_threads() == threads  # settings restored for the caller
    out = tmp_path / "model"
    for name in ("config.json", "model.safetensors", "generation_config.json", "preprocessor_config.json",
                 "tokenizer.json", "tokenizer_config.json", "train_log.json"):
        assert (out / name).is_file(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    assert [h["step"] for h in log["history"]] == [1, 2, 3] and all(np.isfinite(h["loss"]) for h in log["history"])
    assert set(log["heldout"]["per_speaker"]) == set(SPEAKERS)

    model = WhisperForConditionalGeneration.from_pretrained(out)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    fe = AutoFeatureExtractor.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert 2 * model.config.max_source_positions == fe.nb_max_frames
    q = heldout_sequences(clips, "nicolas", 2, seed=0)
    bank = ClipBank({c for s in q for c in s.clips})
    feats = fe([bank.render(s) for s in q], sampling_rate=SAMPLING_RATE, return_tensors="pt")["input_features"]
    with torch.inference_mode():
        ids = model.generate(input_features=feats)
    assert ids.shape[0] == 2 and ids.shape[1] <= model.generation_config.max_length + 1
    for text in tok.batch_decode(ids, skip_special_tokens=True):
        assert set(text.split()) <= set(DIGIT_WORDS)


def tone_sets(sets: Path) -> Path:
    """``test.jsonl`` (6 utterances) and ``jackson_calib.jsonl`` (4) of synthetic tones with digit-word texts,
    two speakers: what the digit benchmarks read, without FFSD."""
    from tiny_speech import WORDS

    from adaptwin.speech.audio import write_wav

    rng = np.random.default_rng(0)
    manifests: dict[str, list[str]] = {"test.jsonl": [], "jackson_calib.jsonl": []}
    for i in range(10):
        words = [WORDS[4 + (i + k) % 10] for k in range(1 + i % 2)]
        t = np.arange(8000) / 16000
        write_wav(sets / "wavs" / f"u{i}.wav", 0.3 * np.sin(2 * np.pi * (200 + 40 * i) * t)
                  + 0.05 * rng.standard_normal(len(t)), 16000)
        row = {"audio": f"wavs/u{i}.wav", "text": " ".join(words), "speaker": ("jackson", "lucas")[i % 2],
               "id": f"u{i}"}
        manifests["jackson_calib.jsonl" if i >= 6 else "test.jsonl"].append(json.dumps(row))
    for name, texts in manifests.items():
        (sets / name).write_text("\n".join(texts) + "\n")
    return sets


def test_quant_crossover_on_a_tiny_model(tmp_path, capsys):
    """The speech crossover benchmark end to end on a tiny random Whisper and synthetic tones (no FSDD needed):
    rows for every provider, ratio and speaker, bytes ordered nf4 < int8 < fp32, and the tables and PNG."""
    import csv

    import torch
    from tiny_speech import save_model_dir

    from benchmarks.digits.quant_crossover import main
    from benchmarks.quant_crossover import crossover_lines, interpolate

    # The interpolation both crossover benchmarks use: linear in log bytes, None outside a curve.
    assert interpolate([(50.0, 20.0, 0.6), (200.0, 5.0, 0.2)], 100.0) == pytest.approx(12.5)
    assert interpolate([(50.0, 20.0, 0.6), (200.0, 5.0, 0.2)], 300.0) is None
    lines = crossover_lines({"fp32": [(100.0, 10.0, 0.5)], "nf4": [(50.0, 20.0, 0.6), (200.0, 5.0, 0.2)]}, "fp32",
                            ("nf4", "int8"), "WER %", higher_is_better=False, digits=2)
    assert "nf4: 12.50 (+2.50)" in lines[0] and "int8: outside its range" in lines[0]

    sets = tone_sets(tmp_path / "sets")
    model = save_model_dir(tmp_path / "model")
    out = tmp_path / "res" / "dqc.csv"
    threads = torch.get_num_threads()
    assert main(["--model", str(model), "--sets", str(sets), "--fp-ratios", "0.4", "0.6", "--q-ratios", "0.3", "0.6",
                 "--batch", "2", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads  # restored for the caller
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    got = {(r["provider"], float(r["ratio"])) for r in rows}
    assert got == {("dense", 0.0), ("fp32", 0.4), ("fp32", 0.6), ("nf4", 0.3), ("nf4", 0.6), ("int8", 0.3),
                   ("int8", 0.6), ("dense_nf4", 0.0), ("dense_int8_dynamic", 0.0)}
    assert {r["speaker"] for r in rows} == {"jackson", "lucas", "others"}
    at = {(r["provider"], float(r["ratio"])): r for r in rows if r["speaker"] == "jackson"}
    assert int(at["nf4", 0.6]["bytes"]) < int(at["int8", 0.6]["bytes"]) < int(at["fp32", 0.6]["bytes"])
    # fp32 factors hold 32 bits per parameter; the fractions count against the dense attention + FFN fp32 bytes.
    assert float(at["fp32", 0.6]["bits_per_param"]) == 32.0
    assert float(at["dense", 0.0]["bytes_fraction"]) == 1.0
    assert 0.3 < float(at["fp32", 0.6]["bytes_fraction"]) < 0.5  # 60 % of the parameters removed
    # the peers quantise the same attention + FFN matrices, unfactored: 4.13 and 8 bits per weight, fp32 biases
    assert int(at["dense_nf4", 0.0]["params"]) == int(at["dense", 0.0]["params"])
    assert 0.1 < float(at["dense_nf4", 0.0]["bytes_fraction"]) < 0.2
    assert 0.25 < float(at["dense_int8_dynamic", 0.0]["bytes_fraction"]) < 0.32
    assert all(0.0 <= float(r["wer"]) for r in rows)
    printed = capsys.readouterr().out
    assert "crossover, jackson" in printed and "fp32 ratio 0.4" in printed
    if importlib.util.find_spec("matplotlib") is not None:  # the plot is optional (the `bench` extra)
        assert out.with_suffix(".png").stat().st_size > 1000
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # atomic writes left nothing behind


# ------------------------------------------------------------------------------- residual benchmark rows


def _digit_bench_dirs(root):
    """A 3-encoder-layer word-level Whisper (tiny_speech's vocabulary and features) and test / calibration
    manifests of noise clips for two speakers: what `benchmarks.digits.residual` reads."""
    import tiny_speech as ts
    import torch
    from tiny_models import reinit
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from adaptwin.speech.audio import write_wav

    cfg = WhisperConfig(vocab_size=len(ts.WORDS), d_model=32, encoder_layers=3, decoder_layers=1,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        num_mel_bins=16, max_source_positions=50, max_target_positions=16, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, begin_suppress_tokens=None,
                        suppress_tokens=None)
    torch.manual_seed(0)
    model_dir, sets = root / "model", root / "sets"
    reinit(WhisperForConditionalGeneration(cfg), seed=2, std=0.2).save_pretrained(model_dir)
    ts.feature_extractor().save_pretrained(model_dir)
    ts.tokenizer().save_pretrained(model_dir)
    (sets / "wavs").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = {"test": [], "jackson_calib": []}
    for name, speakers, n in (("test", ("jackson", "lucas"), 2), ("jackson_calib", ("jackson",), 8)):
        for s in speakers:
            for i in range(n):
                wav = f"wavs/{name}_{s}_{i}.wav"
                write_wav(sets / wav, (0.1 * rng.standard_normal(8000)).astype(np.float32), 16000)
                rows[name].append({"audio": wav, "text": " ".join(ts.WORDS[4 + (i + j) % 10] for j in range(2)),
                                   "speaker": s, "id": f"{name}_{s}_{i}"})
    for name, lines in rows.items():
        (sets / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return model_dir, sets


@pytest.mark.usefixtures("one_thread")
def test_digits_residual_benchmark_rows(tmp_path, capsys):
    """benchmarks.digits.residual on a tiny recogniser: a row per speaker and method, AdaPTwin at the residual's
    size, the whitened fit's lower output error, a CSV, a PNG and the printed table."""
    import csv

    from benchmarks.digits.residual import main

    model_dir, sets = _digit_bench_dirs(tmp_path)
    out, png = tmp_path / "r.csv", tmp_path / "r.png"
    pytest.importorskip("matplotlib")
    assert main(["--model", str(model_dir), "--sets", str(sets), "--groups", "2", "--ranks", "4", "--epochs", "1",
                 "--batch", "4", "--out", str(out), "--png", str(png)]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    by = {(r["method"], r["speaker"]): r for r in rows}
    methods = ["dense", "residual", "residual-whiten", "residual+ft", "adaptwin", "adaptwin+ft"]
    assert sorted({r["method"] for r in rows}) == sorted(methods)
    assert {r["speaker"] for r in rows} == {"jackson", "lucas", "others"}
    res, ada = by[("residual", "jackson")], by[("adaptwin", "jackson")]
    # d = 32, K = 2 over 3 layers (groups {0, 1}, {2}): the shared S halves layers 0-1 only
    assert 1.0 < float(res["size_factor"]) < 2.0 and float(res["encoder_factor"]) > 1.0
    assert float(ada["size_factor"]) == pytest.approx(float(res["size_factor"]), rel=0.05)  # equal parameter count
    assert float(by[("residual-whiten", "jackson")]["output_err"]) < float(res["output_err"])
    assert all(0.0 <= float(r["wer"]) for r in rows) and png.stat().st_size > 0
    assert "residual-whiten" in capsys.readouterr().out


def test_side_by_side_on_a_tiny_model(tmp_path, capsys):
    """The side-by-side benchmark end to end on a tiny random Whisper and synthetic tones: every provider in both
    dtypes (the int8 peer in float32 only), three WER rows each, sizes in the expected order, speeds timed."""
    import csv

    from tiny_speech import save_model_dir

    from benchmarks.digits import side_by_side

    sets = tone_sets(tmp_path / "sets")
    model = save_model_dir(tmp_path / "model")
    out = tmp_path / "sbs.csv"
    assert side_by_side.main(["--model", str(model), "--sets", str(sets), "--timed", "4", "--repeats", "1",
                              "--threads", "1", "--out", str(out)]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    want = {(p, d) for p in side_by_side.PROVIDERS for d in ("fp32", "bf16")} - {("dense_int8", "bf16")}
    assert {(r["provider"], r["dtype"]) for r in rows} == want
    assert {r["speaker"] for r in rows} == {"jackson", "others", "all"}
    every = {(r["provider"], r["dtype"]): r for r in rows if r["speaker"] == "all"}
    assert int(every["dense", "fp32"]["words"]) == 9 and all(0 <= float(r["wer"]) for r in every.values())
    assert float(every["dense", "fp32"]["time_ratio"]) == 1.0 and float(every["dense", "bf16"]["time_ratio"]) == 1.0
    assert all(float(r["ms_per_utterance"]) > 0 and float(r["real_time_factor"]) > 0 for r in every.values())
    mb = {k: float(r["weight_mb"]) for k, r in every.items()}
    assert mb["adaptwin_nf4", "fp32"] < mb["adaptwin_int8", "fp32"] < mb["adaptwin", "fp32"] < mb["dense", "fp32"]
    assert mb["pqm_nf4", "fp32"] < mb["dense", "fp32"] and mb["dense", "bf16"] < mb["dense", "fp32"]
    assert "time/dense" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        side_by_side.main(["--providers", "adaptwin"])  # no dense baseline
    with pytest.raises(SystemExit):
        side_by_side.main(["--ratio", "1.5"])
