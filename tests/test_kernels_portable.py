"""The CPU kernels' other paths: what runs on ARM (phones, Raspberry Pi, Apple silicon), on x86 CPUs without
AVX-512 and on AVX-512 CPUs without AVX512-BF16, none of which this machine is.

The extension picks its AVX-512 loops at run time wherever the CPU has them, so on this machine the
other loops never run in the other tests. Each check below runs test_kernels_cpu.py's cases (same
criterion: error at most twice the reference's) in a child process on one of them:

1. The installed build with its dispatch capped (``ADAPTWIN_CPU_CAP=portable`` / ``avx2`` / ``avx512``): the
   same binary an AVX2 laptop or a Skylake-X server loads, taking the paths theirs take (``portable``: no
   SIMD path; ARM's NEON loops are checked by test_kernels_neon.py under qemu-aarch64).
2. `csrc/cpu` built again with ``-DADAPTWIN_PORTABLE`` (no x86 intrinsics compiled at all, as on a non-x86
   CPU) and loaded in place of ``adaptwin._C`` (``ADAPTWIN_NO_EXTENSION=1`` keeps the installed one out;
   both register the same kernels); the child checks first that the CPU kernels come from that build.
   Not marked slow although it takes about 35 s: CI's machine has AVX-512 too, so this is the only place
   the portable build is checked before a user on another CPU runs it.
3. Where qemu-user is installed (slow): the installed build on an emulated Haswell, an AVX2 CPU. QEMU's
   emulator has no AVX-512, so an AVX-512 instruction reached without its run-time check ends the run
   with SIGILL: the one failure the caps cannot show.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def assert_cases_passed(proc: subprocess.CompletedProcess) -> None:
    """The child's pytest run passed, with at least 100 cases run (none skipped wholesale)."""
    tail = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0 and "failed" not in proc.stdout, tail  # a SIGILL under qemu lands here too
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed is not None and int(passed.group(1)) >= 100, tail

CHILD = """
import glob, sys
import adaptwin.ops.backends as backends  # defines the ops; ADAPTWIN_NO_EXTENSION=1 keeps adaptwin._C out
from torch.utils.cpp_extension import load

assert not backends.load()["cpp"] and "adaptwin._C" not in sys.modules
assert not backends.has_kernel("adaptwin::attention", "cpu")
portable = load(name="_C", sources=sorted(glob.glob("csrc/cpu/*.cpp")), build_directory=sys.argv[1],
                extra_cflags=["-O2", "-fopenmp", "-DADAPTWIN_PORTABLE=1"], extra_ldflags=["-fopenmp"])
assert portable.__file__.startswith(sys.argv[1]), portable.__file__
assert backends.has_kernel("adaptwin::attention", "cpu") and backends.has_kernel("adaptwin::rank_linear", "cpu")
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "tests/test_kernels_cpu.py"]))
"""


def test_portable_kernels_pass_the_cpu_cases(tmp_path):
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on PATH")
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        pytest.skip("torch's JIT build needs ninja (pip install ninja)")
    env = {**os.environ, "ADAPTWIN_NO_EXTENSION": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1800)
    assert_cases_passed(proc)


CAPPED = """
import sys
from adaptwin.ops import backends
features = backends.cpu_features()
assert features == EXPECTED, features
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "tests/test_kernels_cpu.py"]))
"""


NO_PATHS = {"avx2": False, "avx512": False, "avx512_rows": False, "avx512_bf16": False, "neon": False}


@pytest.mark.parametrize("cap,expected", [
    ("portable", NO_PATHS),  # as any CPU without a SIMD path of ours
    ("avx2", {**NO_PATHS, "avx2": True}),  # x86 without AVX-512
    ("avx512", {**NO_PATHS, "avx2": True, "avx512": True, "avx512_rows": True}),  # no AVX512-BF16
])
def test_capped_dispatch_passes_the_cpu_cases(cap, expected):
    from adaptwin.ops import backends

    native = backends.cpu_features()
    if not backends.load()["cpp"]:
        pytest.skip("adaptwin._C is not built (run `make install`)")
    if any(want and not native[name] for name, want in expected.items()):
        pytest.skip(f"this CPU lacks what the {cap!r} cap keeps: {native}")
    env = {**os.environ, "ADAPTWIN_CPU_CAP": cap, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CAPPED.replace("EXPECTED", repr(expected))], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert_cases_passed(proc)


