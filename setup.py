"""Build script: the pure-Python package, plus the compiled kernels of ``blv_kernels/csrc`` when asked.

``BLV_BUILD_CPU=1`` compiles the CPU kernels into ``blv_kernels/_lib/libblv_cpu.so`` with the
host's C++ compiler (portable flags: no ``-march=native``, the library may run on other
machines); ``BLV_BUILD_CUDA=1`` compiles the CUDA kernels into ``libblv_cuda.so`` with nvcc
(architectures: ``TORCH_CUDA_ARCH_LIST``, by default ``8.0;9.0`` plus PTX of the last). Neither
needs torch: the libraries have a plain C interface (``csrc/blv_kernel.h``) loaded through
ctypes, and ``backends/build_csrc.py`` is imported by its file path, so ``pip install .`` works
with build isolation. Without those variables nothing is compiled and no compiler is needed; the
C sources ship with the package and are compiled on first use instead.
"""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
FLAGS = {"cpu": "BLV_BUILD_CPU", "cuda": "BLV_BUILD_CUDA"}


def _build_csrc():
    """blv_kernels/backends/build_csrc.py, without importing the package (which needs torch)."""
    spec = importlib.util.spec_from_file_location(
        "_blv_build_csrc", HERE / "blv_kernels" / "backends" / "build_csrc.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _requested() -> list[str]:
    return [name for name, flag in FLAGS.items() if os.environ.get(flag) == "1"]


class BuildPyWithKernels(build_py):
    """build_py, then the libraries whose BLV_BUILD_* variable is 1 into blv_kernels/_lib."""

    def run(self):
        super().run()
        build_csrc = _build_csrc()
        if getattr(self, "editable_mode", False):  # the package is imported from the source tree: build there
            lib = build_csrc.PREBUILT
        else:  # a wheel holds what this build asked for, not a library left in build/ or _lib/ by an earlier one
            lib = Path(self.build_lib, "blv_kernels", "_lib")
            shutil.rmtree(lib, ignore_errors=True)
        for name in _requested():
            build_csrc.build_prebuilt(build_csrc.LIBRARIES[name], lib)


class KernelsDistribution(Distribution):
    """With compiled libraries the wheel is platform-specific (tagged for this platform), else pure Python."""

    def has_ext_modules(self):
        return bool(_requested())


setup(cmdclass={"build_py": BuildPyWithKernels}, distclass=KernelsDistribution)
