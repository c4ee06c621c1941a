"""The ``adaptwin`` command line on tiny random models: compress -> inspect -> load, and bad input.

Most calls run in-process through `adaptwin.cli.main`; two go through a subprocess so the installed
entry point and ``python -m adaptwin`` are exercised as a user would run them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_cli import VOCAB, assert_same_outputs, assert_user_error, bert_inputs, load_dense, run_cli

import adaptwin
from adaptwin.cli import parse_override

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bert_save(bert_dir, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("saves") / "bert-45"
    rc, stdout, stderr = run_cli("compress", bert_dir, "--out", out, "--ratio", "0.45")
    assert rc == 0, stderr
    return out, stdout


# ---------------------------------------------------------------------------------------------- compress


def test_compress_width_multiple_rounds_the_planned_widths(bert_dir, tmp_path):
    out = tmp_path / "aligned"
    rc, _, stderr = run_cli("compress", bert_dir, "--out", out, "--ratio", "0.45", "--width-multiple", "4")
    assert rc == 0, stderr
    compression = adaptwin.read_meta(out)["compression"]
    assert compression["config"]["width_multiple"] == 4
    widths = [row["rank"] + row["lora_rank"] for row in compression["sites"]]
    assert widths and all(w % 4 == 0 for w in widths), widths


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
    (["--ffn-rank", "0"], "--ffn-rank must be >= 1"),
    (["--ratio", "0.4", "--width-multiple", "0"], "--width-multiple must be a whole number in 1..256, got 0"),
    (["--ffn-rank", "8", "--width-multiple", "8"], "--width-multiple applies to ranks planned from ratio"),
    (["--ratio", "0.4", "--double-quant"], "--quant-blocksize and --double-quant need --quantization nf4 or int8"),
    (["--ratio", "0.4", "--quantization", "int8", "--double-quant"],
     "--double-quant applies to NF4 block scales only; use --quantization nf4 or no --double-quant"),
    (["--ratio", "0.4", "--attention-rank", "3"], "not both (--ratio 0.4, --attention-rank 3)"),
    (["--attention-rank", "2", "--attention-method", "svd"],
     "--attention-method 'svd' is not a compressor of attention sites; allowed: ['pqm', 'product_twin', 'residual']"),
    (["--ffn-rank", "2", "--ffn-method", "quantized"], "--ffn-method 'quantized' is not a compressor of ffn sites"),
    (["--ffn-rank", "2", "--method-option", "pqm.double_quant=true"],
     "'pqm' compresses nothing here (--attention-method product_twin, --ffn-method svd)"),
    (["--ffn-rank", "2", "--ffn-method", "residual", "--method-option", "residual.colour=1"],
     "unknown residual options ['colour']; allowed:"),
    (["--ffn-rank", "2", "--ffn-method", "residual", "--method-option", "residual.group_size"],
     "must look like NAME.KEY=VALUE"),
    (["--ratio", "0.4", "--ffn-method", "pqm"], "there is no ratio to plan (got --ratio 0.4)"),
    (["--attention-rank", "2", "--attention-method", "pqm", "--quantization", "nf4"],
     "so it takes no --quantization (got 'nf4'); its format is set as --method-option pqm.blocksize=64 "
     "--method-option pqm.double_quant=true"),
]



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


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "unresolvable host"])
def test_a_name_that_is_no_folder_without_the_hub_fails_at_once(tmp_path, monkeypatch, offline):
    """A mistyped folder name looks like a hub id: with no hub to reach, one line at once, not a minute of
    retries (26 s here, 13 lines of stderr, before 2026-11-26)."""
    import time

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    if offline == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    start = time.perf_counter()
    rc, _, err = run_cli("compress", "no-such-model", "--out", tmp_path / "out", "--ratio", "0.4")
    assert_user_error(rc, err, "no-such-model is no local folder, and the hub")
    assert time.perf_counter() - start < 15


def test_out_save_with_a_file_of_the_user_is_refused_before_work(bert_dir, tmp_path):
    out = tmp_path / "out"
    rc, _, err = run_cli("compress", bert_dir, "--out", out, "--ratio", "0.4")
    assert rc == 0, err
    (out / "my_notes.txt").write_text("mine")
    rc, stdout, err = run_cli("compress", bert_dir, "--out", out, "--ratio", "0.3")
    assert_user_error(rc, err, "holds files its adaptwin save did not write (my_notes.txt)")
    assert (out / "my_notes.txt").read_text() == "mine" and stdout == ""


def test_out_dir_that_is_not_a_save_is_refused(bert_dir, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    rc, _, err = run_cli("compress", bert_dir, "--out", out, "--ratio", "0.4")
    assert_user_error(rc, err, "is a non-empty directory that is not an adaptwin save")
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    rc, _, err = run_cli("compress", bert_dir, "--out", bert_dir, "--ratio", "0.4")
    assert_user_error(rc, err, "is the model folder itself")
    (tmp_path / "a-file").write_text("x")  # found before any work (was an OSError once everything was done)
    rc, _, err = run_cli("compress", bert_dir, "--out", tmp_path / "a-file" / "sub" / "out", "--ratio", "0.4")
    assert_user_error(rc, err, f"cannot create {tmp_path / 'a-file' / 'sub' / 'out'}: {tmp_path / 'a-file'} is a "
                               "file, not a folder")


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
