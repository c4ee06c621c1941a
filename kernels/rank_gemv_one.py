"""The batch-1 NF4 rank-r linear in one launch (``rank_linear`` config ``gemv="one_launch"``): both products and the
output in `_gemv_nf4_one_launch_kernel`, for 1-8 rows of x, against the split plan of `rank_gemv` (x·Aᵀ, h·B and a
K-split sum). 2.5-4x slower than the split plan on an H100 at every size timed (atomics, and A read again per
column chunk), so off by default; kept as the measured alternative (benchmarks.gpu_kernels times it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from adaptwin.kernels import cdiv, next_pow2, sm_count
from adaptwin.kernels.nf4 import gathered_scales, nf4_lookup, nf4_table
from adaptwin.kernels.rank_gemv import Launch


@triton.jit
def _byte_tile(w_ptr, scale_ptr, r, r_ok, c, c0, c_end, ROWBYTES, ROWLEN, BS: tl.constexpr, SCALE_ROW: tl.constexpr):
    """Whole bytes of NF4 factor rows ``r`` (1-D, mask ``r_ok``) at byte columns ``c`` (1-D, the tile starting at
    byte ``c0``; columns at or past ``c_end`` masked), a (rows, columns) tile, and their scales: with
    SCALE_ROW the tile lies in one scale block of each row, so one scale per row (shaped (rows, 1)),
    otherwise one per element. ROWLEN codes per row (ROWBYTES bytes)."""
    ok = r_ok[:, None] & (c < c_end)[None, :]
    byte = tl.load(w_ptr + r[:, None] * ROWBYTES + c[None, :], mask=ok, other=0)
    if SCALE_ROW:
        sc = tl.load(scale_ptr + r * (ROWLEN // BS) + (2 * c0) // BS, mask=r_ok & (c0 + 0 * r < c_end),
                     other=0.0)[:, None]
    else:
        sc = gathered_scales(scale_ptr, r[:, None], c[None, :], ok, ROWLEN, BS)
    return byte, sc


@triton.jit
def _gemv_nf4_one_launch_kernel(x_ptr, a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, bias_ptr, acc_ptr, acc_bits_ptr,
                                count_ptr, out_ptr, M, R, K, N, CHUNK_BYTES, A_BS: tl.constexpr, B_BS: tl.constexpr,
                                A_SCALE_ROW: tl.constexpr, B_SCALE_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
                                ROWS: tl.constexpr, SLAB: tl.constexpr, BLOCK_B: tl.constexpr,
                                GATHER: tl.constexpr = False):
    """y = (x·Aᵀ)·B + bias for M <= ROWS rows of x (ROWS a power of two, at most 8: decoding, beam search,
    a batch of streams) in one launch: A (R, K) with its NF4 codes packed along K, B (R, N) packed along
    N, read as whole bytes, each byte decoded once for all M rows. Program (s, c) owns rank rows
    [s·SLAB, (s + 1)·SLAB) and byte columns [c·CHUNK_BYTES, (c + 1)·CHUNK_BYTES) of B: it computes its
    (M, SLAB) block of h over all of K (the programs of the other column chunks recompute it, reading A
    from L2), multiplies it by its rows of B over its columns and adds the float32 products into ``acc``
    (M x N floats, zero on entry) atomically. The last program of a column chunk to finish (a ticket per
    chunk in ``count``, zero on entry) takes the chunk's sums out of ``acc`` by atomic exchange (of their
    bits, ``acc_bits`` being the same memory as int32: the interpreter exchanges integers only), leaving
    the zeros the next call expects, adds the bias and writes y in out's dtype, then resets its ticket.
    Against the split plan (x·Aᵀ, h·B, a sum of K splits: three launches) it trades two launches for
    M·R·N float32 atomic adds and SLAB·K/2 bytes of A read again per extra chunk. A_SCALE_ROW /
    B_SCALE_ROW: every tile lies in one scale block of each row."""
    slab = tl.program_id(0)
    chunk = tl.program_id(1)
    rm = tl.arange(0, ROWS)
    m_ok = rm < M
    rr = slab * SLAB + tl.arange(0, SLAB)
    r_ok = rr < R
    table = nf4_table(SLAB)
    # h[:, rr] = x·A[rr, :]ᵀ: byte kb of a row holds elements 2·kb (high nibble) and 2·kb + 1 (low); the next
    # tile's bytes and scales are loaded before this one is decoded (software prefetch, as in the GEMVs)
    a_bytes = K // 2
    acc = tl.zeros((ROWS, SLAB, BLOCK_B), tl.float32)
    byte, sc = _byte_tile(a_ptr, a_scale_ptr, rr, r_ok, tl.arange(0, BLOCK_B), 0, a_bytes, a_bytes, K, A_BS,
                          A_SCALE_ROW)
    pair = tl.arange(0, 2)
    for kb0 in range(0, a_bytes, BLOCK_B):
        kb = kb0 + tl.arange(0, BLOCK_B)
        k_ok = kb < a_bytes
        byte_next, sc_next = _byte_tile(a_ptr, a_scale_ptr, rr, r_ok, kb + BLOCK_B, kb0 + BLOCK_B, a_bytes, a_bytes, K,
                                        A_BS, A_SCALE_ROW)
        # the M rows' even and odd elements: one contiguous (ROWS, BLOCK_B, 2) load, split in registers
        x2 = tl.load(x_ptr + rm[:, None, None] * K + 2 * kb[None, :, None] + pair[None, None, :],
                     mask=m_ok[:, None, None] & k_ok[None, :, None], other=0.0).to(tl.float32)
        xe, xo = tl.split(x2)  # (ROWS, BLOCK_B) each
        b32 = byte.to(tl.int32)
        hi = nf4_lookup(b32 >> 4, table, GATHER) * sc
        lo = nf4_lookup(b32 & 15, table, GATHER) * sc
        acc += hi[None, :, :] * xe[:, None, :] + lo[None, :, :] * xo[:, None, :]
        byte, sc = byte_next, sc_next
    h = tl.sum(acc, 2)  # (ROWS, SLAB), 0 for rank rows past R and rows past M
    # this program's share of y = h·B over its column chunk, added into acc (prefetched the same way)
    b_bytes = N // 2
    jb_lo = chunk * CHUNK_BYTES
    jb_hi = tl.minimum(b_bytes, jb_lo + CHUNK_BYTES)
    byte, sc = _byte_tile(b_ptr, b_scale_ptr, rr, r_ok, jb_lo + tl.arange(0, BLOCK_B), jb_lo, jb_hi, b_bytes, N, B_BS,
                          B_SCALE_ROW)
    for jb0 in range(jb_lo, jb_hi, BLOCK_B):
        jb = jb0 + tl.arange(0, BLOCK_B)
        c_ok = jb < jb_hi
        byte_next, sc_next = _byte_tile(b_ptr, b_scale_ptr, rr, r_ok, jb + BLOCK_B, jb0 + BLOCK_B, jb_hi, b_bytes, N,
                                        B_BS, B_SCALE_ROW)
        b32 = byte.to(tl.int32)
        hi = nf4_lookup(b32 >> 4, table, GATHER) * sc  # (SLAB, BLOCK_B)
        lo = nf4_lookup(b32 & 15, table, GATHER) * sc
        ye = tl.sum(h[:, :, None] * hi[None, :, :], 1)  # (ROWS, BLOCK_B)
        yo = tl.sum(h[:, :, None] * lo[None, :, :], 1)
        at = rm[:, None] * N + 2 * jb[None, :]
        out_ok = m_ok[:, None] & c_ok[None, :]
        tl.atomic_add(acc_ptr + at, ye, mask=out_ok, sem="relaxed")
        tl.atomic_add(acc_ptr + at + 1, yo, mask=out_ok, sem="relaxed")
        byte, sc = byte_next, sc_next
    # every thread's adds, then the ticket (bar.sync, then a gpu-scope acq_rel atomic: the release covers
    # what the barrier ordered before it, and the last program's acquire sees all of it)
    tl.debug_barrier()
    ticket = tl.atomic_add(count_ptr + chunk, 1, sem="acq_rel")
    if ticket == tl.num_programs(0) - 1:
        for jb0 in range(jb_lo, jb_hi, BLOCK_B):
            jb = jb0 + tl.arange(0, BLOCK_B)
            c_ok = jb < jb_hi
            at = rm[:, None] * N + 2 * jb[None, :]
            out_ok = m_ok[:, None] & c_ok[None, :]
            zero = tl.zeros((ROWS, BLOCK_B), tl.int32)
            ye = tl.atomic_xchg(acc_bits_ptr + at, zero, mask=out_ok, sem="acquire").to(tl.float32, bitcast=True)
            yo = tl.atomic_xchg(acc_bits_ptr + at + 1, zero, mask=out_ok, sem="acquire").to(tl.float32, bitcast=True)
            if HAS_BIAS:
                ye += tl.load(bias_ptr + 2 * jb, mask=c_ok, other=0.0).to(tl.float32)[None, :]
                yo += tl.load(bias_ptr + 2 * jb + 1, mask=c_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + at, ye.to(out_ptr.dtype.element_ty), mask=out_ok)
            tl.store(out_ptr + at + 1, yo.to(out_ptr.dtype.element_ty), mask=out_ok)
        tl.atomic_xchg(count_ptr + chunk, 0, sem="relaxed")  # no other program touches it in this call


# The one-launch GEMV's zero-filled workspaces (float32 sums, int32 tickets), one per (device, stream): each
# call leaves them zero again. Calls on one stream run in order; concurrent calls on two streams get
# two workspaces. (Two CUDA graphs captured on one stream and replayed concurrently on two would share
# one: capture them on separate streams.)
_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, n: int, chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    acc, count = _WORKSPACES.get(key, (None, None))
    if acc is None or acc.numel() < n or count.numel() < chunks:
        size = max(n, 0 if acc is None else acc.numel())
        acc = torch.zeros(size, dtype=torch.float32, device=device)
        count = torch.zeros(max(chunks, 0 if count is None else count.numel()), dtype=torch.int32, device=device)
        _WORKSPACES[key] = (acc, count)
    return acc, count


ONE_LAUNCH_MAX_ROWS = 8  # rows of x the one-launch GEMV takes (its ROWS: 1, 2, 4 or 8)


def one_launch(x, a, sa, a_blocksize, b, sb, b_blocksize, r, k, n, bias, out, code, tiles: dict) -> list[Launch]:
    """The single launch of `_gemv_nf4_one_launch_kernel` for x (M, k), M <= `ONE_LAUNCH_MAX_ROWS`, A (r, k)
    and B (r, n) NF4 (whole bytes along k and n). Tiles: SLAB rank rows per program, BLOCK_B bytes per
    tile, CHUNKS column chunks (default: as many as bring the grid to one program per multiprocessor, at
    most 4, each at least one tile wide), num_warps, GATHER."""
    m = x.shape[0]
    # 32 bytes: 64 codes, one scale block at the usual blocksize 64 (a scale per row and tile); the
    # interpreter's cost is per program, so few there
    t = {"SLAB": 16, "BLOCK_B": 32}
    t.update(tiles)
    chunks = t.pop("CHUNKS", None)
    slab, block_b = t["SLAB"], t["BLOCK_B"]
    slabs, col_tiles = cdiv(r, slab), cdiv(n // 2, block_b)
    if chunks is None:
        chunks = max(1, min(4, col_tiles, cdiv(sm_count(out.device), slabs)))
    chunk_bytes = cdiv(col_tiles, chunks) * block_b
    chunks = cdiv(n // 2, chunk_bytes)
    acc, count = _workspace(out.device, m * n, chunks)
    return [(_gemv_nf4_one_launch_kernel, (slabs, chunks),
             (x, a, sa, b, sb, bias if bias is not None else code, acc, acc.view(torch.int32), count, out, m, r, k,
              n, chunk_bytes),
             dict(ROWS=next_pow2(m), A_BS=a_blocksize, B_BS=b_blocksize,
                  A_SCALE_ROW=k % a_blocksize == 0 and a_blocksize % (2 * block_b) == 0,
                  B_SCALE_ROW=n % b_blocksize == 0 and b_blocksize % (2 * block_b) == 0,
                  HAS_BIAS=bias is not None, **t))]
