"""The Triton kernels compile for an H100 (sm_90) here, with no GPU: every launch variant, ahead of time.
This module: the attention kernel, and the whole check again under the device's triton; the rank_linear
kernels: test_kernels_sm90_linear.py; the compiling: sm90_tools.py.

The interpreter tests (test_kernels_triton.py) check the kernels' arithmetic but never run Triton's GPU
compiler, which rejects things the interpreter accepts (shapes, dtypes of dot operands, too much shared
memory). So each variant a real call would launch is built by the launchers' own `launch` functions from
CPU tensors of the call's dtypes, bound with Triton's specialisation rules for the CUDA backend, and
compiled to a cubin for sm_90 with Triton's bundled ptxas. On each cubin:
- no register spills (cuobjdump's LOCAL and STACK are 0) and shared memory within the H100's 227 KiB;
- 16-bit dots run on tensor cores (wgmma in the PTX), float32 "ieee" dots do not (no silent tf32).

Needs triton with its NVIDIA backend (the pip wheel has it); uses Triton internals (the JIT binder), so
it skips on a triton whose internals differ, saying so. Nothing is loaded or run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("compiles for a GPU; not under the interpreter", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ (its tuning sweeps) sits beside the package

from sm90_tools import DTYPES, H100_SHARED, check, compile_sm90, resources, sass_loops  # noqa: E402

# ------------------------------------------------------------------------------------------- attention
ATTENTION = [  # (dtype, heads, kv heads, width q, width v, mask, causal)
    ("fp32", 6, 6, 40, 40, None, False),
    ("fp16", 6, 6, 40, 40, None, False),
    ("bf16", 6, 6, 40, 40, None, False),
    ("fp16", 6, 6, 64, 64, None, False),  # the dense head width: what SDPA does at d_h = 64
    ("fp16", 20, 20, 20, 52, "bool", False),
    ("bf16", 20, 4, 24, 24, "float", True),  # grouped kv heads, additive mask, causal
    ("fp32", 6, 6, 13, 9, "bool", True),
]


def _attention_launch(dtype: str, heads: int, kv: int, dq: int, dv: int, mask: str | None, causal: bool,
                      config: dict | None = None, queries: int = 1500, every: bool = False):
    """The attention kernel's (kernel, args, kwargs) for these inputs; with ``every``, all of the call's."""
    from adaptwin.kernels import attention as ka

    t = torch.float32 if dtype == "fp32" else DTYPES[dtype]
    q = torch.empty(1, heads, queries, dq, dtype=t)
    k, v = torch.empty(1, kv, 1500, dq, dtype=t), torch.empty(1, kv, 1500, dv, dtype=t)
    m = None if mask is None else (torch.ones(1, 1, 1, 1500, dtype=torch.bool) if mask == "bool"
                                   else torch.zeros(1, 1, queries, 1500, dtype=t))
    out = torch.empty(1, queries, heads, dv, dtype=t)
    plan = ka.launches(q, k, v, m, out, dq ** -0.5, causal, config)
    launches = [(kernel, args, kwargs) for kernel, _, args, kwargs in plan]
    return launches if every else launches[0]


@pytest.mark.parametrize("case", ATTENTION, ids=lambda c: "{}-H{}kv{}-q{}v{}-{}-{}".format(*c))
def test_attention_compiles_for_sm90(case):
    kernel, args, kwargs = _attention_launch(*case)
    compiled = compile_sm90(kernel, args, kwargs)
    check(compiled, tensor_cores=case[0] != "fp32")
    if case[0] != "fp32":  # key / value tiles stream into shared memory asynchronously, whatever the width
        assert "async_copy_global_to_local" in compiled.asm["ttgir"]


def test_launches_ask_for_fused_multiply_adds(monkeypatch):
    """Every plan asks for FMA contraction itself, so Triton's default (contraction on up to 3.9, off from
    3.10, which 3.9 warns of) changes nothing: with the default turned off, the attention kernel's and the
    NF4 GEMV's PTX still has float32 FMAs (68 and 16 here); without the plans' option it has none, only
    non-contractible mul.rn / add.rn."""
    from adaptwin.kernels import LAUNCH_OPTIONS
    from test_kernels_sm90_linear import _linear_launches

    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "0")
    kernel, args, kwargs = _attention_launch("fp16", 6, 6, 40, 40, None, False)
    (gemv_kernel, _, gemv_args, gemv_kwargs), *_ = _linear_launches("fp16", 1, 1024, 256, 1024, "nf4", 64, True)
    for k, a, kw in ((kernel, args, kwargs), (gemv_kernel, gemv_args, gemv_kwargs)):
        assert kw["enable_fp_fusion"] is LAUNCH_OPTIONS["enable_fp_fusion"] is True
        fused = compile_sm90(k, a, kw)
        assert fused.metadata.enable_fp_fusion and re.search(r"\bfma\.rn\.f32", fused.asm["ptx"])
        unfused = compile_sm90(k, a, {key: v for key, v in kw.items() if key != "enable_fp_fusion"})
        assert not re.search(r"\bfma\.rn\.f32", unfused.asm["ptx"])  # what Triton's default would give


@pytest.mark.parametrize("width", [40, 48])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_one_part_attention_compiles_for_sm90(dtype, width):
    """ONE_PART (benchmarks/gpu_kernels.py times it beside the default): a two-part width padded to one
    64-wide dot, spill-free on tensor cores."""
    from adaptwin.kernels import attention as ka

    kernel, args, kwargs = _attention_launch(dtype, 6, 6, width, width, None, False,
                                             {**ka.default_config(torch.empty(1, 1, 1500, 1)), "ONE_PART": True})
    assert (kwargs["D1Q"], kwargs["HAS_Q2"], kwargs["D1V"], kwargs["HAS_V2"]) == (64, False, 64, False)
    check(compile_sm90(kernel, args, kwargs), tensor_cores=True)


def _exps_after_pv(compiled) -> list[float]:
    """For each loop of the cubin with wgmmas and exp2s: the share of its exp2s (MUFU.EX2) issued after its first
    P·V wgmma, the first HGMMA after the scores' last wait (WARPGROUP.DEPBAR) before the exp2s. A P·V issued
    before the softmax's exponentials is on the tensor cores while they run."""
    found = []
    for body in sass_loops(compiled):
        ops = [re.sub(r"^@!?U?P\w+\s+", "", i).split()[0] for i in body]
        exps = [n for n, op in enumerate(ops) if op.startswith("MUFU.EX2")]
        waits = [n for n, op in enumerate(ops) if op.startswith("WARPGROUP.DEPBAR") and exps and n < exps[0]]
        pv = [n for n, op in enumerate(ops) if op.startswith("HGMMA") and waits and n > waits[-1]]
        if exps and pv:
            found.append(sum(n > pv[0] for n in exps) / len(exps))
    return found


