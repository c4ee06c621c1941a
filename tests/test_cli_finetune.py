"""``adaptwin compress --calib``: layer-wise fine-tuning from the command line on tiny random models.

Its flags reach `compress` as the Python API would pass them; selection (--keep-size, --max-error), disk
storage, resuming from --run-dir, torchrun ranks, and the input it refuses.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_cli import assert_same_outputs, assert_user_error, bert_inputs, load_dense, run_cli

import adaptwin

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- fine-tuning

CALIB_WORDS = ["the", "cat", "sat", "on", "a", "b", "c", "x", "y", "z"]


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    """24 examples of 3-12 vocabulary words: 3 batches of 8, the last one held out."""
    g = torch.Generator().manual_seed(3)
    lines = []
    for _ in range(24):
        n = int(torch.randint(3, 13, (1,), generator=g))
        lines.append(" ".join(CALIB_WORDS[int(i)] for i in torch.randint(0, len(CALIB_WORDS), (n,), generator=g)))
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")  # a trailing blank line is skipped
    return path


FT_FLAGS = ("--ratio", "0.45", "--epochs", "2", "--batch-size", "8", "--patience", "0")


def finetune_cli(bert_dir: Path, calib: Path, out: Path, *extra: str) -> tuple[str, str, dict]:
    rc, stdout, err = run_cli("compress", bert_dir, "--out", out, "--calib", calib, *FT_FLAGS, *extra)
    assert rc == 0, err
    return stdout, err, json.loads((out / "adaptwin.json").read_text())


@pytest.mark.parametrize("mode", ["all", "spectral", "lora_scratch", "lora_only"])
def test_finetune_modes(bert_dir, calib_file, tmp_path, mode):
    stdout, err, meta = finetune_cli(bert_dir, calib_file, tmp_path / mode, "--mode", mode)
    ft = meta["compression"]["finetune"]
    assert ft["config"]["mode"] == mode and ft["config"]["epochs"] == 2
    assert [r["path"] for r in ft["layers"]] == ["encoder.layer.0", "encoder.layer.1"]
    for row in ft["layers"]:  # the best epoch is kept, and "before" is epoch 0: never worse
        assert row["error_after"] <= row["error_before"]
        line = next(x for x in stdout.splitlines() if x.startswith(row["path"] + " "))
        assert f"{row['error_before']:.4f}" in line and f"{row['error_after']:.4f}" in line
    ranks = {(s["rank"], s["lora_rank"]) for s in meta["compression"]["sites"]}
    if mode == "spectral":
        assert all(lora == 0 for _, lora in ranks)
    elif mode == "lora_scratch":
        assert all(rank == 0 for rank, _ in ranks)
    else:
        assert all(rank > 0 and lora > 0 for rank, lora in ranks)
    assert f"fine-tuning: mode {mode}, init svd, lr 0.001, up to 2 epochs" in stdout
    assert "3 batches (2 train, 1 held out)" in stdout and "captured activations: peak" in stdout
    assert "fine-tuned encoder.layer.0 (1/2): 2 epochs" in err  # progress (lines: stderr is not a terminal)
    assert "fine-tuned encoder.layer.1 (2/2): 2 epochs" in err
    assert "compress + fine-tune" in stdout


def test_finetune_matches_python_api(bert_dir, calib_file, tmp_path):
    """The CLI's tokenisation and flags reach `compress` as the Python API would pass them."""
    from transformers import AutoTokenizer

    out = tmp_path / "api"
    finetune_cli(bert_dir, calib_file, out, "--lr", "0.003", "--seed", "2", "--holdout", "0.4", "--init", "whiten")
    lines = [x for x in calib_file.read_text().splitlines() if x.strip()]
    tok = AutoTokenizer.from_pretrained(bert_dir)
    batches = [dict(tok(lines[i:i + 8], padding=True, truncation=True, max_length=128, return_tensors="pt"))
               for i in range(0, len(lines), 8)]
    ft = adaptwin.FinetuneConfig(epochs=2, lr=0.003, seed=2, holdout=0.4, init="whiten", patience=0)
    reference = adaptwin.compress(load_dense(bert_dir), adaptwin.CompressionConfig(ratio=0.45, seed=2),
                                  calibration=batches, finetune=ft)
    assert_same_outputs(adaptwin.load(out), reference, bert_inputs())


