"""Argument checks shared by every backend and the integrations: each bad input gets an error that
names it; numpy scalars are numbers."""

from __future__ import annotations

import math
import numbers
import reprlib

import torch

from .noise import check_mode

REDUCTIONS = ("none", "sum", "mean")
LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TARGET_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # the range of ignore_index: labels are compared in int64
FLOAT32_MAX = torch.finfo(torch.float32).max
FLOAT32_TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32: a divisor below it is 0 or subnormal


def check_logits_target(logits: torch.Tensor, target: torch.Tensor) -> None:
    """Logits ``(N, C, d1..dk)`` floating point, target ``(N, d1..dk)`` integer, same device."""
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("logits and target must be tensors")
    check_dense("logits", logits)
    check_dense("target", target)
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


def check_constant(name: str, tensor: torch.Tensor) -> None:
    """Weights and avg_factor are constants of the loss on every backend (as F.cross_entropy's weight):
    no gradient flows to them."""
    if tensor.requires_grad:
        raise ValueError(
            f"{name} requires grad, but BLV treats it as a constant on every backend (no gradient flows to it, as "
            f"to F.cross_entropy's weight): pass {name}.detach()"
        )


def check_dense(name: str, tensor: torch.Tensor) -> None:
    """Every backend addresses tensors through strides: a sparse or nested tensor is refused by name."""
    if tensor.layout != torch.strided or tensor.is_nested:
        layout = "nested" if tensor.is_nested else str(tensor.layout).removeprefix("torch.")
        raise TypeError(f"{name} must be a dense (strided) tensor, got a {layout} one")


def check_holds_values(name: str, tensor: torch.Tensor, what: str = "values") -> None:
    """A meta tensor has a shape and no data: an error naming it, not torch's "Cannot copy out of meta tensor"."""
    if tensor.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor: it holds no {what}")


def check_class_vector(name: str, vec: torch.Tensor | None, logits: torch.Tensor) -> None:
    """A per-class float vector (class weight, variation weight): shape (C,), logits' device, constant."""
    if vec is None:
        return
    if not isinstance(vec, torch.Tensor) or not vec.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor of shape (C,), got {type(vec).__name__}")
    check_dense(name, vec)
    num_classes = logits.shape[1]
    if vec.shape != (num_classes,):
        raise ValueError(f"{name} must have shape ({num_classes},) for C={num_classes} classes, got {tuple(vec.shape)}")
    if vec.device != logits.device:
        raise ValueError(f"{name} is on {vec.device} but logits are on {logits.device}")
    check_constant(name, vec)


def check_position_weight(
    position_weight: torch.Tensor | None, target: torch.Tensor, name: str = "position_weight"
) -> None:
    """Per-position weights: a constant float tensor of the target's shape, on its device; ``name``: the
    argument's name where the caller knows it by another (the mmseg adapter's ``weight``)."""
    if position_weight is None:
        return
    if not isinstance(position_weight, torch.Tensor) or not position_weight.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor with the target's shape")
    check_dense(name, position_weight)
    if position_weight.shape != target.shape:
        raise ValueError(
            f"{name} shape {tuple(position_weight.shape)} does not match target shape {tuple(target.shape)}"
        )
    if position_weight.device != target.device:
        raise ValueError(f"{name} is on {position_weight.device} but target is on {target.device}")
    check_constant(name, position_weight)


def check_avg_factor(avg_factor, reduction: str) -> None:
    if avg_factor is None:
        return
    if reduction != "mean":
        raise ValueError(
            f"avg_factor divides the sum of a 'mean' reduction; it cannot be used with reduction={reduction!r}"
        )
    if isinstance(avg_factor, torch.Tensor):  # data: its value is used as it is (reading it would sync)
        if avg_factor.numel() != 1 or avg_factor.dtype == torch.bool or avg_factor.dtype.is_complex:
            raise TypeError(
                f"avg_factor must be a number or a one-element tensor of real numbers, got a {avg_factor.dtype} "
                f"tensor of shape {tuple(avg_factor.shape)}"
            )
        check_dense("avg_factor", avg_factor)
        check_constant("avg_factor", avg_factor)
        # a CPU tensor's value is read as a number's (no device to sync); on a GPU it is data, unchecked
        if avg_factor.device.type == "cpu" and type(avg_factor) is torch.Tensor and not torch.compiler.is_compiling():
            _check_avg_factor_value(avg_factor.item())
    elif isinstance(avg_factor, bool) or not isinstance(avg_factor, numbers.Real):
        raise TypeError(f"avg_factor must be a number or a one-element tensor, got {type(avg_factor).__name__}")
    elif not torch.compiler.is_compiling():
        # (not while torch.compile traces: there a number may be symbolic, and a branch on it would break the graph)
        _check_avg_factor_value(avg_factor)


