"""`adaptwin.ops.linear_act` and `adaptwin.fuse_activations`: an FFN's activation run inside the compressed
linear before it (one oneDNN primitive on CPU), the same function as the model's own activation module; and
`adaptwin.contiguous_layer_inputs`, contiguous hidden states into each layer stack."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

import adaptwin
from adaptwin.compressors.ffn_svd.layer import LowRankLinear
from adaptwin.fusion import FusedActivation
from adaptwin.ops import activation as linear_act_module
from adaptwin.ops.activation import linear_act

sys.path.insert(0, os.path.dirname(__file__))
import tiny_models  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _calls_onednn(monkeypatch) -> list[int]:
    """Count the calls that reach the fused primitive (an empty list where torch has no oneDNN)."""
    calls: list[int] = []
    real = linear_act_module._ONEDNN
    if real is not None:
        def spy(*args):
            calls.append(1)
            return real(*args)
        monkeypatch.setattr(linear_act_module, "_ONEDNN", spy)
    return calls


def _fused_on(monkeypatch, on: bool = True) -> None:
    """Take (or leave) the fused primitive whatever this CPU is: on CPUs without AVX-512 linear_act runs the
    two steps, where oneDNN's fused GELU is slower (adaptwin/ops/activation.py)."""
    monkeypatch.setattr(linear_act_module, "_fused_is_faster", lambda: on)


@pytest.mark.parametrize("shape", [(59, 21), (2, 7, 21), (3, 5, 7, 21), (1, 1, 21)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fused", [True, False])
def test_linear_act_matches_two_step_form(shape, bias, fused, monkeypatch):
    _fused_on(monkeypatch, fused)
    calls = _calls_onednn(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    w, b = torch.randn(43, 21, generator=gen), torch.randn(43, generator=gen) if bias else None
    with torch.no_grad():
        out = linear_act(x, w, b, "gelu")
    ref = F.gelu(F.linear(x.double(), w.double(), None if b is None else b.double()))
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-6)
    rows = x.numel() // x.shape[-1]
    if linear_act_module._ONEDNN is not None:
        assert len(calls) == (rows > 1 and fused)  # one row: F.linear's GEMV path


def test_linear_act_strided_input_and_bf16():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 64, generator=gen)[:, ::2]  # non-contiguous rows
    w, b = torch.randn(48, 32, generator=gen), torch.randn(48, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(linear_act(x, w, b, "gelu"), F.gelu(F.linear(x, w, b)), rtol=1e-5, atol=1e-6)
        out = linear_act(x.bfloat16(), w.bfloat16(), b.bfloat16(), "gelu")
    assert out.dtype == torch.bfloat16
    ref = F.gelu(F.linear(x.bfloat16().double(), w.bfloat16().double(), b.bfloat16().double()))
    two_step = F.gelu(F.linear(x.bfloat16(), w.bfloat16(), b.bfloat16()))
    # the fused form rounds once; it is at least as close to the exact value as the two-step bf16 form
    assert (out.double() - ref).abs().max() <= (two_step.double() - ref).abs().max() + 1e-12


def test_linear_act_trains_through_the_reference_form(monkeypatch):
    calls = _calls_onednn(monkeypatch)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 12, generator=gen, requires_grad=True)
    w = torch.randn(20, 12, generator=gen, requires_grad=True)
    linear_act(x, w, None, "gelu").square().sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    F.gelu(F.linear(x, w)).square().sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)
    assert calls == []


