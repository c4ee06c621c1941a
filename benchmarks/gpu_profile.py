"""The kernels' calls to profile with Nsight Compute on a lent GPU, and a summary of what ncu measured.

    ncu --csv --page details --set detailed -k regex:'_gemv|_fused|_dequant|_attention|_sum_rows' \
        python3 -m benchmarks.gpu_profile [--calls gemv,batched,attention] > ncu.csv
    python3 -m benchmarks.gpu_profile --summarize ncu.csv

(`benchmarks/gpu_session.sh` does both with PROFILE=1.) Each call runs twice (the first compiles), at the
sizes the figures in `benchmarks.gpu_kernels` left open:
- gemv: the batch-1 NF4 rank-r linear at d = 4096, r = 1024 (fp16), as planned (code values gathered),
  with the select tree instead, with x·Aᵀ split further, and in one launch (``gemv="one_launch"``);
- batched: NF4 rows M1500 384 -> 1536 r64 and M256 4096² r64, decoded once (the default) and in the tiles;
- attention: T = 1500, batch 16, 20 heads, widths 16, 24, 32 and 48, and 48 padded to one dot
  (``ONE_PART``): width 24 (one 32-wide part, padded) ran 1.3x slower than 32 itself on the H100.

The summary prints, per kernel launch, the metrics that tell what bounds it: duration, DRAM and memory
throughput, SM throughput, achieved occupancy, registers. ``--small`` shrinks every call (for a check on
CPU under TRITON_INTERPRET=1, where there is no ncu).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from functools import partial

import torch

from benchmarks.common import pick
from benchmarks.gpu_common import nf4_factor

CALLS = ("gemv", "batched", "attention")
METRICS = ("Duration", "DRAM Throughput", "Memory Throughput", "Compute (SM) Throughput", "Achieved Occupancy",
           "Registers Per Thread", "Executed Ipc Active", "L1/TEX Cache Throughput", "Dynamic Shared Memory Per Block")


def run_calls(calls: list[str], device: torch.device, small: bool = False) -> list[str]:
    """Run every chosen call twice; returns their labels, in order."""
    from adaptwin.kernels.attention import attention, default_config
    from adaptwin.kernels.rank_linear import rank_linear

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    done = []

    def twice(label: str, fn) -> None:
        for _ in range(2):
            fn()
        done.append(label)

    if "gemv" in calls:
        d, r = (128, 32) if small else (4096, 1024)
        args = (*nf4_factor(r, d, device), *nf4_factor(r, d, device), None)
        x = torch.randn(1, d, device=device, dtype=dtype)
        for label, config in (("planned", {}), ("select tree", {"rows": {"GATHER": False}, "cols": {"GATHER": False}}),
                              ("split32", {"rows": {"WAVES": 16, "MAX_SPLITS": 32}}),
                              ("one launch", {"gemv": "one_launch"})):
            twice(f"gemv d{d} {label}", partial(rank_linear, x, *args, config=config))
    if "batched" in calls:
        shapes = ((40, 64, 16, 96),) if small else ((1500, 384, 64, 1536), (256, 4096, 64, 4096))
        for m, d_in, r, d_out in shapes:
            args = (*nf4_factor(r, d_in, device), *nf4_factor(r, d_out, device), None)
            x = torch.randn(m, d_in, device=device, dtype=dtype)
            for decode in ("once", "tiles"):
                twice(f"batched M{m} {d_in}x{d_out} r{r} {decode}",
                      partial(rank_linear, x, *args, config={"decode": decode}))
    if "attention" in calls:
        batch, heads, tokens = (1, 2, 40) if small else (16, 20, 1500)
        for width, one in ((16, False), (24, False), (32, False), (48, False), (48, True)):
            q, k, v = (torch.randn(batch, heads, tokens, width, device=device, dtype=dtype) for _ in range(3))
            config = {**default_config(q), "ONE_PART": True} if one else None
            twice(f"attention w{width}{' one part' if one else ''}",
                  partial(attention, q, k, v, None, 0.125, False, config=config))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return done


def summarize(path: str) -> list[list[str]]:
    """[[launch id, kernel, metric values...]] from ncu's ``--csv --page details`` output (the rows of
    the METRICS it has; other lines, such as the profiled program's own output, are skipped)."""
    with open(path, newline="") as f:
        lines = [line for line in f if line.startswith('"')]  # ncu's CSV lines are fully quoted
    reader = csv.DictReader(lines)
    need = {"ID", "Kernel Name", "Metric Name", "Metric Value"}
    if reader.fieldnames is None or not need <= set(reader.fieldnames):
        raise ValueError(f"{path}: not ncu --csv --page details output (columns {reader.fieldnames}; need "
                         f"{sorted(need)})")
    by_launch: dict[str, dict[str, str]] = defaultdict(dict)
    for row in reader:
        if row["Metric Name"] in METRICS:
            unit = row.get("Metric Unit") or ""
            by_launch[row["ID"], row["Kernel Name"]][row["Metric Name"]] = f"{row['Metric Value']} {unit}".strip()
    return [[launch, kernel.split("(")[0], *(m.get(name, "-") for name in METRICS)]
            for (launch, kernel), m in by_launch.items()]


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import format_table

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", default=",".join(CALLS), help=f"comma-separated, of {list(CALLS)}")
    ap.add_argument("--small", action="store_true", help="tiny sizes (a check under TRITON_INTERPRET=1)")
    ap.add_argument("--summarize", metavar="CSV", help="print the key metrics of an ncu CSV instead")
    args = ap.parse_args(argv)
    if args.summarize:
        try:
            table = summarize(args.summarize)
        except (OSError, ValueError) as exc:
            ap.error(str(exc))
        print(format_table(["launch", "kernel", *METRICS], table))
        return 0
    calls = pick(ap, args.calls, CALLS, "calls")
    from adaptwin.kernels import interpreting

    if not torch.cuda.is_available() and not interpreting():  # `make bench` goes on, as with gpu_kernels
        print("gpu_profile: no CUDA device here, nothing to profile (run it on a GPU under ncu, or on CPU with "
              "TRITON_INTERPRET=1 --small)")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for label in run_calls(calls, device, args.small):
        print(f"ran {label}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
