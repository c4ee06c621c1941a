"""The rank_linear Triton kernels (kernels/rank_linear.py, rank_gemv.py, rank_gemv_one.py) against the reference,
on CPU under TRITON_INTERPRET=1, in float32: every plan (decode once, tiles, fused, the GEMVs) and its launch
planning. These cases run in the interpreter child that test_kernels_triton.py starts (with that module's
attention cases); in a plain process they skip.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from adaptwin.ops.rank_linear import rank_linear_reference

sys.path.insert(0, os.path.dirname(__file__))
from test_kernels_cpu import NONE, _factor, assert_within_twice, seed  # noqa: E402

needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="runs in the TRITON_INTERPRET=1 child of test_kernels_triton.py")


LINEAR_CASES = [
    (1, 384, 20, 431, "nf4", 64),
    (1, 431, 37, 384, "int8", 0),
    (5, 431, 13, 384, "nf4", 6),
    (17, 384, 52, 431, "int8", 64),
    (3, 100, 9, 61, "fp", 0),
    # one row, NF4 read as whole bytes: x·Aᵀ split over K into partial rows that h·B sums as it loads h
    (1, 384, 20, 432, "nf4", 64),
    (1, 1030, 37, 98, "nf4", 6),
    (1, 386, 9, 62, "nf4", 2),
    (1, 431, 1, 384, "fp", 0),  # rank 1
    (2, 384, 64, 431, "nf4", 64),  # rank 64, two rows
    (1, 384, 64, 384, "int8", 0),
    # several rows: factors decoded once, then cuBLAS (or the one-launch kernel); with decode "tiles", ranks up
    # to 64 take the one-launch kernel decoding in its tiles (h kept in registers), above, two launches
    (59, 431, 40, 384, "int8", 0),
    (70, 96, 1, 150, "nf4", 64),  # the output columns split over two programs per row block
    (33, 384, 20, 431, "fp", 0),
    (4, 384, 80, 431, "nf4", 64),  # rank 80: two launches
    # NF4 read as whole bytes by the tiled kernels: codes along K for x·Aᵀ, along N for h·B
    (40, 384, 20, 512, "nf4", 64),  # one launch, both factors, a scale vector per tile
    (40, 384, 20, 432, "nf4", 64),  # B's tiles cross scale blocks: scales per element
    (6, 384, 80, 512, "nf4", 64),  # two launches, both factors, a scale vector per tile
    (6, 386, 80, 432, "nf4", 2),  # two launches, two-code scale blocks: scales per element
    (1, 384, 96, 512, "nf4", 64),  # one row: h·B split over K too, then summed
    (1, 384, 96, 432, "nf4", 64),  # the same, B's byte columns crossing scale blocks
]
DECODE_MODES = ("once", "tiles")


@needs_interpreter
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: "M{}-{}x{}x{}-{}{}".format(*c))
def test_triton_rank_linear(tk, case):
    rows, n_in, rank, n_out, fmt, bs = case
    gen = torch.Generator().manual_seed(seed(case))
    a = torch.randn(rank, n_in, generator=gen) / n_in**0.5
    b = torch.randn(rank, n_out, generator=gen) / rank**0.5
    bias = torch.randn(n_out, generator=gen)
    x = torch.randn(rows, n_in, generator=gen)
    fa, fb = _factor(fmt, bs, a), _factor(fmt, bs, b)
    ref64 = rank_linear_reference(x.double(), *fa, *fb, bias.double())
    ref = rank_linear_reference(x, *fa, *fb, bias)
    configs = [{"decode": d} for d in (DECODE_MODES if rows > 1 else DECODE_MODES[:1])]  # one row: one plan
    if rows <= 8 and fmt == "nf4":  # both products and the output in one launch, each byte decoded once
        configs.append({"gemv": "one_launch"})
    if rows == 1 and fmt == "nf4":  # the whole-byte GEMVs with code values gathered from a register table,
        configs.append({"rows": {"GATHER": True}, "cols": {"GATHER": True}})  # and with x·Aᵀ split further
        configs.append({"rows": {"WAVES": 16, "MAX_SPLITS": 32}})
        # wider x·Aᵀ steps (several scale groups each, the last step partly masked), h·B not split over K
        configs.append({"rows": {"GROUPS": 4, "BLOCK_B": 32}, "cols": {"WAVES": 0}})
        configs.append({"rows": {"GROUPS": 2, "BLOCK_B": 8, "BLOCK_N": 8}})
        if n_out % 8 == 0 and bs % 8 == 0:  # h·B reading B as 32-bit words, 8 codes each
            configs += [{"cols": {"WORDS": True}}, {"cols": {"WORDS": True, "GATHER": True, "WAVES": 0}}]
            if rank <= 32:  # small tiles: several K steps and a partial last one (20 = 8 + 8 + 4); at rank 96
                # the interpreter took 25 s over this one plan's 384 programs
                configs.append({"cols": {"WORDS": True, "BLOCK_B": 4, "BLOCK_K": 8}})
    for config in configs:
        out = tk["rank_linear"].rank_linear(x, *fa, *fb, bias, config=config)
        assert_within_twice(out, ref, ref64)


@needs_interpreter
@pytest.mark.parametrize("fmt,bs", [("nf4", 64), ("int8", 0), ("int8", 64), ("fp", 0)])
def test_triton_rank_linear_decodes_once_for_several_rows(tk, fmt, bs):
    """Several rows: each quantised factor decoded once (`_dequant_kernel`), then cuBLAS where the one-launch
    kernel would have few programs and that kernel on the decoded factors where it has many (or ``fuse``
    True); ``fuse`` False always takes cuBLAS. Each plan agrees with the reference; one-factor calls too."""
    from adaptwin.kernels.rank_linear import _code_on, plan

    gen = torch.Generator().manual_seed(13)
    code = _code_on(torch.device("cpu"))
    decodes = [] if fmt == "fp" else ["_dequant_kernel", "_dequant_kernel"]

    def names(x, fa, fb, config=None):
        return [k.fn.__name__ for k, *_ in plan(x, *fa, *fb, None, code, config)[1]]

    big_a, big_b = (_factor(fmt, bs, torch.randn(64, n, generator=gen)) for n in (384, 1536))
    assert names(torch.empty(1500, 384), big_a, big_b) == [*decodes, "_fused_kernel"]  # 47 x 5 programs
    assert names(torch.empty(1500, 384), big_a, big_b, {"fuse": False}) == [*decodes, "_cublas_products"]
    rows, n_in, rank, n_out = 40, 96, 20, 200
    fa = _factor(fmt, bs, torch.randn(rank, n_in, generator=gen) / n_in**0.5)
    fb = _factor(fmt, bs, torch.randn(rank, n_out, generator=gen) / rank**0.5)
    x, bias = torch.randn(rows, n_in, generator=gen), torch.randn(n_out, generator=gen)
    assert names(x, fa, fb) == [*decodes, "_cublas_products"]  # 2 x 3 programs: too few
    assert names(x, fa, fb, {"fuse": True}) == [*decodes, "_fused_kernel"]
    ref64 = rank_linear_reference(x.double(), *fa, *fb, bias.double())
    ref = rank_linear_reference(x, *fa, *fb, bias)
    for config in ({}, {"fuse": True}, {"fuse": False}):
        assert_within_twice(tk["rank_linear"].rank_linear(x, *fa, *fb, bias, config=config), ref, ref64)
    only_b = _factor(fmt, bs, torch.randn(n_in, n_out, generator=gen))
    for factors, width in (((*fa, *NONE), rank), ((*NONE, *only_b), n_out)):
        ref64 = rank_linear_reference(x.double(), *factors, bias[:width].double())
        out = tk["rank_linear"].rank_linear(x, *factors, bias[:width])
        assert_within_twice(out, rank_linear_reference(x, *factors, bias[:width]), ref64)


@needs_interpreter
@pytest.mark.parametrize("fmt,bs", [("nf4", 64), ("int8", 64), ("fp", 0)])
def test_triton_rank_linear_fused_plan(tk, fmt, bs):
    """Several rows decoded in the tiles (``decode: tiles``) with a rank of at most FUSED_MAX_RANK: one launch,
    whose column split (when the row blocks are few) tiles N exactly; the same call planned as two launches
    (``fuse: False``) agrees with it."""
    from adaptwin.kernels.rank_linear import FUSED_MAX_RANK, _code_on, plan

    gen = torch.Generator().manual_seed(11)
    rows, n_in, n_out = 40, 96, 200
    for rank in (FUSED_MAX_RANK, FUSED_MAX_RANK + 1):
        fa = _factor(fmt, bs, torch.randn(rank, n_in, generator=gen) / n_in**0.5)
        fb = _factor(fmt, bs, torch.randn(rank, n_out, generator=gen) / rank**0.5)
        x, bias = torch.randn(rows, n_in, generator=gen), torch.randn(n_out, generator=gen)
        _, launches = plan(x, *fa, *fb, bias, _code_on(x.device), {"decode": "tiles"})
        names = [k.fn.__name__ for k, *_ in launches]
        if rank > FUSED_MAX_RANK:
            assert names == ["_gemm_kernel", "_gemm_kernel"]
            continue
        assert names == ["_fused_kernel"]
        grid, args = launches[0][1], launches[0][2]
        span = args[-1]
        assert grid[1] == 3 and span % 32 == 0 and (grid[1] - 1) * span < n_out <= grid[1] * span  # 1 + 200 // 96
        ref64 = rank_linear_reference(x.double(), *fa, *fb, bias.double())
        ref = rank_linear_reference(x, *fa, *fb, bias)
        fused = tk["rank_linear"].rank_linear(x, *fa, *fb, bias, config={"decode": "tiles"})
        two = tk["rank_linear"].rank_linear(x, *fa, *fb, bias, config={"decode": "tiles", "fuse": False})
        assert_within_twice(fused, ref, ref64)
        assert_within_twice(two, ref, ref64)


@needs_interpreter
@pytest.mark.parametrize("which", ["first", "second"])
@pytest.mark.parametrize("rows", [1, 4])
def test_triton_rank_linear_one_factor(tk, rows, which):
    """Only A (y = x·Aᵀ + bias) or only B (y = x·B + bias): one product, which writes the output itself."""
    gen = torch.Generator().manual_seed(7 if which == "first" else 8)
    k, n = (11, 96) if which == "first" else (24, 130)
    factor = _factor("nf4", 64, torch.randn(k, n, generator=gen))
    x = torch.randn(rows, n if which == "first" else k, generator=gen)
    bias = torch.randn(k if which == "first" else n, generator=gen)
    factors = (*factor, *NONE) if which == "first" else (*NONE, *factor)
    ref64 = rank_linear_reference(x.double(), *factors, bias.double())
    args = (x, *factors, bias)
    assert_within_twice(tk["rank_linear"].rank_linear(*args), rank_linear_reference(*args), ref64)


@needs_interpreter
@pytest.mark.parametrize("tiles", [{}, {"CHUNKS": 3}, {"SLAB": 8, "BLOCK_B": 16, "GATHER": True}])
def test_triton_rank_linear_one_launch_gemv(tk, tiles):
    """``gemv: one_launch``: 1-8 rows, both factors NF4, one launch (h per slab of rank rows, its products with
    B added into a float32 workspace, the last program of each column chunk writing the output). Ranks
    that are not a multiple of the slab, column chunks of unequal length, B's tiles crossing scale
    blocks (432 columns) and no bias; the workspace and tickets are zero again after every call, so a
    second call gives the same result."""
    from adaptwin.kernels import rank_gemv_one
    from adaptwin.kernels.rank_linear import _code_on, plan

    gen = torch.Generator().manual_seed(31)
    config = {"gemv": "one_launch", "one_launch": tiles}
    for rows, rank, n_out, with_bias in ((1, 37, 512, True), (3, 20, 432, False), (8, 1, 64, True)):
        fa = _factor("nf4", 64, torch.randn(rank, 384, generator=gen) / 384**0.5)
        fb = _factor("nf4", 64, torch.randn(rank, n_out, generator=gen) / rank**0.5)
        x = torch.randn(rows, 384, generator=gen)
        bias = torch.randn(n_out, generator=gen) if with_bias else None
        _, launches = plan(x, *fa, *fb, bias, _code_on(x.device), config)
        assert [k.fn.__name__ for k, *_ in launches] == ["_gemv_nf4_one_launch_kernel"]
        if "CHUNKS" in tiles:
            assert launches[0][1][1] == min(tiles["CHUNKS"], n_out // 2 // launches[0][3]["BLOCK_B"] or 1)
        ref64 = rank_linear_reference(x.double(), *fa, *fb, None if bias is None else bias.double())
        ref = rank_linear_reference(x, *fa, *fb, bias)
        first = tk["rank_linear"].rank_linear(x, *fa, *fb, bias, config=config)
        assert_within_twice(first, ref, ref64)
        for acc, count in rank_gemv_one._WORKSPACES.values():
            assert not acc.any() and not count.any()
        assert torch.equal(tk["rank_linear"].rank_linear(x, *fa, *fb, bias, config=config), first)


@needs_interpreter
def test_triton_rank_linear_plans_whole_byte_kernels(tk):
    """One NF4 row with even widths takes the byte kernels and splits x·Aᵀ over K; odd widths do not."""
    from adaptwin.kernels.rank_linear import _code_on, plan

    gen = torch.Generator().manual_seed(9)
    fa, fb = (_factor("nf4", 64, torch.randn(20, n, generator=gen)) for n in (384, 432))
    _, launches = plan(torch.randn(1, 384), *fa, *fb, None, _code_on(torch.device("cpu")))
    names = [k.fn.__name__ for k, *_ in launches]
    assert names == ["_gemv_nf4_rows_kernel", "_gemv_nf4_cols_kernel"]
    assert launches[0][1][1] > 1 and launches[0][3]["PARTIAL"]
    fb = _factor("nf4", 64, torch.randn(20, 431, generator=gen))
    _, launches = plan(torch.randn(1, 384), *fa, *fb, None, _code_on(torch.device("cpu")))
    assert launches[0][1][1] == 1 and not launches[0][3]["PARTIAL"]
    assert launches[1][0].fn.__name__ == "_gemv_kernel"


@needs_interpreter
def test_triton_rank_linear_plans_word_columns(tk):
    """``cols: {"WORDS": True}`` plans h·B over 32-bit words of B (BLOCK_B / 4 words a program, N / 8 words a
    row); a width, blocksize or tile it cannot take is an error naming them."""
    from adaptwin.kernels.rank_linear import _code_on, plan

    gen = torch.Generator().manual_seed(21)
    code = _code_on(torch.device("cpu"))
    fa, fb = (_factor("nf4", 64, torch.randn(96, n, generator=gen)) for n in (384, 512))
    _, launches = plan(torch.randn(1, 384), *fa, *fb, None, code, {"cols": {"WORDS": True}})
    kernel, grid, args, kw = launches[1]
    assert kernel.fn.__name__ == "_gemv_nf4_cols_words_kernel" and "BLOCK_B" not in kw
    assert kw["BLOCK_W"] == 4 and args[8] == 512 // 8 and grid[0] == 512 // 32
    for n, bs, tiles in ((436, 64, {}), (512, 4, {}), (512, 64, {"BLOCK_B": 6})):
        fb = _factor("nf4", bs, torch.randn(96, n, generator=gen))
        with pytest.raises(ValueError, match=f"multiples of 8.*N={n}, blocksize={bs}"):
            plan(torch.randn(1, 384), *fa, *fb, None, code, {"cols": {"WORDS": True, **tiles}})


@needs_interpreter
def test_triton_rank_linear_plans_whole_byte_tiles(tk):
    """NF4 factors with even packed widths are read as whole bytes by the tiled kernels (A_PACKED / B_PACKED,
    PACK 1 / 2), an odd width falls back to elementwise decoding; one row at rank 96 splits h·B over K
    into float32 partial outputs that `_sum_rows_kernel` adds up."""
    from adaptwin.kernels.rank_linear import _code_on, plan

    gen = torch.Generator().manual_seed(5)
    code = _code_on(torch.device("cpu"))
    fa, fb = (_factor("nf4", 64, torch.randn(20, n, generator=gen)) for n in (384, 431))
    tiles = {"decode": "tiles"}
    (_, [(kernel, _, _, kw)]) = plan(torch.randn(40, 384), *fa, *fb, None, code, tiles)
    assert kernel.fn.__name__ == "_fused_kernel" and kw["A_PACKED"] and not kw["B_PACKED"]
    fa, fb = (_factor("nf4", 64, torch.randn(80, n, generator=gen)) for n in (384, 432))
    _, launches = plan(torch.randn(6, 384), *fa, *fb, None, code, tiles)
    assert [kw["PACK"] for *_, kw in launches] == [1, 2]
    fa, fb = (_factor("nf4", 64, torch.randn(96, n, generator=gen)) for n in (384, 432))
    _, launches = plan(torch.randn(1, 384), *fa, *fb, None, code)
    names = [k.fn.__name__ for k, *_ in launches]
    assert names == ["_gemv_nf4_rows_kernel", "_gemv_nf4_cols_kernel", "_sum_rows_kernel"]
    assert launches[1][1][1] > 1 and launches[1][3]["PARTIAL"]