@pytest.mark.parametrize("case", ATTENTION, ids=lambda c: "{}-H{}kv{}-q{}v{}-{}-{}".format(*c))
def test_deferred_pv_compiles_for_sm90(case):
    """DEFER_PV (benchmarks/gpu_kernels.py times it beside the default): each key tile's P·V is issued after
    the next tile's scores, so on tensor cores that wgmma is in flight while the next tile's exp2s run: in
    every loop over 90 % of them come after it, against at most 53 % in the plain loop (triton 3.6 and 3.9),
    whose P·V waits for its own tile's probabilities (all of them, or with 32-key tiles the first half, for
    its first k-step). Spill-free; causal tensor-core calls keep the plain loop (the plan turns
    it off)."""
    from adaptwin.kernels import attention as ka

    dtype, causal = case[0], case[6]
    config = ka.deferred_pv_config(torch.empty(1, 1, 1500, case[3], dtype=DTYPES[dtype]), case[5] is not None,
                                   causal, case[4])
    kernel, args, kwargs = _attention_launch(*case, config)
    assert kwargs["DEFER_PV"] is not (causal and dtype != "fp32")
    deferred = compile_sm90(kernel, args, kwargs)
    check(deferred, tensor_cores=dtype != "fp32")
    if dtype != "fp32" and not causal:
        plain = compile_sm90(*_attention_launch(*case))
        assert _exps_after_pv(plain) and max(_exps_after_pv(plain)) < 0.6, _exps_after_pv(plain)
        assert _exps_after_pv(deferred) and min(_exps_after_pv(deferred)) > 0.9, _exps_after_pv(deferred)


@pytest.mark.parametrize("widths", [(9, 9), (16, 16), (20, 20), (24, 24), (32, 32), (36, 36), (40, 40), (48, 48),
                                    (52, 52), (64, 64), (24, 48), (64, 40)], ids=lambda w: "q{}v{}".format(*w))
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_prefill_tiles_compile_for_sm90(dtype, widths):
    """Unmasked, non-causal 16-bit prefill plans 128-query tiles three key tiles deep (eight warps where a width
    is two dot parts, 128 registers at widths 17-32 under triton 3.6); spill-free at every width up to 64,
    grouped heads too. Masked and causal calls keep 64-query tiles two deep."""
    from adaptwin.kernels import attention as ka

    dq, dv = widths
    kernel, args, kwargs = _attention_launch(dtype, 20, 4, dq, dv, None, False)
    two = dq in (36, 40, 48) or dv in (36, 40, 48)
    assert (kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["num_warps"], kwargs["num_stages"]) == (128, 64, 8 if two
                                                                                                    else 4, 3)
    capped = 17 <= dq <= 32 and 17 <= dv <= 32 and ka._CAP_REGISTERS  # triton <= 3.6: 128 registers, no spills
    assert kwargs.get("maxnreg") == (128 if capped else None)
    check(compile_sm90(kernel, args, kwargs), tensor_cores=True)
    for mask, causal in (("bool", False), (None, True)):
        assert _attention_launch(dtype, 20, 4, dq, dv, mask, causal)[2]["BLOCK_M"] == 64
    # Whisper tiny's 6 heads: under a wave of programs, so the keys are split, and then no register cap
    kernel, args, kwargs = _attention_launch(dtype, 6, 6, dq, dv, None, False)
    assert kwargs["PARTIAL"] and kwargs["BLOCK_M"] == 128 and "maxnreg" not in kwargs
    check(compile_sm90(kernel, args, kwargs), tensor_cores=True)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("mask", [None, "bool"])