def test_linear_act_leaves_autocast_its_dtype(monkeypatch):
    calls = _calls_onednn(monkeypatch)
    x, w = torch.randn(6, 8), torch.randn(5, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_act(x, w, None, "gelu")
        ref = F.gelu(F.linear(x, w))
    assert out.dtype == ref.dtype == torch.bfloat16 and calls == []
    torch.testing.assert_close(out, ref)


def test_linear_act_rejects_unknown_activation():
    with pytest.raises(ValueError, match=r"unknown activation 'relu'; allowed: \['gelu'\]"):
        linear_act(torch.randn(3, 4), torch.randn(5, 4), None, "relu")


@pytest.mark.parametrize("name", ["whisper", "bert", "wav2vec2", "hubert"])
def test_fuse_activations_keeps_the_function(name, monkeypatch):
    _fused_on(monkeypatch)
    model = getattr(tiny_models, name)()
    inputs = {"whisper": tiny_models.whisper_inputs, "bert": tiny_models.text_inputs}.get(
        name, tiny_models.speech_inputs)()
    small = adaptwin.compress(model, adaptwin.CompressionConfig(ratio=0.5))
    with torch.no_grad():
        ref = small(**inputs)
    fused = adaptwin.fuse_activations(small)
    adapter = adaptwin.get_architecture(small.config.model_type)
    assert fused == [linear for linear, _ in adapter.activation_pairs(small)] and fused
    for linear, act in adapter.activation_pairs(small):
        assert small.get_submodule(linear).activation == "gelu"
        assert isinstance(small.get_submodule(act), FusedActivation)
    calls = _calls_onednn(monkeypatch)
    with torch.no_grad():
        out = small(**inputs)
    assert len(calls) == len(fused) or linear_act_module._ONEDNN is None
    key = "logits" if name == "whisper" else "last_hidden_state"
    torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=1e-5)
    assert adaptwin.fuse_activations(small) == []  # already fused: nothing to do
    assert sorted(adaptwin.unfuse_activations(small)) == sorted(fused)
    assert not any(isinstance(m, FusedActivation) for m in small.modules())
    assert all(m.activation is None for m in small.modules() if isinstance(m, LowRankLinear))


def test_fuse_leaves_dense_and_other_activations_alone():
    model = tiny_models.whisper()
    assert adaptwin.fuse_activations(model) == []  # nothing compressed: nothing to fuse
    small = adaptwin.compress(model, adaptwin.CompressionConfig(ratio=0.5))
    small.model.encoder.layers[0].activation_fn = torch.nn.ReLU()
    fused = adaptwin.fuse_activations(small)
    assert "model.encoder.layers.0.fc1" not in fused and "model.encoder.layers.1.fc1" in fused


@pytest.mark.parametrize("quantize_lora", [False, True])
def test_quantised_factors_fuse_too(quantize_lora):
    """Packed NF4 factors take their GELU over as well: in the whole-factor GEMM of a batched CPU call (the
    encoder's frames), applied after the op on its other calls (decoding); the model computes the same."""
    model = tiny_models.whisper()
    packed = adaptwin.compress(model, adaptwin.CompressionConfig(ratio=0.5, quantization="nf4",
                                                                 quantize_lora=quantize_lora))
    inputs = tiny_models.whisper_inputs()
    with torch.no_grad():
        ref = packed(**inputs).logits
    fused = adaptwin.fuse_activations(packed)
    assert fused and all(p.endswith("fc1") for p in fused)
    assert {p.split(".")[1] for p in fused} == {"encoder", "decoder"}
    assert all(type(packed.get_submodule(p)).__name__ == "QuantLowRankLinear" for p in fused)
    with torch.no_grad():
        torch.testing.assert_close(packed(**inputs).logits, ref, rtol=1e-5, atol=1e-5)
    assert adaptwin.unfuse_activations(packed) == fused


def test_fused_model_saves_loads_and_refuses_quantisation(tmp_path):
    small = adaptwin.compress(tiny_models.whisper(), adaptwin.CompressionConfig(ratio=0.5))
    inputs = tiny_models.whisper_inputs()
    with torch.no_grad():
        ref = small(**inputs).logits
    adaptwin.fuse_activations(small)
    state = {k: v.clone() for k, v in small.state_dict().items()}
    adaptwin.save(small, tmp_path / "m")
    loaded = adaptwin.load(tmp_path / "m")
    assert not any(isinstance(m, FusedActivation) for m in loaded.modules())  # fusion is not saved
    assert state.keys() == loaded.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, ref, rtol=1e-5, atol=1e-5)
    from adaptwin.compressors.quantized.transform import _svd
    from adaptwin.quant import QuantFormat

    fc1 = small.model.encoder.layers[0].fc1
    spec = {"in_features": fc1.in_features, "out_features": fc1.out_features, "rank": fc1.rank,
            "lora_rank": fc1.lora_rank, "bias": True}
    with pytest.raises(ValueError, match="unfuse_activations"):
        _svd(fc1, spec, QuantFormat("nf4", 64), False, False)


