"""Public BLV loss: the functional entry point with backend choice, and the ``nn.Module``."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from . import cuda, noise, reference
from ._validation import check_loss_arguments, check_reduction
from .weights import class_weights

try:
    from . import ops
except ImportError:  # no triton on this platform: the reference backend still works
    ops = None

__all__ = ["blv_cross_entropy", "BLVLoss", "BACKENDS"]

BACKENDS = ("auto", "reference", "triton", "cuda")


def draw_seed(device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh 63-bit seed drawn on ``device`` from PyTorch's generator, as a 0-dim int64 tensor.

    Drawn on the device, so there is no host sync, and a captured CUDA graph draws a new one
    on every replay.
    """
    return torch.randint(0, 2**63 - 1, (), dtype=torch.int64, device=device, generator=generator)


def _blv_loss(
    logits, target, variation_weight, sigma, *, seed, offset, mode, weight, ignore_index, reduction,
    variation, position_weight, avg_factor, generator, backend,
):  # fmt: skip
    """Dispatch to a backend once the variation weights are known (shared by function and module).

    ``sigma`` is a Python number, or, for the Triton backend, the int64 tensor of its bits
    (``noise.sigma_bits``) that BLVLoss keeps so that a changing sigma never recompiles a graph.
    """
    sigma_in_memory = isinstance(sigma, torch.Tensor)
    if not sigma_in_memory:
        noise.check_sigma(sigma)
    noise.check_mode(mode)
    backend = _resolve_backend(backend, logits, variation)
    if seed is None and variation is None and (sigma_in_memory or sigma > 0):
        seed = draw_seed(logits.device, generator)
    if backend in ("triton", "cuda"):
        check_loss_arguments(logits, target, variation_weight, weight, position_weight, reduction, avg_factor)
        if backend == "triton":
            fused_fwd = ops.blv_cross_entropy_fwd
            sigma = sigma.to(logits.device) if sigma_in_memory else noise.sigma_bits(sigma, logits.device)
        else:
            fused_fwd = cuda.blv_cross_entropy_fwd
        loss, _, _ = fused_fwd(
            logits, target, variation_weight.float().contiguous(),
            noise.seed_tensor(0 if seed is None else seed, logits.device), noise.check_offset(offset), sigma,
            mode, None if weight is None else weight.float().contiguous(),
            position_weight, int(ignore_index), "sum" if avg_factor is not None else reduction,
        )  # fmt: skip
        return loss if avg_factor is None else loss / avg_factor
    return reference.blv_cross_entropy_from_weights(
        logits, target, variation_weight, sigma, seed=seed, offset=offset, mode=mode, weight=weight,
        ignore_index=ignore_index, reduction=reduction, variation=variation, position_weight=position_weight,
        avg_factor=avg_factor,
    )  # fmt: skip


def _resolve_backend(backend: str, logits: torch.Tensor, variation) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":  # "triton" until the benchmark compares it with "cuda"
        fused_ok = ops is not None and logits.dtype != torch.float64 and variation is None
        return "triton" if fused_ok and logits.is_cuda else "reference"
    if backend == "reference":
        return backend
    # the fused backends
    if logits.dtype == torch.float64:
        raise TypeError(f"backend={backend!r} computes in float32: use backend='reference' for float64 logits")
    if variation is not None:
        raise ValueError(f"backend={backend!r} generates the variation in registers: pass variation= only with "
                         "backend='reference'")  # fmt: skip
    if backend == "cuda":
        if not logits.is_cuda:
            raise ValueError(f"backend='cuda' needs CUDA tensors, got {logits.device}")
        cuda.require()
    else:
        if ops is None:
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        if not logits.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU), got {logits.device}"
            )
    return backend


