"""The Triton kernels of ``torch.ops.adaptwin.rank_linear`` apart from the whole-byte GEMVs (`rank_gemv`):
factor decoding (fp / NF4 / int8) inside tiles, the tiled GEMM and elementwise GEMV per product, the
one-launch kernel for both products, and the decode-once kernel. `rank_linear.plan` chooses among them
and explains when each runs."""

from __future__ import annotations

import triton
import triton.language as tl
from adaptwin.kernels.nf4 import nf4_tile, nf4_value


@triton.jit
def _decode(w_ptr, scale_ptr, e, ok, ROWLEN, BS: tl.constexpr, FORMAT: tl.constexpr):
    """float32 values of flat elements ``e`` of a factor (rows of ROWLEN, scale blocks of BS, a compile-time
    constant so that the block index is a shift, not an integer division per element)."""
    if FORMAT == 0:
        w = tl.load(w_ptr + e, mask=ok, other=0.0).to(tl.float32)
    elif FORMAT == 1:
        byte = tl.load(w_ptr + e // 2, mask=ok, other=0).to(tl.int32)
        nib = tl.where(e % 2 == 0, byte >> 4, byte & 15)  # high nibble first
        w = nf4_value(nib) * tl.load(scale_ptr + e // BS, mask=ok, other=0.0)
    else:
        if BS == 0:  # per row
            group = e // ROWLEN
        else:  # per flat block
            group = e // BS
        w = tl.load(w_ptr + e, mask=ok, other=0).to(tl.float32) * tl.load(scale_ptr + group, mask=ok, other=0.0)
    return w


@triton.jit
def _dot_even_odd(acc, x_ptr, rm, m_ok, sxm, kb, kb_ok, hi, lo, DOT_F32: tl.constexpr):
    """acc + x[rm, 2·kb]·hi + x[rm, 2·kb + 1]·lo: x's even and odd columns times the high and low nibbles of a
    factor's whole bytes along K (`nf4_tile` with ROWS_LAST). 16-bit x: tensor-core dots on the values cast
    to x's dtype; DOT_F32: exact float32 ("ieee") dots."""
    x_ok = m_ok[:, None] & kb_ok[None, :]
    xe = tl.load(x_ptr + rm[:, None] * sxm + 2 * kb[None, :], mask=x_ok, other=0.0)
    xo = tl.load(x_ptr + rm[:, None] * sxm + 2 * kb[None, :] + 1, mask=x_ok, other=0.0)
    return _mma(xo, lo, _mma(xe, hi, acc, DOT_F32), DOT_F32)


@triton.jit
def _mma(a, b, acc, DOT_F32: tl.constexpr):
    """acc + a·b: exact float32 ("ieee") products when DOT_F32 (a float32 dot defaults to tf32 on GPUs), else
    tensor cores with b cast to a's dtype (as the reference casts the decoded factor)."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b, acc=acc, input_precision="ieee")
    return tl.dot(a, b.to(a.dtype), acc=acc)


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, M, N, K, sxm, s_k, s_n, ROWLEN,
                 BS: tl.constexpr, FORMAT: tl.constexpr, PACK: tl.constexpr, SCALE_ROW: tl.constexpr,
                 HAS_BIAS: tl.constexpr,
                 DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """x (M, K) times the factor's (K, N) view. PACK (NF4 read as whole bytes): 1, codes along K (Aᵀ: the
    factor's rows are the output columns), x's even and odd columns times the high and low nibbles, two
    dots of BLOCK_K / 2; 2, codes along N (B), the nibbles give the even and odd output columns, two
    accumulators interleaved at the end. 0: the elementwise `_decode`. SCALE_ROW (PACK only): each tile lies
    in one scale block of every factor row, so the scales are one vector load per tile, not one per element."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_e = tl.zeros((BLOCK_M, BLOCK_N // 2), tl.float32)
    acc_o = tl.zeros((BLOCK_M, BLOCK_N // 2), tl.float32)
    jb = tl.program_id(1) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)  # PACK 2: byte columns of B
    for k0 in range(0, K, BLOCK_K):
        if PACK == 1:
            kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            kb_ok = kb < K // 2
            hi, lo = nf4_tile(w_ptr, scale_ptr, rn, rn < N, kb, kb_ok, k0, ROWLEN, BS, SCALE_ROW, True)  # (BK/2, BN)
            acc = _dot_even_odd(acc, x_ptr, rm, m_ok, sxm, kb, kb_ok, hi, lo, DOT_F32)
        else:
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :], mask=m_ok[:, None] & (rk[None, :] < K),
                        other=0.0)  # (BM, BK)
            if PACK == 2:
                hi, lo = nf4_tile(w_ptr, scale_ptr, rk, rk < K, jb, jb < N // 2, tl.program_id(1) * BLOCK_N, ROWLEN,
                                   BS, SCALE_ROW, False)  # (BK, BN/2)
                acc_e = _mma(x, hi, acc_e, DOT_F32)
                acc_o = _mma(x, lo, acc_o, DOT_F32)
            else:
                ok = (rk[:, None] < K) & (rn[None, :] < N)
                w = _decode(w_ptr, scale_ptr, rk[:, None] * s_k + rn[None, :] * s_n, ok, ROWLEN, BS,
                            FORMAT)
                if DOT_F32:  # true float32 products: a float32 dot defaults to tf32 on GPUs
                    acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
                else:  # 16-bit x: the decoded factor cast to x's dtype (as the reference casts it), tensor cores
                    acc += tl.dot(x, w.to(x.dtype))
    if PACK == 2:  # output columns 2·jb and 2·jb + 1, interleaved
        acc = tl.reshape(tl.join(acc_e, acc_o), (BLOCK_M, BLOCK_N))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & (rn[None, :] < N))


