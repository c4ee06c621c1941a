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
    """Streaming multiprocessors of ``device`` (a torch.device); an H100's 132 where there is no GPU to ask
    (the interpreter, ahead-of-time compiles), so launch plans come out as they would on one."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132
