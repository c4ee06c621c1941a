"""Batch-1 (GEMV) kernels of ``torch.ops.adaptwin.rank_linear`` for NF4 factors read as whole bytes, and
their launch planning for the h·B side (`rank_linear.plan` plans the x·Aᵀ side and calls `cols_launches`).

x·Aᵀ (`_gemv_nf4_rows_kernel`) reads A's rows, codes packed along K, split over K into float32 partial
rows; h·B (`_gemv_nf4_cols_kernel`) sums those as it loads h and reads B's rows, codes packed along N, each
byte giving two neighbouring outputs, split over byte columns and over K (float32 partial outputs, then
`_sum_rows_kernel`). Both prefetch their next tile's bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from adaptwin.kernels import capability, cdiv, interpreting, next_pow2, sm_count
from adaptwin.kernels.nf4 import gathered_scales, nf4_lane_table, nf4_lookup, nf4_lookup_bits, nf4_table, nf4_table3

try:  # programmatic dependent launch (sm_90+): in triton since 3.3
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None

# Batch-1 NF4 products are split (over K too) to about this many programs per multiprocessor: a memory-bound
# GEMV needs bytes in flight on every SM, and one program has one tile's loads outstanding at a time
GEMV_WAVES = 4
GEMV_MAX_SPLITS = 8  # x·Aᵀ's K splits at most: h·B sums that many float32 partial rows as it loads h


@triton.jit
def _group_tile(w_ptr, scale_ptr, r, r_ok, kb0, kb_hi, ROWBYTES, ROWLEN, BS: tl.constexpr, SCALE_ROW: tl.constexpr,
                GROUPS: tl.constexpr, BLOCK_B: tl.constexpr):
    """Whole bytes of NF4 factor rows ``r`` (1-D, mask ``r_ok``) from byte ``kb0`` on, as a (rows, GROUPS, BLOCK_B)
    tile (bytes at or past ``kb_hi`` masked), and their scales: with SCALE_ROW each group of BLOCK_B bytes
    lies in one scale block of its row, so one scale per row and group (shaped (rows, GROUPS, 1)),
    otherwise one per element. ROWLEN codes per row (ROWBYTES bytes)."""
    g0 = kb0 + tl.arange(0, GROUPS) * BLOCK_B  # first byte of each group
    c = g0[:, None] + tl.arange(0, BLOCK_B)[None, :]
    ok = r_ok[:, None, None] & (c < kb_hi)[None, :, :]
    byte = tl.load(w_ptr + r[:, None, None] * ROWBYTES + c[None, :, :], mask=ok, other=0)
    if SCALE_ROW:
        sc = tl.load(scale_ptr + r[:, None] * (ROWLEN // BS) + ((2 * g0) // BS)[None, :],
                     mask=r_ok[:, None] & (g0 < kb_hi)[None, :], other=0.0)[:, :, None]
    else:
        sc = gathered_scales(scale_ptr, r[:, None, None], c[None, :, :], ok, ROWLEN, BS)
    return byte, sc


@triton.jit
def _gemv_nf4_rows_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, N, K, ROWBYTES, SPLIT_BYTES,
                          BS: tl.constexpr, SCALE_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
                          PARTIAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
                          GATHER: tl.constexpr = False, GROUPS: tl.constexpr = 1, PDL: tl.constexpr = False):
    """One row x times Aᵀ, A (N, K) NF4 with its codes packed along K (K and BS even): each program reads
    BLOCK_N rows of A as whole bytes (both nibbles of a byte used, contiguous loads) over one K split of
    SPLIT_BYTES bytes, GROUPS x BLOCK_B bytes of each row per step. Bounds are in bytes, so the byte loads'
    masks stay contiguous and the loads vectorise. PARTIAL: float32 partial sums to out[split, n] (summed by
    the next product's kernel); otherwise the finished row, bias added, in out's dtype. SCALE_ROW: each
    group of BLOCK_B bytes lies in one scale block of every row (K % BS == 0, BS a multiple of 2·BLOCK_B):
    one scale per row and group, not per byte; several GROUPS make a step wider (more bytes in flight)
    without a scale per byte. GATHER: `nf4_lookup`'s (2, the GPU default: one lane shuffle per code; on sm_90
    with triton 3.6 the loop of a 16 x 4 x 32-byte step on 4 warps took 216 instructions, against 480 with
    Triton's gather, GATHER True; 0 / False, the select tree, for the interpreter). PDL (programmatic
    dependent launch, sm_90+): the first step's bytes of A are loaded, the next kernel is let launch, and
    only then does the program wait for the previous kernel (which may write x) before it reads x or
    writes anything."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    row_ok = rn < N
    kb_lo = split * SPLIT_BYTES
    kb_hi = tl.minimum(ROWBYTES, kb_lo + SPLIT_BYTES)
    acc = tl.zeros((BLOCK_N, GROUPS, BLOCK_B), tl.float32)
    if GATHER == 2:
        table = nf4_lane_table(tl.zeros((BLOCK_N, GROUPS, BLOCK_B), tl.int32))
    else:
        table = nf4_table3(BLOCK_N, GROUPS)
    # software prefetch: the next step's bytes and scales are loaded before this step is decoded, so that
    # two steps' loads are in flight (the decode depends on the bytes; Triton pipelines only dot operands)
    # byte kb holds elements 2·kb (high nibble) and 2·kb + 1
    byte, sc = _group_tile(w_ptr, scale_ptr, rn, row_ok, kb_lo, kb_hi, ROWBYTES, K, BS, SCALE_ROW, GROUPS, BLOCK_B)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    pair = tl.arange(0, 2)
    for kb0 in range(kb_lo, kb_hi, GROUPS * BLOCK_B):
        byte_next, sc_next = _group_tile(w_ptr, scale_ptr, rn, row_ok, kb0 + GROUPS * BLOCK_B, kb_hi, ROWBYTES, K,
                                         BS, SCALE_ROW, GROUPS, BLOCK_B)
        # x's even and odd elements as one contiguous (GROUPS, BLOCK_B, 2) load, split in registers: two
        # strided loads were 16 of the loop's 18 load instructions (one L1 wavefront each) on sm_90
        kb = kb0 + tl.arange(0, GROUPS)[:, None] * BLOCK_B + tl.arange(0, BLOCK_B)[None, :]
        x2 = tl.load(x_ptr + 2 * kb[:, :, None] + pair[None, None, :], mask=(kb < kb_hi)[:, :, None],
                     other=0.0).to(tl.float32)
        xe, xo = tl.split(x2)
        b32 = byte.to(tl.int32)
        hi, lo = nf4_lookup(b32 >> 4, table, GATHER, 2), nf4_lookup(b32 & 15, table, GATHER, 2)
        acc += (hi * xe[None, :, :] + lo * xo[None, :, :]) * sc
        byte, sc = byte_next, sc_next
    y = tl.sum(tl.sum(acc, 2), 1)
    if PARTIAL:
        tl.store(out_ptr + split * N + rn, y, mask=row_ok)
    else:
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rn, y.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _cols_book(ROWS: tl.constexpr, COLS: tl.constexpr, GATHER: tl.constexpr):
    """The code book for `nf4_lookup` on (ROWS, COLS) tiles: a lane's entry (GATHER 2) or the (ROWS, 16) table."""
    if GATHER == 2:
        table = nf4_lane_table(tl.zeros((ROWS, COLS), tl.int32))
    else:
        table = nf4_table(ROWS)
    return table


