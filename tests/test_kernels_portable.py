"""The CPU kernels' portable C++ loops: what runs on ARM (phones, Raspberry Pi, Apple silicon) and on x86
CPUs without AVX-512, none of which this machine has.

The extension picks its AVX-512 loops at run time wherever the CPU has them, so on this machine the
portable loops never run in the other tests. Here `csrc/cpu` is built again with ``-DADAPTWIN_PORTABLE``
(no x86 intrinsics compiled at all, as on a non-x86 CPU), loaded in a child process in place of
``adaptwin._C`` (``ADAPTWIN_NO_EXTENSION=1`` keeps the installed one out; both register the same kernels),
and test_kernels_cpu.py's cases run against it: same criterion, error at most twice the reference's. The
child checks first that the dispatcher's CPU kernels come from the portable build.

Not marked slow although it takes about 35 s (build 30, cases 4): CI's machine has AVX-512 too, so this is
the only place the portable path is checked before a user on another CPU runs it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

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
    tail = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0 and "failed" not in proc.stdout, tail
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed is not None and int(passed.group(1)) >= 100, tail  # every case ran, none skipped wholesale
