"""The Triton kernels (kernels/) against the references, on CPU under TRITON_INTERPRET=1, in float32.

Same criterion as test_kernels_cpu.py: error against float64 at most twice the reference's. The
interpreter runs each program in numpy, so sizes are kept moderate (it is a correctness check of the
indexing, masking and online softmax; speed is for a GPU). On a GPU the same launchers run compiled.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adaptwin.ops.attention import attention_reference

sys.path.insert(0, os.path.dirname(__file__))
from test_kernels_cpu import (  # noqa: E402
    NON_FINITE,
    _factor,
    _mask,
    _to,
    assert_nan_rows_as_sdpa,
    assert_within_twice,
    masked_throughout,
    non_finite_case,
    seed,
)

# TRITON_INTERPRET must be set before triton is first imported (its standard library is decorated at
# import), so the cases below run in a child pytest that starts with it; in this process they skip.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETING, reason="runs in the TRITON_INTERPRET=1 child process")


INTERPRETER_SHARDS = 2  # children at once, each every other case (ADAPTWIN_TEST_SHARD, tests/conftest.py)


def test_triton_kernels_under_interpreter():
    """Run this module's cases and test_kernels_triton_linear.py's with TRITON_INTERPRET=1 in two children at once,
    each every other case (this process only waits: on the 2-core CI machine 2026-11-26 the cases took 119 s
    this way against 212 s in one child), and require them all to pass."""
    if INTERPRETING:
        pytest.skip("already the interpreter process")
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (optional: `pip install triton --no-deps`)")
    root = Path(__file__).resolve().parents[1]
    modules = [__file__, str(Path(__file__).with_name("test_kernels_triton_linear.py"))]
    envs = [{**os.environ, "TRITON_INTERPRET": "1", "ADAPTWIN_TEST_SHARD": f"{i}/{INTERPRETER_SHARDS}"}
            for i in range(INTERPRETER_SHARDS)]
    procs = [subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *modules], cwd=root,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for env in envs]
    try:
        outputs = [proc.communicate(timeout=900) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, out[-4000:] + err[-2000:]
        assert " passed" in out and "failed" not in out, out[-2000:]


ATTENTION_CASES = [
    (1, 2, 2, 59, 59, 26, 20, False, None),
    (2, 2, 1, 33, 47, 20, 52, False, "bool"),
    (1, 2, 2, 1, 150, 13, 13, False, "float_keys"),
    (1, 2, 2, 45, 45, 40, 9, True, None),
    (1, 1, 1, 37, 61, 1, 64, False, "float"),
    (1, 1, 1, 20, 20, 17, 17, False, "bool_keys"),
    (1, 2, 2, 70, 70, 36, 48, False, "float"),  # widths in two parts (32 + 16), additive mask, a partial tile
    (1, 2, 1, 64, 96, 48, 40, False, None),  # two parts, key tiles all full
    (1, 1, 1, 1500, 1500, 20, 20, False, "bool_keys"),  # a 30 s window, its padding hidden
]


def _attention_inputs(case: tuple, salt: int) -> tuple:
    """(q, k, v, mask, scale, float64 reference) for an ATTENTION_CASES case, drawn from its seed plus ``salt``."""
    b, h, hkv, t, s, dq, dv, causal, kind = case
    gen = torch.Generator().manual_seed(seed(case) + salt)
    q, k, v = (torch.randn(b, n, m, d, generator=gen) for n, m, d in ((h, t, dq), (hkv, s, dq), (hkv, s, dv)))
    mask = _mask(kind, b, h, t, s, gen)
    scale = dq ** -0.5
    ref64 = attention_reference(q.double(), k.double(), v.double(), _to(mask, torch.float64), scale, causal)
    return q, k, v, mask, scale, ref64


@needs_interpreter
@pytest.mark.parametrize("splits", [None, 1], ids=["auto-split", "one-split"])
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "B{}H{}kv{}T{}S{}q{}v{}{}-{}".format(*c))
def test_triton_attention(tk, case, splits):
    """Keys split over the grid and merged (what a GPU does with under a wave of programs; every case
    here is that small) and the same in one pass."""
    b, h, hkv, t, s, dq, dv, causal, kind = case
    q, k, v, mask, scale, ref64 = _attention_inputs(case, 0)
    ref = attention_reference(q, k, v, mask, scale, causal)
    config = None if splits is None else {**tk["attention"].default_config(q, mask is not None), "SPLITS": splits}
    out = tk["attention"].attention(q, k, v, mask, scale, causal, config=config)
    assert out.shape == (b, t, h, dv)
    assert_within_twice(out, ref, ref64)


@needs_interpreter
@pytest.mark.parametrize("case", ATTENTION_CASES[:4] + ATTENTION_CASES[-3:-1],
                         ids=lambda c: "B{}H{}kv{}T{}S{}q{}v{}{}-{}".format(*c))
def test_triton_attention_native_fp16_dots(tk, case):
    """The GPU path for 16-bit inputs: fp16 operands straight into tl.dot, P rounded to fp16 before P·V
    (forced with dot_f32=False; the interpreter computes fp16 dots, only its bf16 dot is wrong)."""
    b, h, hkv, t, s, dq, dv, causal, kind = case
    q, k, v, mask, scale, ref64 = _attention_inputs(case, 1)
    half = [x.half() for x in (q, k, v)]
    ref = attention_reference(*half, _to(mask, torch.float16), scale, causal)
    out = tk["attention"].attention(*half, _to(mask, torch.float16), scale, causal, dot_f32=False)
    assert out.dtype == torch.float16
    assert_within_twice(out, ref, ref64)


@needs_interpreter
@pytest.mark.parametrize("causal", [False, True])
def test_triton_attention_one_part(tk, causal):
    """ONE_PART pads a two-part width (40 = 32 + 16) to one 64-wide dot; the result is the same attention."""
    gen = torch.Generator().manual_seed(21)
    q, k, v = (torch.randn(1, 2, 45, 40, generator=gen) for _ in range(3))
    ref64 = attention_reference(q.double(), k.double(), v.double(), None, 0.2, causal)
    ref = attention_reference(q, k, v, None, 0.2, causal)
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "ONE_PART": True}
    assert tk["attention"].launches(q, k, v, None, torch.empty(1, 45, 2, 40), 0.2, causal, config)[0][3]["D1V"] == 64
    assert_within_twice(tk["attention"].attention(q, k, v, None, 0.2, causal, config=config), ref, ref64)


@needs_interpreter
@pytest.mark.parametrize("case", ATTENTION_CASES[:-1], ids=lambda c: "B{}H{}kv{}T{}S{}q{}v{}{}-{}".format(*c))
def test_triton_attention_deferred_pv(tk, case):
    """DEFER_PV (each tile's P·V after the next tile's scores) is the same attention, bit for bit the plain
    loop's: the same products and sums per tile, in another order of issue. 16-key tiles give several full
    tiles and a partial one; one split, split keys (each split's first tile masked, its last P·V after the
    loop) and native fp16 dots (P carried in float32, rounded at its P·V)."""
    b, h, hkv, t, s, dq, dv, causal, kind = case
    q, k, v, mask, scale, ref64 = _attention_inputs(case, 3)
    ref = attention_reference(q, k, v, mask, scale, causal)
    for splits, half in ((1, False), (3, False), (1, True)):
        config = {"BLOCK_M": 16, "BLOCK_N": 16, "SPLITS": splits}
        args = [x.half() for x in (q, k, v)] + [_to(mask, torch.float16)] if half else [q, k, v, mask]
        plan = tk["attention"].launches(*args[:4], torch.empty(b, t, h, dv), scale, causal,
                                        {**config, "DEFER_PV": True}, dot_f32=not half)
        assert plan[0][3]["DEFER_PV"] is not (half and causal)  # causal tensor-core calls keep the plain loop
        deferred = tk["attention"].attention(*args, scale, causal, config={**config, "DEFER_PV": True},
                                             dot_f32=not half)
        plain = tk["attention"].attention(*args, scale, causal, config=config, dot_f32=not half)
        assert torch.equal(deferred, plain), (splits, half)
        if not half:
            assert_within_twice(deferred, ref, ref64)


@needs_interpreter
def test_triton_configs_reject_unknown_keys(tk):
    """A tuning config with a misspelt or missing key is an error that names the allowed keys, not ignored."""
    gen = torch.Generator().manual_seed(12)
    fa, fb = (_factor("nf4", 64, torch.randn(8, 64, generator=gen)) for _ in range(2))
    x = torch.randn(3, 64, generator=gen)
    allowed = r"allowed: \['cols', 'decode', 'fuse', 'fused', 'gemv', 'one_launch', 'pdl', 'rows'\]"
    with pytest.raises(ValueError, match=r"unknown keys \['fusd'\]; " + allowed):
        tk["rank_linear"].rank_linear(x, *fa, *fb, None, config={"fusd": {}})
    with pytest.raises(ValueError, match=r"decode must be one of \('once', 'tiles'\), got 'twice'"):
        tk["rank_linear"].rank_linear(x, *fa, *fb, None, config={"decode": "twice"})
    with pytest.raises(ValueError, match="fuse must be True, False or absent"):
        tk["rank_linear"].rank_linear(x, *fa, *fb, None, config={"fuse": "yes"})
    with pytest.raises(ValueError, match=r"gemv must be one of \('split', 'one_launch'\), got 'fused'"):
        tk["rank_linear"].rank_linear(x[:1], *fa, *fb, None, config={"gemv": "fused"})
    with pytest.raises(ValueError, match="pdl must be True, False or absent"):
        tk["rank_linear"].rank_linear(x[:1], *fa, *fb, None, config={"pdl": "on"})
    with pytest.raises(ValueError, match="pdl=True needs a GPU of compute capability 9.0 or later"):
        tk["rank_linear"].rank_linear(x[:1], *fa, *fb, None, config={"pdl": True})
    with pytest.raises(ValueError, match="GATHER 2 .* runs on CUDA GPUs only"):
        tk["rank_linear"].rank_linear(x[:1], *fa, *fb, None, config={"rows": {"GATHER": 2}})
    assert torch.equal(tk["rank_linear"].rank_linear(x[:1], *fa, *fb, None, config={"pdl": False}),
                       tk["rank_linear"].rank_linear(x[:1], *fa, *fb, None))  # no PDL here either way
    q = torch.randn(1, 1, 16, 16, generator=gen)
    with pytest.raises(ValueError, match="needs BLOCK_M and BLOCK_N"):
        tk["attention"].attention(q, q, q, None, 0.25, False, config={"BLOCK_M": 16})
    with pytest.raises(ValueError, match="got \\['BLOCK_M', 'BLOCK_N', 'num_wraps'\\]"):
        tk["attention"].attention(q, q, q, None, 0.25, False, config={"BLOCK_M": 16, "BLOCK_N": 16, "num_wraps": 4})
    with pytest.raises(ValueError, match="DEFER_PV must be True or False, got 2"):
        tk["attention"].attention(q, q, q, None, 0.25, False, config={"BLOCK_M": 16, "BLOCK_N": 16, "DEFER_PV": 2})
    for bad in (8, 300, 128.0):
        with pytest.raises(ValueError, match=f"maxnreg \\(registers a thread\\) must be an integer in 16..255, "
                                             f"got {bad!r}"):
            tk["attention"].attention(q, q, q, None, 0.25, False, config={"BLOCK_M": 16, "BLOCK_N": 16, "maxnreg": bad})


@needs_interpreter
def test_triton_attention_causal_tensor_core_calls_take_v_as_one_part(tk):
    """Causal calls with 16-bit dots take the value width as one dot part (39 -> 64, 48 -> 64): with two
    parts the H100's compiled kernel read shared memory out of bounds and came out wrong; float32 dots and
    calls without the causal rule keep two parts (32 + 16). Every call launches the kernel: none is handed
    to SDPA any more."""
    ka = tk["attention"]
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 2, 9, 52, generator=gen)
    for hkv, dv, causal, dot_f32, parts in [(1, 39, True, False, (64, False)), (2, 48, True, False, (64, False)),
                                            (2, 48, False, False, (32, True)), (2, 39, True, True, (32, True)),
                                            (1, 64, True, False, (64, False))]:
        k, v = torch.randn(1, hkv, 9, 52, generator=gen), torch.randn(1, hkv, 9, dv, generator=gen)
        out = torch.empty(1, 9, 2, dv)
        (_, _, _, kwargs), = ka.launches(q, k, v, None, out, 0.2, causal, dot_f32=dot_f32)
        assert (kwargs["D1V"], kwargs["HAS_V2"]) == parts, (hkv, dv, causal, dot_f32)
    k, v = torch.randn(1, 1, 9, 52, generator=gen), torch.randn(1, 1, 9, 39, generator=gen)
    out = ka.attention(q, k, v, None, 0.2, True, dot_f32=False)
    ref64 = attention_reference(q.double(), k.double(), v.double(), None, 0.2, True)
    torch.testing.assert_close(out.double(), ref64, rtol=1e-4, atol=1e-5)


CAUSAL_TENSOR_CORE = [  # (B, H, Hkv, T, S, Dq, Dv): kinds that were wrong on an H100 with V in two parts
    (1, 2, 1, 123, 123, 52, 39),  # the first that failed there: grouped heads, two-part value width
    (1, 2, 2, 123, 123, 48, 48),  # two-part widths, no grouping
    (1, 4, 2, 123, 123, 64, 64),  # grouped heads, one-part widths
]


@needs_interpreter
@pytest.mark.parametrize("case", CAUSAL_TENSOR_CORE, ids=lambda c: "B{}H{}kv{}T{}S{}q{}v{}".format(*c))
def test_triton_attention_causal_logic_with_the_gpu_tiles(tk, case):
    """Causal tensor-core calls' kernel logic is right: with the H100's own tiles for them (64 x 64, as
    `default_config` plans on a GPU), fp16 operands straight into tl.dot and P rounded to fp16, the
    interpreted program matches the reference, with V in one part as planned and in two (so the H100's
    wrong results with two parts came from the compiled code; test_kernels_cuda.py runs them there)."""
    b, h, hkv, t, s, dq, dv = case
    gen = torch.Generator().manual_seed(seed(case))
    q, k, v = (torch.randn(b, n, m, d, generator=gen) for n, m, d in ((h, t, dq), (hkv, s, dq), (hkv, s, dv)))
    ref64 = attention_reference(q.double(), k.double(), v.double(), None, dq ** -0.5, True)
    half = [x.half() for x in (q, k, v)]
    ref = attention_reference(*half, None, dq ** -0.5, True)
    ka = tk["attention"]
    config = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    out = torch.empty(b, t, h, dv, dtype=torch.float16)
    plan = ka.launches(*half, None, out, dq ** -0.5, True, config, dot_f32=False)
    assert len(plan) == 1 and plan[0][3]["CAUSAL"] and not plan[0][3]["DOT_F32"]
    kernel, grid, args, kwargs = plan[0]
    assert not kwargs["HAS_V2"]
    kernel[grid](*args, **kwargs)
    assert_within_twice(out, ref, ref64)
    if ka._parts(dv)[1]:  # the two-part plan, as launched before: right here too
        out.fill_(float("nan"))
        kernel[grid](*args, **{**kwargs, "D1V": ka._parts(dv)[0], "D2V": ka._parts(dv)[1], "HAS_V2": True})
        assert_within_twice(out, ref, ref64)


@needs_interpreter
def test_causal_probe_reports_each_depth(tk):
    """benchmarks.gpu_causal_probe (run by gpu_session.sh on a GPU), here on CPU tensors: a row per dtype and
    pipeline depth, the kernel within twice SDPA's error (the interpreter's arithmetic is right)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.gpu_causal_probe import probe

    rows = probe([(1, 2, 1, 40, 40, 52, 39)], device="cpu")
    assert [(r["dtype"], r["stages"]) for r in rows] == [("fp16", "default"), ("fp16", 1), ("bf16", "default"),
                                                        ("bf16", 1)]
    assert all(r["within_2x"] and 0 < r["kernel_err"] < 1e-2 for r in rows), rows


