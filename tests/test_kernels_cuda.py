"""The ops on a CUDA device against their references: the first thing to run where a GPU is lent.

    python -m pytest -q -m gpu tests/test_kernels_cuda.py

Skipped where no CUDA device is visible (and deselected by ``make test``, which runs ``-m "not gpu"``).
Same criterion as on CPU (test_kernels_cpu.py): the kernel's error against float64 at most twice the
reference's, here in float32, float16 and bfloat16, with the inputs on the GPU and the ops called through
the dispatcher, so the CUDA backend that serves them is the one under test: the Triton kernels by default,
the CUDA C++ ones in `test_cuda_cpp_backend`'s child process (``ADAPTWIN_CUDA_BACKEND=cpp``) where they are
built. The cases add to the CPU ones what only a GPU build decides: the 1500-key Whisper window at
rank-space widths 16-64, a split-key decoding step, batched rows through the one-launch rank-r kernel
and the 64 x 64 tensor-core tiles (64 rows or more in 16-bit).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_kernels_cpu import ATTENTION_CASES as CPU_ATTENTION  # noqa: E402
from test_kernels_cpu import LINEAR_CASES as CPU_LINEAR  # noqa: E402
from test_kernels_cpu import (  # noqa: E402
    NON_FINITE,
    _factor,
    assert_nan_rows_as_sdpa,
    check_attention_case,
    check_rank_linear_case,
    non_finite_case,
    seed,
)

import adaptwin.ops  # noqa: E402,F401  (registers the CUDA backends)
from adaptwin.ops import backends  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, H, Hkv, T, S, Dq, Dv, causal, mask)
ATTENTION_CASES = CPU_ATTENTION + [
    (1, 6, 6, 1500, 1500, 40, 40, False, None),  # Whisper tiny's encoder at the paper's rank-space width
    (1, 20, 20, 1500, 1500, 16, 16, False, "bool_keys"),  # large's heads, the narrowest width, padding
    (2, 8, 8, 1500, 1500, 64, 64, False, None),  # the dense width, two windows
    (1, 20, 20, 1500, 1500, 48, 48, True, "float"),  # widths in two dot parts (32 + 16), causal, additive
    (4, 20, 20, 1, 1500, 40, 40, False, None),  # a decoding step: the keys split over the grid
    (1, 8, 2, 1, 448, 24, 24, False, "float_keys"),  # grouped heads, one query against a decoder cache
    # causal tensor-core calls with value widths of two parts (V then taken as one): the kinds that were wrong
    # on an H100 with V in two parts (benchmarks/gpu_causal_probe.py), grouped heads, unaligned widths
    (1, 2, 1, 123, 123, 52, 39, True, None),
    (1, 2, 2, 128, 128, 48, 48, True, None),
    (1, 2, 1, 1500, 1500, 40, 40, True, None),
    (1, 8, 2, 300, 300, 32, 39, True, "bool_keys"),
    (2, 4, 1, 77, 77, 24, 48, True, "float"),
]
# (rows, in, rank, out, format, blocksize)
LINEAR_CASES = CPU_LINEAR + [
    (1500, 384, 40, 384, "nf4", 64),  # one launch, 64 x 64 tiles in 16-bit
    (1500, 384, 64, 1536, "int8", 0),
    (256, 4096, 64, 4096, "fp", 0),
    (16, 4096, 20, 4096, "nf4", 64),
    (1500, 384, 136, 1536, "nf4", 64),  # rank above the one-launch kernel's: two launches
    (1, 4096, 1024, 4096, "nf4", 64),  # batch-1 NF4: the whole-byte GEMVs, x·Aᵀ split over K
    (1, 431, 20, 433, "int8", 0),  # batch-1, odd widths: the elementwise GEMV kernel
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "B{}H{}kv{}T{}S{}q{}v{}{}-{}".format(*c))
def test_attention_on_cuda(case, dtype):
    check_attention_case(case, dtype, "cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "B{}H{}kv{}T{}S{}q{}v{}{}-{}".format(*c))
def test_attention_deferred_pv_on_cuda(case, dtype):
    """``DEFER_PV`` (each key tile's P·V issued after the next tile's scores; benchmarks/gpu_kernels.py times
    it beside the default) at the default tiles: the same criterion as the default loop."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    from adaptwin.kernels.attention import attention, deferred_pv_config

    def deferred(q, k, v, mask, scale, causal):
        config = deferred_pv_config(q, mask is not None, causal, v.shape[-1])
        return attention(q, k, v, mask, scale, causal, config=config)

    check_attention_case(case, dtype, "cuda", op=deferred)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: "M{}-{}x{}x{}-{}{}".format(*c))
