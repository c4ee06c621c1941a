"""NF4 / int8 formats and the rank_linear op. (Quantised modules, QAT, save/load, CLI: tests/test_quant_modules.py.)"""

from __future__ import annotations

import pytest
import torch

from adaptwin.quant import QuantFormat, int8, nf4, sqnr_db

pytestmark = pytest.mark.usefixtures("one_thread")

FORMATS = [QuantFormat("nf4", 64), QuantFormat("nf4", 64, True), QuantFormat("nf4", 32),
           QuantFormat("int8", 0), QuantFormat("int8", 64)]
SIZES = [(1, 59), (3, 41), (7, 123), (4, 431), (6, 64)]  # odd sizes: short last blocks, odd element counts


def _ids(fmts):
    return [f"{f.kind}-{f.blocksize}{'-dq' if f.double_quant else ''}" for f in fmts]


# ---------------------------------------------------------------------------------------------- formats

def test_nf4_byte_layout_high_nibble_first():
    w = torch.tensor([1.0, -1.0, 0.0, 0.5, -0.25])  # one block: absmax 1
    packed, absmax = nf4.quantize(w, blocksize=64)
    assert packed.dtype == torch.uint8 and packed.shape == (3,)
    assert absmax.tolist() == [1.0]
    # codes: 1.0 -> 15, -1.0 -> 0, 0.0 -> 7, 0.5 -> 12 (0.4407), -0.25 -> 4 (-0.2844); odd count pads code 7
    assert packed.tolist() == [0xF0, 0x7C, 0x47]
    assert nf4.unpack(packed, 5).tolist() == [15, 0, 7, 12, 4]
    assert nf4.dequantize(packed, absmax, (5,)).tolist() == [nf4.NF4_CODE[i] for i in (15, 0, 7, 12, 4)]


@pytest.mark.parametrize("fmt", FORMATS, ids=_ids(FORMATS))
@pytest.mark.parametrize("shape", SIZES)
def test_roundtrip_layout_and_error(fmt, shape):
    gen = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    w = torch.randn(shape, generator=gen) * torch.rand(shape[0], 1, generator=gen)  # rows of different scale
    stored = fmt.quantize(w)
    layout = fmt.layout(shape)
    assert {k: (tuple(v.shape), v.dtype) for k, v in stored.items()} == layout
    assert sum(v.numel() * v.element_size() for v in stored.values()) == fmt.nbytes(shape)
    back = fmt.dequantize(stored, shape)
    assert back.shape == w.shape and back.dtype == torch.float32
    if not fmt.double_quant:  # dequantised values are fixed points (with 8-bit scales the absmax moves)
        assert torch.equal(fmt.dequantize(fmt.quantize(back), shape), back)
    if fmt.kind == "int8":  # rounding to the nearest step: error at most half a step, per group
        step = stored["scale"][:, None].expand(-1, fmt.blocksize or shape[1]).reshape(-1)[: w.numel()]
        assert ((back - w).abs().reshape(-1) <= step / 2 * (1 + 1e-6)).all()
    else:  # NF4: half the widest gap between codes (0.3038 · absmax, between -1 and -0.696) bounds the error
        absmax = fmt.scale(stored)
        per = torch.nn.functional.pad(w.reshape(-1), (0, -w.numel() % fmt.blocksize)).view(-1, fmt.blocksize)
        bound = (0.1520 * absmax[:, None]).expand_as(per).reshape(-1)[: w.numel()]
        bound = bound + (0.02 * absmax.max() if fmt.double_quant else 0)  # 8-bit scales: ~1 % scale error
        assert ((back - w).abs().reshape(-1) <= bound).all()


@pytest.mark.parametrize("fmt, floor", [(FORMATS[0], 20.0), (FORMATS[1], 20.0), (FORMATS[3], 40.0)],
                         ids=_ids(FORMATS[:2]) + ["int8-row"])
def test_sqnr_on_gaussian_weights(fmt, floor):
    # Measured on N(0, 1) 384x1536: NF4/64 20.7 dB (double quant the same to 0.01 dB), int8 per row 41.8 dB;
    # the floors leave ~0.7 / 1.8 dB for other seeds. 6.02 dB/bit: int8 is ~21 dB above NF4, as expected.
    w = torch.randn(384, 1536, generator=torch.Generator().manual_seed(0))
    assert sqnr_db(w, fmt.dequantize(fmt.quantize(w), w.shape)) > floor


def test_zero_rows_and_blocks():
    w = torch.zeros(3, 70)
    w[1, 5] = 2.0
    for fmt in FORMATS:
        back = fmt.dequantize(fmt.quantize(w), w.shape)
        assert torch.isfinite(back).all()
        assert torch.allclose(back, w, atol=2.0 * (0.02 if fmt.double_quant else 1e-6))