SDPA_ROUTE = """
import torch
from adaptwin.ops import backends
from adaptwin.ops.attention import attention_reference
assert not backends.cpu_features()["avx512"]
op = torch.ops.adaptwin.attention.default
torch.manual_seed(0)
cases = 0
widths = [(w, w) for w in range(1, 70, 3)] + [(20, 13), (39, 52), (64, 64)]
shapes = [(1, 2, 2, 256, 256), (2, 4, 2, 3, 40), (1, 2, 1, 1, 300), (1, 1, 1, 5, 0)]  # B, H, Hkv, T, S
for dq, dv in widths:
    for b, h, hkv, t, s in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            q, k = torch.randn(b, h, t, dq, dtype=dtype), torch.randn(b, hkv, s, dq, dtype=dtype)
            v = torch.randn(b, hkv, s, dv, dtype=dtype)
            pad = torch.ones(b, 1, 1, s, dtype=torch.bool)
            pad[0, ..., s // 2:] = False
            additive = torch.randn(b, 1, t, s, dtype=torch.float16)  # a third dtype
            for mask, causal in [(None, False), (None, True), (pad, False), (pad, True), (additive, True)]:
                want = attention_reference(q, k, v, mask, 0.3, causal)
                got = op(q, k, v, mask, 0.3, causal)
                assert got.shape == want.shape and torch.equal(got, want), (dq, dv, b, h, hkv, t, s, dtype, causal)
                cases += 1
print("cases", cases)
"""


def test_without_avx512_the_kernel_is_the_reference_sdpa():
    # Without AVX-512 the C++ kernel hands every call to ATen's SDPA (csrc/cpu/attention.cpp: attention_sdpa),
    # padded as the reference pads (its sdpa_width is _cpu_width): the same bits as the reference, for
    # every width around the padding rule's cases, both sides of its T·S threshold, masks, GQA, no keys.
    from adaptwin.ops import backends

    if not backends.load()["cpp"]:
        pytest.skip("adaptwin._C is not built (run `make install`)")
    env = {**os.environ, "ADAPTWIN_CPU_CAP": "portable", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", SDPA_ROUTE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "cases 1040" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_an_unknown_cap_is_refused():
    env = {**os.environ, "ADAPTWIN_CPU_CAP": "sse4", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", "import adaptwin.ops"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert ("ADAPTWIN_CPU_CAP must be one of ('native', 'avx512', 'avx2', 'portable'), got 'sse4'"
            in proc.stderr), proc.stderr


@pytest.mark.slow
def test_an_emulated_avx2_cpu_runs_the_cpu_cases():
    """About 70 s: `qemu-x86_64 -cpu Haswell` runs Python, torch and adaptwin._C as an AVX2-only CPU would."""
    qemu = shutil.which("qemu-x86_64")
    if qemu is None or os.uname().machine != "x86_64":
        pytest.skip("needs qemu-user (apt-get install qemu-user) on an x86-64 host")
    from adaptwin.ops import backends

    if not backends.load()["cpp"]:
        pytest.skip("adaptwin._C is not built (run `make install`)")
    cmd = [qemu, "-cpu", "Haswell", sys.executable]
    probe = subprocess.run([*cmd, "-c", "import torch, adaptwin.ops.backends as b; "
                            "print(torch.backends.cpu.get_cpu_capability(), b.cpu_features())"],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    want = "AVX2 {'avx2': True, 'avx512': False, 'avx512_rows': False, 'avx512_bf16': False, 'neon': False}"
    assert probe.stdout.startswith(want), probe.stdout + probe.stderr[-2000:]
    proc = subprocess.run([*cmd, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels_cpu.py",
                           "tests/test_fast_calls.py"], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert_cases_passed(proc)


@pytest.mark.parametrize("asked,serving", [(None, "triton"), ("triton", "triton"), ("reference", "reference"),
                                           ("cpp", "triton")])
def test_the_cuda_backend_choice(asked, serving):
    """Which implementation would serve CUDA tensors (decided at import, no GPU needed): Triton by default, the
    reference when asked, and Triton again when the CUDA C++ kernels are asked for but not built (a CPU torch
    builds none); an unknown value is refused, naming the allowed ones."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "ADAPTWIN_CUDA_BACKEND"}
    env.update({"PYTHONPATH": str(ROOT)}, **({"ADAPTWIN_CUDA_BACKEND": asked} if asked else {}))
    code = "from adaptwin.ops import backends; s = backends.load(); print(backends.cuda_serving(), s['cuda_cpp'])"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [serving, "False"], proc.stdout


def test_an_unknown_cuda_backend_is_refused():
    env = {**os.environ, "ADAPTWIN_CUDA_BACKEND": "cudnn", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", "import adaptwin.ops"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert "ADAPTWIN_CUDA_BACKEND must be one of ('triton', 'cpp', 'reference'), got 'cudnn'" in proc.stderr