def test_rank_linear_on_cuda(case, dtype):
    check_rank_linear_case(case, dtype, "cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [c for c in LINEAR_CASES if c[0] > 1], ids=lambda c: "M{}-{}x{}x{}-{}{}".format(*c))
def test_rank_linear_decoded_in_tiles_on_cuda(case, dtype):
    """Several rows with the factors decoded in the Triton kernels' tiles (``decode: tiles``: what the benchmarks
    compare the default, decoding once per call, with)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")

    from adaptwin.kernels.rank_linear import rank_linear

    check_rank_linear_case(case, dtype, "cuda", op=partial(rank_linear, config={"decode": "tiles"}))



@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("where,mask_kind", NON_FINITE)
@pytest.mark.parametrize("tokens,keys", [(80, 150), (3, 300), (1, 1500), (1, 1)],
                         ids=["tiles", "rows", "split-keys", "one-key"])
def test_attention_non_finite_inputs_give_nan_rows_as_sdpa_on_cuda(tokens, keys, where, mask_kind, dtype):
    """A NaN or infinite entry of q or k gives NaN rows exactly where SDPA's definition does (the CPU test's
    rule, `nan_rows`), on the GPU's kernels: 16-bit tensor-core tiles (80 queries), a few queries, a decoding
    step whose 1500 keys are split over the grid, and one key."""
    gen = torch.Generator().manual_seed(seed((tokens, keys, where, mask_kind)))
    q, k, v, mask, causal = non_finite_case(tokens, keys, where, mask_kind, gen)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    on = [t.cuda() if t is not None else None for t in (q, k, v, mask)]
    out = torch.ops.adaptwin.attention(*on, 0.25, causal).cpu()
    assert_nan_rows_as_sdpa(out, q, k, v, mask, causal, 0.25)


ONE_LAUNCH_CASES = [c for c in LINEAR_CASES if c[0] == 1 and c[4] == "nf4" and c[1] % 2 == 0 and c[3] % 2 == 0
                    and c[5] % 2 == 0] + [(1, 2048, 512, 2048, "nf4", 64), (1, 4096, 37, 1536, "nf4", 64),
                                          (8, 2048, 512, 2048, "nf4", 64), (3, 416, 29, 480, "nf4", 32)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ONE_LAUNCH_CASES, ids=lambda c: "M{}-{}x{}x{}-{}{}".format(*c))
def test_rank_linear_one_launch_gemv_on_cuda(case, dtype):
    """The one-launch batch-1 NF4 GEMV (``gemv: one_launch``): atomic float32 sums and a ticket per column chunk
    are where a GPU differs from the interpreter (memory ordering, concurrent programs). Each case against
    the reference, then 50 calls in a row (each must leave the workspace zero for the next) equal to the
    first within float32 reordering (atomics add in any order), and the workspace zero at the end."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")

    from adaptwin.kernels import rank_gemv_one
    from adaptwin.kernels.rank_linear import rank_linear

    op = partial(rank_linear, config={"gemv": "one_launch"})
    check_rank_linear_case(case, dtype, "cuda", op=op)
    rows, n_in, rank, n_out, fmt, bs = case
    gen = torch.Generator().manual_seed(3)
    fa, fb = (_factor(fmt, bs, torch.randn(rank, n, generator=gen) / n**0.5) for n in (n_in, n_out))
    fa, fb = (tuple(v.cuda() if isinstance(v, torch.Tensor) else v for v in f) for f in (fa, fb))
    x = torch.randn(rows, n_in, generator=gen).to("cuda", dtype)
    first = op(x, *fa, *fb, None).float()
    outs = torch.stack([op(x, *fa, *fb, None).float() for _ in range(50)])
    torch.testing.assert_close(outs, first.expand_as(outs), rtol=1e-2 if dtype != torch.float32 else 1e-5,
                               atol=1e-3 if dtype != torch.float32 else 1e-5)
    torch.cuda.synchronize()
    for acc, count in rank_gemv_one._WORKSPACES.values():
        assert not acc.any() and not count.any()


GEMV_CASES = [(1, 4096, 1024, 4096, "nf4", 64), (1, 2048, 512, 2048, "nf4", 64), (1, 384, 96, 432, "nf4", 64),
              (1, 4096, 37, 1536, "nf4", 64), (1, 416, 29, 480, "nf4", 32)]