def test_decoding_attention_compiles_for_sm90(dtype, mask):
    """One query against a 30 s window of keys (the decoder's cross-attention): 16-row tiles, the keys split
    over the grid, then merged."""
    plan = _attention_launch(dtype, 6, 6, 40, 40, mask, False, queries=1, every=True)
    assert [k.fn.__name__ for k, _, _ in plan] == ["_attention_kernel", "_combine_kernel"]  # keys split
    assert plan[0][2]["BLOCK_M"] == 16 and plan[0][2]["PARTIAL"]
    check(compile_sm90(*plan[0]), tensor_cores=dtype != "fp32")
    check(compile_sm90(*plan[1]), tensor_cores=False)


def test_head_widths_split_into_dot_parts():
    """Widths are cut into power-of-two parts only where that does less work than padding."""
    from adaptwin.kernels.attention import _parts

    assert {w: _parts(w) for w in (1, 16, 20, 24, 32, 36, 40, 48, 52, 64, 80, 96)} == {
        1: (16, 0), 16: (16, 0), 20: (32, 0), 24: (32, 0), 32: (32, 0), 36: (32, 16), 40: (32, 16), 48: (32, 16),
        52: (64, 0), 64: (64, 0), 80: (64, 16), 96: (64, 32)}


@pytest.mark.slow
def test_every_tuning_config_compiles_for_sm90():
    """benchmarks/gpu_kernels.py --tune times each of these; none may fail to build or spill."""
    from benchmarks.gpu_kernels import TUNE

    bad = []
    for config in TUNE:
        for width in (16, 48):
            kernel, args, kwargs = _attention_launch("fp16", 6, 6, width, width, None, False, dict(config))
            compiled = compile_sm90(kernel, args, kwargs)
            use = resources(compiled)
            if use["LOCAL"] or compiled.metadata.shared > H100_SHARED:
                bad.append((config, width, use, compiled.metadata.shared))
    assert not bad, bad


# ------------------------------------------------------------------------------- the device's triton
DEVICE_TRITON = "3.6.0"  # the triton of the lent GPU machine (its compiler differs from newer ones)


@pytest.mark.slow
def test_every_check_passes_under_the_device_triton():
    """This module and test_kernels_sm90_linear.py again, in a child process on triton DEVICE_TRITON,
    installed (from the local wheel store or an index) into a cache folder. Each check must run there, not
    skip: a triton whose internals these modules cannot drive would otherwise pass unseen."""
    if os.environ.get("ADAPTWIN_SM90_DEVICE_CHILD") == "1":
        pytest.skip("already the child on the device's triton")
    target = Path.home() / ".cache" / "adaptwin" / f"triton-{DEVICE_TRITON}"
    if not (target / "triton" / "__init__.py").exists():
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                               f"triton=={DEVICE_TRITON}"], capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            pytest.skip(f"triton {DEVICE_TRITON} cannot be installed here: {proc.stderr.strip()[-300:]}")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "ADAPTWIN_SM90_DEVICE_CHILD": "1",
           "PYTHONPATH": os.pathsep.join([str(target), str(root), os.environ.get("PYTHONPATH", "")])}
    modules = [__file__, str(Path(__file__).with_name("test_kernels_sm90_linear.py"))]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow or not slow",
                           *modules], cwd=root, env=env, capture_output=True, text=True, timeout=3000)
    tail = proc.stdout[-3000:] + proc.stderr[-1500:]
    assert f"triton {DEVICE_TRITON}" in _child_version(env), tail
    assert proc.returncode == 0 and " passed" in proc.stdout, tail
    skipped = re.search(r"(\d+) skipped", proc.stdout)
    assert skipped is not None and int(skipped.group(1)) == 1, tail  # only this test skips there


def _child_version(env: dict) -> str:
    out = subprocess.run([sys.executable, "-c", "import triton; print('triton', triton.__version__)"], env=env,
                         capture_output=True, text=True, timeout=120)
    return out.stdout
