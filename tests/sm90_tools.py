"""Ahead-of-time sm_90 compilation of Triton kernels for the tests test_kernels_sm90*.py (no GPU needed).

Each variant a real call would launch is bound with Triton's specialisation rules for the CUDA backend and
compiled to a cubin for sm_90 with Triton's bundled ptxas; `check` asserts no register spills, shared
memory within the H100's, and tensor cores for 16-bit dots only. Uses Triton internals (the JIT binder):
a triton whose internals differ makes the calling test skip, saying so.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

H100_SHARED = 232448  # bytes of shared memory one block may use on sm_90
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _toolchain():
    """(backend, target, compile function, binder factory) for sm_90, or skip with the reason."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, compile, make_backend
        from triton.runtime.jit import create_function_from_signature
    except ImportError as exc:
        pytest.skip(f"triton {getattr(sys.modules.get('triton'), '__version__', '?')} lacks {exc.name}")
    target = GPUTarget("cuda", 90, 32)
    try:
        backend = make_backend(target)
    except Exception as exc:  # noqa: BLE001 - no NVIDIA backend in this triton build
        pytest.skip(f"triton {triton.__version__} has no usable CUDA backend: {exc}")
    return backend, target, compile, ASTSource, create_function_from_signature


def compile_sm90(kernel, args: tuple, kwargs: dict):
    """The CompiledKernel Triton would build for ``kernel[grid](*args, **kwargs)`` on an H100."""
    backend, target, compile, ASTSource, binder_for = _toolchain()
    kwargs = dict(kwargs)
    try:
        bound, spec, options = binder_for(kernel.signature, kernel.params, backend)(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, options)
    except (AttributeError, TypeError) as exc:
        import triton

        pytest.skip(f"triton {triton.__version__}'s JIT internals differ from those this check uses: {exc}")
    return compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def _cuobjdump() -> str | None:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if bundled.exists():
        return str(bundled)
    import shutil

    return shutil.which("cuobjdump")


def dump(compiled, flag: str) -> str:
    """cuobjdump ``flag`` on the compiled kernel's cubin (skips where there is no cuobjdump)."""
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (neither bundled with triton nor on PATH)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(compiled.asm["cubin"])
        return subprocess.run([tool, flag, str(path)], capture_output=True, text=True, check=True, timeout=60).stdout


def resources(compiled) -> dict[str, int]:
    """cuobjdump's resource usage of the cubin: REG, STACK, SHARED, LOCAL."""
    text = dump(compiled, "--dump-resource-usage")
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    assert found, text
    return dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, found.groups())))


def check(compiled, tensor_cores: bool) -> dict[str, int]:
    use = resources(compiled)
    assert use["LOCAL"] == 0 and use["STACK"] == 0, f"register spills: {use}"
    assert compiled.metadata.shared <= H100_SHARED, f"{compiled.metadata.shared} bytes of shared memory"
    ptx = compiled.asm["ptx"]
    assert ("wgmma" in ptx or "mma.sync" in ptx) == tensor_cores, "tensor-core use differs from the dtype's"
    return use


def sass_loops(compiled) -> list[list[str]]:
    """The SASS instructions of each loop in the cubin (each span from a backward branch's target to it), in
    address order."""
    text = dump(compiled, "-sass")
    lines = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", text)]
    found = []
    for at, ins in lines:
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", ins)
        if target and int(target.group(1), 16) < at:
            found.append([i for a, i in lines if int(target.group(1), 16) <= a <= at])
    return found