@needs_interpreter
def test_triton_attention_splits_keys_only_under_a_wave(tk):
    """The launcher splits the keys when B·H·(query blocks) is under the multiprocessor count (132 where
    no GPU says otherwise), never below two key tiles a split; every split of a causal row can be empty."""
    plan = tk["attention"].launches
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 300, 16)
    out = torch.empty(1, 1, 2, 16)
    first = plan(q, k, k, None, out, 0.25, False)
    assert len(first) == 2 and first[0][1][2] == 300 // 64  # 32-key tiles here: 4 splits of two tiles and more
    q = torch.randn(1, 2, 4500, 16)
    assert len(plan(q, k, k, None, torch.empty(1, 4500, 2, 16), 0.25, False)) == 1  # 282 programs: no split
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, 16, generator=gen) for n in (40, 40, 40))
    ref = attention_reference(q, k, v, None, 0.25, True)
    config = {**tk["attention"].default_config(q), "SPLITS": 4}  # later splits empty for the first rows
    assert_within_twice(tk["attention"].attention(q, k, v, None, 0.25, True, config=config), ref,
                        attention_reference(q.double(), k.double(), v.double(), None, 0.25, True))


@needs_interpreter
@pytest.mark.parametrize("scale", [-0.3, 0.0])
@pytest.mark.parametrize("kind", [None, "bool_keys"])
def test_triton_attention_any_scale(tk, scale, kind):
    """A scale of zero or below (the op allows any): no fused max·scale shortcut there, masked keys stay
    out (a negative scale must not turn their -inf into +inf)."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, n, 20, generator=gen) for n in (37, 45, 45))
    mask = _mask(kind, 1, 2, 37, 45, gen)
    ref64 = attention_reference(q.double(), k.double(), v.double(), _to(mask, torch.float64), scale, False)
    out = tk["attention"].attention(q, k, v, mask, scale, False)
    assert_within_twice(out, attention_reference(q, k, v, mask, scale, False), ref64)


@needs_interpreter
@pytest.mark.parametrize("kind", ["bool", "neg_inf", "finfo_min"])
@pytest.mark.parametrize("tokens,keys", [(40, 33), (1, 70)])
def test_triton_attention_query_with_every_key_masked(tk, kind, tokens, keys):
    """As SDPA: zeros for a query whose keys are all masked out (False, -inf); the mean of the values where
    a finite mask (finfo.min) hides them all, since every score is then the same."""
    gen = torch.Generator().manual_seed(5)
    row = tokens // 2
    q, k, v = (torch.randn(1, 2, n, 20, generator=gen) for n in (tokens, keys, keys))
    mask = masked_throughout(kind, tokens, keys, row, gen)
    out = tk["attention"].attention(q, k, v, mask, 0.2, False)
    expect = torch.zeros_like(v[:, :, 0]) if kind != "finfo_min" else v.mean(2)
    torch.testing.assert_close(out[:, row], expect, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, attention_reference(q, k, v, mask, 0.2, False), rtol=2e-5, atol=2e-6)


@needs_interpreter
@pytest.mark.parametrize("where,mask_kind", NON_FINITE)
@pytest.mark.parametrize("tokens,keys", [(40, 150), (1, 70)])
def test_triton_attention_non_finite_inputs_give_nan_rows_as_sdpa(tk, tokens, keys, where, mask_kind):
    """A NaN or infinite entry of q or k makes the rows that score it NaN, as SDPA (a False keep-mask entry
    adds -inf, so a NaN score stays NaN; keys past the causal cut are not read)."""
    gen = torch.Generator().manual_seed(seed((tokens, keys, where, mask_kind)))
    q, k, v, mask, causal = non_finite_case(tokens, keys, where, mask_kind, gen)
    out = tk["attention"].attention(q, k, v, mask, 0.25, causal)
    assert_nan_rows_as_sdpa(out, q, k, v, mask, causal, 0.25)


@needs_interpreter
def test_launch_planning_calls_no_triton_constexpr_functions(tk, monkeypatch):
    """The launchers plan on the host with plain integer helpers: ``triton.cdiv`` / ``triton.next_power_of_2``
    are constexpr functions that cost 2-3 us a call from Python (an attention call's plan made 13 of them)."""
    import triton

    def refuse(*args, **kwargs):
        raise AssertionError("a triton constexpr function was called while planning launches")

    from adaptwin.kernels.rank_linear import _code_on, plan

    monkeypatch.setattr(triton, "cdiv", refuse)
    monkeypatch.setattr(triton, "next_power_of_2", refuse)
    gen = torch.Generator().manual_seed(1)
    q, kv = torch.randn(1, 2, 40, 40, generator=gen), torch.randn(1, 2, 300, 40, generator=gen)
    tk["attention"].launches(q, kv, kv, None, torch.empty(1, 40, 2, 40), 0.2, True)
    tk["attention"].launches(q[:, :, :1], kv, kv, None, torch.empty(1, 1, 2, 40), 0.2, False)  # keys split
    code = _code_on(torch.device("cpu"))
    for rows in (1, 40):
        for fmt in ("nf4", "int8", "fp"):
            fa = _factor(fmt, 64, torch.randn(96, 384, generator=gen))
            fb = _factor(fmt, 64, torch.randn(96, 432, generator=gen))
            for config in ({}, {"decode": "tiles"}):
                plan(torch.randn(rows, 384, generator=gen), *fa, *fb, None, code, config)