def test_fused_layer_fine_tunes_like_the_unfused_one():
    small = adaptwin.compress(tiny_models.whisper(), adaptwin.CompressionConfig(ratio=0.5))
    layer = small.model.encoder.layers[0]
    x = torch.randn(2, 25, 32, generator=torch.Generator().manual_seed(3))
    layer(x, attention_mask=None)[0].square().sum().backward()
    ref = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    adaptwin.fuse_activations(small)
    layer(x, attention_mask=None)[0].square().sum().backward()
    for n, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-6)


def test_linear_act_falls_back_where_the_primitive_cannot_be_built(monkeypatch):
    _fused_on(monkeypatch)
    # oneDNN's bf16 inner product needs AVX512-BF16 / AMX / AVX-NE-CONVERT: where creating it fails, the
    # call and every later one of that dtype take the two-step form; a genuine error still surfaces.
    if linear_act_module._ONEDNN is None:
        pytest.skip("torch was built without oneDNN")
    calls: list[torch.dtype] = []

    def no_primitive(x, *args):
        calls.append(x.dtype)
        raise RuntimeError("could not create a primitive descriptor for the inner product forward propagation")

    monkeypatch.setattr(linear_act_module, "_ONEDNN", no_primitive)
    monkeypatch.setattr(linear_act_module, "_UNFUSABLE", set())
    x, w, b = torch.randn(6, 8), torch.randn(5, 8), torch.randn(5)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            linear_act(x, torch.randn(5, 7), b, "gelu")  # the two-step form's own error
        assert linear_act_module._UNFUSABLE == set()  # a genuine error does not switch fusing off
        for _ in range(2):
            torch.testing.assert_close(linear_act(x, w, b, "gelu"), F.gelu(F.linear(x, w, b)))
    assert calls == [torch.float32, torch.float32]  # the second call no longer tries
    assert linear_act_module._UNFUSABLE == {torch.float32}


def test_linear_act_skips_bf16_where_onednn_lacks_it(monkeypatch):
    _fused_on(monkeypatch)
    calls = _calls_onednn(monkeypatch)
    if linear_act_module._ONEDNN is None:
        pytest.skip("torch was built without oneDNN")
    monkeypatch.setattr(linear_act_module, "_bf16_supported", lambda: False)  # as on a CPU without bf16 GEMMs
    x, w = torch.randn(6, 8), torch.randn(5, 8)
    with torch.no_grad():
        out = linear_act(x.bfloat16(), w.bfloat16(), None, "gelu")
        assert torch.equal(out, F.gelu(F.linear(x.bfloat16(), w.bfloat16()))) and calls == []
        linear_act(x, w, None, "gelu")
    assert calls == [1]  # float32 still fused


def test_linear_act_without_avx512_runs_two_steps_in_place(monkeypatch):
    # CPUs without AVX-512 (and ARM): F.linear, then GELU in place on its fresh output where no gradient is
    # recorded (the same bits as F.gelu), out of place where autograd records one. (Outputs this small take the
    # native GELU first where it is built: tests/test_native_gelu.py; here ATen's in-place one is checked.)
    from adaptwin.ops.backends import FAST

    monkeypatch.delitem(FAST, "gelu_", raising=False)
    _fused_on(monkeypatch, False)
    calls = _calls_onednn(monkeypatch)
    gen = torch.Generator().manual_seed(4)
    x, w, b = torch.randn(40, 24, generator=gen), torch.randn(56, 24, generator=gen), torch.randn(56, generator=gen)
    gelu_calls: list[str] = []
    real_in_place = linear_act_module.ACTIVATIONS["gelu"]

    def spy(y):
        gelu_calls.append("in place")
        return real_in_place[3](y)

    monkeypatch.setitem(linear_act_module.ACTIVATIONS, "gelu", (*real_in_place[:3], spy))
    with torch.no_grad():
        out = linear_act(x, w, b, "gelu")
    assert torch.equal(out, F.gelu(F.linear(x, w, b))) and calls == [] and gelu_calls == ["in place"]
    w.requires_grad_(True)
    out = linear_act(x, w, b, "gelu")
    assert out.grad_fn is not None and gelu_calls == ["in place"]  # recorded: the out-of-place GELU
    out.sum().backward()
    torch.testing.assert_close(w.grad, torch.autograd.grad(F.gelu(F.linear(x, w, b)).sum(), w)[0])


