"""Instructions per batch-1 rank-r linear call on AArch64, counted under qemu: the NEON paths against the scalar
loops they replace and a dense float32 GEMV. No ARM CPU is at hand, so this counts instead of timing.

    python -m benchmarks.simd_instructions [--sizes 384,768,1536] [--out results/simd_instructions.csv]

Needs qemu-aarch64 and a compiler for AArch64 (on x86: ``apt-get install g++-aarch64-linux-gnu qemu-user``).
``tests/simd_decode.cpp`` is built for AArch64 (``-O3``, as setup.py builds the extension) and run under
``qemu-aarch64 -singlestep -d exec``, which logs one line per instruction executed. A provider's count per call
is (its count for 3 calls - its count for 1) / 2: the process's start, the factors' making and the
first-call effects drop out. For width d the rank k is d / 4 (rank_linear_speed's: half the parameters),
y = (x·Aᵀ)·B with A and B (k, d); NF4 with blocksize 64, int8 with one scale per row. Providers:

* ``dense_neon``: y = W·x, W (d, d) float32, each row by the NEON dot (what a BLAS GEMV executes, about);
* ``{nf4,int8}_scalar``: the portable loops (a 512-element chunk decoded, then dot / axpy; compiled with
  -O3, so GCC vectorises some of them): what ARM ran before the NEON paths;
* ``{nf4,int8}_neon_buffered``: NEON decoding into the chunk, NEON dot / axpy: 2-8 rows of x take it;
* ``{nf4,int8}_neon_register``: the register-decode kernels of rank_linear_neon.h: one row of x takes it.

An instruction count is not a time: a NEON table lookup and an FMA differ in cost, and a dense GEMV over a
large W waits on memory, where the packed factors (``weight_bytes``) are 7-15 % of W's bytes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from benchmarks.common import format_table, now_utc, write_rows

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("benchmark", "d", "rank", "provider", "instructions_per_call", "instructions_per_weight",
          "weight_bytes", "vs_dense", "date")
KEY = ("benchmark", "d", "provider")
# provider: (the harness's path, kind, format)
PROVIDERS = {
    "dense_neon": ("neon", "dense", "nf4"),
    "nf4_scalar": ("scalar", "buffered", "nf4"),
    "nf4_neon_buffered": ("neon", "buffered", "nf4"),
    "nf4_neon_register": ("neon", "register", "nf4"),
    "int8_scalar": ("scalar", "buffered", "int8"),
    "int8_neon_register": ("neon", "register", "int8"),
}


def compiler() -> str:
    for name in ("aarch64-linux-gnu-g++", *(("g++", "c++") if os.uname().machine == "aarch64" else ())):
        if shutil.which(name):
            return name
    raise SystemExit("needs a compiler for AArch64: apt-get install g++-aarch64-linux-gnu")


def count(exe: Path, path: str, kind: str, fmt: str, d: int, k: int, calls: int) -> int:
    """Instructions the harness executes for `calls` calls, start to exit."""
    qemu = subprocess.Popen(["qemu-aarch64", "-singlestep", "-d", "exec,nochain", "-D", "/dev/stdout", str(exe),
                             "run", path, kind, fmt, str(d), str(k), str(calls)], stdout=subprocess.PIPE)
    lines = subprocess.run(["grep", "-c", "^Trace"], stdin=qemu.stdout, capture_output=True, text=True)
    qemu.stdout.close()
    if qemu.wait() != 0 or lines.returncode != 0:
        raise SystemExit(f"the harness failed under qemu ({path} {kind} {fmt} d={d})")
    return int(lines.stdout)


def weight_bytes(provider: str, d: int, k: int) -> int:
    if provider.startswith("dense"):
        return 4 * d * d
    if provider.startswith("nf4"):
        return 2 * (k * d // 2 + 4 * (k * d // 64))  # codes + one float32 absmax per 64
    return 2 * (k * d + 4 * k)  # int8 codes + one float32 scale per row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="384,768,1536", help="widths d, comma-separated multiples of 64")
    ap.add_argument("--out", default="results/simd_instructions.csv")
    args = ap.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        ap.error(f"--sizes must be comma-separated whole numbers, got {args.sizes!r}")
    if any(d < 64 or d % 64 for d in sizes):
        ap.error(f"--sizes must be multiples of 64 (whole NF4 blocks and 32-column groups), got {sizes}")
    if shutil.which("qemu-aarch64") is None:
        raise SystemExit("needs qemu-aarch64: apt-get install qemu-user")
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "simd_decode"
        subprocess.run([compiler(), "-O3", "-std=c++17", "-static", str(ROOT / "tests" / "simd_decode.cpp"), "-o",
                        str(exe)], check=True)
        rows, table = [], []
        for d in sizes:
            k = d // 4
            per_call = {}
            for provider, (path, kind, fmt) in PROVIDERS.items():
                per_call[provider] = (count(exe, path, kind, fmt, d, k, 3) - count(exe, path, kind, fmt, d, k, 1)) / 2
            for provider, n in per_call.items():
                weights = d * d if provider.startswith("dense") else 2 * k * d
                row = {"benchmark": "simd_instructions", "d": d, "rank": k, "provider": provider,
                       "instructions_per_call": n, "instructions_per_weight": n / weights,
                       "weight_bytes": weight_bytes(provider, d, k), "vs_dense": n / per_call["dense_neon"],
                       "date": now_utc()}
                rows.append(row)
                table.append([d, k, provider, f"{n:,.0f}", f"{n / weights:.3f}", row["weight_bytes"],
                              f"{row['vs_dense']:.2f}"])
    print(format_table(["d", "rank", "provider", "instructions/call", "per weight", "weight bytes", "vs dense"], table))
    print(f"wrote {write_rows(args.out, rows, fields=FIELDS, key=KEY)}")


if __name__ == "__main__":
    main()