@triton.jit
def _dequant_kernel(w_ptr, scale_ptr, out_ptr, NUMEL, ROWLEN, BS: tl.constexpr, FORMAT: tl.constexpr,
                    BLOCK: tl.constexpr):
    """A whole quantised factor decoded into out (same flat layout, out's dtype): each value is computed
    in float32 and rounded once, as the reference's dequantise-then-cast rounds it."""
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = e < NUMEL
    w = _decode(w_ptr, scale_ptr, e, ok, ROWLEN, BS, FORMAT)
    tl.store(out_ptr + e, w.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, N, K, s_k, s_n, ROWLEN, BS: tl.constexpr,
                 FORMAT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)  # (BK,)
        ok = (rk[:, None] < K) & (rn[None, :] < N)
        w = _decode(w_ptr, scale_ptr, rk[:, None] * s_k + rn[None, :] * s_n, ok, ROWLEN, BS, FORMAT)
        acc += tl.sum(x[:, None] * w, 0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + rn, acc.to(out_ptr.dtype.element_ty), mask=rn < N)


@triton.jit
def _fused_kernel(x_ptr, a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, bias_ptr, out_ptr, M, K, R, N, sxm,
                  N_SPAN, A_BS: tl.constexpr, B_BS: tl.constexpr, A_FORMAT: tl.constexpr, B_FORMAT: tl.constexpr,
                  A_PACKED: tl.constexpr, B_PACKED: tl.constexpr, A_SCALE_ROW: tl.constexpr,
                  B_SCALE_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Both products in one program, for a rank that fits a register tile (R <= BLOCK_R): the program's
    BLOCK_M rows of h = x·Aᵀ are accumulated over K and kept in registers, then multiplied by every
    BLOCK_N-column tile of B in its span of N_SPAN output columns. h never reaches memory and the call is
    one launch. A (R, K) and B (R, N) are flat direction-major factors in any format; h is rounded to x's
    dtype before the second product (as the reference rounds it) unless DOT_F32. A_PACKED / B_PACKED: an
    NF4 factor read as whole bytes (as `_gemm_kernel`'s PACK 1 / 2), with A_SCALE_ROW / B_SCALE_ROW its scales
    one vector per tile (as SCALE_ROW)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    m_ok = rm < M
    r_ok = rr < R
    h = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if A_PACKED:
            kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            kb_ok = kb < K // 2
            # (BK/2, BR): Aᵀ's rows 2·kb and 2·kb + 1
            hi, lo = nf4_tile(a_ptr, a_scale_ptr, rr, r_ok, kb, kb_ok, k0, K, A_BS, A_SCALE_ROW, True)
            h = _dot_even_odd(h, x_ptr, rm, m_ok, sxm, kb, kb_ok, hi, lo, DOT_F32)
        else:
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :], mask=m_ok[:, None] & (rk[None, :] < K), other=0.0)
            ok = (rk[:, None] < K) & r_ok[None, :]
            w = _decode(a_ptr, a_scale_ptr, rr[None, :] * K + rk[:, None], ok, K, A_BS, A_FORMAT)  # Aᵀ
            if DOT_F32:
                h += tl.dot(x.to(tl.float32), w, input_precision="ieee")
            else:
                h += tl.dot(x, w.to(x.dtype))
    if DOT_F32:
        hm = h
    else:
        hm = h.to(x_ptr.dtype.element_ty)
    n_lo = tl.program_id(1) * N_SPAN
    n_hi = tl.minimum(N, n_lo + N_SPAN)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < n_hi
        if B_PACKED:  # the nibbles of byte column jb: output columns 2·jb and 2·jb + 1, interleaved
            jb = n0 // 2 + tl.arange(0, BLOCK_N // 2)
            hi, lo = nf4_tile(b_ptr, b_scale_ptr, rr, r_ok, jb, jb < n_hi // 2, n0, N, B_BS, B_SCALE_ROW,
                               False)  # (BR, BN/2)
            if DOT_F32:
                ye = tl.dot(hm, hi, input_precision="ieee")
                yo = tl.dot(hm, lo, input_precision="ieee")
            else:
                ye = tl.dot(hm, hi.to(hm.dtype))
                yo = tl.dot(hm, lo.to(hm.dtype))
            y = tl.reshape(tl.join(ye, yo), (BLOCK_M, BLOCK_N))
        else:
            ok = r_ok[:, None] & n_ok[None, :]
            w = _decode(b_ptr, b_scale_ptr, rr[:, None] * N + rn[None, :], ok, N, B_BS, B_FORMAT)
            if DOT_F32:
                y = tl.dot(hm, w, input_precision="ieee")
            else:
                y = tl.dot(hm, w.to(hm.dtype))
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])
