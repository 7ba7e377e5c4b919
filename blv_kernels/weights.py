"""Class prior -> BLV variation weights.

The paper's frequency term (Eq. 3): for per-class pixel counts ``n_c``

    f_c = log(sum_k n_k) - log(n_c)      # = -log p_c >= 0, large for rare classes
    w_c = f_c / max_k f_k                # in [0, 1]; the rarest class gets 1

and every logit of class ``c`` is shifted by ``v * w_c`` during training.
"""

from __future__ import annotations

import reprlib
from collections.abc import Sequence

import numpy as np
import torch

from ._validation import check_constant, check_dense, check_holds_values, real

__all__ = ["class_weights", "class_weight_tensor"]


def _counts_as_float64(class_counts) -> torch.Tensor:
    """Lists, numpy arrays and tensors -> a 1-D float64 CPU tensor, validated."""
    if isinstance(class_counts, torch.Tensor):
        if class_counts.dtype.is_complex or class_counts.dtype == torch.bool:
            raise TypeError(f"class_counts must be real numbers, got a {class_counts.dtype} tensor")
        check_dense("class_counts", class_counts)
        check_holds_values("class_counts", class_counts, "counts")
        counts = class_counts.detach().to(device="cpu", dtype=torch.float64)
    elif isinstance(class_counts, (Sequence, np.ndarray)) and not isinstance(class_counts, (str, bytes)):
        if isinstance(class_counts, np.ndarray) and class_counts.dtype.kind not in "iuf":
            raise TypeError(f"class_counts must be real numbers, got a numpy {class_counts.dtype} array")
        if isinstance(class_counts, Sequence) and any(isinstance(c, (bool, np.bool_)) for c in class_counts):
            raise TypeError(f"class_counts must be numbers, not booleans: got {reprlib.repr(class_counts)}")
        try:  # torch.tensor, not numpy, so that torch.compile traces a list of counts
            counts = torch.tensor(np.asarray(class_counts, dtype=np.float64) if isinstance(class_counts, np.ndarray)
                                  else class_counts, dtype=torch.float64)  # fmt: skip
        except (TypeError, ValueError, RuntimeError, OverflowError) as err:  # OverflowError: beyond float64
            raise TypeError(
                f"class_counts must be numbers within float64's range, got {reprlib.repr(class_counts)}"
            ) from err
    else:
        raise TypeError(
            f"class_counts must be a list, numpy array or tensor of per-class counts, got {type(class_counts).__name__}"
        )
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"class_counts must be a non-empty 1-D sequence, got shape {tuple(counts.shape)}")
    _require(torch.isfinite(counts).all(), lambda: f"class_counts must be finite, got {counts.tolist()}")
    _require((counts >= 0).all(), lambda: f"class_counts must be non-negative, class {int(torch.nonzero(counts < 0)[0])} "
             f"has count {counts[counts < 0][0].item()}")  # fmt: skip
    return counts


def _require(condition: torch.Tensor, message) -> None:
    """ValueError(message()) unless ``condition``; under torch.compile an assertion in the graph instead
    (the counts are data there, and a branch on them would break the graph)."""
    if torch.compiler.is_compiling():
        torch._assert_async(condition, "class_counts: invalid counts (zero without smoothing, negative or not finite)")
    elif not bool(condition):
        raise ValueError(message())


def class_weights(class_counts, *, smoothing: float = 0.0) -> torch.Tensor:
    """Per-class variation weights ``w_c = f_c / max f`` with ``f_c = log(sum n) - log(n_c)``.

    Args:
        class_counts: per-class pixel (or sample) counts ``n_c``, length C; a list, numpy
            array or tensor (of any size: the sum is formed in log space, so counts near the
            float64 maximum do not overflow it).
        smoothing: added to every count first (additive smoothing). A count of 0 makes
            ``f_c`` infinite, so zero counts are rejected unless ``smoothing > 0``.

    Returns:
        A float32 CPU tensor of shape (C,) with values in [0, 1]. One class, or counts
        that give every class the same frequency term 0, yield all zeros (no variation).
        Inside ``torch.compile`` a list of counts is traced into the graph.
    """
    smoothing = real("smoothing", smoothing, minimum=0.0)
    counts = _counts_as_float64(class_counts) + smoothing
    _require(torch.isfinite(counts).all(), lambda: f"class_counts + smoothing must be finite in float64, got "
             f"{reprlib.repr(counts.tolist())}")  # fmt: skip
    _require((counts > 0).all(), lambda: (
        f"class_counts has zero count for class(es) {torch.nonzero(counts == 0).flatten().tolist()}: log(0) makes "
        "their weight infinite; pass smoothing > 0 (for example smoothing=1.0) or fix the counts"))  # fmt: skip
    # f_c = log(sum n) - log(n_c) >= 0 in exact arithmetic; the sum in log space (no overflow), the
    # rounding clamped at 0. One class, or a prior giving every class f_c = 0: no variation, w = 0.
    log_counts = counts.log()
    freq = (torch.logsumexp(log_counts, 0) - log_counts).clamp_min(0.0)
    fmax = freq.max()
    return torch.where(fmax > 0, freq / fmax.clamp_min(torch.finfo(torch.float64).tiny), 0.0).to(torch.float32)


def class_weight_tensor(weight, name: str = "weight") -> torch.Tensor:
    """``F.cross_entropy``'s per-class ``weight``, given as a tensor (on any device), a numpy array or a
    list of numbers, as the 1-D float32 tensor of finite values the kernels read; or an error naming
    ``name``. Checked once, where a loss is built, not at every step (the check reads the values)."""
    if isinstance(weight, torch.Tensor):
        check_dense(name, weight)
        check_holds_values(name, weight)
        check_constant(name, weight)
        if weight.dtype.is_complex or weight.dtype == torch.bool:
            raise TypeError(f"{name} must be real numbers, got a {weight.dtype} tensor")
        converted = weight.float()
    else:
        # (a float conversion would drop an imaginary part with a warning, or take booleans as numbers)
        if isinstance(weight, np.ndarray) and weight.dtype.kind not in "iuf":
            raise TypeError(f"{name} must be real numbers, got a {weight.dtype} array")
        if isinstance(weight, Sequence) and any(isinstance(w, (bool, np.bool_)) for w in weight):
            raise TypeError(f"{name} must be numbers, not booleans: got {reprlib.repr(weight)}")
        try:
            converted = torch.as_tensor(np.asarray(weight, dtype=np.float64), dtype=torch.float32)
        except OverflowError:  # an int beyond float64
            raise ValueError(f"{name} must be finite in float32, got {reprlib.repr(weight)}") from None
        except (TypeError, ValueError):
            raise TypeError(
                f"{name} must be a tensor or a list of numbers, one per class, got {reprlib.repr(weight)}"
            ) from None
    if converted.dim() != 1:
        raise ValueError(f"{name} must be a 1-D list of numbers, one per class, got shape {tuple(converted.shape)}")
    if not torch.isfinite(converted).all():  # (1e300 becomes inf in float32)
        raise ValueError(f"{name} must be finite in float32, got {reprlib.repr(converted.tolist())}")
    return converted
