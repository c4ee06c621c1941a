"""attend's CPU width padding (T·S >= 256²) against its explicit need_weights path, in fp64 as the oracle."""

import pytest
import torch
import torch.nn.functional as F

from adaptwin.ops import attend
from adaptwin.ops.attention import _cpu_width, _sdpa_width


@pytest.mark.parametrize("b,h,hkv,t,s,dq,dv", [
    (2, 6, 6, 259, 259, 39, 39),   # Whisper-tiny at ratio 0.5: 39 -> 40
    (1, 8, 2, 300, 300, 23, 17),   # GQA, Dq != Dv: both -> 24, flash instead of the math path
    (1, 4, 4, 300, 300, 5, 64),    # q/k padded up to v's width
    (1, 4, 2, 257, 311, 33, 47),   # T != S, odd sizes
])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_sdpa_matches_explicit(b, h, hkv, t, s, dq, dv, mask_kind, dtype):
    gen = torch.Generator().manual_seed(t * dq + dv)
    q = torch.randn(b, t, h, dq, generator=gen).transpose(1, 2)  # (B, H, T, Dq), strided like TwinAttention's
    k = torch.randn(b, hkv, s, dq, generator=gen)
    v = torch.randn(b, hkv, s, dv, generator=gen)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(b, 1, t, s, generator=gen) > 0.3
        mask[..., 0] = True
    elif mask_kind == "float":
        mask = torch.randn(b, 1, t, s, generator=gen)
    causal = t == s and mask is None
    assert _sdpa_width(q, k, v) is not None  # these shapes take the padded path
    ref, _ = attend(q.double(), k.double(), v.double(), None if mask is None else (
        mask if mask.dtype == torch.bool else mask.double()), 0.3, is_causal=causal, need_weights=True)
    out, _ = attend(q.to(dtype), k.to(dtype), v.to(dtype), None if mask is None or mask.dtype == torch.bool
                    else mask.to(dtype), 0.3, is_causal=causal)
    plain, _ = attend(q.to(dtype), k.to(dtype), v.to(dtype), None if mask is None or mask.dtype == torch.bool
                      else mask.to(dtype), 0.3, is_causal=causal, need_weights=True)  # plain PyTorch, same dtype
    assert out.shape == (b, t, h, dv)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    err_plain = ((plain.double() - ref).norm() / ref.norm()).item()
    # flash-attention's rule: no more than ~2x plain PyTorch's error at the same precision (fp32: both ~3e-7;
    # bf16: padded flash ~2e-3, the explicit path ~2e-3, measured).
    assert err <= 2 * err_plain + 1e-6, (err, err_plain)


def test_width_rule():
    assert [_cpu_width(d) for d in (8, 16, 17, 19, 25, 34, 36, 39, 41, 49, 57, 64, 127)] == [
        16, 16, 17, 24, 32, 34, 36, 40, 48, 49, 64, 64, 128]


def test_small_problems_are_not_padded():
    q = torch.randn(1, 6, 1, 39)
    kv = torch.randn(1, 6, 1500, 39)
    assert _sdpa_width(q, kv, kv) is None  # decoding: padding K/V each step would double the time


@pytest.mark.parametrize("need_weights", [False, True])
def test_causal_alignment_is_the_same_on_both_paths(need_weights):
    # With no mask and more keys than queries, both paths keep the first T keys, as HF's SDPA path does.
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 4)
    out, _ = attend(q, k, v, None, 0.3, is_causal=True, need_weights=need_weights)
    ref = F.scaled_dot_product_attention(q, k[:, :, :5], v[:, :, :5], is_causal=True, scale=0.3)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask_kind", ["bool_keys", "float_keys", "float"])
def test_op_reference_takes_a_mask_and_the_causal_rule_together(mask_kind):
    """The op's reference folds `is_causal` into the mask (CUDA's SDPA refuses both): for key masks
    (B, 1, 1, S) and full ones, the same as softmax over the masked, causally cut scores in float64."""
    from adaptwin.ops.attention import _probabilities, attention_reference

    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 7, 5, generator=gen, dtype=torch.float64) for _ in range(3))
    if mask_kind == "bool_keys":
        mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
        mask[1, ..., 4:] = False
    else:
        mask = torch.randn(2, 1, 1 if mask_kind == "float_keys" else 7, 7, generator=gen, dtype=torch.float64)
    out = attention_reference(q, k, v, mask, 0.4, True)  # (B, T, H, Dv)
    expected = (_probabilities(q, k, mask, 0.4, True) @ v).transpose(1, 2)
    assert out.shape == (2, 7, 3, 5)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
