"""One call of the BLV loss as every backend receives it, and what every fused backend does with
its kernels' outputs: the label check, the divisor of "mean", the reduction.

``loss.blv_cross_entropy_from_weights`` checks a call once and builds the :class:`BLVProblem`;
the reference computes its loss with autograd (``reference.loss``), a fused backend with its
kernels (``ops.py``: the operator contract).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import noise
from ._validation import check_loss_arguments, check_options, invalid_target_mask, raise_or_assert_no_bad_labels

__all__ = ["BLVProblem", "loss_dtype", "check_problem", "check_labels", "mean_divisor", "reduced_loss"]

HALF_DTYPES = (torch.float16, torch.bfloat16)


def loss_dtype(logits: torch.Tensor) -> torch.dtype:
    """The dtype of the loss of ``logits``: theirs, but float32 for float16/bfloat16 logits under
    autocast for their device, as ``F.cross_entropy`` (on autocast's float32 list) returns it: a
    half loss would round what is logged, overflow a float16 sum, and take GradScaler's 65536 as inf."""
    device_type = logits.device.type
    if (logits.dtype in HALF_DTYPES and torch.amp.is_autocast_available(device_type)
            and torch.is_autocast_enabled(device_type)):  # fmt: skip
        return torch.float32
    return logits.dtype


@dataclass(frozen=True)
class BLVProblem:
    """One loss call, checked and normalised (``loss.blv_cross_entropy_from_weights`` builds it).

    Tensors are on the logits' device; the weights are float32 and contiguous (per class) or
    float32 (per position, any strides).
    """

    logits: torch.Tensor  # (N, C, d1..dk), float16 / bfloat16 / float32 (float64: reference only)
    target: torch.Tensor  # (N, d1..dk), any integer dtype
    variation_weight: torch.Tensor  # w_c, (C,)
    class_weight: torch.Tensor | None  # F.cross_entropy's weight, (C,)
    position_weight: torch.Tensor | None  # mmseg's per-position weight, the target's shape
    seed: torch.Tensor  # 0-dim int64: the 64-bit Philox key
    variation_params: torch.Tensor  # (2,) float32: [scale, threshold] of the word -> v transform
    avg_factor: torch.Tensor | None  # 0-dim float32: the divisor of "mean" instead of the weights' sum
    offset: int  # stream offset: position q = offset + n*S + s
    ignore_index: int
    reduction: str  # "none", "sum", "mean"
    mode: str  # "abs" (v = min(|eps|, 1)) or "clamp" (v = clamp(eps, 0, 1))
    label_smoothing: float
    loss_dtype: torch.dtype  # the returned loss's: ``loss_dtype(logits)``

    @property
    def num_classes(self) -> int:
        return self.logits.shape[1]

    @property
    def positions(self) -> int:
        """N*S: the label count."""
        return self.target.numel()


def check_problem(problem: BLVProblem) -> None:
    """Raise unless ``problem`` is what ``blv_cross_entropy_from_weights`` builds: the checks of a
    call, and the forms the kernels read (float32 class vectors, contiguous; a 0-dim int64 seed and
    a 0-dim float32 avg_factor on the logits' device). For the op's direct callers (``ops.py``),
    with concrete values (a symbolic offset is no int)."""
    p = problem
    check_loss_arguments(p.logits, p.target, p.variation_weight, p.class_weight, p.position_weight, p.reduction,
                         p.avg_factor)  # fmt: skip
    check_options(ignore_index=p.ignore_index, label_smoothing=p.label_smoothing, mode=p.mode)
    noise.check_offset(p.offset, p.positions)
    if p.loss_dtype not in (p.logits.dtype, torch.float32):
        raise TypeError(f"loss_dtype must be the logits' dtype ({p.logits.dtype}) or torch.float32, got {p.loss_dtype}")
    noise.check_variation_params_tensor(p.variation_params, p.logits.device)
    for name, vec in (("variation weight", p.variation_weight), ("weight", p.class_weight)):
        if vec is not None and (vec.dtype != torch.float32 or not vec.is_contiguous()):
            raise TypeError(f"{name} must be a contiguous float32 tensor, got {vec.dtype}")
    if p.position_weight is not None and p.position_weight.dtype != torch.float32:
        raise TypeError(f"position_weight must be a float32 tensor, got {p.position_weight.dtype}")
    scalars = {"seed": (p.seed, torch.int64), "avg_factor": (p.avg_factor, torch.float32)}
    for name, (scalar, dtype) in scalars.items():
        if scalar is None and name == "avg_factor":
            continue
        if not isinstance(scalar, torch.Tensor) or scalar.shape != () or scalar.dtype != dtype:
            got = f"shape {tuple(scalar.shape)} {scalar.dtype}" if isinstance(scalar, torch.Tensor) else scalar
            raise TypeError(f"{name} must be a 0-dim {dtype} tensor, got {got!s}")
        if scalar.device != p.logits.device:
            raise ValueError(f"{name} is on {scalar.device} but logits are on {p.logits.device}")


def check_labels(problem: BLVProblem, bad_counts: torch.Tensor) -> None:
    """Raise (CPU) or assert on the device (no sync) when a label is outside [0, C) and not ignore_index."""
    target, num_classes, ignore_index = problem.target, problem.num_classes, problem.ignore_index
    raise_or_assert_no_bad_labels(
        bad_counts.sum(), lambda: target[invalid_target_mask(target.long(), num_classes, ignore_index)][0],
        num_classes, ignore_index,
    )  # fmt: skip


def mean_divisor(problem: BLVProblem, weight_sums: torch.Tensor) -> torch.Tensor | None:
    """The divisor of "mean" as a one-element float32 tensor (avg_factor, else the label pass's
    weight sums: F.cross_entropy's count or sum of class weights); None for "none" and "sum"."""
    if problem.reduction != "mean":
        return None
    return problem.avg_factor if problem.avg_factor is not None else weight_sums.sum()


def reduced_loss(problem: BLVProblem, loss_sums: torch.Tensor, denom: torch.Tensor | None,
                 loss_per_position: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """The loss in ``problem.loss_dtype`` from the loss pass's per-block sums (a fixed-order torch.sum: deterministic)."""
    if problem.reduction == "none":
        return loss_per_position
    total = loss_sums.sum()
    if denom is None:
        return total.to(problem.loss_dtype)
    mean = total / denom
    if problem.label_smoothing > 0 and problem.avg_factor is None:
        # F.cross_entropy's is (1-eps) nll / W_t + (eps/C) smooth / W_t: NaN where no label weighs (0 / 0 + x / 0),
        # where the fused total / W_t is x / 0 = inf
        mean = torch.where(denom == 0, torch.nan, mean)
    return mean.to(problem.loss_dtype)
