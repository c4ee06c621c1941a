"""Quantised low-rank modules: QAT bit-exactness, every architecture through compress/save/load, the stored
bytes, fine-tuning the fake-quantised factors, config errors, and the CLI flags. (The NF4 / int8 formats and
the rank_linear op: tests/test_quant.py.)"""

from __future__ import annotations

import contextlib
import io
import math

import pytest
import torch

import adaptwin
from adaptwin.compressors.quantized import (
    QuantLinear,
    QuantLowRankLinear,
    fake_quantize,
    pack_modules,
    quantize_modules,
)
from adaptwin.compressors.quantized.layer import _QuantModule
from adaptwin.quant import QuantFormat
from tests.tiny_models import ROWS

pytestmark = pytest.mark.usefixtures("one_thread")

QAT_FORMATS = [QuantFormat("nf4", 64, True), QuantFormat("int8", 0)]  # NF4 with double quant, int8 per row


def _tiny_bert():
    return next(r for r in ROWS if r.name == "bert")


def _master(row, fmt: QuantFormat, quantize_lora: bool):
    """A compressed tiny model with its factors swapped for quantised modules in the master (QAT) state."""
    small = adaptwin.compress(row.build("sdpa"), adaptwin.CompressionConfig(ratio=0.4))
    record = adaptwin.compression_record(small)
    quantize_modules(small, record.modules, fmt, quantize_lora)
    return small, record


