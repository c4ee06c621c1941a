"""adaptwin.speech: audio reading and resampling, test-set readers, WER with Whisper's normaliser, evaluation.

Synthetic files are written in tmp_path; the real recordings in ../shared/data are read where present
(skipped with a reason elsewhere). The end-to-end `adaptwin eval` tests are in tests/test_eval_cli.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from adaptwin.speech import wer as wer_mod
from adaptwin.speech.audio import load_audio, resample, write_wav
from adaptwin.speech.datasets import Utterance, load_dataset
from adaptwin.speech.wer import TextNormalizer, english_normalizer, utterance_errors, wer_report

sf = pytest.importorskip("soundfile", reason="pip install soundfile (an adaptwin dependency) for the audio tests")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def needs_data(name: str) -> Path:
    path = DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared data folder is only on the project's machines)")
    return path


def tone(freq: float, rate: int, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return amplitude * np.sin(2 * np.pi * freq * t)


def peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spectrum)])


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


@pytest.fixture(params=["soxr", "scipy"])
def resampler(request, monkeypatch):
    """Both resampling paths: soxr, and scipy's resample_poly where soxr cannot be imported."""
    if request.param == "soxr":
        pytest.importorskip("soxr", reason="pip install soxr")
    else:
        pytest.importorskip("scipy.signal", reason="scipy is the fallback resampler")
        monkeypatch.setitem(sys.modules, "soxr", None)  # `import soxr` now raises ImportError
    return request.param


# ---------------------------------------------------------------------------------------------- audio

# (container, subtype, worst absolute error after a round trip): half a quantisation step of the format,
# rounded up to one step; float formats are limited by the float32 that load_audio returns.
FORMATS = [
    ("wav", "PCM_U8", 2 ** -7), ("wav", "PCM_16", 2 ** -15), ("wav", "PCM_24", 2 ** -23),
    ("wav", "PCM_32", 1e-7), ("wav", "FLOAT", 1e-7), ("wav", "DOUBLE", 1e-7),
    ("flac", "PCM_S8", 2 ** -7), ("flac", "PCM_16", 2 ** -15), ("flac", "PCM_24", 2 ** -23),
]


@pytest.mark.parametrize("container,subtype,tol", FORMATS)
def test_bit_depths_read_back_at_full_scale(tmp_path, container, subtype, tol):
    x = tone(440, 16000, 0.25, amplitude=0.7)
    path = tmp_path / f"a.{container}"
    sf.write(path, x, 16000, subtype=subtype)
    y = load_audio(path)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.abs(y - x).max() <= tol


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT"])
def test_wav_without_soundfile_reads_the_same(tmp_path, monkeypatch, subtype):
    pytest.importorskip("scipy.io", reason="scipy reads wav where soundfile is absent")
    x = tone(300, 8000, 0.25, amplitude=0.6)
    sf.write(tmp_path / "a.wav", np.stack([x, -x / 3], axis=1), 8000, subtype=subtype)
    expected = load_audio(tmp_path / "a.wav", 8000)
    monkeypatch.setitem(sys.modules, "soundfile", None)
    got = load_audio(tmp_path / "a.wav", 8000)
    # Both scale integer PCM by its full range; they may differ by one step in how 8-bit is centred.
    assert np.abs(got - expected).max() <= (2 ** -7 if subtype == "PCM_U8" else 1e-7)
    (tmp_path / "x.flac").write_bytes(b"fLaC")
    with pytest.raises(ValueError, match="only .wav can be read without the soundfile package"):
        load_audio(tmp_path / "x.flac")


def test_channels_are_averaged(tmp_path):
    left = tone(500, 16000, 0.2, amplitude=0.6)
    right = tone(900, 16000, 0.2, amplitude=0.2)
    for n, channels in ((2, [left, right]), (4, [left, right, left, right])):
        sf.write(tmp_path / f"c{n}.wav", np.stack(channels, axis=1), 16000, subtype="FLOAT")
        np.testing.assert_allclose(load_audio(tmp_path / f"c{n}.wav"), (left + right) / 2, atol=1e-6)


@pytest.mark.parametrize("rate,freq", [(8000, 1000.0), (44100, 3000.0), (22050, 440.0), (48000, 5000.0)])
def test_resampling_keeps_a_tones_frequency_and_level(tmp_path, resampler, rate, freq):
    sf.write(tmp_path / "t.wav", tone(freq, rate), rate, subtype="FLOAT")
    y = load_audio(tmp_path / "t.wav", 16000)
    assert len(y) == 16000  # 1 s at the new rate
    assert abs(peak_hz(y, 16000) - freq) <= 1.0  # 1 Hz bins
    # Level: a tone well inside both passbands keeps its RMS (0.5/sqrt 2) within 0.5 %; edges excluded.
    assert rms(y[200:-200]) == pytest.approx(0.5 / np.sqrt(2), rel=5e-3)


