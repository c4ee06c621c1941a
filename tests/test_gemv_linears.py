"""`GemvLinear`, `adaptwin.gemv_output_head` and `adaptwin.gemv_linears`: a decoding step's linear layers (the
output head included) on the CPU kernels' streaming GEMV (``torch.ops.adaptwin.rank_linear`` with the weight as
its one fp factor), the rest on `F.linear`; `LowRankLinear`'s factors on the same path; `prepare_inference`."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

import adaptwin

sys.path.insert(0, os.path.dirname(__file__))
import tiny_models  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gemv_output_head_on_whisper(tmp_path, monkeypatch):
    from adaptwin.fusion import GemvLinear
    from adaptwin.ops import backends

    model = adaptwin.compress(tiny_models.whisper(), adaptwin.CompressionConfig(ratio=0.5)).eval()
    head, table = model.proj_out, model.model.decoder.embed_tokens
    keys = set(model.state_dict())
    x = torch.randn(2, 3, head.in_features)
    with torch.no_grad():
        one, many = head(x[:1, :1]), head(x)
    assert adaptwin.gemv_output_head(model) == "proj_out" and adaptwin.gemv_output_head(model) is None
    assert type(model.proj_out) is GemvLinear and model.proj_out.weight is table.weight  # the tie stays
    assert set(model.state_dict()) == keys
    calls = []
    fast = backends.FAST.get("rank_linear")
    if fast is not None:
        monkeypatch.setitem(backends.FAST, "rank_linear", lambda *a: calls.append(a[0].shape) or fast(*a))
    big = torch.randn(4, 5, head.in_features)  # 20 rows: F.linear, as nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(head(x[:1, :1]), one, rtol=1e-5, atol=1e-5)  # another summation order
        torch.testing.assert_close(head(x[:, :1]), many[:, :1], rtol=1e-5, atol=1e-5)  # 2 rows: still the GEMV
        assert torch.equal(head(x), many)  # 6 rows of this small weight: F.linear (up to 4 take the GEMV)
        assert torch.equal(head(big), F.linear(big, head.weight, head.bias))
        half = torch.nn.Linear(head.in_features, head.out_features).bfloat16()
        half.__class__ = type(head)
        xh = x.bfloat16()
        for part in (xh[:1, :1], xh[:2, :1], xh):  # bf16: the GEMV up to 4 rows, F.linear beyond
            want = F.linear(part.double(), half.weight.double(), half.bias.double())
            got = half(part)
            assert got.dtype == torch.bfloat16
            torch.testing.assert_close(got.double(), want, rtol=2 ** -7, atol=1e-3)  # bf16 output rounding
        assert torch.equal(half(xh), F.linear(xh, half.weight, half.bias))
    rows = [torch.Size([1, 1, head.in_features]), torch.Size([2, 1, head.in_features]),
            torch.Size([1, 1, head.in_features]), torch.Size([2, 1, head.in_features])]
    assert calls == (rows if fast is not None else [])
    y = head(x[:1, :1].clone().requires_grad_())  # a gradient to record: F.linear
    y.sum().backward()
    assert table.weight.grad is not None and len(calls) == len(rows if fast is not None else [])
    with torch.no_grad():
        out = tiny_models.whisper_generate(model)
    adaptwin.save(model, tmp_path / "m")  # the class is not saved: load gives nn.Linear again
    assert type(adaptwin.load(tmp_path / "m").proj_out) is torch.nn.Linear
    assert adaptwin.gemv_output_head(model, enable=False) == "proj_out" and type(model.proj_out) is torch.nn.Linear
    with torch.no_grad():
        assert torch.equal(tiny_models.whisper_generate(model).sequences, out.sequences)


def test_gemv_output_head_leaves_packed_heads_and_prepare_inference_does_all_three():
    from adaptwin.fusion import GemvLinear

    packed = adaptwin.compress(tiny_models.whisper(), adaptwin.CompressionConfig(
        ratio=0.5, quantization="nf4", quantize_embeddings=True))
    assert adaptwin.gemv_output_head(packed) is None  # QuantTiedLinear runs the kernels already
    model = adaptwin.compress(tiny_models.gpt2(), adaptwin.CompressionConfig(ratio=0.5)).eval()
    with torch.no_grad():
        ref = tiny_models.lm_output(model(**tiny_models.lm_inputs()))
    done = adaptwin.prepare_inference(model)
    assert done["gemv_head"] == "lm_head" and done["contiguous"] == ["transformer.h.0"]
    assert done["gemv"] and all(type(model.get_submodule(p)) is GemvLinear for p in done["gemv"])
    assert "lm_head" not in done["gemv"] and not any(type(m) is torch.nn.Linear for m in model.modules())
    assert adaptwin.prepare_inference(model) == {"fused": [], "contiguous": [], "gemv_head": None, "gemv": []}
    with torch.no_grad():
        torch.testing.assert_close(tiny_models.lm_output(model(**tiny_models.lm_inputs())), ref, rtol=1e-5,
                                   atol=1e-5)
    undone = adaptwin.prepare_inference(model, enable=False)
    assert undone["gemv_head"] == "lm_head" and undone["contiguous"] == ["transformer.h.0"]
    assert sorted(undone["gemv"]) == sorted(done["gemv"]) and type(model.lm_head) is torch.nn.Linear
    assert not any(type(m) is GemvLinear for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_linear_rows_by_weight_size_and_dtype(dtype, monkeypatch):
    """`GemvLinear` takes the GEMV for up to 8 rows of a float32 weight of GEMV_LARGE elements or more (6 in
    bfloat16), up to 4 rows of smaller ones, and matches F.linear to rounding; `LowRankLinear` takes it per
    factor for up to 4 rows."""
    from adaptwin.compressors.ffn_svd.layer import LowRankLinear
    from adaptwin.fusion import GemvLinear
    from adaptwin.ops import backends
    from adaptwin.ops.rank_linear import GEMV_LARGE

    calls = []
    fast = backends.FAST.get("rank_linear")
    if fast is None:
        pytest.skip("needs adaptwin._C")
    monkeypatch.setitem(backends.FAST, "rank_linear", lambda *a: calls.append(a[0].shape[0]) or fast(*a))
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-2)
    gen = torch.Generator().manual_seed(0)
    for out_features, large in ((GEMV_LARGE // 256, True), (96, False)):
        lin = torch.nn.Linear(256, out_features).to(dtype)
        lin.__class__ = GemvLinear
        want_rows = (8 if dtype == torch.float32 else 6) if large else 4
        for rows in (1, 2, 4, 5, 6, 7, 8, 9):
            x = torch.randn(rows, 256, generator=gen).to(dtype)
            calls.clear()
            with torch.no_grad():
                got = lin(x)
            assert calls == ([rows] if rows <= want_rows else []), (out_features, rows, calls)
            torch.testing.assert_close(got.double(), F.linear(x.double(), lin.weight.double(), lin.bias.double()),
                                       **tol)
    low = LowRankLinear(48, 40, 6, 2).to(dtype)
    with torch.no_grad():
        for p in low.parameters():
            p.normal_(generator=gen)
        for rows in (1, 4, 5):
            x = torch.randn(1, rows, 48, generator=gen).to(dtype)
            calls.clear()
            got = low(x)
            assert calls == ([1, 1] if rows <= 4 else []), (rows, calls)
            h = F.linear(x.double(), low.in_factor.double()).to(dtype).double()  # h in the factors' dtype, as F.linear
            ref = F.linear(h, low.out_factor.double(), low.bias.double())
            torch.testing.assert_close(got.double(), ref, **tol)
    x = torch.randn(1, 1, 48, generator=gen).to(dtype).requires_grad_()
    calls.clear()
    low(x).sum().backward()  # a gradient to record: the GEMMs, with autograd
    assert calls == [] and x.grad is not None


def test_gemv_modules_read_parametrized_weights():
    """`GemvLinear` and `LowRankLinear` read their parameters from ``_parameters`` (cheaper than attribute access
    per decoding call), except where a parametrization (`torch.nn.utils.parametrize`) makes them properties:
    there the parametrized values are used, on the GEMV path and off it."""
    from torch.nn.utils import parametrize

    from adaptwin.compressors.ffn_svd.layer import LowRankLinear
    from adaptwin.fusion import GemvLinear

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    gen = torch.Generator().manual_seed(4)
    lin = torch.nn.Linear(24, 10)
    lin.__class__ = GemvLinear
    low = LowRankLinear(24, 10, 3, 1)
    with torch.no_grad():
        for p in low.parameters():
            p.normal_(generator=gen)
    parametrize.register_parametrization(lin, "weight", Double())
    parametrize.register_parametrization(low, "in_factor", Double())
    for rows in (1, 6):  # the GEMV path, then F.linear
        x = torch.randn(rows, 24, generator=gen)
        with torch.no_grad():
            torch.testing.assert_close(lin(x), F.linear(x, 2 * lin.parametrizations.weight.original, lin.bias))
            h = F.linear(x, 2 * low.parametrizations.in_factor.original)
            torch.testing.assert_close(low(x), F.linear(h, low.out_factor, low.bias))
