"""Does the row pitch of q, k and v decide the Triton attention kernel's speed at widths 24, 40 and 48?

On the H100 (2026-11-25) width 24 (one 32-wide dot part, padded) took 1.3x width 32's time at B16 H20
T1500, with L2 66 % busy against 22 % (ncu), though both load 16-byte `cp.async` chunks. Rows of 24 fp16
are 48 bytes, so every other row starts half-way into a 32-byte sector; rows of 32 are 64 bytes. This times
each width with its rows packed (pitch = width), padded to a 64-byte pitch (the tensor a slice of a wider
one) and as the compressed attention modules hand them over (views of (B, T, H·width) projections: rows
H·width apart, head h starting h·width elements in, so at width 24 every odd head's rows start half-way
into a sector), the same kernel and tiles, plus width 32 and 64 for scale, each after a check against
float64.

    python3 -m benchmarks.gpu_attention_pitch [--batch 16 --heads 20 --tokens 1500]   # a CUDA GPU

A measurement: it prints a table and exits 0 (skipping where no CUDA device is visible).
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.common import format_table
from benchmarks.gpu_common import bench, rel_err

WIDTHS = (24, 32, 40, 48, 64)


def pitched(shape: tuple[int, ...], width: int, pitch: int, device: torch.device, dtype: torch.dtype,
            gen: torch.Generator) -> torch.Tensor:
    """Random (…, width) values whose rows lie ``pitch`` elements apart (a slice of a (…, pitch) tensor)."""
    full = torch.randn(*shape, pitch, generator=gen).to(device, dtype)
    return full[..., :width]


def run(batch: int, heads: int, tokens: int, device: torch.device, dtype: torch.dtype) -> list[list]:
    from adaptwin.kernels.attention import attention

    from adaptwin.ops.attention import attention_reference

    gen = torch.Generator().manual_seed(0)
    rows = []
    for width in WIDTHS:
        pitches = sorted({width, -(-width * 2 // 64) * 32})  # packed, and rounded up to 64 bytes
        base = None
        for pitch in [*pitches, "module"]:
            if pitch == "module":  # (B, T, H, w) projections viewed as (B, H, T, w)
                q, k, v = (torch.randn(batch, tokens, heads, width, generator=gen).to(device, dtype).transpose(1, 2)
                           for _ in range(3))
            else:
                q, k, v = (pitched((batch, heads, tokens), width, pitch, device, dtype, gen) for _ in range(3))
            scale = width ** -0.5
            small = [t[:1, :2] for t in (q, k, v)]
            err = rel_err(attention(*small, None, scale, False),
                          attention_reference(*(t.double() for t in small), None, scale, False))
            us = bench(lambda q=q, k=k, v=v, s=scale: attention(q, k, v, None, s, False), graph=True)
            base = base or us
            rows.append([width, f"{heads * width} (module)" if pitch == "module" else pitch, f"{us:.1f}",
                         f"{base / us:.2f}x", f"{err:.1e}"])
            print(f"  w{width} pitch {pitch}: {us:.1f} us (rel err {err:.1e})", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--heads", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=1500)
    ap.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    args = ap.parse_args(argv)
    if min(args.batch, args.heads, args.tokens) < 1:
        ap.error("--batch, --heads and --tokens must be positive")
    if not torch.cuda.is_available():
        print("benchmarks.gpu_attention_pitch: skipped, it needs a CUDA device and none is visible here",
              file=sys.stderr)
        return 0
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    rows = run(args.batch, args.heads, args.tokens, torch.device("cuda"), dtype)
    print(format_table(["width", "pitch", "us", "vs packed", "rel err"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
