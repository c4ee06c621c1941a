"""PQM (NF4 base + LoRA, arXiv 2309.09136): packing, rank checks, speaker adaptation, save/load, `adaptwin adapt`.

The models are tiny random Whispers over a 14-word vocabulary (as in tests/test_eval_cli.py); their WER means
nothing, so adaptation is judged by the model's own loss on the adaptation batches.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_speech import WORDS, feature_extractor, run_cli, save_model_dir, tokenizer, whisper
from torch import nn

import adaptwin
from adaptwin.compressors.pqm import NF4LoRALinear, PQMConfig, lora_parameters, quantize
from adaptwin.speech.adapt_cli import speech_batches
from adaptwin.speech.audio import write_wav
from adaptwin.speech.datasets import load_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_model_dir(tmp_path_factory.mktemp("whisper-words"))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """Twelve tone clips from two speakers, each clip's pitch tied to its first word (so there is signal)."""
    d = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        rate, seconds = (16000, 0.6) if i % 3 else (8000, 0.5)
        words = [WORDS[4 + (i + k) % 10] for k in range(1 + i % 3)]
        t = np.arange(round(rate * seconds)) / rate
        x = 0.3 * np.sin(2 * np.pi * (200 + 80 * WORDS.index(words[0])) * t) + 0.05 * rng.standard_normal(len(t))
        write_wav(d / "wav" / f"c{i}.wav", x, rate)
        rows.append({"audio": f"wav/c{i}.wav", "text": " ".join(words), "speaker": "ann" if i % 2 else "bob"})
    path = d / "adapt.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def batches_of(model, manifest: Path, batch_size: int = 4) -> list[dict]:
    return speech_batches(model, feature_extractor(), tokenizer(), load_dataset(manifest), batch_size)


def targeted(model: nn.Module) -> list[str]:
    """Paths of the nn.Linear modules PQM targets: q/k/v/out projections and fc1/fc2 (not proj_out)."""
    names = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rpartition(".")[2] in names]