def test_resampling_removes_tones_above_the_new_nyquist(resampler):
    # 10 kHz cannot exist at 16 kHz; a naive (linear-interpolation) resampler folds it to 6 kHz at about
    # half its level. Measured leftovers: soxr 7e-8, resample_poly 1.4e-3 of the input RMS; floor 1e-2.
    x = tone(10000, 44100)
    assert rms(resample(x, 44100, 16000)[200:-200]) < 1e-2 * rms(x)


def test_samples_are_clipped_into_range(tmp_path):
    sf.write(tmp_path / "loud.wav", np.array([0.0, 1.7, -3.0, 0.25]), 16000, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(tmp_path / "loud.wav"), np.array([0.0, 1.0, -1.0, 0.25], np.float32))


def test_bad_audio_files_are_named(tmp_path):
    (tmp_path / "text.wav").write_text("this is not audio")
    (tmp_path / "zero.flac").write_bytes(b"")
    sf.write(tmp_path / "ok.wav", tone(440, 16000), 16000, subtype="PCM_16")
    (tmp_path / "cut.wav").write_bytes((tmp_path / "ok.wav").read_bytes()[:30])  # header torn mid-way
    with wave.open(str(tmp_path / "empty.wav"), "wb") as w:  # a valid header, no frames
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
    sf.write(tmp_path / "nan.wav", np.array([0.1, np.nan, 0.2]), 16000, subtype="FLOAT")
    for name, why in (("text.wav", "cannot read audio file"), ("zero.flac", "cannot read audio file"),
                      ("cut.wav", "cannot read audio file"), ("empty.wav", "holds no samples"),
                      ("nan.wav", "non-finite")):
        with pytest.raises(ValueError, match=why) as e:
            load_audio(tmp_path / name)
        assert str(tmp_path / name) in str(e.value)
    with pytest.raises(FileNotFoundError, match="missing.wav does not exist"):
        load_audio(tmp_path / "missing.wav")
    with pytest.raises(ValueError, match="sampling_rate must be a positive"):
        load_audio(tmp_path / "ok.wav", 0)


def test_write_wav_is_16_bit_and_atomic(tmp_path):
    x = tone(250, 16000, 0.3, amplitude=0.9)
    path = write_wav(tmp_path / "sub" / "x.wav", x, 16000)
    with wave.open(str(path)) as w:
        assert (w.getsampwidth(), w.getnchannels(), w.getframerate(), w.getnframes()) == (2, 1, 16000, len(x))
    assert np.abs(load_audio(path) - x).max() <= 2 ** -16 + 1e-7  # half a step, plus float32 rounding
    write_wav(path, np.stack([x, x], axis=1) * 2, 8000)  # replaces; stereo; clipped to full scale
    assert sf.info(str(path)).channels == 2 and np.abs(load_audio(path, 8000)).max() == 1.0
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.wav"]  # no temp file left behind
    from adaptwin._files import _host  # a write killed mid-way (kill -9) left its temp file: the next write drops it
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (path.parent / f".x.wav.tmp-{int(gone.stdout)}@{_host()}-q1w2").write_bytes(b"RIFF")
    write_wav(path, x, 16000)
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.wav"]
    for bad, why in ((np.zeros(0), "must have shape"), (np.array([0.1, np.inf]), "non-finite"),
                     (np.zeros(4, np.int32), "must be float")):
        with pytest.raises(ValueError, match=why):
            write_wav(tmp_path / "bad.wav", bad, 16000)
    assert not (tmp_path / "bad.wav").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]


# ---------------------------------------------------------------------------------------------- datasets


