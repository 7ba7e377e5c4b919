"""The ``"cuda-emulated"`` backend: the operator contract of ``blv_kernels/ops.py`` through the
emulated CUDA library, called like the real one (``cpp_kernel.CompiledKernels``) with host
pointers and a NULL stream."""

from __future__ import annotations

import functools

import torch

from blv_kernels.backends import build_csrc
from blv_kernels.backends.cpp_kernel import CompiledKernels
from blv_kernels.problem import BLVProblem

from . import LIBRARY


@functools.cache
def kernels() -> CompiledKernels:
    return CompiledKernels(build_csrc.library_path(LIBRARY, quiet=True), "emulated CUDA")


def forward(problem: BLVProblem, *, compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return kernels().forward(problem, compute_grad=compute_grad)


def scale_grad_(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    kernels().scale_grad_(grad, grad_output)