def test_finetune_keep_size_reverts_the_worse_layer(bert_dir, calib_file, tmp_path):
    out = tmp_path / "keep"
    # Two equal layers: all compressed keeps 55.4 %, one reverted 77.7 %, both 100 %.
    stdout, _, meta = finetune_cli(bert_dir, calib_file, out, "--keep-size", "0.8")
    rows = meta["compression"]["finetune"]["layers"]
    worse = max(rows, key=lambda r: r["error_after"])["path"]
    assert {r["path"]: r["reverted"] for r in rows} == {r["path"]: r["path"] == worse for r in rows}
    assert f"selection (keep_size 0.8): reverted 1 layer(s) to the original: {worse}" in stdout
    assert not any(s["path"].startswith(worse + ".") for s in meta["compression"]["sites"])
    sel = meta["compression"]["finetune"]["selection"]
    assert sel["keep_fraction"] <= 0.8 and sel["reverted"] == [worse]

    loaded, dense = adaptwin.load(out), load_dense(bert_dir)
    ours, theirs = loaded.get_submodule(worse).state_dict(), dense.get_submodule(worse).state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    rc, text, _ = run_cli("inspect", out)
    assert rc == 0 and f"1 layer(s) reverted to the original ({worse})" in text
    assert "fine-tuned 2 layers: mode all" in text
    assert json.loads(run_cli("inspect", out, "--json")[1])["finetune"]["selection"]["reverted"] == [worse]


def test_finetune_max_error_and_disk_storage(bert_dir, calib_file, tmp_path, monkeypatch):
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the temporary activation folder goes
    stdout, _, meta = finetune_cli(bert_dir, calib_file, tmp_path / "err", "--max-error", "0", "--storage", "disk",
                                   "--storage-dtype", "float16")
    assert "on disk (float16)" in stdout and "reverted 2 layer(s)" in stdout
    assert meta["compression"]["modules"] == {} and meta["summary"]["total"]["params_before"] == 0
    assert list(scratch.iterdir()) == []  # the activations folder is gone
    assert_same_outputs(adaptwin.load(tmp_path / "err"), load_dense(bert_dir), bert_inputs())


def test_budget_conflict_after_fine_tuning_keeps_the_model(bert_dir, calib_file, tmp_path):
    """keep_size and max_error can only be found to conflict once the layers' errors are measured: the fine-tuned
    model (every layer compressed) is saved beside OUT rather than lost, and the error lists the layers' errors."""
    out = tmp_path / "conflict"
    rc, _, err = run_cli("compress", bert_dir, "--out", out, "--calib", calib_file, *FT_FLAGS,
                         "--keep-size", "0.6", "--max-error", "0")
    kept = tmp_path / "conflict-unselected"
    assert rc == 2 and not out.exists() and kept.is_dir()
    line = err.strip().splitlines()[-1]
    assert "the budgets conflict" in line and "layer errors after fine-tuning: encoder.layer.0 " in line
    assert f"saved to {kept}" in line
    rows = adaptwin.read_meta(kept)["compression"]["finetune"]["layers"]
    assert [r["path"] for r in rows] == ["encoder.layer.0", "encoder.layer.1"]
    from adaptwin.finetune.select import select_layers

    variant = select_layers(adaptwin.load(kept), load_dense(bert_dir), keep_size=0.8)  # no training needed
    assert len(variant.adaptwin_selection.reverted) == 1


