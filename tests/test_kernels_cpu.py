"""The CPU C++ kernels of ``torch.ops.adaptwin.*`` against the pure-PyTorch references.

Criterion (flash-attention's rule): on fresh random inputs, the kernel's error against a float64 run of
the reference is at most twice the reference's own error at the input precision. Sizes are odd on
purpose (T = 1, 59, 1500; d = 384, 431; ranks 1-64, mostly not powers of two). The kernels come from
``adaptwin._C`` (built by ``make install`` / ``pip install --no-build-isolation -e .``); without it these
tests skip, and test_kernel_sources.py checks that the sources compile. test_kernels_portable.py runs these
cases again on a build without the x86 SIMD loops (what ARM and non-AVX-512 CPUs run).
"""

from __future__ import annotations

import zlib

import pytest
import torch

from adaptwin import quant
from adaptwin.ops import backends
from adaptwin.ops.attention import attention_reference
from adaptwin.ops.rank_linear import rank_linear_reference

pytestmark = pytest.mark.skipif(
    not (backends.has_kernel("adaptwin::attention", "cpu") and backends.has_kernel("adaptwin::rank_linear", "cpu")),
    reason="adaptwin._C is not built (run `make install`); the reference ops are in use",
)


def seed(case: tuple) -> int:
    """A seed fixed per case (Python's hash() of strings changes from run to run)."""
    return zlib.crc32(repr(case).encode())


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-300))


def assert_within_twice(out: torch.Tensor, ref: torch.Tensor, ref64: torch.Tensor) -> None:
    """Kernel error <= 2 x reference error, both against float64. The reference error is floored at one
    ulp of the output dtype: with rank 1 the output is one rounded dot product times a vector, and the
    reference's error there can be near 0 by luck (the ratio reached 3x over 30 seeds at 1e-7 errors). In
    float32 the floor is 8 ulps: a kernel that sums K = 4096 products in 16- or 32-wide tiles, in another
    order than cuBLAS, landed 2.3-7.0 ulps from float64 on an H100 where cuBLAS landed 0.8-1.6 (still
    1/150 of a tf32 product's error, which this check is there to catch)."""
    err, ref_err = rel_err(out, ref64), rel_err(ref, ref64)
    floor = torch.finfo(out.dtype).eps * (8 if out.dtype == torch.float32 else 1)
    assert torch.isfinite(out).all()
    assert err <= 2 * max(ref_err, floor), f"kernel error {err:.3e} > 2 x reference error {ref_err:.3e}"


# --------------------------------------------------------------------------------------------------
# attention

# (B, H, Hkv, T, S, Dq, Dv, causal, mask): widths 1..64, odd lengths, GQA, cross-attention (T != S)
ATTENTION_CASES = [
    (1, 6, 6, 59, 59, 26, 20, False, None),
    (2, 3, 3, 59, 59, 20, 26, False, "bool"),
    (1, 2, 2, 1, 1500, 20, 20, False, "float_keys"),  # decoding step against a long (rank-space) cache
    (1, 2, 2, 3, 77, 13, 13, False, "bool_keys"),  # T below the query-vectorised path's threshold
    (1, 2, 1, 123, 123, 52, 39, True, None),  # causal + GQA
    (2, 4, 2, 77, 50, 17, 9, False, "float"),  # cross-attention with a full additive mask
    (1, 2, 2, 40, 40, 1, 64, True, None),
    (1, 1, 1, 1500, 1500, 40, 52, False, None),
    (1, 2, 2, 37, 301, 64, 3, False, "bool_keys"),
    # T < 8 takes the row path (decoding: keys and values read in place, 256-key softmax tiles)
    (1, 4, 2, 1, 700, 52, 39, False, "float"),  # GQA, a full additive mask, three key tiles
    (2, 2, 2, 5, 5, 1, 64, True, None),  # causal, width 1
    (1, 3, 3, 7, 257, 40, 40, False, "bool"),  # one key past a tile
    (1, 4, 2, 2, 300, 26, 34, True, "bool"),  # causal T < S (top-left), GQA, even widths with tails (AVX2 bf16)
]