def blv_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_counts,
    sigma: float = 6.0,
    *,
    seed=None,
    offset: int = 0,
    mode: str = "abs",
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    variation: torch.Tensor | None = None,
    position_weight: torch.Tensor | None = None,
    avg_factor=None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """BLV loss, a drop-in for ``F.cross_entropy`` during training.

    Computes ``F.cross_entropy(logits + v * w[c], target, weight, ignore_index, reduction)``
    with ``w = class_weights(class_counts)`` and ``v`` the variation stream of
    :func:`blv_kernels.variation`; the arguments are those of
    :func:`blv_kernels.reference.blv_cross_entropy`, plus:

    Args:
        seed: an int in [0, 2**64) or a one-element integer tensor. ``None`` (default) draws a
            fresh seed from PyTorch's generator for the logits' device (or ``generator``), so
            ``torch.manual_seed`` makes runs reproducible and each call draws new noise.
        generator: the ``torch.Generator`` to draw the seed from when ``seed`` is None.
        backend: ``"auto"`` picks the fused Triton kernel for CUDA tensors (float16, bfloat16,
            float32) and the plain-PyTorch ``"reference"`` otherwise; ``"triton"`` asks for the
            kernel (on the CPU only under ``TRITON_INTERPRET=1``); ``"cuda"`` the compiled CUDA
            C++ kernel (same results, see ``blv_kernels.cuda``).
    """
    return _blv_loss(
        logits, target, reference.variation_weights_for(class_counts, logits, target), sigma, seed=seed, offset=offset,
        mode=mode, weight=weight, ignore_index=ignore_index, reduction=reduction, variation=variation,
        position_weight=position_weight, avg_factor=avg_factor, generator=generator, backend=backend,
    )  # fmt: skip


class BLVLoss(nn.Module):
    """BLV cross-entropy while training, plain cross-entropy in ``eval()`` (like dropout).

    The variation weights ``w_c`` live in the buffer ``variation_weight`` (they follow
    ``.to(device)`` and the state dict); :meth:`set_class_counts` replaces them when the class
    counts are re-estimated. ``sigma`` may be set at every step (a schedule): the Triton kernel
    reads it from a device buffer, so neither the kernel nor a ``torch.compile`` graph
    recompiles, and setting it does not sync.
    """

    def __init__(
        self,
        class_counts,
        sigma: float = 6.0,
        *,
        mode: str = "abs",
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        smoothing: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        noise.check_sigma_mode(sigma, mode)
        check_reduction(reduction)
        self.register_buffer("variation_weight", class_weights(class_counts, smoothing=smoothing))
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))
        # sigma's float64 bits, read by the Triton kernel; not in the state dict (sigma is an option)
        self.register_buffer("sigma_bits", noise.sigma_bits(sigma), persistent=False)
        self._sigma = float(sigma)
        self.mode = mode
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.backend = backend

    @property
    def sigma(self) -> float:
        return self._sigma

    @sigma.setter
    def sigma(self, value: float) -> None:
        self.sigma_bits.copy_(noise.sigma_bits(value, self.sigma_bits.device))
        self._sigma = float(value)

    def sigma_argument(self, logits: torch.Tensor):
        """What the loss call takes as sigma: the device buffer for the Triton backend, else the number."""
        return self.sigma_bits if _resolve_backend(self.backend, logits, None) == "triton" else self.sigma

    def set_class_counts(self, class_counts, *, smoothing: float = 0.0) -> None:
        """Replace the variation weights in place (same device, same number of classes)."""
        w = class_weights(class_counts, smoothing=smoothing)
        if w.shape != self.variation_weight.shape:
            raise ValueError(f"expected {self.variation_weight.numel()} class counts, got {w.numel()}")
        self.variation_weight.copy_(w)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, *, seed=None) -> torch.Tensor:
        if not self.training:
            return F.cross_entropy(
                logits, target.long(), weight=self.weight, ignore_index=self.ignore_index, reduction=self.reduction
            )
        return _blv_loss(
            logits, target, self.variation_weight, self.sigma_argument(logits), seed=seed, offset=0, mode=self.mode,
            weight=self.weight, ignore_index=self.ignore_index, reduction=self.reduction, variation=None,
            position_weight=None, avg_factor=None, generator=None, backend=self.backend,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.variation_weight.numel()}, sigma={self.sigma}, mode={self.mode!r}, "
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, backend={self.backend!r}"
        )
