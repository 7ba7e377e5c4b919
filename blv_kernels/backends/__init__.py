"""Every implementation of the BLV loss, in one table; ``backend=`` picks a row.

A backend computes the loss of a :class:`~blv_kernels.problem.BLVProblem`. The reference
(``blv_kernels/reference.py``) is plain PyTorch and autograd; the fused backends implement the
operator contract of ``blv_kernels/ops.py`` (``forward(problem, compute_grad)`` returning the
loss and its gradient in one pass over the logits, ``scale_grad_(grad, grad_output)`` for the
backward) and share its op, fake and autograd registration:

    reference   blv_kernels/reference.py            any device, float16 to float64
    triton      backends/triton_kernel.py           CUDA (the CPU under TRITON_INTERPRET=1)
    cuda        backends/cpp_kernel.py + csrc/cuda  CUDA, compiled with nvcc
    cpu         backends/cpp_kernel.py + csrc/cpu   CPU, compiled with the host's C++ compiler

A new backend is one module with those two functions and one row of ``BACKENDS``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

__all__ = ["Backend", "BACKENDS", "BACKEND_NAMES", "get_backend", "resolve_backend", "register_backend"]

HALF_AND_SINGLE = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Backend:
    name: str
    module: str  # the implementation, imported when first used
    device_types: tuple[str, ...]  # torch device types of the logits it runs on
    dtypes: tuple[torch.dtype, ...]  # logits dtypes it takes
    fused: bool  # implements the operator contract of ops.py (else a plain autograd loss)
    unavailable: Callable[[str], str | None]  # device type -> why it cannot run there now, or None

    def implementation(self) -> ModuleType:
        return importlib.import_module(self.module)

    def why_not(self, device_type: str, dtype: torch.dtype) -> Exception | None:
        """The error to raise for logits of this device type and dtype, or None when this backend runs them."""
        if device_type not in self.device_types:
            return ValueError(
                f"backend={self.name!r} needs {' or '.join(self.device_types)} tensors, got {device_type}"
            )
        if dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            hint = ": use backend='reference' for float64" if dtype == torch.float64 else ""
            return TypeError(f"backend={self.name!r} takes {names} logits, got {dtype}{hint}")
        reason = self.unavailable(device_type)
        return None if reason is None else RuntimeError(reason)


def _always(device_type: str) -> None:
    return None


def _triton_unavailable(device_type: str) -> str | None:
    if importlib.util.find_spec("triton") is None:  # only triton's absence: a bug in our module must raise
        return "backend='triton' needs the triton package (pip install triton)"
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "backend='triton' runs on CUDA tensors (on the CPU only under TRITON_INTERPRET=1)"
    return None


def _compiled_unavailable(device_type: str) -> str | None:
    from . import cpp_kernel

    return cpp_kernel.unavailable(device_type)


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("reference", "blv_kernels.reference", ("cpu", "cuda"), (*HALF_AND_SINGLE, torch.float64), False,
                _always),
        Backend("triton", "blv_kernels.backends.triton_kernel", ("cuda", "cpu"), HALF_AND_SINGLE, True,
                _triton_unavailable),
        Backend("cuda", "blv_kernels.backends.cpp_kernel", ("cuda",), HALF_AND_SINGLE, True, _compiled_unavailable),
        Backend("cpu", "blv_kernels.backends.cpp_kernel", ("cpu",), HALF_AND_SINGLE, True, _compiled_unavailable),
    )
}  # fmt: skip
# What backend="auto" tries, in order, for logits on each device type; the reference is the last resort.
# On a GPU, from the H100 sweep (benchmarks/RESULTS.md, 2026-11-27; fwd+bwd kernels replayed in a
# CUDA graph): Triton first (8 x C x 512 x 512(1024) NCHW fp32, C = 19 / 150 / 171: 0.32 / 3.14 /
# 1.67 ms against CUDA C++'s 0.60 / 4.62 / 2.42), but CUDA C++ first where the classes are
# contiguous and more than WIDE_ROWS_CLASSES (65536 x 1000 rows: 0.36 ms against 1.40). That
# Triton kernel gave a row to a thread, swept twice; the one since, a row across lanes in one
# pass, was not timed (static estimate: 0.8x the instructions, a warp's load reading 4 lines,
# not 32): until a card times it, the measured order stands.
AUTO_ORDER = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}
AUTO_ORDER_WIDE_ROWS = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}
WIDE_ROWS_CLASSES = 320
BACKEND_NAMES = ("auto", *BACKENDS)


def register_backend(backend: Backend) -> None:
    """Add a backend to the table (the tests add an emulated CUDA one); ``backend="auto"`` never picks it."""
    BACKENDS[backend.name] = backend


def get_backend(name: str) -> Backend:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {name!r}")
    return BACKENDS[name]


def resolve_backend(name: str, logits: torch.Tensor) -> Backend:
    """The backend that computes a loss of ``logits``: ``name``, or for ``"auto"`` the first of
    ``AUTO_ORDER`` (``AUTO_ORDER_WIDE_ROWS`` for more than WIDE_ROWS_CLASSES contiguous
    classes) that can, else the reference (with a one-time warning on the CPU, where the compiled
    kernel is missing). Raises when the named backend cannot."""
    wide_rows = False  # a branch, not the symbolic bool itself: torch.compile guards on it (for "auto" only)
    if name == "auto" and logits.dim() >= 2 and logits.stride(1) == 1 and logits.shape[1] > WIDE_ROWS_CLASSES:
        wide_rows = True
    return BACKENDS[_resolve(name, logits.device.type, logits.dtype, wide_rows)]


@torch._dynamo.assume_constant_result  # torch.compile calls it while tracing and keeps the answer
def _resolve(name: str, device_type: str, dtype: torch.dtype, wide_rows: bool) -> str:
    if name == "auto":
        for candidate in (AUTO_ORDER_WIDE_ROWS if wide_rows else AUTO_ORDER).get(device_type, ()):
            if BACKENDS[candidate].why_not(device_type, dtype) is None:
                return candidate
        if device_type == "cpu" and dtype != torch.float64:
            _warn_reference_fallback(str(BACKENDS["cpu"].why_not(device_type, dtype)))
        return "reference"
    error = get_backend(name).why_not(device_type, dtype)
    if error is not None:
        raise error
    return name


_warned: set[str] = set()


def _warn_reference_fallback(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"blv_kernels: the compiled CPU kernel is unavailable ({reason}); using the much slower plain-PyTorch "
            "reference", RuntimeWarning, stacklevel=4,
        )  # fmt: skip
