"""The rank_linear Triton kernels compile for an H100 (sm_90) here, with no GPU: every launch variant of
the batched and GEMV paths, ahead of time (how: tests/sm90_tools.py; the attention kernel's twin is
test_kernels_sm90.py). On each cubin: no register spills, shared memory within the H100's, tensor cores
for 16-bit dots only; for the GEMVs also the instruction shapes their speed depends on (SASS).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("compiles for a GPU; not under the interpreter", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ (its tuning sweeps) sits beside the package

from sm90_tools import DTYPES, check, compile_sm90, resources, sass_loops  # noqa: E402

# ----------------------------------------------------------------------------------------- rank_linear
LINEAR = [  # (x dtype, rows, in, rank, out, format, blocksize, bias)
    ("fp32", 1, 384, 136, 1536, "nf4", 64, True),
    ("fp16", 1, 4096, 1024, 4096, "nf4", 64, False),
    ("bf16", 1, 431, 37, 384, "int8", 0, True),
    ("fp16", 1, 384, 20, 431, "fp", 0, False),
    ("fp32", 1500, 384, 136, 1536, "nf4", 64, True),
    ("fp16", 1500, 384, 136, 1536, "nf4", 64, True),
    ("bf16", 64, 431, 52, 384, "int8", 64, False),
    ("fp16", 7, 384, 40, 384, "fp", 0, True),
    # several rows at a rank of at most 64: the one-launch kernel (h kept in registers)
    ("fp32", 1500, 384, 64, 1536, "nf4", 64, True),
    ("fp32", 59, 431, 40, 384, "int8", 0, False),
    ("fp16", 1500, 384, 64, 1536, "int8", 64, True),
    ("bf16", 256, 4096, 40, 4096, "nf4", 64, False),
    ("bf16", 16, 384, 20, 431, "nf4", 64, True),
]


def _linear_launches(dtype: str, rows: int, n_in: int, rank: int, n_out: int, fmt: str, bs: int, bias: bool,
                     config: dict | None = None):
    """Every kernel launch of one rank_linear call, as the launcher plans them (cuBLAS steps included)."""
    from adaptwin.kernels import rank_linear as kr

    sys.path.insert(0, str(Path(__file__).parent))
    from test_kernels_cpu import _factor

    gen = torch.Generator().manual_seed(0)
    fa = _factor(fmt, bs, torch.randn(rank, n_in, generator=gen))
    fb = _factor(fmt, bs, torch.randn(rank, n_out, generator=gen))
    x = torch.empty(rows, n_in, dtype=DTYPES[dtype])
    b = torch.empty(n_out, dtype=x.dtype) if bias else None
    _, launches = kr.plan(x, *fa, *fb, b, kr._code_on(x.device), config)
    return launches


# several rows: the default plan (factors decoded once) and the tiled kernels' decoding; one row has one plan
LINEAR_PLANS = [(case, decode) for case in LINEAR for decode in (("once", "tiles") if case[1] > 1 else ("once",))]


@pytest.mark.parametrize("case,decode", LINEAR_PLANS,
                         ids=lambda c: "{}-M{}-{}x{}x{}-{}{}-bias{}".format(*c) if isinstance(c, tuple) else c)
def test_rank_linear_compiles_for_sm90(case, decode):
    from adaptwin.kernels.rank_linear import FUSED_MAX_RANK, TorchStep

    rows, rank, fmt = case[1], case[3], case[5]
    launches = _linear_launches(*case, config={"decode": decode})
    names = [launch[0].fn.__name__ for launch in launches]
    if rows > 1 and decode == "once":  # quantised factors decoded once, then one launch or cuBLAS
        assert names.count("_dequant_kernel") == (0 if fmt == "fp" else 2)
        assert names[-1] in ("_fused_kernel", "_cublas_products")
        assert rank <= FUSED_MAX_RANK or names[-1] == "_cublas_products"
    else:
        products = [name for name in names if name != "_sum_rows_kernel"]  # K-split sums
        assert len(products) == (1 if rows > 1 and rank <= FUSED_MAX_RANK else 2)
    for kernel, _, args, kwargs in launches:
        if isinstance(kernel, TorchStep):
            continue
        compiled = compile_sm90(kernel, args, kwargs)
        dots = rows > 1 and args[0].dtype != torch.float32 and kernel.fn.__name__ != "_dequant_kernel"
        check(compiled, tensor_cores=dots)
        if dots and rows >= 64:  # Hopper's warp-group MMA, not the older mma.sync
            assert "wgmma" in compiled.asm["ptx"]


@pytest.mark.slow
def test_every_fused_variant_compiles_for_sm90():
    """The one-launch kernel for every dtype, format, rank bucket and tile size its default plans pick."""
    bad = []
    for dtype in DTYPES:
        for fmt, bs in (("nf4", 64), ("int8", 0), ("fp", 0)):
            for rank in (1, 20, 40, 64):
                for rows in (2, 59, 64, 1500):
                    (kernel, _, args, kwargs), = _linear_launches(dtype, rows, 384, rank, 1536, fmt, bs, True,
                                                                  {"decode": "tiles"})
                    compiled = compile_sm90(kernel, args, kwargs)
                    use, ptx = resources(compiled), compiled.asm["ptx"]
                    tensor_cores = "wgmma" in ptx or "mma.sync" in ptx
                    if (use["LOCAL"] or use["STACK"] or tensor_cores != (dtype != "fp32")
                            or (dtype != "fp32" and rows >= 64 and "wgmma" not in ptx)):
                        bad.append((dtype, fmt, rank, rows, use, tensor_cores))
    assert not bad, bad


@pytest.mark.slow
def test_every_gemv_tuning_config_compiles_for_sm90():
    """benchmarks/gpu_gemv.py (--tune) times each whole-byte GEMV tile; none may fail to build or spill. Each is
    compiled as an H100 runs it, with programmatic dependent launch (`rank_gemv.pdl_kwargs`: the plan made
    here, on CPU tensors, leaves it out), whose wait must be in the PTX."""
    from adaptwin.kernels import rank_linear as kr

    from benchmarks.gpu_gemv import GEMV_TUNE_COLS, GEMV_TUNE_ROWS

    sys.path.insert(0, str(Path(__file__).parent))
    from test_kernels_cpu import _factor

    gen = torch.Generator().manual_seed(0)
    fa, fb = (_factor("nf4", 64, torch.randn(1024, 4096, generator=gen)) for _ in range(2))
    x = torch.empty(1, 4096, dtype=torch.float16)
    bad = []
    for config in [{"rows": c} for c in GEMV_TUNE_ROWS] + [{"cols": c} for c in GEMV_TUNE_COLS]:
        _, launches = kr.plan(x, *fa, *fb, None, kr._code_on(x.device), config)
        kernel, _, args, kwargs = launches[0] if "rows" in config else launches[1]
        compiled = compile_sm90(kernel, args, {**kwargs, "PDL": True, "launch_pdl": True})
        use = resources(compiled)
        if use["LOCAL"] or use["STACK"] or "griddepcontrol.wait" not in compiled.asm["ptx"]:
            bad.append((config, use))
    assert not bad, bad


def _one_launch(dtype: str, d: int, rank: int, tiles: dict | None = None, bias: bool = True, rows: int = 1):
    """The one-launch GEMV's (kernel, grid, args, kwargs) for ``rows`` rows of a d -> d NF4 call at ``rank``."""
    from adaptwin.kernels import rank_linear as kr

    sys.path.insert(0, str(Path(__file__).parent))
    from test_kernels_cpu import _factor

    gen = torch.Generator().manual_seed(0)
    fa, fb = (_factor("nf4", 64, torch.randn(rank, d, generator=gen)) for _ in range(2))
    x = torch.empty(rows, d, dtype=DTYPES[dtype])
    b = torch.empty(d, dtype=x.dtype) if bias else None
    _, launches = kr.plan(x, *fa, *fb, b, kr._code_on(x.device), {"gemv": "one_launch", "one_launch": tiles or {}})
    (launch,) = launches
    return launch


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("d,rows", [(2048, 1), (4096, 1), (4096, 8)])
def test_one_launch_gemv_compiles_for_sm90_with_its_ordering(dtype, d, rows):
    """The one-launch GEMV compiles spill-free, and its PTX orders the call as the kernel's docstring says:
    relaxed float32 atomic adds into the workspace, a CTA barrier, then one gpu-scope acq_rel ticket per
    program (a single thread's), and the last program's acquire exchanges of the sums."""
    kernel, grid, args, kwargs = _one_launch(dtype, d, d // 4, rows=rows)
    assert kernel.fn.__name__ == "_gemv_nf4_one_launch_kernel" and kwargs["A_SCALE_ROW"] and kwargs["B_SCALE_ROW"]
    assert kwargs["ROWS"] == rows
    assert grid[0] * grid[1] >= 128  # about one program per multiprocessor or more
    compiled = compile_sm90(kernel, args, kwargs)
    check(compiled, tensor_cores=False)
    ptx = [line.strip() for line in compiled.asm["ptx"].splitlines()]
    adds = [i for i, line in enumerate(ptx) if "atom.global.gpu.relaxed.add.f32" in line or "red.global" in line]
    ticket = [i for i, line in enumerate(ptx) if "atom.global.gpu.acq_rel.add" in line]
    takes = [i for i, line in enumerate(ptx) if "atom.global.gpu.acquire.exch" in line]
    assert adds and len(ticket) == 1 and takes, "\n".join(line for line in ptx if "atom" in line)
    assert ptx[ticket[0]].startswith("@"), "the ticket must be one thread's (predicated)"
    assert max(adds) < ticket[0] < min(takes)
    assert any(line.startswith("bar.sync") for line in ptx[max(adds):ticket[0]]), "no barrier before the ticket"


@pytest.mark.slow
def test_every_one_launch_tuning_config_compiles_for_sm90():
    """benchmarks/gpu_kernels.py --tune times each one-launch GEMV tile; none may fail to build or spill."""
    from benchmarks.gpu_gemv import GEMV_TUNE_CHUNKS, GEMV_TUNE_ONE

    bad = []
    for rows in (1, 8):
        for tiles in GEMV_TUNE_ONE + [{"CHUNKS": c} for c in GEMV_TUNE_CHUNKS] + [{"GATHER": True}]:
            kernel, _, args, kwargs = _one_launch("fp16", 4096, 1024, tiles, bias=False, rows=rows)
            use = resources(compile_sm90(kernel, args, kwargs))
            if use["LOCAL"] or use["STACK"]:
                bad.append((rows, tiles, use))
    assert not bad, bad


def loop_sass(compiled) -> list[str]:
    """The SASS instructions of the cubin's longest loop."""
    return max(sass_loops(compiled), key=len, default=[])


@pytest.mark.parametrize("d,rank", [(4096, 1024), (2048, 512)])
def test_gathered_nf4_values_shorten_the_gemv_loops(d, rank):
    """The batch-1 NF4 kernels with GATHER (code values by warp shuffles from a register table: 1, Triton's
    gather; 2, one shfl.sync.idx per code) compile spill-free for sm_90 at the sizes benchmarks/gpu_kernels.py
    times them with their default tiles (d >= 2048), and their loops issue fewer instructions than with the
    select tree, the lane shuffles fewest (a static count; the benchmark times them)."""
    from adaptwin.kernels import rank_linear as kr

    sys.path.insert(0, str(Path(__file__).parent))
    from test_kernels_cpu import _factor

    gen = torch.Generator().manual_seed(0)
    fa, fb = (_factor("nf4", 64, torch.randn(rank, d, generator=gen)) for _ in range(2))
    x = torch.empty(1, d, dtype=torch.float16)
    counts = {}
    for gather in (False, True, 2):
        config = {"rows": {"GATHER": gather}, "cols": {"GATHER": gather}}
        _, launches = kr.plan(x, *fa, *fb, None, kr._code_on(x.device), config)
        for kernel, _, args, kwargs in launches[:2]:
            compiled = compile_sm90(kernel, args, kwargs)
            if gather:
                check(compiled, tensor_cores=False)
            else:  # the select tree, a comparison row on GPUs: h·B's 64 x 32-byte tiles at d = 2048 keep 8 bytes
                # on the stack under triton 3.6 (none under 3.9), never local memory
                assert resources(compiled)["LOCAL"] == 0 and resources(compiled)["STACK"] <= 8
            body = loop_sass(compiled)
            shuffles = sum(i.split()[0].startswith("SHFL") for i in body)
            counts[kernel.fn.__name__, gather] = len(body)
            counts["SHFL", kernel.fn.__name__, gather] = shuffles
    print(counts)
    for name in ("_gemv_nf4_rows_kernel", "_gemv_nf4_cols_kernel"):
        assert 0 < counts[name, 2] < counts[name, True] < counts[name, False], counts
        # the select tree shuffles nothing but sums (x·Aᵀ: none; h·B: h's partial rows)
        assert counts["SHFL", name, False] < counts["SHFL", name, 2] <= counts["SHFL", name, True], counts
    assert counts["SHFL", "_gemv_nf4_rows_kernel", False] == 0, counts


@pytest.mark.parametrize("d", [1024, 2048, 4096, 8192])
def test_word_columns_shorten_the_h_b_loop(d):
    """h·B over 32-bit words of B (``cols: {"WORDS": True}``), with the default tiles and PDL at each width the
    GEMV benchmark times, compiles spill-free for sm_90 with PDL's wait, and its loop issues exactly one
    lane shuffle per code and no barrier or shared-memory access (h's partial rows are loaded as the tile
    uses them), in at most 4/5 of the byte kernel's instructions (triton 3.6: 96-172 against 131-231)."""
    from adaptwin.kernels import rank_linear as kr

    sys.path.insert(0, str(Path(__file__).parent))
    from test_kernels_cpu import _factor

    gen = torch.Generator().manual_seed(0)
    fa, fb = (_factor("nf4", 64, torch.randn(d // 4, d, generator=gen)) for _ in range(2))
    x = torch.empty(1, d, dtype=torch.float16)
    loops = {}
    for words in (False, True):
        kernel, _, args, kwargs = kr.plan(x, *fa, *fb, None, kr._code_on(x.device), {"cols": {"WORDS": words}})[1][1]
        compiled = compile_sm90(kernel, args, {**kwargs, "PDL": True, "launch_pdl": True})
        check(compiled, tensor_cores=False)
        assert "griddepcontrol.wait" in compiled.asm["ptx"]
        loops[words] = [i.split()[0] for i in loop_sass(compiled)]
        if words:
            assert kernel.fn.__name__ == "_gemv_nf4_cols_words_kernel"
            codes = 8 * kwargs["BLOCK_K"] * kwargs["BLOCK_W"] // (32 * kwargs["num_warps"])  # per thread and step
    ops = loops[True]
    assert sum(o.startswith("SHFL") for o in ops) == codes, ops
    assert not [o for o in ops if o.startswith(("BAR", "LDS", "STS"))], ops
    assert any(o.startswith("BAR") for o in loops[False])  # what the byte kernel pays for h each step
    assert len(ops) <= 0.8 * len(loops[False]), (len(ops), len(loops[False]))


def test_gemv_loads_x_in_element_pairs():
    """The batch-1 x·Aᵀ kernel's loop issues few loads per step and thread on sm_90: its code bytes as one
    vector load (8 bytes per thread with the default 8 warps), its scales, and x's even and odd elements
    as one tile of pairs, split in registers (two strided 2-byte loads per pair made 18 loads per 32 x
    32-byte tile; each load is an L1 wavefront per warp). With 8 warps x is one element per thread; at
    most one of the x loads runs (they are predicated on each other)."""
    from adaptwin.kernels import rank_linear as kr

    sys.path.insert(0, str(Path(__file__).parent))
    from test_kernels_cpu import _factor

    gen = torch.Generator().manual_seed(0)
    fa, fb = (_factor("nf4", 64, torch.randn(1024, 4096, generator=gen)) for _ in range(2))
    x = torch.empty(1, 4096, dtype=torch.float16)
    kernel, _, args, kwargs = kr.plan(x, *fa, *fb, None, kr._code_on(x.device))[1][0]
    assert kernel.fn.__name__ == "_gemv_nf4_rows_kernel"
    loads = [i for i in loop_sass(compile_sm90(kernel, args, kwargs)) if "LDG" in i]
    assert len(loads) <= 4 and any(".64" in i.split()[1] or ".128" in i.split()[1] for i in loads), loads
    assert sum("LDG.E.U16" in i for i in loads) <= 1, loads


@pytest.mark.parametrize("d,launches,rows_tiles", [(1024, 2, {"BLOCK_N": 32, "GROUPS": 2, "num_warps": 4}),
                                                   (2048, 3, {"BLOCK_N": 32, "GROUPS": 8, "num_warps": 8}),
                                                   (4096, 3, {"BLOCK_N": 16, "GROUPS": 4, "num_warps": 8})])
def test_gemv_tiles_follow_the_width(d, launches, rows_tiles):
    """A GPU's batch-1 NF4 plan takes its tiles by width (`GEMV_ROWS_TILES` by K, `GEMV_COLS_TILES` by N, from
    the H100 tunes): up to 1024 outputs h·B runs over all of K (two launches, no sum kernel), above it h·B is
    split over K and summed (three); every kernel reads lane-shuffled code values and compiles for sm_90."""
    from adaptwin.kernels import rank_linear as kr

    sys.path.insert(0, str(Path(__file__).parent))
    from test_kernels_cpu import _factor

    gen = torch.Generator().manual_seed(0)
    fa, fb = (_factor("nf4", 64, torch.randn(d // 4, d, generator=gen)) for _ in range(2))
    x = torch.empty(1, d, dtype=torch.float16)
    plan = kr.plan(x, *fa, *fb, None, kr._code_on(x.device))[1]
    assert len(plan) == launches, [k.fn.__name__ for k, *_ in plan]
    assert rows_tiles.items() <= plan[0][3].items(), plan[0][3]
    for kernel, _, args, kwargs in plan[:2]:
        assert kwargs["GATHER"] == 2
        check(compile_sm90(kernel, args, kwargs), tensor_cores=False)
