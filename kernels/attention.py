"""Triton flash attention for ``torch.ops.adaptwin.attention`` (schema: `adaptwin.ops.attention`).

One program = one block of BLOCK_M queries of one (batch, head). Key tiles of BLOCK_N are visited with an
online softmax, so no T×S matrix is written. Head widths are arbitrary (20, 26, 40, 52, ...) and constant
per call site (compile-time constants): a width is covered by one power-of-two part (>= 16, tl.dot's
minimum) or, where that pads more (33-48, 65-96), by two (40 = 32 + 16), so the dots do not run over
padding to 64; the padding lanes are masked on load and add zeros. Strides carry a 16-byte alignment
hint, so such widths still load as vectors, asynchronously into shared memory. Scores are kept in log2
units (scale·log2e, additive masks times log2e) so the softmax uses exp2, as FlashAttention does;
without a mask the scale and the running maximum enter exp2 as one fused multiply-add, and only the
last, partial key tile masks its columns.

``DEFER_PV`` (a tuning option, off by default; benchmarks/gpu_kernels.py times it beside the default) issues
each key tile's P·V after the next tile's scores, carrying P in float32 to the next step. On sm_90 the P·V
wgmma is asynchronous until its accumulators' next use, so in this order it runs on the tensor cores while
the next tile's softmax runs on the FMA and special-function units; in the plain loop it waits for its own
tile's probabilities, and the next scores wait for it. Compiled for sm_90, over 90 % of the loop's exp2s
come after the deferred P·V (tests/test_kernels_sm90.py), for 15-30 more registers: a program fewer per
multiprocessor. Timed on an H100 (2026-11-26) it is slower at every width: B16 H20 T1500 fp16 318-633 us
at widths 16-48 against 297-510 for the default tiles. (P carried in 16 bits instead went through shared
memory, and Triton waited for each P·V before overwriting it there, ahead of the next softmax: no overlap,
so it is not offered.)

Operand precision: compiled on a GPU, float16 / bfloat16 inputs go to tl.dot as they are (tensor cores,
float32 accumulation) and P is rounded to V's dtype before P·V, as FlashAttention and SDPA's fused
kernels do. float32 inputs, and every input under TRITON_INTERPRET=1 (the interpreter's bf16 dot is
wrong), are cast to float32 first and use exact ("ieee") dots. Pointer arithmetic (no block pointers)
and one fixed configuration per call, both for the interpreter; `attention` takes an explicit
``config`` for tuning runs (benchmarks/gpu_kernels.py). tests/test_kernels_sm90.py compiles every
variant for an H100 here and checks it for register spills, shared memory and tensor-core use.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from adaptwin.kernels import cdiv, interpreting, next_pow2, sm_count, with_launch_options

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)  # the same, for use inside kernels
_FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _scores(q1, q2, k_base, cols, col_ok, sks, DQ: tl.constexpr, D1Q: tl.constexpr, D2Q: tl.constexpr,
            HAS_Q2: tl.constexpr, DOT_F32: tl.constexpr, TAIL: tl.constexpr):
    """Raw q·kᵀ (BM, BN) for one key tile, the head width as one or two power-of-two parts."""
    d1 = tl.arange(0, D1Q)
    k_ok = col_ok[:, None] if TAIL else tl.full((1, 1), 1, tl.int1)
    k1 = tl.load(k_base + cols[:, None] * sks + d1[None, :], mask=k_ok & (d1[None, :] < DQ), other=0.0)
    if DOT_F32:  # true float32 products ("ieee"): a float32 dot defaults to tf32 on GPUs
        s = tl.dot(q1, tl.trans(k1.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q1, tl.trans(k1))
    if HAS_Q2:
        d2 = D1Q + tl.arange(0, D2Q)
        k2 = tl.load(k_base + cols[:, None] * sks + d2[None, :], mask=k_ok & (d2[None, :] < DQ), other=0.0)
        if DOT_F32:
            s = tl.dot(q2, tl.trans(k2.to(tl.float32)), acc=s, input_precision="ieee")
        else:
            s = tl.dot(q2, tl.trans(k2), acc=s)
    return s


@triton.jit
def _probs(s, m_i, l_i, rows, row_ok, cols, col_ok, mask_base, smt, sms, qk_scale, HAS_MASK: tl.constexpr,
           MASK_BOOL: tl.constexpr, CAUSAL: tl.constexpr, FMA_SCALE: tl.constexpr, TAIL: tl.constexpr):
    """The online softmax of one key tile's raw scores ``s``: (p, alpha, m_new, l_i), p unnormalised and
    relative to the new running maximum, alpha the factor that takes the accumulators to it. TAIL: the last,
    partial tile (its columns masked); the full tiles before it skip that mask. FMA_SCALE (no mask and a
    positive scale): the scale enters exp2 with the running maximum as one fused multiply-add, since then
    max(s)·scale = max(s·scale)."""
    if FMA_SCALE:
        if TAIL:
            s = tl.where(col_ok[None, :], s, float("-inf"))
        if CAUSAL:
            s = tl.where(cols[None, :] <= rows[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s * qk_scale - m_use[:, None])
    else:
        s = s * qk_scale  # log2 units
        if HAS_MASK:
            m_off = rows[:, None] * smt + cols[None, :] * sms
            ok = row_ok[:, None] & col_ok[None, :]
            if MASK_BOOL:
                keep = tl.load(mask_base + m_off, mask=ok, other=0)
                s = s + tl.where(keep != 0, 0.0, float("-inf"))  # added, as SDPA: a NaN score stays NaN
            else:
                add = tl.load(mask_base + m_off, mask=ok, other=0.0).to(tl.float32)
                # log2 units, clamped at -FLT_MAX: finfo.min times log2e would overflow to -inf, and a row masked
                # that way throughout would give zeros where the reference (SDPA) averages its values; -inf stays
                s = s + tl.where(add == float("-inf"), add, tl.maximum(add * _LOG2E, -_FLT_MAX))
        if TAIL:  # after the scale, which may be negative or zero
            s = tl.where(col_ok[None, :], s, float("-inf"))
        if CAUSAL:
            s = tl.where(cols[None, :] <= rows[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with only masked keys so far: exp2 -> 0
        p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_i


@triton.jit
def _pv(acc1, acc2, p, alpha, v_base, start, S, svs, DV: tl.constexpr, D1V: tl.constexpr, D2V: tl.constexpr,
        HAS_V2: tl.constexpr, DOT_F32: tl.constexpr, TAIL: tl.constexpr, BLOCK_N: tl.constexpr):
    """The accumulators rescaled by ``alpha`` plus P·V for the key tile at ``start`` (p in float32, or already
    in V's dtype for tensor-core dots). TAIL: V's rows past S are masked."""
    cols = start + tl.arange(0, BLOCK_N)
    v_ok = (cols < S)[:, None] if TAIL else tl.full((1, 1), 1, tl.int1)
    e1 = tl.arange(0, D1V)
    v1 = tl.load(v_base + cols[:, None] * svs + e1[None, :], mask=v_ok & (e1[None, :] < DV), other=0.0)
    if DOT_F32:
        acc1 = acc1 * alpha[:, None] + tl.dot(p, v1.to(tl.float32), input_precision="ieee")
    else:
        acc1 = tl.dot(p.to(v1.dtype), v1, acc=acc1 * alpha[:, None])
    if HAS_V2:
        e2 = D1V + tl.arange(0, D2V)
        v2 = tl.load(v_base + cols[:, None] * svs + e2[None, :], mask=v_ok & (e2[None, :] < DV), other=0.0)
        if DOT_F32:
            acc2 = acc2 * alpha[:, None] + tl.dot(p, v2.to(tl.float32), input_precision="ieee")
        else:
            acc2 = tl.dot(p.to(v2.dtype), v2, acc=acc2 * alpha[:, None])
    return acc1, acc2


@triton.jit
def _key_tile(acc1, acc2, m_i, l_i, q1, q2, k_base, v_base, mask_base, start, rows, row_ok, S, sks, svs, smt, sms,
              qk_scale, DQ: tl.constexpr, DV: tl.constexpr, D1Q: tl.constexpr, D2Q: tl.constexpr,
              D1V: tl.constexpr, D2V: tl.constexpr, HAS_Q2: tl.constexpr, HAS_V2: tl.constexpr,
              HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, CAUSAL: tl.constexpr, DOT_F32: tl.constexpr,
              FMA_SCALE: tl.constexpr, TAIL: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key tile of the online softmax: scores, probabilities, then P·V."""
    cols = start + tl.arange(0, BLOCK_N)  # (BN,)
    col_ok = cols < S
    s = _scores(q1, q2, k_base, cols, col_ok, sks, DQ, D1Q, D2Q, HAS_Q2, DOT_F32, TAIL)  # (BM, BN)
    p, alpha, m_i, l_i = _probs(s, m_i, l_i, rows, row_ok, cols, col_ok, mask_base, smt, sms, qk_scale, HAS_MASK,
                                MASK_BOOL, CAUSAL, FMA_SCALE, TAIL)
    acc1, acc2 = _pv(acc1, acc2, p, alpha, v_base, start, S, svs, DV, D1V, D2V, HAS_V2, DOT_F32, TAIL, BLOCK_N)
    return acc1, acc2, m_i, l_i


@triton.jit
def _deferred_tile(acc1, acc2, m_i, l_i, p_prev, alpha_prev, q1, q2, k_base, v_base, mask_base, start, rows,
                   row_ok, S, sks, svs, smt, sms, qk_scale, DQ: tl.constexpr, DV: tl.constexpr, D1Q: tl.constexpr,
                   D2Q: tl.constexpr, D1V: tl.constexpr, D2V: tl.constexpr, HAS_Q2: tl.constexpr,
                   HAS_V2: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, CAUSAL: tl.constexpr,
                   DOT_F32: tl.constexpr, FMA_SCALE: tl.constexpr, TAIL: tl.constexpr, PREV_TAIL: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """DEFER_PV's step: the scores of the key tile at ``start``, then P·V of the tile before it (``p_prev``,
    ``alpha_prev``), then this tile's probabilities, returned as the next step's ``p_prev``. In this order the
    softmax runs while the previous tile's P·V is still on the tensor cores (on sm_90 the P·V wgmma is
    asynchronous; the wait for it comes at its accumulators' next use)."""
    cols = start + tl.arange(0, BLOCK_N)
    col_ok = cols < S
    s = _scores(q1, q2, k_base, cols, col_ok, sks, DQ, D1Q, D2Q, HAS_Q2, DOT_F32, TAIL)
    acc1, acc2 = _pv(acc1, acc2, p_prev, alpha_prev, v_base, start - BLOCK_N, S, svs, DV, D1V, D2V, HAS_V2, DOT_F32,
                     PREV_TAIL, BLOCK_N)
    p, alpha, m_i, l_i = _probs(s, m_i, l_i, rows, row_ok, cols, col_ok, mask_base, smt, sms, qk_scale, HAS_MASK,
                                MASK_BOOL, CAUSAL, FMA_SCALE, TAIL)
    return acc1, acc2, m_i, l_i, p, alpha


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr,
    sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, smb, smh, smt, sms,
    H, T, S, groups, qk_scale, split_len, ws_acc_ptr, ws_ml_ptr,
    DQ: tl.constexpr, DV: tl.constexpr, ALIGN: tl.constexpr, PARTIAL: tl.constexpr,
    D1Q: tl.constexpr, D2Q: tl.constexpr, D1V: tl.constexpr, D2V: tl.constexpr,
    HAS_Q2: tl.constexpr, HAS_V2: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, CAUSAL: tl.constexpr, DOT_F32: tl.constexpr,
    FMA_SCALE: tl.constexpr, DEFER_PV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)  # this program's range of keys: [split·split_len, (split + 1)·split_len)
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
    row_ok = rows < T
    q_base = q_ptr + b * sqb + h * sqh + rows[:, None] * sqt
    d1 = tl.arange(0, D1Q)
    q1 = tl.load(q_base + d1[None, :], mask=row_ok[:, None] & (d1[None, :] < DQ), other=0.0)  # (BM, D1Q)
    q2 = q1
    if HAS_Q2:  # widths like 40 or 48 as 32 + 16: no dot over padding to 64
        d2 = D1Q + tl.arange(0, D2Q)
        q2 = tl.load(q_base + d2[None, :], mask=row_ok[:, None] & (d2[None, :] < DQ), other=0.0)  # (BM, D2Q)
    if DOT_F32:
        q1 = q1.to(tl.float32)
        q2 = q2.to(tl.float32)
    k_base = k_ptr + b * skb + hk * skh
    v_base = v_ptr + b * svb + hk * svh
    mask_base = mask_ptr + b * smb + h * smh
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc1 = tl.zeros((BLOCK_M, D1V), tl.float32)
    acc2 = tl.zeros((BLOCK_M, D2V), tl.float32)
    lo = split * split_len  # a multiple of BLOCK_N
    end = tl.minimum(S, lo + split_len)
    if CAUSAL:
        end = tl.minimum(end, (pid_m + 1) * BLOCK_M)
    full_end = lo + tl.maximum(end - lo, 0) // BLOCK_N * BLOCK_N
    # exact float32 dots keep their operands in registers: masked loads there use fewer of them. Causal
    # 16-bit calls take the one masked loop too: with a full-tile loop first, whose trip count then varies
    # from program to program, triton 3.6's sm_90 code read shared memory out of bounds in the P·V dot
    # (compute-sanitizer on an H100, T = 64..1500, every tile shape tried)
    if DOT_F32 or CAUSAL:
        full_end = lo
    if DEFER_PV:  # each tile's P·V waits for the next tile's scores (`_deferred_tile`)
        cols = lo + tl.arange(0, BLOCK_N)  # the first tile, masked: it may be the only, partial one
        s = _scores(q1, q2, k_base, cols, cols < S, sks, DQ, D1Q, D2Q, HAS_Q2, DOT_F32, True)
        p, alpha, m_i, l_i = _probs(s, m_i, l_i, rows, row_ok, cols, cols < S, mask_base, smt, sms, qk_scale,
                                    HAS_MASK, MASK_BOOL, CAUSAL, FMA_SCALE, True)
        for start in range(lo + BLOCK_N, full_end, BLOCK_N):  # the full tiles after it
            acc1, acc2, m_i, l_i, p, alpha = _deferred_tile(
                acc1, acc2, m_i, l_i, p, alpha, q1, q2, k_base, v_base, mask_base, start, rows, row_ok, S, sks, svs,
                smt, sms, qk_scale, DQ, DV, D1Q, D2Q, D1V, D2V, HAS_Q2, HAS_V2, HAS_MASK, MASK_BOOL, CAUSAL,
                DOT_F32, FMA_SCALE, False, False, BLOCK_N)
        for start in range(tl.maximum(full_end, lo + BLOCK_N), end, BLOCK_N):  # the partial last tile
            acc1, acc2, m_i, l_i, p, alpha = _deferred_tile(
                acc1, acc2, m_i, l_i, p, alpha, q1, q2, k_base, v_base, mask_base, start, rows, row_ok, S, sks, svs,
                smt, sms, qk_scale, DQ, DV, D1Q, D2Q, D1V, D2V, HAS_Q2, HAS_V2, HAS_MASK, MASK_BOOL, CAUSAL,
                DOT_F32, FMA_SCALE, True, True, BLOCK_N)
        last = lo + (tl.cdiv(tl.maximum(end - lo, 1), BLOCK_N) - 1) * BLOCK_N  # the last tile's P·V is left
        acc1, acc2 = _pv(acc1, acc2, p, alpha, v_base, last, S, svs, DV, D1V, D2V, HAS_V2, DOT_F32, True, BLOCK_N)
    else:
        for start in range(lo, full_end, BLOCK_N):
            acc1, acc2, m_i, l_i = _key_tile(acc1, acc2, m_i, l_i, q1, q2, k_base, v_base, mask_base, start, rows,
                                             row_ok, S, sks, svs, smt, sms, qk_scale, DQ, DV, D1Q, D2Q, D1V, D2V,
                                             HAS_Q2, HAS_V2, HAS_MASK, MASK_BOOL, CAUSAL, DOT_F32, FMA_SCALE, False,
                                             BLOCK_N)
        for start in range(full_end, end, BLOCK_N):  # the partial last tile (every tile for float32)
            acc1, acc2, m_i, l_i = _key_tile(acc1, acc2, m_i, l_i, q1, q2, k_base, v_base, mask_base, start, rows,
                                             row_ok, S, sks, svs, smt, sms, qk_scale, DQ, DV, D1Q, D2Q, D1V, D2V,
                                             HAS_Q2, HAS_V2, HAS_MASK, MASK_BOOL, CAUSAL, DOT_F32, FMA_SCALE, True,
                                             BLOCK_N)
    e1 = tl.arange(0, D1V)
    if PARTIAL:  # unnormalised accumulators and the row statistics, for `_combine_kernel`
        row = (split * tl.num_programs(1) + bh) * T + rows  # (splits, B·H, T) row-major
        tl.store(ws_ml_ptr + 2 * row, m_i, mask=row_ok)
        tl.store(ws_ml_ptr + 2 * row + 1, l_i, mask=row_ok)
        tl.store(ws_acc_ptr + row[:, None] * DV + e1[None, :], acc1, mask=row_ok[:, None] & (e1[None, :] < DV))
        if HAS_V2:
            e2 = D1V + tl.arange(0, D2V)
            tl.store(ws_acc_ptr + row[:, None] * DV + e2[None, :], acc2, mask=row_ok[:, None] & (e2[None, :] < DV))
    else:
        # fully masked rows give 0, as the reference; a NaN or +inf score left l NaN: the row is NaN, as SDPA
        inv = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), tl.where(l_i == 0, 0.0, l_i))
        o_base = out_ptr + ((b * T + rows[:, None]) * H + h) * DV  # (B, T, H, Dv) contiguous
        tl.store(o_base + e1[None, :], (acc1 * inv[:, None]).to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (e1[None, :] < DV))
        if HAS_V2:
            e2 = D1V + tl.arange(0, D2V)
            tl.store(o_base + e2[None, :], (acc2 * inv[:, None]).to(out_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & (e2[None, :] < DV))

@triton.jit
def _combine_kernel(ws_acc_ptr, ws_ml_ptr, out_ptr, H, T, SPLITS, DV: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_DV: tl.constexpr):
    """Merges the key splits of `_attention_kernel` (PARTIAL): each split's accumulator and sum rescaled to
    the rows' overall maximum (log2 units), then normalised, into out (B, T, H, DV)."""
    bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < T
    e = tl.arange(0, BLOCK_DV)
    ok = row_ok[:, None] & (e[None, :] < DV)
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    for s in range(SPLITS):
        m = tl.maximum(m, tl.load(ws_ml_ptr + 2 * ((s * tl.num_programs(0) + bh) * T + rows), mask=row_ok,
                                  other=float("-inf")))
    m_use = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros((BLOCK_R, BLOCK_DV), tl.float32)
    total = tl.zeros((BLOCK_R,), tl.float32)
    for s in range(SPLITS):
        row = (s * tl.num_programs(0) + bh) * T + rows
        w = tl.exp2(tl.load(ws_ml_ptr + 2 * row, mask=row_ok, other=float("-inf")) - m_use)  # 0 for empty splits
        total += w * tl.load(ws_ml_ptr + 2 * row + 1, mask=row_ok, other=0.0)
        acc += w[:, None] * tl.load(ws_acc_ptr + row[:, None] * DV + e[None, :], mask=ok, other=0.0)
    inv = tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), tl.where(total == 0, 0.0, total))
    b = bh // H
    h = bh % H
    tl.store(out_ptr + ((b * T + rows[:, None]) * H + h) * DV + e[None, :],
             (acc * inv[:, None]).to(out_ptr.dtype.element_ty), mask=ok)


