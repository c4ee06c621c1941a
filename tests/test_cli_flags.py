"""The command line's flag syntax and wording: other compressors and their options (--attention-method,
--ffn-method, --method-option), library errors and warnings reworded in flags, and the output folder probe."""

from __future__ import annotations

import json

import pytest
from tiny_cli import assert_same_outputs, bert_inputs, load_dense, run_cli

import adaptwin


@pytest.mark.parametrize("method, options, python", [
    ("residual", ["--method-option", "residual.group_size=2", "--method-option", "residual.init=mean"],
     {"residual": {"group_size": 2, "init": "mean"}}),
    ("pqm", ["--method-option", "pqm.double_quant=true", "--method-option", "pqm.blocksize=32"],
     {"pqm": {"double_quant": True, "blocksize": 32}}),
])
def test_compress_with_another_compressor(bert_dir, tmp_path, method, options, python):
    """--attention-method / --ffn-method pick any registered compressor of that site kind, and
    --method-option NAME.KEY=VALUE (JSON, or a bare word as a string) sets its options: the save is the one
    the Python API makes with the same CompressionConfig."""
    out = tmp_path / method
    rc, _, err = run_cli("compress", bert_dir, "--out", out, "--attention-rank", "2", "--ffn-rank", "3",
                         "--attention-method", method, "--ffn-method", method, *options)
    assert rc == 0, err
    data = json.loads(run_cli("inspect", out, "--json")[1])
    assert {s["compressor"] for s in data["sites"]} == {method}
    assert data["config"]["method_options"] == python
    config = adaptwin.CompressionConfig(attention_rank=2, ffn_rank=3, attention_method=method, ffn_method=method,
                                        method_options=python)
    assert_same_outputs(adaptwin.load(out), adaptwin.compress(load_dense(bert_dir), config), bert_inputs())
    if method == "pqm":
        head = run_cli("inspect", out)[1].splitlines()[0]
        assert head.endswith("pqm: NF4 base (block 32, double quant) + LoRA rank 2/3 on attention, ffn")


def test_warnings_are_one_line_in_flag_words(bert_dir, tmp_path):
    """A library warning prints as one line naming the command, not as Python's file:line plus source line."""
    rc, _, err = run_cli("compress", bert_dir, "--out", tmp_path / "r", "--attention-rank", "11", "--ffn-rank", "40",
                         "--attention-method", "residual", "--ffn-method", "residual")
    assert rc == 0, err
    line = next(x for x in err.splitlines() if "warning" in x)
    assert line.startswith("adaptwin compress: warning: these ranks add parameters instead of removing them")
    assert "UserWarning" not in err and ".py:" not in err


def test_parse_method_option():
    from adaptwin.cli import parse_method_option

    assert parse_method_option("residual.group_size=2") == ("residual", "group_size", 2)
    assert parse_method_option('residual.group_size={"attention": 2, "ffn": 3}') == (
        "residual", "group_size", {"attention": 2, "ffn": 3})
    assert parse_method_option("pqm.alpha=0.5") == ("pqm", "alpha", 0.5)
    assert parse_method_option("pqm.double_quant=false") == ("pqm", "double_quant", False)
    assert parse_method_option("residual.init=mean") == ("residual", "init", "mean")  # not JSON: a string
    for bad in ("residual", "residual.group_size", "group_size=2", ".x=1", "residual.=1", "residual.x= "):
        with pytest.raises(ValueError, match="must look like NAME.KEY=VALUE"):
            parse_method_option(bad)


@pytest.mark.parametrize("api,cli", [
    ("double_quant applies to NF4 block scales only; use kind='nf4' or double_quant=False",
     "--double-quant applies to NF4 block scales only; use --quantization nf4 or no --double-quant"),
    ("compress only the VO twin with twins=('vo',)", "compress only the VO twin with --twins vo"),
    ("needs explicit ranks (attention_rank=..., ffn_rank=...), not ratio=0.4",
     "needs explicit ranks (--attention-rank N, --ffn-rank N), not --ratio 0.4"),
    ("quantize_lora=True needs quantization='nf4' or 'int8'", "--quantize-lora needs --quantization nf4 or int8"),
    ("ffn_rank must be >= 1, got 0", "--ffn-rank must be >= 1, got 0"),
    # not flags of `compress`, or prose: unchanged
    ("use method_options={'pqm': {...}} and lora_rank=2", "use method_options={'pqm': {...}} and lora_rank=2"),
    ("give either ratio or explicit ranks", "give either ratio or explicit ranks"),
    ("use method_options={'pqm': {'quantize_embeddings': True, 'blocksize': 32}}",
     "use --method-option pqm.quantize_embeddings=true --method-option pqm.blocksize=32"),
    ("the pqm compressor quantises its base to NF4 itself, so it takes quantization=None (got 'nf4')",
     "the pqm compressor quantises its base to NF4 itself, so it takes no --quantization (got 'nf4')"),
    ("give {'quantize_embeddings': True}", "give {'quantize_embeddings': True}"),  # quoted: left alone
    ("model.encoder.layers.0.fc1: bad", "model.encoder.layers.0.fc1: bad"),
    # --override's syntax uses the field names themselves
    ("--override 'x=bogus:3': key one of ['attention_rank']", "--override 'x=bogus:3': key one of ['attention_rank']"),
])
def test_errors_name_flags_not_keywords(api, cli):
    from adaptwin.cli import _command_flags, build_parser, in_flag_words

    flags = _command_flags(build_parser(), "compress")
    assert {"ratio", "double_quant", "twins", "attention_rank", "quantization"} <= flags and "lora_rank" not in flags
    assert in_flag_words(api, flags) == cli


def test_check_writable_probes_the_folder_it_would_create_in(tmp_path, monkeypatch):
    from adaptwin import _files

    _files.check_writable(tmp_path / "new" / "deeper" / "save")  # created later, under a writable folder
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the probe leaves nothing behind

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(_files.tempfile, "mkdtemp", refuse)  # (as root, a chmod 555 folder cannot show it)
    with pytest.raises(ValueError, match=f"cannot write {tmp_path / 'x'}: {tmp_path} does not take new folders "
                                         r"\(Permission denied\)"):
        _files.check_writable(tmp_path / "x")
