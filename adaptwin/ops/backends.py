"""Which fused kernels back the ``adaptwin`` ops here; loaded once, when `adaptwin.ops` is imported.

* ``adaptwin._C`` (built by setup.py from ``csrc/cpu`` and, where torch has CUDA, ``csrc/cuda``)
  registers C++ kernels for the CPU / CUDA dispatch keys with ``TORCH_LIBRARY_IMPL(adaptwin, ...)``;
  importing it is all it takes. Absent or unloadable (no compiler at install, another torch ABI): the
  reference implementations run, with a warning only in the second case.
* Triton kernels (``kernels/``, installed as ``adaptwin.kernels``) are registered for CUDA tensors when
  triton is importable: they are the tiled GPU path and take the CUDA key over the CUDA C++ kernels. Those
  are exact and simple (one thread per query row or output element) and, measured on an H100, 45-330x
  slower than Triton and far slower than the op's reference there (SDPA; torch's dequantisation and two
  GEMMs), so they serve only when asked for: ``ADAPTWIN_CUDA_BACKEND`` is ``triton`` (default: Triton,
  else the reference), ``cpp`` (the CUDA C++ kernels where built) or ``reference``. Nothing here touches
  CUDA at import time.

Set ``ADAPTWIN_NO_EXTENSION=1`` to skip the native library (the reference then runs on every device).
``ADAPTWIN_CPU_CAP`` (one of `CPU_CAPS`) caps the SIMD paths of the CPU kernels, to run and test what
other CPUs take: ``portable`` as a CPU without a SIMD path of ours (on AArch64 it turns NEON off), ``avx2`` as
an x86 CPU without AVX-512, ``avx512`` as one without AVX512-BF16; `cpu_features` says which paths this process
takes.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings

import torch

_STATE: dict[str, object] = {}
CPU_CAPS = ("native", "avx512", "avx2", "portable")  # csrc/cpu/cpu_features.h's cpu_cap()
OPS = ("adaptwin::attention", "adaptwin::rank_linear")
# op name ("attention", "rank_linear") -> adaptwin._C's inference entry point for it (csrc/cpu/python_calls.cpp),
# filled by `load`. Called with the op's arguments, it converts them in C++ and calls the op through the
# C++ dispatcher below the autograd keys (the dispatcher still picks the backend), where ``torch.ops``
# builds a boxed stack and scans every argument for ``__torch_function__``: a batch-1 NF4 rank_linear call
# at d = 384 went from 9.4 to 5.5 us under torch.no_grad on the 2-core CPU (benchmarks.rank_linear_speed,
# nf4_no_grad). It answers NotImplemented, and the caller goes on to `call_without_autograd`, for tensors
# off the CPU, where a gradient is to be recorded, for Tensor subclasses other than Parameter, under a
# __torch_function__ mode and for arguments not of the schema's plain Python types. `run_rank_linear` and
# `attend` call it, never while torch.compile traces (the op is traced as is). "rank_linear_kept": a packed
# module's whole batch-1 call, kept between calls (`adaptwin.compressors.packed_args.KeptCall`); "gelu_":
# the exact GELU in place on a small CPU tensor (`adaptwin.ops.activation.activate`, csrc/cpu/activation.cpp).
FAST: dict[str, object] = {}


def load() -> dict[str, object]:
    """Load the optional backends once; returns ``{"cpp": bool, "cuda_cpp": bool, "triton": bool,
    "error": str | None}`` (cuda_cpp: adaptwin._C registered CUDA C++ kernels, whichever backend serves)."""
    if _STATE:
        return _STATE
    cap = os.environ.get("ADAPTWIN_CPU_CAP", "native")
    if cap not in CPU_CAPS:  # checked before any kernel reads it (the C++ side takes unknown values as native)
        raise ValueError(f"ADAPTWIN_CPU_CAP must be one of {CPU_CAPS}, got {cap!r}")
    _STATE.update(cpp=False, cuda_cpp=False, triton=False, error=None)
    if os.environ.get("ADAPTWIN_NO_EXTENSION") != "1":
        try:
            native = importlib.import_module("adaptwin._C")
            _STATE["cpp"] = True
            FAST.update((name, getattr(native, f"call_{name}"))
                        for name in ("attention", "rank_linear", "rank_linear_kept") if hasattr(native, f"call_{name}"))
            if hasattr(native, "dequantize"):  # a factor decoded by the CPU kernels' loops
                FAST["dequantize"] = native.dequantize
            if hasattr(native, "parse_rank_linear_kept"):  # a kept call's arguments read once (`KeptCall`)
                FAST["parse_rank_linear_kept"] = native.parse_rank_linear_kept
            if hasattr(native, "gelu_"):  # the in-place GELU of small outputs (`adaptwin.ops.activation.activate`)
                FAST["gelu_"] = native.gelu_
        except ModuleNotFoundError:
            pass  # built without a compiler: the reference runs
        except (ImportError, OSError) as err:  # present but unloadable (e.g. built against another torch)
            _STATE["error"] = f"{type(err).__name__}: {err}"
            warnings.warn(f"adaptwin: native kernels not loaded ({_STATE['error']}); using the PyTorch reference "
                          "ops. Rebuild with `pip install --no-build-isolation -e .`.", stacklevel=2)
    _STATE["cuda_cpp"] = all(has_kernel(op, "cuda") for op in OPS)  # before Triton takes the CUDA key
    choice = cuda_backend()
    wants_triton = choice == "triton" or (choice == "cpp" and not _STATE["cuda_cpp"])  # cpp asked, not built
    if wants_triton and importlib.util.find_spec("triton") is not None:
        _register_triton()
        _STATE["triton"] = True
    elif _STATE["cuda_cpp"] and choice != "cpp":  # no triton, or the reference asked for: the reference
        # takes the CUDA key back from the CUDA C++ kernels (SDPA and cuBLAS beat them by far on a GPU)
        _register_cuda(*_reference_kernels())
    return _STATE


CUDA_BACKENDS = ("triton", "cpp", "reference")


def cuda_backend() -> str:
    """``ADAPTWIN_CUDA_BACKEND`` (one of `CUDA_BACKENDS`, default "triton"), checked."""
    choice = os.environ.get("ADAPTWIN_CUDA_BACKEND", "triton")
    if choice not in CUDA_BACKENDS:
        raise ValueError(f"ADAPTWIN_CUDA_BACKEND must be one of {CUDA_BACKENDS}, got {choice!r}")
    return choice


def cuda_serving() -> str:
    """Which implementation serves the ops on CUDA tensors in this process: "triton", "cuda_cpp" or
    "reference"."""
    state = load()
    if state["triton"]:
        return "triton"
    return "cuda_cpp" if state["cuda_cpp"] and cuda_backend() == "cpp" else "reference"


def cpu_features() -> dict[str, bool]:
    """The SIMD paths the CPU kernels take in this process: ``{"avx2", "avx512", "avx512_rows",
    "avx512_bf16", "neon"}``, the CPU's features capped by ``ADAPTWIN_CPU_CAP``; all False without the native
    library."""
    load()
    if not _STATE["cpp"]:
        return {"avx2": False, "avx512": False, "avx512_rows": False, "avx512_bf16": False, "neon": False}
    return importlib.import_module("adaptwin._C").cpu_features()


def call_without_autograd(op, *args):
    """``op(*args)`` dispatched below the autograd key, as under ``torch.inference_mode``: for inference calls
    whose result needs no gradient. A custom op's autograd kernel is Python (``register_autograd``) and runs
    on every call, even under ``torch.no_grad``; skipping it took a batch-1 NF4 ``rank_linear`` call at
    d = 384 from 15.4 to 9.4 us on the 2-core CPU (``benchmarks.rank_linear_speed``, ``nf4_no_grad*``).
    Under ``torch.compile`` the op is traced as is."""
    if _is_compiling():
        return op(*args)
    with _BelowAutograd():
        return op(*args)


_is_compiling = torch.compiler.is_compiling
_BelowAutograd = torch._C._AutoDispatchBelowAutograd


def has_kernel(op: str, device: str) -> bool:
    """Whether a non-reference kernel is registered for ``op`` (e.g. "adaptwin::attention") on ``device``."""
    key = {"cpu": "CPU", "cuda": "CUDA"}[device]
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)


def _register_triton() -> None:
    """Register the Triton kernels for CUDA tensors (imported on their first call)."""

    def attention_cuda(q, k, v, mask, scale, is_causal):
        from adaptwin.kernels.attention import attention as triton_attention

        return triton_attention(q, k, v, mask, scale, is_causal)

    def rank_linear_cuda(x, a, a_scale, a_format, a_blocksize, a_shape, b, b_scale, b_format, b_blocksize,
                         b_shape, bias):
        from adaptwin.kernels.rank_linear import rank_linear as triton_rank_linear

        return triton_rank_linear(x, a, a_scale, a_format, a_blocksize, a_shape, b, b_scale, b_format,
                                  b_blocksize, b_shape, bias)

    _register_cuda(attention_cuda, rank_linear_cuda)


def _reference_kernels() -> tuple:
    from adaptwin.ops.attention import attention_reference
    from adaptwin.ops.rank_linear import rank_linear_reference

    return attention_reference, rank_linear_reference


def _register_cuda(attention_cuda, rank_linear_cuda) -> None:
    """Python kernels for the ops' CUDA key, over any CUDA C++ kernel adaptwin._C registered."""
    from adaptwin.ops.attention import attention
    from adaptwin.ops.rank_linear import rank_linear

    with warnings.catch_warnings():  # taking the key over from a built CUDA C++ kernel is the intent here
        warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel.*")
        attention.register_kernel("cuda")(attention_cuda)
        rank_linear.register_kernel("cuda")(rank_linear_cuda)