def test_double_quant_is_small_and_close():
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(3))
    single, double = QuantFormat("nf4", 64), QuantFormat("nf4", 64, True)
    a, b = single.dequantize(single.quantize(w), w.shape), double.dequantize(double.quantize(w), w.shape)
    assert double.nbytes(w.shape) < single.nbytes(w.shape)
    assert 8 * double.nbytes(w.shape) / w.numel() == pytest.approx(4 + 8 / 64 + 32 / 64 / 256 + 32 / w.numel())
    assert abs(sqnr_db(w, a) - sqnr_db(w, b)) < 0.1  # 8-bit scales cost almost nothing (measured 0.003 dB)


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="nf3", blocksize=64), "one of"),
    (dict(kind="nf4", blocksize=63), "even whole number"),
    (dict(kind="int8", blocksize=-1), "int8 blocksize"),
    (dict(kind="int8", blocksize=0, double_quant=True), "NF4 block scales only"),
])
def test_bad_format(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantFormat(**kwargs)


def test_bad_stored_tensors():
    with pytest.raises(ValueError, match="uint8 of shape"):
        nf4.dequantize(torch.zeros(3, dtype=torch.int8), torch.ones(1), (5,))
    with pytest.raises(ValueError, match="absmax must have shape"):
        nf4.dequantize(torch.zeros(3, dtype=torch.uint8), torch.ones(2), (5,))
    with pytest.raises(ValueError, match="scale must have shape"):
        int8.dequantize(torch.zeros(3, 4, dtype=torch.int8), torch.ones(4))


# ---------------------------------------------------------------------------------------------- bitsandbytes

def _bnb():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is optional (pip install bitsandbytes)")
    return bnb.functional


# bitsandbytes' native CPU dequantize_4bit mis-indexes the scales when the last dim is even but not a
# multiple of the blocksize (e.g. (64, 96): 28 % relative error against 9 % for its own pure-PyTorch
# backend, which agrees with ours bit for bit); our factors' rows are whole multiples of the blocksize.
@pytest.mark.parametrize("shape", [(64, 128), (96, 64), (7, 123), (3, 5)])
def test_nf4_matches_bitsandbytes(shape):
    F = _bnb()
    w = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    ref_q, ref_state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    packed, absmax = nf4.quantize(w, 64)
    assert torch.equal(ref_q.reshape(-1), packed) and torch.equal(ref_state.absmax, absmax)  # same bytes
    ours = nf4.dequantize(packed, absmax, shape)
    assert torch.equal(F.dequantize_4bit(ref_q, ref_state).reshape(shape), ours)  # same values
    assert torch.equal(torch.tensor(nf4.NF4_CODE), ref_state.code)


def test_nf4_double_quant_dequantises_like_bitsandbytes():
    F = _bnb()
    shape = (384, 1536)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    assert torch.equal(nf4.dynamic_map(), F.create_dynamic_map())
    ref_q, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    # their bytes, our dequantisation
    scales = nf4.dequantize_absmax(st.absmax, st.state2.absmax, st.offset.reshape(1))
    assert torch.equal(F.dequantize_4bit(ref_q, st).reshape(shape), nf4.dequantize(ref_q.reshape(-1), scales, shape))
    # our bytes, their dequantisation (our 8-bit scale codes may differ from theirs by one step for ties
    # of their search; see adaptwin/quant/nf4.py): put ours into their QuantState
    fmt = QuantFormat("nf4", 64, True)
    stored = fmt.quantize(w)
    st.absmax, st.state2.absmax, st.offset = stored["qabsmax"], stored["absmax2"], stored["offset"].reshape(())
    theirs = F.dequantize_4bit(stored["qweight"].reshape(-1, 1), st).reshape(shape)
    assert torch.equal(theirs, fmt.dequantize(stored, shape))


# ---------------------------------------------------------------------------------------------- op

def _op_args(x, a, fa, b, fb, bias):
    def factor(t, fmt):
        if t is None:
            return None, None, "fp", 0, []
        if fmt is None:
            return t, None, "fp", 0, list(t.shape)
        stored = fmt.quantize(t)
        return stored["qweight"], fmt.scale(stored), fmt.kind, fmt.blocksize, list(t.shape)
    return (x, *factor(a, fa), *factor(b, fb), bias)


OP_CASES = [  # (x shape, in, k, out, format a, format b, bias)
    ((2, 5, 40), 40, 12, 30, None, None, True),
    ((1, 1, 40), 40, 12, 30, FORMATS[0], FORMATS[0], True),  # batch-1 decode
    ((3, 7, 59), 59, 9, 43, FORMATS[1], FORMATS[3], False),
    ((4, 123), 123, 17, 31, FORMATS[4], None, True),
    ((2, 3, 64), 64, 24, None, FORMATS[2], None, True),  # in factor only (a q/k/v projection)
    ((2, 3, 24), None, 24, 64, None, FORMATS[0], True),  # out factor only (an output projection)
]


def _case(i):
    shape, n_in, k, n_out, fa, fb, has_bias = OP_CASES[i]
    gen = torch.Generator().manual_seed(10 + i)
    x = torch.randn(shape, generator=gen)
    a = torch.randn(k, n_in, generator=gen) if n_in else None
    b = torch.randn(k, n_out, generator=gen) if n_out else None
    bias = torch.randn(n_out or k, generator=gen) if has_bias else None
    return x, a, fa, b, fb, bias


@pytest.mark.parametrize("i", range(len(OP_CASES)))
def test_rank_linear_matches_dense_reference(i):
    x, a, fa, b, fb, bias = _case(i)
    args = _op_args(x, a, fa, b, fb, bias)
    y = torch.ops.adaptwin.rank_linear(*args)
    deq = [None if t is None else (t if f is None else f.dequantize(f.quantize(t), tuple(t.shape)))
           for t, f in ((a, fa), (b, fb))]
    ref = x.double()
    if deq[0] is not None:
        ref = ref @ deq[0].double().T
    if deq[1] is not None:
        ref = ref @ deq[1].double()
    if bias is not None:
        ref = ref + bias.double()
    # fp32 GEMMs of depth <= 123 against fp64: a few ulps of the result's magnitude
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("i", range(len(OP_CASES)))
def test_rank_linear_opcheck(i):
    x, a, fa, b, fb, bias = _case(i)
    x.requires_grad_(True)
    for t, f in ((a, fa), (b, fb)):
        if t is not None and f is None:
            t.requires_grad_(True)
    if bias is not None:
        bias.requires_grad_(True)
    torch.library.opcheck(torch.ops.adaptwin.rank_linear, _op_args(x, a, fa, b, fb, bias))


def test_rank_linear_gradients():
    gen = torch.Generator().manual_seed(1)
    x, a, b, bias = (torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True)
                     for s in ((2, 3, 7), (4, 7), (4, 5), (5,)))
    assert torch.autograd.gradcheck(lambda *t: torch.ops.adaptwin.rank_linear(*_op_args(*t[:2], None, t[2], None,
                                                                                          t[3])), (x, a, b, bias))
    fmt = FORMATS[0]  # packed factor: gradient reaches x through the dequantised factor
    stored = fmt.quantize(a.detach())
    y = torch.ops.adaptwin.rank_linear(x, stored["qweight"], fmt.scale(stored), "nf4", 64, [4, 7],
                                       None, None, "fp", 0, [], None)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.allclose(g, torch.ones(2, 3, 4, dtype=torch.float64) @ fmt.dequantize(stored, (4, 7), torch.float64))


