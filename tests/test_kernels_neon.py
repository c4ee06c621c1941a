"""rank_linear's SIMD decoding and the in-place GELU outside torch, on this CPU and on an emulated AArch64 one (the
NEON paths).

The extension's factor decoding (csrc/cpu/codes.h) and its batch-1 register-decode kernels for CPUs without
AVX-512 (rank_linear_avx2.h, rank_linear_neon.h) are free of torch, so tests/simd_decode.cpp builds them alone
and checks every SIMD path against the scalar loops (same bits when decoding, float64-bounded sums). There is no
AArch64 torch here, so the NEON paths are checked that way only: built with a cross compiler and run under
qemu-aarch64 (Debian: ``apt-get install g++-aarch64-linux-gnu qemu-user``). The same cross compiler also builds
every csrc/cpu source of the extension against torch's headers, so an ARM build cannot break unseen.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "simd_decode.cpp"
CROSS = "aarch64-linux-gnu-g++"


def _build(compiler: str, out: Path, *flags: str) -> Path:
    proc = subprocess.run([compiler, "-O3", "-std=c++17", *flags, str(HARNESS), "-o", str(out)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _run(cmd: list[str], cap: str = "native") -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "ADAPTWIN_CPU_CAP": cap})
    assert proc.returncode == 0 and "FAIL" not in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
    return proc.stdout


def _paths(stdout: str) -> dict[str, int]:
    """{"neon": cases, ...} from the harness's "PATH ok CASES" lines."""
    return {line.split()[0]: int(line.split()[2]) for line in stdout.splitlines() if " ok " in line}


def test_the_simd_decoding_of_this_cpu_matches_the_scalar_loops(tmp_path):
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler on PATH")
    exe = _build(compiler, tmp_path / "simd_decode")
    for cap in ("native", "avx2", "portable"):  # the dispatched decode under each cap
        paths = _paths(_run([str(exe)], cap))
        assert paths["scalar"] >= 1500 and paths["dispatched"] == paths["scalar"], paths
    from adaptwin.ops import backends

    native = backends.cpu_features() if backends.load()["cpp"] else {}
    if native.get("avx512"):  # the harness runs every path the CPU has, whatever the cap
        assert paths.get("avx512") == paths["scalar"], paths
    if native.get("avx2"):  # decoding, dot / axpy and the register kernels
        assert paths.get("avx2", 0) > paths["scalar"], paths
    # the in-place GELU (csrc/cpu/gelu.h): every SIMD path the CPU has, and the dispatched one
    assert paths["gelu_scalar"] >= 90 and paths["gelu_dispatched"] == paths["gelu_scalar"], paths
    for name in ("avx512", "avx2"):
        if native.get(name):
            assert paths.get(f"gelu_{name}") == paths["gelu_scalar"], paths


@pytest.fixture(scope="module")
def cross():
    if shutil.which(CROSS) is None or shutil.which("qemu-aarch64") is None:
        pytest.skip(f"needs an AArch64 cross compiler and qemu-user ({CROSS}, qemu-aarch64: "
                    "apt-get install g++-aarch64-linux-gnu qemu-user)")
    return CROSS


def test_the_neon_paths_match_the_scalar_loops_on_an_emulated_aarch64(cross, tmp_path):
    exe = _build(cross, tmp_path / "simd_decode_arm", "-static")
    paths = _paths(_run(["qemu-aarch64", str(exe)]))
    # NEON: decoding, dot / axpy, and the batch-1 register kernels (more cases than the scalar loops' set), and
    # the in-place GELU
    assert set(paths) == {"scalar", "dispatched", "neon", "gelu_scalar", "gelu_dispatched", "gelu_neon"}, paths
    assert paths["neon"] > paths["scalar"] >= 1500 and paths["gelu_neon"] == paths["gelu_scalar"] >= 90, paths
    portable = _paths(_run(["qemu-aarch64", str(exe)], "portable"))
    assert portable == paths, portable  # the cap turns the dispatch to the scalar loops, which agree too


def test_the_extension_compiles_for_aarch64(cross, tmp_path):
    from torch.utils.cpp_extension import include_paths

    flags = ["-std=c++20", "-O2", "-fopenmp", "-fPIC", "-c", *(f"-I{p}" for p in include_paths()),
             f"-I{sysconfig.get_paths()['include']}", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
    sources = sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))
    assert len(sources) >= 4

    def build(src: Path) -> subprocess.CompletedProcess:
        return subprocess.run([cross, *flags, str(src), "-o", str(tmp_path / f"{src.stem}.o")], capture_output=True,
                              text=True, timeout=900)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for src, proc in zip(sources, pool.map(build, sources)):
            assert proc.returncode == 0, f"{src.name}:\n{proc.stderr[-3000:]}"
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if objdump is not None:  # the NEON table lookup of the NF4 decode is in the object
        text = subprocess.run([objdump, "-d", str(tmp_path / "rank_linear.o")], capture_output=True, text=True).stdout
        assert "tbl\tv" in text or "tbl v" in text, text[:500]


def test_the_instruction_count_benchmark_runs(cross, tmp_path, capsys):
    import csv

    from benchmarks import simd_instructions

    out = tmp_path / "simd.csv"
    simd_instructions.main(["--sizes", "64", "--out", str(out)])
    rows = {r["provider"]: r for r in csv.DictReader(out.open())}
    assert set(rows) == set(simd_instructions.PROVIDERS), rows
    calls = {p: float(r["instructions_per_call"]) for p, r in rows.items()}
    assert all(n > 0 for n in calls.values()), calls
    # the NEON register decode executes fewer instructions than the scalar loops it replaced
    assert calls["nf4_neon_register"] < calls["nf4_neon_buffered"] < calls["nf4_scalar"], calls
    assert calls["int8_neon_register"] < calls["int8_scalar"], calls
    with pytest.raises(SystemExit):
        simd_instructions.main(["--sizes", "100", "--out", str(out)])
    assert "--sizes must be multiples of 64" in capsys.readouterr().err