@pytest.mark.parametrize("fmt", QAT_FORMATS, ids=["nf4-64-dq", "int8-0"])
@pytest.mark.parametrize("quantize_lora", [False, True])
def test_qat_packs_bit_exactly(fmt, quantize_lora):
    """Train the fake-quantised master factors a few Adam steps; the packed model then dequantises to the
    very values the last forward pass used (bit for bit) and computes the same outputs to float32 rounding
    (the packed factors' kernels decode in registers and sum in another order than the master's GEMMs)."""
    row = _tiny_bert()
    small, record = _master(row, fmt, quantize_lora)
    inputs = row.inputs()
    with torch.no_grad():
        target = row.output(row.build("sdpa")(**inputs))
    params = [p for p in small.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    losses = []
    for _ in range(4):
        loss = torch.nn.functional.mse_loss(row.output(small(**inputs)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # the straight-through gradient trains the factors
    quant = [m for m in small.modules() if isinstance(m, _QuantModule)]
    assert quant and all(not m.packed for m in quant)
    used = {}
    for i, m in enumerate(quant):
        for f in m._factors.values():
            w = m._direction_major(f).detach()
            used[i, f.name] = fake_quantize(w[f.idx_q] if f.split else w, fmt)
    with torch.no_grad():
        before = row.output(small(**inputs))
    pack_modules(small, record.modules)
    for i, m in enumerate(quant):
        assert m.packed
        for f in m._factors.values():
            q, _ = m._parts(f)
            assert torch.equal(fmt.dequantize({k: getattr(m, f"{f.name}_{k}") for k in fmt.layout(tuple(q[4]))},
                                              tuple(q[4])), used[i, f.name])
    with torch.no_grad():
        torch.testing.assert_close(row.output(small(**inputs)), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_quantised_compress_save_load(row, tmp_path):
    """Every architecture: factors really packed (no fp master copy), close to the fp compressed model,
    and bit-identical after save/load."""
    model = row.build("sdpa")
    inputs = row.inputs()
    config = dict(ratio=0.4, twins=row.twins)
    with torch.no_grad():
        fp = row.output(adaptwin.compress(model, adaptwin.CompressionConfig(**config))(**inputs))
        int8_out = row.output(adaptwin.compress(model, adaptwin.CompressionConfig(**config, quantization="int8"))(
            **inputs))
    # Relative output distance to the fp compressed model, measured on these tiny models (std 0.3 weights
    # amplify errors through the layers): int8 per row 0.009-0.017, NF4 0.15-0.31 (NF4 is ~21 dB worse per
    # matrix, i.e. ~11x the error). Floors at about 2x and 1.5x the worst row.
    assert (int8_out - fp).norm() / fp.norm() < 0.04
    small = adaptwin.compress(model, adaptwin.CompressionConfig(**config, quantization="nf4", double_quant=True))
    quant = [m for m in small.modules() if isinstance(m, _QuantModule)]
    assert quant and all(m.packed for m in quant)
    for m in quant:
        for f in m._factors.values():
            assert f.name not in m._parameters  # the fp master factor is gone
            assert getattr(m, f"{f.name}_qweight").dtype == torch.uint8
    with torch.no_grad():
        out = row.output(small(**inputs))
    assert (out - fp).norm() / fp.norm() < 0.45
    adaptwin.save(small, tmp_path / "q")
    loaded = adaptwin.load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(row.output(loaded(**inputs)), out)
    entries = adaptwin.compression_record(loaded).modules.values()
    assert {e["compressor"] for e in entries} == {"quantized"}


def test_lora_directions_stay_fp_unless_asked():
    row = _tiny_bert()
    model = row.build("sdpa")
    lora = adaptwin.compress(model, adaptwin.CompressionConfig(ratio=0.4, quantization="int8"))
    allq = adaptwin.compress(model, adaptwin.CompressionConfig(ratio=0.4, quantization="int8", quantize_lora=True))
    spec = adaptwin.compression_record(lora).modules
    ffn = next(p for p, e in spec.items() if e["spec"]["base"] == "svd")
    m = lora.get_submodule(ffn)
    assert isinstance(m, QuantLowRankLinear)
    lr = m.lora_rank
    assert lr > 0 and m.in_factor_lora.shape == (lr, m.in_features) and m.out_factor_lora.shape == (lr, m.out_features)
    assert m.in_factor_qweight.shape == (m.rank, m.in_features)
    m2 = allq.get_submodule(ffn)
    assert "in_factor_lora" not in dict(m2.named_parameters())
    assert m2.in_factor_qweight.shape == (m.rank + lr, m.in_features)
    att = next(mod for mod in lora.modules() if isinstance(mod, QuantLinear) and mod.role == "in")
    f = att._factors["weight"]
    assert att.weight_lora.shape == (f.blocks * f.lora, f.n) and f.lora > 0


def test_compressed_bytes_at_most_030_of_fp32():
    """NF4 + double quantisation with quantised LoRA: the compressed modules' stored bytes (codes, scales,
    biases) are <= 0.30x their fp32 bytes at the same ranks; with LoRA directions in fp32, they are more."""
    row = _tiny_bert()
    model = row.build("sdpa")

    def nbytes(m):
        paths = adaptwin.compression_record(m).modules
        return sum(t.numel() * t.element_size() for n, t in m.state_dict().items()
                   if any(n.startswith(p + ".") for p in paths))

    fp = nbytes(adaptwin.compress(model, adaptwin.CompressionConfig(ratio=0.4)))
    q = nbytes(adaptwin.compress(model, adaptwin.CompressionConfig(ratio=0.4, quantization="nf4", double_quant=True,
                                                                   quantize_lora=True)))
    q_lora = nbytes(adaptwin.compress(model, adaptwin.CompressionConfig(ratio=0.4, quantization="nf4",
                                                                        double_quant=True)))
    assert q <= 0.30 * fp
    assert q < q_lora < fp


def test_qat_through_compress_with_calibration():
    """compress(calibration=...) fine-tunes the fake-quantised factors, then packs them: the packed model's
    error is the one fine-tuning reached, and lower than quantising without fine-tuning."""
    row = _tiny_bert()
    model = row.build("sdpa")
    gen = torch.Generator().manual_seed(7)
    batches = [{"input_ids": torch.randint(1, 64, (4, 9), generator=gen)} for _ in range(4)]
    cfg = adaptwin.CompressionConfig(ratio=0.4, quantization="nf4")
    ft = adaptwin.FinetuneConfig(epochs=3, lr=1e-3, progress=False, holdout=0.0)
    tuned = adaptwin.compress(model, cfg, calibration=batches, finetune=ft)
    plain = adaptwin.compress(model, cfg)
    assert all(m.packed for m in tuned.modules() if isinstance(m, _QuantModule))

    def err(m):
        with torch.no_grad():
            return sum((m(**b).last_hidden_state - model(**b).last_hidden_state).norm().item() for b in batches)

    assert err(tuned) < err(plain)
    layers = adaptwin.compression_record(tuned).finetune["layers"]
    assert all(r["error_after"] < r["error_before"] for r in layers)


def test_config_errors_and_json_roundtrip():
    for kwargs, message in [
        (dict(quantization="fp8"), "quantization must be one of"),
        (dict(quantization="nf4", quant_blocksize=63), "even whole number"),
        (dict(quantization="int8", quant_blocksize=0), "or None for one scale per row"),
        (dict(quantization="int8", double_quant=True), "NF4 block scales only"),
        (dict(double_quant=True), "need quantization"),
        (dict(quantize_lora=True), "needs quantization"),
    ]:
        with pytest.raises(ValueError, match=message):
            adaptwin.CompressionConfig(ratio=0.4, **kwargs)
    cfg = adaptwin.CompressionConfig(ratio=0.4, quantization="int8", quant_blocksize=128)
    assert cfg.quant_format() == QuantFormat("int8", 128)
    assert adaptwin.CompressionConfig.from_dict(cfg.to_dict()) == cfg
    assert adaptwin.CompressionConfig(ratio=0.4, quantization="nf4").quant_format() == QuantFormat("nf4", 64)
    with pytest.raises(ValueError, match="compressor 'quantized' compresses wrapper sites"):
        adaptwin.compress(_tiny_bert().build("sdpa"), adaptwin.CompressionConfig(ratio=0.4, ffn_method="quantized"))


def test_packed_modules_refuse_layerwise_finetuning():
    small = adaptwin.compress(_tiny_bert().build("sdpa"), adaptwin.CompressionConfig(ratio=0.4, quantization="nf4"))
    path, entry = next(iter(adaptwin.compression_record(small).modules.items()))
    with pytest.raises(ValueError, match="cannot be fine-tuned"):
        adaptwin.get_compressor("quantized").lora_mask(small.get_submodule(path), entry["spec"])


def test_cli_quantization_and_inspect(tmp_path):
    from transformers import BertConfig, BertModel

    from adaptwin.cli import main

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=32)).save_pretrained(tmp_path / "m")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["compress", str(tmp_path / "m"), "--out", str(tmp_path / "q"), "--ratio", "0.4",
                   "--quantization", "nf4", "--double-quant", "--quantize-lora"])
    assert rc == 0, err.getvalue()
    from adaptwin.cli import inspect_data

    data = inspect_data(tmp_path / "q")
    assert data["config"]["quantization"] == "nf4" and data["modules"]
    for m in data["modules"]:
        assert m["format"] == "nf4" and m["bytes"] > 0
        assert 4.0 < m["bits_per_param"] < 8.0  # 4 bits + scales (0.13 with double quant) + fp32 biases
    loaded = adaptwin.load(tmp_path / "q")
    for m in data["modules"]:
        sd = loaded.get_submodule(m["path"]).state_dict()
        assert m["bytes"] == sum(t.numel() * t.element_size() for t in sd.values())
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["inspect", str(tmp_path / "q")]) == 0
    assert "bits/param" in out.getvalue() and "nf4" in out.getvalue()
    with contextlib.redirect_stderr(io.StringIO()) as e:
        rc = main(["compress", str(tmp_path / "m"), "--out", str(tmp_path / "x"), "--ratio", "0.4",
                   "--quantization", "nf3"])
    assert rc == 2 and "invalid choice: 'nf3'" in e.getvalue()
    assert math.isfinite(data["modules"][0]["bits_per_param"])