def _mask(kind: str | None, b: int, h: int, t: int, s: int, gen: torch.Generator) -> torch.Tensor | None:
    if kind is None:
        return None
    if kind == "bool":
        return torch.rand(b, h, t, s, generator=gen) > 0.3
    if kind == "bool_keys":  # padding mask: the last keys of each sequence hidden
        keep = torch.ones(b, 1, 1, s, dtype=torch.bool)
        keep[..., s - s // 3:] = False
        return keep
    if kind == "float_keys":
        return torch.randn(b, 1, 1, s, generator=gen)
    return torch.randn(b, 1, t, s, generator=gen)


def _to(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return mask if mask is None or mask.dtype == torch.bool else mask.to(dtype)


def check_attention_case(case: tuple, dtype: torch.dtype, device: str = "cpu", op=None) -> None:
    """``torch.ops.adaptwin.attention`` (or ``op``, a function with its signature) on ``device`` for one (B, H, Hkv,
    T, S, Dq, Dv, causal, mask) case, against its reference (also test_kernels_cuda.py)."""
    b, h, hkv, t, s, dq, dv, causal, kind = case
    gen = torch.Generator().manual_seed(seed(case))
    # queries/keys ~N(0, 1) at scale 1/sqrt(dq): attention neither uniform nor one-hot
    q, k, v = (torch.randn(b, n, m, d, generator=gen).to(device)
               for n, m, d in ((h, t, dq), (hkv, s, dq), (hkv, s, dv)))
    mask = _mask(kind, b, h, t, s, gen)
    mask = None if mask is None else mask.to(device)
    scale = dq ** -0.5
    ref64 = attention_reference(q.double(), k.double(), v.double(), _to(mask, torch.float64), scale, causal)
    lo = [x.to(dtype) for x in (q, k, v)]
    ref = attention_reference(*lo, _to(mask, dtype), scale, causal)
    out = (op or torch.ops.adaptwin.attention)(*lo, _to(mask, dtype), scale, causal)
    assert out.shape == (b, t, h, dv) and out.dtype == dtype and out.is_contiguous() and out.device == q.device
    assert_within_twice(out, ref, ref64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "B{}H{}kv{}T{}S{}q{}v{}{}-{}".format(*c))
def test_attention_matches_reference(case, dtype):
    check_attention_case(case, dtype)


@pytest.mark.parametrize("tokens", [59, 3], ids=["lanes", "rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_takes_strided_heads(dtype, tokens):
    """q/k/v as the projections produce them: (B, T, H·w) viewed as (B, H, T, w), not contiguous."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, tokens, 3 * 26, generator=gen)
    q = x.view(2, tokens, 3, 26).transpose(1, 2)
    ref64 = attention_reference(*(q.double(),) * 3, None, 0.2, False)
    lo = q.to(dtype)
    out = torch.ops.adaptwin.attention(lo, lo, lo, None, 0.2, False)
    assert_within_twice(out, attention_reference(*(lo.contiguous(),) * 3, None, 0.2, False), ref64)


def test_bf16_attention_rounds_like_sdpa():
    """bf16 inputs: the kernel's error against float64 is SDPA's (bf16 products, float32 sums and softmax,
    P rounded to bf16), not a float32 kernel's; and odd key counts (a last key without a pair) are exact."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, 21, generator=gen) for n in (64, 65, 65))
    ref64 = attention_reference(q.double(), k.double(), v.double(), None, 0.25, False)
    lo = [x.bfloat16() for x in (q, k, v)]
    out = torch.ops.adaptwin.attention(*lo, None, 0.25, False)
    assert out.dtype == torch.bfloat16
    assert_within_twice(out, attention_reference(*lo, None, 0.25, False), ref64)
    # dropping the 65th key must equal masking it out
    keep = torch.ones(1, 1, 1, 65, dtype=torch.bool)
    keep[..., 64] = False
    torch.testing.assert_close(torch.ops.adaptwin.attention(*lo, keep, 0.25, False),
                               torch.ops.adaptwin.attention(lo[0], lo[1][:, :, :64], lo[2][:, :, :64], None, 0.25,
                                                            False), rtol=0, atol=0)


def test_attention_fully_masked_rows_are_zero():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, n, 20, generator=gen) for n in (40, 33, 33))
    keep = torch.rand(1, 2, 40, 33, generator=gen) > 0.5
    keep[:, :, 5] = False
    out = torch.ops.adaptwin.attention(q, k, v, keep, 0.2, False)
    assert (out[:, 5] == 0).all()
    torch.testing.assert_close(out, attention_reference(q, k, v, keep, 0.2, False), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b, t, s, dq, dv", [(2, 1, 5, 4, 0), (2, 1, 5, 0, 4), (2, 20, 5, 0, 4), (2, 3, 0, 4, 4),
                                             (2, 20, 0, 4, 4), (0, 3, 5, 4, 4), (2, 0, 5, 4, 4)])
def test_attention_without_elements_is_sdpa(b, t, s, dq, dv, dtype):
    """q, k or v without elements have no storage (a null data pointer): the SIMD row and lane paths' pointers
    into them were undefined (UBSan: "applying non-zero offset to null pointer", found under the sanitizers on
    2026-11-26); now they give what the reference gives (zeros without keys, the mean of v at width 0)."""
    gen = torch.Generator().manual_seed(b * 1000 + t * 100 + s * 10 + dq + dv)
    q, k, v = (torch.randn(b, 2, n, d, generator=gen).to(dtype) for n, d in ((t, dq), (s, dq), (s, dv)))
    out = torch.ops.adaptwin.attention(q, k, v, None, 0.5, False)
    torch.testing.assert_close(out, attention_reference(q, k, v, None, 0.5, False), rtol=0, atol=0)


def masked_throughout(kind: str, t: int, s: int, row: int, gen: torch.Generator) -> torch.Tensor:
    """A (1, 2, t, s) mask hiding about half the keys, and every key from query ``row``: False (``bool``),
    or added: -inf (``neg_inf``), or the float32 / bfloat16 finfo.min Hugging Face masks with (finite)."""
    keep = torch.rand(1, 2, t, s, generator=gen) > 0.5
    keep[:, :, row] = False
    if kind == "bool":
        return keep
    fill = {"neg_inf": float("-inf"), "finfo_min": torch.finfo(torch.float32).min,
            "finfo_min_bf16": torch.finfo(torch.bfloat16).min}[kind]
    mask = torch.zeros(1, 2, t, s).masked_fill(~keep, fill)
    return mask.bfloat16() if kind == "finfo_min_bf16" else mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["bool", "neg_inf", "finfo_min", "finfo_min_bf16"])
