"""The ops through the dispatcher on a CUDA GPU, for whichever CUDA backend serves them: run it twice to put
the Triton kernels and the CUDA C++ ones side by side.

    python3 -m benchmarks.gpu_backends                                # Triton (the default CUDA backend)
    ADAPTWIN_CUDA_BACKEND=reference python3 -m benchmarks.gpu_backends  # the op's reference (SDPA; dequantise + GEMMs)
    ADAPTWIN_CUDA_BACKEND=cpp python3 -m benchmarks.gpu_backends      # the CUDA C++ kernels (adaptwin._C built
                                                                      # with nvcc: python3 setup.py build_ext --inplace)

Each call is checked against the op's float64 reference first, then timed as CUDA-graph replays (median;
eager CUDA-event timing where a backend's call cannot be captured, marked so). Shapes: the attention
of Whisper large's 20 heads at T = 1500 (a batch of 16) at rank-space widths 16, 32 and 48, a decoding
step (one query against those 1500 keys), a batch-1 NF4 rank-1024 linear at 4096² and 1500 rows through
an NF4 rank-64 384 -> 1536 linear, all fp16. A measurement: it prints a table and exits 0 (skipping where no
CUDA device is visible).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from benchmarks.common import format_table
from benchmarks.gpu_common import bench, nf4_factor, rel_err

ATTENTION = [(16, 20, 1500, 1500, 16), (16, 20, 1500, 1500, 32), (16, 20, 1500, 1500, 48), (16, 20, 1, 1500, 32)]
LINEAR = [(1, 4096, 1024, 4096), (1500, 384, 64, 1536)]  # (rows, in, rank, out), NF4 factors, blocksize 64


def _timed(fn) -> tuple[float, str]:
    try:
        return bench(fn, graph=True), "graph"
    except Exception as exc:  # noqa: BLE001 - a backend whose call cannot be captured: timed eagerly instead
        return bench(fn), f"eager ({type(exc).__name__} under capture)"


def run(device: torch.device) -> list[list]:
    from adaptwin.ops.attention import attention_reference
    from adaptwin.ops.rank_linear import rank_linear_reference

    gen = torch.Generator().manual_seed(0)
    rows = []
    for b, h, t, s, w in ATTENTION:
        q = torch.randn(b, h, t, w, generator=gen).to(device, torch.float16)
        k, v = (torch.randn(b, h, s, w, generator=gen).to(device, torch.float16) for _ in range(2))
        scale = w**-0.5
        small = [x[:1] for x in (q, k, v)]
        err = rel_err(torch.ops.adaptwin.attention(*small, None, scale, False),
                      attention_reference(*(x.double() for x in small), None, scale, False))
        us, how = _timed(lambda q=q, k=k, v=v, sc=scale: torch.ops.adaptwin.attention(q, k, v, None, sc, False))
        rows.append([f"attention B{b} H{h} T{t} S{s} w{w}", f"{us:.1f}", f"{err:.1e}", how])
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    for m, n_in, r, n_out in LINEAR:
        fa, fb = nf4_factor(r, n_in, device, gen), nf4_factor(r, n_out, device, gen)
        x = torch.randn(m, n_in, generator=gen).to(device, torch.float16)
        ref = rank_linear_reference(x.double(), *fa, *fb, None)
        err = rel_err(torch.ops.adaptwin.rank_linear(x, *fa, *fb, None), ref)
        us, how = _timed(lambda x=x, fa=fa, fb=fb: torch.ops.adaptwin.rank_linear(x, *fa, *fb, None))
        rows.append([f"rank_linear NF4 M{m} {n_in}->{n_out} r{r}", f"{us:.1f}", f"{err:.1e}", how])
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.gpu_backends: skipped, it needs a CUDA device and none is visible here", file=sys.stderr)
        return 0
    from adaptwin.ops import backends

    state = backends.load()
    asked = os.environ.get("ADAPTWIN_CUDA_BACKEND", "unset")
    print(f"CUDA backend: {backends.cuda_serving()} (ADAPTWIN_CUDA_BACKEND={asked}; C++ CUDA kernels built: "
          f"{state['cuda_cpp']})", flush=True)
    print(format_table(["call", "us", "rel err vs float64", "timing"], run(torch.device("cuda"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