def _random_packed(m: _QuantModule, seed: int) -> _QuantModule:
    """``m`` (master state) with random factors and bias, packed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    m.pack()
    return m


def _packed_low_rank(fmt: QuantFormat, seed: int = 0) -> QuantLowRankLinear:
    return _random_packed(QuantLowRankLinear(64, 96, 16, 0, True, fmt=fmt, quantize_lora=True, packed=False), seed)


def _fresh_output(m: QuantLowRankLinear, x: torch.Tensor) -> torch.Tensor:
    """The module's output with its op arguments built anew (no reuse)."""
    for f in m._factors.values():
        f.packed_args.clear()
    m._call.clear()
    return m(x)


@pytest.mark.parametrize("fmt", QAT_FORMATS, ids=["nf4-64-dq", "int8-0"])
def test_packed_arguments_follow_the_buffers(fmt):
    """A packed module reuses its op arguments between calls, and still computes with its buffers as they
    are now: after a buffer is replaced behind nn.Module's back, written in place (the double-quantised
    scales are computed from such buffers), or converted by `.to`."""
    m, donor = _packed_low_rank(fmt), _packed_low_rank(fmt, seed=1)
    x = torch.randn(3, 64)
    first = m(x)
    assert torch.equal(m(x), first)
    name = "in_factor_qweight"
    m._buffers[name] = donor._buffers[name].clone()  # as accelerate's set_module_tensor_to_device does
    replaced = m(x)
    assert not torch.equal(replaced, first) and torch.equal(replaced, _fresh_output(m, x))
    for key, t in m._buffers.items():  # every other buffer written in place
        if key != name:
            t.copy_(donor._buffers[key])
    with torch.no_grad():
        m.bias.copy_(donor.bias)
    assert torch.equal(m(x), donor(x))
    m.double()
    assert not any(f.packed_args.kept for f in m._factors.values())  # no float32 scales kept alive
    assert m(x.double()).dtype == torch.float64


