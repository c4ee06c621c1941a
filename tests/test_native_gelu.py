"""The native in-place GELU (``adaptwin._C.gelu_``, csrc/cpu/activation.cpp and gelu.h) that
`adaptwin.ops.activation.activate` takes for small CPU outputs (a decoding step's FFN row): its values against
float64 and torch's own GELU, in place with the version counter bumped, and NotImplemented, with nothing
written, for every tensor or context it leaves to ATen. The SIMD paths of other CPUs (AVX2, NEON) are checked
outside torch by tests/simd_decode.cpp (tests/test_kernels_neon.py)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from adaptwin.ops import activation
from adaptwin.ops.backends import FAST, cpu_features
from tests.test_fast_calls import OpLog

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 1 << 15  # kGeluMaxElems (csrc/cpu/activation.cpp)

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif("gelu_" not in FAST or not any(cpu_features().values()),
                                 reason="needs adaptwin._C with a SIMD path")]


def _gelu64(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return 0.5 * x * torch.special.erfc(-x / math.sqrt(2.0))


def _inputs(n: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * 3
    x[: min(n, 7)] = torch.tensor([0.0, -0.0, -12.0, 12.0, -5.3, 1e-30, -87.0])[: min(n, 7)]
    return x.to(dtype)


@pytest.mark.parametrize("shape", [(1, 1, 1536), (3, 7), (1, 384), (17,), (), (0, 5), (2, 3, 5461)])
def test_float32_values_against_float64(shape):
    x = _inputs(math.prod(shape)).reshape(shape)
    y = x.clone()
    assert FAST["gelu_"](y) is y
    want = _gelu64(x)
    assert ((y.double() - want).abs() <= 5e-7 * x.double().abs() + 1e-38).all()
    torch.testing.assert_close(y, F.gelu(x), rtol=0, atol=2e-6)  # torch's own (oneDNN) is off by 1.2e-6 itself


def test_bfloat16_values_round_as_torch_does():
    x = _inputs(4000, torch.bfloat16)
    y = x.clone()
    assert FAST["gelu_"](y) is y and y.dtype == torch.bfloat16
    want = _gelu64(x.float())
    # computed in float32 and rounded to nearest: within half a bf16 ulp (2^-9 relative) of the exact value, plus
    # the float32 error
    assert ((y.double() - want).abs() <= 2.0 ** -8 * want.abs() + 5e-7 * x.double().abs() + 1e-38).all()
    torch.testing.assert_close(y, F.gelu(x), rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_special_values(dtype):
    x = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0, -200.0, 200.0], dtype=dtype)
    y = FAST["gelu_"](x.clone())
    assert torch.isnan(y[0]) and y[1] == float("inf") and torch.isnan(y[2])  # -inf: NaN, as ATen's GELU
    assert y[3] == 0 and torch.signbit(y[3]) and y[4] == 0 and not torch.signbit(y[4])
    assert y[5] == 0 and y[6] == 200.0


def test_in_place_with_the_version_counter_bumped():
    x = _inputs(100)
    y = x.clone()
    version, ptr = y._version, y.data_ptr()
    FAST["gelu_"](y)
    assert y._version == version + 1 and y.data_ptr() == ptr and not torch.equal(y, x)
    view = y[10:20]  # a contiguous view: written through to its base
    before = y.clone()
    FAST["gelu_"](view)
    assert torch.equal(y[:10], before[:10]) and torch.equal(y[20:], before[20:])
    assert not torch.equal(view, before[10:20])
    with torch.inference_mode():
        t = _inputs(50)
        assert FAST["gelu_"](t) is t and t.is_inference()
    torch.testing.assert_close(t, F.gelu(_inputs(50)), rtol=0, atol=2e-6)


def _refused(y: torch.Tensor) -> None:
    before = y.detach().clone()
    assert FAST["gelu_"](y) is NotImplemented
    assert torch.equal(y.detach(), before), "a refused call wrote"


def test_refuses_what_it_leaves_to_aten():
    _refused(_inputs(64).reshape(8, 8).t())  # not contiguous
    _refused(_inputs(LIMIT + 1))  # above the size limit
    assert FAST["gelu_"](_inputs(LIMIT)) is not NotImplemented
    for dtype in (torch.float64, torch.float16, torch.int32):
        _refused(_inputs(10).to(dtype))
    _refused(torch._neg_view(_inputs(10)))  # the lazy negation bit
    leaf = _inputs(10).requires_grad_()
    _refused(leaf)  # a gradient to record
    with torch.no_grad():
        assert FAST["gelu_"](leaf.detach().clone().requires_grad_()) is not NotImplemented
    with torch.inference_mode():
        t = _inputs(10)
    _refused(t)  # an inference tensor outside inference mode: aten raises its error
    with pytest.raises(RuntimeError, match="[Ii]nference"):
        activation.activate(t, "gelu")

    class Sub(torch.Tensor):
        pass

    _refused(_inputs(10).as_subclass(Sub))
    assert FAST["gelu_"](torch.empty(10, device="meta")) is NotImplemented
    assert FAST["gelu_"]("not a tensor") is NotImplemented and FAST["gelu_"]() is NotImplemented


def test_modes_see_aten():
    y = _inputs(32)
    with OpLog() as mode:
        assert FAST["gelu_"](y) is NotImplemented
        activation.activate(y, "gelu")
    assert torch.ops.aten.gelu_.default in mode.ops

    class Passing(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passing():
        assert FAST["gelu_"](_inputs(32)) is NotImplemented


def test_activate_takes_it_for_small_outputs_only(monkeypatch):
    calls = []
    real = FAST["gelu_"]

    def spy(y):
        out = real(y)
        calls.append(out is not NotImplemented)
        return out

    monkeypatch.setitem(FAST, "gelu_", spy)
    small, large = _inputs(1536).reshape(1, 1, 1536), _inputs(LIMIT + 8)
    with torch.no_grad():
        a, b = activation.activate(small.clone(), "gelu"), activation.activate(large.clone(), "gelu")
    assert calls == [True, False]
    torch.testing.assert_close(a, F.gelu(small), rtol=0, atol=2e-6)
    assert torch.equal(b, F.gelu(large))  # ATen's
    grad = small.clone().requires_grad_()
    out = activation.activate(grad * 1, "gelu")  # a gradient to record: the out-of-place reference
    out.sum().backward()
    assert calls == [True, False] and grad.grad is not None


CAPPED = """
import torch
from adaptwin.ops.backends import FAST, cpu_features
from tests.test_fast_calls import OpLog
x = torch.randn(1000) * 3
y = x.clone()
out = FAST["gelu_"](y)
if CAP == "portable":
    assert out is NotImplemented and torch.equal(y, x)
else:
    assert out is y and cpu_features()["avx2"] and not cpu_features()["avx512"]
    want = 0.5 * x.double() * torch.special.erfc(-x.double() / 2 ** 0.5)
    assert ((y.double() - want).abs() <= 5e-7 * x.double().abs() + 1e-38).all()
print("ok")
"""


@pytest.mark.parametrize("cap", ["portable", "avx2"])
def test_capped_dispatch(cap):
    from adaptwin.ops import backends

    if cap == "avx2" and not backends.cpu_features()["avx2"]:
        pytest.skip("this CPU has no AVX2")
    env = {**os.environ, "ADAPTWIN_CPU_CAP": cap, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", f"CAP = {cap!r}\n" + CAPPED], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr[-3000:]
