"""CUDA emulated on the host: the unmodified CUDA kernels of ``blv_kernels/csrc/cuda``, compiled
by the host's C++ compiler through ``cuda_emulation.h`` (fibers for threads, checked barriers,
shuffles and vector alignment), as the tests' backend ``"cuda-emulated"`` on CPU tensors.

``conftest.py`` registers it, so the shared grid (``tests/grid.py``) runs every case through
the real CUDA source on every run, GPU or not.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from blv_kernels.backends import HALF_AND_SINGLE, Backend, build_csrc, register_backend

HERE = Path(__file__).resolve().parent
HEADER = HERE / "cuda_emulation.h"
INCLUDE = HERE / "include"  # <cuda_runtime.h>, <cuda_fp16.h>, <cuda_bf16.h>: the emulation's
# -x c++: a .cu as C++. No FMA contraction: __fmul_rn must stay a rounded product. -O2: -O3 builds
# slower and runs no faster here.
FLAGS = ("-x", "c++", f"-I{INCLUDE}", "-ffp-contract=off", "-O2")
INPUTS = (HEADER, *sorted(INCLUDE.glob("*.h")))
LIBRARY = build_csrc.Library("cuda-emulated", ("cuda/blv_kernel.cu",), "c++", extra_flags=FLAGS, extra_inputs=INPUTS)


def unavailable(device_type: str) -> str | None:
    """Only a missing compiler makes the backend skip; a failed build fails the tests that use it."""
    if build_csrc.compiler_path("c++") is None:
        return "no C++ compiler to build the emulated CUDA kernels"
    return None


BACKEND = Backend("cuda-emulated", "emulated_cuda.backend", ("cpu",), HALF_AND_SINGLE, True, unavailable)


def register() -> None:
    register_backend(BACKEND)


def compile_source(source: Path, output_dir: Path) -> ctypes.CDLL:
    """Another .cu file (a test's kernel) compiled and loaded like the emulated library."""
    # an absolute source: build_csrc's CSRC / source is the source itself
    library = build_csrc.Library(source.stem, (str(source.resolve()),), "c++", extra_flags=FLAGS, extra_inputs=INPUTS)
    return ctypes.CDLL(str(build_csrc.build(library, output_dir / f"lib{source.stem}.so", portable=True, quiet=True)))
