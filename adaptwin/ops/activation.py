"""``act(x·Wᵀ + b)`` as one pass where a fused CPU primitive exists: an FFN's first matrix and its activation.

On CPUs where ATen runs AVX-512 kernels, for float32 / bfloat16 inputs of more than one row with no
gradient to record, oneDNN's ``linear_pointwise`` primitive applies the activation while the GEMM's output
tiles are still in cache, so the (rows, out) pre-activation is never written out, read back and written
again, and one fewer (rows, out) tensor is allocated. Everywhere else it is ``F.gelu(F.linear(x, weight,
bias))``: under autograd, on other devices and dtypes, for single rows, where oneDNN was left out of the
torch build, under CPU autocast (so that autocast picks the GEMM's dtype), while ``torch.compile`` traces
(inductor fuses on its own), and on CPUs without AVX-512. Where no gradient is recorded the GELU then runs
in place (``aten.gelu_``) on the GEMM's fresh output. Without AVX-512 oneDNN's fused GELU is slower than
the two steps: 1500 x 152 -> 1536 in float32 took 6.50 ms fused against 5.04 ms for ``F.linear`` and an
in-place GELU (3.99 ms without the GELU; torch, oneDNN and MKL capped to AVX2 on the 2-core Zen 4, 2
threads, p20 of 40), while with AVX-512 the fused form wins (4.21 against 4.71 ms).

Measured on the 2-core CPU (``benchmarks/whisper_encoder_speed.py``, providers ``adaptwin`` vs
``adaptwin_nofuse``), see docs/results.md. float32 results equal the two-step form's to rounding (0 to
4e-6 absolute in the 1500 x 153 -> 1536 case); in bfloat16 the fused form rounds once, after the
activation, where the two-step form rounds the pre-activation to bfloat16 first.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from adaptwin.ops.backends import FAST

# activation name -> (reference function, oneDNN post-op name, oneDNN algorithm, in-place function);
# "gelu" is the exact (erf) GELU, as Whisper / BERT / wav2vec2 use it
ACTIVATIONS = {"gelu": (F.gelu, "gelu", "none", torch.ops.aten.gelu_)}

_ONEDNN = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
_DTYPES = (torch.float32, torch.bfloat16)
# dtypes whose fused primitive this process cannot build. oneDNN's bf16 inner product needs AVX512-BF16,
# AMX or AVX-NE-CONVERT (torch.ops.mkldnn._is_mkldnn_bf16_supported); without them, or with oneDNN capped
# below them (ONEDNN_MAX_CPU_ISA), creating the primitive fails: the first failure puts the dtype here and
# that call, and every later one, takes the two-step form.
_UNFUSABLE: set[torch.dtype] = set()


def linear_act(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str) -> Tensor:
    """``activation(F.linear(x, weight, bias))``; ``activation`` is a key of `ACTIVATIONS`."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"linear_act: unknown activation {activation!r}; allowed: {sorted(ACTIVATIONS)}")
    _, post_op, algorithm, _ = ACTIVATIONS[activation]
    if _fusable(x, weight, bias):
        try:
            return _ONEDNN(x, weight, bias, post_op, [], algorithm)
        except RuntimeError:
            y = activate(F.linear(x, weight, bias), activation)  # a genuine error (shapes, ...) is raised here
            _UNFUSABLE.add(x.dtype)  # the two-step form works where the primitive failed: not for this dtype
            return y
    return activate(F.linear(x, weight, bias), activation)


def activate(y: Tensor, activation: str) -> Tensor:
    """``activation(y)`` for ``y`` a fresh output no one else holds (a GEMM's): in place where no gradient is
    recorded through it and ``torch.compile`` is not tracing (no second (rows, out) tensor to allocate and
    fault in: 9.2 MB for 1500 x 1536 float32). A small CPU output (a decoding step's FFN row) takes the native
    library's GELU (``adaptwin._C.gelu_``) where it is built: ATen's goes through oneDNN, which builds a
    primitive descriptor per call (9.5 against 0.7 us for a 1536-wide float32 row, 28-48 us inside Whisper
    decoding); it answers NotImplemented for what it does not take, and ATen's runs."""
    fn, _, _, in_place = ACTIVATIONS[activation]
    if y.requires_grad or torch.compiler.is_compiling():
        return fn(y)
    if activation == "gelu":
        fast = FAST.get("gelu_")
        if fast is not None and fast(y) is not NotImplemented:
            return y
    return in_place(y)


def _fusable(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    if _ONEDNN is None or x.device.type != "cpu" or x.dtype not in _DTYPES or weight.dtype != x.dtype:
        return False
    if torch.compiler.is_compiling() or not _fused_is_faster():  # (first: Dynamo cannot trace the second)
        return False
    if x.dtype in _UNFUSABLE or (x.dtype == torch.bfloat16 and not _bf16_supported()):
        return False
    if x.dim() < 2 or x.numel() <= x.shape[-1] or (bias is not None and bias.dtype != x.dtype):
        return False  # a single row: the GEMV path of F.linear is faster (41 vs 54 us at 153 -> 1536)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return False
    return not torch.is_autocast_enabled("cpu")


@functools.cache
def _fused_is_faster() -> bool:
    """Whether ATen runs AVX-512 kernels in this process (``ATEN_CPU_CAPABILITY`` lowers it), where the fused
    primitive beats the two steps (see the module docstring). Other CPUs (AVX2, ARM) take the two steps."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


@functools.cache
def _bf16_supported() -> bool:
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else True  # without the check, the first call decides
