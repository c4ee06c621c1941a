"""Triton flash attention for ``torch.ops.adaptwin.attention`` (schema: `adaptwin.ops.attention`).

One program = one block of BLOCK_M queries of one (batch, head). Key tiles of BLOCK_N are visited with an
online softmax, so no T×S matrix is written. Head widths are arbitrary (20, 26, 52, ...): the tiles are
padded to the next power of two (>= 16, tl.dot's minimum) and the padding lanes are masked on load, so
they add zeros. Operands are cast to float32 before tl.dot: the interpreter's bf16 dot is wrong, and
float32 accumulation is what the reference does too. Pointer arithmetic (no block pointers) and one
fixed configuration, both for the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr,
    sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, smb, smh, smt, sms,
    H, T, S, DQ, DV, groups, scale,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQ: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // groups
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    dq = tl.arange(0, BLOCK_DQ)
    dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < T
    q = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sqt + dq[None, :],
                mask=row_ok[:, None] & (dq[None, :] < DQ), other=0.0).to(tl.float32) * scale  # (BM, BDQ)
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
                    mask=col_ok[:, None] & (dq[None, :] < DQ), other=0.0).to(tl.float32)  # (BN, BDQ)
        s = tl.dot(q, tl.trans(k))  # (BM, BN)
        s = tl.where(col_ok[None, :], s, float("-inf"))
        if HAS_MASK:
            m_off = b * smb + h * smh + rows[:, None] * smt + cols[None, :] * sms
            ok = row_ok[:, None] & col_ok[None, :]
            if MASK_BOOL:
                keep = tl.load(mask_ptr + m_off, mask=ok, other=0)
                s = tl.where(keep != 0, s, float("-inf"))
            else:
                s = s + tl.load(mask_ptr + m_off, mask=ok, other=0.0).to(tl.float32)
        if CAUSAL:
            s = tl.where(cols[None, :] <= rows[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with only masked keys so far: exp -> 0
        p = tl.exp(s - m_use[:, None])
        alpha = tl.exp(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + b * svb + hk * svh + cols[:, None] * svs + dv[None, :],
                    mask=col_ok[:, None] & (dv[None, :] < DV), other=0.0).to(tl.float32)  # (BN, BDV)
        acc = acc * alpha[:, None] + tl.dot(p, v)
        m_i = m_new
    inv = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)  # fully masked rows give 0, as the reference
    out = acc * inv[:, None]
    o_off = ((b * T + rows[:, None]) * H + h) * DV + dv[None, :]  # (B, T, H, Dv) contiguous
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < DV))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
              is_causal: bool) -> torch.Tensor:
    """Launcher with the op's signature: q (B, H, T, Dq), k (B, Hkv, S, Dq), v (B, Hkv, S, Dv) -> (B, T, H, Dv)."""
    from adaptwin.ops.attention import _check_attention

    _check_attention(q, k, v, mask)
    B, H, T, DQ = q.shape
    Hkv, S, DV = k.shape[1], k.shape[2], v.shape[3]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty((B, T, H, DV), dtype=q.dtype, device=q.device)
    if T == 0 or B * H == 0:
        return out
    if S == 0:
        return out.zero_()
    if mask is not None:
        mask = mask.expand(B, H, T, S)
        mask_arg, mstr = mask, mask.stride()
    else:
        mask_arg, mstr = q, (0, 0, 0, 0)
    block_m, block_n = 32, 32
    grid = (triton.cdiv(T, block_m), B * H)
    _attention_kernel[grid](
        q, k, v, mask_arg, out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *mstr,
        H, T, S, DQ, DV, H // Hkv, float(scale),
        HAS_MASK=mask is not None, MASK_BOOL=mask is not None and mask.dtype == torch.bool, CAUSAL=bool(is_causal),
        BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_DQ=max(16, triton.next_power_of_2(DQ)), BLOCK_DV=max(16, triton.next_power_of_2(DV)),
    )
    return out