def _parts(width: int, one: bool = False) -> tuple[int, int]:
    """A head width as tl.dot-sized power-of-two parts (each >= 16): one part where padding to the next
    power of two costs no more than two parts would (16, 20, 24, 32, 52, 64), two otherwise (40 and 48
    as 32 + 16, 80 as 64 + 16); second part 0 when there is none. ``one``: always one part, padded (the
    ONE_PART config of tuning runs: fewer, wider dots for more padded work)."""
    whole = max(16, next_pow2(width))
    first = max(16, whole // 2)
    if one or first >= width:
        return whole, 0
    second = max(16, next_pow2(width - first))
    return (first, second) if first + second < whole else (whole, 0)


# Widths 17-32 (one 32-wide part) on the prefill tiles: capped at 128 registers a thread, four programs fit on a
# multiprocessor instead of two (ptxas then waits for each wgmma in turn). On an H200 at B16 H20 T1500 fp16
# (2026-11-26, benchmarks/gpu_runs/2026-11-26-b/7_maxnreg_h200.txt): width 24 388 -> 361 us, 32 369 -> 347.
# Triton 3.6 (the GPU machine's) compiles that spill-free; 3.9 spills 24 bytes under the cap, untimed, so
# newer tritons keep the uncapped tiles. Calls that split the keys (under a wave of programs, as Whisper tiny's
# 6 heads) drop the cap: at width 24 that variant spills 8 bytes under 3.6, and the cap was not timed there.
_CAP_REGISTERS = tuple(int(p) for p in triton.__version__.split(".")[:2] if p.isdigit()) <= (3, 6)


def default_config(q: torch.Tensor, masked: bool = False, causal: bool = False, dv: int | None = None
                   ) -> dict[str, int]:
    """Block sizes for a call: small fixed tiles under the interpreter, GPU tiles otherwise (``dv``: V's
    width, q's by default).

    The GPU tiles are the largest that compile for sm_90 without register spills (checked for every
    dtype, mask kind and widths 9-64 by tests/test_kernels_sm90.py): exact float32 dots run on the FMA
    units and hold more registers, and a mask tile is one more (BLOCK_M, BLOCK_N) tensor to keep.
    Unmasked, non-causal 16-bit prefill at widths up to 64 takes 128-query tiles three key tiles deep, the
    fastest of the tuning sweep at widths 24-48 (B16 H20 T1500 fp16 on an H100, 2026-11-26: 526 -> 384 us at
    24, 398 -> 365 at 32, 628 -> 495 at 40, 535 -> 487 at 48 against 64 x 64 tiles two deep), with eight
    warps where the width is two dot parts (40: 495 us against 526 with four), and at widths 17-32 capped at
    128 registers a thread where triton compiles that without spills (``_CAP_REGISTERS``)."""
    if interpreting():
        return {"BLOCK_M": 32, "BLOCK_N": 32}
    few = q.shape[2] <= 16  # decoding: one or a few queries, a 16-row tile (tl.dot's minimum) wastes least
    if q.dtype == torch.float32:
        return {"BLOCK_M": 16 if few else 32, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
    width, dv = q.shape[-1], q.shape[-1] if dv is None else dv
    if not (few or masked or causal) and max(width, dv) <= 64:
        two_parts = bool(_parts(width)[1] or _parts(dv)[1])
        config = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8 if two_parts else 4, "num_stages": 3}
        if _parts(width) == _parts(dv) == (32, 0) and _CAP_REGISTERS:
            config["maxnreg"] = 128
        return config
    # decoding tiles pipeline three key tiles deep: with two, triton 3.6 (the device's) put 8 bytes on the
    # stack at widths 40 (bool mask) and 48 (additive mask); with three, no variant does in 3.6 or 3.9
    return {"BLOCK_M": 16 if few else 64, "BLOCK_N": 32 if masked else 64, "num_warps": 4,
            "num_stages": 3 if few else 2}


def deferred_pv_config(q: torch.Tensor, masked: bool = False, causal: bool = False, dv: int | None = None
                       ) -> dict[str, int]:
    """`default_config` with DEFER_PV on, at the tiles it was tuned and checked at: on tensor cores 64 queries on
    four warps, uncapped (it holds 142-187 registers; with the 128-query prefill tiles width 64 spills)."""
    config = {**default_config(q, masked, causal, dv), "DEFER_PV": True}
    if q.dtype != torch.float32 and not interpreting():
        config.update(BLOCK_M=64, num_warps=4)
        config.pop("maxnreg", None)
    return config


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
              is_causal: bool, config: dict[str, int] | None = None, dot_f32: bool | None = None) -> torch.Tensor:
    """Launcher with the op's signature: q (B, H, T, Dq), k (B, Hkv, S, Dq), v (B, Hkv, S, Dv) -> (B, T, H, Dv).

    ``config``: BLOCK_M, BLOCK_N (powers of two >= 16) and optionally num_warps / num_stages / SPLITS /
    ONE_PART / DEFER_PV (see `launches`), for tuning runs; `default_config` otherwise. ``dot_f32``: force (True) or
    forbid (False) the float32 cast of 16-bit operands; by default they are cast only for float32 inputs
    and under the interpreter."""
    from adaptwin.ops.attention import _check_attention

    _check_attention(q, k, v, mask, scale)
    B, H, T, _ = q.shape
    S, DV = k.shape[2], v.shape[3]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty((B, T, H, DV), dtype=q.dtype, device=q.device)
    if T == 0 or B * H == 0:
        return out
    if S == 0:
        return out.zero_()
    for kernel, grid, args, kwargs in launches(q, k, v, mask, out, scale, is_causal, config, dot_f32):
        kernel[grid](*args, **kwargs)
    return out