@triton.jit
def _cols_tile(w_ptr, scale_ptr, rk, k_hi, unit, unit_ok, ROW_UNITS, N, BS: tl.constexpr, SCALE_ROW: tl.constexpr,
               CODES: tl.constexpr, block):
    """Code units of B (k, N) packed along N, CODES codes each (bytes, 2; int32 words, 8: ``w_ptr`` typed to
    match), at rows ``rk`` (those below ``k_hi``) and unit columns ``unit`` (mask ``unit_ok``), and their
    scales: with SCALE_ROW one per row, of scale block ``block``, shaped (rows, 1); otherwise one per unit
    (a unit's codes share a block)."""
    ok = (rk < k_hi)[:, None] & unit_ok[None, :]
    units = tl.load(w_ptr + rk[:, None] * ROW_UNITS + unit[None, :], mask=ok, other=0)
    if SCALE_ROW:
        sc = tl.load(scale_ptr + rk * (N // BS) + block, mask=rk < k_hi, other=0.0)[:, None]
    else:
        sc = tl.load(scale_ptr + (rk[:, None] * N + CODES * unit[None, :]) // BS, mask=ok, other=0.0)
    return units, sc


@triton.jit
def _cols_start(w_ptr, scale_ptr, k_lo, k_hi, unit, unit_ok, ROW_UNITS, N, BS: tl.constexpr, SCALE_ROW: tl.constexpr,
                CODES: tl.constexpr, block, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """The first tile of a h·B program (`_cols_tile` at rows k_lo on), then with PDL the hand-over: the next
    kernel may launch, and this one waits for the previous kernel (which writes h) before going on."""
    units, sc = _cols_tile(w_ptr, scale_ptr, k_lo + tl.arange(0, BLOCK_K), k_hi, unit, unit_ok, ROW_UNITS, N, BS,
                           SCALE_ROW, CODES, block)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    return units, sc


@triton.jit
def _gemv_nf4_cols_kernel(h_ptr, SPLITS, w_ptr, scale_ptr, bias_ptr, out_ptr, N, K, ROWBYTES, K_SPLIT,
                          BS: tl.constexpr, SCALE_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
                          BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr, GATHER: tl.constexpr = False,
                          PDL: tl.constexpr = False, SPLITS_P2: tl.constexpr = 1):
    """One row h (the sum of SPLITS float32 partial rows, K wide) times B, B (K, N) NF4 with its codes
    packed along N (N and BS even): each program owns 2·BLOCK_B outputs, the two nibbles of BLOCK_B
    consecutive bytes of every row of B, and reduces over its K_SPLIT rows of B (a multiple of BLOCK_K).
    PARTIAL: float32 partial outputs to out[k split, n], summed by `_sum_rows_kernel`. SCALE_ROW: the
    program's columns lie in one scale block of every row (N % BS == 0, BS a multiple of 2·BLOCK_B).
    GATHER: as `_gemv_nf4_rows_kernel`'s (678 to 413 instructions per 64 x 32-byte tile; with 16-byte
    column tiles, d < 2048, triton 3.9 puts 8 bytes of it on the stack). PDL: as `_gemv_nf4_rows_kernel`'s,
    the wait coming after the first tile of B and before h is read."""
    jb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # byte column: outputs 2·jb and 2·jb + 1
    col_ok = jb < ROWBYTES
    k_lo = tl.program_id(1) * K_SPLIT
    k_hi = tl.minimum(K, k_lo + K_SPLIT)
    acc_e = tl.zeros((BLOCK_K, BLOCK_B), tl.float32)
    acc_o = tl.zeros((BLOCK_K, BLOCK_B), tl.float32)
    table = _cols_book(BLOCK_K, BLOCK_B, GATHER)
    # software prefetch of the next tile's bytes and scales, as in `_gemv_nf4_rows_kernel`
    block = (2 * tl.program_id(0) * BLOCK_B) // BS  # SCALE_ROW: the scale block of the program's columns
    byte, sc = _cols_start(w_ptr, scale_ptr, k_lo, k_hi, jb, col_ok, ROWBYTES, N, BS, SCALE_ROW, 2, block, BLOCK_K, PDL)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < k_hi
        byte_next, sc_next = _cols_tile(w_ptr, scale_ptr, rk + BLOCK_K, k_hi, jb, col_ok, ROWBYTES, N, BS, SCALE_ROW,
                                        2, block)
        # h's SPLITS partial rows (SPLITS_P2 >= SPLITS, a power of two) as one tile: all its loads in flight at
        # once (a loop over the rows waited for each load in turn: the h·B kernel took 7.4 against 3.4 us for
        # x·Aᵀ on an H100 at 4096², r 1024)
        s = tl.arange(0, SPLITS_P2)
        h = tl.sum(tl.load(h_ptr + s[:, None] * K + rk[None, :], mask=(s < SPLITS)[:, None] & k_ok[None, :],
                           other=0.0).to(tl.float32), 0)
        hs = sc * h[:, None]
        b32 = byte.to(tl.int32)
        acc_e += nf4_lookup(b32 >> 4, table, GATHER) * hs
        acc_o += nf4_lookup(b32 & 15, table, GATHER) * hs
        byte, sc = byte_next, sc_next
    ye = tl.sum(acc_e, 0)
    yo = tl.sum(acc_o, 0)
    if PARTIAL:
        base = out_ptr + tl.program_id(1) * N
        tl.store(base + 2 * jb, ye, mask=col_ok)
        tl.store(base + 2 * jb + 1, yo, mask=col_ok)
    else:
        if HAS_BIAS:
            ye += tl.load(bias_ptr + 2 * jb, mask=col_ok, other=0.0).to(tl.float32)
            yo += tl.load(bias_ptr + 2 * jb + 1, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + 2 * jb, ye.to(out_ptr.dtype.element_ty), mask=col_ok)
        tl.store(out_ptr + 2 * jb + 1, yo.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _word_fma(acc, word, SHIFT: tl.constexpr, table, hs, GATHER: tl.constexpr):
    """acc + (the code in bits SHIFT to SHIFT + 3 of ``word``)·hs: a shift and a lookup (`nf4_lookup_bits`)."""
    if SHIFT == 0:
        return acc + nf4_lookup_bits(word, table, GATHER) * hs
    return acc + nf4_lookup_bits(word >> SHIFT, table, GATHER) * hs


@triton.jit
def _store_cols(base, col, acc, ok, bias_ptr, HAS_BIAS: tl.constexpr):
    """acc's sum over its rows (+ bias) to ``base`` at columns ``col``, in the output's dtype."""
    y = tl.sum(acc, 0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + col, mask=ok, other=0.0).to(tl.float32)
    tl.store(base + col, y.to(base.dtype.element_ty), mask=ok)


@triton.jit
def _gemv_nf4_cols_words_kernel(h_ptr, SPLITS, w_ptr, scale_ptr, bias_ptr, out_ptr, N, K, ROWWORDS, K_SPLIT,
                                BS: tl.constexpr, SCALE_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
                                PARTIAL: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr,
                                GATHER: tl.constexpr = False, PDL: tl.constexpr = False,
                                SPLITS_P2: tl.constexpr = 1):
    """`_gemv_nf4_cols_kernel` reading B's codes as 32-bit words (config "cols": {"WORDS": True}; N % 8 == 0, BS
    % 8 == 0, B 4-byte aligned): each program owns 8·BLOCK_W outputs, the 8 codes of BLOCK_W consecutive words
    of every row of B, in 8 accumulators, one per code of a word. Byte i of a word (little-endian) holds
    output 8·w + 2i in bits 8i + 4 to 8i + 7 and 8·w + 2i + 1 in bits 8i to 8i + 3; with GATHER 2 each code
    costs a shift of the word and one lane shuffle (no byte extraction, no mask: `nf4_lookup_bits`). h's
    SPLITS partial rows are loaded one split at a time as rank vectors (unrolled, all loads in flight), which
    the tile uses as they are: no shared-memory round trip or barrier per step. On sm_90 (triton 3.6, default
    tiles and PDL) the loop takes 96 / 130 / 172 / 145 instructions per step at N = 1024 / 2048 / 4096 / 8192,
    against the byte kernel's 131 / 193 / 231 / 203 with 5 barriers a step. On an H100 (2026-11-26) it is
    slower: 14.9 us at 8192², r 2048, against 13.6 for the byte kernel (benchmarks/gpu_runs/2026-11-26-b)."""
    jw = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)  # word column: outputs 8·jw to 8·jw + 7
    col_ok = jw < ROWWORDS
    k_lo = tl.program_id(1) * K_SPLIT
    k_hi = tl.minimum(K, k_lo + K_SPLIT)
    w32 = w_ptr.to(tl.pointer_type(tl.int32))
    block = (8 * tl.program_id(0) * BLOCK_W) // BS  # SCALE_ROW: the scale block of the program's columns
    # (otherwise a scale per word: its 8 codes share a block, BS % 8 == 0 and N % 8 == 0)
    word, sc = _cols_start(w32, scale_ptr, k_lo, k_hi, jw, col_ok, ROWWORDS, N, BS, SCALE_ROW, 8, block, BLOCK_K, PDL)
    table = _cols_book(BLOCK_K, BLOCK_W, GATHER)
    acc0 = tl.zeros((BLOCK_K, BLOCK_W), tl.float32)
    acc1 = tl.zeros((BLOCK_K, BLOCK_W), tl.float32)
    acc2 = tl.zeros((BLOCK_K, BLOCK_W), tl.float32)
    acc3 = tl.zeros((BLOCK_K, BLOCK_W), tl.float32)
    acc4 = tl.zeros((BLOCK_K, BLOCK_W), tl.float32)
    acc5 = tl.zeros((BLOCK_K, BLOCK_W), tl.float32)
    acc6 = tl.zeros((BLOCK_K, BLOCK_W), tl.float32)
    acc7 = tl.zeros((BLOCK_K, BLOCK_W), tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < k_hi
        word_next, sc_next = _cols_tile(w32, scale_ptr, rk + BLOCK_K, k_hi, jw, col_ok, ROWWORDS, N, BS, SCALE_ROW,
                                        8, block)
        h = tl.load(h_ptr + rk, mask=k_ok, other=0.0).to(tl.float32)
        for s in tl.static_range(1, SPLITS_P2):
            s_ok = tl.full((BLOCK_K,), s, tl.int32) < SPLITS  # (a tensor: the interpreter takes no scalar mask)
            h += tl.load(h_ptr + s * K + rk, mask=k_ok & s_ok, other=0.0).to(tl.float32)
        hs = sc * h[:, None]
        acc0 = _word_fma(acc0, word, 4, table, hs, GATHER)
        acc1 = _word_fma(acc1, word, 0, table, hs, GATHER)
        acc2 = _word_fma(acc2, word, 12, table, hs, GATHER)
        acc3 = _word_fma(acc3, word, 8, table, hs, GATHER)
        acc4 = _word_fma(acc4, word, 20, table, hs, GATHER)
        acc5 = _word_fma(acc5, word, 16, table, hs, GATHER)
        acc6 = _word_fma(acc6, word, 28, table, hs, GATHER)
        acc7 = _word_fma(acc7, word, 24, table, hs, GATHER)
        word, sc = word_next, sc_next
    if PARTIAL:
        base = out_ptr + tl.program_id(1) * N
    else:
        base = out_ptr
    bias_here = HAS_BIAS and not PARTIAL
    col = 8 * jw
    _store_cols(base, col, acc0, col_ok, bias_ptr, bias_here)
    _store_cols(base, col + 1, acc1, col_ok, bias_ptr, bias_here)
    _store_cols(base, col + 2, acc2, col_ok, bias_ptr, bias_here)
    _store_cols(base, col + 3, acc3, col_ok, bias_ptr, bias_here)
    _store_cols(base, col + 4, acc4, col_ok, bias_ptr, bias_here)
    _store_cols(base, col + 5, acc5, col_ok, bias_ptr, bias_here)
    _store_cols(base, col + 6, acc6, col_ok, bias_ptr, bias_here)
    _store_cols(base, col + 7, acc7, col_ok, bias_ptr, bias_here)


@triton.jit
def _sum_rows_kernel(part_ptr, SPLITS, bias_ptr, out_ptr, N, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
                     PDL: tl.constexpr = False, SPLITS_P2: tl.constexpr = 1):
    """out[n] = sum over s of part[s, n] (+ bias[n]), in out's dtype: the K splits of `_gemv_nf4_cols_kernel`.
    PDL: launched early, it waits for that kernel before reading."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    rn = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rn < N
    s = tl.arange(0, SPLITS_P2)  # the SPLITS rows as one tile, all loads in flight (SPLITS_P2 >= SPLITS)
    y = tl.sum(tl.load(part_ptr + s[:, None] * N + rn[None, :], mask=(s < SPLITS)[:, None] & ok[None, :], other=0.0), 0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rn, y.to(out_ptr.dtype.element_ty), mask=ok)


Launch = tuple  # (kernel, grid, positional arguments, keyword arguments)


# Batch-1 h·B tiles on a GPU by N (the first entry whose bound N is within): the best of benchmarks.gpu_kernels
# --tune on an H100 (2026-11-26; with `rank_linear.GEMV_ROWS_TILES`). Up to N = 1024 one launch over all of K
# (WAVES 0: no K split, so no sum kernel); above, 64 rows of h by 32 bytes (64 codes, a scale block at
# blocksize 64) on 4 warps, K split to about WAVES programs per multiprocessor.
GEMV_COLS_TILES = ((1024, {"BLOCK_K": 128, "BLOCK_B": 16, "num_warps": 8, "WAVES": 0}),
                   (2048, {"BLOCK_K": 64, "BLOCK_B": 32, "num_warps": 4, "WAVES": 8}),
                   (None, {"BLOCK_K": 64, "BLOCK_B": 32, "num_warps": 4}))


def by_width(table, width: int) -> dict:
    """The tiles of the first (bound, tiles) entry of ``table`` with ``width`` <= bound (None: any width), copied."""
    return next(dict(tiles) for bound, tiles in table if bound is None or width <= bound)


def pdl_kwargs(device: torch.device, want: bool | None) -> dict:
    """The batch-1 GEMV kernels' launch keywords for programmatic dependent launch: each kernel loads its first
    tile of weights, lets the next kernel launch, then waits for the previous one (`_gemv_nf4_rows_kernel`),
    so a kernel's launch and its first weight loads overlap the kernel before it. On where the GPU has it
    (sm_90 and later, triton with `gdc_wait`, not the interpreter) unless ``want`` is False; True where it
    cannot be had is an error."""
    able = (gdc_wait is not None and device.type == "cuda" and not interpreting()
            and capability(device)[0] >= 9)
    if want and not able:
        raise ValueError("rank_linear config: pdl=True needs a GPU of compute capability 9.0 or later and a triton "
                         "with programmatic dependent launch (triton.language.extra.cuda.gdc_wait)")
    return {"PDL": True, "launch_pdl": True} if able and want is not False else {}


def cols_launches(h, splits, b, sc, blocksize, k, n, bias, out, code, tiles: dict, pdl: dict) -> list[Launch]:
    """h (1, k) as ``splits`` float32 partial rows, times B (k, n) NF4 packed along n: `_gemv_nf4_cols_kernel`
    over byte columns and, to reach about WAVES (default `GEMV_WAVES`) programs per multiprocessor, over
    splits of k too (float32 partial outputs, then `_sum_rows_kernel`). ``pdl``: `pdl_kwargs`."""
    dev = out.device
    if interpreting():
        t = {"BLOCK_K": 16, "BLOCK_B": 16}
    else:  # lane shuffles; tiles by N (`GEMV_COLS_TILES`)
        t = {"GATHER": 2, **by_width(GEMV_COLS_TILES, n)}
    t.update(tiles)
    waves = t.pop("WAVES", GEMV_WAVES)
    words = t.pop("WORDS", False)
    t.update(pdl)
    scale_row = n % blocksize == 0 and blocksize % (2 * t["BLOCK_B"]) == 0
    col_blocks = cdiv(n // 2, t["BLOCK_B"])
    kernel, row_units = _gemv_nf4_cols_kernel, n // 2
    if words:
        if n % 8 or blocksize % 8 or t["BLOCK_B"] % 4 or b.data_ptr() % 4:
            raise ValueError(f"rank_linear config: cols WORDS=True reads B's codes as 32-bit words and needs N and "
                             f"the blocksize to be multiples of 8, BLOCK_B of 4 and B 4-byte aligned; got N={n}, "
                             f"blocksize={blocksize}, BLOCK_B={t['BLOCK_B']}, B at byte {b.data_ptr() % 4} of 4")
        kernel, row_units = _gemv_nf4_cols_words_kernel, n // 8
        t["BLOCK_W"] = t.pop("BLOCK_B") // 4
    want = max(1, min(cdiv(waves * sm_count(dev), col_blocks), cdiv(k, 2 * t["BLOCK_K"])))
    k_split = cdiv(cdiv(k, want), t["BLOCK_K"]) * t["BLOCK_K"]
    k_splits = cdiv(k, k_split)
    has_bias = bias is not None
    bias_arg = bias if has_bias else code
    if k_splits == 1:
        return [(kernel, (col_blocks, 1), (h, splits, b, sc, bias_arg, out, n, k, row_units, k_split),
                 dict(BS=blocksize, SCALE_ROW=scale_row, HAS_BIAS=has_bias, PARTIAL=False, SPLITS_P2=next_pow2(splits),
                      **t))]
    part = torch.empty((k_splits, n), dtype=torch.float32, device=dev)
    sum_block = max(64, 4096 // next_pow2(k_splits))  # 4096 floats a program at most
    return [(kernel, (col_blocks, k_splits), (h, splits, b, sc, bias_arg, part, n, k, row_units, k_split),
             dict(BS=blocksize, SCALE_ROW=scale_row, HAS_BIAS=False, PARTIAL=True, SPLITS_P2=next_pow2(splits), **t)),
            (_sum_rows_kernel, (cdiv(n, sum_block),), (part, k_splits, bias_arg, out, n),
             dict(HAS_BIAS=has_bias, BLOCK=sum_block, SPLITS_P2=next_pow2(k_splits), **pdl))]