def _wav(path: Path, seconds: float = 0.1, rate: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_wav(path, tone(440, rate, seconds), rate)


def test_librispeech_layout(tmp_path):
    root = tmp_path / "LibriSpeech" / "dev-clean"
    for spk, chap, n in (("19", "198", 2), ("84", "121", 1)):
        folder = root / spk / chap
        folder.mkdir(parents=True)
        lines = [f"{spk}-{chap}-{i:04d} WORDS OF UTTERANCE {i}" for i in range(n)]
        (folder / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n")
        for i in range(n):
            sf.write(folder / f"{spk}-{chap}-{i:04d}.flac", tone(300, 16000, 0.1), 16000)
    utts = load_dataset(tmp_path / "LibriSpeech")
    assert [(u.id, u.speaker, u.text) for u in utts] == [
        ("19-198-0000", "19", "WORDS OF UTTERANCE 0"), ("19-198-0001", "19", "WORDS OF UTTERANCE 1"),
        ("84-121-0000", "84", "WORDS OF UTTERANCE 0")]
    assert utts[2].audio == root / "84" / "121" / "84-121-0000.flac"

    sf.write(root / "84" / "121" / "84-121-0009.flac", tone(300, 16000, 0.1), 16000)
    with pytest.raises(ValueError, match=r"84-121-0009.flac: no transcript"):
        load_dataset(root)
    (root / "84" / "121" / "84-121-0009.flac").unlink()
    (root / "19" / "198" / "19-198-0001.flac").unlink()
    with pytest.raises(ValueError, match=r"19-198.trans.txt line 2: no audio 19-198-0001.flac"):
        load_dataset(root)
    (root / "19" / "198" / "19-198.trans.txt").write_text("19-198-0000 HELLO\n19-198-0001\n")
    with pytest.raises(ValueError, match=r"19-198.trans.txt line 2: expected 'UTTERANCE-ID TEXT'"):
        load_dataset(root)


def test_ljspeech_layout(tmp_path):
    root = tmp_path / "LJSpeech"
    for i in (1, 2):
        _wav(root / "wavs" / f"LJ001-000{i}.wav", rate=22050)
    (root / "metadata.csv").write_text("LJ001-0001|Mr. Smith paid $20|Mister Smith paid twenty dollars\n"
                                       "LJ001-0002|in being comparatively modern.|in being comparatively modern.\n")
    utts = load_dataset(root)
    assert [(u.id, u.speaker, u.text) for u in utts] == [
        ("LJ001-0001", "lj", "Mister Smith paid twenty dollars"),
        ("LJ001-0002", "lj", "in being comparatively modern.")]
    assert load_dataset(root / "metadata.csv") == utts
    (root / "metadata.csv").write_text("LJ001-0001|a|a\nLJ001-0002 no separators\n")
    with pytest.raises(ValueError, match=r"metadata.csv line 2: expected 'id\|raw text\|normalised text'"):
        load_dataset(root)
    (root / "metadata.csv").write_text("LJ001-0001|a|a\nLJ001-0002|b|b\nLJ001-0003|c|c\n")
    with pytest.raises(ValueError, match=r"metadata.csv line 3: audio .*LJ001-0003.wav does not exist"):
        load_dataset(root)
    (root / "metadata.csv").write_text("LJ001-0001|a|a\n")
    with pytest.raises(ValueError, match=r"LJ001-0002.wav: no transcript"):
        load_dataset(root)


def test_fsdd_layout(tmp_path):
    for name in ("7_alice_0.wav", "3_bob_12.wav", "3_bob_2.wav", "10_x_0.txt"):
        _wav(tmp_path / name) if name.endswith(".wav") else (tmp_path / name).write_text("ignored")
    utts = load_dataset(tmp_path)
    assert [(u.id, u.speaker, u.text) for u in utts] == [
        ("7_alice_0", "alice", "seven"), ("3_bob_2", "bob", "three"), ("3_bob_12", "bob", "three")]
    _wav(tmp_path / "hello.wav")
    with pytest.raises(ValueError, match=r"hello.wav: no transcript; FSDD files must be named"):
        load_dataset(tmp_path)


def test_manifest(tmp_path):
    _wav(tmp_path / "clips" / "a.wav", rate=8000)
    _wav(tmp_path / "clips" / "b.wav", rate=44100)
    rows = [{"audio": "clips/a.wav", "text": "seven three", "speaker": "ann"},
            {"audio": str(tmp_path / "clips" / "b.wav"), "text": "nine", "id": "b1"}]
    m = tmp_path / "test.jsonl"
    m.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    utts = load_dataset(m)
    assert utts == [Utterance("clips/a.wav", tmp_path / "clips" / "a.wav", "seven three", "ann"),
                    Utterance("b1", tmp_path / "clips" / "b.wav", "nine", "unknown")]
    assert load_dataset(tmp_path) == utts  # a folder whose only guide is one manifest

    def bad(lines: list[str], why: str, named: Path = m) -> None:
        m.write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError, match=why) as e:
            load_dataset(m)
        assert str(named) in str(e.value)

    good = json.dumps(rows[0])
    bad([good, '{"audio": "clips/b.wav", "text": "x"'], r"test.jsonl line 2: not valid JSON")
    bad([good, "", '["clips/b.wav", "x"]'], r"test.jsonl line 3: expected a JSON object")
    bad([good, '{"audio": "clips/b.wav"}'], r"line 2: 'text' must be a string \(required")
    bad([good, '{"audio": "clips/b.wav", "text": 7}'], r"line 2: 'text' must be a string")
    bad([good, '{"audio": "clips/b.wav", "text": "x", "speaker": 3}'], r"line 2: 'speaker' must be a string")
    bad([good, '{"audio": "clips/b.wav", "text": "  "}'], r"line 2: 'text' is empty \(every clip needs its transcript")
    bad([good, '{"audio": "", "text": "x"}'], r"line 2: 'audio' is empty")
    # a null speaker or id is no speaker or id; a byte-order mark (Windows editors) is skipped
    m.write_text("\ufeff" + good + '\n{"audio": "clips/b.wav", "text": "nine", "speaker": null, "id": null}\n',
                 encoding="utf-8")
    assert load_dataset(m) == [utts[0], Utterance("clips/b.wav", tmp_path / "clips" / "b.wav", "nine", "unknown")]
    bad([good, '{"audio": "clips/zzz.wav", "text": "x"}'], r"line 2: audio .*zzz.wav does not exist")
    bad([good, good], r"utterance id 'clips/a.wav' appears twice")
    bad(["", "  "], r"holds no utterances")
    (tmp_path / "clips" / "bad.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    bad([good, '{"audio": "clips/bad.wav", "text": "x"}'], r"cannot read audio file .*bad.wav: .*data",
        named=tmp_path / "clips" / "bad.wav")


def test_unknown_layouts_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="is a file that is not a .jsonl manifest"):
        load_dataset(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="cannot tell its layout"):
        load_dataset(tmp_path)


