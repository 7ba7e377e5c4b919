"""Plain-PyTorch BLV loss: the ground truth every fused backend is checked against.

Written for clarity, not speed: it materialises the variation ``v`` (float32, the size of
the logits) and the perturbed logits, then calls ``F.cross_entropy``. Memory traffic for
(N, C, S) logits: the Philox counters and words (several int64 tensors of N*S*C/4), ``v``,
``z``, then ``F.cross_entropy``'s own passes; the fused kernels read the logits once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import noise
from ._validation import check_logits_target, check_loss_arguments, check_target_values
from .weights import class_weights

__all__ = ["blv_cross_entropy", "blv_cross_entropy_from_weights"]


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
) -> torch.Tensor:
    """BLV loss: ``F.cross_entropy(logits + v * w[c], target, ...)`` with ``w = class_weights(class_counts)``.

    Args:
        logits: ``(N, C)`` or ``(N, C, d1, ..., dk)``, float16 / bfloat16 / float32 / float64.
        target: ``(N, d1, ..., dk)`` class indices (uint8, int32 or int64, other ints too).
        class_counts: per-class counts ``n_c`` (length C), see :func:`blv_kernels.class_weights`.
        sigma: standard deviation of ``eps``; 0 gives exactly ``F.cross_entropy``.
        seed, offset: the variation stream (:func:`blv_kernels.variation`); ``seed`` is
            required unless ``variation`` is given.
        mode: ``"abs"`` (``v = min(|eps|, 1)``, the released code) or ``"clamp"``
            (``v = clamp(eps, 0, 1)``, the paper's pseudo-code).
        weight, ignore_index, reduction: as in ``F.cross_entropy``.
        variation: an explicit ``v`` of the logits' shape instead of the stream.
        position_weight: optional per-position weights (target's shape) multiplying each
            position's loss, as mmseg's ``weight=``; with ``reduction="mean"`` the divisor
            stays that of ``F.cross_entropy`` (the count, or the sum of class weights).
        avg_factor: with ``reduction="mean"``, divide the weighted sum by this number instead
            (mmseg's ``avg_factor``; ``target.numel()`` averages over all positions, ignored
            ones counting as 0, as mmseg's ``avg_non_ignore=False``).
    """
    return blv_cross_entropy_from_weights(
        logits, target, variation_weights_for(class_counts, logits, target), sigma,
        seed=seed, offset=offset, mode=mode, weight=weight, ignore_index=ignore_index,
        reduction=reduction, variation=variation, position_weight=position_weight, avg_factor=avg_factor,
    )  # fmt: skip


def variation_weights_for(class_counts, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``class_weights(class_counts)`` on the logits' device, checked against the logits' C."""
    check_logits_target(logits, target)
    w = class_weights(class_counts)
    num_classes = logits.shape[1]
    if w.numel() != num_classes:
        raise ValueError(f"class_counts has {w.numel()} entries but logits have C={num_classes} classes")
    return w.to(logits.device)


def blv_cross_entropy_from_weights(
    logits: torch.Tensor,
    target: torch.Tensor,
    variation_weight: torch.Tensor,
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
) -> torch.Tensor:
    """:func:`blv_cross_entropy` with the variation weights ``w_c`` (shape (C,)) given directly."""
    check_loss_arguments(logits, target, variation_weight, weight, position_weight, reduction, avg_factor)
    noise.check_sigma_mode(sigma, mode)
    num_classes = logits.shape[1]
    target = target.long()
    check_target_values(target, num_classes, ignore_index)

    if variation is not None:
        if variation.shape != logits.shape:
            raise ValueError(f"variation shape {tuple(variation.shape)} does not match logits {tuple(logits.shape)}")
        v = variation.to(logits.device)
    elif sigma > 0:
        if seed is None:
            raise ValueError("the reference needs an explicit seed (or an explicit variation)")
        v = noise.variation(logits.shape, sigma, seed=seed, offset=offset, mode=mode, device=logits.device)
    else:
        v = None  # sigma = 0: exactly F.cross_entropy

    z = logits
    if v is not None:
        # z_c = x_c + v * w_c, with w broadcast along the class dimension (dim 1)
        w = variation_weight.reshape((1, num_classes) + (1,) * (logits.dim() - 2))
        shift = v.to(torch.promote_types(v.dtype, logits.dtype)) * w
        z = logits + shift.to(logits.dtype)

    if weight is not None:
        weight = weight.to(z.dtype)  # F.cross_entropy wants the logits' dtype
    if position_weight is None and avg_factor is None:
        return F.cross_entropy(z, target, weight=weight, ignore_index=ignore_index, reduction=reduction)
    per_position = F.cross_entropy(z, target, weight=weight, ignore_index=ignore_index, reduction="none")
    if position_weight is not None:
        per_position = per_position * position_weight.to(per_position.dtype)
    if reduction == "none":
        return per_position
    if reduction == "sum":
        return per_position.sum()
    if avg_factor is not None:
        return per_position.sum() / avg_factor
    valid = target != ignore_index
    denom = valid.sum() if weight is None else (weight[target.clamp(0, num_classes - 1)] * valid).sum()
    return per_position.sum() / denom.to(per_position.dtype)