def test_every_targeted_linear_is_nf4_packed():
    dense = whisper()
    paths = targeted(dense)
    assert len(paths) == 4 * 3 + 2 * 2  # encoder self-attn, decoder self- and cross-attn; two FFNs
    small = quantize(dense, 2)
    assert dense.model.encoder.layers[0].fc1.__class__ is nn.Linear  # the original is untouched
    for path in paths:
        m, lin = small.get_submodule(path), dense.get_submodule(path)
        assert isinstance(m, NF4LoRALinear), path
        # The base is buffers of 4-bit codes + one float32 scale per 64 weights: 4.5 bits, 14 % of fp32.
        assert m.weight_qweight.dtype == torch.uint8 and m.weight_qweight.numel() == lin.weight.numel() // 2
        base = m.weight_qweight.nbytes + m.weight_absmax.nbytes
        assert base <= 0.141 * lin.weight.nbytes
        assert [n for n, _ in m.named_parameters()] == ["lora_A", "lora_B"]  # nothing else can train
        assert not m.lora_B.any()  # B = 0: a fresh adapter adds nothing
        # NF4's worst case is half the widest code gap (0.14) times the block absmax.
        err = (m.dequantized_weight() - lin.weight).abs().max() / lin.weight.abs().max()
        assert 0 < err < 0.15
    # Embeddings, the conv stem, norms and the tied output projection stay dense.
    assert isinstance(small.proj_out, nn.Linear) and isinstance(small.model.encoder.conv1, nn.Conv1d)
    assert torch.equal(small.model.decoder.embed_tokens.weight, dense.model.decoder.embed_tokens.weight)

    # The whole model computes what the dense model with dequantised weights computes.
    reference = whisper()
    with torch.no_grad():
        for path in paths:
            reference.get_submodule(path).weight.copy_(small.get_submodule(path).dequantized_weight())
    feats = torch.randn(2, 16, 100, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([[4, 5, 2], [6, 2, -100]])
    with torch.no_grad():
        got, want = small(input_features=feats, labels=labels), reference(input_features=feats, labels=labels)
    assert torch.allclose(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    record = adaptwin.compression_record(small)
    assert {e["compressor"] for e in record.modules.values()} == {"pqm"} and sorted(record.modules) == sorted(paths)


def test_lora_update_and_scaling():
    lin = nn.Linear(59, 37)
    gen = torch.Generator().manual_seed(0)
    m = NF4LoRALinear.from_linear(lin, 3, 2.5, PQMConfig().quant_format(), gen)
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(5, 7, 59)
    want = x @ m.dequantized_weight().T + lin.bias + 2.5 * (x @ m.lora_A.T) @ m.lora_B
    assert torch.allclose(m(x), want, atol=1e-5)
    m(x).sum().backward()
    assert m.lora_A.grad is not None and m.lora_B.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_batched_inference_forms_the_weight(dtype, monkeypatch):
    """A batched CPU inference call (more than 32 rows, no gradient to record) runs one GEMM on Ŵ + s·Bᵀ·A,
    decoded whole once: the same values as the two op calls of a decoding call or of a training call."""
    from adaptwin.compressors.pqm import layer

    lin = nn.Linear(96, 80)
    m = NF4LoRALinear.from_linear(lin, 4, 2.0, PQMConfig().quant_format(), torch.Generator().manual_seed(2))
    with torch.no_grad():
        m.lora_B.normal_()
    m = m.to(dtype)
    formed = []
    real = layer.dequantize_factor
    monkeypatch.setattr(layer, "dequantize_factor", lambda *a: formed.append(1) or real(*a))
    x = torch.randn(2, 20, 96, dtype=dtype)
    w = m.dequantized_weight(torch.float64) + 2.0 * m.lora_B.double().T @ m.lora_A.double()
    want = x.double() @ w.T + m.bias.double()
    with torch.no_grad():
        batched = m(x)
        assert len(formed) == 1
        one_row = m(x[:1, :1])
        assert len(formed) == 1  # a decoding call runs the op
    trained = m(x)  # LoRA requires grad: the op and its autograd
    assert len(formed) == 1 and trained.requires_grad
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    scale = want.abs().max().item()
    for got in (batched, one_row, trained.detach()):
        assert got.dtype == dtype
    torch.testing.assert_close(batched.double(), want, rtol=tol, atol=tol * scale)
    torch.testing.assert_close(one_row.double(), want[:1, :1], rtol=tol, atol=tol * scale)
    torch.testing.assert_close(trained.detach().double(), want, rtol=tol, atol=tol * scale)


def test_base_arguments_follow_loaded_weights():
    """The base's op arguments are kept between calls (adaptwin.compressors.packed_args) and still follow
    a state dict loaded into the module, and a call under inference_mode does not stop a later backward."""
    gen = torch.Generator().manual_seed(1)
    fmt = PQMConfig().quant_format()
    m, other = (NF4LoRALinear.from_linear(nn.Linear(64, 40), 2, 2.0, fmt, gen) for _ in range(2))
    x = torch.randn(3, 64)
    with torch.inference_mode():
        before = m(x)
    assert torch.equal(m(x), before)
    m.load_state_dict(other.state_dict())
    assert torch.equal(m(x), other(x)) and not torch.equal(m(x), before)
    m(x.requires_grad_()).sum().backward()
    assert m.lora_A.grad is not None and x.grad is not None


def test_inference_calls_are_kept_and_follow_the_module():
    """A batch-1 inference call (base plus scaled LoRA update) is kept whole and run from C++ (`KeptCall`):
    bit for bit the general path's output, and still the module's after the LoRA factors are trained (written
    in place) or replaced, the bias buffer is swapped, or a state dict is loaded."""
    from adaptwin.ops.backends import FAST

    if "rank_linear_kept" not in FAST:
        pytest.skip("needs adaptwin._C")
    gen = torch.Generator().manual_seed(3)
    fmt = PQMConfig().quant_format()
    m, other = (NF4LoRALinear.from_linear(nn.Linear(64, 40), 2, 2.0, fmt, gen) for _ in range(2))
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(1, 64)

    def fresh() -> torch.Tensor:
        m._call.clear()
        m._base.clear()
        return m(x)

    with torch.no_grad():
        first = m(x)
        assert m._call.kept is not None and torch.equal(m(x), first)
        m.lora_A.mul_(2.0)  # trained in place: passed as they are, the kept call reads them
        assert torch.equal(m(x), fresh()) and not torch.equal(m(x), first)
        m.lora_B = nn.Parameter(other.lora_B.clone())
        assert torch.equal(m(x), fresh())
        m._buffers["bias"] = other.bias.clone()
        assert torch.equal(m(x), fresh())
        m.load_state_dict(other.state_dict())
        assert torch.equal(m(x), other(x))


@pytest.mark.parametrize("rank", [0, 5, 2.0, True, "4"])
def test_lora_rank_is_checked(rank):
    with pytest.raises(ValueError, match=r"must be one of \[1, 2, 3, 4\]"):
        quantize(whisper(), rank)


def test_bad_settings_are_refused():
    model = whisper()
    with pytest.raises(ValueError, match="no ratio to plan"):
        adaptwin.compress(model, adaptwin.CompressionConfig(ratio=0.5, attention_method="pqm", ffn_method="pqm"))
    with pytest.raises(ValueError, match="leave attention_lora_rank/ffn_lora_rank unset"):
        adaptwin.compress(model, adaptwin.CompressionConfig(ffn_rank=2, ffn_lora_rank=1, ffn_method="pqm"))
    with pytest.raises(ValueError, match="so it takes quantization=None"):
        adaptwin.compress(model, adaptwin.CompressionConfig(ffn_rank=2, ffn_method="pqm", quantization="nf4"))
    with pytest.raises(ValueError, match="must be one of"):
        adaptwin.compress(model, adaptwin.CompressionConfig(ffn_rank=8, ffn_method="pqm"))
    with pytest.raises(ValueError, match="unknown pqm options"):
        PQMConfig.from_options({"block": 64})
    with pytest.raises(ValueError, match="NF4 blocksize must be an even"):
        quantize(model, 2, blocksize=63)
    with pytest.raises(ValueError, match="alpha must be a number > 0"):
        quantize(model, 2, alpha=0)
    with pytest.raises(ValueError, match="targets must be"):
        quantize(model, 2, targets=("conv",))
    with pytest.raises(ValueError, match="no PQM modules"):
        adaptwin.adapt(model, [{"input_features": torch.zeros(1, 16, 100), "labels": torch.tensor([[2]])}])


def test_adaptation_lowers_the_loss_and_trains_only_lora(manifest):
    small = quantize(whisper(), 4, seed=0)
    batches = batches_of(small, manifest)
    frozen = {k: v.clone() for k, v in small.state_dict().items() if "lora_" not in k}
    flags = {n: p.requires_grad for n, p in small.named_parameters()}  # Whisper freezes its encoder positions
    report = adaptwin.adapt(small, batches, epochs=8, lr=1e-2, seed=0)
    # Measured: 2.99 -> 1.11 on these 12 clips (8 epochs of 3 batches); a loss that merely wobbles fails.
    assert report.loss_after < 0.6 * report.loss_before
    assert report.steps == 8 * 3 and len(report.epoch_losses) == 8
    assert report.trainable_params == sum(p.numel() for p in lora_parameters(small))
    after = small.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())  # base codes, bias, embeddings untouched
    assert flags == {n: p.requires_grad for n, p in small.named_parameters()}  # flags restored
    assert not small.training
    # Seeded and deterministic on CPU: the same call gives bit-identical factors.
    again = quantize(whisper(), 4, seed=0)
    adaptwin.adapt(again, batches_of(again, manifest), epochs=8, lr=1e-2, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(lora_parameters(small), lora_parameters(again)))


def test_held_out_selection_keeps_the_best_epoch(manifest):
    """With eval_batches the factors of the epoch with the lowest held-out loss are restored (0 = untouched)."""
    utts = load_dataset(manifest)
    small = quantize(whisper(), 4, seed=0)
    fe, tok = feature_extractor(), tokenizer()
    train = speech_batches(small, fe, tok, utts[:8], 4)
    held = speech_batches(small, fe, tok, utts[8:], 4)
    start = [p.detach().clone() for p in lora_parameters(small)]
    report = adaptwin.adapt(small, train, epochs=6, lr=1e-2, seed=0, eval_batches=held)
    assert len(report.eval_losses) == 7 and report.best_epoch == min(range(7), key=report.eval_losses.__getitem__)
    with torch.no_grad():  # the model now computes the kept epoch's held-out loss
        now = sum(float(small(**b).loss) for b in held) / len(held)
    assert now == pytest.approx(report.eval_losses[report.best_epoch], rel=1e-5)
    # Held-out transcripts that training only moves away from (every label one fixed word; measured: loss
    # 2.627 before, 2.657 after epoch 1) leave the factors exactly as they came: epoch 0 is kept.
    wrong = [{**b, "labels": b["labels"].masked_fill(b["labels"] != -100, 5)} for b in held]
    again = quantize(whisper(), 4, seed=0)
    bad = adaptwin.adapt(again, train, epochs=3, lr=1e-2, seed=0, eval_batches=wrong, patience=1)
    assert bad.best_epoch == 0 and len(bad.eval_losses) == 2  # patience 1: stopped after the first bad epoch
    assert all(torch.equal(a, b) for a, b in zip(start, lora_parameters(again)))
    with pytest.raises(ValueError, match="patience must be a whole number >= 1 and needs eval_batches"):
        adaptwin.adapt(again, train, epochs=1, patience=2)
    with pytest.raises(ValueError, match="eval_batches is empty"):
        adaptwin.adapt(again, train, epochs=1, eval_batches=[])


def test_save_load_round_trip(manifest, tmp_path):
    small = quantize(whisper(), 2, double_quant=True)
    batches = batches_of(small, manifest)
    adaptwin.adapt(small, batches, epochs=2, lr=1e-2)
    adaptwin.save(small, tmp_path / "pqm")
    loaded = adaptwin.load(tmp_path / "pqm")
    with torch.no_grad():
        for b in batches:
            assert torch.equal(small(**b).logits, loaded(**b).logits)
    assert [n for n, _ in loaded.named_parameters() if "lora_" in n] == \
        [n for n, _ in small.named_parameters() if "lora_" in n]
    rc, out, err = run_cli("inspect", tmp_path / "pqm", "--json")
    assert rc == 0, err
    rows = json.loads(out)["modules"]
    assert len(rows) == 16 and {r["format"] for r in rows} == {"nf4"}
    # fc1 (128 x 64): 8192 codes as 4096 bytes + 128 8-bit scale codes + 1 block scale + offset + fp32 bias and
    # LoRA; the LoRA and bias dominate at this toy width (3.9 bits/param on the base alone would need 1000+ wide).
    fc1 = next(r for r in rows if r["path"].endswith("encoder.layers.0.fc1"))
    assert fc1["params"] == 128 * 64 + 128 + 2 * (64 + 128)
    assert fc1["bytes"] == 4096 + 128 + 4 + 4 + 4 * (128 + 2 * (64 + 128))
    # Further adaptation of a loaded save works (e.g. after multi-speaker pre-training).
    (first,) = loaded.adaptwin_record.adaptations  # the run before the save, as saved
    assert first["loss_after"] == small.adaptwin_adapt.loss_after and first["epochs"] == 2 and first["lr"] == 1e-2
    report = adaptwin.adapt(loaded, batches, epochs=1, lr=1e-2, about={"speaker": "ann"})
    assert report.steps == len(batches)
    assert [a["epochs"] for a in loaded.adaptwin_record.adaptations] == [2, 1]
    assert loaded.adaptwin_record.adaptations[1]["speaker"] == "ann"
    with pytest.raises(ValueError, match="about must be a mapping"):
        adaptwin.adapt(loaded, batches, epochs=1, about=["ann"])



def test_cli_adapt_end_to_end(model_dir, manifest, tmp_path):
    out = tmp_path / "adapted"
    rc, stdout, err = run_cli("adapt", model_dir, "--data", manifest, "--out", out, "--speaker", "ann",
                              "--lora-rank", "2", "--epochs", "6", "--lr", "0.01", "--batch-size", "3", "--json")
    assert rc == 0, err
    data = json.loads(stdout.strip().splitlines()[-1])
    assert data["utterances"] == 6 and data["speakers"] == ["ann"] and data["steps"] == 6 * 2
    assert data["loss_after"] < 0.8 * data["loss_before"]
    for name in ("adaptwin.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert (out / name).is_file(), name
    loaded = adaptwin.load(out)
    assert {m.rank for m in loaded.modules() if isinstance(m, NF4LoRALinear)} == {2}
    (run,) = loaded.adaptwin_record.adaptations  # what was adapted on is kept with the save, and inspect says it
    assert run["speakers"] == ["ann"] and run["utterances"] == 6 and run["loss_after"] == data["loss_after"]
    rc, text, _ = run_cli("inspect", out)
    assert rc == 0 and f"adapted (1 of 1, PQM LoRA, the model's own loss): 6 utterances (ann) of {manifest}, 6 " \
                       "epochs, lr 0.01, loss" in text
    assert any(m.lora_B.any() for m in loaded.modules() if isinstance(m, NF4LoRALinear))
    # The adapted save is a normal speech model folder: `adaptwin eval` reads it, `adapt` continues from it.
    rc, _, err = run_cli("eval", out, "--data", manifest, "--json", "--max-new-tokens", "3")
    assert rc == 0, err
    rc, stdout, err = run_cli("adapt", out, "--data", manifest, "--out", tmp_path / "again", "--limit", "4",
                              "--holdout", "4", "--epochs", "2", "--json")
    assert rc == 0, err
    data = json.loads(stdout.strip().splitlines()[-1])
    assert data["utterances"] == 4 and len(data["eval_losses"]) == 3 and data["best_epoch"] in (0, 1, 2)
    rc, _, err = run_cli("adapt", out, "--data", manifest, "--out", tmp_path / "x", "--limit", "10", "--holdout", "4")
    assert rc == 2 and "--holdout 4 needs --limit and 4 utterances after the first 10" in err


def test_cli_adapt_errors(model_dir, manifest, tmp_path):
    rc, _, err = run_cli("adapt", model_dir, "--data", manifest, "--out", tmp_path / "x", "--lora-rank", "8")
    assert rc == 2 and "expected one of [1, 2, 3, 4]" in err
    rc, _, err = run_cli("adapt", model_dir, "--data", manifest, "--out", tmp_path / "x", "--speaker", "zed")
    assert rc == 2 and "'zed' has no utterances" in err and not (tmp_path / "x").exists()
    rc, _, err = run_cli("adapt", model_dir, "--data", manifest, "--out", model_dir)
    assert rc == 2 and "MODEL_DIR itself" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"audio": str(load_dataset(manifest)[0].audio), "text": "ten", "speaker": "a"}) + "\n")
    rc, _, err = run_cli("adapt", model_dir, "--data", bad, "--out", tmp_path / "y")
    assert rc == 2 and "does not know" in err
    svd = tmp_path / "svd"
    run_cli("compress", model_dir, "--out", svd, "--ffn-rank", "8")
    rc, _, err = run_cli("adapt", svd, "--data", manifest, "--out", tmp_path / "z")
    assert rc == 2 and "without PQM modules" in err