@pytest.mark.parametrize("tokens,keys", [(40, 33), (3, 70), (1, 1)], ids=["lanes", "rows", "one-key"])
def test_attention_query_with_every_key_masked(kind, tokens, keys, dtype):
    # As SDPA: a query whose keys are all masked out (False, -inf) gets zeros; a finite mask, however large,
    # is added as it is, so every score of that query is the same (-3.4e38) and it gets the mean of the
    # values. finfo.min times log2e (the kernels' log2 units) overflows to -inf: zeros there would be wrong.
    gen = torch.Generator().manual_seed(5)
    row = tokens // 2
    q, k, v = (torch.randn(1, 2, n, 20, generator=gen).to(dtype) for n in (tokens, keys, keys))
    mask = masked_throughout(kind, tokens, keys, row, gen)
    out = torch.ops.adaptwin.attention(q, k, v, mask, 0.2, False)
    expect = torch.zeros_like(v[:, :, 0]) if kind in ("bool", "neg_inf") else v.mean(2)  # (1, 2, 20)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, row].float(), expect.float(), rtol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    ref = attention_reference(q, k, v, mask, 0.2, False)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2 if dtype == torch.bfloat16 else 2e-5,
                               atol=1e-2 if dtype == torch.bfloat16 else 2e-6)


@pytest.mark.parametrize("kind", ["bool", "causal", "float_min", "float_plus"])
@pytest.mark.parametrize("tokens", [40, 3], ids=["lanes", "rows"])
def test_attention_softmax_max_is_taken_after_the_mask(kind, tokens):
    # The query-vectorised kernels take a score tile's maximum as they compute the scores; a mask changes
    # the scores afterwards. One key with a raw score far above the others (hidden by the mask, or raised
    # further by a positive additive mask) must not set the softmax's maximum: 2^(s - max) would underflow
    # to 0 for every visible key, or overflow where the mask adds to a score.
    gen = torch.Generator().manual_seed(7)
    t, s, w = tokens, 70, 24
    u = torch.randn(w, generator=gen)
    u /= u.norm()
    q = torch.randn(1, 2, t, w, generator=gen) + 2.0 * u  # every query has a component along u
    k, v = (torch.randn(1, 2, s, w, generator=gen) for _ in range(2))
    # causal: key t // 2 is hidden from the first half of the queries and seen by the rest (top-left, as SDPA)
    big = t // 2 if kind == "causal" else 3
    k[:, :, big] = 400.0 * u  # raw scores ~ 800 / sqrt(w) = 163 natural units: 2^-235 for the others
    mask, causal = None, kind == "causal"
    if kind == "bool":
        mask = torch.ones(1, 1, 1, s, dtype=torch.bool)
        mask[..., big] = False
    elif kind == "float_min":
        mask = torch.zeros(1, 1, 1, s)
        mask[..., big] = torch.finfo(torch.float32).min
    elif kind == "float_plus":  # no large key; the mask raises one key by 300 (2^433 if not in the maximum)
        k[:, :, big] = torch.randn(w, generator=gen)
        mask = torch.zeros(1, 1, t, s)
        mask[..., 11] = 300.0
    scale = w ** -0.5
    out = torch.ops.adaptwin.attention(q, k, v, mask, scale, causal)
    mask64 = mask if mask is None or mask.dtype == torch.bool else mask.double()
    ref = attention_reference(q.double(), k.double(), v.double(), mask64, scale, causal)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def nan_rows(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """(B, T, H) bool: the query rows attention makes NaN, as SDPA does: those with a NaN or +inf score
    (NaN or infinite entries of q or k) once the mask is added (a boolean mask as 0 / -inf: a NaN score
    stays NaN under False, an +inf one becomes NaN), the keys past the causal cut left out (SDPA's CPU and
    CUDA flash kernels never read them)."""
    kk = k.double().repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = q.double() @ kk.transpose(-1, -2)  # (B, H, T, S)
    if mask is not None:
        s = s + (torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
                 if mask.dtype == torch.bool else mask.double())
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).tril().logical_not(), float("-inf"))
    return (s.isnan() | (s == float("inf"))).any(-1).transpose(1, 2)