def test_packed_arguments_made_in_inference_mode_allow_backward():
    """Double-quantised scales computed under inference_mode are inference tensors: they are not reused for
    a later call that autograd records (it could not save them for the backward)."""
    m = _packed_low_rank(QuantFormat("nf4", 64, True))
    x = torch.randn(2, 64)
    with torch.inference_mode():
        expected = m(x)
    x.requires_grad_()
    y = m(x)
    y.sum().backward()
    assert torch.equal(y.detach(), expected) and x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("fmt", QAT_FORMATS, ids=["nf4-64-dq", "int8-0"])
def test_modules_packed_in_inference_mode_run(fmt):
    """Buffers made under inference_mode are inference tensors, which have no version counter: the kept
    arguments do without one where the buffers are passed as they are, and are not kept where a tensor is
    computed from them (double-quantised scales)."""
    x = torch.randn(2, 64)
    with torch.inference_mode():
        m = _packed_low_rank(fmt)
        first = m(x)
        assert torch.equal(m(x), first)
        m._buffers["out_factor_qweight"] = _packed_low_rank(fmt, seed=1)._buffers["out_factor_qweight"]
        assert not torch.equal(m(x), first) and torch.equal(m(x), _fresh_output(m, x))


def _packed(kind: str, fmt: QuantFormat, quantize_lora: bool, seed: int = 0) -> _QuantModule:
    """A packed module with random factors: QuantLinear in / out role (4 heads of 12 directions, 8 spectral) or
    QuantLowRankLinear (rank 16 + LoRA 4)."""
    if kind == "low_rank":
        m = QuantLowRankLinear(64, 96, 16, 4, True, fmt=fmt, quantize_lora=quantize_lora, packed=False)
    else:
        shape = (64, 48) if kind == "in" else (48, 64)
        m = QuantLinear(*shape, True, role=kind, blocks=4, width=12, rank=8, fmt=fmt, quantize_lora=quantize_lora,
                        packed=False)
    return _random_packed(m, seed)