def test_shared_fsdd():
    utts = load_dataset(needs_data("fsdd"))
    assert len(utts) == 2500
    speakers = {u.speaker for u in utts}
    assert speakers == {"jackson", "nicolas", "yweweler", "george", "lucas"}
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    assert all(u.text == words[int(u.id.split("_")[0])] for u in utts)
    x = load_audio(utts[0].audio)  # 8 kHz 16-bit -> 16 kHz
    assert x.dtype == np.float32 and 0.1 < len(x) / 16000 < 2.0 and np.abs(x).max() > 0.01


def test_shared_ljspeech():
    utts = load_dataset(needs_data("ljspeech"))
    assert len(utts) == 120 and {u.speaker for u in utts} == {"lj"}
    assert utts[1].id == "LJ001-0002" and utts[1].text == "in being comparatively modern."
    info = sf.info(str(utts[1].audio))
    assert len(load_audio(utts[1].audio)) == pytest.approx(info.frames * 16000 / info.samplerate, abs=1)


def test_shared_librispeech():
    (u,) = load_dataset(needs_data("librispeech"))
    assert (u.id, u.speaker) == ("1272-128104-0000", "1272")
    assert u.text.startswith("MISTER QUILTER IS THE APOSTLE")
    assert sf.info(str(u.audio)).samplerate == 16000
    assert len(load_audio(u.audio)) == sf.info(str(u.audio)).frames  # no resampling at 16 kHz


# ---------------------------------------------------------------------------------------------- WER


@pytest.fixture
def table(tmp_path) -> Path:
    path = tmp_path / "normalizer.json"
    path.write_text(json.dumps({"colour": "color", "theatre": "theater"}))
    return path


def test_hand_counted_errors():
    (e,) = utterance_errors(["the cat sat on the mat"], ["the cat sit on mat"])
    assert (e.substitutions, e.deletions, e.insertions, e.words) == (1, 1, 0, 6)
    (e,) = utterance_errors(["a b"], ["x a b c d"])
    assert (e.substitutions, e.deletions, e.insertions, e.words) == (0, 0, 3, 2)
    (e,) = utterance_errors(["one two three"], [""])
    assert (e.substitutions, e.deletions, e.insertions, e.words) == (0, 3, 0, 3)
    (e,) = utterance_errors([""], ["uh two words"])  # an empty reference: every word is inserted
    assert (e.errors, e.words) == (3, 0)
    r = wer_report(["the cat sat on the mat", "a b"], ["the cat sit on mat", "x a b c d"])
    assert (r.substitutions, r.deletions, r.insertions, r.reference_words) == (1, 1, 3, 8)
    assert r.wer == pytest.approx(5 / 8)