def test_fused_primitive_runs_only_with_avx512_kernels():
    # ATen's AVX2 capability (as on an AVX2-only CPU): float32 takes the two steps; AVX-512: the primitive.
    import subprocess

    code = ("from adaptwin.ops import activation as a\n"
            "import torch\n"
            "print(torch.backends.cpu.get_cpu_capability(), a._fused_is_faster())\n")
    root = os.path.dirname(os.path.dirname(__file__))
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "PYTHONPATH": root}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["AVX2", "False"], proc.stdout
    if torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        assert linear_act_module._fused_is_faster()


def test_bf16_linear_act_on_onednn_capped_to_avx2():
    # What an AVX2-only CPU's oneDNN can do, on this one: a bf16 call returns the two-step result (with ATen's
    # in-place GELU, for the same bits: the native one of small outputs is tests/test_native_gelu.py's).
    import subprocess

    code = ("import torch, torch.nn.functional as F\n"
            "from adaptwin.ops import activation as a\n"
            "from adaptwin.ops.backends import FAST\n"
            "FAST.pop('gelu_', None)\n"
            "x, w = torch.randn(6, 8).bfloat16(), torch.randn(5, 8).bfloat16()\n"
            "with torch.no_grad():\n"
            "    out = a.linear_act(x, w, None, 'gelu')\n"
            "assert torch.equal(out, F.gelu(F.linear(x, w))), out\n"
            "print('unfusable', sorted(str(d) for d in a._UNFUSABLE), 'bf16 check', a._bf16_supported())\n")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "unfusable" in proc.stdout


def _layouts(model: torch.nn.Module, paths: list[str]) -> dict[str, list[bool]]:
    """Whether each listed layer's hidden states arrive contiguous, per call (a pre-hook registered last, so
    it sees what the earlier hooks handed on)."""
    seen: dict[str, list[bool]] = {p: [] for p in paths}
    for p in paths:
        def look(module, args, kwargs, p=p):
            seen[p].append((args[0] if args else kwargs["hidden_states"]).is_contiguous())
        model.get_submodule(p).register_forward_pre_hook(look, with_kwargs=True)
    return seen


def test_contiguous_layer_inputs_on_whisper():
    import copy

    model = tiny_models.whisper().eval()
    inputs = tiny_models.whisper_inputs()
    with torch.no_grad():
        ref = model(**inputs).logits
    hooked = adaptwin.contiguous_layer_inputs(model)
    assert hooked == ["model.encoder.layers.0", "model.decoder.layers.0"]
    assert adaptwin.contiguous_layer_inputs(model) == []  # once per layer
    twin = copy.deepcopy(model)
    enc = ["model.encoder.layers.0", "model.encoder.layers.1"]
    seen = _layouts(model, enc)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)  # a copy, not a change of values
    assert seen == {p: [True] for p in enc}  # and the layer after it inherits the layout
    assert adaptwin.contiguous_layer_inputs(model, enable=False) == hooked
    with torch.no_grad():
        model(**inputs)
    # without it the encoder's layers see the convolution output's transposed strides (the reason for it)
    assert seen == {p: [True, False] for p in enc}
    seen = _layouts(twin, enc)  # the deep copy kept its own hook
    with torch.no_grad():
        twin(**inputs)
    assert seen == {p: [True] for p in enc}


@pytest.mark.parametrize("name", [r.name for r in tiny_models.ROWS])
def test_contiguous_layer_inputs_keep_every_model_the_same(name):
    row = tiny_models.ROW_BY_NAME[name]
    model = adaptwin.compress(row.build("sdpa"), adaptwin.CompressionConfig(ratio=0.5, twins=row.twins)).eval()
    with torch.no_grad():
        ref = row.output(model(**row.inputs()))
        assert adaptwin.contiguous_layer_inputs(model)
        assert torch.equal(row.output(model(**row.inputs())), ref)
