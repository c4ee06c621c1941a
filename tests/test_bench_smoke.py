"""Smoke test of benchmarks/whisper_encoder_speed.py at a toy size: it builds, checks, times once and writes
its CSV. No speed assertion (a 2-core shared CI machine cannot support one)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ sits beside the package, uninstalled
from benchmarks import common  # noqa: E402
from benchmarks import whisper_encoder_speed as bench  # noqa: E402

# 2 layers at d=64 and 100 mel frames (50 positions): compress + one timed call of each provider in ~2 s.
TOY = bench.EncoderShape("toy", d_model=64, layers=2, heads=4, ffn=128, positions=50)


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()  # the script sets the thread count; give the other tests theirs back
    yield
    torch.set_num_threads(n)


def test_benchmark_writes_csv(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(bench.SHAPES, "toy", TOY)
    out = tmp_path / "speed.csv"
    argv = ["--shapes", "toy", "--dtypes", "fp32,bf16", "--repeats", "1", "--warmup", "0", "--threads", "1",
            "--out", str(out)]
    assert bench.main(argv) == 0
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == common.CSV_FIELDS
    assert {(r["dtype"], r["provider"]) for r in rows} == {
        (d, p) for d in ("fp32", "bf16") for p in bench.PROVIDERS}
    for r in rows:
        assert r["shape"] == TOY.label() and r["benchmark"] == "whisper_encoder_speed"
        assert 0 < float(r["p20_ms"]) <= float(r["p50_ms"]) <= float(r["p80_ms"])
        assert float(r["gflop"]) > 0 and r["torch"] and r["device"]
    fp32 = {r["provider"]: r for r in rows if r["dtype"] == "fp32"}
    assert float(fp32["dense"]["ratio_p50"]) == 1.0
    assert float(fp32["adaptwin"]["gflop_ratio"]) < 1.0 < float(fp32["unfused"]["gflop_ratio"])
    assert float(fp32["adaptwin"]["rel_err"]) < bench.REL_TOL_FP32
    assert "time/dense" in capsys.readouterr().out

    # A second run of one dtype replaces its own rows and keeps the others.
    assert bench.main([*argv[:2], "--dtypes", "fp32", *argv[4:]]) == 0
    with open(out, newline="") as f:
        assert len(list(csv.DictReader(f))) == 2 * len(bench.PROVIDERS)


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


def test_flop_count_matches_formula():
    """The hook-based count equals the closed form for the dense encoder."""
    enc = bench.build_encoders(TOY)["dense"]
    f = bench.count_flops(enc, torch.randn(1, TOY.mel_bins, TOY.frames))
    t, d, L = TOY.positions, TOY.d_model, TOY.layers
    assert f["proj"] == L * 4 * 2 * t * d * d
    assert f["qk"] == f["av"] == L * 2 * t * t * d
    assert f["ffn"] == L * 2 * 2 * t * d * TOY.ffn
    assert f["conv"] == 2 * TOY.frames * d * TOY.mel_bins * 3 + 2 * t * d * d * 3