def _check_avg_factor_value(avg_factor) -> None:
    if not FLOAT32_TINY <= avg_factor <= FLOAT32_MAX:  # (NaN fails; any int compares)
        raise ValueError(
            f"avg_factor must be a finite number > 0 within float32's range (the divisor of the sum), got "
            f"{reprlib.repr(avg_factor)}"
        )


def check_loss_arguments(logits, target, variation_weight, weight, position_weight, reduction, avg_factor) -> None:
    """Every check of a BLV loss call's tensors that needs no look at the label values."""
    check_logits_target(logits, target)
    check_class_vector("variation weight", variation_weight, logits)
    check_class_vector("weight", weight, logits)
    check_position_weight(position_weight, target)
    check_reduction(reduction)
    check_avg_factor(avg_factor, reduction)


_NOT_GIVEN = object()  # an option the caller does not ask check_options to check (None is a bad value)


def check_options(*, ignore_index, label_smoothing, mode=_NOT_GIVEN, reduction=_NOT_GIVEN) -> None:
    """The non-tensor options of a loss (numpy scalars are numbers too)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not INT64_MIN <= int(ignore_index) <= INT64_MAX:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    # (compared as given, not through float(), which overflows for an int such as 10**400)
    if (
        isinstance(label_smoothing, bool)
        or not isinstance(label_smoothing, numbers.Real)
        or not 0 <= label_smoothing <= 1
    ):
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if mode is not _NOT_GIVEN:
        check_mode(mode)
    if reduction is not _NOT_GIVEN:
        check_reduction(reduction)


def invalid_target_mask(target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    return ((target < 0) | (target >= num_classes)) & (target != ignore_index)


def raise_or_assert_no_bad_labels(
    num_bad: torch.Tensor, first_bad, num_classes: int, ignore_index: int, name: str = "target"
) -> None:
    """Raise on the host for CPU tensors; on an accelerator, or while torch.compile traces, assert
    on the device (no sync, no graph break)."""
    message = f"{name} has {{}} value(s) outside [0, {num_classes}) that are not ignore_index={ignore_index}"
    if num_bad.device.type == "cpu" and not torch.compiler.is_compiling():
        count = int(num_bad)
        if count:
            first = f" (first: {int(first_bad())})" if first_bad is not None else ""
            raise ValueError(message.format(count) + first)
    else:
        torch._assert_async(num_bad == 0, message.format("some"))


def check_target_values(target: torch.Tensor, num_classes: int, ignore_index: int, name: str = "target") -> None:
    """Every label in [0, C) or equal to ignore_index, checked without a host sync on devices; ``name``:
    the labels' argument where it is not the loss's ``target``."""
    target = target.long()  # compare in int64: uint8 comparisons with a Python int wrap around
    bad = invalid_target_mask(target, num_classes, ignore_index)
    raise_or_assert_no_bad_labels(bad.sum(), lambda: target[bad][0], num_classes, ignore_index, name)


def integer(name: str, value, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int (Python or numpy integer; not a bool) within [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = [] if minimum is None else [f">= {minimum}"]
        bounds += [] if maximum is None else [f"<= {maximum}"]
        raise ValueError(f"{name} must be an integer {' and '.join(bounds)}, got {value}")
    return value


def integer_ignore_index(ignore_index) -> int:
    """``ignore_index`` of the counting tools as an int in int64's range (:func:`integer`'s errors)."""
    return integer("ignore_index", ignore_index, minimum=INT64_MIN, maximum=INT64_MAX)


def real(name: str, value, *, minimum: float | None = None, maximum: float | None = None, below: float | None = None):
    """``value`` as a finite float (Python or numpy number; not a bool) in [minimum, maximum] or [minimum, below)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float64
        number = math.inf if value > 0 else -math.inf
    inside = -math.inf < number < math.inf  # math.isfinite, which torch.compile(dynamic=True) cannot trace
    inside &= minimum is None or number >= minimum
    inside &= maximum is None or number <= maximum
    inside &= below is None or number < below
    if not inside:
        bounds = [] if minimum is None else [f">= {minimum}"]
        bounds += [] if maximum is None else [f"<= {maximum}"]
        bounds += [] if below is None else [f"< {below}"]
        within = f" {' and '.join(bounds)}" if bounds else ""
        raise ValueError(f"{name} must be a finite number{within}, got {reprlib.repr(value)}")
    return number
