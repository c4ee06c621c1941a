"""Triton flash attention for ``torch.ops.adaptwin.attention`` (schema: `adaptwin.ops.attention`).

One program = one block of BLOCK_M queries of one (batch, head). Key tiles of BLOCK_N are visited with an
online softmax, so no T×S matrix is written. Head widths are arbitrary (20, 26, 52, ...): the tiles are
padded to the next power of two (>= 16, tl.dot's minimum) and the padding lanes are masked on load, so
they add zeros. Scores are kept in log2 units (scale·log2e folded into one multiply, additive masks times
log2e) so the softmax uses exp2, as FlashAttention does.

Operand precision: compiled on a GPU, float16 / bfloat16 inputs go to tl.dot as they are (tensor cores,
float32 accumulation) and P is rounded to V's dtype before P·V, as FlashAttention and SDPA's fused
kernels do. float32 inputs, and every input under TRITON_INTERPRET=1 (the interpreter's bf16 dot is
wrong), are cast to float32 first. Pointer arithmetic (no block pointers) and one fixed configuration per
call, both for the interpreter; `attention` takes an explicit ``config`` for tuning runs
(benchmarks/gpu_kernels.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from adaptwin.kernels import interpreting

LOG2E = 1.4426950408889634


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr,
    sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, smb, smh, smt, sms,
    H, T, S, groups, qk_scale, DQ: tl.constexpr, DV: tl.constexpr, ALIGN: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, CAUSAL: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQ: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    # q / k / v strides arrive divided by ALIGN: multiplying back by the constant lets the compiler prove
    # that rows start on 16-byte boundaries for widths like 20 or 40, so tiles load as vectors
    # (asynchronous copies into shared memory) instead of element by element.
    sqb, sqh, sqt = sqb * ALIGN, sqh * ALIGN, sqt * ALIGN
    skb, skh, sks = skb * ALIGN, skh * ALIGN, sks * ALIGN
    svb, svh, svs = svb * ALIGN, svh * ALIGN, svs * ALIGN
    b = bh // H
    h = bh % H
    hk = h // groups
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    dq = tl.arange(0, BLOCK_DQ)
    dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < T
    q = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sqt + dq[None, :],
                mask=row_ok[:, None] & (dq[None, :] < DQ), other=0.0)  # (BM, BDQ)
    if DOT_F32:
        q = q.to(tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    end = S
    if CAUSAL:
        end = tl.minimum(S, (pid_m + 1) * BLOCK_M)
    for start in range(0, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)  # (BN,)
        col_ok = cols < S
        k = tl.load(k_ptr + b * skb + hk * skh + cols[:, None] * sks + dq[None, :],
                    mask=col_ok[:, None] & (dq[None, :] < DQ), other=0.0)  # (BN, BDQ)
        if DOT_F32:  # true float32 products ("ieee"): a float32 dot defaults to tf32 on GPUs
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee") * qk_scale  # (BM, BN), log2 units
        else:
            s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        if HAS_MASK:
            m_off = b * smb + h * smh + rows[:, None] * smt + cols[None, :] * sms
            ok = row_ok[:, None] & col_ok[None, :]
            if MASK_BOOL:
                keep = tl.load(mask_ptr + m_off, mask=ok, other=0)
                s = tl.where(keep != 0, s, float("-inf"))
            else:
                s = s + tl.load(mask_ptr + m_off, mask=ok, other=0.0).to(tl.float32) * 1.4426950408889634
        if CAUSAL:
            s = tl.where(cols[None, :] <= rows[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with only masked keys so far: exp2 -> 0
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + b * svb + hk * svh + cols[:, None] * svs + dv[None, :],
                    mask=col_ok[:, None] & (dv[None, :] < DV), other=0.0)  # (BN, BDV)
        if DOT_F32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    inv = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)  # fully masked rows give 0, as the reference
    out = acc * inv[:, None]
    o_off = ((b * T + rows[:, None]) * H + h) * DV + dv[None, :]  # (B, T, H, Dv) contiguous
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < DV))


def default_config(q: torch.Tensor, masked: bool = False) -> dict[str, int]:
    """Block sizes for a call: small fixed tiles under the interpreter, GPU tiles otherwise.

    The GPU tiles are the largest that compile for sm_90 without register spills (checked for every
    dtype, mask kind and widths 9-64 by tests/test_kernels_sm90.py): exact float32 dots run on the FMA
    units and hold more registers, and a mask tile is one more (BLOCK_M, BLOCK_N) tensor to keep."""
    if interpreting():
        return {"BLOCK_M": 32, "BLOCK_N": 32}
    if q.dtype == torch.float32:
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_M": 64, "BLOCK_N": 32 if masked else 64, "num_warps": 4, "num_stages": 2}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
              is_causal: bool, config: dict[str, int] | None = None, dot_f32: bool | None = None) -> torch.Tensor:
    """Launcher with the op's signature: q (B, H, T, Dq), k (B, Hkv, S, Dq), v (B, Hkv, S, Dv) -> (B, T, H, Dv).

    ``config``: BLOCK_M, BLOCK_N (powers of two >= 16) and optionally num_warps / num_stages, for tuning
    runs; `default_config` otherwise. ``dot_f32``: force (True) or forbid (False) the float32 cast of
    16-bit operands; by default they are cast only for float32 inputs and under the interpreter."""
    from adaptwin.ops.attention import _check_attention

    _check_attention(q, k, v, mask)
    B, H, T, _ = q.shape
    S, DV = k.shape[2], v.shape[3]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty((B, T, H, DV), dtype=q.dtype, device=q.device)
    if T == 0 or B * H == 0:
        return out
    if S == 0:
        return out.zero_()
    grid, args, kwargs = launch(q, k, v, mask, out, scale, is_causal, config, dot_f32)
    _attention_kernel[grid](*args, **kwargs)
    return out


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, out: torch.Tensor,
           scale: float, is_causal: bool, config: dict[str, int] | None = None, dot_f32: bool | None = None
           ) -> tuple[tuple[int, int], tuple, dict]:
    """(grid, positional arguments, keyword arguments) of `_attention_kernel` for checked, non-empty inputs.

    Separate from the launch so the exact specialisation a call would compile can also be compiled ahead
    of time for a GPU that is not here (tests/test_kernels_sm90.py)."""
    B, H, T, DQ = q.shape
    Hkv, S, DV = k.shape[1], k.shape[2], v.shape[3]
    if mask is not None:
        mask = mask.expand(B, H, T, S)
        mask_arg, mstr = mask, mask.stride()
    else:
        mask_arg, mstr = q, (0, 0, 0, 0)
    config = dict(default_config(q, mask is not None) if config is None else config)
    block_m = config.pop("BLOCK_M")
    grid = (triton.cdiv(T, block_m), B * H)
    if dot_f32 is None:
        dot_f32 = q.dtype == torch.float32 or interpreting()
    strides = [t.stride(i) for t in (q, k, v) for i in range(3)]
    align = 16 // q.element_size()  # elements per 16 bytes, down to the largest power of two all strides share
    while align > 1 and any(st % align for st in strides):
        align //= 2
    args = (q, k, v, mask_arg, out, *(st // align for st in strides), *mstr, H, T, S, H // Hkv,
            float(scale) * LOG2E)
    kwargs = dict(HAS_MASK=mask is not None, MASK_BOOL=mask is not None and mask.dtype == torch.bool,
                  CAUSAL=bool(is_causal), DOT_F32=dot_f32, BLOCK_M=block_m, DQ=DQ, DV=DV, ALIGN=align,
                  BLOCK_DQ=max(16, triton.next_power_of_2(DQ)), BLOCK_DV=max(16, triton.next_power_of_2(DV)),
                  **config)
    return grid, args, kwargs