def test_finetune_resumes_from_run_dir(bert_dir, calib_file, tmp_path):
    run_dir = tmp_path / "run"
    first, _, _ = finetune_cli(bert_dir, calib_file, tmp_path / "a", "--run-dir", run_dir)
    assert "resumed" not in first
    (run_dir / "layers" / "encoder.layer.1.safetensors").unlink()  # as if killed while training layer 1
    again, err, _ = finetune_cli(bert_dir, calib_file, tmp_path / "b", "--run-dir", run_dir)
    assert "fine-tuned encoder.layer.1" in err and "fine-tuned encoder.layer.0" not in err
    assert next(x for x in again.splitlines() if x.startswith("encoder.layer.0 ")).endswith("resumed")
    assert "1 layer(s) resumed from" in again
    assert_same_outputs(adaptwin.load(tmp_path / "a"), adaptwin.load(tmp_path / "b"), bert_inputs())
    rc, _, err = run_cli("compress", bert_dir, "--out", tmp_path / "c", "--calib", calib_file, *FT_FLAGS,
                         "--lr", "0.01", "--run-dir", run_dir)
    assert_user_error(rc, err, "holds a different run")


def test_finetune_gpt2_pads_with_end_of_text(calib_file, tmp_path):
    """A decoder whose tokenizer has no pad token: batches are padded with its end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2Model, PreTrainedTokenizerFast

    src = tmp_path / "gpt2"
    vocab = {c: i for i, c in enumerate(["<|endoftext|>", *"abcdefghijklmnopqrstuvwxyz", "Ġ"])}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # byte-level, one token per letter or space
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    assert tok.pad_token is None
    tok.save_pretrained(src)
    torch.manual_seed(0)
    GPT2Model(GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                         eos_token_id=0)).save_pretrained(src)
    stdout, _, meta = finetune_cli(src, calib_file, tmp_path / "out")
    assert [r["path"] for r in meta["compression"]["finetune"]["layers"]] == ["h.0", "h.1"]
    assert "fine-tuning: mode all" in stdout


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory) -> Path:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    d = tmp_path_factory.mktemp("whisper")
    config = WhisperConfig(vocab_size=64, num_mel_bins=8, d_model=32, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, max_source_positions=16, max_target_positions=16, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    WhisperForConditionalGeneration(config).save_pretrained(d)
    return d


def test_bad_finetune_input(bert_dir, whisper_dir, calib_file, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def fails(model_dir: Path, *extra: str | Path, expected: str) -> None:
        rc, stdout, err = run_cli("compress", model_dir, "--out", out, "--ratio", "0.45", *extra)
        assert_user_error(rc, err, expected)
        assert not out.exists() and stdout == ""

    fails(bert_dir, "--epochs", "3", expected="--epochs needs --calib DATA")
    fails(bert_dir, "--keep-size", "0.8", expected="--keep-size needs --calib DATA")
    fails(bert_dir, "--calib", tmp_path / "nope.txt", expected="nope.txt does not exist")
    (tmp_path / "empty.txt").write_text("\n  \n")
    fails(bert_dir, "--calib", tmp_path / "empty.txt", expected="empty.txt is empty: expected one example per line")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    fails(bert_dir, "--calib", tmp_path / "latin1.txt", expected="latin1.txt is not UTF-8 text")
    fails(bert_dir, "--calib", calib_file, "--keep-size", "0", expected="--keep-size must lie in (0, 1]")
    fails(bert_dir, "--calib", calib_file, "--keep-size", "1.5", expected="--keep-size must lie in (0, 1]")
    fails(bert_dir, "--calib", calib_file, "--keep-size", "0.3",
          expected="--keep-size 0.3 is below the 0.5541 of the targeted parameters kept with every layer compressed")
    fails(bert_dir, "--calib", calib_file, "--max-error", "-1", expected="--max-error must be a number >= 0")
    fails(bert_dir, "--calib", calib_file, "--lr", "-1", expected="lr must be a positive")
    fails(bert_dir, "--calib", calib_file, "--holdout", "1", expected="holdout must be")
    fails(bert_dir, "--calib", calib_file, "--epochs", "-2", expected="epochs must be")
    fails(bert_dir, "--calib", calib_file, "--batch-size", "0", expected="--batch-size must be >= 1")
    fails(bert_dir, "--calib", calib_file, "--max-length", "0", expected="--max-length must be >= 1")
    no_tokenizer = tmp_path / "bare"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(bert_dir / name, no_tokenizer / name)
    fails(no_tokenizer, "--calib", calib_file, expected="bare has no tokenizer")
    other = tmp_path / "other-vocab"  # the tokenizer of another model: ids past the embedding (was an IndexError)
    shutil.copytree(bert_dir, other)
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=6, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=96, max_position_embeddings=32)).save_pretrained(other)
    fails(other, "--calib", calib_file, expected="but the model's vocab_size is 6: the tokenizer files do not belong")
    from transformers import BertTokenizer

    specials = tmp_path / "specials-only"  # what `BertTokenizer(vocab_file=...)` builds on transformers 5
    shutil.copytree(bert_dir, specials)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        (specials / name).unlink()
    BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])}).save_pretrained(
        specials)
    fails(specials, "--calib", calib_file, expected="reads 153 of --calib's 153 tokens as '[UNK]' (unknown)")
    fails(whisper_dir, "--calib", calib_file, expected="takes audio (input_features): --calib must be a speech set")
    # --run-dir: new, empty or an earlier run's (was: any folder, MODEL_DIR included, written into)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    fails(bert_dir, "--calib", calib_file, "--run-dir", tmp_path / "notes",
          expected="--run-dir " + str(tmp_path / "notes") + " is a non-empty folder that holds no earlier run")
    fails(bert_dir, "--calib", calib_file, "--run-dir", bert_dir / "run", expected="is inside MODEL_DIR")
    fails(bert_dir, "--calib", calib_file, "--run-dir", out / "run", expected="is inside --out")
    # with a budget and no --run-dir, DIR-unselected must be free too: a conflict saves the fine-tuned model there
    (tmp_path / "out-unselected").mkdir()
    (tmp_path / "out-unselected" / "x").write_text("mine")
    fails(bert_dir, "--calib", calib_file, "--keep-size", "0.8", expected="out-unselected is a non-empty directory")
    shutil.rmtree(tmp_path / "out-unselected")
    # PQM keeps every weight (NF4) and adds LoRA: no parameter budget can be met (the advice was to use a ratio,
    # which pqm refuses, or a keep_size above 1)
    rc, _, err = run_cli("compress", bert_dir, "--out", out, "--attention-method", "pqm", "--ffn-method", "pqm",
                         "--attention-rank", "2", "--ffn-rank", "2", "--calib", calib_file, "--keep-size", "0.9")
    assert_user_error(rc, err, "so no --keep-size can be met; select by error with --max-error instead")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun
    fails(bert_dir, "--calib", calib_file, "--sequential", expected="run it in one process, not torchrun")


def test_bad_finetune_choices_exit_2(bert_dir, calib_file, tmp_path):
    for flag, value in (("--mode", "everything"), ("--init", "random"), ("--storage", "cloud"),
                        ("--storage-dtype", "float8")):
        rc, _, err = run_cli("compress", bert_dir, "--out", tmp_path / "o", "--ratio", "0.4", "--calib", calib_file,
                             flag, value)
        assert rc == 2 and f"argument {flag}: invalid choice: '{value}'" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(bert_dir, calib_file, tmp_path):
    """Layers spread over 2 gloo ranks give the single-process weights; only rank 0 writes and reports."""
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's default; same threads, same float sums
    args = ["-m", "adaptwin", "compress", str(bert_dir), "--calib", str(calib_file), *FT_FLAGS]
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], capture_output=True, text=True,
                         timeout=300, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *args,
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("BertModel (bert) -> ") == 1  # one summary, from rank 0
    assert "[rank 1] fine-tuned encoder.layer.1" in two.stderr and "[rank 0] fine-tuned encoder.layer.0" in two.stderr
    assert_same_outputs(adaptwin.load(tmp_path / "one"), adaptwin.load(tmp_path / "two"), bert_inputs())