def test_benchmark_script_runs(model_dir, manifest, tmp_path, capsys):
    """benchmarks/pqm_speaker.py end to end on the tiny model: a test set and a target's calibration manifest."""
    import csv
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ sits beside the package
    from benchmarks import pqm_speaker

    sets = tmp_path / "sets"
    sets.mkdir()
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for r in rows:
        r["audio"] = str(manifest.parent / r["audio"])
    (sets / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (sets / "ann_calib.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["speaker"] == "ann"))
    out = tmp_path / "pqm.csv"
    threads = torch.get_num_threads()
    try:
        rc = pqm_speaker.main(["--model", str(model_dir), "--sets", str(sets), "--target", "ann",
                               "--adapt-utterances", "3", "--val-utterances", "3", "--lora-rank", "2",
                               "--epochs", "2", "--lr", "0.001,0.01",
                               "--threads", "1", "--out", str(out), "--png", str(tmp_path / "pqm.png")])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    with open(out, newline="") as f:
        got = list(csv.DictReader(f))
    assert {(r["model"], r["speaker"]) for r in got} == {
        (m, s) for m in pqm_speaker.MODELS for s in ("ann", "bob", "others", "all")}
    for r in got:
        assert 0 <= float(r["ci_low"]) <= float(r["wer"]) <= float(r["ci_high"])
        if r["speaker"] == "all":
            assert int(r["utterances"]) == 12
    adapted = next(r for r in got if r["model"] == "nf4+lora" and r["speaker"] == "ann")
    assert adapted["adapt_utterances"] == "3" and float(adapted["loss_after"]) < float(adapted["loss_before"])
    assert adapted["lr"] in ("0.001", "0.01") and float(adapted["val_loss"]) > 0  # chosen on held-out ann clips
    # Too few calibration utterances for the request is an error, not a silently smaller run.
    assert pqm_speaker.main(["--model", str(model_dir), "--sets", str(sets), "--target", "ann",
                             "--adapt-utterances", "50", "--threads", "1", "--out", str(out)]) == 2
    torch.set_num_threads(threads)
