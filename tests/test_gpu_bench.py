"""benchmarks/gpu_kernels.py (the GPU figures, run on a lent device): its accounting, its refusal without
CUDA, and its checking-and-recording logic on CPU tensors with the Triton kernels interpreted and the timer
replaced (no speed is measured here; on a GPU the same code times with CUDA events and graphs)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ sits beside the package, uninstalled
from benchmarks import gpu_common, gpu_kernels  # noqa: E402


def test_accounting():
    assert gpu_kernels.attention_flops(1, 6, 1500, 32) == 4 * 6 * 1500 * 1500 * 32
    assert gpu_kernels.attention_bytes(2, 3, 10, 16, 2) == 4 * 2 * 3 * 10 * 16 * 2
    assert gpu_common.half_rank(4096) * 2 * 4096 == 4096 * 4096 // 2  # two factors hold half the weight
    r = gpu_common.half_rank(1024)
    assert gpu_common.nf4_bytes(r, 1024, 1024) == r * 2048 // 2 + 4 * (r * 2048 // 64)


def test_bench_times_through_tritons_timers(monkeypatch):
    """`gpu_common.bench` (which the other tests here replace) calls triton.testing's do_bench and, for graphs,
    do_bench_cudagraph, by those names: checked against the installed triton, or a stand-in module where
    there is none. (A misspelt name here once waited for a GPU run to fail.)"""
    try:
        import triton.testing as timers
    except ImportError:
        timers = types.ModuleType("triton.testing")
        timers.do_bench = timers.do_bench_cudagraph = None
        monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(testing=timers))
        monkeypatch.setitem(sys.modules, "triton.testing", timers)
    seen = []

    def timer(name):
        def run(fn, **kwargs):
            fn()
            seen.append((name, kwargs.get("return_mode")))
            return 0.005  # ms
        return run

    monkeypatch.setattr(timers, "do_bench", timer("do_bench"))  # raises where triton has no such name
    monkeypatch.setattr(timers, "do_bench_cudagraph", timer("do_bench_cudagraph"))
    ran = []
    assert gpu_common.bench(lambda: ran.append(1)) == pytest.approx(5.0)
    assert gpu_common.bench(lambda: ran.append(1), graph=True) == pytest.approx(5.0)
    assert seen == [("do_bench", "median"), ("do_bench_cudagraph", "median")] and len(ran) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: the script would run")
def test_skips_without_cuda(capsys, tmp_path):
    assert gpu_kernels.main(["--quick", "--out", str(tmp_path / "g.csv")]) == 0  # `make bench` goes on
    assert "skipped, it needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "g.csv").exists()


def test_pitch_probe_skips_without_cuda(capsys):
    from benchmarks import gpu_attention_pitch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    assert gpu_attention_pitch.main([]) == 0
    assert "skipped, it needs a CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_attention_pitch.main(["--batch", "0"])


def test_gemv_parts_checks_its_arguments_and_skips_without_cuda(capsys):
    from benchmarks import gpu_gemv_parts

    for bad in (["--sizes", "4096,100"], ["--sizes", "big"], ["--config", "[1]"], ["--config", "{rows"]):
        with pytest.raises(SystemExit):
            gpu_gemv_parts.main(bad)
    assert "--sizes must be" in capsys.readouterr().err
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    assert gpu_gemv_parts.main(["--sizes", "128"]) == 0
    assert "skipped, it needs a CUDA device" in capsys.readouterr().err


def test_rejects_unknown_dtype(capsys):
    with pytest.raises(SystemExit):
        gpu_kernels.main(["--dtypes", "fp8"])
    assert "unknown dtypes ['fp8']; allowed: ['bf16', 'fp16']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_kernels.main(["--gemv-sizes", "4096,100"])
    assert "--gemv-sizes must be comma-separated multiples of 8 (>= 8), got '4096,100'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_kernels.main(["--parts", "gemm"])
    assert "unknown parts ['gemm']; allowed: ['attention', 'batched', 'gemv']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_kernels.main(["--widths", "24,0"])
    assert "--widths must be comma-separated integers in 1..256, got '24,0'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_kernels.main(["--shapes", "16x20,16"])
    assert "--shapes must be comma-separated BATCHxHEADS with positive integers (e.g. 16x20), got '16x20,16'" in (
        capsys.readouterr().err)


CHILD = """
import torch
import benchmarks.gpu_common as c
import benchmarks.gpu_gemv as gemv
import benchmarks.gpu_kernels as g
calls = []
c.bench = lambda fn, graph=False: (fn(), calls.append(graph), 10.0)[2]
rows = g._attention_shape(torch.device("cpu"), "fp16", 1, 2, (16, 20), False, {"gemm_fp16_tflops": 1.0}, tokens=40)
assert [r["provider"] for r in rows] == ["sdpa_dense_w64", "triton_w16", "triton_w16_defer_pv", "triton_w20",
                                          "triton_w20_defer_pv"], rows