GEMV_CONFIGS = [{"pdl": False}, {"rows": {"GROUPS": 1, "BLOCK_B": 32}}, {"rows": {"GROUPS": 2}, "cols": {"WAVES": 0}},
                {"rows": {"BLOCK_N": 32, "BLOCK_B": 64, "GROUPS": 2, "num_warps": 8}},
                {"rows": {"GATHER": True}, "cols": {"GATHER": True}},
                {"rows": {"GATHER": False}, "cols": {"GATHER": False}},
                # h·B reading B's codes as 32-bit words: lane shuffles on raw shifts, Triton's gather, no K split
                {"cols": {"WORDS": True}}, {"cols": {"WORDS": True, "GATHER": True}},
                {"cols": {"WORDS": True, "WAVES": 0, "BLOCK_B": 16}}]


@pytest.mark.parametrize("config", GEMV_CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GEMV_CASES, ids=lambda c: "M{}-{}x{}x{}-{}{}".format(*c))
def test_rank_linear_gemv_variants_on_cuda(case, dtype, config):
    """The whole-byte batch-1 NF4 GEMVs with and without programmatic dependent launch (the default on sm_90),
    with other x·Aᵀ steps (GROUPS scale groups per step; 64-byte groups crossing scale blocks), h·B not
    split over K, code values from Triton's gather or the select tree instead of lane shuffles (the
    default, GATHER 2), and h·B over 32-bit words of B, against the reference."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    from adaptwin.kernels.rank_linear import rank_linear

    check_rank_linear_case(case, dtype, "cuda", op=partial(rank_linear, config=config))


@pytest.mark.parametrize("config", [{}, {"cols": {"WORDS": True}}], ids=["bytes", "words"])
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_rank_linear_gemv_waits_for_its_input(graph, config):
    """Programmatic dependent launch lets a GEMV kernel start before the kernel before it ends: each call's x is
    written by the kernel just before it (and each output read by the one after), eagerly and replayed from
    a CUDA graph; every output must match its own x's product, none a neighbour's."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    from adaptwin.kernels.rank_linear import _code_on, plan, rank_linear

    gen = torch.Generator().manual_seed(17)
    fa, fb = (_factor("nf4", 64, torch.randn(1024, 4096, generator=gen) / 64) for _ in range(2))
    fa, fb = (tuple(v.cuda() if isinstance(v, torch.Tensor) else v for v in f) for f in (fa, fb))
    base = torch.randn(1, 4096, generator=gen).to("cuda", torch.float16)
    code = _code_on(base.device)
    if torch.cuda.get_device_capability()[0] >= 9:  # the plan asks for it where the GPU has it
        assert all(kw.get("launch_pdl") for _, _, _, kw in plan(base, *fa, *fb, None, code, config)[1])

    def calls():
        outs = []
        for i in range(12):
            x = base * (i + 1) - outs[-1][:, :1] * 0 if outs else base * (i + 1)  # written just before the call
            outs.append(rank_linear(x, *fa, *fb, None, config=config))
        return torch.cat(outs)

    if graph:
        calls()  # compile outside the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = calls()
        base.mul_(-0.5)  # new inputs for the replay
        g.replay()
    else:
        out = calls()
    torch.cuda.synchronize()
    ref = torch.cat([rank_linear(base * (i + 1), *fa, *fb, None, config={"pdl": False}) for i in range(12)])
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_cuda_backend_is_the_one_asked_for():
    """Triton takes the CUDA key unless ADAPTWIN_CUDA_BACKEND asks for the CUDA C++ kernels (where built) or
    the reference; without triton the reference serves, not the (far slower) CUDA C++ kernels."""
    state = backends.load()
    asked = backends.cuda_backend()
    has_triton = importlib.util.find_spec("triton") is not None
    if asked == "cpp" and state["cuda_cpp"]:
        assert backends.cuda_serving() == "cuda_cpp" and state["triton"] is False
    elif asked == "reference" or not has_triton:
        assert backends.cuda_serving() == "reference" and state["triton"] is False
    else:
        assert backends.cuda_serving() == "triton" and state["triton"] is True


def test_cuda_cpp_backend():
    """Every case above again, on the CUDA C++ kernels (a child process with ADAPTWIN_CUDA_BACKEND=cpp)."""
    if os.environ.get("ADAPTWIN_CUDA_BACKEND") == "cpp":
        pytest.skip("already the CUDA C++ child process")
    if not backends.load()["cuda_cpp"]:
        pytest.skip("the CUDA C++ kernels are not built here (adaptwin._C built without ADAPTWIN_NO_EXTENSION "
                    "by a torch with CUDA)")
    env = {**os.environ, "ADAPTWIN_CUDA_BACKEND": "cpp"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", __file__],
                          cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-2000:]
