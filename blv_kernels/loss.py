"""The public BLV loss: the functional form, its weights-level twin, and the ``nn.Module``.

Each call is checked here once, normalised into a :class:`~blv_kernels.problem.BLVProblem` and
handed to the backend ``backend=`` resolves to (``blv_kernels/backends``).
"""

from __future__ import annotations

import torch
from torch import nn

from . import noise, ops, reference
from ._validation import (
    check_class_vector,
    check_dense,
    check_logits_target,
    check_loss_arguments,
    check_options,
    check_target_values,
)
from .backends import get_backend, resolve_backend
from .problem import BLVProblem, loss_dtype
from .weights import class_weight_tensor, class_weights

__all__ = ["blv_cross_entropy", "blv_cross_entropy_from_weights", "plain_cross_entropy", "BLVLoss", "draw_seed"]


def draw_seed(device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh 63-bit seed drawn on ``device`` from PyTorch's generator, as a 0-dim int64 tensor.

    Drawn on the device, so there is no host sync, and a captured CUDA graph draws a new one
    on every replay.
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return torch.randint(0, 2**63 - 1, (), dtype=torch.int64, device=device, generator=generator)


def blv_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    class_counts,
    sigma: float = 6.0,
    seed=None,
    offset: int = 0,
    mode: str = "abs",
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    variation: torch.Tensor | None = None,
    position_weight: torch.Tensor | None = None,
    avg_factor=None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """BLV loss, a drop-in for ``F.cross_entropy`` during training.

    Computes ``F.cross_entropy(logits + v * w[c], target, weight, ignore_index=ignore_index,
    reduction=reduction, label_smoothing=label_smoothing)`` with ``w = class_weights(class_counts)``
    and ``v`` the variation stream of :func:`blv_kernels.variation`, the perturbed logits and
    the softmax in float32 (float64 for float64 logits), the result in the logits' dtype.
    ``weight`` is the third positional argument as in ``F.cross_entropy``; the class prior is
    the keyword ``class_counts``.

    Args:
        logits: ``(N, C)`` or ``(N, C, d1, ..., dk)``, float16 / bfloat16 / float32 (float64:
            ``backend="reference"``), any strides (NCHW and channels_last are read in place).
        target: ``(N, d1, ..., dk)`` class indices (uint8, int8, int16, int32 or int64); a label
            outside ``[0, C)`` that is not ``ignore_index`` is an error.
        weight, ignore_index, reduction, label_smoothing: as in ``F.cross_entropy``. ``weight``
            is a constant (it must not require grad), as in ``F.cross_entropy``.
        class_counts: per-class counts ``n_c`` (length C); see :func:`blv_kernels.class_weights`.
        sigma: the standard deviation of ``eps``, a number >= 0; 0 gives plain cross-entropy.
        seed: an int in [0, 2**64) or a one-element integer tensor. ``None`` (default) draws a
            fresh seed from PyTorch's generator for the logits' device (or ``generator``), so
            ``torch.manual_seed`` makes runs reproducible and each call draws new noise.
        offset: where in the stream the batch starts (position ``q = offset + n*S + s``).
        mode: ``"abs"`` (``v = min(|eps|, 1)``, the released code) or ``"clamp"``
            (``v = clamp(eps, 0, 1)``, the paper's pseudo-code).
        variation: an explicit ``v`` of the logits' shape instead of the stream
            (``backend="reference"`` only).
        position_weight: per-position weights (the target's shape) multiplying each position's
            loss, as mmseg's ``weight=``; a constant. With ``reduction="mean"`` the divisor stays
            that of ``F.cross_entropy`` (the count, or the sum of class weights).
        avg_factor: with ``reduction="mean"``, divide the weighted sum by this (a number or a
            one-element tensor: mmseg's ``avg_factor``; ``target.numel()`` averages over all
            positions, ignored ones counting as 0, as mmseg's ``avg_non_ignore=False``).
        generator: the ``torch.Generator`` to draw the seed from when ``seed`` is None.
        backend: ``"auto"`` (the fused Triton kernel for CUDA tensors, the compiled C++ kernel
            for CPU tensors, else the reference), or one of ``"reference"``, ``"triton"``,
            ``"cuda"`` (CUDA C++), ``"cpu"`` (C++): see ``blv_kernels/backends``.
    """
    check_logits_target(logits, target)
    variation_weight = class_weights(class_counts)
    if variation_weight.numel() != logits.shape[1]:
        raise ValueError(
            f"class_counts has {variation_weight.numel()} entries but logits have C={logits.shape[1]} classes"
        )
    return blv_cross_entropy_from_weights(
        logits, target, variation_weight.to(logits.device), weight, sigma=sigma, seed=seed, offset=offset, mode=mode,
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, variation=variation,
        position_weight=position_weight, avg_factor=avg_factor, generator=generator, backend=backend,
    )  # fmt: skip


def blv_cross_entropy_from_weights(
    logits: torch.Tensor,
    target: torch.Tensor,
    variation_weight: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    sigma: float = 6.0,
    variation_params: torch.Tensor | None = None,
    seed=None,
    offset: int = 0,
    mode: str = "abs",
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    variation: torch.Tensor | None = None,
    position_weight: torch.Tensor | None = None,
    avg_factor=None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`blv_cross_entropy` with the variation weights ``w_c`` (shape (C,), on the logits'
    device) instead of the counts: the entry point of :class:`BLVLoss` and the mmseg adapter.

    ``variation_params``: the ``[scale, threshold]`` tensor of :func:`blv_kernels.noise.variation_params_tensor`
    on the logits' device, read by the kernels instead of ``sigma`` (so that a graph need not
    change when sigma does); :class:`BLVLoss` passes its own. Then the seed is always drawn.
    """
    check_loss_arguments(logits, target, variation_weight, weight, position_weight, reduction, avg_factor)
    check_options(mode=mode, ignore_index=ignore_index, label_smoothing=label_smoothing)
    chosen = resolve_backend(backend, logits)
    if variation is not None:
        if chosen.fused:
            raise ValueError(
                f"backend={chosen.name!r} generates the variation in registers: pass variation= only with "
                "backend='reference'"
            )
        if not isinstance(variation, torch.Tensor) or variation.shape != logits.shape:
            shape = tuple(variation.shape) if isinstance(variation, torch.Tensor) else type(variation).__name__
            raise ValueError(f"variation shape {shape} does not match logits shape {tuple(logits.shape)}")
        check_dense("variation", variation)
        if not variation.dtype.is_floating_point:  # (a complex one would lose its imaginary part)
            raise TypeError(f"variation must be a floating-point tensor, got {variation.dtype}")
        if variation.device != logits.device:
            raise ValueError(f"variation is on {variation.device} but logits are on {logits.device}")
    device = logits.device
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if variation_params is None:
        noise.check_sigma(sigma, value=not torch.compiler.is_compiling())
        variation_params = noise.variation_params_tensor(sigma, device)
        draw = sigma > 0
    else:
        noise.check_variation_params_tensor(variation_params, device)
        draw = True
    if seed is None:
        seed = draw_seed(device, generator) if draw and variation is None else noise.seed_tensor(0, device)
    else:
        seed = noise.seed_tensor(seed, device)
    positions = target.numel()
    weight_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32  # the arithmetic's
    problem = BLVProblem(
        logits=logits, target=target, variation_weight=variation_weight.float().contiguous(),
        class_weight=None if weight is None else weight.to(weight_dtype).contiguous(),
        position_weight=None if position_weight is None else position_weight.to(weight_dtype),
        seed=seed, variation_params=variation_params, avg_factor=_avg_factor_tensor(avg_factor, device),
        offset=noise.check_offset(offset, positions), ignore_index=int(ignore_index), reduction=reduction,
        mode=mode, label_smoothing=float(label_smoothing), loss_dtype=loss_dtype(logits),
    )  # fmt: skip
    if chosen.fused:
        return ops.fused_loss(problem, chosen.name)
    return reference.loss(problem, variation=variation)  # the one backend that is plain autograd


def _avg_factor_tensor(avg_factor, device) -> torch.Tensor | None:
    """avg_factor as a 0-dim float32 tensor on ``device``; a number is filled there (no copy, no sync)."""
    if avg_factor is None:
        return None
    if isinstance(avg_factor, torch.Tensor):
        if avg_factor.device.type == "meta" and device.type != "meta":
            raise ValueError("avg_factor is a meta tensor: it holds no value")
        return avg_factor.detach().to(device=device, dtype=torch.float32).reshape(())
    # zeros + x, not torch.full((), x): torch.compile specializes full's float argument (a recompile per value)
    return torch.zeros((), dtype=torch.float32, device=device) + avg_factor


class BLVLoss(nn.Module):
    """BLV cross-entropy while training, plain cross-entropy in ``eval()`` (like dropout).

    The variation weights ``w_c`` live in the buffer ``variation_weight`` (they follow
    ``.to(device)`` and the state dict); :meth:`set_class_counts` replaces them when the class
    counts are re-estimated. ``sigma`` may be set at every step (a schedule): it is kept on the
    device as the transform's constants, which every backend reads, so neither a kernel nor a
    ``torch.compile`` graph recompiles, a replayed CUDA graph uses the new value, and setting it
    does not sync.
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
        label_smoothing: float = 0.0,
        smoothing: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        noise.check_sigma(sigma)
        check_options(mode=mode, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction)
        if backend != "auto":
            get_backend(backend)  # an unknown name fails here, not at the first step
        variation_weight = class_weights(class_counts, smoothing=smoothing)
        if weight is not None:
            weight = class_weight_tensor(weight, "weight")
            if weight.shape != variation_weight.shape:
                raise ValueError(
                    f"weight must have one entry per class ({variation_weight.numel()}), got shape {tuple(weight.shape)}"
                )
        self.register_buffer("variation_weight", variation_weight)
        self.register_buffer("weight", weight)
        # [scale, threshold] of sigma as float32 bits: int32, so a module-wide .half() leaves them exact;
        # not in the state dict (sigma is an option, set by the code that builds the loss)
        self.register_buffer(
            "variation_params_bits", noise.variation_params_tensor(sigma).view(torch.int32), persistent=False
        )
        self._sigma = float(sigma)
        self.mode = mode
        self.ignore_index = int(ignore_index)
        self.reduction = reduction
        self.label_smoothing = float(label_smoothing)
        self.backend = backend

    def _apply(self, fn, recurse=True):
        # A module-wide dtype cast (.half(), .to(torch.bfloat16)) leaves the variation and class
        # weights float32, as the kernels read them: rounded, they would change every loss by up to
        # 2**-9 of a weight (sigma's constants are kept as int32 bits for the same reason). Device
        # moves apply.
        weights = {name: getattr(self, name) for name in ("variation_weight", "weight")}
        super()._apply(fn, recurse)
        for name, before in weights.items():
            after = getattr(self, name)
            if after is not None and after.dtype != before.dtype:
                setattr(self, name, before.to(after.device))
        return self

    @property
    def sigma(self) -> float:
        return self._sigma

    @sigma.setter
    def sigma(self, value: float) -> None:
        noise.check_sigma(value)
        device = self.variation_params_bits.device
        self.variation_params_bits.copy_(noise.variation_params_tensor(value, device).view(torch.int32))
        self._sigma = float(value)

    def set_class_counts(self, class_counts, *, smoothing: float = 0.0) -> None:
        """Replace the variation weights in place (same device, same number of classes)."""
        w = class_weights(class_counts, smoothing=smoothing)
        if w.shape != self.variation_weight.shape:
            raise ValueError(f"expected {self.variation_weight.numel()} class counts, got {w.numel()}")
        self.variation_weight.copy_(w)

    def forward(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        *,
        seed=None,
        position_weight: torch.Tensor | None = None,
        avg_factor=None,
    ) -> torch.Tensor:
        """The loss of a batch; ``seed``, ``position_weight`` and ``avg_factor`` as in :func:`blv_cross_entropy`."""
        self._check_class_count(logits)
        options = dict(ignore_index=self.ignore_index, reduction=self.reduction, label_smoothing=self.label_smoothing,
                       position_weight=position_weight, avg_factor=avg_factor)  # fmt: skip
        if not self.training:
            return self._plain_loss(logits, target, **options)
        return blv_cross_entropy_from_weights(
            logits, target, self.variation_weight, self.weight, variation_params=self.variation_params, seed=seed,
            mode=self.mode, backend=self.backend, **options,
        )  # fmt: skip

    def _check_class_count(self, logits: torch.Tensor) -> None:
        """Logits of the module's number of classes, in training and in eval(), named as the caller knows
        them (the variation weights are the module's own); every other check of the logits is the loss's
        (this one skips what they refuse, not to check a step's logits twice)."""
        num_classes = self.variation_weight.numel()
        if isinstance(logits, torch.Tensor) and logits.dim() >= 2 and logits.shape[1] != num_classes:
            raise ValueError(
                f"logits have C={logits.shape[1]} classes, but this loss was built for {num_classes} (its class counts)"
            )

    def _plain_loss(self, logits: torch.Tensor, target: torch.Tensor, **options) -> torch.Tensor:
        """The loss of ``eval()``: plain cross-entropy (the variation weights' device checked as training
        checks it)."""
        check_logits_target(logits, target)
        check_class_vector("variation weight", self.variation_weight, logits)
        return plain_cross_entropy(logits, target, self.weight, **options)

    @property
    def variation_params(self) -> torch.Tensor:
        """sigma's ``[scale, threshold]`` as the float32 tensor the backends read (a view of the buffer)."""
        return self.variation_params_bits.view(torch.float32)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.variation_weight.numel()}, sigma={self.sigma}, mode={self.mode!r}, "
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, backend={self.backend!r}"
        )


def plain_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    position_weight: torch.Tensor | None = None,
    avg_factor=None,
) -> torch.Tensor:
    """What BLV is outside training: ``F.cross_entropy`` in the logits' dtype with the same weights
    and reductions as :func:`blv_cross_entropy` (``position_weight``, ``avg_factor``)."""
    check_loss_arguments(logits, target, None, weight, position_weight, reduction, avg_factor)
    check_options(ignore_index=ignore_index, label_smoothing=label_smoothing)
    check_target_values(target, logits.shape[1], ignore_index)  # the message of training, not an IndexError
    return reference.weighted_cross_entropy(
        logits, target.long(), None if weight is None else weight.to(logits.dtype), ignore_index=int(ignore_index),
        reduction=reduction, label_smoothing=float(label_smoothing), position_weight=position_weight,
        avg_factor=_avg_factor_tensor(avg_factor, logits.device), dtype=loss_dtype(logits),
    )  # fmt: skip