assert all(r["rel_err"] < 2e-3 for r in rows[1:]), rows
assert rows[1]["tflops"] == g.attention_flops(1, 2, 40, 16) / 10.0 / 1e6
assert calls == [False, True] + [False, True, True] * 2, calls  # eager SDPA, then graphs (eager once a width)
assert all("eager 10.0 us" in r["config"] for r in rows[:2]) and rows[2]["config"].startswith("defer pv"), rows
rows = g._attention_shape(torch.device("cpu"), "fp16", 1, 2, (40,), False, {}, tokens=40)  # two dot parts
assert [r["provider"] for r in rows] == ["sdpa_dense_w64", "triton_w40", "triton_w40_one_part",
                                          "triton_w40_defer_pv"], rows
assert all(r["rel_err"] < 2e-3 for r in rows[1:]) and rows[2]["config"].startswith("one part"), rows
calls.clear()
rows = g._decode_shape(torch.device("cpu"), "fp16", 1, 2, (16, 40), tokens=300)
assert [r["provider"] for r in rows] == ["sdpa_dense_w64", "triton_w16", "triton_w40"], rows
assert all(r["rel_err"] < 2e-3 for r in rows[1:]) and calls[-3:] == [True, True, True], (rows, calls)
rows = gemv._gemv_size(torch.device("cpu"), 128, 0, {"copy_gbps": 100.0})
names = [r["provider"] for r in rows]
assert names[:3] == ["cublas_dense_fp16", "adaptwin_nf4_rank", "adaptwin_nf4_rank_select_tree"], names
assert rows[1]["rel_err"] < 1e-2 and rows[1]["gbps"] == c.nf4_bytes(32, 128, 128) / 10.0 / 1e3
assert rows[2]["rel_err"] < 1e-2 and "'GATHER': False" in rows[2]["config"]
assert names[3] == "adaptwin_nf4_rank_no_pdl" and "'pdl': False" in rows[3]["config"], rows
assert names[4] == "adaptwin_nf4_rank_words" and "'WORDS': True" in rows[4]["config"], rows
assert names[5] == "adaptwin_nf4_rank_one_launch" and all(r["rel_err"] < 1e-2 for r in rows[4:6]), rows
m8 = [r for r in rows if r["shape"].endswith(":M8")]
assert [r["provider"] for r in m8] == ["cublas_dense_fp16", "adaptwin_nf4_rank", "adaptwin_nf4_rank_one_launch"], m8
assert m8[2]["rel_err"] < 1e-2, m8
assert calls[-1] is True  # GEMVs are timed through CUDA graphs
rows = gemv._gemv_size(torch.device("cpu"), 128, 0, {}, tune=True)
tuned = [r for r in rows if r["provider"] == "adaptwin_nf4_rank_tuned"]
assert len(tuned) == 1 and "'rows': {'BLOCK_N'" in tuned[0]["config"], rows
assert [r["provider"] for r in rows].count("adaptwin_nf4_rank_one_launch_tuned") == 1, rows
n = len(calls)
rows = g._batched_shape(torch.device("cpu"), "fp16", 40, 96, 20, 80)
assert [r["provider"] for r in rows] == ["cublas_dense", "adaptwin_nf4", "adaptwin_nf4_tiles",
                                         "adaptwin_nf4_tiles_two_launches", "nf4_reference", "adaptwin_fp",
                                         "adaptwin_fp_one_launch", "cublas_lowrank_two_gemms"], rows
assert all(r["rel_err"] < 1e-2 for r in rows) and rows[0]["speedup"] == 1.0, rows
assert rows[1]["tflops"] == 2 * 40 * 20 * (96 + 80) / 10.0 / 1e6 and calls[n:] == [True] * 8
# a run cut short keeps the parts it finished: each part's rows reach the CSV as it ends
import csv, os, tempfile
g.ceilings = lambda device: {"copy_gbps": 100.0}
def cut_short(*args, **kwargs):
    raise RuntimeError("cut short")
g.bench_batched = cut_short
out = os.path.join(tempfile.mkdtemp(), "g.csv")
try:
    g.collect(torch.device("cpu"), "cpu", 0, out, ["fp16"], ["gemv", "batched"], shapes=(), widths=(), sizes=(128,),
              batched=[(40, 96, 20, 80)], tune=False)
except RuntimeError as exc:
    assert "cut short" in str(exc)
else:
    raise AssertionError("the batched part should have failed")
