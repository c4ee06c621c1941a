"""Causal 16-bit attention calls on the kernel itself, at two pipeline depths, against float64 and SDPA.

Causal calls with a value width in two dot parts (39 or 48 as 32 + 16) came out wrong on an H100
(triton 3.6): relative errors 0.25-0.73 at widths whose rows are not 16-byte aligned, and at one pipeline
stage for aligned ones, with compute-sanitizer reporting an out-of-bounds shared-memory read in the second
P·V dot (attention.py:103) and, once, an illegal memory access. Causal tensor-core calls now take V's
width as one part (`launches`); this runs the kinds that failed, and variants that change one trait at a
time (grouped heads, a two-part or unaligned width, a whole number of tiles), at the default tiles with the
default pipeline depth and with one stage, and prints each call's relative error against float64 beside
SDPA's own. A row whose kernel error is within twice SDPA's passes the test suite's criterion (all 40 did
on the H100 on 2026-11-25, against 18 of 40 with V in two parts). On a GPU each row runs in its own
process, so a call that faults is reported ("fault") instead of ending the run.

    python3 -m benchmarks.gpu_causal_probe [--out probe.csv] [--sanitize]   # a CUDA GPU; gpu_session.sh runs it

``--sanitize``: then compute-sanitizer (memcheck) on the first row that faults or misses, its report's head
printed. A measurement, not a test: it reports and exits 0 (skipping where no CUDA device is visible).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

from benchmarks.common import format_table, write_rows
from benchmarks.gpu_common import rel_err

# (B, H, Hkv, T, S, Dq, Dv): the call that failed, each of its two routed traits alone (grouped heads; a
# two-part value width), then one trait at a time: widths whose rows are not 16-byte aligned (52, 39), an
# aligned two-part width, T a whole number of 64-row tiles
CASES = [(1, 2, 1, 123, 123, 52, 39), (1, 2, 2, 123, 123, 52, 39), (1, 2, 2, 123, 123, 48, 48),
         (1, 8, 2, 123, 123, 64, 64), (1, 2, 1, 1500, 1500, 40, 40), (1, 2, 2, 123, 123, 64, 39),
         (1, 2, 2, 123, 123, 52, 64), (1, 2, 2, 123, 123, 56, 56), (1, 2, 2, 128, 128, 52, 39),
         (1, 2, 2, 128, 128, 48, 48)]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
FIELDS = ("case", "dtype", "stages", "kernel_err", "sdpa_err", "within_2x")


def kernel_only(q, k, v, scale: float, stages: int | None) -> torch.Tensor:
    """The Triton attention kernel's causal launches as planned (``stages``: that pipeline depth instead)."""
    from adaptwin.kernels import attention as ka

    out = torch.empty((q.shape[0], q.shape[2], q.shape[1], v.shape[3]), dtype=q.dtype, device=q.device)
    config = None if stages is None else {**ka.default_config(q, False, True, v.shape[-1]), "num_stages": stages}
    for kernel, grid, args, kwargs in ka.launches(q, k, v, None, out, scale, True, config):
        kernel[grid](*args, **kwargs)
    return out


def _jobs(cases: list[tuple]) -> list[tuple]:
    """Every (case, dtype, stages) a probe runs: each dtype at the default depth (None) and at one stage."""
    return [(case, name, stages) for case in cases for name in DTYPES for stages in (None, 1)]


def _label(case: tuple, dtype: str, stages: int | None) -> dict:
    """A row's identifying fields."""
    return {"case": "B{}H{}kv{}T{}S{}q{}v{}".format(*case), "dtype": dtype,
            "stages": "default" if stages is None else stages}


def probe_one(case: tuple, dtype: str, stages: int | None, device: str = "cuda") -> dict:
    """One row: ``case`` (B, H, Hkv, T, S, Dq, Dv) in ``dtype`` at pipeline depth ``stages`` (None: default)."""
    from adaptwin.ops.attention import attention_reference

    b, h, hkv, t, s, dq, dv = case
    gen = torch.Generator().manual_seed(sum(case))
    shapes = ((h, t, dq), (hkv, s, dq), (hkv, s, dv))
    q, k, v = (torch.randn(b, n, m, d, generator=gen).to(device) for n, m, d in shapes)
    scale = dq ** -0.5
    ref64 = attention_reference(q.double(), k.double(), v.double(), None, scale, True)
    lo = [x.to(DTYPES[dtype]) for x in (q, k, v)]
    sdpa = rel_err(attention_reference(*lo, None, scale, True), ref64)
    err = rel_err(kernel_only(*lo, scale, stages), ref64)
    return {**_label(case, dtype, stages), "kernel_err": err, "sdpa_err": sdpa, "within_2x": err <= 2 * sdpa}


def probe(cases: list[tuple] = CASES, device: str = "cuda") -> list[dict]:
    """One row per (case, dtype, stages), in this process (``device`` "cpu": under TRITON_INTERPRET=1)."""
    return [probe_one(*job, device) for job in _jobs(cases)]


def _child(case: tuple, dtype: str, stages: int | None, wrap: list[str] | None = None, timeout: int = 300
           ) -> tuple[dict, str]:
    """`probe_one` in a child process (a fault kills only it): (row, the child's output)."""
    cmd = [*(wrap or []), sys.executable, "-m", "benchmarks.gpu_causal_probe", "--one",
           json.dumps([list(case), dtype, stages])]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        text = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        return {}, f"timed out after {timeout} s: {e}"
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line), text
    return {}, text


def probe_isolated(cases: list[tuple] = CASES, workers: int = 8) -> tuple[list[dict], list[tuple]]:
    """Every row of `probe`, each in its own process: (rows, the (case, dtype, stages) that faulted or missed)."""
    jobs = _jobs(cases)
    rows, bad = [], []
    with ThreadPoolExecutor(workers) as pool:
        for job, (row, text) in zip(jobs, pool.map(lambda j: _child(*j), jobs)):
            if not row:
                last = [ln for ln in text.splitlines() if "Error" in ln or "error" in ln][-1:] or text.splitlines()[-1:]
                row = {**_label(*job), "kernel_err": "fault: " + " ".join(last)[:90], "sdpa_err": "",
                       "within_2x": False}
            if not row["within_2x"]:
                bad.append(job)
            rows.append(row)
    return rows, bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="also write the rows to this CSV")
    ap.add_argument("--sanitize", action="store_true", help="then compute-sanitizer on the first failing row")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child: one JSON [case, dtype, stages]
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():  # skipped, not failed: `make bench` runs every script on CPU machines too
        print("benchmarks.gpu_causal_probe: skipped, it needs a CUDA device and none is visible here", file=sys.stderr)
        return 0
    if args.one is not None:
        case, dtype, stages = json.loads(args.one)
        row = probe_one(tuple(case), dtype, stages)
        torch.cuda.synchronize()
        print(json.dumps(row))
        return 0
    rows, bad = probe_isolated()
    print(format_table(FIELDS, [[r[f] for f in FIELDS] for r in rows]), flush=True)
    if args.out:
        write_rows(args.out, rows, fields=FIELDS, key=("case", "dtype", "stages"))
    if args.sanitize and bad and shutil.which("compute-sanitizer"):
        case, dtype, stages = bad[0]
        print(f"\ncompute-sanitizer --tool memcheck on {case} {dtype} stages {stages}:")
        _, text = _child(case, dtype, stages, ["compute-sanitizer", "--tool", "memcheck", "--print-limit", "8"], 400)
        lines = [ln for ln in text.splitlines() if ln.startswith("=========")]
        print("\n".join(lines[:60]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