def test_run_rank_linear_skips_autograd_only_when_nothing_needs_it():
    from adaptwin.ops.rank_linear import run_rank_linear

    x, a, fa, b, fb, bias = _case(1)
    args = _op_args(x, a, fa, b, fb, bias)
    expected = torch.ops.adaptwin.rank_linear(*args)
    with torch.no_grad():
        y = run_rank_linear(*args)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    assert y.grad_fn is None and not y.requires_grad
    # with a factor that needs a gradient the call records the op's backward, as the plain op does
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    y = run_rank_linear(*_op_args(x, a, None, None, None, None))
    assert y.grad_fn is not None
    assert torch.autograd.gradcheck(lambda x, a: run_rank_linear(*_op_args(x, a, None, None, None, None)), (x, a))
    with torch.no_grad():
        assert run_rank_linear(*_op_args(x, a, None, None, None, None)).grad_fn is None


def test_rank_linear_bad_arguments():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="at least one factor"):
        torch.ops.adaptwin.rank_linear(x, None, None, "fp", 0, [], None, None, "fp", 0, [], None)
    with pytest.raises(ValueError, match="a_format must be one of"):
        torch.ops.adaptwin.rank_linear(x, torch.randn(3, 8), None, "nf5", 0, [3, 8], None, None, "fp", 0, [], None)
    with pytest.raises(ValueError, match="x has 8 features"):
        torch.ops.adaptwin.rank_linear(x, torch.randn(3, 9), None, "fp", 0, [3, 9], None, None, "fp", 0, [], None)
    with pytest.raises(ValueError, match="needs a_scale"):
        torch.ops.adaptwin.rank_linear(x, torch.zeros(12, dtype=torch.uint8), None, "nf4", 64, [3, 8],
                                       None, None, "fp", 0, [], None)
