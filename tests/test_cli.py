"""The ``adaptwin`` command line on tiny random models: compress -> inspect -> load, and bad input.

Most calls run in-process through `adaptwin.cli.main`; two go through a subprocess so the installed
entry point and ``python -m adaptwin`` are exercised as a user would run them.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adaptwin
from adaptwin.cli import main, parse_override

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", "the", "cat", "sat", "on"]

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(*args: str | Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT (hidden 48, 4 heads of 12) saved with save_pretrained, plus its tokenizer files."""
    from transformers import BertConfig, BertModel, BertTokenizer

    d = tmp_path_factory.mktemp("bert")
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizer(vocab_file=str(d / "vocab.txt")).save_pretrained(d)
    (d / "README.md").write_text("not a tokenizer file; must not be copied\n")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=32)
    BertModel(config).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def bert_save(bert_dir, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("saves") / "bert-45"
    rc, stdout, stderr = run_cli("compress", bert_dir, "--out", out, "--ratio", "0.45")
    assert rc == 0, stderr
    return out, stdout


def load_dense(folder: Path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(folder, dtype=torch.float32).eval()


def bert_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, len(VOCAB), (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # a padded row, so the mask path is compared too
    return {"input_ids": ids, "attention_mask": mask}


@torch.inference_mode()
def assert_same_outputs(a, b, inputs) -> None:
    # Same fp32 weights through the same ops in one process: the results are bit-identical.
    torch.testing.assert_close(a(**inputs).last_hidden_state, b(**inputs).last_hidden_state, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- compress


def test_compress_writes_weights_config_and_tokenizer(bert_save):
    out, stdout = bert_save
    names = {p.name for p in out.iterdir()}
    assert {"adaptwin.json", "model.safetensors", "vocab.txt", "tokenizer.json", "tokenizer_config.json"} <= names
    assert "README.md" not in names and "config.json" not in names
    assert "target 45.0 % removed, achieved" in stdout
    assert "encoder" in stdout and "wrote" in stdout and "time:" in stdout

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)  # the copied files are a working tokenizer
    assert tok("a b c")["input_ids"][0] == VOCAB.index("[CLS]")


def test_loaded_output_matches_python_compress(bert_dir, bert_save):
    out, _ = bert_save
    reference = adaptwin.compress(load_dense(bert_dir), adaptwin.CompressionConfig(ratio=0.45))
    loaded = adaptwin.load(out)
    assert_same_outputs(loaded, reference, bert_inputs())
    assert loaded.adaptwin_record.sites == reference.adaptwin_record.sites


def test_explicit_ranks_override_and_seed(bert_dir, tmp_path):
    out = tmp_path / "ranks"
    rc, _, err = run_cli("compress", bert_dir, "--out", out, "--attention-rank", "6", "--attention-lora-rank", "2",
                         "--ffn-rank", "10", "--ffn-lora-rank", "1", "--seed", "3",
                         "--override", "encoder.layer.1.*=ffn_rank:none,attention_rank:4")
    assert rc == 0, err
    data = json.loads(run_cli("inspect", out, "--json")[1])
    ranks = {s["path"]: (s["rank"], s["lora_rank"]) for s in data["sites"]}
    assert ranks == {
        "encoder.layer.0.attention.self": (6, 2),
        "encoder.layer.1.attention.self": (4, 2),
        "encoder.layer.0.intermediate.dense": (10, 1),
        "encoder.layer.0.output.dense": (10, 1),
    }
    config = adaptwin.CompressionConfig(attention_rank=6, attention_lora_rank=2, ffn_rank=10, ffn_lora_rank=1, seed=3,
                                        overrides={"encoder.layer.1.*": {"ffn_rank": None, "attention_rank": 4}})
    reference = adaptwin.compress(load_dense(bert_dir), config)
    assert_same_outputs(adaptwin.load(out), reference, bert_inputs())


def test_whisper_encoder_only_vo_twin(tmp_path):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    src = tmp_path / "whisper"
    config = WhisperConfig(vocab_size=64, num_mel_bins=8, d_model=32, encoder_layers=2, decoder_layers=1,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, max_source_positions=16, max_target_positions=16, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    torch.manual_seed(0)
    WhisperForConditionalGeneration(config).save_pretrained(src)
    out = tmp_path / "whisper-30"
    rc, stdout, err = run_cli("compress", src, "--out", out, "--ratio", "0.3", "--components", "encoder",
                              "--twins", "vo")
    assert rc == 0, err
    assert "generation_config.json" in {p.name for p in out.iterdir()}
    data = json.loads(run_cli("inspect", out, "--json")[1])
    assert data["model_class"] == "WhisperForConditionalGeneration"
    assert {s["component"] for s in data["sites"]} == {"encoder"} and set(data["components"]) == {"encoder", "total"}
    meta = json.loads((out / "adaptwin.json").read_text())
    attn = [m["spec"] for m in meta["compression"]["modules"].values() if m["spec"].get("module") == "attention"]
    assert attn and all(s["qk_rank"] is None and s["vo_rank"] for s in attn)

    dense = WhisperForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    reference = adaptwin.compress(dense, adaptwin.CompressionConfig(ratio=0.3, components=("encoder",), twins=("vo",)))
    loaded = adaptwin.load(out)
    features = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(2))  # (B, mels, 2·max_source_positions)
    with torch.inference_mode():
        a = loaded.model.encoder(features).last_hidden_state
        b = reference.model.encoder(features).last_hidden_state
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compress_replaces_an_earlier_save(bert_dir, tmp_path):
    out = tmp_path / "again"
    assert run_cli("compress", bert_dir, "--out", out, "--ratio", "0.3")[0] == 0
    rc, _, err = run_cli("compress", bert_dir, "--out", out, "--ratio", "0.6")
    assert rc == 0, err
    assert json.loads((out / "adaptwin.json").read_text())["compression"]["config"]["ratio"] == 0.6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no temporary or old folders left


# ---------------------------------------------------------------------------------------------- inspect / list


def test_inspect_table_lists_every_site(bert_save):
    out, _ = bert_save
    rc, stdout, _ = run_cli("inspect", out)
    assert rc == 0
    meta = json.loads((out / "adaptwin.json").read_text())
    for site in meta["compression"]["sites"]:
        line = next(x for x in stdout.splitlines() if x.startswith(site["path"] + " "))
        assert site["compressor"] in line and f"{site['rank']}+{site['lora_rank']}" in line
        assert f"{site['params_before']:,}" in line and f"{site['params_after']:,}" in line
    total = meta["summary"]["total"]
    total_line = next(x for x in stdout.splitlines() if x.startswith("total "))
    assert f"{total['params_before']:,}" in total_line and f"{total['params_after']:,}" in total_line
    assert f"{100 * total['compression']:.1f} %" in total_line
    assert f"{meta['weights']['bytes']:,} bytes" in stdout


def test_inspect_json_matches_adaptwin_json(bert_save):
    out, _ = bert_save
    rc, stdout, _ = run_cli("inspect", out, "--json")
    assert rc == 0
    data = json.loads(stdout)
    meta = json.loads((out / "adaptwin.json").read_text())
    keys = ("path", "component", "compressor", "rank", "lora_rank", "params_before", "params_after")
    assert [{k: s[k] for k in keys} for s in data["sites"]] == [{k: s[k] for k in keys}
                                                                  for s in meta["compression"]["sites"]]
    for name, summary in meta["summary"].items():
        for k in ("params_before", "params_after"):
            assert data["components"][name][k] == summary[k]
        assert data["components"][name]["compression"] == pytest.approx(summary["compression"], abs=1e-12)
    assert data["weights"]["bytes"] == meta["weights"]["bytes"] == (out / "model.safetensors").stat().st_size
    assert data["config"]["ratio"] == 0.45 and data["architecture"] == "bert"


def test_list_text_and_json():
    rc, text, _ = run_cli("list")
    assert rc == 0 and "product_twin" in text and "whisper" in text
    rc, stdout, _ = run_cli("list", "--json")
    data = json.loads(stdout)
    assert [c["name"] for c in data["compressors"]] == adaptwin.list_compressors()
    assert [a["model_type"] for a in data["architectures"]] == adaptwin.list_architectures()
    assert {"bert", "gpt2", "hubert", "llama", "roberta", "wav2vec2", "whisper"} <= set(adaptwin.list_architectures())


def test_parse_override():
    assert parse_override("model.*.fc1=ffn_rank:8,ffn-lora-rank:none") == ("model.*.fc1",
                                                                            {"ffn_rank": 8, "ffn_lora_rank": None})


# ---------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def distilbert_dir(tmp_path_factory) -> Path:
    from transformers import DistilBertConfig

    d = tmp_path_factory.mktemp("distilbert")
    DistilBertConfig(n_layers=1, dim=32, hidden_dim=64, n_heads=2, vocab_size=50).save_pretrained(d)
    return d


BAD_COMPRESS = [
    (["--ratio", "1.5"], "ratio must lie strictly between 0 and 1"),
    (["--ratio", "0"], "ratio must lie strictly between 0 and 1"),
    ([], "nothing to compress"),
    (["--ratio", "0.4", "--ffn-rank", "8"], "either ratio or explicit ranks"),
    (["--ratio", "0.4", "--twins", "qk,kv"], "twins must be a non-empty subset of ('qk', 'vo')"),
    (["--ratio", "0.4", "--override", "encoder.layer.0.*"], "must look like PATTERN=key:val"),
    (["--ratio", "0.4", "--override", "x=bogus:3"], "key one of ['attention_rank'"),
    (["--ratio", "0.4", "--override", "x=ffn_rank:big"], "must be a whole number or 'none'"),
    (["--ratio", "0.4", "--override", "decoder.*=ffn_rank:3"], "matches no compressible module"),
    (["--ratio", "0.4", "--components", "decoder"], "unknown components ['decoder'] for bert; allowed: ['encoder']"),
    (["--attention-rank", "99"], "exceeds the head dimension 12"),
    (["--ffn-rank", "0"], "ffn_rank must be >= 1"),
]


def assert_user_error(rc: int, err: str, expected: str) -> None:
    assert rc == 2
    assert "Traceback" not in err, err
    *progress, last = err.strip().splitlines()  # progress notes ("loading ...") may come first
    assert last.startswith("adaptwin compress: error: ") or last.startswith("adaptwin inspect: error: "), err
    assert expected in last and not any("error" in line for line in progress), err


@pytest.mark.parametrize("extra,expected", BAD_COMPRESS, ids=[e for _, e in BAD_COMPRESS])
def test_bad_compress_options(bert_dir, tmp_path, extra, expected):
    out = tmp_path / "out"
    rc, stdout, err = run_cli("compress", bert_dir, "--out", out, *extra)
    assert_user_error(rc, err, expected)
    assert not out.exists() and stdout == ""
    assert not list(tmp_path.iterdir())  # no temporary folders left behind either


def test_bad_model_dirs(tmp_path, distilbert_dir):
    out = tmp_path / "out"
    rc, _, err = run_cli("compress", tmp_path / "missing", "--out", out, "--ratio", "0.4")
    assert_user_error(rc, err, "missing does not exist")
    (tmp_path / "empty").mkdir()
    rc, _, err = run_cli("compress", tmp_path / "empty", "--out", out, "--ratio", "0.4")
    assert_user_error(rc, err, "has no config.json")
    rc, _, err = run_cli("compress", distilbert_dir, "--out", out, "--ratio", "0.4")
    assert_user_error(rc, err, "unsupported model type 'distilbert'; registered architectures: ['bert'")
    assert not out.exists()


def test_out_dir_that_is_not_a_save_is_refused(bert_dir, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    rc, _, err = run_cli("compress", bert_dir, "--out", out, "--ratio", "0.4")
    assert_user_error(rc, err, "is a non-empty directory that is not an adaptwin save")
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    rc, _, err = run_cli("compress", bert_dir, "--out", bert_dir, "--ratio", "0.4")
    assert_user_error(rc, err, "is the model folder itself")


def test_inspect_bad_dirs(tmp_path, bert_dir, bert_save):
    rc, _, err = run_cli("inspect", tmp_path / "missing")
    assert_user_error(rc, err, "is not a directory")
    rc, _, err = run_cli("inspect", bert_dir)
    assert_user_error(rc, err, "is not an adaptwin save: adaptwin.json is missing")
    broken = tmp_path / "broken"
    shutil.copytree(bert_save[0], broken)
    text = (broken / "adaptwin.json").read_text()
    (broken / "adaptwin.json").write_text(text[: len(text) // 2])
    rc, _, err = run_cli("inspect", broken)
    assert_user_error(rc, err, "is not valid JSON")


def test_argparse_errors_exit_2(tmp_path):
    rc, _, err = run_cli("compress", tmp_path)  # no --out
    assert rc == 2 and "required: --out" in err
    rc, _, err = run_cli("compress", tmp_path, "--out", tmp_path / "o", "--ratio", "half")
    assert rc == 2 and "invalid float value: 'half'" in err
    rc, _, err = run_cli("frobnicate")
    assert rc == 2 and "invalid choice" in err


# ---------------------------------------------------------------------------------------------- subprocess


def test_entry_point_and_module_run(bert_save, tmp_path):
    out, _ = bert_save
    script = shutil.which("adaptwin")
    if script is None:
        pytest.skip("the adaptwin entry point is not on PATH (package not pip-installed)")
    proc = subprocess.run([script, "inspect", str(out), "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["components"]["total"]["params_before"] > 0

    proc = subprocess.run([sys.executable, "-m", "adaptwin", "compress", str(tmp_path / "nope"), "--out",
                           str(tmp_path / "o"), "--ratio", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("adaptwin compress: error: ratio must lie strictly between 0 and 1 "
                                   "(fraction removed), got 2.0")
    assert not (tmp_path / "o").exists()


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
    fails(bert_dir, "--calib", calib_file, "--keep-size", "0", expected="keep_size must lie in (0, 1]")
    fails(bert_dir, "--calib", calib_file, "--keep-size", "1.5", expected="keep_size must lie in (0, 1]")
    fails(bert_dir, "--calib", calib_file, "--keep-size", "0.3",
          expected="keep_size 0.3 is below the 0.5541 of the targeted parameters kept with every layer compressed")
    fails(bert_dir, "--calib", calib_file, "--max-error", "-1", expected="max_error must be a number >= 0")
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
    fails(whisper_dir, "--calib", calib_file, expected="calibration data for speech models arrives with the speech")
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