kept = list(csv.DictReader(open(out)))
assert [r["kind"] for r in kept][:2] == ["ceiling", "gemv"] and {r["kind"] for r in kept} == {"ceiling", "gemv"}, kept
assert all(r["device"] == "cpu" and r["timestamp"] for r in kept) and "copy_gbps=100.0" in kept[0]["config"], kept
import benchmarks.gpu_gemv_parts as parts
rows = parts.parts(torch.device("cpu"), 128, 0, {"rows": {"GROUPS": 2}})
assert [r["provider"] for r in rows] == (["whole", "kernel 0 _gemv_nf4_rows_kernel", "kernel 1 _gemv_nf4_cols_kernel"]
                                          + ["read A 2048 bytes"] * 3 + ["read B 2048 bytes"] * 3
                                          + ["empty x1", "empty x2", "empty x3"]), rows
assert "'GROUPS': 2" in rows[1]["config"] and rows[3]["gbps"] == 2048 / 10.0 / 1e3, rows
print("ok", len(calls))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_checks_and_rows_on_cpu_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quick_run_on_gpu(tmp_path):
    assert gpu_kernels.main(["--quick", "--dtypes", "fp16", "--gemv-sizes", "1024", "--out",
                             str(tmp_path / "g.csv")]) == 0
    assert (tmp_path / "g.csv").exists()


NCU_HEADER = ("ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream", "Block Size",
              "Grid Size", "Device", "CC", "Section Name", "Metric Name", "Metric Unit", "Metric Value")
NCU_ROWS = [  # (ID, kernel, section, metric, unit, value): what `ncu --csv --page details` prints, in part
    ("0", "_gemv_nf4_rows_kernel(void*, int)", "GPU Speed Of Light Throughput", "Duration", "us", "7.42"),
    ("0", "_gemv_nf4_rows_kernel(void*, int)", "GPU Speed Of Light Throughput", "DRAM Throughput", "%", "12.5"),
    ("0", "_gemv_nf4_rows_kernel(void*, int)", "Launch Statistics", "Waves Per SM", "", "0.48"),
    ("1", "_sum_rows_kernel(void*)", "Occupancy", "Achieved Occupancy", "%", "9.1"),
]


def _ncu_csv() -> str:
    """A program's output under ncu: its own lines, then the quoted CSV."""
    quoted = [",".join(f'"{v}"' for v in NCU_HEADER)]
    for launch, kernel, section, metric, unit, value in NCU_ROWS:
        row = (launch, "1", "python3", "h", kernel, "1", "7", "(128, 1, 1)", "(32, 8, 1)", "0", "9.0", section,
               metric, unit, value)
        quoted.append(",".join(f'"{v}"' for v in row))
    return "==PROF== Connected to process 1 (python3)\nran gemv d4096 planned\n" + "\n".join(quoted) + "\n"


def test_profile_summary_reads_ncu_csv(tmp_path, capsys):
    from benchmarks import gpu_profile

    path = tmp_path / "ncu.csv"
    path.write_text(_ncu_csv())
    rows = gpu_profile.summarize(str(path))
    assert rows == [["0", "_gemv_nf4_rows_kernel", "7.42 us", "12.5 %", "-", "-", "-", "-", "-", "-", "-"],
                    ["1", "_sum_rows_kernel", "-", "-", "-", "-", "9.1 %", "-", "-", "-", "-"]]
    assert gpu_profile.main(["--summarize", str(path)]) == 0
    assert "_gemv_nf4_rows_kernel" in capsys.readouterr().out
    (tmp_path / "other.csv").write_text('"a","b"\n"1","2"\n')
    with pytest.raises(SystemExit) as exc:
        gpu_profile.main(["--summarize", str(tmp_path / "other.csv")])
    assert exc.value.code == 2 and "not ncu --csv --page details output" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_profile_calls_run_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_profile", "--small"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ran = [line for line in proc.stderr.splitlines() if line.startswith("ran ")]
    assert len(ran) == 11 and ran[-1] == "ran attention w48 one part", proc.stderr[-2000:]
    assert "ran gemv d128 one launch" in ran, ran


PITCH_CHILD = """
import torch
import benchmarks.gpu_attention_pitch as g
g.bench = lambda fn, graph=False: (fn(), 1.0)[1]  # the call once, no GPU timer
rows = g.run(1, 2, 40, torch.device("cpu"), torch.float32)
print([(r[0], r[1]) for r in rows], max(float(r[4]) for r in rows))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_pitch_probe_layouts_under_the_interpreter():
    """benchmarks.gpu_attention_pitch's three layouts per width (packed, a 64-byte pitch, the modules' view of
    (B, T, H·w) projections) reach the kernel and match the reference, here under TRITON_INTERPRET=1."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", PITCH_CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    layouts, worst = proc.stdout.rsplit(" ", 1)
    assert layouts.startswith("[(24, 24), (24, 32), (24, '48 (module)'), (32, 32), (32, '64 (module)')"), layouts
    assert float(worst) < 1e-4, proc.stdout
