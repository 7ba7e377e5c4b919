"""Argument checks shared by every backend: each bad input gets an error that names it."""

from __future__ import annotations

import torch

REDUCTIONS = ("none", "sum", "mean")
LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TARGET_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_logits_target(logits: torch.Tensor, target: torch.Tensor) -> None:
    """Logits ``(N, C, d1..dk)`` floating point, target ``(N, d1..dk)`` integer, same device."""
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("logits and target must be tensors")
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape (N, C) or (N, C, d1, ..., dk), got {tuple(logits.shape)}")
    if logits.shape[1] == 0:
        raise ValueError(f"logits must have at least one class (C >= 1), got shape {tuple(logits.shape)}")
    if target.dtype not in TARGET_DTYPES:
        raise TypeError(
            f"target must hold integer class indices (uint8, int8, int16, int32 or int64), got {target.dtype}; "
            "soft-label (probability) targets are not supported"
        )
    expected = logits.shape[:1] + logits.shape[2:]
    if target.shape != expected:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits shape {tuple(logits.shape)}: "
            f"expected {tuple(expected)} (logits without the class dimension)"
        )
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_class_vector(name: str, vec: torch.Tensor | None, logits: torch.Tensor) -> None:
    """A per-class float vector (class weight, variation weight): shape (C,), logits' device."""
    if vec is None:
        return
    if not isinstance(vec, torch.Tensor) or not vec.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor of shape (C,)")
    num_classes = logits.shape[1]
    if vec.shape != (num_classes,):
        raise ValueError(f"{name} must have shape ({num_classes},) for C={num_classes} classes, got {tuple(vec.shape)}")
    if vec.device != logits.device:
        raise ValueError(f"{name} is on {vec.device} but logits are on {logits.device}")


def check_position_weight(position_weight: torch.Tensor | None, target: torch.Tensor) -> None:
    if position_weight is None:
        return
    if not isinstance(position_weight, torch.Tensor) or not position_weight.dtype.is_floating_point:
        raise TypeError("position_weight must be a floating-point tensor with the target's shape")
    if position_weight.shape != target.shape:
        raise ValueError(
            f"position_weight shape {tuple(position_weight.shape)} does not match target shape {tuple(target.shape)}"
        )
    if position_weight.device != target.device:
        raise ValueError(f"position_weight is on {position_weight.device} but target is on {target.device}")


def check_loss_arguments(logits, target, variation_weight, weight, position_weight, reduction, avg_factor) -> None:
    """Every check of a BLV loss call that needs no look at the label values."""
    check_logits_target(logits, target)
    check_class_vector("variation weight", variation_weight, logits)
    check_class_vector("weight", weight, logits)
    check_position_weight(position_weight, target)
    check_reduction(reduction)
    if avg_factor is not None and reduction != "mean":
        raise ValueError(
            f"avg_factor divides the sum of a 'mean' reduction; it cannot be used with reduction={reduction!r}"
        )


def invalid_target_mask(target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    return ((target < 0) | (target >= num_classes)) & (target != ignore_index)


def raise_or_assert_no_bad_labels(num_bad: torch.Tensor, first_bad, num_classes: int, ignore_index: int) -> None:
    """Raise on the host for CPU tensors; on an accelerator assert on the device (no sync)."""
    message = f"target has {{}} value(s) outside [0, {num_classes}) that are not ignore_index={ignore_index}"
    if num_bad.device.type == "cpu":
        count = int(num_bad)
        if count:
            first = f" (first: {int(first_bad())})" if first_bad is not None else ""
            raise ValueError(message.format(count) + first)
    else:
        torch._assert_async(num_bad == 0, message.format("some"))


def check_target_values(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Every label in [0, C) or equal to ignore_index, checked without a host sync on devices."""
    target = target.long()  # compare in int64: uint8 comparisons with a Python int wrap around
    bad = invalid_target_mask(target, num_classes, ignore_index)
    raise_or_assert_no_bad_labels(bad.sum(), lambda: target[bad][0], num_classes, ignore_index)