@pytest.mark.parametrize("kind", ["in", "out", "low_rank"])
@pytest.mark.parametrize("fmt", [*QAT_FORMATS, QuantFormat("nf4", 64)], ids=["nf4-64-dq", "int8-0", "nf4-64"])
@pytest.mark.parametrize("quantize_lora", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_batched_calls_decode_whole_factors(kind, fmt, quantize_lora, dtype, monkeypatch):
    """Packed modules given more than MIN_BATCHED_ROWS rows (CPU inference) decode each factor whole, LoRA
    directions in place, and run one GEMM per product: the same result as the op path (one op call per
    format, the concatenation, the add) to rounding; fewer rows, or a gradient to record, take the op path."""
    from adaptwin.compressors.quantized import layer

    m = _packed(kind, fmt, quantize_lora).to(dtype)
    decoded = []
    real = layer.dequantize_factor
    monkeypatch.setattr(layer, "dequantize_factor", lambda *a, **k: decoded.append(a[2]) or real(*a, **k))
    x = torch.randn(2, layer.MIN_BATCHED_ROWS // 2 + 1, m.in_features, dtype=dtype)
    with torch.inference_mode():
        whole = m(x)
        assert decoded and set(decoded) == {fmt.kind}  # the quantised directions, decoded whole
        decoded.clear()
        one_row = m(x[:1, :1])
        assert not decoded  # a decoding call stays on the op's decode path
        monkeypatch.setattr(layer, "MIN_BATCHED_ROWS", 10**9)
        by_op = m(x)
        assert not decoded
    assert whole.dtype == dtype and whole.shape == by_op.shape
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    scale = by_op.float().abs().max().item()
    torch.testing.assert_close(whole.float(), by_op.float(), rtol=tol, atol=tol * scale)
    torch.testing.assert_close(one_row.float(), by_op[:1, :1].float(), rtol=tol, atol=tol * scale)
    if kind == "low_rank":  # a fused GELU runs inside the second GEMM on this path
        monkeypatch.setattr(layer, "MIN_BATCHED_ROWS", 32)
        m.activation = "gelu"
        with torch.inference_mode():
            fused = m(x)
        torch.testing.assert_close(fused.float(), torch.nn.functional.gelu(by_op.float()), rtol=tol,
                                   atol=tol * scale)


def test_batched_calls_with_gradients_take_the_op():
    """With a gradient to record (LoRA directions trained on a packed model, as PQM and QAT-then-pack allow),
    the call runs through the op and its autograd, not the whole-factor path."""
    from adaptwin.compressors.quantized import layer

    m = _packed("low_rank", QuantFormat("nf4", 64), quantize_lora=False)
    x = torch.randn(40, 64)
    with torch.no_grad():
        expected = m(x)
    y = m(x)  # grad mode on, the fp LoRA directions require grad
    y.square().sum().backward()
    assert m.in_factor_lora.grad is not None and m.in_factor_lora.grad.abs().sum() > 0
    torch.testing.assert_close(y.detach(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert m._batched(x) is False and layer.MIN_BATCHED_ROWS == 32


@pytest.mark.parametrize("fmt", [*QAT_FORMATS, QuantFormat("nf4", 64), QuantFormat("int8", 32)],
                         ids=["nf4-64-dq", "int8-0", "nf4-64", "int8-32"])
def test_dequantize_factor_matches_the_reference(fmt):
    """`dequantize_factor` (the CPU kernels' decoding where adaptwin._C takes the call) gives the reference's
    values bit for bit, takes the reference where the entry point declines (a scale that requires grad), and
    refuses a short buffer with the op's error."""
    from adaptwin.ops import backends
    from adaptwin.ops.rank_linear import dequantize_factor

    w = torch.randn(24, 160)
    stored = fmt.quantize(w)
    scale = fmt.scale(stored)
    expected = fmt.dequantize(stored, (24, 160))
    got = dequantize_factor(stored["qweight"], scale, fmt.kind, fmt.blocksize, [24, 160])
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    if backends.load()["cpp"]:
        assert backends.FAST["dequantize"](stored["qweight"], scale.clone().requires_grad_(), fmt.kind,
                                           fmt.blocksize, [24, 160]) is NotImplemented
    assert torch.equal(dequantize_factor(stored["qweight"], scale.clone().requires_grad_(), fmt.kind, fmt.blocksize,
                                         [24, 160]).detach(), expected)
    with pytest.raises(ValueError, match="shape"):  # the C++ check or the reference's, same sense
        dequantize_factor(stored["qweight"][:-2], scale, fmt.kind, fmt.blocksize, [24, 160])
    # into a larger matrix: groups of 6 rows, each at the start of a stride of 8 (the rest left alone)
    for s in (scale, scale.clone().requires_grad_()):  # the C++ entry, then the reference
        out = torch.full((32, 160), 7.0)
        assert dequantize_factor(stored["qweight"], s, fmt.kind, fmt.blocksize, [24, 160], out=out, group=6,
                                 stride=8) is out
        assert torch.equal(out.view(4, 8, 160)[:, :6].detach(), expected.view(4, 6, 160))
        assert (out.view(4, 8, 160)[:, 6:] == 7.0).all()
    with pytest.raises(ValueError, match="group"):
        dequantize_factor(stored["qweight"], scale, fmt.kind, fmt.blocksize, [24, 160], out=torch.empty(32, 160),
                          group=5, stride=8)