def launches(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, out: torch.Tensor,
             scale: float, is_causal: bool, config: dict[str, int] | None = None, dot_f32: bool | None = None
             ) -> list[tuple]:
    """[(kernel, grid, positional arguments, keyword arguments)] of one call, for checked, non-empty inputs.

    Less than a wave of programs (decoding: one new token per (batch, head) against the cache or a 30 s
    encoder window) splits the keys over the grid's third axis, flash-decoding style, so that the GPU is
    not left with B·H programs; float32 partial accumulators then go through `_combine_kernel`.
    ``config`` may set SPLITS (1: no split), ONE_PART (`_parts`) and DEFER_PV (the module docstring; causal
    tensor-core calls keep the plain loop). Separate from the launches so the
    exact specialisations a call compiles can also be compiled ahead of time for a GPU that is not here
    (tests/test_kernels_sm90.py). Each launch carries `LAUNCH_OPTIONS` (FMA contraction)."""
    B, H, T, DQ = q.shape
    Hkv, S, DV = k.shape[1], k.shape[2], v.shape[3]
    if mask is not None:
        mask = mask.expand(B, H, T, S)
        mask_arg, mstr = mask, mask.stride()
    else:
        mask_arg, mstr = q, (0, 0, 0, 0)
    planned = config is None
    config = dict(default_config(q, mask is not None, bool(is_causal), DV) if planned else config)
    unknown = sorted(set(config) - {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "maxnreg", "SPLITS",
                                    "ONE_PART", "DEFER_PV"})
    if unknown or not {"BLOCK_M", "BLOCK_N"} <= set(config):
        raise ValueError(f"attention config: needs BLOCK_M and BLOCK_N, may set num_warps, num_stages, maxnreg, "
                         f"SPLITS, ONE_PART, DEFER_PV; got {sorted(config)}")
    one_part = bool(config.pop("ONE_PART", False))
    defer_pv = config.pop("DEFER_PV", False)
    if defer_pv not in (False, True):
        raise ValueError(f"attention config: DEFER_PV must be True or False, got {defer_pv!r}")
    maxnreg = config.get("maxnreg")
    if maxnreg is not None and not (type(maxnreg) is int and 16 <= maxnreg <= 255):
        raise ValueError(f"attention config: maxnreg (registers a thread) must be an integer in 16..255, "
                         f"got {maxnreg!r}")
    block_m = config.pop("BLOCK_M")
    block_n = config["BLOCK_N"]
    programs = cdiv(T, block_m) * B * H
    splits = config.pop("SPLITS", None)
    if splits is None:  # under one wave of programs: split to two per multiprocessor, two key tiles each
        sms = sm_count(q.device)
        splits = max(1, min(cdiv(2 * sms, programs), S // (2 * block_n))) if programs < sms else 1
    split_len = cdiv(cdiv(S, max(1, splits)), block_n) * block_n
    splits = cdiv(S, split_len)
    if planned and splits > 1:  # the register cap was timed on full grids; split calls spill under it at width 24
        config.pop("maxnreg", None)
    if dot_f32 is None:
        dot_f32 = q.dtype == torch.float32 or interpreting()
    # DEFER_PV's loops start one tile in, so their trip counts vary from program to program under a causal
    # mask: the shape of loop for which triton 3.6's sm_90 code read shared memory out of bounds (see the
    # kernel's full_end); causal tensor-core calls keep the plain loop
    defer_pv = bool(defer_pv) and not (bool(is_causal) and not dot_f32)
    # Causal tensor-core calls take V's width as one part: with V in two (39 or 48 as 32 + 16), triton 3.6's
    # sm_90 code read shared memory out of bounds in the second P·V dot (compute-sanitizer, attention.py:103)
    # and came out wrong (relative error 0.25-0.73) at every width whose rows are not 16-byte aligned, and
    # at one pipeline stage for aligned ones (benchmarks/gpu_causal_probe.py on an H100, 2026-11-25); one
    # part was right in every case probed, grouped heads included.
    # DEFER_PV on tensor cores likewise: with V in two parts, its deferred P·V came out wrong at width 40
    # (relative error 4e-2) and read out of bounds at B16 H20 T1500 (H100, triton 3.6, 2026-11-26)
    one_v = one_part or (bool(is_causal) and not dot_f32) or (defer_pv and not dot_f32)
    (d1q, d2q), (d1v, d2v) = _parts(DQ, one_part), _parts(DV, one_v)
    strides = [t.stride(i) for t in (q, k, v) for i in range(3)]
    align = 16 // q.element_size()  # elements per 16 bytes, down to the largest power of two all strides share
    while align > 1 and any(st % align for st in strides):
        align //= 2
    if splits > 1:
        ws_acc = torch.empty((splits, B * H, T, DV), dtype=torch.float32, device=q.device)
        ws_ml = torch.empty((splits, B * H, T, 2), dtype=torch.float32, device=q.device)
    else:
        ws_acc = ws_ml = out  # unused
    args = (q, k, v, mask_arg, out, *(st // align for st in strides), *mstr, H, T, S, H // Hkv,
            float(scale) * LOG2E, split_len, ws_acc, ws_ml)
    kwargs = dict(HAS_MASK=mask is not None, MASK_BOOL=mask is not None and mask.dtype == torch.bool,
                  CAUSAL=bool(is_causal), DOT_F32=dot_f32, FMA_SCALE=mask is None and scale > 0, DEFER_PV=defer_pv,
                  BLOCK_M=block_m,
                  DQ=DQ, DV=DV, ALIGN=align,
                  PARTIAL=splits > 1, D1Q=d1q, D2Q=max(16, d2q), D1V=d1v, D2V=max(16, d2v), HAS_Q2=d2q > 0,
                  HAS_V2=d2v > 0, **config)
    plan = [(_attention_kernel, (cdiv(T, block_m), B * H, splits), args, kwargs)]
    if splits > 1:
        block_r = min(16, next_pow2(T))
        plan.append((_combine_kernel, (B * H, cdiv(T, block_r)), (ws_acc, ws_ml, out, H, T, splits),
                     dict(DV=DV, BLOCK_R=block_r, BLOCK_DV=max(16, next_pow2(DV)))))
    return with_launch_options(plan)