def test_whisper_normalisation(table):
    norm = english_normalizer(path=table)
    assert norm.source == str(table) and len(norm.spelling) == 2
    assert norm("Mr. Smith went to the Theatre.") == "mister smith went to the theater"
    r = wer_report(["Mr. Smith paid twenty-one dollars for the colour TV."],
                   ["mister smith paid $21 for the color tv"], normalizer=norm)
    assert (r.wer, r.reference_words) == (0.0, 8)
    assert wer_report(["I can't"], ["i can not"], normalizer=norm).wer == 0.0
    # Without the table British spellings count as errors: one substitution in four words.
    bare = TextNormalizer({}, "none")
    assert wer_report(["the colour is red"], ["the color is red"], normalizer=bare).wer == 0.25
    assert wer_report(["the colour is red"], ["the color is red"], normalizer=norm).wer == 0.0


def test_spelling_table_sources(tmp_path, table, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    monkeypatch.setattr(wer_mod, "SHARED_SPELLING", tmp_path / "absent.json")
    assert english_normalizer(model).source.startswith("none")
    (model / "normalizer.json").write_text(json.dumps({"favour": "favor"}))
    assert english_normalizer(model).spelling == {"favour": "favor"}
    assert english_normalizer(model, table).source == str(table)  # an explicit table wins
    shared = tmp_path / "english.json"
    shared.write_text(json.dumps({"grey": "gray"}))
    monkeypatch.setattr(wer_mod, "SHARED_SPELLING", shared)
    assert english_normalizer(tmp_path / "elsewhere").spelling == {"grey": "gray"}
    with pytest.raises(FileNotFoundError, match="nope.json does not exist"):
        english_normalizer(model, tmp_path / "nope.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be a JSON object mapping words to words"):
        english_normalizer(path=tmp_path / "list.json")


def test_bootstrap_interval_and_speaker_split():
    rng = np.random.default_rng(5)
    refs, hyps, speakers = [], [], []
    for i in range(60):
        words = [f"w{j}" for j in rng.integers(0, 9, size=int(rng.integers(2, 12)))]
        hyp = [w if rng.random() > 0.2 else "zz" for w in words][: len(words) - int(rng.random() < 0.3)]
        refs.append(" ".join(words))
        hyps.append(" ".join(hyp))
        speakers.append(["ann", "bob", "cy"][i % 3])
    r = wer_report(refs, hyps, speakers, seed=3)
    assert r.ci_low < r.wer < r.ci_high and 0 < r.ci_low and r.ci_high - r.ci_low < 0.5
    assert (r.ci_low, r.ci_high) == wer_report(refs, hyps, speakers, seed=3).ci
    assert (r.ci_low, r.ci_high) != wer_report(refs, hyps, speakers, seed=4).ci
    wider = wer_report(refs, hyps, speakers, seed=3, level=0.99)
    assert wider.ci_low <= r.ci_low and wider.ci_high >= r.ci_high
    assert sorted(r.per_speaker) == ["ann", "bob", "cy"]
    for key in ("substitutions", "deletions", "insertions", "reference_words", "utterances"):
        assert sum(s[key] for s in r.per_speaker.values()) == getattr(r, key)
    for s in r.per_speaker.values():
        assert s["wer"] == pytest.approx((s["substitutions"] + s["deletions"] + s["insertions"]) / s["reference_words"])
    # Utterances that all have the same error rate leave the resampled rate nothing to vary.
    same = wer_report(["a b c d"] * 10, ["a x c d"] * 10, resamples=200)
    assert same.ci == (0.25, 0.25) and same.wer == 0.25


def test_wer_input_errors():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        wer_report(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="WER is undefined"):
        wer_report(["", ""], ["x", ""])
    with pytest.raises(ValueError, match="1 speakers for 2 utterances"):
        wer_report(["a", "b"], ["a", "b"], ["s"])
    with pytest.raises(ValueError, match="level must be in"):
        wer_report(["a"], ["a"], level=95)


def test_basic_normalizer_keeps_spoken_numbers_as_words():
    from adaptwin.speech.wer import BasicNormalizer, english_normalizer, wer_report

    basic, english = BasicNormalizer(), english_normalizer(path=None)
    assert basic("Seven, three NINE!") == "seven three nine"
    assert english("seven three nine") != "seven three nine"  # the English one rewrites them as digits
    r = wer_report(["seven three nine"], ["seven two nine"], normalizer=basic, resamples=10)
    assert (r.substitutions, r.reference_words) == (1, 3) and r.wer == pytest.approx(1 / 3)
