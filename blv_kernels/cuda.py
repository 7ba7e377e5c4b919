"""The CUDA C++ backend: loading the compiled ``csrc/`` extension, fake and autograd registration.

The operators ``blv_kernels_cuda::blv_cross_entropy_fwd`` / ``_bwd`` are defined in C++
(``csrc/blv_ops.cpp``, kernels in ``csrc/cuda/blv_kernel.cu``) with the semantics of the
Triton op of ``ops.py``; the forward also returns the number of out-of-range labels, checked
here on the device (no host sync). The extension is ``blv_kernels._C`` when ``setup.py``
built it (``BLV_BUILD_CUDA=1``); otherwise, from a source checkout with nvcc and a CUDA build
of torch, it is built on first use with ``torch.utils.cpp_extension.load`` and cached in
torch's extensions directory. Nothing is loaded or built until the backend is asked for.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from . import noise
from ._layout import empty_gradient
from ._validation import raise_or_assert_no_bad_labels

__all__ = ["available", "require", "blv_cross_entropy_fwd"]

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_SOURCES = [_CSRC / "blv_ops.cpp", _CSRC / "cuda" / "blv_kernel.cu"]
_state: dict[str, object] = {}  # "error": why the extension is missing (None once loaded)


def _nvcc() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = Path(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    return str(nvcc) if nvcc is not None and nvcc.exists() else shutil.which("nvcc")


def _jit_build() -> None:
    """Compile csrc/ with torch.utils.cpp_extension.load (cached: later calls only load it)."""
    from torch.utils.cpp_extension import load

    # Unset, torch builds for the visible GPUs (any arch); a fixed "8.0;9.0" would give no kernel
    # image on e.g. sm_75 or sm_100. With no GPU visible torch cannot pick, so default to those.
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    # No -std flag: torch passes the standard its headers need (C++20 for recent torch).
    load(
        name="blv_kernels_cuda",
        sources=[str(s) for s in _SOURCES],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3"],
        is_python_module=False,
    )


def _load() -> str | None:
    """Load the extension once; None on success, else the reason it is unavailable."""
    if "error" in _state:
        return _state["error"]
    error = None
    try:
        from . import _C  # noqa: F401  (built by setup.py; importing it registers the operators)
    except (ImportError, OSError) as exc:
        if torch.version.cuda is None:
            error = f"torch {torch.__version__} is not a CUDA build ({exc})"
        elif _nvcc() is None:
            error = f"the extension was not built and nvcc was not found for a first-use build ({exc})"
        elif not all(s.exists() for s in _SOURCES):
            error = f"the extension was not built and the csrc/ sources are not next to the package ({exc})"
        else:
            try:
                _jit_build()
            except (RuntimeError, OSError, ImportError) as build_exc:  # compiler or loader failure
                error = f"the first-use build of csrc/ failed ({build_exc})"
    if error is None:
        _register()
    _state["error"] = error
    return error


def available() -> bool:
    """Whether the CUDA C++ backend can be used (loads, or builds on first use, the extension)."""
    return _load() is None


def require() -> None:
    """Raise a RuntimeError that says how to get the extension when it is missing."""
    error = _load()
    if error is not None:
        raise RuntimeError(
            f"backend='cuda' needs the compiled CUDA extension: {error}. Build it with "
            "`BLV_BUILD_CUDA=1 pip install --no-build-isolation .` (CUDA build of torch and nvcc "
            "installed), or use backend='triton'."
        )


def _fwd_fake(logits, target, variation_weight, seed, offset, scale, threshold, use_poly, clamp_mode, class_weight,
              position_weight, ignore_index, reduction):  # fmt: skip
    loss = logits.new_empty(target.shape if reduction == "none" else ())
    lse = logits.new_empty(target.numel(), dtype=torch.float32)
    return loss, lse, logits.new_empty((), dtype=torch.float32), logits.new_empty((), dtype=torch.int64)


def _bwd_fake(grad_loss, logits, *args):
    return empty_gradient(logits)  # the rule blv_ops.cpp follows too


def _setup_context(ctx, inputs, output):
    (logits, target, variation_weight, seed, offset, scale, threshold, use_poly, clamp_mode, class_weight,
     position_weight, ignore_index, reduction) = inputs  # fmt: skip
    _, lse, denom, _ = output
    ctx.save_for_backward(logits, target, variation_weight, seed, class_weight, position_weight, lse, denom)
    ctx.options = (offset, scale, threshold, use_poly, clamp_mode, ignore_index, reduction)


def _backward(ctx, grad_loss, grad_lse, grad_denom, grad_num_bad):
    logits, target, variation_weight, seed, class_weight, position_weight, lse, denom = ctx.saved_tensors
    offset, scale, threshold, use_poly, clamp_mode, ignore_index, reduction = ctx.options
    grad = torch.ops.blv_kernels_cuda.blv_cross_entropy_bwd(
        grad_loss, logits, target, variation_weight, seed, offset, scale, threshold, use_poly, clamp_mode,
        class_weight, position_weight, lse, denom, ignore_index, reduction,
    )  # fmt: skip
    # Only the logits get a gradient; weights, labels and the seed are constants of the loss.
    return (grad,) + (None,) * 12


def _register() -> None:
    torch.library.register_fake("blv_kernels_cuda::blv_cross_entropy_fwd", _fwd_fake)
    torch.library.register_fake("blv_kernels_cuda::blv_cross_entropy_bwd", _bwd_fake)
    torch.library.register_autograd("blv_kernels_cuda::blv_cross_entropy_fwd", _backward, setup_context=_setup_context)


def blv_cross_entropy_fwd(logits, target, variation_weight, seed, offset, sigma, mode, class_weight, position_weight,
                          ignore_index, reduction):  # fmt: skip
    """The CUDA forward with the signature of ``ops.blv_cross_entropy_fwd``: (loss, lse, denom).

    Out-of-range labels raise through ``torch._assert_async`` (a device-side check, no sync).
    """
    require()
    params = noise.variation_params(sigma, mode)
    loss, lse, denom, num_bad = torch.ops.blv_kernels_cuda.blv_cross_entropy_fwd(
        logits, target, variation_weight, seed, offset, params.scale, params.threshold,
        params.use_poly, params.clamp_mode, class_weight, position_weight, ignore_index, reduction,
    )  # fmt: skip
    raise_or_assert_no_bad_labels(num_bad, None, logits.shape[1], ignore_index)
    return loss, lse, denom
