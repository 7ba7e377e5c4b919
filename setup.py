"""Build script: the pure-Python package, plus the CUDA C++ extension of ``csrc/`` when asked.

The extension ``blv_kernels._C`` is built when ``BLV_BUILD_CUDA=1``, or when nvcc and a CUDA
build of torch are both present; ``BLV_BUILD_CUDA=0`` never builds it. torch must be
importable here, which ``pip install`` build isolation prevents: GPU users run
``BLV_BUILD_CUDA=1 pip install --no-build-isolation .`` (or rely on the first-use build of
``blv_kernels.cuda``). Otherwise ``pip install .`` needs no compiler and no CUDA.
Architectures: ``TORCH_CUDA_ARCH_LIST``, by default ``8.0;9.0+PTX`` (A100, H100/H200; the PTX
lets newer GPUs compile the kernel at load time).
"""

import os

from setuptools import setup


def _cuda_extension():
    flag = os.environ.get("BLV_BUILD_CUDA")
    if flag == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if flag == "1":
            raise RuntimeError("BLV_BUILD_CUDA=1 needs torch importable: pip install --no-build-isolation .") from None
        print("blv_kernels: torch is not importable here; installing the pure-Python package (no CUDA extension)")
        return [], {}
    if flag != "1" and (torch.version.cuda is None or CUDA_HOME is None):
        print("blv_kernels: no nvcc or no CUDA build of torch; installing the pure-Python package (no CUDA extension)")
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    ext = CUDAExtension(
        "blv_kernels._C",
        sources=["csrc/blv_ops.cpp", "csrc/cuda/blv_kernel.cu"],
        # no -std flag: torch passes the standard its headers need (C++20 for recent torch)
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
