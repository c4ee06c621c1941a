"""Build script. The pure-Python package always installs; native kernels under ``csrc/`` are optional.

The Triton kernels in ``kernels/`` install as ``adaptwin.kernels`` (part of the package, as the
design has it): a top-level ``kernels`` would collide with Hugging Face's ``kernels`` package, which
transformers and bitsandbytes import.

The C++ extension is built only when torch's ``cpp_extension`` and a compiler are usable and
``csrc/cpu`` holds sources; any failure there leaves a working pure-PyTorch install (the reference
ops are the fallback). Build with ``pip install --no-build-isolation .`` so the installed torch is
used instead of a fresh download.
"""

from __future__ import annotations

import glob
import os
import shutil

from setuptools import find_packages, setup


def _extensions():
    if os.environ.get("ADAPTWIN_NO_EXTENSION") == "1":
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if not sources or shutil.which(os.environ.get("CXX", "c++")) is None:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # torch not importable in this build environment
        return [], {}
    # No -march=native: the library must load on any x86-64 CPU. The AVX-512 loops carry their own
    # target attribute and are chosen at run time (csrc/cpu/cpu_features.h).
    cxx = ["-O3", "-fopenmp"]
    link = ["-fopenmp"]
    sanitize = os.environ.get("ADAPTWIN_SANITIZE") == "1"  # `make sanitize`: ASan + UBSan, never for an install
    if sanitize:  # (-fno-wrapv: Python's flags carry -fwrapv, under which UBSan cannot see signed overflow)
        cxx = ["-O2", "-g", "-fopenmp", "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
               "-fno-sanitize-recover=undefined", "-fno-wrapv"]
        link = ["-fopenmp", "-fsanitize=address,undefined"]
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if cuda_sources and torch.version.cuda and CUDA_HOME and os.environ.get("ADAPTWIN_NO_CUDA") != "1":
        ext = CUDAExtension("adaptwin._C", sources + cuda_sources, extra_link_args=["-fopenmp"], optional=True,
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math"]})
    else:
        ext = CppExtension("adaptwin._C", sources, extra_compile_args=cxx, extra_link_args=link,
                           optional=not sanitize)
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = _extensions()
setup(
    packages=[*find_packages(include=["adaptwin", "adaptwin.*"]), "adaptwin.kernels"],
    package_dir={"adaptwin.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
