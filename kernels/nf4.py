"""NF4 decoding inside Triton kernels: whole bytes (two codes each), code values without a memory read, and
their block scales. Shared by the rank-r linear kernels (`rank_linear`, `rank_gemv`); the code book and the
packing (high nibble first, flat blocks of BS codes with one float scale) are `adaptwin.quant.nf4`'s."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def nf4_value(nib):
    """The NF4 code book's value for 4-bit codes ``nib`` (int32), by a tree of 15 selects on the code's bits:
    arithmetic only. Reading the book from memory (a gather per element) kept Hopper's L1 91% busy and
    the tensor cores idle (ncu, 1500 x 384 x 1536 at rank 64). The constants are `adaptwin.quant.nf4.NF4_CODE`
    in float32, which the references decode with (every NF4 case of the kernel tests compares against them)."""
    b = (nib & 1) != 0
    v0 = tl.where(b, -0.6961928009986877, -1.0)
    v1 = tl.where(b, -0.39491748809814453, -0.5250730514526367)
    v2 = tl.where(b, -0.18477343022823334, -0.28444138169288635)
    v3 = tl.where(b, 0.0, -0.09105003625154495)
    v4 = tl.where(b, 0.16093020141124725, 0.07958029955625534)
    v5 = tl.where(b, 0.33791524171829224, 0.24611230194568634)
    v6 = tl.where(b, 0.5626170039176941, 0.44070982933044434)
    v7 = tl.where(b, 1.0, 0.7229568362236023)
    b = (nib & 2) != 0
    w0 = tl.where(b, v1, v0)
    w1 = tl.where(b, v3, v2)
    w2 = tl.where(b, v5, v4)
    w3 = tl.where(b, v7, v6)
    b = (nib & 4) != 0
    u0 = tl.where(b, w1, w0)
    u1 = tl.where(b, w3, w2)
    return tl.where((nib & 8) != 0, u1, u0)


@triton.jit
def nf4_table(ROWS: tl.constexpr):
    """The code book as a (ROWS, 16) register tensor, every row the 16 values (from `nf4_value`, no memory
    read): the source of `nf4_lookup`'s gathers, built once per program, outside its loops."""
    return nf4_value(tl.arange(0, 16))[None, :] + tl.zeros((ROWS, 16), tl.float32)


@triton.jit
def nf4_table3(ROWS: tl.constexpr, GROUPS: tl.constexpr):
    """`nf4_table` for codes in (ROWS, GROUPS, C) tiles: a (ROWS, GROUPS, 16) register tensor."""
    return nf4_value(tl.arange(0, 16))[None, None, :] + tl.zeros((ROWS, GROUPS, 16), tl.float32)


@triton.jit
def nf4_lane_table(like):
    """For `nf4_lookup`'s lane shuffles (GATHER 2): the code book entry (lane id mod 16) this thread holds for
    the other lanes of its warp to read, shaped like ``like`` (an int32 tile; every element of a thread has
    the same value, so the compiler keeps one register). CUDA only (inline PTX)."""
    lane = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [like], dtype=tl.int32, is_pure=True, pack=1)
    return nf4_value(lane & 15)


@triton.jit
def nf4_lookup(nib, table, GATHER: tl.constexpr, AXIS: tl.constexpr = 1):
    """Code values of 4-bit codes ``nib`` (ROWS, C), or (ROWS, GROUPS, C) with AXIS 2. GATHER 1 (True): a gather
    along the last axis of ``table`` (`nf4_table`, `nf4_table3`), which Triton lowers to warp shuffles plus
    index arithmetic (on sm_90 with triton 3.6: 2 shuffles, a select and about 8 integer instructions per
    code). GATHER 2: one ``shfl.sync.idx`` per code, lane ``nib`` of the warp holding entry ``nib`` of the
    book (``table`` from `nf4_lane_table`); CUDA only, every lane of the warp taking part (Triton's
    elementwise code has no divergence). Otherwise (0, False) `nf4_value`'s 15 selects."""
    if GATHER == 2:
        return tl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 31, -1;", "=f,f,r", [table, nib],
                                         dtype=tl.float32, is_pure=True, pack=1)
    elif GATHER:
        return tl.gather(table, nib, AXIS)
    else:
        return nf4_value(nib)


@triton.jit
def nf4_lookup_bits(bits, table, GATHER: tl.constexpr):
    """Code values of the 4-bit codes in bits 0-3 of ``bits`` (int32, any higher bits: a code word shifted so
    that the code lies lowest), as `nf4_lookup` (2-D ``table`` for GATHER 1). GATHER 2 passes ``bits`` to the
    lane shuffle as they are: the shuffle reads lane bits 0-4 only, and lanes 16-31 hold the book again
    (`nf4_lane_table`), so no mask is needed; otherwise the code is masked first."""
    if GATHER == 2:
        return nf4_lookup(bits, table, 2)
    return nf4_lookup(bits & 15, table, GATHER)


@triton.jit
def nf4_bytes(w_ptr, r, c, ok, ROWLEN):
    """Whole bytes of an NF4 factor with rows of ROWLEN codes (even): byte column ``c`` of factor row ``r``
    (broadcast index tensors) -> (high, low) code values, unscaled: the factor's elements (r, 2c) and
    (r, 2c + 1), which share a scale block (blocks are even)."""
    byte = tl.load(w_ptr + r * (ROWLEN // 2) + c, mask=ok, other=0).to(tl.int32)
    return nf4_value(byte >> 4), nf4_value(byte & 15)


@triton.jit
def gathered_scales(scale_ptr, r, c, ok, ROWLEN, BS: tl.constexpr):
    """Scales of byte column ``c`` of factor row ``r``, one load per element: tiles that cross scale blocks."""
    return tl.load(scale_ptr + (r * ROWLEN + 2 * c) // BS, mask=ok, other=0.0)


@triton.jit
def nf4_tile(w_ptr, scale_ptr, r, r_ok, c, c_ok, start, ROWLEN, BS: tl.constexpr, SCALE_ROW: tl.constexpr,
              ROWS_LAST: tl.constexpr):
    """Scaled (high, low) values of whole bytes: factor rows ``r`` by byte columns ``c`` (1-D), a tile shaped
    (c, r) when ROWS_LAST (a tile of Aᵀ, codes along K) and (r, c) otherwise (of B, codes along N).
    SCALE_ROW: the tile lies in one scale block of each row, the one holding code ``start`` of the row, so
    its scales are one vector load; otherwise one load per element."""
    if ROWS_LAST:
        rr = r[None, :]
        cc = c[:, None]
        ok = c_ok[:, None] & r_ok[None, :]
    else:
        rr = r[:, None]
        cc = c[None, :]
        ok = r_ok[:, None] & c_ok[None, :]
    hi, lo = nf4_bytes(w_ptr, rr, cc, ok, ROWLEN)
    if SCALE_ROW:
        vec = tl.load(scale_ptr + r * (ROWLEN // BS) + start // BS, mask=r_ok, other=0.0)
        if ROWS_LAST:
            sc = vec[None, :]
        else:
            sc = vec[:, None]
    else:
        sc = gathered_scales(scale_ptr, rr, cc, ok, ROWLEN, BS)
    return hi * sc, lo * sc
