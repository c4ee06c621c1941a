"""Scratch: the row sums as P·1 (SUM_DOT) and 128 x 128 tiles, against the default tiles, B x H x 1500."""
import sys
sys.path.insert(0, ".")
from functools import partial
import torch
import torch.nn.functional as F
from benchmarks import gpu_common as gc
from benchmarks.gpu_common import rel_err
from adaptwin.kernels.attention import attention, default_config
from adaptwin.ops.attention import attention_reference

torch.manual_seed(0)
dev = torch.device("cuda")
for dname, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
    for b, h in ((16, 20), (1, 20), (1, 6)):
        dense = [torch.randn(b, h, 1500, 64, device=dev, dtype=dtype) for _ in range(3)]
        sdpa = gc.bench(partial(F.scaled_dot_product_attention, *dense), graph=True)
        print(f"B{b} H{h} {dname} sdpa_w64 {sdpa:.1f} us", flush=True)
        for w in (16, 24, 32, 40, 48):
            if dname == "bf16" and b != 16:
                continue
            q, k, v = (torch.randn(b, h, 1500, w, device=dev, dtype=dtype) for _ in range(3))
            ref = attention_reference(q.double(), k.double(), v.double(), None, 0.125, False)
            base = default_config(q)
            cfgs = {"default": base, "no_sum_dot": {**base, "SUM_DOT": False},
                    "m128n128w8s3_sum": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "SUM_DOT": True},
                    "m128n128w8s3": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
                    "m128n64w8s3_sum": {**base, "num_warps": 8}}
            line = []
            for name, cfg in cfgs.items():
                if b != 16 and name.startswith("m128n"):
                    continue
                try:
                    err = rel_err(attention(q, k, v, None, 0.125, False, config=cfg), ref)
                    us = gc.bench(partial(attention, q, k, v, None, 0.125, False, config=cfg), graph=True)
                    line.append(f"{name} {us:.1f} ({sdpa / us:.2f}x, err {err:.1e})")
                except Exception as exc:
                    line.append(f"{name} failed {type(exc).__name__}")
            print(f"  w{w}: " + "; ".join(line), flush=True)
