"""Which pipeline depth gets the causal 16-bit attention calls that `unverified_causal` routes to SDPA right.

On an H100 (triton 3.6) one such call (B 1, H 2, Hkv 1, T = S = 123, Dq 52, Dv 39) came out wrong (relative
error 0.73) while the interpreter, at the GPU's own tiles and fp16 dots, gets it right
(tests/test_kernels_triton.py, ``routed_causal_logic``). The one compute-sanitizer sighting was an
out-of-bounds shared-memory read in the P·V dot of a key loop whose trip count varies per program, as a
causal row block's does, so this runs those calls on the kernel itself (no routing) at the default tiles with
the default pipeline depth and with one stage, and prints each call's relative error against float64 beside
SDPA's own. A row whose kernel error is within twice SDPA's passes the test suite's criterion.

    python3 -m benchmarks.gpu_causal_probe [--out probe.csv]      # a CUDA GPU; gpu_session.sh runs it

A measurement, not a test: it reports and exits 0 (skipping where no CUDA device is visible).
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.common import format_table, write_rows
from benchmarks.gpu_common import rel_err

# (B, H, Hkv, T, S, Dq, Dv): the call that failed, then each of its two routed traits alone
CASES = [(1, 2, 1, 123, 123, 52, 39), (1, 2, 2, 123, 123, 52, 39), (1, 2, 2, 123, 123, 48, 48),
         (1, 8, 2, 123, 123, 64, 64), (1, 2, 1, 1500, 1500, 40, 40)]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
FIELDS = ("case", "dtype", "stages", "kernel_err", "sdpa_err", "within_2x")


def kernel_only(q, k, v, scale: float, stages: int | None) -> torch.Tensor:
    """The Triton attention kernel's causal launches as planned (``stages``: that pipeline depth instead)."""
    from adaptwin.kernels import attention as ka

    out = torch.empty((q.shape[0], q.shape[2], q.shape[1], v.shape[3]), dtype=q.dtype, device=q.device)
    config = None if stages is None else {**ka.default_config(q, False), "num_stages": stages}
    for kernel, grid, args, kwargs in ka.launches(q, k, v, None, out, scale, True, config):
        kernel[grid](*args, **kwargs)
    return out


def probe(cases: list[tuple] = CASES, device: str = "cuda") -> list[dict]:
    """One row per (case, dtype, stages); ``device`` "cpu" only for a check under TRITON_INTERPRET=1."""
    from adaptwin.ops.attention import attention_reference

    rows = []
    for case in cases:
        b, h, hkv, t, s, dq, dv = case
        gen = torch.Generator().manual_seed(sum(case))
        q, k, v = (torch.randn(b, n, m, d, generator=gen).to(device)
                   for n, m, d in ((h, t, dq), (hkv, s, dq), (hkv, s, dv)))
        scale = dq ** -0.5
        ref64 = attention_reference(q.double(), k.double(), v.double(), None, scale, True)
        for name, dt in DTYPES.items():
            lo = [x.to(dt) for x in (q, k, v)]
            sdpa = rel_err(attention_reference(*lo, None, scale, True), ref64)
            for stages in (None, 1):
                err = rel_err(kernel_only(*lo, scale, stages), ref64)
                rows.append({"case": "B{}H{}kv{}T{}S{}q{}v{}".format(*case), "dtype": name,
                             "stages": "default" if stages is None else stages, "kernel_err": err,
                             "sdpa_err": sdpa, "within_2x": err <= 2 * sdpa})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="also write the rows to this CSV")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():  # skipped, not failed: `make bench` runs every script on CPU machines too
        print("benchmarks.gpu_causal_probe: skipped, it needs a CUDA device and none is visible here", file=sys.stderr)
        return 0
    rows = probe()
    print(format_table(FIELDS, [[r[f] for f in FIELDS] for r in rows]))
    if args.out:
        write_rows(args.out, rows, fields=FIELDS, key=("case", "dtype", "stages"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