def runs_adaptwin_kernel() -> bool:
    """Whether attention calls run the CPU kernels of csrc/cpu (AVX-512 or AVX2), else ATen's SDPA."""
    features = backends.cpu_features()
    return features["avx512"] or features["avx2"]


def non_finite_case(tokens: int, keys: int, where: str, mask_kind: str | None, gen: torch.Generator) -> tuple:
    """``(q, k, v, mask, causal)``: grouped-query attention (2 x 4 heads of width 20 over 2 key heads) with
    one NaN or +inf entry (``where``: q_nan, q_inf, k_nan, k_inf) in q's last query row or in a key that the
    causal cut leaves to some queries; ``mask_kind`` None, "bool" (hiding that key from half the queries),
    "additive" or "causal"."""
    q = torch.randn(2, 4, tokens, 20, generator=gen)
    k, v = (torch.randn(2, 2, keys, 20, generator=gen) for _ in range(2))
    bad = float("nan") if where.endswith("nan") else float("inf")
    row, key, col = tokens - 1, min(keys // 3, tokens // 2), 7
    if where.startswith("q"):
        q[1, 2, row, col] = bad
        k[1, 1, :, col] = k[1, 1, :, col].abs()  # scores +inf (-inf for every key would read as masked)
    else:
        k[0, 1, key, col] = bad  # seen by heads 2 and 3; +inf where q[..., col] > 0, -inf where < 0
        q[0, 2, :, col] = q[0, 2, :, col].abs()  # (head 3's signs left to chance)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(2, 1, tokens, keys, generator=gen) > 0.3
        mask[..., : tokens // 2, key] = False
        mask[..., -1] = True
    elif mask_kind == "additive":
        mask = torch.randn(2, 1, tokens, keys, generator=gen)
    return q, k, v, mask, mask_kind == "causal"


def assert_nan_rows_as_sdpa(out: torch.Tensor, q, k, v, mask, causal: bool, scale: float) -> None:
    """``out`` (B, T, H, Dv) is NaN in exactly the rows `nan_rows` names, whole, and its other rows match the
    reference where that is finite."""
    expect = nan_rows(q, k, mask, causal)
    assert expect.any() and not expect.all()
    assert torch.equal(out.isnan().any(-1), expect)
    assert not out[expect].isfinite().any()  # whole rows
    ref = attention_reference(q, k, v, mask, scale, causal)
    keep = ~expect & ref.isfinite().all(-1)
    low = q.dtype in (torch.bfloat16, torch.float16)
    tol = {"rtol": 2e-2, "atol": 1e-2} if low else {"rtol": 2e-5, "atol": 2e-6}
    torch.testing.assert_close(out[keep].float(), ref[keep].float(), **tol)


NON_FINITE = [pytest.param(where, mask_kind, id=f"{where}-{mask_kind}")
              for where in ("q_nan", "q_inf", "k_nan", "k_inf") for mask_kind in (None, "bool", "additive", "causal")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("where,mask_kind", NON_FINITE)
@pytest.mark.parametrize("tokens,keys", [(40, 150), (3, 300), (1, 1)], ids=["lanes", "rows", "one-key"])
def test_attention_non_finite_inputs_give_nan_rows_as_sdpa(tokens, keys, where, mask_kind, dtype):
    # A NaN or infinite entry in q or k makes every query row that scores it NaN, as SDPA: the kernels'
    # exp2 once clamped its argument with max(x, -150), which turns NaN into -150 (max returns its second
    # operand where one is NaN), so such a key got weight 0, or, from a NaN query, a finite row; and a
    # False keep-mask entry replaced the score by -inf, where SDPA adds -inf (NaN stays NaN).
    if not runs_adaptwin_kernel():  # (its CPU flash kernel gives finite rows for a NaN query, for bf16
        # infinities and for a NaN single key, where SDPA's math definition and these kernels give NaN)
        pytest.skip("ATen's SDPA runs this call on this CPU (or under this ADAPTWIN_CPU_CAP)")
    gen = torch.Generator().manual_seed(seed((tokens, keys, where, mask_kind)))
    q, k, v, mask, causal = non_finite_case(tokens, keys, where, mask_kind, gen)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = torch.ops.adaptwin.attention(q, k, v, mask, 0.25, causal)  # (B, T, H, Dv)
    assert_nan_rows_as_sdpa(out, q, k, v, mask, causal, 0.25)


# --------------------------------------------------------------------------------------------------
# rank_linear


def _factor(fmt: str, blocksize: int, w: torch.Tensor) -> tuple:
    """Op arguments (data, scale, format, blocksize, shape) of a (k, n) factor in ``fmt``."""
    if fmt == "fp":
        return w, None, "fp", 0, list(w.shape)
    f = quant.QuantFormat(fmt, blocksize)
    stored = f.quantize(w)
    return stored["qweight"], f.scale(stored), fmt, blocksize, list(w.shape)


NONE = (None, None, "fp", 0, [])
# (rows, in, rank, out, format, blocksize): rows <= 8 take the decode path, more the dequantise+GEMM one;
# one row of NF4 with widths a multiple of the blocksize (itself of 32) takes the fused register decode;
# 384/1536 with blocksize 64 take the vectorised decoders, 431/433 and blocksize 6 the unaligned ones.
LINEAR_CASES = [
    (1, 384, 96, 384, "nf4", 64),
    (1, 431, 37, 433, "nf4", 64),
    (1, 384, 1, 1536, "nf4", 64),
    (1, 416, 29, 480, "nf4", 32),  # fused decode with a partial 256-column chunk (480 = 256 + 224)
    (1, 768, 192, 800, "nf4", 32),  # 800 = 3·256 + 32: a last chunk of two 16-column groups
    (1, 3072, 13, 1536, "nf4", 128),  # blocks of 128: four 32-code steps per scale
    # 2-8 rows (beam search, batched decoding): the fused decode, each code decoded once for all rows; column
    # passes of 16·(16 / rows) and the remainders (480 = 2·128 + 128 + 64 + 32 at 5 rows)
    (2, 384, 96, 384, "nf4", 64),
    (5, 416, 29, 480, "nf4", 32),
    (8, 768, 40, 800, "nf4", 32),
    (7, 3072, 13, 1536, "nf4", 128),
    (13, 768, 20, 800, "nf4", 32),  # 9-32 rows of NF4 stay on the decode path: row blocks of 8 + 5
    (32, 416, 29, 480, "nf4", 32),  # four blocks of 8 (bf16 x: 16 rows at most, so the GEMMs)
    # int8 with per-row scales, or flat blocks of whole 32-code steps: the fused kernels too (no lane order)
    (1, 384, 96, 384, "int8", 0),
    (5, 768, 40, 800, "int8", 32),
    (1, 768, 40, 800, "int8", 32),  # one row, flat blocks: the AVX2 register decode's int8 case too
    (16, 416, 29, 480, "int8", 32),
    (8, 3072, 13, 1536, "int8", 128),
    (3, 431, 20, 384, "nf4", 6),
    (59, 431, 52, 384, "nf4", 64),
    (1, 384, 64, 431, "int8", 0),
    (2, 431, 13, 384, "int8", 64),
    (59, 384, 40, 1536, "int8", 0),
    (1, 1536, 27, 384, "int8", 48),
    (1, 431, 33, 384, "fp", 0),
    (59, 384, 3, 431, "fp", 0),
]


def check_rank_linear_case(case: tuple, dtype: torch.dtype, device: str = "cpu", op=None) -> None:
    """``torch.ops.adaptwin.rank_linear`` (or ``op``, a function with its signature) on ``device`` for one
    (rows, in, rank, out, format, blocksize) case, against its reference (also test_kernels_cuda.py)."""
    rows, n_in, rank, n_out, fmt, bs = case
    gen = torch.Generator().manual_seed(seed(case))
    a = torch.randn(rank, n_in, generator=gen) / n_in**0.5
    b = torch.randn(rank, n_out, generator=gen) / rank**0.5
    bias = torch.randn(n_out, generator=gen).to(device)
    x = torch.randn(1, rows, n_in, generator=gen).to(device)
    fa, fb = (tuple(v.to(device) if isinstance(v, torch.Tensor) else v for v in _factor(fmt, bs, w)) for w in (a, b))
    ref64 = rank_linear_reference(x.double(), *fa, *fb, bias.double())
    if fmt == "fp":
        fa, fb = (fa[0].to(dtype), *fa[1:]), (fb[0].to(dtype), *fb[1:])
    ref = rank_linear_reference(x.to(dtype), *fa, *fb, bias.to(dtype))
    out = (op or torch.ops.adaptwin.rank_linear)(x.to(dtype), *fa, *fb, bias.to(dtype))
    assert out.shape == (1, rows, n_out) and out.dtype == dtype and out.device == x.device
    assert_within_twice(out, ref, ref64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: "M{}-{}x{}x{}-{}{}".format(*c))
def test_rank_linear_matches_reference(case, dtype):
    check_rank_linear_case(case, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [c for c in LINEAR_CASES if c[0] <= 16 and c[4] != "fp"],
                         ids=lambda c: "M{}-{}x{}x{}-{}{}".format(*c))
def test_rank_linear_16bit_decoding(case, dtype):
    """A few rows of 16-bit x with quantised factors: the decode path widens x and the bias in its loops and
    rounds the float32 result once to x's dtype (no ATen casts)."""
    check_rank_linear_case(case, dtype)


def test_rank_linear_16bit_decoding_takes_strided_x():
    """x as a non-contiguous (1, 1, in) view, bf16, no bias: the same result as from a contiguous copy."""
    gen = torch.Generator().manual_seed(2)
    fa, fb = (_factor("nf4", 64, torch.randn(24, n, generator=gen)) for n in (384, 96))
    x = torch.randn(1, 384, 2, generator=gen).to(torch.bfloat16)[..., 0].unsqueeze(0)  # stride 2 along in
    assert not x.is_contiguous()
    out = torch.ops.adaptwin.rank_linear(x, *fa, *fb, None)
    assert out.shape == (1, 1, 96) and out.dtype == torch.bfloat16
    assert torch.equal(out, torch.ops.adaptwin.rank_linear(x.contiguous(), *fa, *fb, None))
    ref64 = rank_linear_reference(x.double(), *fa, *fb, None)
    assert_within_twice(out, rank_linear_reference(x, *fa, *fb, None), ref64)


@pytest.mark.parametrize("rows", [1, 17])
@pytest.mark.parametrize("which", ["a", "b"])
def test_rank_linear_one_factor(rows, which):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(29, 431, generator=gen)
    f = _factor("nf4", 64, w)
    if which == "a":
        x = torch.randn(rows, 431, generator=gen)
        args = (x, *f, *NONE, None)
    else:
        x = torch.randn(rows, 29, generator=gen)
        args = (x, *NONE, *f, torch.randn(431, generator=gen))
    ref64 = rank_linear_reference(args[0].double(), *args[1:-1], None if args[-1] is None else args[-1].double())
    assert_within_twice(torch.ops.adaptwin.rank_linear(*args), rank_linear_reference(*args), ref64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("formats", [("fp", "nf4"), ("nf4", "fp"), ("fp", None), (None, "fp"), ("fp", "int8")])
@pytest.mark.parametrize("rows", [1, 3])
def test_rank_linear_decoding_with_fp_factors(rows, formats, dtype):
    """fp factors (the LoRA directions quantised modules keep in higher precision), alone or beside a packed
    one, in float32 / bf16 / fp16, take the decode path's loops for a few rows: within twice the reference's
    error, and the same as the dequantise-and-GEMM path that 17 rows take."""
    gen = torch.Generator().manual_seed(9)
    n_in, rank, n_out = 384, 48, 448
    fa = NONE if formats[0] is None else _factor(formats[0], 64, torch.randn(rank, n_in, generator=gen) / 20)
    fb = NONE if formats[1] is None else _factor(formats[1], 64, torch.randn(rank, n_out, generator=gen) / 7)
    fa, fb = ((f[0].to(dtype), *f[1:]) if f[2] == "fp" and f[0] is not None else f for f in (fa, fb))
    n_x = n_in if formats[0] is not None else rank
    width = n_out if formats[1] is not None else rank
    x, bias = torch.randn(17, n_x, generator=gen).to(dtype), torch.randn(width, generator=gen).to(dtype)
    out = torch.ops.adaptwin.rank_linear(x[:rows], *fa, *fb, bias)
    f64 = tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() and i in (0, 5) else t
                for i, t in enumerate((*fa, *fb)))
    ref64 = rank_linear_reference(x[:rows].double(), *f64, bias.double())
    assert_within_twice(out, rank_linear_reference(x[:rows], *fa, *fb, bias), ref64)
    many = torch.ops.adaptwin.rank_linear(x, *fa, *fb, bias)[:rows]
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), many.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("k,n,rows", [(1000, 384, 1), (37, 431, 3), (48, 384, 8)])
def test_rank_linear_bf16_fp_factors_widen_exactly(k, n, rows):
    """bf16 fp factors on the decoding path are widened a chunk at a time (not copied whole to float32 per
    call): the result is the same bits as with the widened factors given in float32."""
    gen = torch.Generator().manual_seed(k + n)
    a, b = torch.randn(k, n, generator=gen).bfloat16(), torch.randn(k, 40, generator=gen).bfloat16()
    x = torch.randn(rows, n, generator=gen).bfloat16()
    op = torch.ops.adaptwin.rank_linear
    for fb in (NONE, (b, None, "fp", 0, [k, 40])):
        wide = fb if fb[0] is None else (fb[0].float(), *fb[1:])
        assert torch.equal(op(x, a, None, "fp", 0, [k, n], *fb, None),
                           op(x, a.float(), None, "fp", 0, [k, n], *wide, None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,n", [(1, 1), (15, 17), (16, 16), (17, 33), (40, 15), (33, 136)])
def test_rank_linear_fp_factor_edges(k, n, dtype):
    """The fp-factor GEMV kernels (csrc/cpu/fp_gemv.h) at their edges: factor rows in blocks of 16 and a rest,
    row widths with short tails (a bf16 tail is read past the row where the matrix goes on, copied at its
    end), 1-8 rows of x, each factor alone and both: within twice the reference's error."""
    gen = torch.Generator().manual_seed(seed((k, n, str(dtype))))
    a, b = torch.randn(k, n, generator=gen).to(dtype), torch.randn(k, n + 3, generator=gen).to(dtype)
    fa, fb = (a, None, "fp", 0, [k, n]), (b, None, "fp", 0, [k, n + 3])
    for rows in (1, 2, 5, 8):
        for args in ((torch.randn(rows, n, generator=gen), fa, NONE, k),
                     (torch.randn(rows, k, generator=gen), NONE, fb, n + 3),
                     (torch.randn(rows, n, generator=gen), fa, fb, n + 3)):
            x, f1, f2, width = args
            x, bias = x.to(dtype), torch.randn(width, generator=gen).to(dtype)
            out = torch.ops.adaptwin.rank_linear(x, *f1, *f2, bias)
            f64 = [tuple(t.double() if i == 0 and t is not None else t for i, t in enumerate(f)) for f in (f1, f2)]
            ref64 = rank_linear_reference(x.double(), *f64[0], *f64[1], bias.double())
            assert out.shape == (rows, width) and out.dtype == dtype
            assert_within_twice(out, rank_linear_reference(x, *f1, *f2, bias), ref64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rank_linear_fp_factor_tail_leaves_next_row_out(dtype):
    """A row's short tail read past its end (bf16) must not bring the next row's values in: with inf at the
    start of every other row, the rows before them stay finite and match the reference."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(6, 17, generator=gen)
    a[1::2, 0] = float("inf")
    a = a.to(dtype)
    x = torch.randn(2, 17, generator=gen).to(dtype)
    out = torch.ops.adaptwin.rank_linear(x, a, None, "fp", 0, [6, 17], *NONE, None)
    ref = rank_linear_reference(x, a, None, "fp", 0, [6, 17], *NONE, None)
    assert torch.isfinite(out[:, 0::2]).all() and not torch.isfinite(out[:, 1::2]).any()
    torch.testing.assert_close(out[:, 0::2].float(), ref[:, 0::2].float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("rows", [1, 3, 17])
def test_rank_linear_leaves_inputs_alone(rows):
    """No input is written (the decode path starts its output from the bias: it must copy it)."""
    gen = torch.Generator().manual_seed(8)
    fa, fb = _factor("nf4", 64, torch.randn(7, 384, generator=gen)), _factor("nf4", 64, torch.randn(7, 384))
    x, bias = torch.randn(rows, 384, generator=gen), torch.randn(384, generator=gen)
    args = (x, *fa, *fb, bias)
    before = [t.clone() if isinstance(t, torch.Tensor) else t for t in args]
    first = torch.ops.adaptwin.rank_linear(*args)
    torch.testing.assert_close(torch.ops.adaptwin.rank_linear(*args), first, rtol=0, atol=0)
    for t, t0 in zip(args, before):
        if isinstance(t, torch.Tensor):
            assert torch.equal(t, t0)
    torch.library.opcheck(torch.ops.adaptwin.rank_linear.default, args)

@pytest.mark.parametrize("factors", ["both", "a", "b"])
@pytest.mark.parametrize("fmt,bs", [("nf4", 64), ("int8", 0)])
@pytest.mark.parametrize("rows", [1, 5])
def test_rank_linear_decode_is_the_same_on_any_thread_count(fmt, rows, bs, factors):
    """The decode path splits a large enough call into parts, one per thread (both products: parts that wait
    on each other between the products; one factor: at::parallel_for's chunks): 1-5 threads (more than this
    machine's cores included: parts then wait for, or take over, parts whose thread has not started) give
    bit-identical results, within the reference's error. Rank 203 = 8·25 + 3 also runs the 8-row kernel's
    remainders."""
    gen = torch.Generator().manual_seed(11)
    fa, fb = _factor(fmt, bs, torch.randn(203, 768, generator=gen) / 28), _factor(fmt, bs, torch.randn(203, 832) / 14)
    x, bias = torch.randn(rows, 768, generator=gen), torch.randn(832, generator=gen)
    if factors == "a":
        fb, bias = NONE, bias[:203]
    elif factors == "b":
        fa, x = NONE, torch.randn(rows, 203, generator=gen)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3, 5):
            torch.set_num_threads(1)
            torch.ops.adaptwin.rank_linear(-x, *fa, *fb, bias)  # other values left in any reused buffer
            torch.set_num_threads(threads)
            outs.append(torch.ops.adaptwin.rank_linear(x, *fa, *fb, bias))
    finally:
        torch.set_num_threads(before)
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    assert_within_twice(outs[0], rank_linear_reference(x, *fa, *fb, bias),
                        rank_linear_reference(x.double(), *fa, *fb, bias.double()))



# --------------------------------------------------------------------------------------------------
# opcheck: schema, fake tensors, autograd registration, AOT dispatch, with the C++ kernels active


def test_opcheck_attention():
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, n, d, generator=gen) for n, d in ((19, 12), (23, 12), (23, 7)))
    keep = torch.rand(1, 1, 19, 23, generator=gen) > 0.2
    torch.library.opcheck(torch.ops.adaptwin.attention.default, (q, k, v, keep, 0.3, False))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k[:, :, :19], v[:, :, :19]))
    torch.library.opcheck(torch.ops.adaptwin.attention.default, (qg, kg, vg, None, 0.3, True))


def test_opcheck_rank_linear():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 40, generator=gen)
    fa, fb = _factor("nf4", 64, torch.randn(6, 40, generator=gen)), _factor("int8", 0, torch.randn(6, 24))
    torch.library.opcheck(torch.ops.adaptwin.rank_linear.default, (x, *fa, *fb, torch.randn(24)))
    x1 = torch.randn(1, 40, generator=gen)
    torch.library.opcheck(torch.ops.adaptwin.rank_linear.default, (x1, *fa, *fb, None))


def test_attention_gradients_match_sdpa():
    """The op's backward (explicit softmax derivative) against SDPA's autograd, with GQA and a mask."""
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, n, 21, d, generator=gen, dtype=torch.float64) for n, d in ((4, 10), (2, 10), (2, 6)))
    keep = torch.rand(2, 1, 21, 21, generator=gen) > 0.3
    keep[..., 0] = True
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = torch.ops.adaptwin.attention(*leaves, keep, 0.4, False)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    leaves2 = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*leaves2, attn_mask=keep, scale=0.4, enable_gqa=True)
    grads2 = torch.autograd.grad(ref.transpose(1, 2).square().sum(), leaves2)
    for g, g2 in zip(grads, grads2):
        torch.testing.assert_close(g, g2)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "whisper"])
def test_compressed_models_run_the_kernel_as_the_reference(name, impl, monkeypatch):
    """Whole compressed models, every output row: the C++ kernel against the op's reference (SDPA). Left-padded
    prompts (gpt2, llama) give query rows with every key masked; under ``eager`` Hugging Face masks them with
    finfo.min (finite), and the kernels once gave those rows zeros where SDPA averages the values (logits
    4.5-5.8 apart)."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    import tiny_models as tm

    import adaptwin
    from adaptwin.ops import attention as attention_module

    row = tm.ROW_BY_NAME[name]
    model = adaptwin.compress(row.build(impl), adaptwin.CompressionConfig(ratio=0.5, twins=row.twins)).eval()
    key = "logits" if name in ("gpt2", "llama", "whisper") else "last_hidden_state"
    with torch.no_grad():
        out = getattr(model(**row.inputs()), key)
        monkeypatch.setattr(attention_module, "_run_op", attention_module.attention_reference)
        ref = getattr(model(**row.inputs()), key)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
