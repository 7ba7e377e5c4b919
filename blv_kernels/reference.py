"""Plain-PyTorch BLV loss: the ground truth every fused backend is checked against, and the
backend that runs anywhere (any device, float64 too, double backward and ``torch.func``).

Written for clarity, not speed: it materialises the variation ``v`` and the perturbed logits
``z = x + v * w`` in float32 (float64 for float64 logits), then calls ``F.cross_entropy`` on
them and casts the result to the loss's dtype (the logits', or float32 under autocast). Memory traffic for (N, C, S) logits: the
Philox counters and words (several int64 tensors of N*S*C/4), ``v``, ``z``, then
``F.cross_entropy``'s own passes; the fused backends read the logits once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import noise
from ._validation import check_target_values
from .problem import BLVProblem

__all__ = ["loss", "weighted_cross_entropy"]


def loss(problem: BLVProblem, variation: torch.Tensor | None = None) -> torch.Tensor:
    """The BLV loss of ``problem``, differentiable by autograd; ``variation``: an explicit ``v``
    of the logits' shape instead of the stream."""
    logits = problem.logits
    num_classes = problem.num_classes
    if torch._C._functorch.peek_interpreter_stack() is None:
        # (under torch.func transforms no check can count the labels, vmap allowing neither .item()
        # nor _assert_async: F.cross_entropy's own check then refuses an out-of-range label)
        check_target_values(problem.target, num_classes, problem.ignore_index)
    target = problem.target.long()
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if variation is None:
        params = noise.device_variation_params(problem.variation_params, problem.mode)
        variation = noise.variation_of(logits.shape, params, problem.seed, problem.offset)
    # z_c = x_c + v * w_c, with w broadcast along the class dimension (dim 1)
    w = problem.variation_weight.reshape((1, num_classes) + (1,) * (logits.dim() - 2))
    z = logits.to(compute_dtype) + variation.to(compute_dtype) * w.to(compute_dtype)
    class_weight = None if problem.class_weight is None else problem.class_weight.to(compute_dtype)
    return weighted_cross_entropy(
        z, target, class_weight, ignore_index=problem.ignore_index, reduction=problem.reduction,
        label_smoothing=problem.label_smoothing, position_weight=problem.position_weight,
        avg_factor=problem.avg_factor,
    ).to(problem.loss_dtype)  # fmt: skip


def weighted_cross_entropy(
    z: torch.Tensor,
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
    *,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    position_weight: torch.Tensor | None,
    avg_factor: torch.Tensor | None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(z, target, class_weight, ...)`` (int64 target, weight in z's dtype) times
    mmseg's per-position weights, divided by ``avg_factor`` when given; the result in ``dtype``
    (z's by default).

    The weighting, sums and divisors of float16/bfloat16 ``z`` (eval's plain loss) are float32, as
    F.cross_entropy's own reductions: in half, 40000 positions' sum or an avg_factor of 1e5 is inf."""
    options = dict(weight=class_weight, ignore_index=ignore_index, label_smoothing=label_smoothing)
    dtype = z.dtype if dtype is None else dtype
    if position_weight is None and avg_factor is None:
        return F.cross_entropy(z, target, reduction=reduction, **options).to(dtype)
    exact = torch.promote_types(z.dtype, torch.float32)
    per_position = F.cross_entropy(z, target, reduction="none", **options).to(exact)
    if position_weight is not None:
        per_position = per_position * position_weight.to(exact)
    if reduction == "none":
        return per_position.to(dtype)
    total = per_position.sum()
    if reduction == "sum":
        return total.to(dtype)
    if avg_factor is not None:
        return (total / avg_factor.to(exact)).to(dtype)
    # F.cross_entropy's divisor of "mean": the count of valid positions, or the sum of their class weights
    valid = target != ignore_index
    if class_weight is None:
        return (total / valid.sum().to(exact)).to(dtype)
    return (total / torch.where(valid, class_weight[target.clamp(0, z.shape[1] - 1)], 0).to(exact).sum()).to(dtype)
