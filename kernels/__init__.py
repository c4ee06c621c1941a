"""Triton kernels of the ``adaptwin`` ops (CUDA path; correctness-tested on CPU with TRITON_INTERPRET=1).

Imported lazily by `adaptwin.ops.backends` on the first CUDA call, never at ``import adaptwin``, so the
package works without triton. Each module exposes a launcher with the op's exact signature.
"""


def has_triton() -> bool:
    """Whether triton can be imported here (it is optional)."""
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels run on CPU tensors through triton's numpy interpreter)."""
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def sm_count(device) -> int:
    """Streaming multiprocessors of ``device`` (a torch.device), asked once per GPU; an H100's 132 where there
    is no GPU to ask (the interpreter, ahead-of-time compiles), so launch plans come out as they would on one."""
    import torch

    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _SMS:
            _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
        return _SMS[index]
    return 132


_SMS: dict[int, int] = {}


def capability(device) -> tuple[int, int]:
    """(major, minor) compute capability of ``device`` (a CUDA torch.device), asked once per GPU: the launch
    plans ask it on every call."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPS:
        _CAPS[index] = torch.cuda.get_device_capability(index)
    return _CAPS[index]


_CAPS: dict[int, tuple[int, int]] = {}


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers' planning on the host. ``triton.cdiv`` and ``triton.next_power_of_2`` are
    constexpr functions: from Python each call goes through their argument unwrapping, 2-3 us; an
    attention call's plan made thirteen (30.6 us of planning per call, 12.6 without them)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (0 for n <= 0, as ``triton.next_power_of_2``), on the host."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


# Asked of every Triton launch (the launch plans carry it): contraction of a·b + c into fused multiply-adds.
# Triton up to 3.9 contracts by default but warns that from 3.10 it will not; the kernels are written for it
# (attention's scale and running maximum enter exp2 as one FMA, every rescale-and-accumulate is one), so the
# choice is made here and does not move with Triton's default.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


def with_launch_options(plan: list[tuple]) -> list[tuple]:
    """``plan`` [(kernel, grid, args, kwargs)] with `LAUNCH_OPTIONS` added to its Triton kernels' kwargs (steps
    that torch runs, such as cuBLAS products, are left as they are)."""
    from triton.runtime import KernelInterface

    return [(kernel, grid, args, {**kwargs, **LAUNCH_OPTIONS} if isinstance(kernel, KernelInterface) else kwargs)
            for kernel, grid, args, kwargs in plan]
